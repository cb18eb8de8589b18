"""The schedules' cron entry: fire the user schedules' due slots, every minute."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.cron import ScheduleEntry
from engine.settings import Settings

if TYPE_CHECKING:
    from engine.worker import WorkerState


async def _fire_due(state: WorkerState) -> dict[str, Any]:
    from engine.client import Client
    from engine.models import utcnow
    from engine.registry import default_registry
    from schedules.jobs import schedule_store
    from schedules.service import fire_due

    # A client on the worker's own store, queue and resources (the worker closes them).
    client = Client(state.settings, state.store, state.queue, default_registry(state.settings))
    client.resources = state.resources
    return await fire_due(await schedule_store(state.resources), client, utcnow())


def entries(settings: Settings) -> list[ScheduleEntry]:
    return [
        ScheduleEntry(
            name="schedules.fire_due",
            run=_fire_due,
            second=frozenset({0}),
            run_at_startup=True,
            description="enqueue the user schedules' due slots, once each (every minute)",
        ),
    ]
