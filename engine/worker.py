"""The worker: a thin arq wrapper that runs registered handlers and the cron table.

arq polls Redis and calls one function per job name; each of those hands the
job to ``engine.runner.TaskRunner``, which owns the task lifecycle. arq is
configured so that our code, not arq, decides retries (``max_tries`` is set
out of reach and our runner counts attempts in the task store), with JSON as
the only serializer, and with a heartbeat in the task store so the sweeper can
tell a dead worker's job from a slow one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from arq.cron import cron
from arq.worker import Retry, Worker, func

from engine import serialization
from engine.cron import ScheduleEntry, cron_table
from engine.errors import DewError
from engine.job_signing import SIGNATURE_ARG, JobSigner
from engine.logs import get_logger
from engine.models import WorkerRecord, utcnow
from engine.private import private_umask
from engine.queue import Queue, redis_settings
from engine.registry import JobSpec, Registry, default_registry
from engine.resources import Resources
from engine.runner import TaskRunner
from engine.settings import Settings
from engine.store import TaskStore, open_store

log = get_logger("dew.worker")
ARQ_MAX_TRIES = 1_000_000
HEARTBEAT_BUSY_TIMEOUT_MS = 1000  # out of reach: TaskRunner decides retries from the task store


@dataclass
class WorkerState:
    """What the worker's jobs and cron entries share, built at start-up."""

    settings: Settings
    worker_id: str
    store: TaskStore
    queue: Queue
    runner: TaskRunner
    started_at: datetime
    heartbeat_task: asyncio.Task[None] | None = None
    # Heartbeats on a connection of their own, with a short busy timeout: a busy
    # job connection must not silence a live worker (it would be taken over).
    beat_store: TaskStore | None = None
    closed: bool = False

    @property
    def resources(self) -> Resources:
        return self.runner.resources


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def arq_function(spec: JobSpec) -> Any:
    async def run(ctx: dict[str, Any], args: Any = None, **kwargs: Any) -> dict[str, Any]:
        state: WorkerState = ctx["dew"]
        signature = kwargs.pop(SIGNATURE_ARG, None)
        # Plain arq callers may pass the arguments as keywords instead of one dict.
        job_args = kwargs if args is None else args
        outcome = await state.runner.run(spec, ctx["job_id"], job_args, ctx.get("enqueue_time"),
                                         signature)
        if outcome.status == "retry":
            raise Retry(defer=outcome.retry_in)
        return outcome.summary(ctx["job_id"])

    return func(run, name=spec.name)


def arq_cron(entry: ScheduleEntry, settings: Settings) -> Any:
    async def run(ctx: dict[str, Any]) -> Any:
        try:
            return await entry.run(ctx["dew"])
        except DewError as exc:
            log.warning("scheduled job failed", schedule=entry.name, code=exc.code,
                        error=exc.message)
            return {"error": exc.to_dict()}

    return cron(
        run,
        name=f"cron:{entry.name}",
        second=set(entry.second) if entry.second is not None else None,
        minute=set(entry.minute) if entry.minute is not None else None,
        run_at_startup=entry.run_at_startup,
        timeout=settings.worker.job_timeout,
        keep_result=0,
    )


def build_worker(
    settings: Settings, registry: Registry | None = None, burst: bool = False,
    handle_signals: bool = True,
) -> Worker:
    registry = registry or default_registry(settings)
    worker_id = new_worker_id()

    async def on_startup(ctx: dict[str, Any]) -> None:
        store = await open_store(settings)
        queue = Queue(ctx["redis"], settings.redis.queue, settings.redis_url)
        state = WorkerState(
            settings=settings, worker_id=worker_id, store=store, queue=queue,
            runner=TaskRunner(settings, store, worker_id, Resources(settings)),
            started_at=utcnow(),
        )
        signer: JobSigner = await state.resources.get("job_signer")
        await signer.ready()
        state.beat_store = await open_store(settings)
        await state.beat_store.set_busy_timeout(HEARTBEAT_BUSY_TIMEOUT_MS)
        await _beat(state)
        state.heartbeat_task = asyncio.create_task(_heartbeat_loop(state))
        ctx["dew"] = state
        log.info("worker started", worker_id=worker_id, queue=settings.redis.queue,
                 jobs=len(list(registry)), max_jobs=settings.worker.max_jobs)

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        state: WorkerState | None = ctx.get("dew")
        if state is not None:
            await shutdown_state(state)

    # arq logs each job's arguments in its own lines; ours carry redacted ones.
    logging.getLogger("arq.worker").setLevel(logging.WARNING)
    return Worker(
        functions=[arq_function(spec) for spec in registry],
        cron_jobs=[arq_cron(entry, settings) for entry in cron_table(settings)],
        redis_settings=redis_settings(settings),
        queue_name=settings.redis.queue,
        burst=burst,
        max_jobs=settings.worker.max_jobs,
        poll_delay=settings.worker.poll_delay,
        job_timeout=settings.worker.job_timeout,
        # No result in Redis: arq would keep the job's arguments there; the task
        # store is the record.
        keep_result=0,
        max_tries=ARQ_MAX_TRIES,
        job_serializer=serialization.dumps,
        job_deserializer=serialization.loads,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        handle_signals=handle_signals,
        health_check_interval=max(1, int(settings.worker.heartbeat_interval * 5)),
    )


async def shutdown_state(state: WorkerState) -> None:
    """Release what the worker holds (idempotent). Every step runs even when an
    earlier one fails: an open aiosqlite connection keeps its non-daemon thread,
    and with it the whole process, alive after the worker has stopped."""
    if state.closed:
        return
    state.closed = True
    if state.heartbeat_task is not None:
        state.heartbeat_task.cancel()
    try:
        await state.resources.close()
    except DewError as exc:
        log.warning("a resource did not close cleanly", error=exc.message)
    finally:
        try:
            await state.store.remove_worker(state.worker_id)
        except DewError as exc:
            log.warning("worker record not removed", error=exc.message)
        finally:
            await state.store.close()
            if state.beat_store is not None:
                await state.beat_store.close()
    log.info("worker stopped", worker_id=state.worker_id)


def run_worker(settings: Settings, burst: bool = False) -> None:
    """Run a worker until it is stopped (SIGINT/SIGTERM) or, with ``burst``, idle."""
    private_umask()
    worker = build_worker(settings, burst=burst)
    try:
        worker.run()
    finally:
        # arq skips on_shutdown when its own clean-up fails first (e.g. Redis is gone).
        state: WorkerState | None = worker.ctx.get("dew")
        if state is not None and not state.closed:
            worker.loop.run_until_complete(shutdown_state(state))


async def _beat(state: WorkerState) -> None:
    await (state.beat_store or state.store).heartbeat(
        WorkerRecord(state.worker_id, socket.gethostname(), os.getpid(), state.started_at,
                     utcnow())
    )


async def _heartbeat_loop(state: WorkerState) -> None:
    while True:
        await asyncio.sleep(state.settings.worker.heartbeat_interval)
        try:
            await _beat(state)
        except DewError as exc:
            log.warning("heartbeat not written", error=exc.message)
