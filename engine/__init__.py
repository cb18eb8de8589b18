"""dew-engine: the machinery (settings, task store, queue + outbox, worker, CLI).

The public surface for other Python systems is small:

    from engine import Client
    async with await Client.open() as client:
        task = await client.enqueue("engine.echo", {"value": 1})
        task = await client.wait(task.task_id)

and the errors in ``engine.errors``. Everything else is internal.
"""

from engine.client import Client
from engine.errors import DewError

__all__ = ["Client", "DewError"]
