"""The records the engine keeps: tasks, failure records, workers.

Their ``to_json`` shapes are the public JSON contract of ``dew tasks`` and
``dew failures`` (see the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from engine.redaction import redact

TaskStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TASK_STATUSES: tuple[TaskStatus, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
# A cancelled task (``dew tasks cancel``) never runs again: a worker it is delivered to
# skips it. A running one is cancelled at its handler's next safe point, if it has any.
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# The project of a task enqueued without one and whose arguments name no account.
DEFAULT_PROJECT = "default"


def project_of(args: Any) -> str:
    """The project a job acts for when none is given: its ``account`` argument, else
    ``default`` (the same rule as the sealing binding's account)."""
    account = args.get("account") if isinstance(args, dict) else None
    return account if isinstance(account, str) and account else DEFAULT_PROJECT


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime | None) -> str | None:
    """Timestamps are stored as ISO 8601 UTC with microseconds, so text order is time order."""
    if ts is None:
        return None
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def parse_iso(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def retryable(status: str, reported_failures: bool) -> bool:
    """A task can be retried once it failed, or once it ended having reported failed
    targets (a bind whose servers failed) that no retry took over yet."""
    return status == "failed" or (status == "succeeded" and reported_failures)


def not_failed(task_id: str, status: str) -> str:
    """Why a task that did not fail cannot be retried."""
    return (f"task {task_id} is {status}, not failed: only a failed task (or one that "
            "reported failed targets) can be retried"
            + (" (it has not ended yet)" if status in ("queued", "running") else ""))


@dataclass(frozen=True)
class Fence:
    """One run's claim on its task: the worker and the attempt number it claimed. A
    run's writes hold only while the row still shows this claim, so a run that
    another worker took over (its worker stalled) can no longer write."""

    worker_id: str
    attempt: int


@dataclass(frozen=True)
class CancelRequest:
    """Someone asked a running task to stop at its handler's next safe point (``dew
    tasks cancel``): when, and who. Kept on the task row, so every worker sees it."""

    at: datetime
    by: str


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    name: str
    args: dict[str, Any]
    status: TaskStatus
    attempts: int
    enqueued_at: datetime
    due_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: Any
    error: dict[str, Any] | None
    worker_id: str | None
    signature: str | None = None  # engine.job_signing: proof of the enqueuer (not shown)
    # The project (name) that enqueued it: the API shows a task to that project only.
    project: str = DEFAULT_PROJECT
    retry_of: str | None = None  # the failed task this one retries (``dew tasks retry``)
    # ``dew tasks cancel``: when and by whom (a running task stops at its next safe point).
    cancel_requested_at: datetime | None = None
    cancel_requested_by: str | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def cancel_request(self) -> CancelRequest | None:
        if self.cancel_requested_at is None:
            return None
        return CancelRequest(self.cancel_requested_at, self.cancel_requested_by or "")

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "name": self.name,
            "args": redact(self.args),  # sealed values are shown redacted too
            "status": self.status,
            "attempts": self.attempts,
            "enqueued_at": iso(self.enqueued_at),
            # When it runs (or ran) at the earliest: later than enqueued_at when
            # deferred, or when waiting for its next retry.
            "due_at": iso(self.due_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "result": self.result,
            "error": self.error,
            "project": self.project,
            "retry_of": self.retry_of,
            "cancel_requested_at": iso(self.cancel_requested_at),
            "cancel_requested_by": self.cancel_requested_by,
        }


@dataclass(frozen=True)
class FailureRecord:
    failure_id: str
    task_id: str
    operation: str
    target: str | None
    category: str
    code: str
    error: str
    cause: str
    fix: str
    created_at: datetime
    # Set when its task was retried: when, by whom, and the new task.
    retried_at: datetime | None = None
    retried_by: str | None = None
    retry_task_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "failure_id": self.failure_id,
            "task_id": self.task_id,
            "operation": self.operation,
            "target": self.target,
            "category": self.category,
            "code": self.code,
            "error": self.error,
            "cause": self.cause,
            "fix": self.fix,
            "created_at": iso(self.created_at),
            "retried_at": iso(self.retried_at),
            "retried_by": self.retried_by,
            "retry_task_id": self.retry_task_id,
        }


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
