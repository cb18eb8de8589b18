"""The KMS's parts work alone on one shared core: no KmsService needed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from engine.crypto import CryptoCore
from handlers.kms.byok_ops import KeyImport
from handlers.kms.core import KmsCore
from handlers.kms.data import DataPlane
from handlers.kms.errors import KeyStateError
from handlers.kms.keys import KeyManagement
from handlers.kms.rotation import Rotation
from handlers.kms.signing import Signing
from handlers.kms.store import SqliteKmsStore
from tests.kms.conftest import _destroy_leftovers


@pytest.fixture
async def kms_core(kms_store: SqliteKmsStore, core: CryptoCore) -> AsyncIterator[KmsCore]:
    shared = KmsCore(kms_store, core, actor="parts", audit_flush_interval=0)
    yield shared
    await shared.close()
    await _destroy_leftovers(kms_store, core)


async def test_the_data_plane_alone_makes_its_default_key(kms_core: KmsCore) -> None:
    data = DataPlane(kms_core, Signing(kms_core))
    sealed = await data.encrypt_data("csms/default", b"hello")
    assert (await data.decrypt_data(sealed.cipher_text)).plain_text == b"hello"
    dek = await data.create_datakey("csms/default")
    assert dek.plain_text is not None
    assert (await data.decrypt_datakey("csms/default", dek.cipher_text)).plain_text == \
        dek.plain_text
    entries = await kms_core.store.list_audit(limit=10)
    assert [e.operation for e in entries] == [
        "create_default_key", "encrypt_data", "decrypt_data", "create_datakey",
        "decrypt_datakey"]


async def test_parts_share_one_registry_and_cache(kms_core: KmsCore) -> None:
    keys = KeyManagement(kms_core, KeyImport(kms_core))
    signing, rotation = Signing(kms_core), Rotation(kms_core)
    made = await keys.create_key("parts/sign", "EC_P256")
    signed = await signing.sign("parts/sign", b"m", "ECDSA_SHA_256")
    assert (await signing.verify("parts/sign", b"m", signed.signature, "ECDSA_SHA_256")).valid
    aes = await keys.create_key("parts/aes")
    assert (await rotation.rotate_key("parts/aes")).changed
    assert (await keys.describe_key(aes.key_id)).key_id == aes.key_id
    # A state change by one part is seen at once by another (one cache, cleared).
    await keys.disable_key("parts/sign")
    with pytest.raises(KeyStateError, match="is disabled"):
        await signing.sign("parts/sign", b"m", "ECDSA_SHA_256")
    assert made.key_spec == "EC_P256"
