"""The engine end to end: client → Redis → a real ``dew worker`` process → task store."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from arq.connections import RedisSettings, create_pool

from engine import serialization
from engine.client import Client
from engine.errors import InvalidInput, NotFound, UnknownJob
from engine.job_signing import arq_signature
from engine.redaction import REDACTED, is_sealed
from engine.settings import Settings
from tests.helpers import WorkerProcess, wait_for

pytestmark = pytest.mark.usefixtures("worker")


async def test_enqueue_and_wait(client: Client) -> None:
    task = await client.enqueue("engine.echo", {"value": {"n": 1}})
    assert task.status == "queued"
    done = await client.wait(task.task_id, timeout=20)
    # engine.echo's value is a declared secret: sealed on the way, its result kept redacted.
    assert (done.status, done.result, done.attempts) == ("succeeded", REDACTED, 1)
    assert is_sealed(task.args["value"]) and done.args == {"value": REDACTED}
    assert done.enqueued_at <= done.started_at <= done.finished_at  # type: ignore[operator]


async def test_same_task_id_is_one_task(client: Client) -> None:
    first = await client.enqueue("engine.sleep", {"seconds": 0.2}, task_id="once")
    second = await client.enqueue("engine.sleep", {"seconds": 0.2}, task_id="once")
    assert second.task_id == first.task_id == "once"
    done = await client.wait("once", timeout=20)
    third = await client.enqueue("engine.sleep", {"seconds": 0.2}, task_id="once")
    assert third.status == "succeeded" and done.attempts == 1
    assert len(await client.list_tasks(name="engine.sleep")) == 1
    with pytest.raises(InvalidInput, match="already used"):
        await client.enqueue("engine.echo", {"value": 1}, task_id="once")


async def test_bad_input_writes_nothing(client: Client) -> None:
    with pytest.raises(UnknownJob):
        await client.enqueue("engine.nope", {})
    with pytest.raises(InvalidInput):
        await client.enqueue("engine.sleep", {"seconds": "soon"})
    with pytest.raises(InvalidInput):
        await client.enqueue("engine.echo", {"value": 1}, task_id="bad id!")
    with pytest.raises(InvalidInput):
        await client.enqueue("engine.echo", {"value": 1}, defer=-1)
    with pytest.raises(NotFound):
        await client.wait("missing")
    assert await client.list_tasks() == []


async def test_transient_errors_are_retried(client: Client) -> None:
    task = await client.enqueue("engine.flaky", {"failures": 2})
    done = await client.wait(task.task_id, timeout=20)
    assert (done.status, done.attempts, done.result) == ("succeeded", 3, {"attempts": 3})
    assert await client.store.list_failures(task_id=task.task_id) == []


async def test_transient_errors_give_up_after_max_tries(
    client: Client, settings: Settings
) -> None:
    task = await client.enqueue("engine.flaky", {"failures": 99})
    done = await client.wait(task.task_id, timeout=20)
    assert (done.status, done.attempts) == ("failed", settings.retry.max_tries)
    [record] = await client.store.list_failures(task_id=task.task_id)
    assert record.code == "simulated_transient" and record.fix


async def test_permanent_errors_fail_at_once(client: Client) -> None:
    task = await client.enqueue("engine.fail", {"message": "disk on fire", "target": "srv-9"})
    done = await client.wait(task.task_id, timeout=20)
    assert (done.status, done.attempts) == ("failed", 1)
    assert done.error is not None and done.error["message"] == "disk on fire"
    [record] = await client.store.list_failures(operation="engine.fail")
    assert (record.task_id, record.target, record.category) == (task.task_id, "srv-9", "engine")
    assert record.cause and record.fix


async def test_defer(client: Client) -> None:
    task = await client.enqueue("engine.echo", {"value": 1}, defer=1.0)
    done = await client.wait(task.task_id, timeout=20)
    assert done.started_at is not None
    assert (done.started_at - done.enqueued_at).total_seconds() >= 0.95


async def test_plain_arq_clients_sign_with_the_helper(
    client: Client, settings: Settings, worker: WorkerProcess
) -> None:
    pool = await create_pool(
        RedisSettings.from_dsn(settings.redis_url),
        job_serializer=serialization.dumps, job_deserializer=serialization.loads,
        default_queue_name=settings.redis.queue,
    )
    args = {"seconds": 0.01}
    clear = {"value": "a secret in clear"}
    try:
        await pool.enqueue_job("engine.sleep", args, _job_id="plain-1",
                               **await arq_signature(settings, "engine.sleep", "plain-1", args))
        # Signed, but a declared secret in clear: only the client seals, so it is refused.
        await pool.enqueue_job("engine.echo", clear, _job_id="plain-2",
                               **await arq_signature(settings, "engine.echo", "plain-2", clear))
    finally:
        await pool.aclose()
    # No row was written first: it appears when the worker takes the job.
    await wait_for(lambda: client.store.get_task("plain-1"), timeout=20)
    done = await client.wait("plain-1", timeout=20)
    assert (done.status, done.result, done.name) == ("succeeded", 0.01, "engine.sleep")
    await wait_for(lambda: client.store.get_task("plain-2"), timeout=20)
    done = await client.wait("plain-2", timeout=20)
    assert done.status == "failed" and done.error is not None
    assert done.error["code"] == "secret_not_sealed"
    assert "a secret in clear" not in json.dumps(done.to_json())


async def test_unsigned_or_altered_jobs_are_refused_and_recorded(
    client: Client, settings: Settings, worker: WorkerProcess, tmp_path: Path
) -> None:
    """Whoever can write to Redis cannot run a job: one without the engine's HMAC (key
    in the HSM), or with another job's, is refused, recorded, and never runs."""
    pool = await create_pool(
        RedisSettings.from_dsn(settings.redis_url),
        job_serializer=serialization.dumps, job_deserializer=serialization.loads,
        default_queue_name=settings.redis.queue,
    )
    real = await client.enqueue("engine.sleep", {"seconds": 0.01})
    await client.wait(real.task_id, timeout=20)
    signature = (await client.store.get_task(real.task_id)).signature
    assert signature
    try:
        await pool.enqueue_job("engine.fail", {"message": "x"}, _job_id="forged-1")
        await pool.enqueue_job("engine.sleep", {"seconds": 0.01}, _job_id="forged-2",
                               dew_sig="bm90IGEgc2lnbmF0dXJl")
        # A real signature copied onto other arguments, and onto another task id.
        await pool.enqueue_job("engine.sleep", {"seconds": 0.02}, _job_id=real.task_id + "x",
                               dew_sig=signature)
    finally:
        await pool.aclose()

    async def refused() -> list[Any]:
        records = await client.store.list_failures(operation="engine.sleep")
        records += await client.store.list_failures(operation="engine.fail")
        return records if len(records) == 3 else []

    records = await wait_for(refused, timeout=20)
    assert {r.code for r in records} == {"job_not_signed"}
    assert {r.category for r in records} == {"security"}
    for task_id in ("forged-1", "forged-2", real.task_id + "x"):
        assert await client.store.get_task(task_id) is None  # never ran, no row
    assert (await client.store.get_task(real.task_id)).status == "succeeded"  # left alone


