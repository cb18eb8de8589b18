"""What a handler gets besides its arguments: identity of the run, logging, records.

A handler is a domain operation; it must be idempotent (arq may run a job more
than once). It raises an engine error to fail the whole task, or calls
``record_failure`` for one target of several and carries on with the others.
A job registered ``cancellable`` calls ``check_cancelled`` at its safe points
(between two targets, never inside one target's change): once ``dew tasks cancel``
asked, it raises ``TaskCancelled`` there and the task ends ``cancelled``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.errors import Conflict, DewError, TaskCancelled
from engine.models import CancelRequest, FailureRecord, Fence, iso
from engine.resources import Resources
from engine.settings import Settings
from engine.store import TaskStore

# How stale a handler's view of a cancel request may be: a safe point reads the task
# store at most this often (a 50-server batch asks once per server).
CANCEL_POLL_SECONDS = 0.2


@dataclass
class JobContext:
    task_id: str
    name: str
    attempt: int
    settings: Settings
    store: TaskStore
    log: Any  # a structlog BoundLogger with task_id and job bound
    clock: Callable[[], datetime]
    resources: Resources
    failures: list[FailureRecord] = field(default_factory=list)
    fence: Fence | None = None  # this run's claim on the task (engine.models.Fence)
    # The request to stop (None: none seen yet), and when the store was last asked
    # (monotonic seconds): the runner fills both from the row it claimed.
    cancel: CancelRequest | None = None
    cancel_read_at: float = float("-inf")
    _cancel_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    def now(self) -> datetime:
        return self.clock()

    async def cancel_requested(self, max_age: float = CANCEL_POLL_SECONDS) -> bool:
        """Whether ``dew tasks cancel`` asked this task to stop. The store is read at
        most once per ``max_age`` seconds, however many coroutines ask (a batch asks
        once per target), so a safe point costs nothing most of the time."""
        if self.cancel is not None:
            return True
        async with self._cancel_lock:
            if time.monotonic() - self.cancel_read_at >= max_age:
                self.cancel = await self.store.cancel_request(self.task_id)
                self.cancel_read_at = time.monotonic()
        return self.cancel is not None

    async def check_cancelled(self, result: Any = None) -> None:
        """A safe point: raise ``TaskCancelled`` (carrying ``result``, what was done so
        far) when a cancel was requested; else return at once."""
        if await self.cancel_requested():
            raise self.cancelled(result)

    def cancelled(self, result: Any = None) -> TaskCancelled:
        """The error that ends this task ``cancelled`` (for a handler that stops its
        targets itself and reports them, instead of raising at the first safe point)."""
        request = self.cancel
        who = f" by {request.by}" if request is not None and request.by else ""
        return TaskCancelled(
            f"task {self.task_id} was cancelled{who}: it stopped at a safe point",
            result=result,
            cause=f"cancel requested at {iso(request.at)}" if request is not None else "",
            fix="Enqueue the job again to do the rest.",
        )

    async def check_owner(self) -> None:
        """Raise unless this run still holds its task: call it before a side effect, so
        a run whose worker stalled and was taken over stops instead of acting twice."""
        if self.fence is not None and not await self.store.holds(self.task_id, self.fence):
            raise Conflict(
                f"task {self.task_id} was taken over by another run; this one stops",
                cause="this worker stopped answering (its heartbeat lapsed) and another "
                "worker claimed the task",
                code="run_taken_over",
            )

    async def record_failure(self, target: str | None, error: DewError) -> FailureRecord:
        """Write a failure record for one target; the task itself may still succeed."""
        await self.check_owner()
        record = failure_record(self.task_id, self.name, target, error, self.now())
        await self.store.add_failure(record)
        self.failures.append(record)
        self.log.warning("target failed", target=target, code=error.code, error=error.message)
        return record


def failure_record(
    task_id: str, operation: str, target: str | None, error: DewError, now: datetime
) -> FailureRecord:
    return FailureRecord(
        failure_id=uuid.uuid4().hex,
        task_id=task_id,
        operation=operation,
        target=target if target is not None else error.target,
        category=error.category,
        code=error.code,
        error=error.message,
        cause=error.cause,
        fix=error.fix,
        created_at=now,
    )
