"""Tasks: the list with filters and paging; a task's page with its arguments (secrets
redacted by the operation), attempts, timeline, result or error, its failure
records, and for a job over several servers (a batch bind) one row per server,
refreshing itself while the task runs.

Through ListTasks, ShowTask, ListFailures and RetryTask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from engine.console import filters as f
from engine.console.web import Page
from engine.models import TASK_STATUSES

PAGE_SIZE = 50
REFRESH_SECONDS = 2
SPEC = {"status": f.choice(*TASK_STATUSES), "name": f.name, "since": f.time, "until": f.time}


async def list_page(p: Page) -> Response:
    chosen = f.read(p.query, SPEC)
    query = {"limit": str(PAGE_SIZE), "status": chosen["status"] or "",
             "name": chosen["name"] or "", "since": f.iso_z(chosen["since"]) or "",
             "until": f.iso_z(chosen["until"]) or "", "marker": p.query.get("marker") or ""}
    answer = (await p.caller.call("ListTasks", query=query)).body
    next_query = {**{k: v for k, v in chosen.given.items() if v and not chosen.error},
                  "marker": answer.get("next_marker") or ""}
    return p.render("tasks.html", title="Tasks", tasks=answer["tasks"], filters=chosen,
                    statuses=TASK_STATUSES,
                    next_query=next_query if answer.get("next_marker") else None)


async def show_page(p: Page) -> Response:
    task = (await p.caller.call("ShowTask", params={"task_id": p.param("id")})).body
    failures: list[dict[str, Any]] = []
    if p.caller.may("ListFailures"):
        failures = (await p.caller.call(
            "ListFailures", query={"task_id": task["task_id"], "limit": "1000"})).body[
            "failures"]
    servers = server_rows(task, failures, await live_progress(p, task))
    running = task["status"] in ("queued", "running")
    retryable = task["status"] == "failed" or (
        task["status"] == "succeeded" and bool(failures)
        and not any(r.get("retried_at") for r in failures))
    return p.render("task.html", title=f"Task {task['task_id']}", task=task,
                    failures=failures, servers=servers, timeline=timeline(task, failures),
                    refresh=REFRESH_SECONDS if running else None,
                    may_retry=retryable and p.caller.may("RetryTask"))


async def retry(p: Page) -> Response:
    result = await p.caller.call("RetryTask", params={"task_id": p.param("id")})
    return p.redirect(f"/tasks/{result.body['task_id']}", "retried")


def servers_of(args: Mapping[str, Any]) -> list[str]:
    """The servers a job names (``servers``: names, or ``{"server": name}`` items)."""
    out = []
    for item in args.get("servers") or []:
        server = item.get("server") if isinstance(item, Mapping) else item
        if isinstance(server, str):
            out.append(server)
    return out


def server_rows(task: Mapping[str, Any], failures: list[dict[str, Any]],
                live: Mapping[str, str]) -> list[dict[str, str]]:
    """One row per server of the task: its state from the task's result once it ended,
    else from the live progress and the failure records written so far."""
    names = servers_of(task.get("args") or {})
    if not names:
        return []
    ended: dict[str, Mapping[str, Any]] = {}
    result = task.get("result") or (task.get("error") or {}).get("result")
    if isinstance(result, Mapping):
        for item in result.get("servers") or []:
            if isinstance(item, Mapping) and isinstance(item.get("server"), str):
                ended[item["server"]] = item
    failed = {str(r["target"]): r for r in failures if r.get("target")}
    rows = []
    for server in names:
        if server in ended:
            state, detail = str(ended[server].get("status", "")), str(
                ended[server].get("error") or ended[server].get("reason") or "")
        elif server in failed:
            state, detail = "failed", str(failed[server].get("error", ""))
        else:
            state = live.get(server) or ("waiting" if task["status"] in ("queued", "running")
                                         else str(task["status"]))
            detail = ""
        rows.append({"server": server, "state": state, "detail": detail})
    return rows


async def live_progress(p: Page, task: Mapping[str, Any]) -> Mapping[str, str]:
    """Which servers of a running task are running or done now, where the task's service
    keeps such progress: its resource (named after the job's service) with a store that
    answers ``progress(task_id)`` (the KPS's, which ``dew keypairs bind`` reads too).
    Shown only on the page of a task the user may already see (ShowTask)."""
    if task.get("status") != "running" or not servers_of(task.get("args") or {}):
        return {}
    resources = p.console.state.resources
    service = str(task["name"]).partition(".")[0]
    if resources is None or not service:
        return {}
    try:
        provider = await resources.get(service)
    except LookupError:
        return {}
    progress = getattr(getattr(provider, "store", None), "progress", None)
    if progress is None:
        return {}
    found = await progress(task["task_id"])
    return {str(k): str(v) for k, v in dict(found).items()}


def timeline(task: Mapping[str, Any], failures: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(time, what happened), oldest first."""
    events = [(task.get("enqueued_at"), "enqueued" + (
        f" (a retry of {task['retry_of']})" if task.get("retry_of") else ""))]
    if task.get("due_at") and task.get("due_at") != task.get("enqueued_at"):
        events.append((task["due_at"], "due (deferred or waiting for its next try)"))
    if task.get("started_at"):
        events.append((task["started_at"], f"started (attempt {task.get('attempts', 1)})"))
    for record in failures:
        events.append((record.get("created_at"),
                       f"failure recorded: {record.get('target') or 'the task'}: "
                       f"{record.get('error')}"))
        if record.get("retried_at"):
            events.append((record["retried_at"], f"retried by {record.get('retried_by')} as "
                                                 f"task {record.get('retry_task_id')}"))
    if task.get("finished_at"):
        events.append((task["finished_at"], f"ended {task['status']}"))
    return sorted(((str(at), what) for at, what in events if at), key=lambda e: e[0])
