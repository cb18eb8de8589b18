"""AES-GCM (NIST SP 800-38D) and AES-KWP (RFC 5649) from the token's AES block function.

Why: p11-kit 0.24 (Debian bookworm) forwards only the mechanisms whose
parameters its RPC can encode, and CKM_AES_GCM (a CK_GCM_PARAMS) is not one of
them: through ``p11-kit-client.so`` the token answers CKR_MECHANISM_INVALID to
GCM, while CKM_AES_ECB (no parameter) crosses. The crypto core then runs the
GCM mode here around one C_Encrypt(CKM_AES_ECB) call per seal or open: the key
stays in the token, and the output is bit for bit CKM_AES_GCM's, so a blob
sealed by a node with a local token opens through p11-kit and the reverse.

What this costs: the GHASH subkey H = E_K(0^128) and the counter keystream of
the call exist in this process's memory for the duration of the call (with
the token's own GCM they never leave it). This process holds the plaintext
anyway; H is not kept after the call. Only 96-bit IVs are supported (the core
always draws 12-byte IVs).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from engine.crypto.errors import IntegrityCheckFailed
from engine.errors import InternalError

BLOCK = 16
TAG_BYTES = 16
IV_BYTES = 12
# ECB input per token call: p11-kit carries each call as one message in memory.
ECB_CHUNK = 64 * 1024

# "Multiply by x" in GCM's reflected bit order shifts right and reduces with R.
_R = 0xE1 << 120


def _mulx(value: int) -> int:
    return (value >> 1) ^ _R if value & 1 else value >> 1


def _reduction(byte: int) -> int:
    for _ in range(8):
        byte = _mulx(byte)
    return byte


# x^8 times the low byte of a field element: Z * x^8 == (Z >> 8) ^ _RED[Z & 0xff].
_RED = tuple(_reduction(b) for b in range(256))


def _table(h: int) -> list[int]:
    """T[b] = (b as the first byte of a block) * H, built from H * x^0..x^7."""
    basis = [h]
    for _ in range(7):
        basis.append(_mulx(basis[-1]))
    table = [0] * 256
    for b in range(1, 256):
        low = b & -b  # lowest set bit: the x^(7 - bit) multiple of H
        table[b] = table[b ^ low] ^ basis[7 - low.bit_length() + 1]
    return table


def ghash(h: bytes, aad: bytes, ciphertext: bytes) -> bytes:
    """GHASH_H(A || 0* || C || 0* || [len(A)]64 || [len(C)]64)."""
    table = _table(int.from_bytes(h, "big"))
    red = _RED
    y = 0

    def absorb(data: bytes) -> None:
        nonlocal y
        for i in range(0, len(data), BLOCK):
            block = data[i : i + BLOCK].ljust(BLOCK, b"\x00")
            x = (y ^ int.from_bytes(block, "big")).to_bytes(BLOCK, "big")
            # Horner over the bytes, last first: z = z * x^8 + T[byte].
            z = 0
            for byte in reversed(x):
                z = (z >> 8) ^ red[z & 0xFF] ^ table[byte]
            y = z

    absorb(aad)
    absorb(ciphertext)
    absorb((len(aad) * 8).to_bytes(8, "big") + (len(ciphertext) * 8).to_bytes(8, "big"))
    return y.to_bytes(BLOCK, "big")


def _xor(a: bytes, b: bytes) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "big") ^ int.from_bytes(b[:n], "big")).to_bytes(n, "big")


def _blocks(ecb: Callable[[bytes], bytes], iv: bytes, length: int) -> tuple[bytes, bytes, bytes]:
    """(H, E_K(J0), keystream of ``length`` bytes) from the token, in as few calls as
    ECB_CHUNK allows (one for anything up to 64 KiB)."""
    if len(iv) != IV_BYTES:
        raise InternalError(f"GCM through the AES block function takes {IV_BYTES}-byte IVs")
    count = -(-length // BLOCK)
    if count > 0xFFFFFFFF - 2:
        raise InternalError("GCM input too long")
    data = bytes(BLOCK) + iv + b"\x00\x00\x00\x01" + b"".join(
        iv + (2 + i).to_bytes(4, "big") for i in range(count))
    out = b"".join(ecb(data[i : i + ECB_CHUNK]) for i in range(0, len(data), ECB_CHUNK))
    if len(out) != len(data):
        raise InternalError("the token's AES-ECB returned a short result")
    return out[:BLOCK], out[BLOCK : 2 * BLOCK], out[2 * BLOCK : 2 * BLOCK + length]


def seal(ecb: Callable[[bytes], bytes], iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``ciphertext || tag``, as CKM_AES_GCM with a 128-bit tag would return it."""
    h, mask, stream = _blocks(ecb, iv, len(plaintext))
    ciphertext = _xor(plaintext, stream) if plaintext else b""
    return ciphertext + _xor(ghash(h, aad, ciphertext), mask)


