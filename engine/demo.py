"""``make demo``: the engine end to end on embedded defaults, in well under two minutes.

Starts the local stack (private Redis with AOF, one worker and the API, state under
``var/``) unless it is already up, enqueues one job of each kind (a success, a
transient failure that is retried, a permanent failure), waits for them, prints
the task list and the failed-task report, runs each configured service's demo
step (found through ``engine.services``), then stops what it started.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

from engine import render, stack
from engine.client import Client
from engine.errors import DewError
from engine.logs import configure_logging
from engine.private import private_umask
from engine.services import load_part, load_specs
from engine.settings import Settings, load_settings


def say(text: str) -> None:
    print(text, flush=True)


async def engine_part(settings: Settings) -> None:
    async with await Client.open(settings) as client:
        say("\n== enqueue: a success, a transient failure retried, a permanent failure")
        jobs: list[tuple[str, dict[str, Any]]] = [
            ("engine.echo", {"value": {"hello": "dew"}}),
            ("engine.sleep", {"seconds": 0.5}),
            ("engine.flaky", {"failures": 2}),
            ("engine.fail", {"message": "demo: the target refused the change",
                             "target": "demo-server"}),
        ]
        tasks = [await client.enqueue(name, args) for name, args in jobs]
        for task in tasks:
            say(f"  queued {task.name:14} {task.task_id}")
        done = [await client.wait(t.task_id, timeout=60) for t in tasks]

        say("\n== dew tasks list (this run)")
        say(render.task_table([t.to_json() for t in done]))
        failed = [t.task_id for t in done if t.status == "failed"]
        say("\n== dew failures list (this run)")
        records = [r for tid in failed for r in await client.store.list_failures(task_id=tid)]
        say(render.failure_table([r.to_json() for r in records]))
        if records:
            say("\n== dew failures show " + records[0].failure_id)
            say(render.failure(records[0].to_json()))


DEMO_USER = "demo"
DEMO_ROLES = ("DEW TaskOperator", "KMS Administrator", "CSMS FullAccess",
              "DEW KeypairFullAccess", "DEW ScheduleFullAccess")


async def console_part(settings: Settings) -> None:
    """The web console's address and a sign-in: the user ``demo`` (made once, with the
    built-in roles of the configured services), its password in a 0600 file under the
    state directory, made on the first demo and kept."""
    import secrets

    from engine.api.tls import tls_dir
    from engine.iam.service import Identities
    from engine.settings import parse_listen

    path = settings.state_dir / "console-demo-password"
    async with await Identities.open(settings) as ids:
        if await ids.user(DEMO_USER) is None:
            roles = [r for r in DEMO_ROLES if r in ids.catalog.roles]
            await ids.create_user(DEMO_USER, "default", roles)
        if not path.exists():
            password = secrets.token_urlsafe(12)
            await ids.set_password(DEMO_USER, password)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
    host, port = parse_listen(settings.api.listen)
    scheme = "https" if settings.api.tls else "http"
    shown = f"[{host}]" if ":" in host else host
    say("\n== the web console (served by dew api: `make up` keeps it running)")
    say(f"  address:  {scheme}://{shown}:{port}/console/")
    if settings.api.tls and not settings.api.cert_file:
        say(f"  CA:       {tls_dir(settings) / 'ca.pem'} (trust it, or accept the browser's "
            "warning once)")
    say(f"  sign in:  user {DEMO_USER}, password: the first line of {path} (mode 0600)")


def run_service_demos(settings: Settings, out: Callable[[str], None]) -> None:
    """Each configured service's demo step (``async def run(settings, say)``), in order."""
    for spec in load_specs(settings.engine.services):
        if spec.demo is not None:
            asyncio.run(load_part(spec, spec.demo).run(settings, out))


def main() -> int:
    private_umask()
    settings = load_settings()
    configure_logging(settings.log_file, settings.log.level, console="off")
    before = stack.status(settings)
    try:
        say(f"== starting the local stack (state in {settings.state_dir}/)")
        say("\n".join("  " + line for line in stack.up(settings).lines()))
        asyncio.run(engine_part(settings))
        run_service_demos(settings, say)
        asyncio.run(console_part(settings))
        say(f"\nThe full log is {settings.log_file}; tasks stay in "
            f"{settings.store_target.location}.")
        return 0
    except DewError as exc:
        sys.stderr.write(f"demo: error: {exc.message}\n")
        if exc.fix:
            sys.stderr.write(f"demo: fix: {exc.fix}\n")
        return 1
    finally:
        # Stop only what this demo started.
        if before.worker_pid is None and before.redis_pid is None and before.api_pid is None:
            say("\n== stopping the local stack")
            say("\n".join("  " + line for line in stack.down(settings).lines()))


if __name__ == "__main__":
    sys.exit(main())
