"""The cron table: what the workers run on a clock.

Each entry names a job and when it runs. arq's cron makes an entry run once per
due time across all workers (its job id is unique per time). Entries that need
settings (the sweeper's interval) are built by ``cron_table(settings)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.settings import Settings

if TYPE_CHECKING:
    from engine.worker import WorkerState

ScheduledCall = Callable[["WorkerState"], Awaitable[Any]]


@dataclass(frozen=True)
class ScheduleEntry:
    name: str
    run: ScheduledCall
    second: frozenset[int] | None = None
    minute: frozenset[int] | None = None
    run_at_startup: bool = False
    description: str = ""


async def _sweep_outbox(state: WorkerState) -> dict[str, int]:
    from engine.sweeper import sweep

    return dict(await sweep(state.settings, state.store, state.queue))


async def _delete_due_keys(state: WorkerState) -> dict[str, Any]:
    from handlers.kms import delete_due_keys

    return await delete_due_keys(state.resources, actor="cron:kms.delete_due_keys")


async def _rotate_due_kms_keys(state: WorkerState) -> dict[str, Any]:
    from handlers.kms import rotate_due_keys

    return await rotate_due_keys(state.resources, actor="cron:kms.rotate_due_keys")


async def _enqueue_due_rotations(state: WorkerState) -> dict[str, Any]:
    from engine.client import Client
    from engine.models import utcnow
    from engine.registry import default_registry
    from handlers.secrets import enqueue_due_rotations

    # A client on the worker's own store and queue (not closed here: they are the worker's).
    client = Client(state.settings, state.store, state.queue, default_registry())
    store = await state.resources.get("csms_store")
    interval = state.settings.csms.scheduler_interval
    # Look one interval (plus slack) ahead: those rotations are queued deferred to
    # their due time, so they start on time instead of at the next look.
    return await enqueue_due_rotations(store, client, utcnow(), lookahead=2 * interval)


async def _delete_due_secrets(state: WorkerState) -> dict[str, Any]:
    from handlers.secrets import delete_due_secrets

    return await delete_due_secrets(state.resources)


def cron_table(settings: Settings) -> list[ScheduleEntry]:
    every = settings.sweeper.interval
    return [
        ScheduleEntry(
            name="engine.sweep_outbox",
            run=_sweep_outbox,
            second=frozenset(range(0, 60, every)),
            run_at_startup=True,
            description=f"re-enqueue lost tasks, free dead workers' jobs (every {every} s)",
        ),
        ScheduleEntry(
            name="kms.delete_due_keys",
            run=_delete_due_keys,
            second=frozenset({30}),
            description="destroy KMS keys whose pending deletion period is over (every minute)",
        ),
        ScheduleEntry(
            name="kms.rotate_due_keys",
            run=_rotate_due_kms_keys,
            second=frozenset({50}),
            description="rotate KMS keys whose rotation interval is over (every minute)",
        ),
        ScheduleEntry(
            name="csms.enqueue_due_rotations",
            run=_enqueue_due_rotations,
            second=frozenset(range(0, 60, settings.csms.scheduler_interval)),
            run_at_startup=True,
            description="queue secret rotations due soon, once each, deferred to their due "
            f"time (every {settings.csms.scheduler_interval} s)",
        ),
        ScheduleEntry(
            name="csms.delete_due_secrets",
            run=_delete_due_secrets,
            second=frozenset({40}),
            description="delete secrets whose recovery window is over (every minute)",
        ),
    ]
