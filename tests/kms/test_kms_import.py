"""Bring your own key: import parameters, wrapped material (OAEP and RSA-AES key wrap),
the keyed fingerprint, deletion, expiry. One RSA-4096 wrapping key for the whole test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from datetime import timedelta
from typing import Any, cast

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.crypto import CryptoCore, HsmConfig
from engine.crypto.errors import DecryptionFailed
from engine.errors import Conflict, InvalidInput
from engine.settings import Settings
from handlers.kms.byok import ec_raw_to_pkcs8, wrap_key_material
from handlers.kms.core import token_label
from handlers.kms.errors import KeyStateError, RotationUnsupported
from handlers.kms.service import KmsService
from tests.helpers import run_dew
from tests.kms.conftest import FakeClock


def _token_object(config: HsmConfig, label: str) -> dict[str, bool]:
    lib = pkcs11.lib(config.module_path)
    with lib.get_token(token_label=config.token_label).open() as session:
        objs = list(session.get_objects({pkcs11.Attribute.LABEL: label}))
        secret = [o for o in objs if o.object_class in (pkcs11.ObjectClass.SECRET_KEY,
                                                        pkcs11.ObjectClass.PRIVATE_KEY)]
        if not secret:
            return {}
        return {"sensitive": bool(secret[0][pkcs11.Attribute.SENSITIVE]),
                "extractable": bool(secret[0][pkcs11.Attribute.EXTRACTABLE])}


async def test_import_flows(shared_kms: KmsService, core: CryptoCore, clock: FakeClock,
                            hsm_config: HsmConfig, kms_settings: Settings) -> None:
    kms = shared_kms  # on the CLI's database: the CLI part reuses the wrapping key
    aes = await kms.create_key("byok/aes", origin="external")
    assert aes.key_state == "pending_import" and aes.origin == "external"
    with pytest.raises(KeyStateError, match="pending import"):
        await kms.encrypt_data(aes.key_id, b"x")
    params = await kms.get_parameters_for_import(aes.key_id)
    public = serialization.load_pem_public_key(params.public_key_pem.encode())
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 4096
    assert params.expiration_time == clock.now + timedelta(hours=24)
    wrapping = await kms.store.get_import_token(params.import_token)
    assert wrapping is not None

    # AES_256 with RSAES_OAEP_SHA_256 (decoded in our code: SoftHSM's OAEP is SHA-1 only).
    material = os.urandom(32)
    wrapped = wrap_key_material(params.public_key_pem.encode(), material, "RSAES_OAEP_SHA_256")
    done = await kms.import_key_material(aes.key_id, params.import_token, wrapped)
    assert done.key_state == "enabled"
    assert _token_object(hsm_config, token_label(aes.key_id, 1)) == {
        "sensitive": True, "extractable": False}
    blob = (await kms.encrypt_data(aes.key_id, b"imported!")).cipher_text
    # The ciphertext opens with the material we imported: it really is that key.
    assert AESGCM(material).decrypt(blob[64:76], blob[108:], blob[:64])[:9] == b"imported!"
    with pytest.raises(RotationUnsupported, match="imported"):
        await kms.rotate_key(aes.key_id)

    # Delete the material; only the identical material comes back.
    deleted = await kms.delete_imported_key_material(aes.key_id)
    assert deleted.changed and deleted.key.key_state == "pending_import"
    assert _token_object(hsm_config, token_label(aes.key_id, 1)) == {}
    other = wrap_key_material(params.public_key_pem.encode(), os.urandom(32),
                              "RSAES_OAEP_SHA_256")
    with pytest.raises(Conflict, match="identical material") as caught:
        await kms.import_key_material(aes.key_id, params.import_token, other)
    assert caught.value.code == "import_material_mismatch"
    await kms.import_key_material(aes.key_id, params.import_token, wrapped)
    assert (await kms.decrypt_data(blob)).plain_text == b"imported!"

    # The same through the CLI (HMAC_256): the commands a user runs.
    def cli(*args: str) -> dict[str, Any]:
        done = run_dew(kms_settings, "kms", *args, "--json")
        assert done.returncode == 0, done.stderr
        return cast(dict[str, Any], json.loads(done.stdout))

    assert cli("create-key", "--alias", "byok/cli", "--spec", "HMAC_256", "--origin",
               "external")["key_state"] == "pending_import"
    got = cli("get-parameters-for-import", "byok/cli")
    assert got["public_key"] == params.public_key_pem  # reused: no second RSA-4096
    cli_secret = os.urandom(32)
    wrapped_b64 = base64.b64encode(wrap_key_material(
        str(got["public_key"]).encode(), cli_secret, "RSAES_OAEP_SHA_256")).decode()
    assert cli("import-key-material", "byok/cli", "--import-token", str(got["import_token"]),
               "--encrypted-key-material-base64", wrapped_b64)["key_state"] == "enabled"
    cli_mac = await kms.generate_mac("byok/cli", b"cli")
    assert cli_mac.mac == hmac.new(cli_secret, b"cli", hashlib.sha256).digest()

    # HMAC_384 with RSAES_OAEP_SHA_1 (the token's own OAEP): equal to Python's hmac.
    mac_key = await kms.create_key("byok/mac", "HMAC_384", origin="external")
    p1 = await kms.get_parameters_for_import(mac_key.key_id, "RSAES_OAEP_SHA_1")
    secret = os.urandom(48)
    await kms.import_key_material(mac_key.key_id, p1.import_token, wrap_key_material(
        p1.public_key_pem.encode(), secret, "RSAES_OAEP_SHA_1"))
    for message in (b"", b"message"):
        mac = await kms.generate_mac(mac_key.key_id, message)
        assert mac.mac == hmac.new(secret, message, hashlib.sha384).digest()
    assert p1.public_key_pem == params.public_key_pem  # the account's wrapping key, reused

    # EC_P256 from a bare scalar, wrapped with RSA_AES_KEY_WRAP_SHA_256.
    ec_key = await kms.create_key("byok/ec", "EC_P256", origin="external")
    p2 = await kms.get_parameters_for_import(ec_key.key_id, "RSA_AES_KEY_WRAP_SHA_256")
    pkcs8 = ec_raw_to_pkcs8("secp256r1", "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a"
                            "622b120f6721")
    mine = serialization.load_der_private_key(pkcs8, None)
    assert isinstance(mine, ec.EllipticCurvePrivateKey)
    await kms.import_key_material(ec_key.key_id, p2.import_token, wrap_key_material(
        p2.public_key_pem.encode(), pkcs8, "RSA_AES_KEY_WRAP_SHA_256"))
    shown = serialization.load_pem_public_key(
        (await kms.get_public_key(ec_key.key_id)).public_key_pem.encode())
    assert shown == mine.public_key()
    sig = (await kms.sign(ec_key.key_id, b"m", "ECDSA_SHA_256")).signature
    mine.public_key().verify(sig, b"m", ec.ECDSA(hashes.SHA256()))
    assert _token_object(hsm_config, token_label(ec_key.key_id, 1)) == {
        "sensitive": True, "extractable": False}

    # RSA_2048 (PEM in, PKCS#8 on the wire) with RSA_AES_KEY_WRAP_SHA_1.
    rsa_key = await kms.create_key("byok/rsa", "RSA_2048", origin="external")
    p3 = await kms.get_parameters_for_import(rsa_key.key_id, "RSA_AES_KEY_WRAP_SHA_1")
    software = rsa.generate_private_key(65537, 2048)
    pem = software.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
    await kms.import_key_material(rsa_key.key_id, p3.import_token, wrap_key_material(
        p3.public_key_pem.encode(), pem, "RSA_AES_KEY_WRAP_SHA_1"))
    sig = (await kms.sign(rsa_key.key_id, b"m", "RSASSA_PSS_SHA_256")).signature
    software.public_key().verify(sig, b"m", padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                                 hashes.SHA256())

    # Refusals: foreign token, wrong algorithm for the spec, a KMS key, an expired token.
    spare = await kms.create_key("byok/spare", origin="external")
    with pytest.raises(InvalidInput, match="not one issued for") as bad:
        await kms.import_key_material(spare.key_id, params.import_token, wrapped)
    assert bad.value.code == "invalid_import_token"
    with pytest.raises(InvalidInput, match="RSAES_OAEP_SHA_256"):
        await kms.get_parameters_for_import(spare.key_id, "RSA_AES_KEY_WRAP_SHA_256")
    with pytest.raises(KeyStateError, match="not pending import"):
        await kms.get_parameters_for_import(ec_key.key_id, "RSA_AES_KEY_WRAP_SHA_256")
    generated = await kms.create_key("byok/generated")
    with pytest.raises(KeyStateError, match="generated by KMS"):
        await kms.get_parameters_for_import(generated.key_id)
    p4 = await kms.get_parameters_for_import(spare.key_id)
    garbage = bytes(512)
    with pytest.raises(DecryptionFailed, match="decryption failed"):
        await kms.import_key_material(spare.key_id, p4.import_token, garbage)

    # Expiry: the material goes when its time comes (the cron's run), the key waits again.
    exp = await kms.create_key("byok/expiring", origin="external")
    p5 = await kms.get_parameters_for_import(exp.key_id)
    await kms.import_key_material(exp.key_id, p5.import_token, wrap_key_material(
        p5.public_key_pem.encode(), os.urandom(32), "RSAES_OAEP_SHA_256"),
        expiration_time=clock.now + timedelta(hours=1))
    clock.advance(hours=2)
    report = await kms.delete_due_keys()
    assert report.expired_material == [exp.key_id]
    assert (await kms.describe_key(exp.key_id)).key_state == "pending_import"
    clock.advance(hours=23)
    with pytest.raises(InvalidInput, match="expired") as late:
        await kms.import_key_material(exp.key_id, p5.import_token, wrapped)
    assert late.value.code == "import_token_expired"
    # Every token of the wrapping key expired: the next run destroys the wrapping key.
    assert await core.key_exists(wrapping.wrapping_label)
    await kms.delete_due_keys()
    assert not await core.key_exists(wrapping.wrapping_label)