def open_sealed(ecb: Callable[[bytes], bytes], iv: bytes, data: bytes, aad: bytes,
                label: str | None = None) -> bytes:
    """Inverse of :func:`seal`; IntegrityCheckFailed (nothing decrypted) on a bad tag."""
    if len(data) < TAG_BYTES:
        raise IntegrityCheckFailed(
            "integrity check failed: the ciphertext is shorter than its tag", target=label)
    ciphertext, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
    h, mask, stream = _blocks(ecb, iv, len(ciphertext))
    if not hmac.compare_digest(_xor(ghash(h, aad, ciphertext), mask), tag):
        raise IntegrityCheckFailed(
            "integrity check failed: wrong key, wrong additional data, or altered ciphertext",
            target=label)
    return _xor(ciphertext, stream) if ciphertext else b""


# --------------------------------------------------------------------------- AES-KWP

# RFC 5649: AES key wrap with padding, from single-block AES calls. Through p11-kit
# 0.24 CKM_AES_KEY_WRAP_PAD does not cross either; this is one ECB call per step
# (6 per 64-bit semiblock, one after the other). The secret wrapped is in this
# process anyway (it is the caller's input, or the unwrapped output).
_KWP_AIV = bytes.fromhex("A65959A6")


def kwp_wrap(ecb: Callable[[bytes], bytes], secret: bytes) -> bytes:
    """``secret`` wrapped as CKM_AES_KEY_WRAP_PAD would wrap it."""
    padded = secret + bytes(-len(secret) % 8)
    aiv = _KWP_AIV + len(secret).to_bytes(4, "big")
    if len(padded) == 8:
        return ecb(aiv + padded)
    a, r = aiv, [padded[i : i + 8] for i in range(0, len(padded), 8)]
    n = len(r)
    for j in range(6):
        for i in range(n):
            b = ecb(a + r[i])
            a = _xor(b[:8], (n * j + i + 1).to_bytes(8, "big"))
            r[i] = b[8:]
    return a + b"".join(r)


def kwp_unwrap(decrypt: Callable[[bytes], bytes], wrapped: bytes,
               label: str | None = None) -> bytes:
    """Inverse of :func:`kwp_wrap` with the block decryption; a wrong key or altered
    blob is IntegrityCheckFailed."""
    if len(wrapped) < 16 or len(wrapped) % 8:
        raise _kwp_failed(label)
    if len(wrapped) == 16:
        block = decrypt(wrapped)
        a, plain = block[:8], block[8:]
    else:
        a, r = wrapped[:8], [wrapped[i : i + 8] for i in range(8, len(wrapped), 8)]
        n = len(r)
        for j in range(5, -1, -1):
            for i in range(n - 1, -1, -1):
                b = decrypt(_xor(a, (n * j + i + 1).to_bytes(8, "big")) + r[i])
                a, r[i] = b[:8], b[8:]
        plain = b"".join(r)
    length = int.from_bytes(a[4:], "big")
    ok = hmac.compare_digest(a[:4], _KWP_AIV) and len(plain) - 8 < length <= len(plain)
    if not ok or any(plain[length:]):
        raise _kwp_failed(label)
    return plain[:length]


def _kwp_failed(label: str | None) -> IntegrityCheckFailed:
    return IntegrityCheckFailed(
        "integrity check failed: wrong key or altered wrapped secret", target=label)
