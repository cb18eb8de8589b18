"""The engine over HTTPS: enqueue jobs, tasks, failure records, retries, job names.

Prefix ``/v1/{project_id}/dew``, error codes ``DEW.xxxx``. Everything is the
caller's project's: a task belongs to the project that enqueued it (the
engine's ``tasks.project``) and a failure record to its task's project; another
project's task or record answers 404 exactly as one that does not exist.
Enqueuing (or retrying) job ``X.y`` needs the action ``X:jobs:enqueue``
(``handlers/builtin/roles.py``), and the job runs for the caller's project: its
``account`` argument is set to the project's name (another one is refused).
See docs/api.md, "The engine".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from engine.api import fields as f
from engine.api.jobs import CallJobs, call_jobs
from engine.api.operations import Call, Operation, Reply
from engine.client import check_defer, check_json_args, check_task_id
from engine.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from engine.models import TASK_STATUSES, FailureRecord, TaskRecord
from engine.redaction import redact
from handlers.builtin.roles import enqueue_action

ERROR_PREFIX = "DEW"
PREFIX = "/v1/{project_id}/dew"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def _bad(name: str, problem: str) -> InvalidInput:
    return InvalidInput(f"{name}: {problem}", code="invalid_parameter", target=name)


def _jobs(call: Call) -> CallJobs:
    return call_jobs(call.jobs)


def task_view(jobs: CallJobs, task: TaskRecord) -> dict[str, Any]:
    """A task as the API shows it: secrets redacted (also the job's declared secret
    fields, whatever their names)."""
    shown = task.to_json()
    if task.name in jobs.client.registry:
        shown["args"] = redact(task.args, jobs.client.registry.get(task.name).secret_fields)
    return shown


def failure_view(record: FailureRecord) -> dict[str, Any]:
    return record.to_json()


# --- query fields -------------------------------------------------------------------


def _limit(query: Mapping[str, str]) -> int:
    text = query.get("limit")
    if text is None or text == "":
        return DEFAULT_LIMIT
    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise _bad("limit", f"must be an integer between 1 and {MAX_LIMIT}, got {text[:32]!r}")
    return int(text)


def _time(query: Mapping[str, str], name: str) -> datetime | None:
    text = query.get(name)
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(name, f"must be an ISO 8601 time (2026-12-01T10:00:00Z), got {text[:40]!r}"
                   ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _page(items: list[dict[str, Any]], key: str, limit: int) -> str | None:
    """The marker of the next page: the last item's id when the page is full."""
    return str(items[-1][key]) if len(items) == limit and items else None


# --- enqueue ------------------------------------------------------------------------


