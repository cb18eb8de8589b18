"""TaskRunner: the task lifecycle around a handler, with a real store and no Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from engine.context import JobContext
from engine.errors import PermanentError, TransientError
from engine.job_signing import JobSigner
from engine.models import utcnow
from engine.redaction import REDACTED
from engine.registry import JobSpec, Registry
from engine.runner import RunOutcome, TaskRunner, stored_form
from engine.settings import Settings
from engine.sqlite_store import SqliteTaskStore

jobs = Registry()
calls: list[str] = []


@jobs.job("t.ok")
async def ok(ctx: JobContext, args: dict[str, Any]) -> Any:
    calls.append(ctx.task_id)
    return {"got": args, "attempt": ctx.attempt}


@jobs.job("t.transient")
async def transient(ctx: JobContext, args: dict[str, Any]) -> None:
    raise TransientError("backend hiccup", cause="test")


@jobs.job("t.permanent")
async def permanent(ctx: JobContext, args: dict[str, Any]) -> None:
    raise PermanentError("no such server", cause="c", fix="f", target="srv-1", code="x")


@jobs.job("t.bug")
async def bug(ctx: JobContext, args: dict[str, Any]) -> None:
    raise KeyError("oops")


@jobs.job("t.not_json")
async def not_json(ctx: JobContext, args: dict[str, Any]) -> Any:
    return {1, 2}


@jobs.job("t.value_error")
async def value_error(ctx: JobContext, args: dict[str, Any]) -> Any:
    raise ValueError("bad value inside the handler")


@jobs.job("t.partial")
async def partial(ctx: JobContext, args: dict[str, Any]) -> dict[str, int]:
    for target in ("a", "b"):
        await ctx.record_failure(target, PermanentError(f"{target} refused", category="ssh"))
    return {"ok": 1, "failed": 2}


@jobs.job("t.secret", secret_fields=("value",))
async def secret(ctx: JobContext, args: dict[str, Any]) -> str:
    return "done"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteTaskStore]:
    s = await SqliteTaskStore.open(tmp_path / "dew.sqlite3")
    yield s
    await s.close()


class SigningRunner(TaskRunner):
    """A runner whose jobs arrive signed, as the client signs them."""

    async def run(self, spec: JobSpec, task_id: str, args: Any,
                  enqueued_at: datetime | None = None, signature: Any = None) -> RunOutcome:
        signer: JobSigner = await self.resources.get("job_signer")
        signature = await signer.sign(spec.name, task_id, stored_form(spec, args))
        return await super().run(spec, task_id, args, enqueued_at, signature)


@pytest.fixture
async def runner(settings: Settings, store: SqliteTaskStore) -> AsyncIterator[TaskRunner]:
    signing = SigningRunner(settings, store, "w-test", rand=lambda: 0.0)
    yield signing
    await signing.resources.close()


async def test_an_unsigned_job_is_refused_and_recorded(
    settings: Settings, store: SqliteTaskStore
) -> None:
    plain = TaskRunner(settings, store, "w-test")
    calls.clear()
    try:
        outcome = await plain.run(jobs.get("t.ok"), "t-unsigned", {"a": 1})
    finally:
        await plain.resources.close()
    assert outcome.status == "refused" and calls == []
    assert await store.get_task("t-unsigned") is None
    [record] = await store.list_failures(task_id="t-unsigned")
    assert (record.code, record.category) == ("job_not_signed", "security")


async def test_success_records_result(runner: TaskRunner, store: SqliteTaskStore) -> None:
    outcome = await runner.run(jobs.get("t.ok"), "t1", {"a": 1})
    assert outcome.status == "succeeded"
    task = await store.get_task("t1")
    assert task is not None
    assert (task.status, task.attempts, task.result) == ("succeeded", 1, {"got": {"a": 1},
                                                                         "attempt": 1})
    assert task.started_at and task.finished_at


async def test_finished_task_is_not_run_again(runner: TaskRunner) -> None:
    calls.clear()
    await runner.run(jobs.get("t.ok"), "t2", {})
    again = await runner.run(jobs.get("t.ok"), "t2", {})
    assert again.status == "skipped" and calls == ["t2"]


async def test_transient_retries_with_backoff_then_fails(
    runner: TaskRunner, store: SqliteTaskStore, settings: Settings
) -> None:
    delays = []
    for _ in range(settings.retry.max_tries - 1):
        outcome = await runner.run(jobs.get("t.transient"), "t3", {})
        assert outcome.status == "retry"
        delays.append(outcome.retry_in)
        task = await store.get_task("t3")
        assert task is not None and task.status == "queued"
        assert task.error is not None and task.error["code"] == "transient_error"
    assert delays == sorted(delays) and delays[0] > 0  # exponential
    outcome = await runner.run(jobs.get("t.transient"), "t3", {})
    assert outcome.status == "failed"
    task = await store.get_task("t3")
    assert task is not None and (task.status, task.attempts) == ("failed", settings.retry.max_tries)
    [record] = await store.list_failures(task_id="t3")
    assert record.error == "backend hiccup" and record.operation == "t.transient"


async def test_permanent_fails_at_once_with_a_record(
    runner: TaskRunner, store: SqliteTaskStore
) -> None:
    assert (await runner.run(jobs.get("t.permanent"), "t4", {})).status == "failed"
    task = await store.get_task("t4")
    assert task is not None and task.attempts == 1
    [record] = await store.list_failures(task_id="t4")
    assert (record.target, record.code, record.cause, record.fix) == ("srv-1", "x", "c", "f")


async def test_unexpected_exception_is_an_internal_failure(
    runner: TaskRunner, store: SqliteTaskStore
) -> None:
    assert (await runner.run(jobs.get("t.bug"), "t5", {})).status == "failed"
    task = await store.get_task("t5")
    assert task is not None and task.error is not None
    assert task.error["code"] == "internal_error" and "KeyError" in task.error["message"]


@pytest.mark.parametrize(
    ("job", "message"),
    [("t.not_json", "returned a result that is not JSON"),
     ("t.value_error", "failed unexpectedly: ValueError")],
)
async def test_handler_bugs_are_named(
    runner: TaskRunner, store: SqliteTaskStore, job: str, message: str
) -> None:
    assert (await runner.run(jobs.get(job), job, {})).status == "failed"
    task = await store.get_task(job)
    assert task is not None and task.error is not None and message in task.error["message"]


async def test_per_target_failures_while_the_task_succeeds(
    runner: TaskRunner, store: SqliteTaskStore
) -> None:
    assert (await runner.run(jobs.get("t.partial"), "t6", {})).status == "succeeded"
    records = await store.list_failures(task_id="t6")
    assert sorted(r.target or "" for r in records) == ["a", "b"]
    assert {r.category for r in records} == {"ssh"}


async def test_bad_arguments_fail_permanently(runner: TaskRunner, store: SqliteTaskStore) -> None:
    assert (await runner.run(jobs.get("t.ok"), "t7", [1, 2])).status == "failed"
    task = await store.get_task("t7")
    assert task is not None and task.error is not None
    assert task.error["code"] == "invalid_parameter"


async def test_secret_arguments_are_redacted_in_the_row_and_a_lost_secret_fails(
    runner: TaskRunner, store: SqliteTaskStore
) -> None:
    # A declared secret that arrives in clear (not sealed by the client) is refused.
    assert (await runner.run(jobs.get("t.secret"), "t8", {"value": "s3cret"})).status == (
        "failed")
    task = await store.get_task("t8")
    assert task is not None and task.args == {"value": REDACTED}
    assert task.error is not None and task.error["code"] == "secret_not_sealed"
    # A re-delivery from the task store carries the redacted value: refuse it clearly.
    assert (await runner.run(jobs.get("t.secret"), "t9", {"value": REDACTED})).status == "failed"
    task = await store.get_task("t9")
    assert task is not None and task.error is not None and task.error["code"] == "secret_lost"


async def test_crash_loops_stop(runner: TaskRunner, store: SqliteTaskStore,
                                settings: Settings) -> None:
    now = utcnow()
    for i in range(settings.retry.max_tries + 2):  # runs that never finished (worker killed)
        await store.mark_running("t10", "t.ok", {}, f"dead-{i}", now, now)
    assert (await runner.run(jobs.get("t.ok"), "t10", {})).status == "failed"
    task = await store.get_task("t10")
    assert task is not None and task.error is not None
    assert task.error["code"] == "too_many_attempts"
