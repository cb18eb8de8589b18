"""RSAES-OAEP decoding (RFC 8017, 7.1.2 step 3), for tokens without OAEP-SHA-256.

SoftHSM 2.6.1 does OAEP with SHA-1 only. For the other hashes the token does
the raw RSA operation (``CKM_RSA_X_509``, the private key never leaves it) and
this module decodes the encoded message EM. Every check is computed before
any is looked at, and all failures give the same :class:`DecryptionFailed`, so
that which check failed (Manger's attack needs exactly that) is not observable
from the error and, as far as pure Python allows, not from the timing: the scan
for the 0x01 separator walks the whole data block with no early exit and no
branch on secret bytes.
"""

from __future__ import annotations

import hashlib
import hmac

from engine.crypto.errors import DecryptionFailed

OAEP_HASHES = ("sha1", "sha256", "sha384", "sha512")


def mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    """MGF1 (RFC 8017, B.2.1)."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def decryption_failed() -> DecryptionFailed:
    """The one error for every decryption failure (never says which check failed)."""
    return DecryptionFailed(
        "decryption failed: wrong key, wrong encryption algorithm, or altered ciphertext"
    )


def oaep_decode(em: bytes, k: int, hash_name: str, label: bytes = b"") -> bytes:
    """The message M inside ``em`` (``k`` bytes, the output of raw RSA decryption).

    Raises :class:`DecryptionFailed` for any malformed encoding.
    """
    if hash_name not in OAEP_HASHES:
        raise ValueError(f"unsupported OAEP hash {hash_name!r}")
    h_len = hashlib.new(hash_name).digest_size
    # Public facts (lengths), not secrets: checked first, same error anyway.
    if k < 2 * h_len + 2 or len(em) != k:
        raise decryption_failed()
    l_hash = hashlib.new(hash_name, label).digest()
    y = em[0]
    masked_seed, masked_db = em[1 : 1 + h_len], em[1 + h_len :]
    seed = _xor(masked_seed, mgf1(masked_db, h_len, hash_name))
    db = _xor(masked_db, mgf1(seed, k - h_len - 1, hash_name))
    bad = int(not hmac.compare_digest(db[:h_len], l_hash))
    bad |= (y | -y) >> 8 & 1  # 1 when y != 0 (y is 0..255), without a branch on y
    # DB = lHash' || PS (zeros) || 0x01 || M. Walk every byte: `found` turns 1 at the
    # first 0x01; a byte that is neither 0x00 nor 0x01 before it is an error.
    found, index = 0, 0
    for i in range(h_len, len(db)):
        byte = db[i]
        is_one = int(byte == 1)
        is_zero = int(byte == 0)
        first = is_one & (found ^ 1)
        index |= -first & i  # i on the first 0x01, unchanged otherwise
        neither = (is_one | is_zero) ^ 1
        bad |= neither & (found ^ 1)  # garbage in PS, before the separator
        found |= is_one
    bad |= found ^ 1
    if bad:
        raise decryption_failed()
    return db[index + 1 :]
