"""Scheduled deletion with an injectable clock, and the audit chain against edits."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from engine.crypto import CryptoCore
from engine.errors import InvalidInput
from engine.sql_db import StoreTarget
from handlers.kms.core import token_label
from handlers.kms.errors import KeyDeleted, KeyStateError
from handlers.kms.service import KmsService
from handlers.kms.store import AuditEvent, AuditFilter, SqliteKmsStore
from tests.helpers import FakeClock
from tests.pg_store import admin_sql


async def _audit_ops(kms: KmsService, key: str) -> list[tuple[str, str]]:
    return [(e.operation, e.outcome) for e in await kms.audit_list(key=key)]


@pytest.mark.parametrize("days", [6, 1097, 0, "7"])
async def test_out_of_range_pending_days_change_nothing(kms: KmsService, days: object) -> None:
    key = await kms.create_key("keep")
    before = (await kms.describe_key("keep")).to_json()
    with pytest.raises(InvalidInput, match="pending_days"):
        await kms.schedule_key_deletion("keep", days)  # type: ignore[arg-type]
    assert (await kms.describe_key("keep")).to_json() == before
    assert ("schedule_key_deletion", "success") not in await _audit_ops(kms, key.key_id)
    # The refusal is audited too, under the reference given (it was never resolved).
    refused = [(e.outcome, e.key_id) for e in await kms.audit_list()
               if e.operation == "schedule_key_deletion"]
    assert refused == [("failure", "keep")]


async def test_schedule_and_cancel_are_idempotent(kms: KmsService, clock: FakeClock) -> None:
    await kms.create_key("victim")
    first = await kms.schedule_key_deletion("victim", 7)
    assert first.changed and first.key.key_state == "pending_deletion"
    assert first.key.scheduled_deletion_date == clock.now + timedelta(days=7)
    clock.advance(hours=1)
    again = await kms.schedule_key_deletion("victim", 30)  # a re-run changes nothing
    assert not again.changed
    assert again.key.scheduled_deletion_date == first.key.scheduled_deletion_date
    cancelled = await kms.cancel_key_deletion("victim")
    # Back to disabled, as the hosted service does: enabling is a separate decision.
    assert cancelled.changed and cancelled.key.key_state == "disabled"
    assert cancelled.key.scheduled_deletion_date is None
    assert not (await kms.cancel_key_deletion("victim")).changed
    assert (await kms.schedule_key_deletion("victim", 1096)).key.scheduled_deletion_date == \
        clock.now + timedelta(days=1096)


async def test_deletion_lifecycle(kms: KmsService, core: CryptoCore, clock: FakeClock) -> None:
    key = await kms.create_key("doomed")
    data = await kms.encrypt_data("doomed", b"last words")
    dek = await kms.create_datakey("doomed")
    await kms.schedule_key_deletion("doomed", 7)

    clock.advance(days=6, hours=23)
    assert (await kms.delete_due_keys()).deleted == []  # not yet
    assert (await kms.describe_key("doomed")).key_state == "pending_deletion"

    clock.advance(hours=1, seconds=1)
    report = await kms.delete_due_keys()
    assert report.deleted == [key.key_id] and report.versions_destroyed == 1
    assert not await core.key_exists(token_label(key.key_id, 1))
    assert await kms.delete_due_keys() == type(report)([], 0)  # idempotent

    for call in (kms.decrypt_data(data.cipher_text),
                 kms.decrypt_datakey(key.key_id, dek.cipher_text),
                 kms.describe_key("doomed"), kms.describe_key(key.key_id),
                 kms.cancel_key_deletion("doomed")):
        with pytest.raises(KeyDeleted, match="key deleted"):
            await call
    assert await kms.list_keys() == []
    assert (await kms.create_key("doomed")).key_id != key.key_id  # the alias is free again
    ops = await _audit_ops(kms, key.key_id)
    assert ("delete_key", "success") in ops and ("destroy_key_material", "success") in ops
    assert ("decrypt_data", "failure") in ops and ("decrypt_datakey", "failure") in ops
    assert (await kms.audit_verify()).intact


async def test_cancelled_key_survives_the_due_date(kms: KmsService, clock: FakeClock) -> None:
    await kms.create_key("spared")
    await kms.schedule_key_deletion("spared", 7)
    await kms.cancel_key_deletion("spared")
    clock.advance(days=30)
    assert (await kms.delete_due_keys()).deleted == []
    await kms.enable_key("spared")
    assert (await kms.encrypt_data("spared", b"ok")).key_id


async def test_a_run_stopped_between_mark_and_destroy_is_finished_by_the_next(
    kms: KmsService, kms_store: SqliteKmsStore, core: CryptoCore, clock: FakeClock
) -> None:
    key = await kms.create_key("half")
    await kms.schedule_key_deletion("half", 7)
    clock.advance(days=8)
    # What a crash after the guarded update (and before the token call) leaves behind.
    event = AuditEvent(clock.now, "default", "test", "delete_key", key.key_id, "success")
    await kms_store.change_state(key.key_id, ["pending_deletion"], "deleted", clock.now, event,
                                 deleted_at=clock.now)
    assert await core.key_exists(token_label(key.key_id, 1))
    report = await kms.delete_due_keys()
    assert report.deleted == [] and report.versions_destroyed == 1
    assert not await core.key_exists(token_label(key.key_id, 1))


async def test_pending_key_cannot_be_used_but_its_metadata_can(kms: KmsService) -> None:
    await kms.create_key("pending")
    await kms.schedule_key_deletion("pending", 7)
    with pytest.raises(KeyStateError, match="pending deletion"):
        await kms.encrypt_data("pending", b"x")
    assert (await kms.describe_key("pending")).key_state == "pending_deletion"


# --------------------------------------------------------------------------- audit chain


async def _some_entries(kms: KmsService) -> None:
    await kms.create_key("chain")
    for _ in range(3):
        await kms.encrypt_data("chain", b"x")
    await kms.disable_key("chain")
    assert (await kms.audit_verify()).to_json() == {
        "intact": True, "entries": 5, "first_broken_seq": None, "reason": "",
        "sealed_through": 5, "anchored_at": 5, "unsealed": 0}


async def test_audit_verify_finds_an_edited_row(
    kms: KmsService, kms_target: StoreTarget
) -> None:
    await _some_entries(kms)
    await admin_sql(kms_target, "UPDATE audit SET outcome = 'failure' WHERE seq = 3")
    verdict = await kms.audit_verify()
    assert not verdict.intact and verdict.first_broken_seq == 3
    assert "changed" in verdict.reason


async def test_audit_verify_finds_a_deleted_row(
    kms: KmsService, kms_target: StoreTarget
) -> None:
    await _some_entries(kms)
    await admin_sql(kms_target, "DELETE FROM audit WHERE seq = 2")
    verdict = await kms.audit_verify()
    assert not verdict.intact and verdict.first_broken_seq == 2
    assert "missing" in verdict.reason


async def test_audit_verify_finds_a_deleted_newest_row(
    kms: KmsService, kms_target: StoreTarget
) -> None:
    await _some_entries(kms)
    await admin_sql(kms_target, "DELETE FROM audit WHERE seq = 5")
    verdict = await kms.audit_verify()
    assert not verdict.intact and verdict.first_broken_seq == 5


async def test_audit_verify_finds_a_rehashed_edit(
    kms: KmsService, kms_target: StoreTarget
) -> None:
    # An edit that also fixes its own hash still breaks the next entry's link.
    await _some_entries(kms)
    # Change the first hex digit to another one (never to the digit it already is).
    await admin_sql(kms_target, "UPDATE audit SET hash = (CASE WHEN substr(hash, 1, 1) = 'f' "
                    "THEN '0' ELSE 'f' END) || substr(hash, 2) WHERE seq = 2")
    verdict = await kms.audit_verify()
    assert not verdict.intact and verdict.first_broken_seq == 2


async def test_audit_list_filters(kms_store: SqliteKmsStore, clock: FakeClock) -> None:
    t0, second = clock.now, timedelta(seconds=1)
    await kms_store.append_audit([
        AuditEvent(t0, "default", "api:alice ak=1", "csms.get_value", None, "success",
                   {"secret": "db.app", "version": "v1"}),
        # A NUL in the detail (JSON's escape of it in the stored text) breaks no filter.
        AuditEvent(t0 + second, "default", "cli:bob", "csms.get_value", None, "failure",
                   {"secret": "db.app", "error": "bad\x00input"}),
        AuditEvent(t0 + 2 * second, "default", "api:alice", "csms.get_value", None, "success",
                   {"secret": "db.other"}),
        AuditEvent(t0 + 3 * second, "default", "api:Alice", "encrypt_data", "k1", "success",
                   {"bytes": 3, "note": "\\u0000 as text"}),
    ])

    async def seqs(**where: Any) -> list[int]:
        return [e.seq for e in await kms_store.list_audit(where=AuditFilter(**where))]

    assert await seqs(secret="db.app") == [1, 2]
    assert await seqs(secret="db.app", outcome="failure") == [2]
    assert await seqs(actor="alice") == [1, 3]  # a substring, case and all
    assert await seqs(operation="encrypt_data") == [4]
    assert await seqs(since=t0 + second, until=t0 + 2 * second) == [2, 3]
    assert [e.seq for e in await kms_store.list_audit(limit=2)] == [3, 4]  # the newest
    assert [e.detail for e in await kms_store.list_audit(key_id="k1")] == [
        '{"bytes":3,"note":"\\\\u0000 as text"}']
