"""Human-readable output of the CLI (``--json`` prints the records as they are)."""

from __future__ import annotations

import json

# typing costs every `dew` start ~8 ms; annotations are strings here, so only mypy needs it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _short(value: Any, width: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _time(value: str | None) -> str:
    return "-" if not value else value[:19].replace("T", " ")


def _deferred(t: dict[str, Any]) -> bool:
    """Whether a task waits for a time later than its enqueueing (``--defer``, a retry)."""
    due, enqueued = t.get("due_at"), t.get("enqueued_at")
    return bool(due and enqueued and due > enqueued)


def task_table(tasks: list[dict[str, Any]]) -> str:
    if not tasks:
        return "no tasks"
    lines = [f"{'TASK ID':34} {'NAME':24} {'STATUS':9} {'TRIES':>5}  {'ENQUEUED (UTC)':19}  RESULT"]
    for t in tasks:
        outcome = t["result"] if t["status"] == "succeeded" else (t["error"] or {}).get(
            "message", "")
        if t["status"] == "queued" and _deferred(t):
            outcome = f"runs at {_time(t['due_at'])}"
        lines.append(
            f"{_short(t['task_id'], 34):34} {_short(t['name'], 24):24} {t['status']:9} "
            f"{t['attempts']:>5}  {_time(t['enqueued_at']):19}  {_short(outcome, 40)}"
        )
    return "\n".join(lines)


def task(t: dict[str, Any]) -> str:
    lines = [
        f"task      {t['task_id']}",
        f"name      {t['name']}",
        f"status    {t['status']}",
        f"project   {t.get('project') or '-'}",
        f"attempts  {t['attempts']}",
        f"args      {json.dumps(t['args'])}",
        f"enqueued  {_time(t['enqueued_at'])}",
        *([f"runs at   {_time(t['due_at'])}"] if t["status"] == "queued" and _deferred(t)
          else []),
        f"started   {_time(t['started_at'])}",
        f"finished  {_time(t['finished_at'])}",
    ]
    if t.get("retry_of"):
        lines.append(f"retry of  {t['retry_of']}")
    if t.get("cancel_requested_at"):
        pending = " (stops at its next safe point)" if t["status"] == "running" else ""
        lines.append(f"cancel    requested {_time(t['cancel_requested_at'])} by "
                     f"{t.get('cancel_requested_by') or '-'}{pending}")
    # A task cancelled while it ran keeps what it did before it stopped.
    if t["status"] == "succeeded" or (t["status"] == "cancelled" and t["result"] is not None):
        lines.append(f"result    {json.dumps(t['result'])}")
    if t.get("error"):
        err = t["error"]
        label = "error" if t["status"] in ("failed", "cancelled") else "last error"
        lines.append(f"{label:9} {err.get('message')} [{err.get('code')}]")
    for f in t.get("failures", []):
        lines.append(f"failure   {f['failure_id']}  {f['target'] or '-'}: {f['error']}")
    return "\n".join(lines)


def cancelled(t: dict[str, Any]) -> str:
    """What ``dew tasks cancel`` did: cancelled at once, or asked a running task to stop."""
    if t["status"] == "cancelled":
        return f"task {t['task_id']} cancelled"
    return f"task {t['task_id']}: cancel requested; the task stops at its next safe point"


def failure_table(records: list[dict[str, Any]]) -> str:
    if not records:
        return "no failure records"
    lines = [f"{'FAILURE ID':34} {'OPERATION':20} {'TARGET':16} {'CATEGORY':14} ERROR"]
    for f in records:
        lines.append(
            f"{f['failure_id']:34} {_short(f['operation'], 20):20} "
            f"{_short(f['target'] or '-', 16):16} {_short(f['category'], 14):14} "
            f"{_short(f['error'], 60)}"
        )
    return "\n".join(lines)


def failure(f: dict[str, Any]) -> str:
    return "\n".join([
        f"failure    {f['failure_id']}",
        f"task       {f['task_id']}",
        f"operation  {f['operation']}",
        f"target     {f['target'] or '-'}",
        f"category   {f['category']}",
        f"error      {f['error']}",
        f"cause      {f['cause'] or '-'}",
        f"fix        {f['fix'] or '-'}",
        f"time       {_time(f['created_at'])}",
        *([f"retried    {_time(f['retried_at'])} by {f.get('retried_by') or '-'} as task "
           f"{f.get('retry_task_id')}"] if f.get("retried_at") else []),
    ])