class Exploit:
    """Unpickling this runs a command: what a pickle-based worker would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


async def test_pickled_payloads_are_rejected(
    client: Client, settings: Settings, tmp_path: Path, worker: WorkerProcess
) -> None:
    marker = tmp_path / "pwned"
    pool = await create_pool(  # arq's pickle default
        RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.redis.queue
    )
    try:
        await pool.enqueue_job("engine.echo", {"value": Exploit(marker)}, _job_id="evil")
        await pool.enqueue_job("engine.echo", {"value": 1}, _job_id="pickled")

        async def gone() -> bool:
            return not await pool.exists("arq:job:evil", "arq:job:pickled")

        await wait_for(gone, timeout=20)
        # Dropped unread; arq keeps no result (keep_result=0), so no copy either.
        assert await pool.keys("arq:result:*") == []
    finally:
        await pool.aclose()
    assert not marker.exists()
    assert await client.store.get_task("evil") is None
    assert await client.store.get_task("pickled") is None
    # The worker is still healthy.
    task = await client.enqueue("engine.echo", {"value": 2})
    assert (await client.wait(task.task_id, timeout=20)).status == "succeeded"
    assert "refused a pickled payload" in settings.log_file.read_text()


async def test_every_job_log_line_carries_task_id_and_job(
    client: Client, settings: Settings, worker: WorkerProcess
) -> None:
    task = await client.enqueue("engine.flaky", {"failures": 1})
    await client.wait(task.task_id, timeout=20)
    worker.stop()
    lines = [json.loads(line) for line in settings.log_file.read_text().splitlines()]
    job_lines = [line for line in lines if line.get("logger") == "dew.job"]
    assert len(job_lines) >= 4  # started, retried, started, succeeded
    assert all(line["task_id"] == task.task_id and line["job"] == "engine.flaky"
               for line in job_lines)
