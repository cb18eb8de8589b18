"""The task store interface: the source of truth for tasks and failure records.

Redis is only a transport; what a task is, how often it ran and how it ended
lives here. The engine talks to the store only through ``TaskStore``;
``open_store`` opens ``engine.sqlite_store``'s on the backend ``[store] url`` names:
the SQLite file (the default) or a PostgreSQL database shared by several nodes
(``engine.sql_db``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, Protocol

from engine.errors import Conflict, TaskCancelled
from engine.models import (
    DEFAULT_PROJECT,
    CancelRequest,
    FailureRecord,
    Fence,
    TaskRecord,
    TaskStatus,
    WorkerRecord,
    utcnow,
)
from engine.resources import Closer, Resources, resource
from engine.settings import Settings


class TaskStore(Protocol):
    async def close(self) -> None: ...

    # tasks
    async def create_task(
        self, task_id: str, name: str, args: dict[str, Any], now: datetime, due_at: datetime,
        signature: str | None = None, project: str = DEFAULT_PROJECT,
    ) -> tuple[TaskRecord, bool]:
        """Insert a queued task; return it and whether it is new (else the existing row)."""

    async def create_retry(
        self, task_id: str, retry_of: str, name: str, args: dict[str, Any], now: datetime,
        signature: str | None, project: str, retried_by: str,
    ) -> TaskRecord:
        """Insert the queued task ``task_id`` retrying the failed task ``retry_of`` and
        note on ``retry_of``'s failure records when and by whom, in one transaction.
        Conflict when ``retry_of`` is not failed or was retried already."""

    async def get_task(self, task_id: str, project: str | None = None) -> TaskRecord | None:
        """The task; None when unknown or (``project`` given) another project's."""

    async def list_tasks(
        self, status: TaskStatus | None = None, name: str | None = None, limit: int = 100,
        project: str | None = None, since: datetime | None = None,
        until: datetime | None = None, marker: str | None = None,
    ) -> list[TaskRecord]:
        """Newest first; ``since``/``until`` bound ``enqueued_at`` (until: exclusive);
        ``marker``: start after that task (NotFound if it is not in the listing's scope)."""

    async def unfinished_tasks(self, limit: int = 10_000) -> list[TaskRecord]: ...

    async def cancel_task(
        self, task_id: str, error: dict[str, Any], now: datetime, project: str | None = None,
        by: str = "", cancellable: Collection[str] = (),
    ) -> TaskRecord:
        """Cancel a task for ``by``. Queued (or deferred): marked cancelled with
        ``error``, it never runs. Running a job named in ``cancellable`` (one whose
        handler has safe points): a cancel request (``now``, ``by``) is recorded and the
        task is returned still running; it stops at its next safe point. NotFound: no
        such task (in ``project``); Conflict: running a job without safe points, or ended."""

    async def cancel_request(self, task_id: str) -> CancelRequest | None:
        """Whether someone asked the task to stop (a handler's safe point reads it)."""

    async def mark_cancelled(
        self, task_id: str, error: dict[str, Any], result: Any, now: datetime,
        args: dict[str, Any] | None = None, fence: Fence | None = None,
    ) -> bool:
        """End a run that stopped at a safe point on request: ``cancelled``, keeping
        ``result`` (what it did before it stopped); no failure record. Fenced like
        ``mark_succeeded``."""

    async def task_ids_by_prefix(
        self, prefix: str, project: str | None = None, limit: int = 10,
    ) -> list[str]:
        """Up to ``limit`` task ids starting with ``prefix`` (``dew tasks show PREFIX``)."""

    async def failure_ids_by_prefix(
        self, prefix: str, project: str | None = None, limit: int = 10,
    ) -> list[str]:
        """Up to ``limit`` failure record ids starting with ``prefix``."""

    async def mark_running(
        self,
        task_id: str,
        name: str,
        args: dict[str, Any],
        worker_id: str,
        now: datetime,
        enqueued_at: datetime,
        signature: str | None = None,
        live_since: datetime | None = None,
    ) -> tuple[TaskRecord, bool]:
        """Claim the task: count one more attempt and mark it running under
        ``worker_id``; create the row if a plain arq client enqueued the job. Not
        claimed (False) when it is final, or running under a worker whose heartbeat
        is newer than ``live_since``: the row is returned unchanged."""

    async def mark_succeeded(
        self, task_id: str, result: Any, now: datetime, args: dict[str, Any] | None = None,
        fence: Fence | None = None,
    ) -> bool:
        """``args``: what the row keeps from now on (sealed values dropped), if given.
        With a ``fence``, only while the row still shows that run's claim; False if not."""

    async def mark_retrying(
        self, task_id: str, error: dict[str, Any], due_at: datetime, now: datetime,
        fence: Fence | None = None,
    ) -> bool: ...

    async def mark_failed(
        self, task_id: str, error: dict[str, Any], failure: FailureRecord | None, now: datetime,
        args: dict[str, Any] | None = None, fence: Fence | None = None,
    ) -> bool:
        """Mark the task failed and write its failure record, in one transaction."""

    async def release_claim(self, task_id: str, fence: Fence) -> bool:
        """Put a cancelled run's task back to queued, if the run still holds it."""

    async def holds(self, task_id: str, fence: Fence) -> bool:
        """Whether the task still shows ``fence``'s claim."""

    async def set_busy_timeout(self, ms: int) -> None: ...

    # failure records
    async def add_failure(self, failure: FailureRecord) -> None: ...

    # A failure record belongs to its task's project (one with no task row, e.g. a
    # refused unsigned job, to none: only an unfiltered listing shows it).
    async def list_failures(
        self, operation: str | None = None, task_id: str | None = None, limit: int = 100,
        project: str | None = None, marker: str | None = None,
    ) -> list[FailureRecord]: ...

    async def get_failure(
        self, failure_id: str, project: str | None = None,
    ) -> FailureRecord | None: ...

    async def delete_failure(self, failure_id: str, project: str | None = None) -> bool: ...

    async def delete_all_failures(
        self, project: str | None = None, operation: str | None = None,
    ) -> int: ...

    # workers
    async def heartbeat(self, worker: WorkerRecord) -> None: ...

    async def remove_worker(self, worker_id: str) -> None: ...

    async def live_workers(self, since: datetime) -> set[str]: ...


