"""The cron table: the engine's own entry plus what each configured service declares.

Each entry names a job and when it runs (sets of seconds and minutes, as arq's
cron takes them). arq makes an entry run once per due time across all workers
(its job id is unique per time). A service declares its entries in its
``schedules`` module (``entries(settings)``); a service that cannot be loaded
is left out with a warning, and the others still run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError, DewError
from engine.logs import get_logger
from engine.services import load_part, load_specs
from engine.settings import Settings

if TYPE_CHECKING:
    from engine.worker import WorkerState

log = get_logger("dew.cron")
ScheduledCall = Callable[["WorkerState"], Awaitable[Any]]


@dataclass(frozen=True)
class ScheduleEntry:
    name: str
    run: ScheduledCall
    second: frozenset[int] | None = None
    minute: frozenset[int] | None = None
    run_at_startup: bool = False
    description: str = ""

    def next_run(self, after: datetime) -> datetime:
        """The first due time strictly after ``after`` (whole seconds)."""
        t = after.replace(microsecond=0) + timedelta(seconds=1)
        for _ in range(3600 + 60):  # within an hour and a minute every entry is due
            if ((self.second is None or t.second in self.second)
                    and (self.minute is None or t.minute in self.minute)):
                return t
            t += timedelta(seconds=1)
        raise ConfigError(f"schedule {self.name!r} is never due")


async def _sweep_outbox(state: WorkerState) -> dict[str, int]:
    from engine.sweeper import sweep

    return dict(await sweep(state.settings, state.store, state.queue))


def engine_entries(settings: Settings) -> list[ScheduleEntry]:
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


def cron_table(settings: Settings) -> list[ScheduleEntry]:
    """Every entry the workers run: the engine's, then each service's in config order."""
    entries = engine_entries(settings)
    for spec in load_specs(settings.engine.services):
        if spec.schedules is None:
            continue
        try:
            declared: list[ScheduleEntry] = load_part(spec, spec.schedules).entries(settings)
        except DewError as exc:
            log.warning("service left out of the cron table", service=spec.name,
                        error=exc.message)
            continue
        entries.extend(declared)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"two cron entries share a name: {sorted(names)}")
    return entries
