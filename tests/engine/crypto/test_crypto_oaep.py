"""RSAES-OAEP decoding (RFC 8017 7.1.2) in our code: round trips against `cryptography`,
and every malformed encoding refused with the one same error."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from engine.crypto.errors import DecryptionFailed
from engine.crypto.oaep import mgf1, oaep_decode

KEY = rsa.generate_private_key(65537, 2048)
K = 256
HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
          "sha512": hashes.SHA512}


def raw_decrypt(ciphertext: bytes) -> bytes:
    """What CKM_RSA_X_509 gives: c^d mod n as k bytes."""
    n, d = KEY.public_key().public_numbers().n, KEY.private_numbers().d
    return pow(int.from_bytes(ciphertext, "big"), d, n).to_bytes(K, "big")


def encode(message: bytes, hash_name: str, *, y: int = 0, l_hash: bytes | None = None,
           ps_byte: int = 0, separator: int = 1, ps_len: int | None = None) -> bytes:
    """RFC 8017 7.1.1 EME-OAEP encoding, with knobs to break each part."""
    h_len = hashlib.new(hash_name).digest_size
    l_hash = hashlib.new(hash_name, b"").digest() if l_hash is None else l_hash
    ps_len = K - len(message) - 2 * h_len - 2 if ps_len is None else ps_len
    ps = bytes(ps_len)
    if ps_byte and ps:
        ps = ps[:-1] + bytes([ps_byte])
    db = l_hash + ps + bytes([separator]) + message
    db = db.ljust(K - h_len - 1, b"\x00")[: K - h_len - 1]
    seed = os.urandom(h_len)
    masked_db = bytes(a ^ b for a, b in zip(db, mgf1(seed, len(db), hash_name), strict=True))
    masked_seed = bytes(a ^ b for a, b in zip(seed, mgf1(masked_db, h_len, hash_name),
                                              strict=True))
    return bytes([y]) + masked_seed + masked_db


@pytest.mark.parametrize("hash_name", sorted(HASHES))
def test_decodes_what_cryptography_encrypts(hash_name: str) -> None:
    algo = HASHES[hash_name]()
    h_len = algo.digest_size
    for message in (b"", b"x", os.urandom(K - 2 * h_len - 2)):
        ct = KEY.public_key().encrypt(message, padding.OAEP(padding.MGF1(algo), algo, None))
        assert oaep_decode(raw_decrypt(ct), K, hash_name) == message
    labelled = KEY.public_key().encrypt(b"m", padding.OAEP(padding.MGF1(algo), algo, b"lbl"))
    assert oaep_decode(raw_decrypt(labelled), K, hash_name, b"lbl") == b"m"


def test_own_encoder_is_correct() -> None:
    assert oaep_decode(encode(b"hello", "sha256"), K, "sha256") == b"hello"


@pytest.mark.parametrize(
    "em",
    [
        pytest.param(encode(b"m", "sha256", y=1), id="first-byte-not-zero"),
        pytest.param(encode(b"m", "sha256", y=0x80), id="first-byte-high"),
        pytest.param(encode(b"m", "sha256", l_hash=bytes(32)), id="wrong-label-hash"),
        pytest.param(encode(b"m", "sha256", ps_byte=2), id="garbage-in-padding"),
        pytest.param(encode(b"m", "sha256", ps_byte=0xFF), id="ff-in-padding"),
        pytest.param(encode(b"m", "sha256", separator=2), id="wrong-separator"),
        pytest.param(encode(b"", "sha256", separator=0), id="no-separator-at-all"),
        pytest.param(encode(b"m", "sha1"), id="other-hash"),
        pytest.param(encode(b"m", "sha256")[:-1], id="one-byte-short"),
        pytest.param(encode(b"m", "sha256") + b"\x00", id="one-byte-long"),
        pytest.param(bytes(K), id="all-zero"),
        pytest.param(b"", id="empty"),
    ],
)
def test_every_malformed_encoding_gives_the_same_error(em: bytes) -> None:
    with pytest.raises(DecryptionFailed) as caught:
        oaep_decode(em, K, "sha256")
    error = caught.value
    assert error.code == "decryption_failed"
    assert error.message == ("decryption failed: wrong key, wrong encryption algorithm, or "
                             "altered ciphertext")
    assert error.cause == "" and error.__cause__ is None


def test_modulus_too_small_for_the_hash() -> None:
    with pytest.raises(DecryptionFailed):
        oaep_decode(bytes(100), 100, "sha512")  # needs k >= 2*64 + 2


def test_mgf1_known_answer() -> None:
    # MGF1-SHA-1 of "foo", 3 bytes: the first bytes of SHA1("foo" || 00000000).
    assert mgf1(b"foo", 3, "sha1") == hashlib.sha1(b"foo\x00\x00\x00\x00").digest()[:3]
    assert len(mgf1(b"s", 100, "sha256")) == 100
