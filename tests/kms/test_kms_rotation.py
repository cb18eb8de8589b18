"""Rotation of KMS-generated AES_256 keys: schedule, on-demand and due rotations, and
every ciphertext made before a rotation still decrypting."""

from __future__ import annotations

import json

import pytest

from engine.client import Client
from engine.cron import cron_table
from engine.crypto import CryptoCore
from engine.errors import InvalidInput
from engine.settings import Settings
from handlers.kms.core import token_label
from handlers.kms.errors import KeyStateError, RotationInProgress, RotationUnsupported
from handlers.kms.format import Purpose, unpack_ciphertext
from handlers.kms.service import KmsService
from tests.helpers import WorkerProcess, run_dew
from tests.kms.conftest import FakeClock


async def test_old_ciphertexts_decrypt_after_rotations(kms: KmsService, core: CryptoCore) -> None:
    key = await kms.create_key("rot/one")
    ctx = {"file": "a"}
    data_v1 = (await kms.encrypt_data(key.key_id, b"v1 data", encryption_context=ctx)).cipher_text
    dek_v1 = await kms.create_datakey(key.key_id)
    first = await kms.rotate_key(key.key_id)
    assert first.changed and first.status.key_version == 2
    assert first.status.rotations == 1 and first.status.last_rotation is not None
    data_v2 = (await kms.encrypt_data(key.key_id, b"v2 data")).cipher_text
    dek_v2 = await kms.create_datakey_without_plaintext(key.key_id)
    await kms.rotate_key(key.key_id)
    # Encryption uses the newest version; the version travels in the ciphertext.
    newest = (await kms.encrypt_data(key.key_id, b"v3")).cipher_text
    assert unpack_ciphertext(newest, Purpose.DATA)[0].key_version == 3
    assert unpack_ciphertext(data_v2, Purpose.DATA)[0].key_version == 2
    assert (await kms.decrypt_data(data_v1, encryption_context=ctx)).plain_text == b"v1 data"
    assert (await kms.decrypt_data(data_v2)).plain_text == b"v2 data"
    assert (await kms.decrypt_datakey(key.key_id, dek_v1.cipher_text)).plain_text == \
        dek_v1.plain_text
    assert len((await kms.decrypt_datakey(key.key_id, dek_v2.cipher_text)).plain_text or b"") \
        == 32
    for version in (1, 2, 3):
        assert await core.key_exists(token_label(key.key_id, version))
    assert (await kms.describe_key(key.key_id)).key_version == 3
    ops = [e.operation for e in await kms.audit_list(key.key_id)]
    assert ops.count("rotate_key") == 2


async def test_rotation_schedule_and_due_rotations(kms: KmsService, clock: FakeClock) -> None:
    key = await kms.create_key("rot/sched")
    status = await kms.get_key_rotation_status(key.key_id)
    assert status.to_json() == {"key_id": key.key_id, "rotation_enabled": False,
                                "rotation_interval_days": None, "last_rotation": None,
                                "next_rotation": None, "number_of_rotations": 0,
                                "key_version": 1}
    enabled = await kms.enable_key_rotation(key.key_id, 30)
    assert enabled.changed and enabled.status.interval_days == 30
    assert (await kms.enable_key_rotation(key.key_id, 30)).changed is False
    for bad in (29, 366, True):
        with pytest.raises(InvalidInput, match=r"30\.\.365"):
            await kms.enable_key_rotation(key.key_id, bad)  # type: ignore[arg-type]
    assert await kms.rotate_due_keys() == {"rotated": [], "failed": {}}
    clock.advance(days=30, seconds=1)
    assert await kms.rotate_due_keys() == {"rotated": [key.key_id], "failed": {}}
    # Due again only one interval after that rotation.
    assert await kms.rotate_due_keys() == {"rotated": [], "failed": {}}
    status = await kms.get_key_rotation_status(key.key_id)
    assert status.rotations == 1 and status.key_version == 2
    assert status.next_rotation is not None and (status.next_rotation - clock.now).days == 30
    assert (await kms.disable_key_rotation(key.key_id)).changed
    clock.advance(days=400)
    assert await kms.rotate_due_keys() == {"rotated": [], "failed": {}}
    assert (await kms.get_key_rotation_status(key.key_id)).to_json()["rotation_enabled"] is False


async def test_what_cannot_rotate(kms: KmsService) -> None:
    hmac_key = await kms.create_key("rot/hmac", "HMAC_256")
    with pytest.raises(RotationUnsupported, match="only AES_256"):
        await kms.enable_key_rotation(hmac_key.key_id)
    with pytest.raises(RotationUnsupported):
        await kms.rotate_key(hmac_key.key_id)
    aes = await kms.create_key("rot/off")
    await kms.disable_key(aes.key_id)
    with pytest.raises(KeyStateError, match="disabled"):
        await kms.rotate_key(aes.key_id)
    await kms.enable_key(aes.key_id)
    # A request already done (a job re-run) changes nothing.
    done = await kms.rotate_key(aes.key_id, request="task-1")
    again = await kms.rotate_key(aes.key_id, request="task-1")
    assert done.changed and not again.changed and again.status.key_version == 2
    # One rotation at a time per key.
    assert await kms.store.claim_rotation(aes.key_id, kms.clock(), kms.clock().replace(
        year=kms.clock().year + 1))
    with pytest.raises(RotationInProgress):
        await kms.rotate_key(aes.key_id)


async def test_an_orphan_of_a_crashed_rotation_is_replaced(
    kms: KmsService, core: CryptoCore
) -> None:
    key = await kms.create_key("rot/orphan")
    blob = (await kms.encrypt_data(key.key_id, b"x")).cipher_text
    # A rotation that generated v2 and died before registering it.
    await core.generate_key("AES_256", token_label(key.key_id, 2), b"orphan")
    assert (await kms.rotate_key(key.key_id)).status.key_version == 2
    assert (await kms.decrypt_data(blob)).plain_text == b"x"
    info = await core.key_info(token_label(key.key_id, 2))
    assert info.key_id == f"{key.key_id}:v2".encode()


async def test_rotate_key_job_and_cli(
    shared_kms: KmsService, kms_settings: Settings, worker: WorkerProcess, client: Client
) -> None:
    key = await shared_kms.create_key("rot/job")
    old = (await shared_kms.encrypt_data(key.key_id, b"before")).cipher_text
    done = run_dew(kms_settings, "kms", "rotate-key", "rot/job", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["key_version"] == 2 and result["changed"] is True
    assert (await shared_kms.decrypt_data(old)).plain_text == b"before"
    shown = run_dew(kms_settings, "kms", "enable-key-rotation", "rot/job", "--interval-days",
                    "90", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["rotation_interval_days"] == 90
    status = json.loads(run_dew(kms_settings, "kms", "get-key-rotation-status", "rot/job",
                                "--json").stdout)
    assert status["number_of_rotations"] == 1 and status["rotation_enabled"] is True
    bad = run_dew(kms_settings, "kms", "enable-key-rotation", "rot/job", "--interval-days", "7")
    assert bad.returncode == 2 and "30..365" in bad.stderr
    with pytest.raises(InvalidInput):
        await client.enqueue("kms.rotate_key", {"key": key.key_id, "extra": 1})


def test_cron_rotates_due_keys_every_minute(kms_settings: Settings) -> None:
    entry = next(e for e in cron_table(kms_settings) if e.name == "kms.rotate_due_keys")
    assert entry.second is not None and len(entry.second) == 1 and entry.minute is None
