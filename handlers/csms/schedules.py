"""The CSMS's cron entries: queue due rotations, delete secrets whose window is over."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.cron import ScheduleEntry
from engine.settings import Settings
from handlers.csms.config import CsmsSettings

if TYPE_CHECKING:
    from engine.worker import WorkerState


async def _enqueue_due_rotations(state: WorkerState) -> dict[str, Any]:
    from engine.client import Client
    from engine.models import utcnow
    from engine.registry import default_registry
    from handlers.csms.service import enqueue_due_rotations

    # A client on the worker's own store and queue (not closed here: they are the worker's).
    client = Client(state.settings, state.store, state.queue, default_registry(state.settings))
    store = await state.resources.get("csms_store")
    interval = state.settings.section(CsmsSettings).scheduler_interval
    # Look one interval (plus slack) ahead: those rotations are queued deferred to
    # their due time, so they start on time instead of at the next look.
    return await enqueue_due_rotations(store, client, utcnow(), lookahead=2 * interval)


async def _delete_due_secrets(state: WorkerState) -> dict[str, Any]:
    from handlers.csms.service import delete_due_secrets

    return await delete_due_secrets(state.resources)


def entries(settings: Settings) -> list[ScheduleEntry]:
    interval = settings.section(CsmsSettings).scheduler_interval
    return [
        ScheduleEntry(
            name="csms.enqueue_due_rotations",
            run=_enqueue_due_rotations,
            second=frozenset(range(0, 60, interval)),
            run_at_startup=True,
            description="queue secret rotations due soon, once each, deferred to their due "
            f"time (every {interval} s)",
        ),
        ScheduleEntry(
            name="csms.delete_due_secrets",
            run=_delete_due_secrets,
            second=frozenset({40}),
            description="delete secrets whose recovery window is over (every minute)",
        ),
    ]
