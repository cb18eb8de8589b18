"""Schedules: the list, a schedule's page with its latest firings, and pause, resume
and run-now (ListSchedules, ShowSchedule, PauseSchedule, ResumeSchedule,
RunSchedule)."""

from __future__ import annotations

from starlette.responses import Response

from engine.console.web import Page

ACTIONS = {"pause": ("PauseSchedule", "paused"), "resume": ("ResumeSchedule", "resumed"),
           "run-now": ("RunSchedule", "ran")}


async def list_page(p: Page) -> Response:
    answer = (await p.caller.call("ListSchedules")).body
    return p.render("schedules.html", title="Schedules", schedules=answer["schedules"])


async def show_page(p: Page) -> Response:
    shown = (await p.caller.call("ShowSchedule", params={
        "schedule_name": p.param("name")})).body["schedule"]
    return p.render("schedule.html", title=f"Schedule {shown['name']}", schedule=shown,
                    may={name: p.caller.may(name) for name, _ in ACTIONS.values()})


async def change(p: Page) -> Response:
    name = p.param("name")
    operation, note = ACTIONS[p.param("action")]
    result = await p.caller.call(operation, params={"schedule_name": name})
    if operation == "RunSchedule" and result.body.get("task_id"):
        return p.redirect(f"/tasks/{result.body['task_id']}", note)
    return p.redirect(f"/schedules/{name}", note)
