"""The engine's async client: enqueue jobs through the outbox, wait for them.

    async with await Client.open() as client:
        task = await client.enqueue("engine.echo", {"value": 1})
        done = await client.wait(task.task_id, timeout=30)

``enqueue`` writes the task row (queued) first and pushes the job to arq with
``_job_id`` = task id second. If the push fails (Redis down) the task is still
safe in the store and the sweeper delivers it later; the same task id twice
returns the existing task and never runs it twice. Secret arguments are sealed
under a KMS key (``engine.sealing``) before either write.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import uuid
from datetime import timedelta
from types import TracebackType
from typing import Any

from engine.errors import BackendUnavailable, Conflict, InvalidInput, NotFound, TransientError
from engine.job_signing import JobSigner
from engine.logs import get_logger
from engine.models import TaskRecord, TaskStatus, not_failed, project_of, retryable, utcnow
from engine.queue import Queue
from engine.redaction import contains_redacted, keep_sealed, redact
from engine.registry import JobSpec, Registry, default_registry
from engine.resources import Resources
from engine.sealing import (
    SealBinding,
    has_sealed,
    job_account,
    needs_sealing,
    seal_args,
    unseal_args,
)
from engine.settings import Settings, load_settings
from engine.store import TaskStore, cancel_task, open_store

TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_DEFER = 366 * 24 * 3600
MAX_ARGS_BYTES = 256 * 1024

log = get_logger("dew.client")


def new_task_id() -> str:
    return uuid.uuid4().hex


def check_task_id(task_id: str) -> str:
    if not TASK_ID.match(task_id):
        raise InvalidInput(
            f"invalid task id {task_id!r}: use 1-128 letters, digits, '.', '_', ':' or '-'"
        )
    return task_id


def check_defer(defer: float | None) -> float | None:
    if defer is None:
        return None
    if not math.isfinite(defer) or defer < 0 or defer > MAX_DEFER:
        raise InvalidInput(f"--defer must be between 0 and {MAX_DEFER} seconds, got {defer}")
    return defer


MAX_ARGS_DEPTH = 32


def _depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests, counting no further than ``limit`` + 1 (no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > limit:
            break
        children = item.values() if isinstance(item, dict) else (
            item if isinstance(item, list) else ())
        stack.extend((child, level + 1) for child in children)
    return deepest


def check_json_args(args: Any) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise InvalidInput("job arguments must be a JSON object")
    if _depth(args, MAX_ARGS_DEPTH) > MAX_ARGS_DEPTH:
        raise InvalidInput(f"job arguments nest deeper than {MAX_ARGS_DEPTH} levels")
    try:
        size = len(json.dumps(args))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"job arguments are not JSON: {exc}") from None
    if size > MAX_ARGS_BYTES:
        raise InvalidInput(f"job arguments are {size} bytes; the limit is {MAX_ARGS_BYTES}")
    return args


class Client:
    def __init__(
        self, settings: Settings, store: TaskStore, queue: Queue | None, registry: Registry
    ) -> None:
        self.settings = settings
        self.store = store
        self._queue = queue
        self.registry = registry
        self.resources = Resources(settings)

    @classmethod
    async def open(
        cls, settings: Settings | None = None, registry: Registry | None = None
    ) -> Client:
        """Open the task store; Redis is connected on the first enqueue."""
        settings = settings or load_settings()
        store = await open_store(settings)
        return cls(settings, store, None, registry or default_registry(settings))

    async def close(self) -> None:
        await self.resources.close()
        if self._queue is not None:
            await self._queue.close()
        await self.store.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def queue(self) -> Queue:
        if self._queue is None:
            self._queue = await Queue.connect(self.settings)
        return self._queue

    async def enqueue(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        task_id: str | None = None,
        defer: float | None = None,
        project: str | None = None,
    ) -> TaskRecord:
        """Record the task, then push it to the queue. Bad input raises InvalidInput
        (or UnknownJob) and writes nothing. ``project``: the project (name) the task
        belongs to (the API's caller); by default the job's ``account`` argument, else
        ``default``. The same task id again is the same task only in its own project."""
        args = check_json_args({} if args is None else args)
        spec = self.registry.check_args(name, args)
        task_id = check_task_id(task_id) if task_id is not None else new_task_id()
        defer = check_defer(defer)
        args, stored_args, signature = await self._sealed_and_signed(spec, task_id, args)

        now = utcnow()
        due_at = now + timedelta(seconds=defer or 0)
        project = project or project_of(args)
        task, created = await self.store.create_task(task_id, name, stored_args, now, due_at,
                                                     signature, project)
        if not created:
            if task.project != project:
                # Another project's task: say nothing about it but that the id is taken.
                raise InvalidInput(f"task id {task_id} is already used",
                                   fix="Use a new task id.")
            # Sealed values differ at each sealing: compare what can be compared.
            if task.name != name or redact(task.args) != redact(stored_args):
                raise InvalidInput(
                    f"task id {task_id} is already used by another job ({task.name})",
                    fix="Use a new task id, or the same name and arguments to get that task.",
                )
            if task.final:
                return task
        try:
            queue = await self.queue()
            await queue.push(task_id, name, args, due_at if defer else None, signature)
        except BackendUnavailable as exc:
            # The outbox row is the promise: the sweeper delivers it when Redis is back.
            log.warning("job not pushed to Redis; the sweeper will deliver it",
                        task_id=task_id, job=name, error=exc.message)
        return task

    async def _sealed_and_signed(
        self, spec: JobSpec, task_id: str, args: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], str]:
        """(args to push, args to store, signature) of a task about to be written."""
        if needs_sealing(args, spec.secret_fields):
            # Secrets leave this process only sealed under a KMS key (Redis and the
            # task store see ciphertext); the worker opens them.
            binding = SealBinding(task_id, spec.name, job_account(args))
            args = await seal_args(args, spec.secret_fields, await self.resources.get("sealer"),
                                   binding)
        stored_args = keep_sealed(args, spec.secret_fields)
        # Proof for the worker that an enqueuer holding the HSM PIN made this job.
        signer: JobSigner = await self.resources.get("job_signer")
        return args, stored_args, await signer.sign(spec.name, task_id, stored_args)

    async def get(self, task_id: str, project: str | None = None) -> TaskRecord:
        task = await self.store.get_task(task_id, project)
        if task is None:
            raise NotFound(f"no task with id {task_id!r}", target=task_id)
        return task

    async def retry(self, task_id: str, by: str, project: str | None = None) -> TaskRecord:
        """Run a failed task again, once its cause is fixed: a **new task** (new id,
        ``retry_of`` = ``task_id``, same job, arguments and project) is enqueued, and
        the failed task's failure records note when, by whom (``by``) and as which
        task. A task is retried at most once (retry the new one if it fails too).

        NotFound: no such task (in ``project``, when given). Conflict: the task did not
        fail, was retried already, or its secret arguments are gone (a final task row
        keeps no sealed value: enqueue the job again with them)."""
        task = await self.get(task_id, project)
        reported = any(f.retried_at is None
                       for f in await self.store.list_failures(task_id=task_id, limit=1000))
        if not retryable(task.status, reported):
            raise Conflict(not_failed(task_id, task.status), code="task_not_failed",
                           target=task_id)
        spec = self.registry.get(task.name)
        args = dict(task.args)
        if contains_redacted(args) or needs_sealing(args, spec.secret_fields):
            raise Conflict(
                f"task {task_id} cannot be retried: its secret arguments are gone (its "
                "failure records were deleted)", code="secret_lost", target=task_id,
                fix=f"Enqueue {task.name} again with its arguments.")
        if has_sealed(args):
            # Sealed for the failed task: opened here and sealed again for the new one.
            args = await unseal_args(args, await self.resources.get("sealer"),
                                     SealBinding(task_id, task.name, job_account(args)))
        self.registry.check_args(task.name, args)
        new_id = new_task_id()
        args, stored_args, signature = await self._sealed_and_signed(spec, new_id, args)
        retry = await self.store.create_retry(new_id, task_id, task.name, stored_args, utcnow(),
                                              signature, task.project, by)
        log.info("task retried", task_id=task_id, retry_task_id=new_id, job=task.name, by=by)
        try:
            queue = await self.queue()
            await queue.push(new_id, task.name, args, None, signature)
        except BackendUnavailable as exc:
            log.warning("job not pushed to Redis; the sweeper will deliver it",
                        task_id=new_id, job=task.name, error=exc.message)
        return retry

    async def cancel(self, task_id: str, by: str, project: str | None = None) -> TaskRecord:
        """Cancel a task for ``by``. A queued or deferred one is ``cancelled`` at once
        (it never runs). A running one of a job registered ``cancellable`` gets a cancel
        request (``cancel_requested_at``/``_by``) and is returned still running: its
        handler stops at its next safe point, and the task ends ``cancelled``.

        NotFound: no such task (in ``project``). Conflict: running a job without safe
        points (it ends by itself), or ended."""
        task = await cancel_task(self.store, task_id, by, project,
                                 lambda: self.registry.cancellable())
        log.info("task cancelled" if task.final else "task cancel requested",
                 task_id=task_id, job=task.name, by=by)
        return task

    async def wait(
        self, task_id: str, timeout: float | None = None, poll: float = 0.05,
        require_worker: bool = False,
    ) -> TaskRecord:
        """Wait until the task ended; return its final record.

        Raises NotFound for an unknown id and TransientError (code ``wait_timeout``)
        when ``timeout`` passes; the task goes on. With ``require_worker`` (the CLI),
        a task not running while no worker has had a heartbeat for
        ``worker.heartbeat_timeout`` seconds (or at the timeout) raises
        BackendUnavailable (code ``no_worker``): nothing would run it.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = poll
        grace = self.settings.worker.heartbeat_timeout
        no_worker_since: float | None = None
        next_check = loop.time()
        while True:
            task = await self.get(task_id)
            if task.final:
                return task
            now = loop.time()
            timed_out = deadline is not None and now >= deadline
            if require_worker and (timed_out or now >= next_check):
                next_check = now + 1.0
                if await self.live_worker():
                    no_worker_since = None
                elif no_worker_since is None:
                    no_worker_since = now
                idle = no_worker_since is not None and task.status != "running"
                if idle and (timed_out or now - (no_worker_since or now) >= grace):
                    waited = f" after {timeout} s" if timed_out else ""
                    raise BackendUnavailable(
                        f"task {task_id} is still {task.status}{waited}: no worker is "
                        "running: start one with `make up` (or `dew worker`)",
                        code="no_worker", target=task_id,
                        fix=f"The task is kept: once a worker runs it, `dew tasks show "
                            f"{task_id}` shows how it ended.")
            if timed_out:
                raise TransientError(
                    f"task {task_id} is still {task.status} after {timeout} s",
                    code="wait_timeout",
                    fix=f"Wait longer, or look later with `dew tasks show {task_id}`.",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def live_worker(self) -> bool:
        """Whether some worker had a heartbeat within ``worker.heartbeat_timeout``."""
        since = utcnow() - timedelta(seconds=self.settings.worker.heartbeat_timeout)
        return bool(await self.store.live_workers(since))

    async def list_tasks(
        self, status: TaskStatus | None = None, name: str | None = None, limit: int = 100,
        project: str | None = None,
    ) -> list[TaskRecord]:
        return await self.store.list_tasks(status=status, name=name, limit=limit,
                                           project=project)

