"""The dashboard: tasks by status and failures in the last 24 hours, running batch
binds (jobs over several servers) with their progress, the next schedule firings.

Each panel is shown only when the user's roles allow its operation (ListTasks,
ListFailures, ListSchedules); the others say so.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from starlette.responses import Response

from engine.console import filters as f
from engine.console.pages.tasks import servers_of
from engine.console.web import Page
from engine.models import TASK_STATUSES, utcnow

WINDOW = timedelta(hours=24)
PAGES = 10  # at most 10 x 1000 tasks are counted; past that the count says "at least"
SHOWN = 5


async def page(p: Page) -> Response:
    since = utcnow() - WINDOW
    return p.render(
        "dashboard.html", title="Dashboard", now=utcnow().isoformat(),
        tasks=await _task_counts(p, since) if p.caller.may("ListTasks") else None,
        failures=await _failures(p, since) if p.caller.may("ListFailures") else None,
        binds=await _running_batches(p) if p.caller.may("ListTasks") else None,
        firings=await _next_firings(p) if p.caller.may("ListSchedules") else None,
        statuses=TASK_STATUSES)


async def _task_counts(p: Page, since: Any) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    marker, complete = "", True
    for _ in range(PAGES):
        answer = (await p.caller.call("ListTasks", query={
            "limit": "1000", "since": f.iso_z(since) or "", "marker": marker})).body
        counts.update(t["status"] for t in answer["tasks"])
        marker = answer.get("next_marker") or ""
        if not marker:
            break
    else:
        complete = False
    return {"counts": counts, "total": sum(counts.values()), "complete": complete,
            "since": f.iso_z(since)}


async def _failures(p: Page, since: Any) -> dict[str, Any]:
    answer = (await p.caller.call("ListFailures", query={"limit": "1000"})).body
    recent = [r for r in answer["failures"] if f.created_within(r, "created_at", since, None)]
    return {"count": len(recent), "latest": recent[:SHOWN],
            "complete": not answer.get("next_marker")}


async def _running_batches(p: Page) -> list[dict[str, Any]]:
    answer = (await p.caller.call("ListTasks", query={"status": "running",
                                                      "limit": "1000"})).body
    out = []
    for task in answer["tasks"]:
        servers = servers_of(task.get("args") or {})
        if servers:
            out.append({"task": task, "servers": len(servers)})
    return out


async def _next_firings(p: Page) -> list[dict[str, Any]]:
    answer = (await p.caller.call("ListSchedules")).body
    live = [s for s in answer["schedules"] if not s.get("paused") and s.get("next_run")]
    return sorted(live, key=lambda s: str(s["next_run"]))[:SHOWN]
