"""Seal ``auth`` under kps/default and enqueue a KPS job: ``python -m ... JOB < args.json``.

What another system does to call the engine; tests use it for batches the CLI
cannot express (a batch naming two key pairs).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from engine.client import Client
from engine.sealing import seal_args
from engine.settings import load_settings
from handlers.kps.service import open_kps


async def main(name: str, args: dict[str, Any]) -> str:
    settings = load_settings()
    async with open_kps(settings) as kps:
        sealed = await seal_args(args, ["auth"], kps.sealer, args.get("account", "default"))
    async with await Client.open(settings) as client:
        task = await client.enqueue(name, sealed)
    return task.task_id


if __name__ == "__main__":
    print(asyncio.run(main(sys.argv[1], json.load(sys.stdin))))
