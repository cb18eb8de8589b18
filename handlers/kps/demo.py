"""``make demo``, KPS part: create a key pair, bind it to an unreachable server (a
closed loopback port), show the failed-task report, then delete that record."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable

from engine import render
from engine.client import Client
from engine.settings import Settings
from handlers.kps.service import open_kps


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on leaving: nothing listens there


async def run(settings: Settings, say: Callable[[str], None]) -> None:
    tag = secrets.token_hex(3)
    settings = settings.replace(kps={"retries": 0})
    async with open_kps(settings) as kps:
        say("\n== KPS: dew keypairs create (ed25519, private key from the HSM's RNG)")
        created = await kps.create(f"demo-{tag}", "SSH_ED25519", user="demo")
        view = created.view.to_json()
        say(f"  {view['name']}: {view['keygen']}")
        port = _closed_port()
        await kps.add_server(f"unreachable-{tag}", "127.0.0.1", port=port, user="root",
                             trust_first_use=True)
        say(f"== dew keypairs bind {view['name']} unreachable-{tag} (127.0.0.1:{port},"
            " closed)")
        args = {"keypair": view["name"], "servers": [f"unreachable-{tag}"], "user": "demo",
                "auth": {"password": "demo-only"}}  # the client seals auth
        async with await Client.open(settings) as client:
            task = await client.enqueue("kps.bind", args)
            done = await client.wait(task.task_id, timeout=60)
            if done.status == "failed":
                # Its only server failed: the task failed (docs/kps.md, "Task states").
                say(f"  task {done.task_id}: failed: "
                    f"{(done.error or {}).get('message', 'failed')}")
            else:
                result = done.result or {}
                say(f"  task {done.task_id}: {done.status}, {result.get('succeeded')} "
                    f"succeeded, {result.get('failed')} failed")
            records = await client.store.list_failures(task_id=done.task_id)
            say("\n== dew failures list --operation kps.bind (this run)")
            say(render.failure_table([r.to_json() for r in records]))
            for record in records:
                await client.store.delete_failure(record.failure_id)
                say(f"== dew failures delete {record.failure_id}: handled, deleted")
        await kps.remove_server(f"unreachable-{tag}")
        await kps.delete(view["name"], user="demo")
