"""The schedules over HTTPS (prefix ``DEW``): ``/v1/{project_id}/dew/schedules``.

The same operations as ``dew schedules``, in the caller's project. Creating a
schedule for job ``X.y`` and running one now also need ``X:jobs:enqueue``.
"""

from __future__ import annotations

from typing import Any

from engine.api.fields import body_object, boolean, obj, required_text, text
from engine.api.jobs import TASK_HEADER
from engine.api.operations import Call, Operation, Reply
from engine.models import utcnow
from engine.registry import default_registry
from schedules import service
from schedules.jobs import schedule_store, schedule_tasks

ERROR_PREFIX = "DEW"
BASE = "/v1/{project_id}/dew/schedules"
ONE = BASE + "/{schedule_name}"


def _actor(call: Call) -> str:
    return f"api:{call.principal.user}@{call.principal.project}"


async def create_schedule(call: Call) -> Any:
    body = body_object(call.body)
    name = required_text(body, "name", max_len=64)
    cron = required_text(body, "cron", max_len=service.MAX_CRON)
    timezone = text(body, "timezone", required=False, default="UTC", max_len=64) or "UTC"
    job = required_text(body, "job", max_len=128)
    args = obj(body, "args", required=False)
    catch_up = bool(boolean(body, "catch_up", default=False))
    paused = bool(boolean(body, "paused", default=False))
    job_args = dict(args or {})
    # As the engine's EnqueueJob: the job runs for the caller's project.
    job_args.setdefault("account", call.account)
    now = utcnow()
    new = service.check_new(default_registry(call.settings), call.account, name, cron,
                            timezone, job, job_args, now, catch_up, paused)
    call.principal.require(service.enqueue_action(job))
    rec = await service.create(await schedule_store(call.resources), new, _actor(call), now)
    return {"schedule": service.to_json(rec, now)}


async def list_schedules(call: Call) -> Any:
    now = utcnow()
    rows = [service.to_json(r, now)
            for r in await (await schedule_store(call.resources)).list_schedules(call.account)]
    return {"schedules": rows, "total": len(rows)}


async def show_schedule(call: Call) -> Any:
    store = await schedule_store(call.resources)
    rec = await service.get(store, call.account, call.params["schedule_name"])
    shown = await service.show(store, await schedule_tasks(call.resources), rec, utcnow())
    return {"schedule": shown}


async def _set_paused(call: Call, paused: bool) -> Any:
    now = utcnow()
    rec = await service.pause(await schedule_store(call.resources), call.account,
                              call.params["schedule_name"], paused, now)
    return {"schedule": service.to_json(rec, now)}


async def pause_schedule(call: Call) -> Any:
    return await _set_paused(call, True)


async def resume_schedule(call: Call) -> Any:
    return await _set_paused(call, False)


async def run_schedule(call: Call) -> Any:
    store = await schedule_store(call.resources)
    rec = await service.get(store, call.account, call.params["schedule_name"])
    call.principal.require(service.enqueue_action(rec.job))
    task = await service.run_now(store, call.jobs.enqueue, rec, utcnow())
    call.headers[TASK_HEADER] = task.task_id
    return {"task_id": task.task_id, "task_status": task.status, "schedule": rec.name}


async def delete_schedule(call: Call) -> Reply:
    await service.delete(await schedule_store(call.resources), call.account,
                         call.params["schedule_name"])
    return Reply(status=204)


def operations() -> list[Operation]:
    return [
        Operation("CreateSchedule", "POST", BASE, create_schedule, "dew:schedules:create"),
        Operation("ListSchedules", "GET", BASE, list_schedules, "dew:schedules:list"),
        Operation("ShowSchedule", "GET", ONE, show_schedule, "dew:schedules:get"),
        Operation("PauseSchedule", "POST", ONE + "/pause", pause_schedule,
                  "dew:schedules:update"),
        Operation("ResumeSchedule", "POST", ONE + "/resume", resume_schedule,
                  "dew:schedules:update"),
        Operation("RunSchedule", "POST", ONE + "/run-now", run_schedule, "dew:schedules:run"),
        Operation("DeleteSchedule", "DELETE", ONE, delete_schedule, "dew:schedules:delete"),
    ]
