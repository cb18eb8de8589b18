"""The task lifecycle as plain decisions: no Redis, no SQLite, no clock.

    queued ──► running ──► succeeded
       ▲          │
       └──retry───┤ (transient error, tries left: back to queued after a backoff)
       │          ├──► failed (permanent error, or transient with no tries left)
       │          └──► cancelled (`dew tasks cancel` seen at a safe point of the handler)
       └────────────► cancelled (`dew tasks cancel` of a queued or deferred task)

The worker and the sweeper call these functions and carry out what they say.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from engine.errors import DewError
from engine.models import TaskRecord


@dataclass(frozen=True)
class Outcome:
    action: Literal["succeed", "retry", "fail"]
    delay: float = 0.0


def backoff_delay(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before retry number ``attempt`` (1 = the first retry).

    Exponential, capped, with "equal jitter": half the step is fixed so retries
    never bunch at zero, the other half is random so many failed jobs spread out.
    """
    step = min(cap, base * 2.0 ** max(0, attempt - 1))
    return float(step / 2 + rand() * step / 2)


def decide_outcome(
    error: DewError | None,
    attempts: int,
    max_tries: int,
    base: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> Outcome:
    """What follows a run that ended with ``error`` (None: success) on try ``attempts``."""
    if error is None:
        return Outcome("succeed")
    if error.retryable and attempts < max_tries:
        return Outcome("retry", backoff_delay(attempts, base, cap, rand))
    return Outcome("fail")


@dataclass(frozen=True)
class RedisView:
    """What Redis knows of a task's job."""

    queued: bool  # the job is in the queue (waiting, deferred or being run)
    in_progress: bool  # a worker holds the job's in-progress lock
    has_result: bool  # arq finished the job and kept its result


SweepAction = Literal["none", "enqueue", "release", "fail_orphan"]


def sweep_action(
    task: TaskRecord,
    redis: RedisView,
    worker_alive: bool,
    now: datetime,
    grace: float,
) -> SweepAction:
    """What the outbox sweeper does with one unfinished task.

    - ``enqueue``: Redis does not know the job (lost in a restart, or the client
      died between writing the row and pushing): push it again.
    - ``release``: the worker running it is dead but its in-progress lock in
      Redis lives on (arq would wait job_timeout + 10 s): drop the lock so a live
      worker takes the job now.
    - ``fail_orphan``: arq finished the job outside our runner (e.g. it was
      cancelled by the job timeout): record the failure.
    """
    if task.final:
        return "none"
    if task.status == "running" and worker_alive:
        return "none"
    if redis.queued:
        if task.status == "running" and redis.in_progress:
            return "release"
        return "none"
    if redis.has_result:
        return "fail_orphan"
    if now - task.enqueued_at < timedelta(seconds=grace):
        return "none"  # the client may be between writing the row and pushing the job
    return "enqueue"
