"""Jobs written and claimed in batches (engine.queue): each caller gets its own
outcome, nothing Redis already has is overwritten, a claim takes only jobs that
are queued, due and not running, and never more than the worker has room for."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import Job
from arq.utils import timestamp_ms, to_unix_ms
from arq.worker import Retry, func

from engine import serialization
from engine.errors import BackendUnavailable
from engine.job_signing import SIGNATURE_ARG
from engine.models import utcnow
from engine.queue import Claimed, JobClaimer, Queue
from engine.redis_server import free_port
from engine.settings import Settings
from engine.worker import DewWorker
from tests.helpers import wait_for


@pytest.fixture
async def queue(settings: Settings) -> Any:
    q = await Queue.connect(settings)
    yield q
    await q.close()


async def test_pushes_together_each_get_their_own_outcome(queue: Queue) -> None:
    pool = queue.pool
    assert await queue.push("had-job", "engine.echo", {"value": 0}, signature="old")
    await pool.set(result_key_prefix + "had-result", b"x")
    due = utcnow() + timedelta(hours=1)
    before = timestamp_ms()
    # One batch: new jobs, a job Redis has, one with a kept result, one id twice.
    outcomes = await asyncio.gather(
        *(queue.push(f"new{i}", "engine.echo", {"value": i}, signature=f"s{i}")
          for i in range(5)),
        queue.push("had-job", "engine.echo", {"value": 1}, signature="new"),
        queue.push("had-result", "engine.echo", {"value": 2}),
        queue.push("twice", "engine.sleep", {"seconds": 0}, due_at=due),
        queue.push("twice", "engine.sleep", {"seconds": 1}),
    )
    assert outcomes == [True] * 5 + [False, False, True, False]
    # Written as arq's enqueue_job writes them: arq's worker reads them as its own.
    info = await Job("new3", pool, _queue_name=queue.queue_name,
                     _deserializer=serialization.loads).info()
    assert info is not None
    # (JSON keeps arq's argument tuple as a list, as it did for arq's enqueue_job.)
    assert (info.function, list(info.args), info.kwargs) == (
        "engine.echo", [{"value": 3}], {SIGNATURE_ARG: "s3"})
    assert before <= info.score <= timestamp_ms()  # type: ignore[operator]
    assert 86_000_000 < await pool.pttl(job_key_prefix + "new3") <= 86_400_000
    # Nothing Redis had was overwritten; the deferred job is due when asked.
    kept = await Job("had-job", pool, _deserializer=serialization.loads).info()
    assert kept is not None and kept.kwargs == {SIGNATURE_ARG: "old"}
    assert not await pool.exists(job_key_prefix + "had-result")
    assert await pool.zscore(queue.queue_name, "twice") == to_unix_ms(due)
    assert await pool.zcard(queue.queue_name) == 7


async def test_every_caller_of_a_failed_batch_gets_the_error() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    queue = Queue(ArqRedis.from_url(dead), "q", dead)
    try:
        results = await asyncio.gather(
            *(queue.push(f"t{i}", "engine.echo", {"value": i}) for i in range(4)),
            return_exceptions=True)
    finally:
        await queue.close()
    assert [type(r) for r in results] == [BackendUnavailable] * 4


async def test_a_claim_takes_queued_due_idle_jobs_in_order_up_to_the_limit(
    queue: Queue,
) -> None:
    pool, name = queue.pool, queue.queue_name
    now = timestamp_ms()
    await pool.zadd(name, {"a": now - 5, "busy": now - 4, "later": now + 60_000,
                           "b": now - 3, "c": now - 2})
    await pool.psetex(in_progress_key_prefix + "busy", 60_000, b"1")
    await pool.set(job_key_prefix + "a", b"job a")
    await pool.set(retry_key_prefix + "a", 2)  # tried twice before
    claimer = JobClaimer(pool, name, 30_000)
    ids = ["a", "busy", "later", "gone", "b", "c"]
    # Read and counted as arq's run_job would: b's job key is gone (expired).
    assert await claimer.claim(ids, 2) == [Claimed("a", now - 5, b"job a", 3),
                                           Claimed("b", now - 3, None, 1)]
    assert 29_000 < await pool.pttl(in_progress_key_prefix + "a") <= 30_000
    assert 88_000 < await pool.ttl(retry_key_prefix + "a") <= 88_400
    assert not await pool.exists(in_progress_key_prefix + "c", in_progress_key_prefix + "later",
                                 in_progress_key_prefix + "gone", retry_key_prefix + "c")
    # Claimed once: the next poll takes what is left, and nothing with no room.
    assert await claimer.claim(ids, 0) == []
    assert [c.job_id for c in await claimer.claim(ids, 10)] == ["c"]
    assert await claimer.claim(ids, 10) == []


async def test_the_worker_starts_no_more_jobs_than_it_has_room_for(
    queue: Queue, settings: Settings,
) -> None:
    release = asyncio.Event()
    ran: list[int] = []

    async def block(ctx: dict[str, Any], args: Any = None, **kwargs: Any) -> None:
        ran.append(args["n"])
        await release.wait()

    for n in range(5):
        await queue.push(f"j{n}", "test.block", {"n": n})
    worker = DewWorker(
        functions=[func(block, name="test.block")], redis_pool=queue.pool,
        queue_name=queue.queue_name, max_jobs=2, keep_result=0, handle_signals=False,
        job_serializer=serialization.dumps, job_deserializer=serialization.loads,
    )
    ids = [f"j{n}".encode() for n in range(5)]
    await worker.start_jobs(ids)
    await worker.start_jobs(ids)  # full: starts nothing more

    async def two_ran() -> bool:
        return len(ran) == 2

    await wait_for(two_ran, timeout=10, interval=0.01)
    await asyncio.sleep(0.1)
    assert (worker.job_counter, sorted(ran)) == (2, [0, 1])
    release.set()
    await asyncio.gather(*worker.tasks.values())
    assert worker.job_counter == 0
    for _ in range(2):  # room again: the rest, two at a time, never the two that ran
        await worker.start_jobs(ids)
        assert worker.job_counter <= 2
        await asyncio.gather(*worker.tasks.values())
    assert sorted(ran) == [0, 1, 2, 3, 4]
    # Each finished job's keys are gone (arq's finish, in one script call).
    assert await queue.pool.zcard(queue.queue_name) == 0
    assert await queue.pool.keys("arq:*") == []


async def test_claimed_jobs_end_as_arqs_own_run_job_ends_them(queue: Queue) -> None:
    """The worker runs what the claim read with arq's steps: a retry goes back on the
    queue (deferred, the try counted), an error, an unknown function or an expired
    job ends it, and a success removes every key."""
    tries: list[int] = []

    async def flaky(ctx: dict[str, Any], args: Any = None) -> str:
        tries.append(ctx["job_try"])
        if ctx["job_try"] == 1:
            raise Retry(defer=0.3)
        return "ok"

    async def boom(ctx: dict[str, Any], args: Any = None) -> None:
        raise ValueError("boom")

    pool, name = queue.pool, queue.queue_name
    for job_id, function in (("f", "t.flaky"), ("b", "t.boom"), ("u", "t.unknown")):
        await queue.push(job_id, function, {})
    await pool.zadd(name, {"expired": timestamp_ms() - 1})  # its job key is gone
    worker = DewWorker(
        functions=[func(flaky, name="t.flaky"), func(boom, name="t.boom")],
        redis_pool=pool, queue_name=name, max_jobs=10, keep_result=0, handle_signals=False,
        job_serializer=serialization.dumps, job_deserializer=serialization.loads,
    )
    ids = [b"f", b"b", b"u", b"expired"]
    before = timestamp_ms()
    await worker.start_jobs(ids)
    await asyncio.gather(*worker.tasks.values())
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (0, 3, 1)
    assert [m.decode() for m in await pool.zrange(name, 0, -1)] == ["f"]  # deferred
    due = await pool.zscore(name, "f") or 0
    assert due >= before + 300
    await asyncio.sleep(max(0.0, (due - timestamp_ms()) / 1000) + 0.01)
    worker.tasks.clear()
    await worker.start_jobs(ids)
    await asyncio.gather(*worker.tasks.values())
    assert tries == [1, 2] and worker.jobs_complete == 1
    assert await pool.keys("arq:*") == []
