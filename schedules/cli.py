"""``dew schedules list``: every cron entry, when it runs and when it is next due."""

from __future__ import annotations

import argparse
import itertools
from typing import Any

from engine.cli_output import print_result
from engine.settings import Settings


def register(subparsers: Any, commands: dict[str, Any]) -> None:
    top = subparsers.add_parser("schedules", help="the cron table: what runs when")
    sub = top.add_subparsers(dest="action", metavar="ACTION", required=True,
                             parser_class=type(top))
    p = sub.add_parser("list", help="every cron entry with its next due time")
    p.add_argument("--json", action="store_true", help="print JSON")
    commands["schedules"] = cmd_schedules


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


def cmd_schedules(args: argparse.Namespace, settings: Settings) -> int:
    from engine.cron import cron_table
    from engine.models import iso, utcnow

    now = utcnow()
    rows = [
        {"name": e.name, "when": when(e.second, e.minute),
         "at_startup": e.run_at_startup, "next_run": iso(e.next_run(now)),
         "description": e.description}
        for e in cron_table(settings)
    ]
    print_result(rows, args.json, _table)
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no cron entries"
    name = max(len(r["name"]) for r in rows)
    every = max(len(r["when"]) for r in rows)
    lines = [f"{'NAME':{name}}  {'RUNS':{every}}  NEXT (UTC)  WHAT"]
    lines += [f"{r['name']:{name}}  {r['when']:{every}}  {r['next_run'][11:19]:10}  "
              f"{r['description']}" for r in rows]
    return "\n".join(lines)