def _job_args(call: Call, name: str, args: Any) -> dict[str, Any]:
    """The job's arguments, run for the caller's project (``account``)."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _bad("args", "must be a JSON object")
    try:
        checked: dict[str, Any] = dict(check_json_args(args))
    except InvalidInput as exc:
        raise _bad("args", exc.message) from None
    account = checked.get("account")
    if account is not None and account != call.account:
        raise PermissionDenied(
            f"args.account: a job runs for the caller's project ({call.account}), not "
            f"{str(account)[:64]!r}", code="project_mismatch", target="args.account")
    checked["account"] = call.account
    return checked


async def enqueue(call: Call) -> Reply:
    jobs = _jobs(call)
    body = f.body_object(call.body)
    name = f.required_text(body, "name", max_len=200)
    # The action comes from the name alone: who may not enqueue kps.* jobs learns
    # nothing about which exist.
    call.principal.require(enqueue_action(name))
    spec = jobs.client.registry.get(name)  # UnknownJob: 400
    args = _job_args(call, spec.name, body.get("args"))
    task_id = f.text(body, "task_id", required=False, max_len=200)
    if task_id is not None:
        check_task_id(task_id)
    defer = body.get("defer")
    if defer is not None:
        if isinstance(defer, bool) or not isinstance(defer, (int, float)) \
                or not math.isfinite(defer):
            raise _bad("defer", "must be a number of seconds")
        check_defer(float(defer))
    task = await jobs.enqueue(spec.name, args, task_id=task_id,
                              defer=None if defer is None else float(defer))
    return Reply(task_view(jobs, task), 202)


# --- tasks --------------------------------------------------------------------------


async def list_tasks(call: Call) -> dict[str, Any]:
    jobs = _jobs(call)
    status = call.query.get("status") or None
    if status is not None and status not in TASK_STATUSES:
        raise _bad("status", f"must be one of {', '.join(TASK_STATUSES)}, got {status[:32]!r}")
    limit = _limit(call.query)
    tasks = await jobs.client.store.list_tasks(
        status=status, name=call.query.get("name") or None,
        limit=limit, project=jobs.project, since=_time(call.query, "since"),
        until=_time(call.query, "until"), marker=call.query.get("marker") or None)
    shown = [task_view(jobs, t) for t in tasks]
    return {"tasks": shown, "count": len(shown), "next_marker": _page(shown, "task_id", limit)}


async def show_task(call: Call) -> dict[str, Any]:
    jobs = _jobs(call)
    task = await jobs.client.get(call.params["task_id"], jobs.project)
    return task_view(jobs, task)


async def _retry(call: Call, jobs: CallJobs, task_id: str) -> Reply:
    task = await jobs.client.get(task_id, jobs.project)
    call.principal.require(enqueue_action(task.name))
    retry = await jobs.client.retry(task_id, f"{call.principal.actor} request={call.request_id}",
                                    jobs.project)
    return Reply(task_view(jobs, jobs.named(retry)), 202)


async def retry_task(call: Call) -> Reply:
    jobs = _jobs(call)
    return await _retry(call, jobs, call.params["task_id"])


# --- failure records ----------------------------------------------------------------


async def list_failures(call: Call) -> dict[str, Any]:
    jobs = _jobs(call)
    limit = _limit(call.query)
    records = await jobs.client.store.list_failures(
        operation=call.query.get("operation") or None, task_id=call.query.get("task_id") or None,
        limit=limit, project=jobs.project, marker=call.query.get("marker") or None)
    shown = [failure_view(r) for r in records]
    return {"failures": shown, "count": len(shown),
            "next_marker": _page(shown, "failure_id", limit)}


async def _failure(jobs: CallJobs, failure_id: str) -> FailureRecord:
    record = await jobs.client.store.get_failure(failure_id, jobs.project)
    if record is None:
        raise NotFound(f"no failure record with id {failure_id!r}", target=failure_id)
    return record


async def show_failure(call: Call) -> dict[str, Any]:
    jobs = _jobs(call)
    return failure_view(await _failure(jobs, call.params["failure_id"]))


async def delete_failure(call: Call) -> Reply:
    jobs = _jobs(call)
    failure_id = call.params["failure_id"]
    if not await jobs.client.store.delete_failure(failure_id, jobs.project):
        raise NotFound(f"no failure record with id {failure_id!r}", target=failure_id)
    return Reply(status=204)


async def delete_failures(call: Call) -> dict[str, Any]:
    jobs = _jobs(call)
    count = await jobs.client.store.delete_all_failures(
        jobs.project, call.query.get("operation") or None)
    return {"deleted": count}


async def retry_failure(call: Call) -> Reply:
    jobs = _jobs(call)
    record = await _failure(jobs, call.params["failure_id"])
    if await jobs.client.store.get_task(record.task_id, jobs.project) is None:
        raise Conflict(f"failure record {record.failure_id} has no task to retry",
                       code="no_task", target=record.failure_id)
    return await _retry(call, jobs, record.task_id)


# --- jobs ---------------------------------------------------------------------------


async def list_jobs(call: Call) -> dict[str, Any]:
    registry = _jobs(call).client.registry
    return {"jobs": [{
        "name": spec.name,
        "description": spec.description,
        "fields": dict(spec.fields),
        "secret_fields": sorted(spec.secret_fields),
        "enqueue_action": enqueue_action(spec.name),
        "allowed": call.principal.allows(enqueue_action(spec.name)),
    } for spec in registry]}


def operations() -> list[Operation]:
    return [
        Operation("EnqueueJob", "POST", f"{PREFIX}/tasks", enqueue, None),
        Operation("ListTasks", "GET", f"{PREFIX}/tasks", list_tasks, "dew:tasks:list"),
        Operation("ShowTask", "GET", f"{PREFIX}/tasks/{{task_id}}", show_task, "dew:tasks:get"),
        Operation("RetryTask", "POST", f"{PREFIX}/tasks/{{task_id}}/retry", retry_task,
                  "dew:tasks:retry"),
        Operation("ListFailures", "GET", f"{PREFIX}/failures", list_failures,
                  "dew:failures:list"),
        Operation("DeleteFailures", "DELETE", f"{PREFIX}/failures", delete_failures,
                  "dew:failures:delete"),
        Operation("ShowFailure", "GET", f"{PREFIX}/failures/{{failure_id}}", show_failure,
                  "dew:failures:get"),
        Operation("DeleteFailure", "DELETE", f"{PREFIX}/failures/{{failure_id}}",
                  delete_failure, "dew:failures:delete"),
        Operation("RetryFailure", "POST", f"{PREFIX}/failures/{{failure_id}}/retry",
                  retry_failure, "dew:failures:retry"),
        Operation("ListJobs", "GET", f"{PREFIX}/jobs", list_jobs, "dew:jobs:list"),
    ]
