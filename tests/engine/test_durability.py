"""The outbox guarantees: Redis losing everything, and a worker killed mid-job."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable

import pytest

from engine.client import Client
from engine.queue import close_pool, open_pool, redis_settings
from engine.redis_server import RedisServer
from engine.settings import Settings
from tests.helpers import WorkerProcess, wait_for
from tests.pg_store import store_rows

pytestmark = pytest.mark.slow


async def test_redis_restart_loses_nothing_and_runs_nothing_twice(
    client: Client, redis_server: RedisServer, make_worker: Callable[[], WorkerProcess]
) -> None:
    ids = [f"r{i:03}" for i in range(200)]
    for task_id in ids:
        await client.enqueue("engine.sleep", {"seconds": 0}, task_id=task_id)
    queue = await client.queue()
    assert await queue.pool.zcard(queue.queue_name) == 200

    redis_server.kill()  # no persistence: every queued job is gone
    redis_server.start()
    assert await queue.pool.zcard(queue.queue_name) == 0

    make_worker()

    async def all_done() -> bool:
        return len(await client.list_tasks(status="succeeded", limit=1000)) == 200

    await wait_for(all_done, timeout=90, interval=0.5)
    tasks = await client.list_tasks(limit=1000)
    assert sorted(t.task_id for t in tasks) == ids
    assert all(t.attempts == 1 and t.status == "succeeded" for t in tasks)  # none ran twice


async def test_enqueue_while_redis_is_down_is_delivered_later(
    client: Client, redis_server: RedisServer, make_worker: Callable[[], WorkerProcess]
) -> None:
    redis_server.stop()
    task = await client.enqueue("engine.sleep", {"seconds": 0.01})  # the row is the promise
    assert (await client.get(task.task_id)).status == "queued"
    redis_server.start()
    make_worker()
    done = await client.wait(task.task_id, timeout=30)
    assert (done.status, done.result, done.attempts) == ("succeeded", 0.01, 1)


async def test_killed_worker_job_is_taken_over_in_seconds(
    client: Client, settings: Settings, make_worker: Callable[[], WorkerProcess]
) -> None:
    first = make_worker()
    task = await client.enqueue("engine.sleep", {"seconds": 2.0})

    async def running() -> bool:
        return (await client.get(task.task_id)).status == "running"

    await wait_for(running, timeout=20, interval=0.05)
    first.kill()  # SIGKILL: no chance to clean up or re-queue
    killed_at = time.monotonic()
    make_worker()
    done = await client.wait(task.task_id, timeout=60)
    took = time.monotonic() - killed_at
    assert (done.status, done.attempts) == ("succeeded", 2)
    assert await client.store.list_failures(task_id=task.task_id) == []
    # Bounded by heartbeat_timeout + sweep interval + the job itself, not arq's
    # job_timeout + 10 s (70 s with these settings).
    assert took < settings.worker.job_timeout, took


async def test_stopped_worker_requeues_its_job(
    client: Client, make_worker: Callable[[], WorkerProcess]
) -> None:
    first = make_worker()
    task = await client.enqueue("engine.sleep", {"seconds": 1.0})

    async def running() -> bool:
        return (await client.get(task.task_id)).status == "running"

    await wait_for(running, timeout=20, interval=0.05)
    first.stop()  # SIGTERM: arq cancels the job and puts it back
    make_worker()
    done = await client.wait(task.task_id, timeout=30)
    assert (done.status, done.attempts) == ("succeeded", 2)
    await asyncio.sleep(0)


def test_worker_exits_cleanly_when_redis_is_gone(
    settings: Settings, redis_server: RedisServer, make_worker: Callable[[], WorkerProcess]
) -> None:
    """arq's own clean-up fails without Redis and skips our shutdown hook; the worker
    must still close its task store (whose thread would keep the process alive)."""
    worker = make_worker()
    proc = worker.proc
    assert proc is not None
    redis_server.kill()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) is not None  # exited, did not hang
    redis_server.start()


async def test_a_stop_during_start_up_still_closes_the_stores(
    settings: Settings, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SIGTERM lands while the first heartbeat is being written (arq cancels the
    start-up there): the worker's state is already known, so the shutdown closes the
    stores it opened (their threads would keep the process alive: a worker that never
    exits)."""
    from engine import worker as worker_module

    written = asyncio.Event()
    real_beat = worker_module._beat

    async def beat_then_stopped(state: worker_module.WorkerState) -> None:
        await real_beat(state)
        written.set()
        raise asyncio.CancelledError

    monkeypatch.setattr(worker_module, "_beat", beat_then_stopped)
    worker = worker_module.build_worker(settings, handle_signals=False)
    worker.ctx["redis"] = await open_pool(redis_settings(settings),
                                          settings.redis.queue)
    before = set(threading.enumerate())
    with pytest.raises(asyncio.CancelledError):
        assert worker.on_startup is not None
        await worker.on_startup(worker.ctx)
    assert written.is_set()
    state = worker.ctx.get("dew")
    assert state is not None and state.beat_store is not None
    await worker_module.shutdown_state(state)
    assert state.closed
    await close_pool(worker.ctx["redis"])
    # A closed store's thread ends just after close() returns; a thread that goes on
    # is one that would keep the worker's process alive.
    # (asyncio_N: the loop's default executor, joined when the loop closes)
    for thread in set(threading.enumerate()) - before:
        if not thread.daemon and not thread.name.startswith("asyncio_"):
            thread.join(timeout=10)
            assert not thread.is_alive(), thread


