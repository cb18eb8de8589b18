"""KMS jobs through a real ``dew worker`` subprocess, the CLI's wait, and the cron entry."""

from __future__ import annotations

import json

import pytest

from engine.client import Client
from engine.cron import cron_table
from engine.errors import DewError
from engine.settings import Settings
from handlers.kms.errors import KeyDeleted
from handlers.kms.service import KmsService
from tests.helpers import WorkerProcess, run_dew
from tests.kms.conftest import FakeClock


def _kms_json(settings: Settings, *args: str) -> dict[str, object]:
    done = run_dew(settings, "kms", *args, "--json")
    assert done.returncode == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    return data


async def test_schedule_and_cancel_through_the_worker(
    shared_kms: KmsService, kms_settings: Settings, worker: WorkerProcess, client: Client
) -> None:
    key = await shared_kms.create_key("jobs/key")
    scheduled = _kms_json(kms_settings, "schedule-key-deletion", "jobs/key",
                          "--pending-days", "7")
    assert scheduled["key_state"] == "pending_deletion" and scheduled["changed"] is True
    assert (await shared_kms.describe_key(key.key_id)).key_state == "pending_deletion"

    # A re-run (arq may deliver a job twice) finds the work done and changes nothing.
    again = await client.enqueue("kms.schedule_key_deletion",
                                 {"key": key.key_id, "pending_days": 30})
    done = await client.wait(again.task_id, timeout=30)
    assert done.status == "succeeded" and done.result["changed"] is False
    assert done.result["scheduled_deletion_date"] == scheduled["scheduled_deletion_date"]

    cancelled = _kms_json(kms_settings, "cancel-key-deletion", "jobs/key")
    assert cancelled["key_state"] == "disabled" and cancelled["scheduled_deletion_date"] is None
    actors = {e.actor.split(":")[0] for e in await shared_kms.audit_list(key=key.key_id)}
    assert "job" in actors


async def test_bad_job_arguments_are_refused_at_enqueue(
    shared_kms: KmsService, client: Client
) -> None:
    key = await shared_kms.create_key("jobs/safe")
    for args in ({"key": key.key_id, "pending_days": 6},
                 {"key": key.key_id, "pending_days": 1097},
                 {"key": key.key_id},
                 {"key": "kps/default", "pending_days": 7},
                 {"key": key.key_id, "pending_days": 7, "surprise": 1}):
        with pytest.raises(DewError) as info:  # InvalidInput, or Conflict for a default key
            await client.enqueue("kms.schedule_key_deletion", args)
        assert not info.value.retryable and info.value.code in (
            "invalid_parameter", "invalid_pending_days", "default_key_protected")
    assert await client.list_tasks() == []  # nothing was written
    assert (await shared_kms.describe_key(key.key_id)).key_state == "enabled"


async def test_due_keys_are_deleted_by_the_worker(
    kms_settings: Settings, worker: WorkerProcess, client: Client, shared_kms: KmsService,
    clock: FakeClock,
) -> None:
    key = await shared_kms.create_key("jobs/due")
    blob = (await shared_kms.encrypt_data("jobs/due", b"gone soon")).cipher_text
    clock.advance(days=-8)  # scheduled 8 days ago: due now by the worker's real clock
    await shared_kms.schedule_key_deletion("jobs/due", 7)
    clock.advance(days=8)
    task = await client.enqueue("kms.delete_due_keys", {})
    done = await client.wait(task.task_id, timeout=30)
    assert done.status == "succeeded", done.error
    # The cron entry (second 30 of each minute) may win the race; either way it is gone.
    assert done.result in (
        {"deleted": [key.key_id], "versions_destroyed": 1, "expired_material": []},
        {"deleted": [], "versions_destroyed": 0, "expired_material": []})
    with pytest.raises(KeyDeleted, match="key deleted"):
        await shared_kms.decrypt_data(blob)


def test_without_a_worker_the_cli_gives_up_after_timeout(kms_settings: Settings) -> None:
    _kms_json(kms_settings, "create-key", "--alias", "jobs/idle")
    done = run_dew(kms_settings, "kms", "schedule-key-deletion", "jobs/idle",
                   "--pending-days", "7", "--timeout", "0.5")
    assert done.returncode == 1 and "still queued" in done.stderr
    assert "Traceback" not in done.stderr


def test_cron_runs_delete_due_keys_every_minute(kms_settings: Settings) -> None:
    entry = next(e for e in cron_table(kms_settings) if e.name == "kms.delete_due_keys")
    # One second value and every minute.
    assert entry.second is not None and len(entry.second) == 1 and entry.minute is None
