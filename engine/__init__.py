"""dew-engine: the machinery (settings, task store, queue + outbox, worker, CLI).

The public surface for other Python systems is small:

    from engine import Client
    async with await Client.open() as client:
        task = await client.enqueue("engine.echo", {"value": 1})
        task = await client.wait(task.task_id)

and the errors in ``engine.errors``. Everything else is internal. ``Client`` is
imported on first use, so the CLI's start does not pay for Redis and arq.
"""

from __future__ import annotations

# typing costs every `dew` start ~8 ms; annotations are strings here, so only mypy needs it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from engine.client import Client
    from engine.errors import DewError

__all__ = ["Client", "DewError"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from engine.client import Client

        return Client
    if name == "DewError":
        from engine.errors import DewError

        return DewError
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
