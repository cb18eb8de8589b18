"""The secrets service in this process: versions, stages, deletion, accounts,
envelope encryption (nothing in clear in the database), COMMON rotation and
the scheduler's enqueue-once."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any

import pytest

from engine.client import Client
from engine.errors import InvalidInput, NotFound, SecurityError
from engine.settings import Settings
from handlers.csms import model as m
from handlers.csms.service import (
    PAUSE_AFTER_SET_ENV,
    ROTATE_JOB,
    SecretExists,
    SecretNotFound,
    SecretsService,
    SecretStateError,
    enqueue_due_rotations,
)
from handlers.csms.store import SecretRecord, SqliteCsmsStore, VersionRecord
from tests.csms.store_helpers import stored_bytes
from tests.helpers import FakeClock
from tests.pg_store import admin_sql, sqlite_only, store_rows

VALUE = b"correct horse battery staple 7f3a"


async def test_versions_and_stages(csms: SecretsService) -> None:
    info = await csms.create("app.key", VALUE, description="d")
    assert info.stages == {m.CURRENT: "v1"}
    assert (await csms.get_value("app.key")).value == VALUE
    v2 = await csms.put_version("app.key", b"second")
    assert (v2.version_id, v2.stages) == ("v2", [m.CURRENT])
    versions = {v.version_id: v.stages for v in await csms.list_versions("app.key")}
    assert versions == {"v1": [m.PREVIOUS], "v2": [m.CURRENT]}
    assert (await csms.get_value("app.key", stage=m.PREVIOUS)).value == VALUE
    assert (await csms.get_value("app.key", version_id="v2")).value == b"second"

    # A stage names one version at a time: moving it takes it off the other.
    await csms.set_stage("app.key", "BLUE", "v1")
    stages = await csms.set_stage("app.key", "BLUE", "v2")
    assert stages["BLUE"] == "v2" and list(stages.values()).count("v2") == 2
    # Moving SYSCURRENT back hands SYSPREVIOUS to the version that had it.
    stages = await csms.set_stage("app.key", m.CURRENT, "v1")
    assert (stages[m.CURRENT], stages[m.PREVIOUS]) == ("v1", "v2")
    for stage in (m.CURRENT, m.PREVIOUS):
        with pytest.raises(InvalidInput, match="cannot be removed"):
            await csms.remove_stage("app.key", stage)
    assert "BLUE" not in await csms.remove_stage("app.key", "BLUE")
    with pytest.raises(SecretExists):
        await csms.create("app.key", b"again")
    with pytest.raises(InvalidInput):
        await csms.get_value("app.key", version_id="v9x")


async def test_bad_input_changes_nothing(csms: SecretsService) -> None:
    await csms.create("s1", VALUE)
    before = await csms.describe("s1")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: csms.put_version("s1", b"x" * (m.MAX_VALUE_BYTES + 1)),
        lambda: csms.set_stage("s1", "bad stage", "v1"),
        lambda: csms.set_stage("s1", "OK", "v7"),
        lambda: csms.create("s2", b"{}", secret_type="RDS_POSTGRESQL"),
        lambda: csms.schedule_deletion("s1", 31),
    ]
    for call in calls:
        with pytest.raises((InvalidInput, NotFound)):
            await call()
    after = await csms.describe("s1")
    assert after.to_json() == before.to_json()
    assert [s.record.name for s in await csms.list_secrets()] == ["s1"]


async def test_accounts_isolate_secrets(csms: SecretsService) -> None:
    await csms.create("shared-name", b"alpha", account="a")
    await csms.create("shared-name", b"beta", account="b")
    assert (await csms.get_value("shared-name", account="a")).value == b"alpha"
    assert (await csms.get_value("shared-name", account="b")).value == b"beta"
    with pytest.raises(SecretNotFound, match="no secret 'shared-name' in account 'c'"):
        await csms.get_value("shared-name", account="c")
    assert [s.record.account for s in await csms.list_secrets(account="a")] == ["a"]


async def test_deletion_window_restore_and_due_deletion(csms: SecretsService,
                                                        clock: FakeClock) -> None:
    csms.clock = clock
    await csms.create("old", VALUE)
    info = await csms.schedule_deletion("old", 7)
    assert info.record.state == "pending_deletion"
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: csms.get_value("old"), lambda: csms.put_version("old", b"x"),
        lambda: csms.rotate("old")]
    for call in calls:
        with pytest.raises(SecretStateError, match="pending deletion"):
            await call()
    with pytest.raises(SecretStateError, match="already scheduled"):
        await csms.schedule_deletion("old", 7)
    await csms.restore("old")
    assert (await csms.get_value("old")).value == VALUE
    await csms.schedule_deletion("old", 7)
    assert await csms.delete_due(clock.now + timedelta(days=6)) == []
    assert await csms.delete_due(clock.now + timedelta(days=7, seconds=1)) == ["default/old"]
    with pytest.raises(SecretNotFound):
        await csms.describe("old")
    await csms.create("old", b"reborn")  # the name is free again


async def test_values_are_enveloped_under_the_chosen_cmk(
    csms: SecretsService, settings: Settings
) -> None:
    await csms.kms.create_key("team-key", account="default")  # type: ignore[attr-defined]
    await csms.create("k1", VALUE, kms_key="team-key")
    await csms.create("k2", VALUE)  # csms/default, created on first use
    keys = {k.key_alias for k in await csms.kms.list_keys()}  # type: ignore[attr-defined]
    assert {"team-key", "csms/default"} <= keys
    target = settings.store_target
    rows = store_rows(target, "SELECT secret_id, wrapped_dek, ciphertext FROM csms_versions")
    assert len(rows) == 2 and rows[0][1] != rows[1][1]  # a fresh data key per version
    assert VALUE not in stored_bytes(target)
    # A ciphertext moved onto another secret does not open there.
    await admin_sql(target, "UPDATE csms_versions SET ciphertext = (SELECT ciphertext FROM "
                    f"csms_versions WHERE secret_id = '{rows[0][0]}') "
                    f"WHERE secret_id = '{rows[1][0]}'")
    other = "k1" if rows[1][0] == (await csms.store.get_secret("default", "k1")
                                   or pytest.fail()).secret_id else "k2"
    with pytest.raises(SecurityError, match="integrity check failed"):
        await csms.get_value(other)


async def test_common_rotation_and_resume_reuses_pending(csms: SecretsService) -> None:
    await csms.create("c1", VALUE)
    result = await csms.rotate("c1")
    assert result["steps"] == ["create", "set", "test", "finish"]
    stages = await csms.store.stages((await csms.store.get_secret("default", "c1")
                                      or pytest.fail()).secret_id)
    assert stages == {m.CURRENT: "v2", m.PREVIOUS: "v1"}
    assert (await csms.get_value("c1", stage=m.PREVIOUS)).value == VALUE
    # A SYSPENDING version left by an interrupted run is reused, not duplicated.
    secret = await csms.store.get_secret("default", "c1")
    assert secret is not None
    await csms.set_stage("c1", m.PENDING, "v1")
    result = await csms.rotate("c1")
    assert result["steps"] == ["create", "set", "test", "finish"]
    assert (await csms.get_value("c1")).version_id == "v1"
    assert len(await csms.list_versions("c1")) == 2
    info = (await csms.describe("c1")).to_json()
    assert info["rotation"]["in_progress"] is None and info["failed_rotations"] == 0


async def test_due_rotation_is_enqueued_once(
    csms: SecretsService, client: Client, clock: FakeClock
) -> None:
    csms.clock = clock
    await csms.create("sched", VALUE)
    await csms.set_rotation("sched", 6 * 3600)
    assert (await enqueue_due_rotations(csms.store, client, clock.now, 20))["queued"] == 0
    clock.advance(hours=6)
    for _ in range(3):  # three scheduler looks at the same due rotation
        await enqueue_due_rotations(csms.store, client, clock.now, 20)
    tasks = await client.list_tasks(name=ROTATE_JOB)
    assert len(tasks) == 1 and tasks[0].task_id.startswith("csms.rotate:default:sched:")
    # A rotation due within the look-ahead is queued early, deferred to its due time.
    await csms.create("soon", VALUE)
    await csms.set_rotation("soon", 6 * 3600)
    clock.advance(hours=6, seconds=-15)
    await enqueue_due_rotations(csms.store, client, clock.now, 20)
    soon = [t for t in await client.list_tasks(name=ROTATE_JOB) if ":soon:" in t.task_id]
    assert len(soon) == 1 and soon[0].due_at > soon[0].enqueued_at + timedelta(seconds=10)
    # A stale scheduled run (the schedule moved) does nothing.
    result = await csms.rotate("sched", due=123)
    assert result["skipped"] is True


class _LookingStore(SqliteCsmsStore):
    """The store, telling when a secret was looked up (a run has checked it is due)."""

    looked: asyncio.Event

    async def get_secret(self, account: str, name: str) -> SecretRecord | None:
        found = await super().get_secret(account, name)
        self.looked.set()
        return found


async def test_a_scheduled_run_that_waited_for_a_slot_does_not_rotate_again(
    csms: SecretsService, settings: Settings, clock: FakeClock
) -> None:
    csms.clock = clock
    await csms.create("once", VALUE)
    await csms.set_rotation("once", 6 * 3600)
    clock.advance(hours=6)
    secret = await csms.store.get_secret("default", "once")
    assert secret is not None and secret.next_rotation_at is not None
    due = int(secret.next_rotation_at.timestamp())
    store = await _LookingStore.open(settings.store_target)
    store.looked = asyncio.Event()
    service = SecretsService(store, csms.kms, clock=clock, max_rotations=1)
    try:
        async with service.limiter.slot():  # another rotation holds the only slot
            run = asyncio.create_task(service.rotate("once", due=due, task_id="scheduled"))
            await store.looked.wait()  # it found the secret due, and waits for the slot
            await csms.rotate("once")  # meanwhile another run (or process) rotates it
        result = await run
        assert result.get("skipped") is True, result  # not a second rotation
    finally:
        await store.close()
    assert [v.version_id for v in await csms.list_versions("once")] == ["v1", "v2"]
    assert await csms.store.stages(secret.secret_id) == {m.CURRENT: "v2", m.PREVIOUS: "v1"}


async def test_a_scheduled_rotation_starts_only_if_still_due(csms: SecretsService) -> None:
    """The last word is the store's, in the transaction that adds the pending version:
    another process may have rotated the secret after this one looked."""
    await csms.create("guard", VALUE)
    info = await csms.set_rotation("guard", 6 * 3600)
    due_at = info.record.next_rotation_at
    assert due_at is not None
    secret_id = info.record.secret_id
    now = csms.clock()

    def version(seq: int) -> VersionRecord:
        return VersionRecord(secret_id, m.version_id(seq), seq, now, "k", b"d", b"n", b"c")

    stale = due_at - timedelta(hours=6)
    assert await csms.store.start_pending(version(7), "t1", now, due_at=stale) is None
    assert await csms.store.stages(secret_id) == {m.CURRENT: "v1"}
    assert [v.version_id for v in await csms.store.versions(secret_id)] == ["v1"]
    assert await csms.store.start_pending(version(8), "t2", now, due_at=due_at) == "v8"
    assert (await csms.store.stages(secret_id))[m.PENDING] == "v8"


@sqlite_only
async def test_a_read_in_flight_does_not_fail_another_coroutines_transaction(
    csms: SecretsService, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rotations of a worker share one connection. A read whose statement is open
    holds a read snapshot; a transaction begun on the connection meanwhile fails at
    once with "database is locked" if another connection wrote since (SQLite does not
    wait on the busy timeout there): a retry, and a rotation run twice."""
    await csms.create("busy", VALUE)
    store = csms.store
    secret = await store.get_secret("default", "busy")
    assert secret is not None
    opened, release = asyncio.Event(), asyncio.Event()
    real_fetchall = store._fetchall

    async def paused_fetchall(sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with store._conn.execute(sql, tuple(params)) as cursor:
            opened.set()
            await release.wait()  # the statement is stepped and still open
            return list(await cursor.fetchall())

    monkeypatch.setattr(store, "_fetchall", paused_fetchall)
    reader = asyncio.create_task(store.stages(secret.secret_id))
    await opened.wait()
    monkeypatch.setattr(store, "_fetchall", real_fetchall)
    other = sqlite3.connect(settings.db_path)  # another process writes meanwhile
    other.execute("UPDATE csms_secrets SET description = 'other' WHERE secret_id = ?",
                  (secret.secret_id,))
    other.commit()
    other.close()
    writer = asyncio.create_task(
        store.record_step(secret.secret_id, "create", "v1", "t", csms.clock()))
    # Without the fix the writer fails at once; with it, it waits for the read to end.
    await asyncio.wait({writer}, timeout=0.3)
    release.set()
    assert await reader == {m.CURRENT: "v1"}
    await writer
    updated = await store.get_secret("default", "busy")
    assert updated is not None and updated.rotation_step == "create"


async def test_one_rotation_of_a_secret_at_a_time_across_processes(
    csms: SecretsService, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two services on stores of their own (as in two worker processes, or on two
    nodes: no lock in common but the store's rotation lease) rotate one secret at
    once: the second run starts after the first has finished, and rotates again."""
    monkeypatch.setenv(PAUSE_AFTER_SET_ENV, "0.3")  # each run holds the secret a while
    await csms.create("one", VALUE)
    store = await SqliteCsmsStore.open(settings.store_target)
    other = SecretsService(store, csms.kms, actor="test", db_timeout=2.0)
    try:
        first, second = await asyncio.gather(csms.rotate("one", task_id="run-a"),
                                             other.rotate("one", task_id="run-b"))
    finally:
        await store.close()
    for result in (first, second):
        assert result["steps"] == ["create", "set", "test", "finish"], result
    runs = sorted((first, second), key=lambda r: str(r["started_at"]))
    assert runs[0]["finished_at"] <= runs[1]["started_at"]  # one after the other
    assert [v.version_id for v in await csms.list_versions("one")] == ["v1", "v2", "v3"]
    assert (await csms.describe("one")).stages == {m.CURRENT: "v3", m.PREVIOUS: "v2"}
    secret = await csms.store.get_secret("default", "one")
    assert secret is not None
    # Both runs let go of the lease: a third run (any task) takes it at once.
    assert await csms.store.claim_rotation(secret.secret_id, "run-c", 60)
