"""``dew keypairs bind|replace|reset|unbind``: check the input, seal the credential,
enqueue the ``kps.*`` job, wait for it (a progress bar on a terminal; the engine's
no-worker check) and print one line per server. Exit 0 when every server succeeded,
1 otherwise (each failed server has a failure record)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from engine.cli_output import print_result
from engine.errors import DewError, InvalidInput
from engine.settings import Settings
from handlers.kps.cli_io import parameter_error, read_bounded, read_secret_line

DEFAULT_JOB_TIMEOUT = 600.0
MAX_JOB_TIMEOUT = 86400.0
JOB_ACTIONS = ("bind", "replace", "reset", "unbind")
POLL = 0.2  # seconds between two paints of the progress bar


def check_timeout(timeout: float) -> None:
    if not 0 < timeout <= MAX_JOB_TIMEOUT:  # also false for nan
        raise parameter_error(f"--timeout must be above 0 and at most "
                              f"{MAX_JOB_TIMEOUT:.0f} seconds, got {timeout}")


def job_auth(args: argparse.Namespace) -> dict[str, str]:
    """The credential the job logs in with (the parser made exactly one required)."""
    password = getattr(args, "password_file", None)
    if password is not None:
        return {"password": read_secret_line("--password-file", password)}
    key = read_bounded("--private-key-file", args.private_key_file)
    return {"private_key": key.decode("utf-8", "replace")}


def job_args(args: argparse.Namespace, who: dict[str, str]) -> dict[str, Any]:
    """The job's arguments without ``auth`` (added once the names are known)."""
    out: dict[str, Any] = {"keypair": args.keypair, "servers": list(args.servers), **who}
    if getattr(args, "disable_password", False):
        out["disable_pw_login"] = True
    if getattr(args, "enable_password", False):
        out["enable_pw_login"] = True
    return out


async def run_job(args: argparse.Namespace, settings: Settings, who: dict[str, str]) -> int:
    from engine.client import Client
    from engine.registry import default_registry
    from handlers.kps.service import check_name, open_kps

    for server in args.servers:
        check_name(server, "server")
    check_timeout(args.timeout)
    name = f"kps.{args.action}"
    arguments = job_args(args, who)
    auth = job_auth(args)
    async with open_kps(settings) as kps:
        # Unknown names are bad input (exit 2, nothing enqueued), not failed tasks.
        await kps.get(args.keypair, **who)
        for server in dict.fromkeys(args.servers):
            await kps.server(server, who["account"])
        arguments["auth"] = auth  # the client seals it (the job declares it secret)
        default_registry(settings).check_args(name, arguments)
        async with await Client.open(settings) as client:
            task = await client.enqueue(name, arguments)
            if args.no_wait:
                print_result({"task_id": task.task_id}, args.json, lambda d: str(d["task_id"]))
                return 0
            bar = sys.stderr.isatty() and not args.json
            task = await wait(client, kps, task.task_id, args, bar)
        failures = await task_failures(settings, task.task_id)
        record = await kps.get(args.keypair, **who)
    return report(args, task, record, failures)


async def wait(client: Any, kps: Any, task_id: str, args: argparse.Namespace,
               bar: bool) -> Any:
    """The task once it ended. ``Client.wait`` decides (its ``--timeout`` and its
    no-worker check: exit 1 naming ``make up`` when no worker has had a heartbeat for
    ``worker.heartbeat_timeout``); meanwhile the bar shows the servers done."""
    waiting = asyncio.ensure_future(
        client.wait(task_id, timeout=args.timeout, require_worker=True))
    total = len(set(args.servers))
    try:
        while bar and not waiting.done():
            done = sum(1 for s in (await kps.store.progress(task_id)).values()
                       if s != "running")
            sys.stderr.write("\r" + progress_bar(args.action, done, total))
            sys.stderr.flush()
            await asyncio.wait({waiting}, timeout=POLL)
        return await waiting
    finally:
        waiting.cancel()  # only matters when the bar's read failed or on Ctrl-C
        if bar:
            sys.stderr.write("\n")