async def cancel_task(
    store: TaskStore, task_id: str, by: str, project: str | None,
    cancellable: Callable[[], Collection[str]],
) -> TaskRecord:
    """``dew tasks cancel``: a queued task is cancelled at once; a running one of a job
    with safe points is asked to stop (``TaskStore.cancel_task``). ``cancellable``
    names those jobs; it loads the job registry, so it is called only for a running
    task (a queued one is cancelled without importing every service)."""
    error = TaskCancelled(f"task {task_id} was cancelled by {by}").to_dict()
    task = await store.get_task(task_id, project)
    running = task is not None and task.status == "running"
    try:
        return await store.cancel_task(task_id, error, utcnow(), project, by=by,
                                       cancellable=cancellable() if running else ())
    except Conflict:
        now = await store.get_task(task_id, project)
        if running or now is None or now.status != "running":
            raise
        # It started between the two reads: ask again, knowing the jobs.
        return await store.cancel_task(task_id, error, utcnow(), project, by=by,
                                       cancellable=cancellable())


async def open_store(settings: Settings) -> TaskStore:
    """Open (and create or migrate) the task store named by the settings."""
    from engine.sqlite_store import SqliteTaskStore

    return await SqliteTaskStore.open(settings.store_target)


@resource("task_store")
async def _task_store_resource(resources: Resources) -> tuple[TaskStore, Closer]:
    """A task-store connection of the process's own, for services that read tasks and
    failure records (the API's task lists, a schedule's firings)."""
    store = await open_store(resources.settings)
    return store, store.close
