"""Sealing by declaration, bound to its one use: what a job declares secret never
lies in clear in Redis, the task store, its WAL or the logs; a seal copied into
another job, task or account does not open; a final row keeps no seal."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from engine.client import Client
from engine.redaction import REDACTED, is_sealed
from engine.settings import Settings
from tests.engine.secret_service.jobs import digest
from tests.helpers import WorkerProcess

CONN = "postgresql://app:HUNTER2-dsn-zz9@db.internal/x"  # a name no list would guess
BLOB = {"nested": [{"k": "PRIVKEYMATERIAL-plugh"}], "n": 7}
CLEAR = (b"HUNTER2-dsn-zz9", b"PRIVKEYMATERIAL-plugh")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(engine={"services": [*settings.engine.services,
                                                 "tests.engine.secret_service"]})


async def redis_bytes(client: Client) -> bytes:
    pool = (await client.queue()).pool
    dump = b""
    async for key in pool.scan_iter("*"):
        dump += key + (await pool.dump(key) or b"")
    return dump


def files_hold(settings: Settings, *extra: Any) -> list[str]:
    paths = [settings.db_path, settings.db_path.with_name("dew.sqlite3-wal"),
             settings.log_file, *extra]
    return [f"{p}: {c!r}" for p in paths if p.exists() for c in CLEAR if c in p.read_bytes()]


async def test_declared_secrets_are_sealed_opened_and_dropped(
    client: Client, settings: Settings, make_worker: Any
) -> None:
    task = await client.enqueue("testsecret.use", {"conn": CONN, "blob": BLOB})
    assert is_sealed(task.args["conn"]) and is_sealed(task.args["blob"])
    assert not [c for c in CLEAR if c in await redis_bytes(client)]
    worker: WorkerProcess = make_worker()
    done = await client.wait(task.task_id, timeout=30)
    assert done.status == "succeeded", done.error
    # The handler saw the clear values (their digests), and returned none of them.
    assert done.result == {"conn_sha256": digest(CONN), "blob_sha256": digest(BLOB),
                           "account": "default"}
    # Final: the row keeps no seal (nothing will re-deliver it).
    assert done.args == {"conn": REDACTED, "blob": REDACTED}
    worker.stop()
    assert files_hold(settings, worker.log_path) == []


async def test_a_seal_opens_only_for_its_task_job_and_account(
    client: Client, settings: Settings, make_worker: Any
) -> None:
    original = await client.enqueue("testsecret.use", {"conn": CONN, "blob": BLOB})
    stolen = original.args["conn"]  # read from the row (or Redis) while queued
    # Replayed into another task of the same job, and into another account.
    replay = await client.enqueue("testsecret.use", {"conn": stolen, "blob": 1})
    other = await client.enqueue("testsecret.use",
                                 {"conn": stolen, "blob": 1, "account": "acme"})
    # The same values sealed for account acme by the client open there (M4).
    acme = await client.enqueue("testsecret.use", {"conn": CONN, "blob": 2, "account": "acme"})
    make_worker()
    for task_id in (replay.task_id, other.task_id):
        done = await client.wait(task_id, timeout=30)
        assert done.status == "failed" and done.error is not None
        assert done.error["code"] == "seal_not_for_this_use", done.error
        assert "'conn' was not sealed for this use" in done.error["message"]
        assert done.result is None
        [failure] = await client.store.list_failures(task_id=task_id)
        assert (failure.category, failure.target) == ("security", "conn")
    assert (await client.wait(original.task_id, timeout=30)).status == "succeeded"
    done = await client.wait(acme.task_id, timeout=30)
    assert done.status == "succeeded" and done.result["account"] == "acme", done.error


async def test_state_files_are_private(client: Client, settings: Settings,
                                       make_worker: Any) -> None:
    settings.state_dir.chmod(0o755)  # left looser by an older version: tightened
    make_worker()
    task = await client.enqueue("testsecret.use", {"conn": CONN, "blob": BLOB})
    assert (await client.wait(task.task_id, timeout=30)).status == "succeeded"
    loose = [f"{p} {oct(p.stat().st_mode & 0o777)}"
             for p in [settings.state_dir, *settings.state_dir.rglob("*")]
             if not p.is_symlink() and p.stat().st_mode & 0o077]
    assert loose == []
    with sqlite3.connect(settings.db_path) as db:  # still a working store
        assert db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 1
