"""The schedules' job and resources.

- ``schedules.fire_due {}``: one firing tick by hand (the cron entry of the same
  name runs the same function every minute without a task row).
- the resource ``schedule_store`` (the schedules' SQLite store); the firings' task
  statuses are read through the engine's ``task_store`` resource.
"""

from __future__ import annotations

from typing import Any

from engine.context import JobContext
from engine.errors import InvalidInput
from engine.registry import JOBS, default_registry
from engine.resources import Closer, Resources, resource
from engine.store import TaskStore
from schedules.store import SqliteScheduleStore


@resource("schedule_store")
async def _schedule_store(resources: Resources) -> tuple[SqliteScheduleStore, Closer]:
    store = await SqliteScheduleStore.open(resources.settings.store_target)
    return store, store.close


def _check_fire_due(args: dict[str, Any]) -> None:
    if args:
        raise InvalidInput("schedules.fire_due takes no arguments")


@JOBS.job("schedules.fire_due", validate=_check_fire_due,
          description="fire the user schedules' due slots (the cron entry does it every minute)")
async def fire_due_job(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    from engine.client import Client
    from engine.queue import Queue
    from schedules.service import fire_due

    await ctx.check_owner()
    queue = await Queue.connect(ctx.settings)
    try:
        client = Client(ctx.settings, ctx.store, queue, default_registry(ctx.settings))
        client.resources = ctx.resources  # the worker's job signer and sealer
        return await fire_due(await schedule_store(ctx.resources), client, ctx.now())
    finally:
        await queue.close()


async def schedule_store(resources: Resources) -> SqliteScheduleStore:
    """This process's schedule store (the resource; importing this module registers it)."""
    store: SqliteScheduleStore = await resources.get("schedule_store")
    return store


async def schedule_tasks(resources: Resources) -> TaskStore:
    tasks: TaskStore = await resources.get("task_store")  # engine.store's resource
    return tasks
