"""The SQLite task store: schema, idempotent writes, failure records, concurrency."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from engine import sqlite_db
from engine.context import failure_record
from engine.errors import ConfigError, DewError, PermanentError, SchemaTooNew
from engine.models import Fence, WorkerRecord, utcnow
from engine.sql_db import StoreTarget
from engine.sqlite_store import MIGRATIONS, SqliteTaskStore
from tests.pg_store import admin_sql, sqlite_only


@pytest.fixture
async def store(store_target: StoreTarget):  # type: ignore[no-untyped-def]
    s = await SqliteTaskStore.open(store_target)
    yield s
    await s.close()


@sqlite_only
async def test_schema_is_versioned_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "dew.sqlite3"
    await (await SqliteTaskStore.open(path)).close()
    await (await SqliteTaskStore.open(path)).close()  # re-opening migrates nothing twice
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT component, version FROM schema_migrations").fetchall() == [
            ("engine", len(MIGRATIONS))]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"tasks_status_enqueued", "tasks_name_enqueued", "failures_operation_created"} <= indexes


@sqlite_only
async def test_newer_schema_and_garbage_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dew.sqlite3"
    await (await SqliteTaskStore.open(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_migrations SET version = ? WHERE component = 'engine'",
                   (len(MIGRATIONS) + 1,))
    newer = len(MIGRATIONS) + 1
    with pytest.raises(SchemaTooNew, match=f"task store schema version {newer}, newer than"):
        await SqliteTaskStore.open(path)
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="not a usable task store"):
        await SqliteTaskStore.open(junk)


@sqlite_only
async def test_every_store_migrates_its_own_schema_and_old_files_upgrade(
    tmp_path: Path,
) -> None:
    from handlers.csms.store import SqliteCsmsStore
    from handlers.kms.store import SqliteKmsStore
    from handlers.kps.store import SqliteKpsStore

    stores = (SqliteTaskStore, SqliteKmsStore, SqliteCsmsStore, SqliteKpsStore)
    # How many scripts each store had when one user_version (5) covered them all.
    legacy_scripts = {"engine": 1, "kms": 2, "csms": 1, "kps": 1}
    fresh = tmp_path / "fresh.sqlite3"
    await (await SqliteKpsStore.open(fresh)).close()  # a service's store alone: its tables
    with sqlite3.connect(fresh) as db:
        assert db.execute("SELECT component FROM schema_migrations").fetchall() == [("kps",)]
        assert "tasks" not in {r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    # A file of the one-user_version era: every table, user_version 5, no
    # schema_migrations; a task in it. Opening each store adopts it, keeping the rows.
    legacy = tmp_path / "legacy.sqlite3"
    for kind in stores:
        old = type("Old", (kind,), {"migrations": kind.migrations[:legacy_scripts[kind.schema]]})
        await (await old.open(legacy)).close()
    with sqlite3.connect(legacy) as db:
        db.execute("DROP TABLE schema_migrations")
        db.execute("PRAGMA user_version = 5")
        db.execute("INSERT INTO tasks (task_id, name, args, status, enqueued_at, due_at) "
                   "VALUES ('t1', 'engine.echo', '{}', 'queued', '2026-01-01', '2026-01-01')")
    for kind in stores:
        await (await kind.open(legacy)).close()
    with sqlite3.connect(legacy) as db:
        assert dict(db.execute("SELECT component, version FROM schema_migrations")) == {
            kind.schema: len(kind.migrations) for kind in stores}
        assert db.execute("SELECT task_id FROM tasks").fetchall() == [("t1",)]


async def test_create_task_is_idempotent(store: SqliteTaskStore) -> None:
    now = utcnow()
    first, created = await store.create_task("t1", "engine.echo", {"value": 1}, now, now)
    again, created_again = await store.create_task("t1", "engine.echo", {"value": 2}, now, now)
    assert created and not created_again
    assert again == first and again.args == {"value": 1}
    assert first.status == "queued" and first.attempts == 0


async def test_running_counts_attempts_and_creates_rows_for_plain_arq_jobs(
    store: SqliteTaskStore,
) -> None:
    now = utcnow()
    t, claimed = await store.mark_running("plain", "engine.echo", {"value": 1}, "w1", now, now)
    assert (t.status, t.attempts, t.worker_id, claimed) == ("running", 1, "w1", True)
    # w1 writes no heartbeat: it counts as dead, so w2 may take the task over...
    t, claimed = await store.mark_running("plain", "engine.echo", {"value": 1}, "w2", now, now)
    assert (t.attempts, t.worker_id, claimed) == (2, "w2", True)
    # ...but not while w2 is alive, nor w2 itself a second time (one run at a time).
    await store.heartbeat(WorkerRecord("w2", "h", 1, now, now))
    for other in ("w3", "w2"):
        t, claimed = await store.mark_running("plain", "engine.echo", {"value": 1}, other,
                                              now, now, live_since=now)
        assert (t.attempts, t.worker_id, claimed) == (2, "w2", False)
    await store.mark_succeeded("plain", {"ok": True}, now)
    t, claimed = await store.mark_running("plain", "engine.echo", {"value": 1}, "w3", now, now)
    assert (t.status, t.attempts, t.result) == ("succeeded", 2, {"ok": True})  # final: untouched
    assert not claimed


async def test_finish_writes_of_one_batch_each_get_their_own_outcome(
    store: SqliteTaskStore,
) -> None:
    now = utcnow()
    for task_id in ("ok1", "done", "taken", "ok2"):
        await store.mark_running(task_id, "engine.echo", {}, "w", now, now)
    await store.mark_succeeded("done", "first", now)
    await store.mark_running("taken", "engine.echo", {}, "w2", now, now)  # w is silent
    fence = Fence("w", 1)
    # Submitted together: one group-committed statement, and each its own outcome.
    outcomes = await asyncio.gather(*(
        store.mark_succeeded(task_id, task_id, now, fence=fence)
        for task_id in ("ok1", "done", "taken", "ok2")))
    assert outcomes == [True, False, False, True]
    rows = {t.task_id: (t.status, t.result, t.worker_id)
            for t in await store.list_tasks(limit=10)}
    assert rows == {"ok1": ("succeeded", "ok1", "w"), "ok2": ("succeeded", "ok2", "w"),
                    "done": ("succeeded", "first", "w"), "taken": ("running", None, "w2")}


REFUSE_BAD = {
    "sqlite": ["CREATE TRIGGER refuse BEFORE UPDATE ON tasks WHEN NEW.task_id = 'bad' "
               "AND NEW.status = 'succeeded' BEGIN SELECT RAISE(ABORT, 'refused'); END"],
    "postgresql": [
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.task_id = 'bad' AND "
        "NEW.status = 'succeeded' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END "
        "$$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse BEFORE UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION refuse()"],
}


async def test_a_batch_that_fails_writes_none_of_its_members_and_tells_each(
    store: SqliteTaskStore, store_target: StoreTarget,
) -> None:
    now = utcnow()
    for task_id in ("a", "bad", "b"):
        await store.mark_running(task_id, "engine.echo", {}, "w", now, now)
    await admin_sql(store_target, *REFUSE_BAD[store_target.dialect])
    results = await asyncio.gather(*(store.mark_succeeded(t, t, now) for t in ("a", "bad", "b")),
                                   return_exceptions=True)
    assert all(isinstance(r, DewError) for r in results)
    # Nobody was told "recorded": every run is still running, to be finished again.
    assert {t.status for t in await store.list_tasks(limit=10)} == {"running"}
    await admin_sql(store_target, "DROP TRIGGER refuse"
                    + (" ON tasks" if store_target.url else ""))
    assert await asyncio.gather(*(store.mark_succeeded(t, t, now) for t in ("a", "bad", "b"))) \
        == [True, True, True]


async def test_retry_then_fail_writes_one_failure_record(store: SqliteTaskStore) -> None:
    now = utcnow()
    await store.create_task("t", "engine.fail", {}, now, now)
    await store.mark_running("t", "engine.fail", {}, "w", now, now)
    err = PermanentError("boom", cause="c", fix="f", code="x")
    await store.mark_retrying("t", err.to_dict(), now + timedelta(seconds=1), now)
    assert (await store.get_task("t")).status == "queued"  # type: ignore[union-attr]
    record = failure_record("t", "engine.fail", "srv1", err, now)
    await store.mark_failed("t", err.to_dict(), record, now)
    await store.mark_failed("t", err.to_dict(), failure_record("t", "engine.fail", None, err, now),
                            now)  # a second run of a finished task adds nothing
    task = await store.get_task("t")
    assert task is not None and task.status == "failed" and task.error["message"] == "boom"  # type: ignore[index]
    records = await store.list_failures(task_id="t")
    assert [r.failure_id for r in records] == [record.failure_id]
    assert records[0].target == "srv1" and records[0].fix == "f"


async def test_failure_records_list_filter_and_delete(store: SqliteTaskStore) -> None:
    now = utcnow()
    for i, op in enumerate(["kps.bind", "kps.bind", "csms.rotate_secret"]):
        await store.add_failure(failure_record(f"t{i}", op, f"s{i}", PermanentError("e"),
                                               now + timedelta(seconds=i)))
    assert len(await store.list_failures()) == 3
    binds = await store.list_failures(operation="kps.bind")
    assert [f.task_id for f in binds] == ["t1", "t0"]  # newest first
    assert await store.delete_failure(binds[0].failure_id)
    assert not await store.delete_failure(binds[0].failure_id)
    assert await store.get_failure(binds[0].failure_id) is None
    assert await store.delete_all_failures() == 2
    assert await store.list_failures() == []


async def test_list_tasks_filters(store: SqliteTaskStore) -> None:
    now = utcnow()
    for i in range(5):
        await store.create_task(f"t{i}", "engine.echo" if i % 2 else "engine.sleep", {},
                                now + timedelta(seconds=i), now)
    await store.mark_running("t4", "engine.sleep", {}, "w", now, now)
    assert [t.task_id for t in await store.list_tasks(limit=2)] == ["t4", "t3"]
    assert {t.task_id for t in await store.list_tasks(name="engine.echo")} == {"t1", "t3"}
    assert [t.task_id for t in await store.list_tasks(status="running")] == ["t4"]
    assert len(await store.unfinished_tasks()) == 5


async def test_workers_heartbeat(store: SqliteTaskStore) -> None:
    now = utcnow()
    await store.heartbeat(WorkerRecord("w1", "h", 1, now, now - timedelta(seconds=30)))
    await store.heartbeat(WorkerRecord("w2", "h", 2, now, now))
    assert await store.live_workers(now - timedelta(seconds=10)) == {"w2"}
    await store.remove_worker("w2")
    assert await store.live_workers(now - timedelta(seconds=10)) == set()


async def test_concurrent_coroutines_share_one_connection(store: SqliteTaskStore) -> None:
    now = utcnow()

    async def life(i: int) -> None:
        await store.create_task(f"c{i}", "engine.echo", {}, now, now)
        await store.mark_running(f"c{i}", "engine.echo", {}, "w", now, now)
        if i % 2:
            await store.mark_succeeded(f"c{i}", i, now)
        else:
            err = PermanentError("e")
            await store.mark_failed(f"c{i}", err.to_dict(),
                                    failure_record(f"c{i}", "engine.echo", None, err, now), now)

    await asyncio.gather(*(life(i) for i in range(200)))
    assert len(await store.list_tasks(status="succeeded", limit=1000)) == 100
    assert len(await store.list_tasks(status="failed", limit=1000)) == 100
    assert len(await store.list_failures(limit=1000)) == 100


WRITER = """
import asyncio, sys
from pathlib import Path
from engine.models import utcnow
from engine.sql_db import StoreTarget
from engine.sqlite_store import SqliteTaskStore

