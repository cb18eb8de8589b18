"""AES-256-GCM seal/open in the token, data keys, and the token RNG."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.crypto import CryptoCore, IntegrityCheckFailed, KeySpec, Sealed
from engine.errors import InvalidInput, SecurityError


async def test_seal_open_round_trip(crypto_core: CryptoCore, aes_key: str) -> None:
    for plaintext in (b"", b"x", b"hello world" * 100):
        sealed = await crypto_core.seal(aes_key, plaintext, b"context")
        assert len(sealed.iv) == 12
        assert len(sealed.ciphertext) == len(plaintext) + 16
        opened = await crypto_core.open(aes_key, sealed.iv, sealed.ciphertext, b"context")
        assert opened == plaintext
    iv, ciphertext = await crypto_core.seal(aes_key, b"no aad")  # unpacks like a tuple
    assert await crypto_core.open(aes_key, iv, ciphertext) == b"no aad"


async def test_ivs_are_fresh(crypto_core: CryptoCore, aes_key: str) -> None:
    sealed = [await crypto_core.seal(aes_key, b"same") for _ in range(20)]
    assert len({s.iv for s in sealed}) == 20
    assert len({s.ciphertext for s in sealed}) == 20


async def test_tampering_is_an_integrity_error(crypto_core: CryptoCore, aes_key: str) -> None:
    iv, ciphertext = await crypto_core.seal(aes_key, b"attack at dawn", b"aad")
    flipped = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    bad_tag = ciphertext[:-1] + bytes([ciphertext[-1] ^ 0x80])
    other_iv = bytes([iv[0] ^ 1]) + iv[1:]
    cases = [
        (iv, flipped, b"aad"),
        (iv, bad_tag, b"aad"),
        (other_iv, ciphertext, b"aad"),
        (iv, ciphertext, b"AAD"),
        (iv, ciphertext, b""),
        (iv, ciphertext[:10], b"aad"),
    ]
    for case_iv, case_ct, case_aad in cases:
        with pytest.raises(IntegrityCheckFailed) as info:
            await crypto_core.open(aes_key, case_iv, case_ct, case_aad)
        assert isinstance(info.value, SecurityError)
        assert info.value.code == "integrity_check_failed"
        assert info.value.retryable is False
    # The failures left the sessions usable.
    assert await crypto_core.open(aes_key, iv, ciphertext, b"aad") == b"attack at dawn"


async def test_another_key_cannot_open(
    crypto_core: CryptoCore, aes_key: str, key_label: Callable[[str], str]
) -> None:
    other = key_label("aes")
    await crypto_core.generate_key(KeySpec.AES_256, other, b"other")
    sealed = await crypto_core.seal(aes_key, b"secret", b"a")
    with pytest.raises(IntegrityCheckFailed):
        await crypto_core.open(other, *sealed, b"a")
    await crypto_core.destroy_key(other)


async def test_bad_arguments(crypto_core: CryptoCore, aes_key: str) -> None:
    with pytest.raises(InvalidInput):
        await crypto_core.seal(aes_key, "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await crypto_core.open(aes_key, b"short-iv", b"x" * 32)
    with pytest.raises(InvalidInput):
        await crypto_core.seal(aes_key, b"x" * ((1 << 20) + 1))


@pytest.mark.parametrize("length", [16, 32, 64])
async def test_data_key_round_trip(crypto_core: CryptoCore, aes_key: str, length: int) -> None:
    dek = await crypto_core.generate_data_key(aes_key, length, b"tenant=7")
    assert len(dek.plaintext) == length
    assert len(dek.wrapped) == 1 + 12 + length + 16
    assert Sealed.from_blob(dek.wrapped).iv == dek.wrapped[1:13]
    assert await crypto_core.unwrap_data_key(aes_key, dek.wrapped, b"tenant=7") == dek.plaintext
    with pytest.raises(IntegrityCheckFailed):
        await crypto_core.unwrap_data_key(aes_key, dek.wrapped, b"tenant=8")
    rewrapped = await crypto_core.wrap_data_key(aes_key, dek.plaintext, b"tenant=7")
    assert rewrapped != dek.wrapped
    assert await crypto_core.unwrap_data_key(aes_key, rewrapped, b"tenant=7") == dek.plaintext


async def test_data_key_bounds(crypto_core: CryptoCore, aes_key: str) -> None:
    for length in (0, 15, 65, 1024):
        with pytest.raises(InvalidInput):
            await crypto_core.generate_data_key(aes_key, length)
    with pytest.raises(InvalidInput):
        await crypto_core.wrap_data_key(aes_key, b"k" * 8)
    with pytest.raises(InvalidInput):
        await crypto_core.unwrap_data_key(aes_key, b"\x07" + b"x" * 40)
    with pytest.raises(IntegrityCheckFailed):
        await crypto_core.unwrap_data_key(aes_key, b"\x01" + b"x" * 20)


async def test_dek_encrypts_a_file_with_cryptography(
    crypto_core: CryptoCore, aes_key: str, tmp_path: Path
) -> None:
    # Envelope encryption as a caller does it: DEK from the core, data in-process.
    dek = await crypto_core.generate_data_key(aes_key, 32, b"file:report.csv")
    nonce = await crypto_core.random_bytes(12)
    document = b"id,amount\n1,100\n2,250\n" * 500
    encrypted = tmp_path / "report.csv.enc"
    encrypted.write_bytes(nonce + AESGCM(dek.plaintext).encrypt(nonce, document, None))
    wrapped_path = tmp_path / "report.csv.key"
    wrapped_path.write_bytes(dek.wrapped)
    del dek  # the caller forgets the plaintext DEK

    key = await crypto_core.unwrap_data_key(aes_key, wrapped_path.read_bytes(), b"file:report.csv")
    blob = encrypted.read_bytes()
    assert AESGCM(key).decrypt(blob[:12], blob[12:], None) == document


async def test_random_bytes_lengths_and_bounds(crypto_core: CryptoCore) -> None:
    for n in (1, 12, 32, 1024):
        assert len(await crypto_core.random_bytes(n)) == n
    assert len({await crypto_core.random_bytes(16) for _ in range(10)}) == 10
    for bad in (0, -1, 1025, 10**6, True, 2.5):
        with pytest.raises(InvalidInput):
            await crypto_core.random_bytes(bad)  # type: ignore[arg-type]
