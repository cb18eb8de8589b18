"""The pure parts of KMS: input checks and the self-describing ciphertext (no token)."""

from __future__ import annotations

import base64
import os

import pytest

from engine.crypto import IntegrityCheckFailed
from engine.errors import InvalidInput
from handlers.kms import format as f

KEY_ID = "c758ea89-6219-46b9-948f-96405f407118"  # fixed: it is in parametrized test ids


def _blob(n: int, purpose: f.Purpose = f.Purpose.DATA) -> bytes:
    header = f.CipherHeader(KEY_ID, 3, n, purpose, f.context_digest({}))
    return f.pack_ciphertext(header, os.urandom(12), os.urandom(f.padded_length(n) + 16))


@pytest.mark.parametrize("n", [0, 1, 4, 15, 16, 17, 4096])
def test_documented_size(n: int) -> None:
    blob = _blob(n)
    assert len(blob) == 124 + -(-n // 16) * 16 == f.ciphertext_size(n)
    header, iv, body = f.unpack_ciphertext(blob, f.Purpose.DATA)
    assert (header.key_id, header.key_version, header.length) == (KEY_ID, 3, n)
    assert len(iv) == 12 and len(body) == f.padded_length(n) + 16


def test_four_bytes_give_188_base64_characters() -> None:
    assert len(_blob(4)) == 140
    assert len(base64.b64encode(_blob(4))) == 188


def test_damage_is_refused_before_any_key_lookup() -> None:
    blob = _blob(20)
    for broken in (blob[:-1], blob[:100], blob + b"\x00"):
        with pytest.raises(IntegrityCheckFailed, match="damaged or truncated"):
            f.unpack_ciphertext(broken, f.Purpose.DATA)
    for offset in (5, 9, 20, 60, 70, 90):  # algorithm, version, key id, context, IV, digest
        tampered = bytearray(blob)
        tampered[offset] ^= 0x01
        with pytest.raises((IntegrityCheckFailed, InvalidInput)):
            f.unpack_ciphertext(bytes(tampered), f.Purpose.DATA)
    with pytest.raises(InvalidInput, match="not a KMS ciphertext"):
        f.unpack_ciphertext(b"hello world" * 20, f.Purpose.DATA)
    with pytest.raises(InvalidInput, match="data key, not a ciphertext"):
        f.unpack_ciphertext(_blob(32, f.Purpose.DATA_KEY), f.Purpose.DATA)


def test_padding_must_be_zero() -> None:
    header = f.CipherHeader(KEY_ID, 1, 3, f.Purpose.DATA, f.context_digest({}))
    assert f.unpad(header, b"abc" + bytes(13)) == b"abc"
    with pytest.raises(IntegrityCheckFailed):
        f.unpad(header, b"abc" + b"\x01" + bytes(12))


def test_context_is_canonical() -> None:
    assert f.canonical_context({"b": "2", "a": "1"}) == f.canonical_context({"a": "1", "b": "2"})
    assert f.context_digest({}) != f.context_digest({"a": "1"})
    with pytest.raises(InvalidInput):
        f.check_context({"a": 1})


@pytest.mark.parametrize("alias", ["app/key-1", "a", "x" * 255, "team:prod/db_key"])
def test_good_aliases(alias: str) -> None:
    assert f.check_custom_alias(alias) == alias


@pytest.mark.parametrize("alias", ["", "x" * 256, "has space", "é", "a;b", "obs/default",
                                   "mine/default", KEY_ID, "abc\n", None])
def test_bad_aliases(alias: object) -> None:
    with pytest.raises(InvalidInput):
        f.check_custom_alias(alias)


def test_default_services() -> None:
    assert f.default_service("kps/default") == "kps"
    assert f.default_service("csms/default") == "csms"
    assert f.default_service("kpss/default") is None
    assert f.default_service("kps/other") is None


@pytest.mark.parametrize("days", [7, 30, 1096])
def test_pending_days_in_range(days: int) -> None:
    assert f.check_pending_days(days) == days


@pytest.mark.parametrize("days", [6, 1097, 0, -7, "7", 7.0, True, None])
def test_pending_days_out_of_range(days: object) -> None:
    with pytest.raises(InvalidInput):
        f.check_pending_days(days)


def test_spec_usage_and_lengths() -> None:
    assert f.check_usage(f.check_spec("AES_256"), None) is f.KeyUsage.ENCRYPT_DECRYPT
    assert f.check_usage(f.check_spec("RSA_2048"), "ENCRYPT_DECRYPT") is \
        f.KeyUsage.ENCRYPT_DECRYPT
    assert f.check_usage(f.check_spec("HMAC_256"), None) is f.KeyUsage.GENERATE_VERIFY_MAC
    for spec, usage in (("EC_P256", "ENCRYPT_DECRYPT"), ("AES_256", "SIGN_VERIFY")):
        with pytest.raises(InvalidInput, match="does not fit"):
            f.check_usage(f.check_spec(spec), usage)
    with pytest.raises(InvalidInput, match="invalid key spec"):
        f.check_spec("AES_128")
    for bits in (128, 256, 512):
        assert f.check_length_bits(bits) == bits
    for bad in (0, 64, 192, 1024, True, "256"):
        with pytest.raises(InvalidInput):
            f.check_length_bits(bad)
    with pytest.raises(InvalidInput, match="at most 4096"):
        f.check_plaintext(bytes(4097))
    assert f.check_plaintext(bytes(4096)) == bytes(4096)


def test_accounts_and_key_refs() -> None:
    assert f.check_account("team-a.prod@x") == "team-a.prod@x"
    for bad in ("", "a b", "x" * 65, "-lead", None):
        with pytest.raises(InvalidInput):
            f.check_account(bad)
    assert f.is_key_id(KEY_ID) and not f.is_key_id(KEY_ID.upper())
    assert f.check_key_ref("kps/default") == "kps/default"
    with pytest.raises(InvalidInput):
        f.check_key_ref("bad key")
