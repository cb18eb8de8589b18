"""The client-side BYOK helpers (no HSM): wrap-key-material and ec-raw-to-pkcs8, checked
against `cryptography` and OpenSSL's own RFC 5649 wrap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from engine.crypto import KeySpec
from engine.errors import InvalidInput
from engine.settings import Settings
from handlers.kms.byok import ec_raw_to_pkcs8, unwrap_private_key, wrap_key_material
from tests.helpers import ROOT, dew_env, run_dew

WRAPPER = rsa.generate_private_key(65537, 2048)  # stands in for the token's RSA-4096 pair
PUBLIC_PEM = WRAPPER.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
SECP256K1_D = "e8f32e723decf4051aefac8e2c93c9c5b214313817cdb01a1494b917c8436b35"


def test_ec_raw_to_pkcs8_includes_the_public_point() -> None:
    der = ec_raw_to_pkcs8("secp256k1", SECP256K1_D)
    key = serialization.load_der_private_key(der, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256k1"
    assert key.private_numbers().private_value == int(SECP256K1_D, 16)
    # The ECPrivateKey inside carries the public key ([1] BIT STRING with 04 || X || Y).
    point = key.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)
    assert point in der
    assert ec_raw_to_pkcs8("P-256", "0x01", pem=True).startswith(b"-----BEGIN PRIVATE KEY-----")
    for curve, scalar, text in (("secp999", "01", "unknown curve"), ("secp256k1", "zz", "hex"),
                                ("secp256k1", "00", "not a valid")):
        with pytest.raises(InvalidInput, match=text):
            ec_raw_to_pkcs8(curve, scalar)


def test_wrap_key_material_layouts() -> None:
    sha256 = hashes.SHA256()
    wrapped = wrap_key_material(PUBLIC_PEM, b"k" * 32, "RSAES_OAEP_SHA_256")
    assert WRAPPER.decrypt(wrapped, padding.OAEP(padding.MGF1(sha256), sha256, None)) == b"k" * 32
    pkcs8 = ec_raw_to_pkcs8("secp384r1", "2a" * 48)
    both = wrap_key_material(PUBLIC_PEM, pkcs8, "RSA_AES_KEY_WRAP_SHA_1")
    sha1 = hashes.SHA1()
    aes = WRAPPER.decrypt(both[:256], padding.OAEP(padding.MGF1(sha1), sha1, None))
    assert len(aes) == 32 and aes_key_unwrap_with_padding(aes, both[256:]) == pkcs8
    key = unwrap_private_key(aes, both[256:], KeySpec.EC_P384)
    with pytest.raises(InvalidInput, match="not an EC_P256"):
        unwrap_private_key(aes, both[256:], KeySpec.EC_P256)
    assert key.private_numbers().private_value == int("2a" * 48, 16)  # type: ignore[union-attr]
    with pytest.raises(InvalidInput, match="32, 48 or 64"):
        wrap_key_material(PUBLIC_PEM, b"short", "RSAES_OAEP_SHA_256")
    with pytest.raises(InvalidInput, match="not an unencrypted private key"):
        wrap_key_material(PUBLIC_PEM, b"k" * 32, "RSA_AES_KEY_WRAP_SHA_256")
    with pytest.raises(InvalidInput, match="wrapping algorithm"):
        wrap_key_material(PUBLIC_PEM, b"k" * 32, "AES_WRAP")


def test_openssl_wrap_pad_unwraps_here(tmp_path: Path) -> None:
    """What users without our helper run (OpenSSL's id-aes256-wrap-pad) fits our unwrap."""
    der, wrapped = tmp_path / "k.der", tmp_path / "k.wrapped"
    der.write_bytes(ec_raw_to_pkcs8("secp256r1", "11" * 32))
    aes = bytes(range(32))
    done = subprocess.run(["openssl", "enc", "-id-aes256-wrap-pad", "-K", aes.hex(), "-iv",
                           "A65959A6", "-in", str(der), "-out", str(wrapped)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    key = unwrap_private_key(aes, wrapped.read_bytes(), KeySpec.EC_P256)
    assert key.private_numbers().private_value == int("11" * 32, 16)  # type: ignore[union-attr]


def test_cli_helpers_need_no_store(kms_settings: Settings, tmp_path: Path) -> None:
    pem, out = tmp_path / "wrapping.pem", tmp_path / "wrapped.bin"
    pem.write_bytes(PUBLIC_PEM)
    raw = subprocess.run(
        [sys.executable, "-m", "engine.cli", "kms", "ec-raw-to-pkcs8", "--curve",
         "secp256k1", "--private-hex", SECP256K1_D, "--format", "der"],
        capture_output=True, env=dew_env(kms_settings), cwd=ROOT, timeout=60)
    assert raw.returncode == 0 and raw.stdout == ec_raw_to_pkcs8("secp256k1", SECP256K1_D)
    material = tmp_path / "k.der"
    material.write_bytes(raw.stdout)
    done = run_dew(kms_settings, "kms", "wrap-key-material", "--public-key-file", str(pem),
                   "--material-file", str(material), "--algorithm", "RSA_AES_KEY_WRAP_SHA_256",
                   "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bytes"] == out.stat().st_size > 256
    assert not kms_settings.db_path.exists()  # client side: nothing opened


def test_import_tokens_never_start_with_a_dash() -> None:
    """One token in 64 would, and `--import-token -X...` reads as an option."""
    from handlers.kms.byok_ops import _import_token

    tokens = [_import_token() for _ in range(2000)]
    assert not any(t.startswith("-") for t in tokens)
    assert len(set(tokens)) == len(tokens) and all(len(t) == 43 for t in tokens)
