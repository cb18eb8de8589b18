"""`dew tasks cancel` of a running task (issue 16, item 3): a job with safe points
(registered ``cancellable``) stops at the next one and its task ends ``cancelled``,
never retried; a job without them is refused as before and ends by itself. The
runner's part with a real store; the whole path with a real worker and ``dew``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import render
from engine.client import Client
from engine.context import JobContext
from engine.errors import Conflict, TaskCancelled, TransientError
from engine.models import CancelRequest, Fence, TaskRecord, utcnow
from engine.registry import Registry
from engine.runner import TaskRunner
from engine.settings import Settings
from engine.sqlite_store import SqliteTaskStore
from tests.engine.test_runner import SigningRunner
from tests.helpers import WorkerProcess, run_dew, wait_for

jobs = Registry()
calls: list[str] = []
ERROR = TaskCancelled("cancelled by test").to_dict()


@jobs.job("c.steps", cancellable=True)
async def steps(ctx: JobContext, args: dict[str, Any]) -> dict[str, int]:
    calls.append(ctx.task_id)
    for done in range(3):
        await ctx.check_cancelled({"done": done})
        if done == 1:  # as `dew tasks cancel` would, while the task runs
            await ctx.store.cancel_task(ctx.task_id, ERROR, utcnow(), by="tester",
                                        cancellable={"c.steps"})
            ctx.cancel_read_at = float("-inf")  # no waiting out the poll interval here
    return {"done": 3}


@jobs.job("c.hiccup", cancellable=True)
async def hiccup(ctx: JobContext, args: dict[str, Any]) -> None:
    await ctx.store.cancel_task(ctx.task_id, ERROR, utcnow(), by="tester",
                                cancellable={"c.hiccup"})
    raise TransientError("backend hiccup")


@jobs.job("c.many", cancellable=True)
async def many(ctx: JobContext, args: dict[str, Any]) -> dict[str, float]:
    """50 safe points at once, twice (the second time past the poll interval), then
    1000 one after the other: how often the store is read, and what a check costs."""
    assert isinstance(ctx.store, CountingStore)
    ctx.store.reads = 0
    await asyncio.gather(*(ctx.check_cancelled() for _ in range(50)))
    ctx.cancel_read_at = float("-inf")
    await asyncio.gather(*(ctx.check_cancelled() for _ in range(50)))
    started = time.perf_counter()
    for _ in range(1000):
        await ctx.check_cancelled()
    return {"per_check": (time.perf_counter() - started) / 1000, "reads": ctx.store.reads}


class CountingStore(SqliteTaskStore):
    """The real store, counting how often a safe point reads it."""

    reads = 0

    async def cancel_request(self, task_id: str) -> CancelRequest | None:
        self.reads += 1
        return await super().cancel_request(task_id)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    s = await CountingStore.open(tmp_path / "dew.sqlite3")
    yield s
    await s.close()


@pytest.fixture
async def runner(settings: Settings, store: CountingStore) -> AsyncIterator[TaskRunner]:
    signing = SigningRunner(settings, store, "w-test", rand=lambda: 0.0)
    yield signing
    await signing.resources.close()


async def _task(store: SqliteTaskStore, task_id: str) -> TaskRecord:
    task = await store.get_task(task_id)
    assert task is not None
    return task


async def test_a_handler_stops_at_the_safe_point_after_the_request(
    runner: TaskRunner, store: CountingStore,
) -> None:
    outcome = await runner.run(jobs.get("c.steps"), "t1", {})
    task = await _task(store, "t1")
    assert outcome.status == "cancelled"
    assert (task.status, task.attempts, task.result) == ("cancelled", 1, {"done": 2})
    assert task.error is not None and task.error["code"] == "cancelled"
    assert "cancelled by tester" in task.error["message"]
    assert task.cancel_requested_by == "tester" and task.cancel_requested_at is not None
    assert await store.list_failures(task_id="t1") == []  # a cancel is no failure
    # Delivered again (arq at-least-once): it has ended, nothing runs.
    calls.clear()
    assert (await runner.run(jobs.get("c.steps"), "t1", {})).status == "skipped"
    assert calls == []


async def test_a_run_that_would_be_retried_after_a_request_ends_cancelled(
    runner: TaskRunner, store: CountingStore,
) -> None:
    assert (await runner.run(jobs.get("c.hiccup"), "t2", {})).status == "cancelled"
    task = await _task(store, "t2")
    assert (task.status, task.attempts) == ("cancelled", 1)
    assert task.error is not None and "backend hiccup" in task.error["cause"]


async def test_a_run_after_a_request_does_not_start(
    runner: TaskRunner, store: CountingStore,
) -> None:
    """A request that outlived its run (the worker shut down or crashed): the next
    delivery ends the task cancelled without calling the handler."""
    now = utcnow()
    await store.create_task("t3", "c.steps", {}, now, now)
    running, _ = await store.mark_running("t3", "c.steps", {}, "w-old", now, now)
    requested = await store.cancel_task("t3", ERROR, now, by="tester",
                                        cancellable={"c.steps"})
    assert requested.status == "running" and requested.cancel_requested_at is not None
    # A second request keeps the first (who asked first, and when).
    again = await store.cancel_task("t3", ERROR, utcnow(), by="other",
                                    cancellable={"c.steps"})
    assert again.cancel_request == requested.cancel_request
    assert await store.release_claim("t3", fence_of(running))
    calls.clear()
    assert (await runner.run(jobs.get("c.steps"), "t3", {})).status == "cancelled"
    task = await _task(store, "t3")
    assert calls == [] and (task.status, task.attempts, task.result) == ("cancelled", 2, None)


def fence_of(task: TaskRecord) -> Fence:
    assert task.worker_id is not None
    return Fence(task.worker_id, task.attempts)


async def test_a_job_without_safe_points_is_refused_while_it_runs(
    store: CountingStore,
) -> None:
    now = utcnow()
    await store.create_task("t4", "c.plain", {}, now, now)
    await store.mark_running("t4", "c.plain", {}, "w-1", now, now)
    with pytest.raises(Conflict, match="ends by itself") as refused:
        await store.cancel_task("t4", ERROR, now, by="tester", cancellable={"c.steps"})
    assert refused.value.code == "task_not_cancellable"
    task = await _task(store, "t4")
    assert task.status == "running" and task.cancel_requested_at is None
    # A queued one is cancelled at once, whatever its job; the request is noted too.
    await store.create_task("t6", "c.plain", {}, now, now)
    queued = await store.cancel_task("t6", ERROR, now, by="tester")
    assert (queued.status, queued.cancel_requested_by) == ("cancelled", "tester")
    assert queued.to_json()["cancel_requested_at"] is not None


async def test_a_safe_point_reads_the_store_at_most_every_poll_interval(
    runner: TaskRunner, store: CountingStore,
) -> None:
    """A 50-server batch asks once per server, all at once: one read serves them."""
    assert (await runner.run(jobs.get("c.many"), "t5", {})).status == "succeeded"
    seen = (await _task(store, "t5")).result
    # The first 50 go by the row the run claimed; of the next 50, one reads for all.
    assert seen["reads"] == 1, seen
    assert seen["per_check"] < 0.001, seen


def test_the_cancel_lines_of_the_text_output() -> None:
    running = {"task_id": "t", "status": "running", "cancel_requested_at": "x"}
    assert render.cancelled(running) == (
        "task t: cancel requested; the task stops at its next safe point")
    assert render.cancelled({"task_id": "t", "status": "cancelled"}) == "task t cancelled"


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def cancel_settings(settings: Settings) -> Settings:
    return settings.replace(engine={"services": ("handlers.builtin",
                                                 "tests.engine.cancel_service")})


@pytest.fixture
def cancel_worker(cancel_settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(cancel_settings, tmp_path / "worker.out").start()
    yield proc
    proc.stop()


@pytest.mark.slow
async def test_dew_tasks_cancel_stops_a_running_task_and_refuses_one_without_safe_points(
    cancel_settings: Settings, cancel_worker: WorkerProcess,
) -> None:
    s = cancel_settings
    async with await Client.open(s) as client:
        looping = await client.enqueue("canceltest.steps", {"steps": 200, "interval": 0.1})
        plain = await client.enqueue("canceltest.plain", {"steps": 6, "interval": 0.5})

        async def both_running() -> bool:
            tasks = [await client.get(t.task_id) for t in (looping, plain)]
            return all(t.status == "running" for t in tasks)

        await wait_for(both_running, timeout=20, interval=0.05)

        refused = run_dew(s, "tasks", "cancel", plain.task_id)
        assert refused.returncode == 1 and "ends by itself" in refused.stderr
        done = run_dew(s, "tasks", "cancel", looping.task_id, "--json")
        assert done.returncode == 0, done.stderr
        shown = json.loads(done.stdout)
        assert shown["status"] == "running" and shown["cancel_requested_at"]
        assert shown["cancel_requested_by"].startswith("cli:")

        ended = await client.wait(looping.task_id, timeout=10)
        assert ended.status == "cancelled" and ended.attempts == 1, ended
        assert ended.error is not None and ended.error["code"] == "cancelled"
        assert ended.result["done"] < 200
        assert ended.finished_at is not None and ended.cancel_requested_at is not None
        # One step (0.1 s) and one poll (0.2 s) at most, plus the store's writes.
        took = (ended.finished_at - ended.cancel_requested_at).total_seconds()
        assert took < 1.0, took

        finished = await client.wait(plain.task_id, timeout=10)
        assert finished.status == "succeeded" and finished.result == {"done": 6}
        assert finished.cancel_requested_at is None and finished.attempts == 1
        # Never retried: still cancelled after one try, and no failure record.
        again = await client.get(looping.task_id)
        assert (again.status, again.attempts) == ("cancelled", 1)
        assert await client.store.list_failures(task_id=looping.task_id) == []

    text = run_dew(s, "tasks", "show", looping.task_id)
    assert text.returncode == 0
    assert "cancel    requested" in text.stdout and "result    {\"done\":" in text.stdout
    print(f"cancel request to cancelled: {took:.3f} s")
