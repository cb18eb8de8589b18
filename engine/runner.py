"""Run one task: mark it running, call its handler, record how it ended.

This is the task lifecycle of ARCHITECTURE.md, kept out of arq so it is tested
on its own: ``TaskRunner.run`` returns a ``RunOutcome`` and the arq glue in
``engine.worker`` turns a retry into ``arq.Retry``. A task that already ended
(arq ran the job twice) is not run again. A handler that stops at a safe point on
request (``TaskCancelled``) ends its task ``cancelled``, never retried; so does a run
that would be retried, or would start, once a cancel was requested.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from engine.context import JobContext, failure_record
from engine.errors import (
    DewError,
    InternalError,
    InvalidInput,
    PermanentError,
    SecurityError,
    TaskCancelled,
    TransientError,
)
from engine.job_signing import JobSigner
from engine.lifecycle import backoff_delay, decide_outcome
from engine.logs import enabled, get_logger
from engine.models import Fence, utcnow
from engine.redaction import REDACTED, contains_redacted, is_sealed, keep_sealed, redact
from engine.registry import JobSpec
from engine.resources import Resources
from engine.sealing import SealBinding, has_sealed, job_account, unseal_args
from engine.settings import Settings
from engine.store import TaskStore

log = get_logger("dew.worker")
job_log = get_logger("dew.job")


@dataclass(frozen=True)
class RunOutcome:
    status: str  # succeeded | failed | cancelled | retry | skipped | refused
    retry_in: float = 0.0

    def summary(self, task_id: str) -> dict[str, Any]:
        return {"task_id": task_id, "status": self.status}


class TaskRunner:
    def __init__(
        self,
        settings: Settings,
        store: TaskStore,
        worker_id: str,
        resources: Resources | None = None,
        clock: Callable[[], datetime] = utcnow,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.store = store
        self.worker_id = worker_id
        self.resources = resources if resources is not None else Resources(settings)
        self.clock = clock
        self.rand = rand

    async def run(
        self, spec: JobSpec, task_id: str, args: Any, enqueued_at: datetime | None = None,
        signature: Any = None,
    ) -> RunOutcome:
        stored_args = stored_form(spec, args)
        signer: JobSigner = await self.resources.get("job_signer")
        try:
            genuine = await signer.verify(spec.name, task_id, stored_args, signature)
        except TransientError as exc:
            # The token cannot be reached (a network HSM or the p11-kit export went
            # away): the job is neither refused as forged nor run; it comes back.
            delay = backoff_delay(1, self.settings.retry.backoff_base,
                                  self.settings.retry.backoff_max, self.rand)
            log.warning("job signature not checked yet: the HSM is unavailable",
                        task_id=task_id, job=spec.name, code=exc.code, error=exc.message,
                        retry_in=round(delay, 3))
            return RunOutcome("retry", delay)
        if not genuine:
            return await self._refuse(spec, task_id, signature)
        now = self.clock()
        task, claimed = await self.store.mark_running(
            task_id, spec.name, stored_args, self.worker_id, now, enqueued_at or now, signature,
            live_since=now - timedelta(seconds=self.settings.worker.heartbeat_timeout),
        )
        if task.final:
            log.info("task already finished; not run again", task_id=task_id, job=spec.name,
                     status=task.status)
            return RunOutcome("skipped")
        if not claimed:
            # Another live run (maybe in this worker) holds it: never twice at once.
            log.warning("task is being run by another live run; not run twice",
                        task_id=task_id, job=spec.name, holder=task.worker_id)
            return RunOutcome("skipped")
        fence = Fence(self.worker_id, task.attempts)

        with structlog.contextvars.bound_contextvars(task_id=task_id, job=spec.name):
            started = time.perf_counter()
            if enabled("dew.job", logging.DEBUG):
                job_log.debug("job started", attempt=task.attempts)
            ctx = JobContext(
                task_id=task_id, name=spec.name, attempt=task.attempts, settings=self.settings,
                store=self.store, log=job_log, clock=self.clock, resources=self.resources,
                fence=fence, cancel=task.cancel_request, cancel_read_at=time.monotonic(),
            )
            result: Any = None
            error: DewError | None = None
            try:
                if ctx.cancel is not None:
                    # Asked to stop before this run began (a re-run after a crash or
                    # a shutdown, or a retry): nothing of it starts.
                    raise ctx.cancelled()
                self._check(spec, args, task.attempts)
                if has_sealed(args):
                    binding = SealBinding(task_id, spec.name, job_account(args))
                    args = await unseal_args(args, await self.resources.get("sealer"), binding)
                result = await spec.handler(ctx, args)
            except DewError as exc:
                error = exc
            except asyncio.CancelledError:
                # Shutdown or job timeout: arq re-queues the job; the claim is given back
                # so the next delivery (maybe in this worker) can run it, one more attempt.
                job_log.warning("job cancelled", attempt=task.attempts)
                with contextlib.suppress(DewError):
                    await asyncio.shield(self.store.release_claim(task_id, fence))
                raise
            except Exception as exc:  # noqa: BLE001 - any bug becomes a recorded failure
                job_log.exception("handler raised an unexpected error")
                error = InternalError(
                    f"{spec.name} failed unexpectedly: {type(exc).__name__}",
                    cause=str(exc)[:500],
                )
            else:
                error = _not_json(spec.name, result)
            if (error is not None and error.retryable
                    and task.attempts < self.settings.retry.max_tries):
                error = await _cancel_instead_of_retry(ctx, error)
            # A row that succeeded or was cancelled keeps no sealed value: nothing will
            # deliver it again. One that failed, or reported failed targets, keeps them,
            # still bound to this task, for a retry (dropped once retried or its failure
            # records deleted).
            retryable = not isinstance(error, TaskCancelled) and (
                error is not None or bool(ctx.failures))
            final_args = (redact(stored_args) if not retryable and has_sealed(stored_args)
                          else None)
            return await self._finish(
                spec, task_id, fence, result, error, time.perf_counter() - started, final_args,
            )

    @staticmethod
    def _taken_over(attempt: int) -> RunOutcome:
        """Another run claimed the task while this one ran (this worker stalled): its
        outcome is not written, and the other run's stands."""
        job_log.warning("run taken over by another worker; its outcome is not recorded",
                        attempt=attempt)
        return RunOutcome("skipped")

    async def _refuse(self, spec: JobSpec, task_id: str, signature: Any) -> RunOutcome:
        """An unsigned or altered job: recorded as a failure record, never run. Its task
        row, if one exists, is left alone (a forged copy must not end a real task)."""
        error = SecurityError(
            f"refused job {spec.name} (task {task_id}): "
            + ("it is not signed" if not signature else "its signature does not match it"),
            cause="only the engine's client (which holds the HSM PIN) signs jobs; this one "
            "was pushed into Redis by something else, or changed on the way",
            fix="Enqueue through the dew client, `dew enqueue`, or sign plain arq jobs with "
            "engine.job_signing.arq_signature.",
            code="job_not_signed",
        )
        await self.store.add_failure(failure_record(task_id, spec.name, None, error, self.clock()))
        job_log.error("job refused", task_id=task_id, job=spec.name, code=error.code,
                      error=error.message)
        return RunOutcome("refused")

    def _check(self, spec: JobSpec, args: Any, attempts: int) -> None:
        if not isinstance(args, dict):
            raise InvalidInput(f"the arguments of {spec.name} must be a JSON object")
        if contains_redacted(args):
            raise PermanentError(
                "a secret argument was sent in clear and redacted, so this run cannot use it",
                code="secret_lost",
                category="parameters",
                fix="Enqueue the job again with its secret arguments sealed by the client.",
            )
        clear = sorted(k for k in spec.secret_fields
                       if args.get(k) is not None and not is_sealed(args[k]))
        if clear:
            # Only the client seals (for this one task); a clear secret came some other way.
            raise SecurityError(
                f"the secret argument {clear[0]!r} of {spec.name} arrived in clear",
                fix="Enqueue the job through engine.Client or `dew enqueue`, which seal "
                "its secret arguments.",
                code="secret_not_sealed", target=clear[0],
            )
        # More runs than tries means the job kept killing its worker (each crash
        # re-runs it): stop instead of looping for ever.
        if attempts > self.settings.retry.max_tries + 2:
            raise PermanentError(
                f"gave up after {attempts - 1} attempts that never finished",
                code="too_many_attempts",
                fix="Look for worker crashes in the log around this task.",
            )
        if spec.validate is not None:
            spec.validate(args)

    async def _finish(
        self,
        spec: JobSpec,
        task_id: str,
        fence: Fence,
        result: Any,
        error: DewError | None,
        took: float,
        final_args: dict[str, Any] | None = None,
    ) -> RunOutcome:
        if isinstance(error, TaskCancelled):
            return await self._cancelled(spec, task_id, fence, error, took, final_args)
        attempts = fence.attempt
        retry = self.settings.retry
        outcome = decide_outcome(
            error, attempts, retry.max_tries, retry.backoff_base, retry.backoff_max, self.rand
        )
        now = self.clock()
        if outcome.action == "succeed":
            # A result is shown to anyone who may list tasks: no secret in it either.
            if not await self.store.mark_succeeded(
                    task_id, REDACTED if spec.secret_result else redact(
                        result, spec.secret_fields), now, final_args, fence):
                return self._taken_over(attempts)
            if enabled("dew.job", logging.INFO):
                job_log.info("job succeeded", attempt=attempts, ms=round(took * 1000, 1))
            return RunOutcome("succeeded")
        assert error is not None
        if outcome.action == "retry":
            if not await self.store.mark_retrying(
                    task_id, error.to_dict(), now + timedelta(seconds=outcome.delay), now, fence):
                return self._taken_over(attempts)
            job_log.warning("job will be retried", attempt=attempts, ms=round(took * 1000, 1),
                            code=error.code,
                            error=error.message, retry_in=round(outcome.delay, 3))
            return RunOutcome("retry", outcome.delay)
        if not await self.store.mark_failed(
                task_id, error.to_dict(), failure_record(task_id, spec.name, None, error, now),
                now, final_args, fence):
            return self._taken_over(attempts)
        job_log.error("job failed", attempt=attempts, ms=round(took * 1000, 1), code=error.code,
                      error=error.message,
                      retryable=error.retryable)
        return RunOutcome("failed")

    async def _cancelled(
        self, spec: JobSpec, task_id: str, fence: Fence, error: TaskCancelled, took: float,
        final_args: dict[str, Any] | None,
    ) -> RunOutcome:
        """The handler stopped at a safe point on request: ``cancelled``, with what it
        did before (its per-target results), and no failure record: a cancel is no
        failure, and any target that failed before it has its own record."""
        result = None if _not_json(spec.name, error.result) else error.result
        shown = REDACTED if spec.secret_result and result is not None else redact(
            result, spec.secret_fields)
        if not await self.store.mark_cancelled(task_id, error.to_dict(), shown, self.clock(),
                                               final_args, fence):
            return self._taken_over(fence.attempt)
        job_log.info("job cancelled at a safe point", attempt=fence.attempt,
                     ms=round(took * 1000, 1), error=error.message)
        return RunOutcome("cancelled")


async def _cancel_instead_of_retry(ctx: JobContext, error: DewError) -> DewError:
    """A run that would be retried after a cancel was requested ends cancelled instead:
    nobody wants a task they cancelled to come back."""
    if not await ctx.cancel_requested(max_age=0):
        return error
    cancelled = ctx.cancelled()
    cancelled.cause = f"{cancelled.cause}; its last try failed: {error.message}"
    return cancelled


def stored_form(spec: JobSpec, args: Any) -> dict[str, Any]:
    """The arguments as the task row keeps them (and as the job's signature covers them)."""
    if isinstance(args, dict):
        kept: dict[str, Any] = keep_sealed(args, spec.secret_fields)
        return kept
    return {"_invalid": repr(args)[:200]}


def _not_json(job: str, result: Any) -> DewError | None:
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:
        return InternalError(f"{job} returned a result that is not JSON: {exc}")
    return None
