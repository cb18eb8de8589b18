"""ML-DSA keys: SoftHSM has none, so the KMS keeps the private key wrapped under a token
AES key (``protection: hsm-wrapped``) and never stores it in clear."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from engine.crypto import CryptoCore, KeyUsageError
from engine.errors import InvalidInput
from handlers.kms.core import token_label
from handlers.kms.errors import KeyDeleted, RotationUnsupported
from handlers.kms.service import KmsService
from handlers.kms.store import SqliteKmsStore
from tests.kms.conftest import FakeClock


@pytest.mark.parametrize("level", ["44", "65", "87"])
async def test_ml_dsa_sign_verify_and_public_key(kms: KmsService, level: str) -> None:
    spec = f"ML_DSA_{level}"
    key = await kms.create_key(f"pq/{level}", spec)
    shown = key.to_json()
    assert shown["protection"] == "hsm-wrapped" and shown["key_usage"] == "SIGN_VERIFY"
    signed = await kms.sign(key.key_id, b"post-quantum", spec)
    public = serialization.load_pem_public_key(
        (await kms.get_public_key(key.key_id)).public_key_pem.encode())
    assert type(public).__name__ == f"MLDSA{level}PublicKey"
    public.verify(signed.signature, b"post-quantum")  # type: ignore[call-arg]
    assert (await kms.verify(key.key_id, b"post-quantum", signed.signature, spec)).valid
    assert not (await kms.verify(key.key_id, b"post-quantun", signed.signature, spec)).valid
    assert not (await kms.verify(key.key_id, b"post-quantum", signed.signature[:-1],
                                 spec)).valid


async def test_ml_dsa_key_is_stored_only_wrapped(
    kms: KmsService, kms_store: SqliteKmsStore, core: CryptoCore, clock: FakeClock
) -> None:
    key = await kms.create_key("pq/wrapped", "ML_DSA_65")
    assert (await kms.describe_key("pq/wrapped")).to_json()["protection"] == "hsm-wrapped"
    assert (await kms.create_key("pq/aes")).to_json()["protection"] == "hsm"
    wrapped = await kms_store.get_wrapped(key.key_id, 1)
    assert wrapped is not None
    # The wrapped blob unwraps (in the token) to the seed of the published public key...
    seed = await core.unwrap_secret(token_label(key.key_id, 1), wrapped.wrapped)
    private = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)
    assert private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == wrapped.public_key
    # ...and the seed is nowhere in the database file in clear.
    await kms.flush_audit()
    db = kms_store._path.read_bytes()  # the test reads the file the store writes
    assert seed not in db and seed.hex().encode() not in db

    with pytest.raises(InvalidInput, match="RAW"):
        await kms.sign(key.key_id, bytes(32), "ML_DSA_65", "DIGEST")
    with pytest.raises(KeyUsageError, match="ML_DSA_44"):
        await kms.sign(key.key_id, b"m", "ML_DSA_44")
    with pytest.raises(RotationUnsupported):
        await kms.rotate_key(key.key_id)
    with pytest.raises(InvalidInput, match="cannot be imported"):
        await kms.create_key("pq/ext", "ML_DSA_44", origin="external")

    # Destroying the token's AES key (scheduled deletion) makes the wrapped key useless.
    await kms.schedule_key_deletion(key.key_id, 7)
    clock.advance(days=8)
    await kms.delete_due_keys()
    assert not await core.key_exists(token_label(key.key_id, 1))
    with pytest.raises(KeyDeleted):
        await kms.sign(key.key_id, b"m", "ML_DSA_65")
