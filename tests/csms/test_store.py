"""The CSMS store's contract, on either backend (``store_target``: SQLite, or
PostgreSQL with ``DEW_TEST_STORE=postgresql``): secrets, versions and stages
(compare-and-swap), deletion, tags, rotation state and the rotation lease; and its
check-then-writes raced by several processes (as on several nodes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from engine.errors import Conflict
from engine.models import utcnow
from engine.sql_db import StoreTarget
from engine.sqlite_db import statements
from handlers.csms import store as csms_store
from handlers.csms.store import (
    CURRENT,
    MIGRATIONS,
    PENDING,
    PREVIOUS,
    SecretRecord,
    SqliteCsmsStore,
    VersionRecord,
)
from tests.csms.store_helpers import race
from tests.pg_store import admin_sql

T0 = datetime(2026, 1, 1, tzinfo=utcnow().tzinfo)


@pytest.fixture
async def store(store_target: StoreTarget) -> AsyncIterator[SqliteCsmsStore]:
    s = await SqliteCsmsStore.open(store_target)
    yield s
    await s.close()


def secret(name: str, account: str = "default", **fields: Any) -> SecretRecord:
    record = SecretRecord(
        secret_id=f"id-{account}-{name}", account=account, name=name, secret_type="COMMON",
        kms_key="csms/default", description="", state="enabled", created_at=T0,
        updated_at=T0, deletion_date=None, next_version=2, rotation_period=None,
        next_rotation_at=None, last_rotated_at=None, failed_rotations=0, last_failure=None,
        rotation_step=None, rotation_version=None, rotation_task=None, rotation_started=None)
    return replace(record, **fields)


def version(secret_id: str, seq: int) -> VersionRecord:
    return VersionRecord(secret_id, f"v{seq}", seq, T0 + timedelta(seconds=seq), "key-1",
                         b"dek\x00" + bytes([seq]), b"nonce", b"ct\xff" + bytes([seq]))


async def make(store: SqliteCsmsStore, name: str, **fields: Any) -> SecretRecord:
    record = secret(name, **fields)
    assert await store.create_secret(record, version(record.secret_id, 1), {CURRENT: "v1"})
    return record


async def test_secrets_names_accounts_and_values_round_trip(store: SqliteCsmsStore) -> None:
    a = await make(store, "app", rotation_config='{"InstanceId": "i"}', description="d")
    assert not await store.create_secret(secret("app"), version(a.secret_id, 1), {})
    b = secret("app", account="other")
    assert await store.create_secret(b, version(b.secret_id, 1), {CURRENT: "v1"})
    assert await store.get_secret("default", "app") == a
    assert await store.get_secret_by_id("default", b.secret_id) is None  # other account
    assert [s.account for s in await store.list_secrets("other")] == ["other"]
    await make(store, "B-upper")
    await make(store, "a-lower")
    # Byte order on both backends (PostgreSQL's TEXT is COLLATE "C").
    assert [s.name for s in await store.list_secrets("default")] == ["B-upper", "a-lower",
                                                                     "app"]
    [v1] = await store.versions(a.secret_id)
    assert (v1.wrapped_dek, v1.ciphertext, v1.expire_time) == (b"dek\x00\x01", b"ct\xff\x01",
                                                                None)
    assert await store.allocate_version(a.secret_id) == 2
    assert await store.allocate_version(a.secret_id) == 3
    changed = await store.update_secret(a.secret_id, T0, description=None, kms_key="k2")
    assert changed is not None and (changed.description, changed.kms_key) == ("d", "k2")
    expiring = await store.set_version_expiry(a.secret_id, "v1", 1_900_000_000, T0)
    assert expiring is not None and expiring.expire_time == 1_900_000_000
    assert await store.set_version_expiry(a.secret_id, "v9", 1, T0) is None


async def test_stages_are_compare_and_swap_and_old_versions_are_pruned(
    store: SqliteCsmsStore,
) -> None:
    s = await make(store, "s")
    sid = s.secret_id
    assert await store.add_version(version(sid, 2), {CURRENT: "v1"},
                                   {CURRENT: "v2", PREVIOUS: "v1"}, T0, keep=3)
    # Decided from a stale map: nothing written.
    assert not await store.add_version(version(sid, 3), {CURRENT: "v1"}, {CURRENT: "v3"}, T0,
                                       keep=3)
    assert [v.version_id for v in await store.versions(sid)] == ["v1", "v2"]
    assert not await store.replace_stages(sid, {CURRENT: "v1"}, {CURRENT: "v1"}, T0)
    assert await store.replace_stages(sid, {CURRENT: "v2", PREVIOUS: "v1"},
                                      {CURRENT: "v2", PREVIOUS: "v1", "BLUE": "v1"}, T0)
    for seq in (3, 4, 5):
        old = await store.stages(sid)
        new = {**old, CURRENT: f"v{seq}", PREVIOUS: old[CURRENT]}
        assert await store.add_version(version(sid, seq), old, new, T0, keep=3)
    # Past keep=3, versions without a stage go, oldest first (v2); v1 keeps BLUE.
    assert [v.version_id for v in await store.versions(sid)] == ["v1", "v4", "v5"]
    assert await store.stages(sid) == {CURRENT: "v5", PREVIOUS: "v4", "BLUE": "v1"}
    assert set(await store.stage_times(sid)) == {CURRENT, PREVIOUS, "BLUE"}
    assert (await store.get_version(sid, "v4")) is not None
    assert await store.get_version(sid, "v2") is None


async def test_state_deletion_and_tags(store: SqliteCsmsStore) -> None:
    s = await make(store, "gone")
    sid = s.secret_id
    assert await store.change_tags(sid, {"env": "prod", "team": "x"}, [], T0) == \
        {"env": "prod", "team": "x"}
    assert await store.change_tags(sid, {"k": "v"}, ["team"], T0, max_tags=2) == \
        {"env": "prod", "k": "v"}
    assert await store.change_tags(sid, {"z": "1"}, [], T0, max_tags=2) is None
    assert await store.account_tags("default") == {sid: {"env": "prod", "k": "v"}}
    assert await store.set_state(sid, "pending_deletion", "enabled", T0, None) is None
    due = T0 + timedelta(days=7)
    pending = await store.set_state(sid, "enabled", "pending_deletion", T0, due)
    assert pending is not None and pending.deletion_date == due
    assert [r.name for r in await store.due_deletions(due)] == ["gone"]
    assert await store.due_deletions(due - timedelta(seconds=1)) == []
    assert not await store.delete_secret(sid, due - timedelta(seconds=1))
    assert await store.delete_secret(sid, due)
    assert await store.get_secret("default", "gone") is None
    assert await store.tags(sid) == {} and await store.versions(sid) == []
    assert not await store.delete_secret_now(sid)
    # Nothing is written for a secret deleted meanwhile, on either backend.
    for late in (store.allocate_version(sid), store.change_tags(sid, {"a": "b"}, [], T0),
                 store.start_pending(version(sid, 2), "t", T0)):
        with pytest.raises(Conflict) as info:
            await late
        assert info.value.code == "secret_gone"
    assert await store.stages(sid) == {} and await store.versions(sid) == []
    again = await make(store, "gone")  # the name is free
    assert await store.delete_secret_now(again.secret_id)


async def test_rotation_state(store: SqliteCsmsStore) -> None:
    s = await make(store, "rot")
    sid = s.secret_id
    due_at = T0 + timedelta(hours=6)
    changed = await store.set_rotation(sid, 6 * 3600, due_at, T0)
    assert changed is not None and changed.rotation_period == 6 * 3600
    await make(store, "early", rotation_period=3600, next_rotation_at=T0 + timedelta(hours=1))
    assert [r.name for r in await store.due_rotations(due_at)] == ["early", "rot"]
    assert [r.name for r in await store.due_rotations(due_at, limit=1)] == ["early"]
    # A scheduled run starts only while the secret is still due at that time.
    assert await store.start_pending(version(sid, 2), "t1", T0, due_at=T0) is None
    assert await store.start_pending(version(sid, 2), "t1", T0, due_at=due_at) == "v2"
    # A second start reuses the pending version: one rotation at a time.
    assert await store.start_pending(version(sid, 3), "t2", T0) == "v2"
    assert [v.version_id for v in await store.versions(sid)] == ["v1", "v2"]
    await store.record_step(sid, "set", "v2", "t2", T0 + timedelta(seconds=5))
    mid = await store.get_secret("default", "rot")
    assert mid is not None
    assert (mid.rotation_step, mid.rotation_version, mid.rotation_task, mid.rotation_started) \
        == ("set", "v2", "t2", T0)
    failure = {"code": "db_unreachable", "step": "test"}
    await store.record_failure(sid, failure, "set", "v2", T0, due_at + timedelta(hours=1))
    failed = await store.get_secret("default", "rot")
    assert failed is not None and failed.failed_rotations == 1
    assert failed.last_failure == failure and failed.next_rotation_at == due_at + \
        timedelta(hours=1)
    later = T0 + timedelta(minutes=1)
    assert await store.finish_rotation(sid, "v2", later, later + timedelta(hours=6))
    assert not await store.finish_rotation(sid, "v2", later, None)  # finished once
    assert await store.stages(sid) == {CURRENT: "v2", PREVIOUS: "v1"}
    done = await store.get_secret("default", "rot")
    assert done is not None and done.rotation_step is None and done.last_rotated_at == later
    # Without a period, a failure leaves no next rotation.
    await store.set_rotation(sid, None, None, T0)
    await store.record_failure(sid, failure, None, None, T0, T0)
    assert (await store.get_secret("default", "rot") or pytest.fail()).next_rotation_at is None


async def test_the_rotation_lease_is_one_holder_at_a_time(
    store: SqliteCsmsStore, store_target: StoreTarget, monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = await make(store, "lease")
    sid = s.secret_id
    other = await SqliteCsmsStore.open(store_target)  # another process's store
    try:
        assert await store.claim_rotation(sid, "task-a", 60)
        assert not await other.claim_rotation(sid, "task-b", 60)
        assert await other.claim_rotation(sid, "task-a", 60)  # task-a's re-run takes over
        await other.release_rotation(sid, "task-b")  # not the holder: nothing changes
        assert not await other.claim_rotation(sid, "task-b", 60)
        # A lease that lapsed (its run's process is gone) is taken.
        await store.claim_rotation(sid, "task-a", -1)
        assert await other.claim_rotation(sid, "task-b", 60)
        await other.release_rotation(sid, "task-b")

        monkeypatch.setattr(csms_store, "LEASE_POLL_SECONDS", 0.02)
        order: list[str] = []

        async def run(on: SqliteCsmsStore, owner: str) -> None:
            async with on.rotation_lease(sid, owner):
                order.append(f"{owner} in")
                await asyncio.sleep(0.3)
                order.append(f"{owner} out")

        await asyncio.gather(run(store, "a"), run(other, "b"))
        assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
        await admin_sql(store_target, f"DELETE FROM csms_stages WHERE secret_id = '{sid}'",
                        f"DELETE FROM csms_versions WHERE secret_id = '{sid}'",
                        f"DELETE FROM csms_secrets WHERE secret_id = '{sid}'")
        with pytest.raises(Conflict) as info:
            await store.claim_rotation(sid, "a", 60)
        assert info.value.code == "secret_gone"
    finally:
        await other.close()


async def test_migrations_2_and_3_on_a_database_of_migration_1(
    store_target: StoreTarget,
) -> None:
    from engine.sql_db import pg_ddl

    first = pg_ddl(str(MIGRATIONS[0])) if store_target.url else str(MIGRATIONS[0])
    store_target.path.parent.mkdir(parents=True, exist_ok=True)
    await admin_sql(
        store_target, *statements(first),
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " component TEXT PRIMARY KEY, version INTEGER NOT NULL)",
        "INSERT INTO schema_migrations VALUES ('csms', 1)",
        "INSERT INTO csms_secrets (secret_id, account, name, secret_type, kms_key, state, "
        "created_at, updated_at, next_version) VALUES ('id1', 'default', 'old', 'COMMON', "
        "'csms/default', 'enabled', '2026-01-01T00:00:00+00:00', "
        "'2026-01-01T00:00:00+00:00', 2)")
    store = await SqliteCsmsStore.open(store_target)
    try:
        old = await store.get_secret("default", "old")
        assert old is not None and old.rotation_config == ""
        assert await store.tags("id1") == {}
        assert await store.claim_rotation("id1", "t", 60)
    finally:
        await store.close()


RACER = """
import asyncio, json, sys
from pathlib import Path
from engine.models import utcnow
from engine.sql_db import StoreTarget
from handlers.csms.store import SecretRecord, SqliteCsmsStore, VersionRecord

