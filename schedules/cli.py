"""``dew schedules``: the cron table and the users' schedules (docs/schedules.md).

``list`` prints the built-in cron table (every entry, when it runs and when it is
next due) and the project's schedules with their next run (``--kind``: only one of
them); ``add``, ``show``, ``pause``, ``resume``, ``run-now`` and ``delete`` manage
user schedules (``schedules/service.py``), the schedule being the positional
SCHEDULE. Bad input exits 2 and writes nothing. Text output prints times as
ISO 8601 UTC and booleans as yes/no.
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

from engine.cli_output import add_deprecated, add_project_option, lines, print_result, read_input
from engine.errors import InvalidInput
from engine.settings import Settings

MAX_ARGS_FILE = 256 * 1024
KINDS = ("builtin", "user")
JSON_HELP = "print JSON (errors too: one JSON line on stderr)"
SCHEDULE_HELP = "the schedule's name (unique in its project)"


def register(subparsers: Any, commands: dict[str, Any]) -> None:
    top = subparsers.add_parser("schedules", help="the cron table and user schedules")
    sub = top.add_subparsers(dest="action", metavar="ACTION", required=True,
                             parser_class=type(top))
    p = sub.add_parser("list", help="the cron table, then the project's schedules, with "
                       "their next run")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--kind", choices=KINDS,
                       help="only the built-in cron table (builtin) or only the project's "
                            "schedules (user)")
    for kind in KINDS:
        add_deprecated(which, f"--{kind}", f"--kind {kind}", dest="kind",
                       action="store_const", const=kind, help=f"deprecated: use --kind {kind}")
    _common(p)

    p = sub.add_parser("add", help="add a schedule: run a job on a cron expression")
    p.add_argument("name", metavar="SCHEDULE", help=SCHEDULE_HELP)
    p.add_argument("--cron", required=True, metavar="EXPR",
                   help='five fields: minute hour day month weekday, e.g. "0 3 * * *"')
    p.add_argument("--timezone", default="UTC", metavar="ZONE",
                   help="the IANA time zone of the expression (default: UTC)")
    p.add_argument("--job", required=True, help="the job name, e.g. engine.sleep")
    p.add_argument("--args", default=None, metavar="JSON",
                   help="the job's arguments as a JSON object (default {})")
    p.add_argument("--args-file", metavar="FILE",
                   help="the job's arguments from FILE (- reads standard input)")
    p.add_argument("--catch-up", action="store_true",
                   help="run once for slots missed while no worker ran (default: skip them)")
    p.add_argument("--paused", action="store_true", help="create it paused")
    _common(p)

    for verb, text in (("show", "a schedule and its last firings"),
                       ("pause", "pause a schedule (its slots are not run)"),
                       ("resume", "resume a schedule from now (slots of the pause are not run)"),
                       ("run-now", "enqueue the schedule's job now"),
                       ("delete", "delete a schedule")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("name", metavar="SCHEDULE", help=SCHEDULE_HELP)
        _common(p)
    commands["schedules"] = cmd_schedules


def _common(p: Any) -> None:
    add_project_option(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)


def when(second: frozenset[int] | None, minute: frozenset[int] | None) -> str:
    """A cron entry's sets of seconds and minutes in words."""

    def part(values: frozenset[int] | None, unit: str) -> str:
        if values is None:
            return f"every {unit}"
        ordered = sorted(values)
        steps = {b - a for a, b in itertools.pairwise(ordered)}
        if len(steps) == 1 and ordered[0] == 0 and 60 % ordered[1] == 0:
            return f"every {unit}" if ordered[1] == 1 else f"every {ordered[1]} {unit}s"
        return f"at {unit} " + ",".join(map(str, ordered))

    if minute is None:
        return part(second, "second")
    return f"{part(minute, 'minute')}, {part(second, 'second')}"


async def cmd_schedules(args: argparse.Namespace, settings: Settings) -> int:
    from engine.models import utcnow

    now = utcnow()
    if args.action == "list":
        return await _list(args, settings, now)
    if args.action == "add":
        return await _add(args, settings, now)
    return await _one(args, settings, now)


def _builtin_rows(settings: Settings, now: Any) -> list[dict[str, Any]]:
    from engine.cron import cron_table
    from engine.models import iso

    return [
        {"name": e.name, "when": when(e.second, e.minute),
         "at_startup": e.run_at_startup, "next_run": iso(e.next_run(now)),
         "description": e.description}
        for e in cron_table(settings)
    ]


async def _list(args: argparse.Namespace, settings: Settings, now: Any) -> int:
    from schedules import service
    from schedules.store import SqliteScheduleStore

    builtin = [] if args.kind == "user" else _builtin_rows(settings, now)
    user: list[dict[str, Any]] = []
    if args.kind != "builtin":
        store = await SqliteScheduleStore.open(settings.store_target)
        try:
            user = [{"kind": "user", **service.to_json(r, now)}
                    for r in await store.list_schedules(args.account)]
        finally:
            await store.close()
    rows = [{"kind": "builtin", **r} for r in builtin] + user
    print_result(rows, args.json, _table)
    return 0