async def main(prefix):
    store = await SqliteTaskStore.open(StoreTarget(Path(sys.argv[1]), sys.argv[3]))
    for i in range(150):
        now = utcnow()
        await store.create_task(f"{prefix}{i}", "engine.echo", {}, now, now)
        await store.mark_running(f"{prefix}{i}", "engine.echo", {}, prefix, now, now)
        await store.mark_succeeded(f"{prefix}{i}", i, now)
    await store.close()

asyncio.run(main(sys.argv[2]))
"""


async def test_concurrent_writer_processes(store_target: StoreTarget) -> None:
    """Worker, CLI and sweeper are separate processes (or nodes) writing one store."""
    await (await SqliteTaskStore.open(store_target)).close()  # migrated once, up front
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(store_target.path), f"p{n}-",
                          store_target.url])
        for n in range(4)
    ]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    store = await SqliteTaskStore.open(store_target)
    try:
        tasks = await store.list_tasks(limit=1000)
    finally:
        await store.close()
    assert len(tasks) == 600 and {t.status for t in tasks} == {"succeeded"}


@sqlite_only
async def test_a_hot_write_waits_for_another_writer_off_the_loop(
    store: SqliteTaskStore, tmp_path: Path,
) -> None:
    """The hot writes run on the loop's thread only when the write lock is free:
    held by another process, the write waits in the thread (the loop goes on) and
    is written once the lock is free."""
    now = utcnow()
    await store.mark_running("t", "engine.echo", {}, "w", now, now)
    other = sqlite3.connect(tmp_path / "state" / "dew.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    pending = asyncio.ensure_future(store.mark_succeeded("t", "done", now))
    await asyncio.sleep(0.3)  # the loop is not blocked meanwhile
    assert not pending.done()
    other.execute("COMMIT")
    other.close()
    assert await pending is True
    task = await store.get_task("t")
    assert task is not None and (task.status, task.result) == ("succeeded", "done")


@sqlite_only
async def test_hot_writes_keep_the_wal_checkpointed(
    store: SqliteTaskStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop's connection never checkpoints (fsyncs); the store does it in the
    thread every so many of its writes, so the WAL does not grow without end."""
    monkeypatch.setattr(sqlite_db, "CHECKPOINT_EVERY", 20)
    now = utcnow()
    for i in range(400):
        await store.mark_running(f"t{i}", "engine.echo", {"pad": "x" * 2000}, "w", now, now)
    wal = tmp_path / "state" / "dew.sqlite3-wal"
    assert wal.stat().st_size < 1_000_000  # ~4 MB of frames without checkpoints
