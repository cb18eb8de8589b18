"""Built-in jobs for operators' checks, tests, the demo and the benchmark.

- ``engine.echo {"value": ...}``: returns the value; the value is a declared secret,
  sealed in transit and at rest, and the task row keeps the result redacted.
- ``engine.sleep {"seconds": N}``: sleeps, returns the seconds slept.
- ``engine.flaky {"failures": N}``: fails with a transient error on its first N
  attempts, then succeeds (shows retries with backoff).
- ``engine.fail {"message": "..."}``: fails with a permanent error (shows a
  failure record).
"""

from __future__ import annotations

import asyncio
from typing import Any

from engine.context import JobContext
from engine.errors import InvalidInput, PermanentError, TransientError
from engine.registry import JOBS

MAX_SLEEP = 3600.0


def _number(args: dict[str, Any], key: str, low: float, high: float) -> float:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{key!r} must be a number")
    if not low <= value <= high:
        raise InvalidInput(f"{key!r} must be between {low:g} and {high:g}, got {value}")
    return float(value)


def _check_echo(args: dict[str, Any]) -> None:
    if "value" not in args:
        raise InvalidInput("engine.echo needs a 'value'")


def _check_sleep(args: dict[str, Any]) -> None:
    _number(args, "seconds", 0, MAX_SLEEP)


def _check_flaky(args: dict[str, Any]) -> None:
    _number(args, "failures", 0, 100)


def _check_fail(args: dict[str, Any]) -> None:
    if not isinstance(args.get("message", ""), str):
        raise InvalidInput("'message' must be a string")


# A free-form payload may hold anything: declared secret whole, so it is sealed in
# transit and at rest, and the result (the same value) is kept redacted.
@JOBS.job("engine.echo", validate=_check_echo, secret_fields=("value",), secret_result=True,
          fields={"value": "any JSON: returned as the result (sealed on the way)"})
async def echo(ctx: JobContext, args: dict[str, Any]) -> Any:
    """Return the value given (sealed on the way; the stored result is redacted)."""
    return args["value"]


@JOBS.job("engine.sleep", validate=_check_sleep,
          fields={"seconds": f"number 0..{MAX_SLEEP:g}: how long to sleep"})
async def sleep(ctx: JobContext, args: dict[str, Any]) -> float:
    """Sleep for the seconds given."""
    seconds = float(args["seconds"])
    await asyncio.sleep(seconds)
    return seconds


@JOBS.job("engine.flaky", validate=_check_flaky,
          fields={"failures": "number 0..100: attempts that fail transiently first"})
async def flaky(ctx: JobContext, args: dict[str, Any]) -> dict[str, int]:
    """Fail transiently on the first N attempts, then succeed."""
    failures = int(args["failures"])
    if ctx.attempt <= failures:
        raise TransientError(
            f"simulated transient failure {ctx.attempt} of {failures}",
            code="simulated_transient", cause="engine.flaky was asked to fail",
            fix="Nothing: the engine retries it.",
        )
    return {"attempts": ctx.attempt}


@JOBS.job("engine.fail", validate=_check_fail,
          fields={"message": "string, optional: the error message",
                  "target": "string, optional: what the failure record names"})
async def fail(ctx: JobContext, args: dict[str, Any]) -> None:
    """Fail at once with a permanent error."""
    raise PermanentError(
        args.get("message") or "simulated permanent failure",
        code="simulated_permanent", cause="engine.fail was asked to fail",
        fix="Nothing: this job exists to show a failure record.",
        target=args.get("target"),
    )
