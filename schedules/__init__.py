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
    ]