def version(sid, seq):  # as the test module's (not imported: pytest takes a second)
    return VersionRecord(sid, f"v{seq}", seq, utcnow(), "key-1", b"d", b"n", b"c")

async def main(n, path, url):
    store = await SqliteCsmsStore.open(StoreTarget(Path(path), url))
    now = utcnow()
    record = SecretRecord(f"racer-{n}", "default", "racy", "COMMON", "csms/default", "",
                          "enabled", now, now, None, 2, None, None, None, 0, None, None,
                          None, None, None)
    print("ready", flush=True)
    sys.stdin.readline()  # go: every process is ready
    created = await store.create_secret(record, version(record.secret_id, 1), {"SYSCURRENT": "v1"})
    sid = "id-default-shared"
    pending = await store.start_pending(version(sid, 10 + n), f"t{n}", utcnow())
    claimed = await store.claim_rotation(sid, f"t{n}", 60)
    sid = "id-default-moved"
    moved = await store.add_version(version(sid, 20 + n), {"SYSCURRENT": "v0"},
                                    {"SYSCURRENT": f"v{20 + n}", "SYSPREVIOUS": "v0"},
                                    utcnow(), 100)
    print(json.dumps([created, pending, claimed, moved]))
    await store.close()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
"""


async def test_check_then_writes_hold_across_processes(
    store: SqliteCsmsStore, store_target: StoreTarget,
) -> None:
    """Four processes (as on four nodes) race each check-then-write at once: one name,
    one pending version, one lease holder, one stage move from the same map."""
    for name in ("shared", "moved"):
        record = secret(name)
        assert await store.create_secret(record, version(record.secret_id, 0), {CURRENT: "v0"})
    outs = race(RACER, store_target)
    results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    created, pending, claimed, moved = (list(column) for column in zip(*results, strict=True))
    assert created.count(True) == 1
    assert [r.name for r in await store.list_secrets("default")] == ["moved", "racy", "shared"]
    assert len(set(pending)) == 1  # every process found (or made) the same one
    assert claimed.count(True) == 1 and moved.count(True) == 1
    assert await store.stages("id-default-shared") == {CURRENT: "v0", PENDING: pending[0]}
    assert sorted(v.version_id for v in await store.versions("id-default-shared")) == \
        sorted(["v0", pending[0]])
    stages = await store.stages("id-default-moved")
    assert stages[PREVIOUS] == "v0" and len(await store.versions("id-default-moved")) == 2
