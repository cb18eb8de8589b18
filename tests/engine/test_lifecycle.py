"""The task lifecycle decisions, without Redis or SQLite."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from engine.errors import InvalidInput, PermanentError, TransientError
from engine.lifecycle import RedisView, backoff_delay, decide_outcome, sweep_action
from engine.models import TaskRecord

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    assert backoff_delay(1, 1.0, 60, lambda: 0.0) == 0.5
    assert backoff_delay(1, 1.0, 60, lambda: 1.0) == 1.0
    assert backoff_delay(4, 1.0, 60, lambda: 0.0) == 4.0  # step 8, half fixed
    assert backoff_delay(30, 1.0, 60, lambda: 1.0) == 60.0
    delays = {backoff_delay(3, 1.0, 60) for _ in range(50)}
    assert len(delays) > 1 and all(2.0 <= d <= 4.0 for d in delays)


def test_outcomes_by_error_class() -> None:
    assert decide_outcome(None, 1, 3, 1, 10).action == "succeed"
    retry = decide_outcome(TransientError("x"), 1, 3, 1, 10, lambda: 0.0)
    assert (retry.action, retry.delay) == ("retry", 0.5)
    assert decide_outcome(TransientError("x"), 3, 3, 1, 10).action == "fail"
    assert decide_outcome(PermanentError("x"), 1, 3, 1, 10).action == "fail"
    assert decide_outcome(InvalidInput("x"), 1, 3, 1, 10).action == "fail"


def task(status: str, age: float = 60, worker: str | None = "w") -> TaskRecord:
    t = NOW - timedelta(seconds=age)
    return TaskRecord("t", "engine.echo", {}, status, 1, t, t, None, None, None, None,  # type: ignore[arg-type]
                      worker)


LOST = RedisView(queued=False, in_progress=False, has_result=False)
WAITING = RedisView(queued=True, in_progress=False, has_result=False)
HELD = RedisView(queued=True, in_progress=True, has_result=False)
ENDED = RedisView(queued=False, in_progress=False, has_result=True)


@pytest.mark.parametrize(
    ("status", "view", "alive", "age", "action"),
    [
        ("queued", LOST, False, 60, "enqueue"),
        ("queued", LOST, False, 0.1, "none"),  # the client may be about to push
        ("queued", WAITING, False, 60, "none"),
        ("running", HELD, True, 60, "none"),  # a live worker is on it
        ("running", HELD, False, 60, "release"),  # its worker died
        ("running", WAITING, False, 60, "none"),  # arq will hand it out again
        ("running", LOST, False, 60, "enqueue"),  # Redis lost it
        ("running", LOST, True, 60, "none"),
        ("running", ENDED, False, 60, "fail_orphan"),
        ("succeeded", LOST, False, 60, "none"),
        ("failed", HELD, False, 60, "none"),
    ],
)
def test_sweep_actions(status: str, view: RedisView, alive: bool, age: float,
                       action: str) -> None:
    assert sweep_action(task(status, age), view, alive, NOW, grace=5) == action
