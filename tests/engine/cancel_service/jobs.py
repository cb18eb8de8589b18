"""``canceltest.steps {"steps": N, "interval": S}``: N steps of S seconds, with a safe
point before each (cancellable). ``canceltest.plain`` is the same job without safe
points (not cancellable): a running one is left to end by itself."""

from __future__ import annotations

import asyncio
from typing import Any

from engine.context import JobContext
from engine.errors import InvalidInput
from engine.registry import JOBS

FIELDS = {"steps": "integer 1..10000: how many steps",
          "interval": "number 0..10: seconds each step sleeps"}


def _check(args: dict[str, Any]) -> None:
    steps, interval = args.get("steps"), args.get("interval")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 10_000:
        raise InvalidInput("'steps' must be an integer 1..10000")
    if (isinstance(interval, bool) or not isinstance(interval, int | float)
            or not 0 <= interval <= 10):
        raise InvalidInput("'interval' must be a number 0..10")


@JOBS.job("canceltest.steps", validate=_check, fields=FIELDS, cancellable=True)
async def steps(ctx: JobContext, args: dict[str, Any]) -> dict[str, int]:
    """Sleep step by step, stopping at the first safe point after a cancel request."""
    for done in range(args["steps"]):
        await ctx.check_cancelled({"done": done})
        await asyncio.sleep(args["interval"])
    return {"done": args["steps"]}


@JOBS.job("canceltest.plain", validate=_check, fields=FIELDS)
async def plain(ctx: JobContext, args: dict[str, Any]) -> dict[str, int]:
    """Sleep step by step, with no safe point."""
    for _ in range(args["steps"]):
        await asyncio.sleep(args["interval"])
    return {"done": args["steps"]}
