"""Enqueue a KPS job (the client seals ``auth``): ``python -m ... JOB < args.json``.

What another system does to call the engine; tests use it for batches the CLI
cannot express (a batch naming two key pairs).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from engine.client import Client
from engine.settings import load_settings


async def main(name: str, args: dict[str, Any]) -> str:
    async with await Client.open(load_settings()) as client:
        task = await client.enqueue(name, args)
    return task.task_id


if __name__ == "__main__":
    print(asyncio.run(main(sys.argv[1], json.load(sys.stdin))))
