"""The outbox sweeper: deliver what Redis lost, free what dead workers held.

It compares every unfinished task in the store with what Redis knows of its
job and carries out ``engine.lifecycle.sweep_action``. It runs from the cron
table (``engine.cron``) in every worker, so a lost job is re-enqueued within a
sweep interval of a worker being up, and a dead worker's job is taken over
within ``worker.heartbeat_timeout`` + one sweep interval.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

from engine.context import failure_record
from engine.errors import PermanentError
from engine.lifecycle import sweep_action
from engine.logs import get_logger
from engine.models import utcnow
from engine.queue import Queue
from engine.settings import Settings
from engine.store import TaskStore

log = get_logger("dew.sweeper")


async def sweep(
    settings: Settings,
    store: TaskStore,
    queue: Queue,
    clock: Callable[[], datetime] = utcnow,
    batch: int = 500,
) -> Counter[str]:
    """One pass over the unfinished tasks; returns how many got each action."""
    now = clock()
    tasks = await store.unfinished_tasks()
    alive = await store.live_workers(now - timedelta(seconds=settings.worker.heartbeat_timeout))
    done: Counter[str] = Counter()
    for start in range(0, len(tasks), batch):
        chunk = tasks[start : start + batch]
        views = await queue.views([t.task_id for t in chunk])
        for task in chunk:
            action = sweep_action(
                task, views[task.task_id], task.worker_id in alive, now, settings.sweeper.grace
            )
            if action == "enqueue":
                due = task.due_at if task.due_at > now else None
                await queue.push(task.task_id, task.name, task.args, due, task.signature)
            elif action == "release":
                # The row was read before Redis: a live worker may have claimed the task
                # since (it holds the lock now). Only a still-dead holder's lock goes.
                fresh = await store.get_task(task.task_id)
                if fresh is None or fresh.final or fresh.worker_id != task.worker_id:
                    action = "none"
                else:
                    await queue.release(task.task_id)
            elif action == "fail_orphan":
                reason = await queue.result_error(task.task_id)
                error = PermanentError(
                    "the job ended outside its handler",
                    code="job_lost",
                    cause=reason,
                    fix="Enqueue the job again; if it timed out, raise worker.job_timeout.",
                )
                await store.mark_failed(
                    task.task_id, error.to_dict(),
                    failure_record(task.task_id, task.name, None, error, now), now,
                )
            done[action] += 1
    acted = {k: v for k, v in done.items() if k != "none"}
    if acted:
        log.info("sweep", **acted)
    return done
