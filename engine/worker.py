"""The worker: a thin arq wrapper that runs registered handlers and the cron table.

arq polls Redis and calls one function per job name; each of those hands the
job to ``engine.runner.TaskRunner``, which owns the task lifecycle. arq is
configured so that our code, not arq, decides retries (``max_tries`` is set
out of reach and our runner counts attempts in the task store), with JSON as
the only serializer, and with a heartbeat in the task store so the sweeper can
tell a dead worker's job from a slow one. ``DewWorker`` starts the jobs of one
poll with one Redis round trip (``engine.queue.JobClaimer``) instead of arq's four
a job, one job after the other.
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

from arq.constants import keep_cronjob_progress, retry_key_prefix
from arq.cron import CronJob, cron
from arq.jobs import SerializationError, deserialize_job_raw, serialize_result
from arq.utils import args_to_string, ms_to_datetime, timestamp_ms, truncate
from arq.worker import Function, JobExecutionFailed, Retry, RetryJob, Worker, func

from engine import serialization
from engine.cron import ScheduleEntry, cron_table
from engine.errors import ConfigError, DewError
from engine.job_signing import SIGNATURE_ARG, JobSigner
from engine.logs import get_logger
from engine.models import WorkerRecord, utcnow
from engine.private import private_umask
from engine.queue import (
    Claimed,
    JobClaimer,
    JobFinisher,
    Queue,
    close_pool,
    open_pool,
    redis_settings,
    redis_where,
)
from engine.registry import JobSpec, Registry, default_registry
from engine.resources import Resources
from engine.runner import TaskRunner
from engine.settings import Settings
from engine.store import TaskStore, open_store

log = get_logger("dew.worker")
arq_log = logging.getLogger("arq.worker")
_NO_RESULT = object()
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


class DewWorker(Worker):
    """arq's worker, with the jobs of each poll claimed and read in one round trip.

    arq checks, claims and reads job after job (four round trips to start one, then
    one more to read it, while the jobs it already runs wait for the loop);
    ``JobClaimer`` does the same (not running, still queued, due; then the
    in-progress key, the payload, the try count) for every id of the poll at once,
    atomically in Redis. ``run_job`` is then arq 0.28's own from the read job on
    (``_run_claimed``), and a finished job's keys go in one script call
    (``JobFinisher``). Aborting jobs (``allow_abort_jobs``) is not supported.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.allow_abort_jobs:
            raise ConfigError("the dew worker does not support arq's allow_abort_jobs")
        self._claimer: JobClaimer | None = None
        self._finisher: JobFinisher | None = None
        self._claimed: dict[str, Claimed] = {}

    async def main(self) -> None:
        # Our pool, not arq's: for a Sentinel master arq's leaves out the timeouts
        # and retries that carry the worker through a failover (engine.queue.open_pool).
        if self._pool is None and self.redis_settings is not None:
            self._pool = await open_pool(self.redis_settings, self.queue_name,
                                         self.expires_extra_ms)
        await super().main()

    async def close(self) -> None:
        pool = self._pool
        await super().close()
        if pool is not None:
            await close_pool(pool)  # also the connections to the Sentinels

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        if self._claimer is None:
            self._claimer = JobClaimer(self.pool, self.queue_name,
                                       int(self.in_progress_timeout_s * 1000))
            self._finisher = JobFinisher(self.pool, self.queue_name)
        # Only this poll loop starts jobs; finished ones free slots meanwhile, never
        # take them, so every claimed job gets one.
        free = self.max_jobs - self.job_counter
        for job in await self._claimer.claim([j.decode() for j in job_ids], free):
            await self.sem.acquire()
            self.job_counter += 1
            self._claimed[job.job_id] = job
            task = self.loop.create_task(self.run_job(job.job_id, job.score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job.job_id] = task

    async def run_job(self, job_id: str, score: int) -> None:
        job = self._claimed.pop(job_id, None)
        if job is None:  # not started by start_jobs: arq reads it itself
            await super().run_job(job_id, score)
            return
        await _run_claimed(self, job)

    async def finish_job(
        self, job_id: str, finish: bool, result_data: bytes | None,
        result_timeout_s: float | None, keep_result_forever: bool, incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        # The common end (done, no result kept: keep_result=0) in one command; every
        # other (a retry, a cron job's kept lock, a result to keep) as arq does it.
        if (finish and result_data is None and keep_in_progress is None
                and self._finisher is not None):
            await self._finisher.finish(job_id)
            return
        await super().finish_job(job_id, finish, result_data, result_timeout_s,
                                 keep_result_forever, incr_score, keep_in_progress)


async def _run_claimed(w: DewWorker, job: Claimed) -> None:
    """arq 0.28.0's ``Worker.run_job`` after its first round trip (the claim made it):
    the same steps, checks, logs and outcomes, with no abort check. Keep in step
    with arq when its pin moves (tests/engine/test_queue_batching.py runs it)."""
    job_id, score, v, job_try = job.job_id, job.score, job.payload, job.job_try
    start_ms = timestamp_ms()
    function_name, enqueue_time_ms = "<unknown>", 0
    args: tuple[Any, ...] = ()
    kwargs: dict[Any, Any] = {}

    async def job_failed(exc: BaseException) -> None:
        w.jobs_failed += 1
        result_data_ = serialize_result(
            function=function_name, args=args, kwargs=kwargs, job_try=job_try,
            enqueue_time_ms=enqueue_time_ms, success=False, result=exc, start_ms=start_ms,
            finished_ms=timestamp_ms(), ref=f"{job_id}:{function_name}",
            serializer=w.job_serializer, queue_name=w.queue_name, job_id=job_id,
        )
        await asyncio.shield(w.finish_failed_job(job_id, result_data_))

    if not v:
        arq_log.warning("job %s expired", job_id)
        return await job_failed(JobExecutionFailed("job expired"))
    try:
        function_name, args, kwargs, enqueue_job_try, enqueue_time_ms = deserialize_job_raw(
            v, deserializer=w.job_deserializer)
    except SerializationError as e:
        arq_log.exception("deserializing job %s failed", job_id)
        return await job_failed(e)
    try:
        function: Function | CronJob = w.functions[function_name]
    except KeyError:
        arq_log.warning("job %s, function %r not found", job_id, function_name)
        return await job_failed(JobExecutionFailed(f"function {function_name!r} not found"))

    if hasattr(function, "next_run"):  # a cron job
        ref = function_name
        keep_in_progress: float | None = keep_cronjob_progress
    else:
        ref = f"{job_id}:{function_name}"
        keep_in_progress = None
    if enqueue_job_try and enqueue_job_try > job_try:
        job_try = enqueue_job_try
        await w.pool.setex(retry_key_prefix + job_id, 88400, str(job_try))
    max_tries = w.max_tries if function.max_tries is None else function.max_tries
    if job_try > max_tries:
        arq_log.warning("%6.2fs ! %s max retries %d exceeded",
                        (timestamp_ms() - enqueue_time_ms) / 1000, ref, max_tries)
        w.jobs_failed += 1
        result_data = serialize_result(
            function_name, args, kwargs, job_try, enqueue_time_ms, False,
            JobExecutionFailed(f"max {max_tries} retries exceeded"), start_ms, timestamp_ms(),
            ref, w.queue_name, job_id=job_id, serializer=w.job_serializer,
        )
        return await asyncio.shield(w.finish_failed_job(job_id, result_data))

    result: Any = _NO_RESULT
    exc_extra: Any = None
    finish = False
    timeout_s = w.job_timeout_s if function.timeout_s is None else function.timeout_s
    incr_score: int | None = None
    ctx = {**w.ctx, "job_id": job_id, "job_try": job_try,
           "enqueue_time": ms_to_datetime(enqueue_time_ms), "score": score}
    if w.on_job_start:
        await w.on_job_start(ctx)
    start_ms = timestamp_ms()
    success = False
    # arq's per-job info lines cost a repr of the arguments each: only when shown.
    chatty = arq_log.isEnabledFor(logging.INFO)
    try:
        if chatty:
            extra = f" try={job_try}" if job_try > 1 else ""
            if (start_ms - score) > 1200:
                extra += f" delayed={(start_ms - score) / 1000:0.2f}s"
            arq_log.info("%6.2fs → %s(%s)%s", (start_ms - enqueue_time_ms) / 1000, ref,
                         args_to_string(args, kwargs), extra)
        w.job_tasks[job_id] = task = w.loop.create_task(function.coroutine(ctx, *args, **kwargs))
        try:
            result = await asyncio.wait_for(task, timeout_s)
        except (Exception, asyncio.CancelledError) as e:
            exc_extra = getattr(e, "extra", None)
            if callable(exc_extra):
                exc_extra = exc_extra()
            raise
        finally:
            del w.job_tasks[job_id]
    except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - as arq: the job's end
        finished_ms = timestamp_ms()
        t = (finished_ms - start_ms) / 1000
        if w.retry_jobs and isinstance(e, Retry):
            incr_score = e.defer_score
            arq_log.info("%6.2fs ↻ %s retrying job in %0.2fs", t, ref,
                         (e.defer_score or 0) / 1000)
            if e.defer_score:
                incr_score = e.defer_score + (timestamp_ms() - score)
            w.jobs_retried += 1
        elif w.retry_jobs and isinstance(e, asyncio.CancelledError | RetryJob):
            arq_log.info("%6.2fs ↻ %s cancelled, will be run again", t, ref)
            w.jobs_retried += 1
        else:
            arq_log.exception("%6.2fs ! %s failed, %s: %s", t, ref, e.__class__.__name__, e,
                              extra={"extra": exc_extra})
            result = e
            finish = True
            w.jobs_failed += 1
    else:
        success = True
        finished_ms = timestamp_ms()
        if chatty:
            arq_log.info("%6.2fs ← %s ● %s", (finished_ms - start_ms) / 1000, ref,
                         "" if result is None or not w.log_results else truncate(repr(result)))
        finish = True
        w.jobs_complete += 1

    keep_result_forever = (w.keep_result_forever if function.keep_result_forever is None
                           else function.keep_result_forever)
    result_timeout_s = w.keep_result_s if function.keep_result_s is None else function.keep_result_s
    result_data = None
    if result is not _NO_RESULT and (keep_result_forever or result_timeout_s > 0):
        result_data = serialize_result(
            function_name, args, kwargs, job_try, enqueue_time_ms, success, result, start_ms,
            finished_ms, ref, w.queue_name, job_id=job_id, serializer=w.job_serializer,
        )
    if w.on_job_end:
        await w.on_job_end(ctx)
    await asyncio.shield(w.finish_job(job_id, finish, result_data, result_timeout_s,
                                      keep_result_forever, incr_score, keep_in_progress))
    if w.after_job_end:
        await w.after_job_end(ctx)
    return None


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
) -> DewWorker:
    registry = registry or default_registry(settings)
    worker_id = new_worker_id()

    async def on_startup(ctx: dict[str, Any]) -> None:
        store = await open_store(settings)
        queue = Queue(ctx["redis"], settings.redis.queue, redis_where(settings))
        state = WorkerState(
            settings=settings, worker_id=worker_id, store=store, queue=queue,
            runner=TaskRunner(settings, store, worker_id, Resources(settings)),
            started_at=utcnow(),
        )
        # Known before anything else is awaited: a stop during start-up (a SIGTERM
        # while the first heartbeat is written) still closes what is open, or the
        # stores' threads would keep the process alive after the worker stopped.
        ctx["dew"] = state
        signer: JobSigner = await state.resources.get("job_signer")
        await signer.ready()
        state.beat_store = await open_store(settings)
        await state.beat_store.set_busy_timeout(HEARTBEAT_BUSY_TIMEOUT_MS)
        await _beat(state)
        state.heartbeat_task = asyncio.create_task(_heartbeat_loop(state))
        log.info("worker started", worker_id=worker_id, queue=settings.redis.queue,
                 jobs=len(list(registry)), max_jobs=settings.worker.max_jobs)

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        state: WorkerState | None = ctx.get("dew")
        if state is not None:
            await shutdown_state(state)

    # arq logs each job's arguments in its own lines; ours carry redacted ones.
    logging.getLogger("arq.worker").setLevel(logging.WARNING)
    return DewWorker(
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
