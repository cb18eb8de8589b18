"""The KMS's cron entries: due key deletions and due rotations, every minute."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.cron import ScheduleEntry
from engine.settings import Settings

if TYPE_CHECKING:
    from engine.worker import WorkerState


async def _delete_due_keys(state: WorkerState) -> dict[str, Any]:
    from handlers.kms.jobs import delete_due_keys

    return await delete_due_keys(state.resources, actor="cron:kms.delete_due_keys")


async def _rotate_due_keys(state: WorkerState) -> dict[str, Any]:
    from handlers.kms.jobs import rotate_due_keys

    return await rotate_due_keys(state.resources, actor="cron:kms.rotate_due_keys")


def entries(settings: Settings) -> list[ScheduleEntry]:
    return [
        ScheduleEntry(
            name="kms.delete_due_keys",
            run=_delete_due_keys,
            second=frozenset({30}),
            description="destroy KMS keys whose pending deletion period is over (every minute)",
        ),
        ScheduleEntry(
            name="kms.rotate_due_keys",
            run=_rotate_due_keys,
            second=frozenset({50}),
            description="rotate KMS keys whose rotation interval is over (every minute)",
        ),
    ]