def _stop_outside_a_write(pid: int, settings: Settings) -> None:
    """SIGSTOP ``pid`` at a moment it holds no write lock of the store. Stopped inside
    a write (a heartbeat, say) it would stop every writer, the worker that should take
    over included: with one store, a frozen writer can only be waited for or killed.
    That is not the takeover this file tests."""
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        if _store_writable(settings):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError("the worker held the store's write lock at every try")


def _store_writable(settings: Settings) -> bool:
    target = settings.store_target
    if target.url:
        return not store_rows(target, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
                                      "AND granted")
    with contextlib.closing(sqlite3.connect(target.path, timeout=0.1)) as conn:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        conn.rollback()
    return True


@pytest.mark.slow
async def test_a_stalled_worker_taken_over_never_writes(
    client: Client, settings: Settings, make_worker: Callable[[], WorkerProcess]
) -> None:
    """A SIGSTOPped worker looks dead; another takes its job over. When the first one
    wakes up, its run may not write: one outcome, recorded by the run that holds the
    claim, and a duplicate delivery never runs beside a live worker's run."""
    first = make_worker()
    task = await client.enqueue("engine.sleep", {"seconds": 4.0})

    async def running_on(worker_pid: int) -> bool:
        row = await client.get(task.task_id)
        return row.status == "running" and f":{worker_pid}:" in (row.worker_id or "")

    await wait_for(lambda: running_on(first.pid), timeout=20, interval=0.05)
    _stop_outside_a_write(first.pid, settings)
    try:
        second = make_worker()
        # heartbeat_timeout (2 s) + a sweep (1 s): the second worker claims attempt 2.
        await wait_for(lambda: running_on(second.pid), timeout=30, interval=0.1)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    # The first run's sleep is over: it wakes and tries to record its success.
    await asyncio.sleep(1.5)
    row = await client.get(task.task_id)
    assert (row.status, row.attempts) == ("running", 2), row
    assert f":{second.pid}:" in (row.worker_id or "")
    done = await client.wait(task.task_id, timeout=30)
    assert (done.status, done.attempts) == ("succeeded", 2)
    assert f":{second.pid}:" in (done.worker_id or "")
    first.stop()
    assert "run taken over by another worker" in first.log_path.read_text() + \
        settings.log_file.read_text()