def _job_args(args: argparse.Namespace) -> Any:
    if args.args is not None and args.args_file is not None:
        raise InvalidInput("give either --args or --args-file")
    if args.args_file is not None:
        data = read_input("--args-file", args.args_file, MAX_ARGS_FILE + 1)
        if len(data) > MAX_ARGS_FILE:
            raise InvalidInput(f"--args-file is larger than {MAX_ARGS_FILE} bytes")
        source, text = "--args-file", data.decode("utf-8", errors="replace")
    else:
        source, text = "--args", args.args if args.args is not None else "{}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{source} is not valid JSON: {exc.msg} at column {exc.colno}",
                           ) from None
    except RecursionError:
        raise InvalidInput(f"{source} nests too deeply") from None


async def _add(args: argparse.Namespace, settings: Settings, now: Any) -> int:
    from engine.registry import default_registry
    from schedules import service
    from schedules.store import SqliteScheduleStore

    # Every check before the store is opened: bad input writes nothing.
    new = service.check_new(default_registry(settings), args.account, args.name, args.cron,
                            args.timezone, args.job, _job_args(args), now, args.catch_up,
                            args.paused)
    store = await SqliteScheduleStore.open(settings.store_target)
    try:
        rec = await service.create(store, new, service.cli_actor(), now)
    finally:
        await store.close()
    print_result(service.to_json(rec, now), args.json, _schedule_text)
    return 0


async def _one(args: argparse.Namespace, settings: Settings, now: Any) -> int:
    from engine.client import Client
    from engine.store import open_store
    from schedules import service
    from schedules.store import SqliteScheduleStore

    service.check_name(args.name)
    store = await SqliteScheduleStore.open(settings.store_target)
    try:
        if args.action == "show":
            rec = await service.get(store, args.account, args.name)
            tasks = await open_store(settings)
            try:
                shown = await service.show(store, tasks, rec, now)
            finally:
                await tasks.close()
            print_result(shown, args.json, _show_text)
        elif args.action in ("pause", "resume"):
            rec = await service.pause(store, args.account, args.name,
                                      args.action == "pause", now)
            print_result(service.to_json(rec, now), args.json, _schedule_text)
        elif args.action == "delete":
            rec = await service.delete(store, args.account, args.name)
            print_result({"deleted": rec.name, "schedule_id": rec.schedule_id,
                          "project": rec.project}, args.json, lines)
        else:  # run-now
            rec = await service.get(store, args.account, args.name)
            async with await Client.open(settings) as client:
                task = await service.run_now(store, client.enqueue, rec, now)
            print_result({"task_id": task.task_id, "task_status": task.status},
                         args.json, lambda d: str(d["task_id"]))
    finally:
        await store.close()
    return 0


def _schedule_text(data: dict[str, Any]) -> str:
    return lines({k: v for k, v in data.items() if k != "firings"})


def _show_text(data: dict[str, Any]) -> str:
    out = _schedule_text(data)
    firings = data["firings"]
    if not firings:
        return out + "\n\nno firings yet"
    slot = max(len(f["slot"]) for f in firings)
    rows = [f"{'SLOT (UTC)':{slot}}  {'KIND':8}  {'STATUS':9}  TASK"]
    rows += [f"{f['slot']:{slot}}  {f['kind']:8}  {f['status']:9}  "
             f"{f['task_id'] or '-'}{'  (' + f['error'] + ')' if f['error'] else ''}"
             for f in firings]
    return out + "\n\nlast firings, newest first:\n" + "\n".join(rows)


def _table(rows: list[dict[str, Any]]) -> str:
    builtin = [r for r in rows if r["kind"] == "builtin"]
    user = [r for r in rows if r["kind"] == "user"]
    parts: list[str] = []
    if builtin:
        name = max(len(r["name"]) for r in builtin)
        every = max(len(r["when"]) for r in builtin)
        due = max(len(r["next_run"]) for r in builtin)
        parts.append(f"{'NAME':{name}}  {'RUNS':{every}}  {'NEXT (UTC)':{due}}  WHAT")
        parts += [f"{r['name']:{name}}  {r['when']:{every}}  {r['next_run']:{due}}  "
                  f"{r['description']}" for r in builtin]
    if user:
        if parts:
            parts.append("")
        name = max(4, *(len(r["name"]) for r in user))
        cron = max(4, *(len(r["cron"]) for r in user))
        zone = max(8, *(len(r["timezone"]) for r in user))
        due = max(10, *(len(r["next_run"] or "paused") for r in user))
        parts.append(f"{'NAME':{name}}  {'CRON':{cron}}  {'TIMEZONE':{zone}}  "
                     f"{'NEXT (UTC)':{due}}  JOB")
        parts += [f"{r['name']:{name}}  {r['cron']:{cron}}  {r['timezone']:{zone}}  "
                  f"{r['next_run'] or 'paused':{due}}  {r['job']}" for r in user]
    return "\n".join(parts) if parts else "no schedules"