def progress_bar(action: str, done: int, total: int, width: int = 30) -> str:
    filled = width * min(done, total) // max(total, 1)
    return f"{action} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} servers"


async def task_failures(settings: Settings, task_id: str) -> dict[str, dict[str, str]]:
    """The task's failure records by target ("" for the task-level one)."""
    from engine.store import open_store

    store = await open_store(settings)
    try:
        return {f.target or "": {"failure_id": f.failure_id, "code": f.code, "error": f.error}
                for f in await store.list_failures(task_id=task_id)}
    finally:
        await store.close()


def report(args: argparse.Namespace, task: Any, record: Any,
           failures: dict[str, dict[str, str]]) -> int:
    """Print the outcome per server; the exit code (0 only when every server succeeded)."""
    from handlers.kps.service import ALL_FAILED

    servers = {name: row for name, row in failures.items() if name}
    if task.status == "succeeded":
        result = {**(task.result or {}), "task_id": task.task_id, "status": task.status}
        for row in result.get("servers", []):
            if row["status"] == "failed" and row["server"] in servers:
                row["failure_id"] = servers[row["server"]]["failure_id"]
        print_result(result, args.json, result_text)
        return 0 if result.get("failed", 0) == 0 else 1
    if task.status == "cancelled" and (task.result or {}).get("servers"):
        # Stopped between servers (`dew tasks cancel`): the ones done, and the skipped.
        print_result({**task.result, "task_id": task.task_id, "status": task.status,
                      "error": task.error}, args.json, result_text)
        return 1
    if task.status == "failed" and (task.error or {}).get("code") == ALL_FAILED:
        # Every server failed: the task failed; each server has its failure record.
        print_result({
            "operation": args.action, "keypair": record.name,
            "fingerprint": record.fingerprint, "task_id": task.task_id, "status": "failed",
            "error": task.error, "succeeded": 0, "failed": len(servers),
            "partially_failed": False,
            "servers": [{"server": name, "status": "failed", **row}
                        for name, row in servers.items()],
        }, args.json, result_text)
        return 1
    if args.json:
        print_result({"task_id": task.task_id, "status": task.status, "error": task.error},
                     True, str)
        return 1
    raise DewError.from_dict(task.error or {"message": f"task {task.task_id} failed"})


def result_text(d: dict[str, Any]) -> str:
    lines = [f"{d['operation']} {d['keypair']} ({d['fingerprint']}), task {d['task_id']}"]
    for row in d.get("servers", []):
        if row["status"] == "succeeded":
            notes = ["changed" if row.get("changed") else "already in place"]
            if row.get("verified"):
                notes.append("login checked")
            if row.get("pw_login_state"):
                notes.append(f"password login {row['pw_login_state']}")
            lines.append(f"  {row['server']:24} succeeded  {', '.join(notes)}")
        elif row["status"] == "skipped":
            lines.append(f"  {row['server']:24} skipped    not started ({row.get('reason')})")
        else:
            lines.append(f"  {row['server']:24} failed     {row['error']} "
                         f"(dew failures show {row.get('failure_id', '?')})")
    skipped = f", {d['skipped']} skipped" if d.get("skipped") else ""
    lines.append(f"{d['succeeded']} succeeded, {d['failed']} failed{skipped}")
    if d.get("status") == "cancelled":
        lines.append(f"task {d['task_id']} CANCELLED: the skipped servers were not "
                     f"changed (enqueue the job again for them)")
    elif d.get("status") == "failed":
        lines.append(f"task {d['task_id']} FAILED: every server failed "
                     f"(dew failures list --task-id {d['task_id']})")
    elif d.get("partially_failed"):
        lines.append(f"task {d['task_id']} PARTIALLY FAILED: {d['failed']} of "
                     f"{d['succeeded'] + d['failed']} servers failed "
                     f"(retry them: dew tasks retry {d['task_id']})")
    return "\n".join(lines)


def missing_servers(action: str) -> InvalidInput:
    return InvalidInput(f"the following arguments are required: SERVER (see `dew keypairs "
                        f"{action} --help`)", code="usage")
