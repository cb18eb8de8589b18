"""The CSMS part of ``make demo``: a COMMON secret created, rotated by the worker,
its versions and stages shown. Values are never printed, only their lengths."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from engine.client import Client
from engine.errors import DewError
from engine.settings import Settings


async def run(settings: Settings, say: Callable[[str], None]) -> None:
    from handlers.csms.model import generate_value
    from handlers.csms.service import ROTATE_JOB, open_secrets

    name = f"demo-{uuid.uuid4().hex[:8]}"
    say(f"\n== CSMS: dew secrets create {name} --generate  (encrypted under csms/default)")
    async with open_secrets(settings, actor="demo") as csms:
        info = await csms.create(name, generate_value().encode(), description="make demo")
        say(f"  created {name}: stages {info.stages}")
        say("\n== dew secrets rotate " + name + "  (the worker runs create, set, test, finish)")
        async with await Client.open(settings) as client:
            task = await client.enqueue(ROTATE_JOB, {"name": name})
            done = await client.wait(task.task_id, timeout=60)
        if done.status != "succeeded":
            raise DewError.from_dict(done.error or {"message": "the rotation failed"})
        say(f"  task {done.task_id}: {done.status}, steps {(done.result or {}).get('steps')}")
        say(f"\n== dew secrets versions {name}")
        for v in await csms.list_versions(name):
            say(f"  {v.version_id:4} {', '.join(v.stages) or '-'}")
        current = await csms.get_value(name)
        previous = await csms.get_value(name, stage="SYSPREVIOUS")
        say(f"  SYSCURRENT is {current.version_id} ({len(current.value)} bytes, the new random "
            f"value); SYSPREVIOUS is {previous.version_id}, the value created above"
            f"{' (kept)' if previous.value != current.value else ''}")
        await csms.schedule_deletion(name, 7)
        say(f"  scheduled {name} for deletion in 7 days (dew secrets restore cancels it)")
