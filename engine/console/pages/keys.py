"""KMS keys: the list, a key's page, and what the role allows: enable, disable,
schedule or cancel its deletion (ListKeys, ListKeyDetail, EnableKey, DisableKey,
DeleteKey, CancelKeyDeletion: the SDK's operations)."""

from __future__ import annotations

from starlette.responses import Response

from engine.console.web import Page
from engine.errors import InvalidInput

PAGE_SIZE = 100
# The SDK's key_state codes, as the hosted console words them.
STATES = {"1": "Pending creation", "2": "Enabled", "3": "Disabled",
          "4": "Pending deletion", "5": "Pending import"}
MIN_DAYS, MAX_DAYS = 7, 1096


async def list_page(p: Page) -> Response:
    body = {"limit": str(PAGE_SIZE)}
    if p.query.get("marker"):
        body["marker"] = p.query["marker"]
    answer = (await p.caller.call("ListKeys", body=body)).body
    return p.render("keys.html", title="Keys", keys=answer.get("key_details") or [],
                    states=STATES, next_marker=answer.get("next_marker") or None)


async def show_page(p: Page) -> Response:
    key = (await p.caller.call("ListKeyDetail", body={"key_id": p.param("id")})).body[
        "key_info"]
    return p.render("key.html", title=f"Key {key.get('key_alias') or key['key_id']}",
                    key=key, states=STATES, min_days=MIN_DAYS, max_days=MAX_DAYS,
                    may={name: p.caller.may(name) for name in (
                        "EnableKey", "DisableKey", "DeleteKey", "CancelKeyDeletion")})


def pending_days(text: str | None) -> int:
    """The deletion form's days: a whole number from 7 to 1096."""
    value = (text or "").strip()
    if not value.isdigit() or not MIN_DAYS <= int(value) <= MAX_DAYS:
        raise InvalidInput(f"pending days: give a whole number from {MIN_DAYS} to {MAX_DAYS}, "
                           f"got {value[:20]!r}", target="pending_days")
    return int(value)


async def change(p: Page) -> Response:
    key_id, action = p.param("id"), p.param("action")
    if action == "schedule-deletion":
        days = pending_days(p.form.get("pending_days"))
        result = await p.caller.call("DeleteKey", body={"key_id": key_id,
                                                        "pending_days": str(days)})
        note = "deletion-scheduled"
    else:
        name, note = {"enable": ("EnableKey", "enabled"), "disable": ("DisableKey", "disabled"),
                      "cancel-deletion": ("CancelKeyDeletion", "deletion-cancelled")}[action]
        result = await p.caller.call(name, body={"key_id": key_id})
    if result.pending and result.task_id:  # the job goes on: its task tells the end
        return p.redirect(f"/tasks/{result.task_id}")
    return p.redirect(f"/keys/{key_id}", note)


ACTIONS = ("enable", "disable", "schedule-deletion", "cancel-deletion")
