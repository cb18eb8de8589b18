"""Failed-task reports: the list (filter by operation, target, time), one report with
the task behind it, retry, delete one, delete all (after a confirmation page).

Through the engine's operations: ListFailures, ShowFailure, ShowTask,
RetryFailure, DeleteFailure, DeleteFailures. The error, cause and fix are the
record's, as the product's table words them.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from engine.console import filters as f
from engine.console.web import Page
from engine.errors import InvalidInput, NotFound

PAGE_SIZE = 50
SPEC = {"operation": f.name, "target": f.text, "since": f.time, "until": f.time}


async def list_page(p: Page) -> Response:
    chosen = f.read(p.query, SPEC)
    marker = p.query.get("marker") or ""
    query = {"limit": str(PAGE_SIZE), "operation": chosen["operation"] or "",
             "marker": marker}
    answer = (await p.caller.call("ListFailures", query=query)).body
    rows = [r for r in answer["failures"] if _kept(r, chosen)]
    next_query = {**{k: v for k, v in chosen.given.items() if v and not chosen.error},
                  "marker": answer.get("next_marker") or ""}
    return p.render("failures.html", title="Failed tasks", failures=rows, filters=chosen,
                    next_query=next_query if answer.get("next_marker") else None,
                    may_delete=p.caller.may("DeleteFailure"),
                    may_delete_all=p.caller.may("DeleteFailures"),
                    may_retry=p.caller.may("RetryFailure"))


def _kept(row: dict[str, Any], chosen: f.Filters) -> bool:
    target = chosen["target"]
    if target is not None and target not in str(row.get("target") or ""):
        return False
    return f.created_within(row, "created_at", chosen["since"], chosen["until"])


async def show_page(p: Page) -> Response:
    record = (await p.caller.call("ShowFailure", params={"failure_id": p.param("id")})).body
    task = None
    if p.caller.may("ShowTask"):
        try:
            task = (await p.caller.call("ShowTask",
                                        params={"task_id": record["task_id"]})).body
        except NotFound:
            task = None  # the task row is gone: the report stands alone
    return p.render("failure.html", title="Failed-task report", failure=record, task=task,
                    may_delete=p.caller.may("DeleteFailure"),
                    may_retry=p.caller.may("RetryFailure") and not record.get("retried_at"))


async def delete(p: Page) -> Response:
    await p.caller.call("DeleteFailure", params={"failure_id": p.param("id")})
    return p.redirect("/failures", "deleted")


async def retry(p: Page) -> Response:
    result = await p.caller.call("RetryFailure", params={"failure_id": p.param("id")})
    return p.redirect(f"/tasks/{result.body['task_id']}", "retried")


async def confirm_delete_all(p: Page) -> Response:
    """Asks first: how many records would go (of the operation, if one is chosen)."""
    chosen = f.read(p.query, {"operation": f.name})
    query = {"limit": "1000", "operation": chosen["operation"] or ""}
    # Asked before a GET shows the form: a user who may not delete sees 403, not a form.
    p.caller.require("DeleteFailures")
    answer = (await p.caller.call("ListFailures", query=query)).body
    return p.render("confirm_delete_all.html", title="Delete every failure record?",
                    count=answer["count"], more=bool(answer.get("next_marker")),
                    operation=chosen["operation"], filters=chosen)


async def delete_all(p: Page) -> Response:
    operation = p.form.get("operation") or ""
    if operation:
        try:
            f.name(operation)
        except f.BadFilter as exc:
            raise InvalidInput(f"operation {exc}", target="operation") from None
    await p.caller.call("DeleteFailures", query={"operation": operation})
    return p.redirect("/failures", "deleted-all")
