"""What a handler gets besides its arguments: identity of the run, logging, records.

A handler is a domain operation; it must be idempotent (arq may run a job more
than once). It raises an engine error to fail the whole task, or calls
``record_failure`` for one target of several and carries on with the others.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.errors import Conflict, DewError
from engine.models import FailureRecord, Fence
from engine.resources import Resources
from engine.settings import Settings
from engine.store import TaskStore


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

    def now(self) -> datetime:
        return self.clock()

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
