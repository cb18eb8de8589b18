"""User schedules: checks, due slots, firing, run-now and what ``show`` prints.

A schedule runs one job with fixed arguments on a cron expression (croniter, five
fields, minute precision) in a time zone (zoneinfo). Each slot's task id is
derived from the schedule and the slot (``sched-<schedule_id>-<YYYYMMDDTHHMMZ>``,
the slot in UTC), and the client's enqueue is idempotent on the task id, so two
workers, or a restart, never run a slot twice. Every function takes ``now``, so
tests move a clock instead of waiting for minutes.

Firing (``fire_due``, every minute from the cron entry ``schedules.fire_due``):
for each active schedule, the slots after its last slot (or its creation) up to
``now`` are due. Those at most ``GRACE`` old fire, each as its own task. Older
ones were missed (no worker ran): skipped and noted, or, with ``catch_up``, run
once (the latest missed slot's task). Then the last slot moves with a
compare-and-set that also records the firings.
"""

from __future__ import annotations

import getpass
import inspect
import re
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from engine.client import check_json_args
from engine.errors import DewError, InvalidInput, NotFound, TransientError
from engine.logs import get_logger
from engine.models import iso
from engine.redaction import redact
from schedules.store import FiringRecord, ScheduleRecord, SqliteScheduleStore

if TYPE_CHECKING:
    from engine.client import Client
    from engine.models import TaskRecord
    from engine.registry import Registry
    from engine.store import TaskStore

log = get_logger("dew.schedules")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_CRON = 200
# A slot at most this late fires as usual (a worker restart, a late tick);
# older slots were missed: skipped, or caught up once.
GRACE = timedelta(seconds=120)
MAX_ON_TIME = 10  # slots fired per schedule and tick (a catch-up run besides)
SLOT_FORMAT = "%Y%m%dT%H%MZ"
FIRINGS_SHOWN = 20


@dataclass(frozen=True)
class NewSchedule:
    """A checked request to create a schedule."""

    project: str
    name: str
    cron: str
    timezone: str
    job: str
    args: dict[str, Any]
    catch_up: bool = False
    paused: bool = False


# --- checks --------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise InvalidInput(f"invalid schedule name {name!r}: use 1-64 letters, digits, '.', "
                           "'_' or '-', starting with a letter or digit", target="name")
    return name


def check_timezone(name: str) -> ZoneInfo:
    if not name or len(name) > 64:
        raise InvalidInput(f"unknown timezone {name!r}", target="timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidInput(f"unknown timezone {name!r} (an IANA name such as Europe/Berlin "
                           "or UTC)", target="timezone") from None


def next_slot(expr: str, tz: ZoneInfo, after: datetime) -> datetime:
    """The first slot of ``expr`` strictly after ``after``, in UTC. InvalidInput
    when the expression does not parse or has no slot after ``after``."""
    if len(expr) > MAX_CRON or len(expr.split()) != 5:
        raise InvalidInput(f"cron expression {expr!r} does not parse: it needs 5 fields "
                           "(minute hour day-of-month month day-of-week)", target="cron")
    try:
        found = croniter(expr, after.astimezone(tz)).get_next(datetime)
    except CroniterBadDateError:
        raise InvalidInput(f"cron expression {expr!r} has no future slot",
                           target="cron") from None
    except (CroniterError, ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise InvalidInput(f"cron expression {expr!r} does not parse: {exc}",
                           target="cron") from None
    assert isinstance(found, datetime)
    return found.astimezone(UTC)


def check_new(
    registry: Registry, project: str, name: str, cron: str, timezone: str, job: str,
    args: Any, now: datetime, catch_up: bool = False, paused: bool = False,
) -> NewSchedule:
    """Every check of a new schedule, before anything is written (InvalidInput)."""
    check_name(name)
    tz = check_timezone(timezone)
    next_slot(cron, tz, now)
    args = check_json_args(args)
    spec = registry.check_args(job, args)
    if spec.secret_fields:
        raise InvalidInput(
            f"job {job} has secret arguments ({', '.join(sorted(spec.secret_fields))}); a "
            "schedule keeps its arguments in clear, so it cannot run this job",
            target="job", fix="Run it with `dew enqueue` (its secrets are sealed per task).")
    account = args.get("account")
    if account is not None and account != project:
        raise InvalidInput(f"args.account is {account!r}: a schedule of project {project} "
                           "runs its job in that project only", target="args")
    return NewSchedule(project, name, cron, timezone, job, args, catch_up, paused)


# --- slots and task ids --------------------------------------------------------------


def slot_task_id(schedule_id: str, slot: datetime) -> str:
    """``sched-<schedule_id>-<YYYYMMDDTHHMMZ>``: the one task of that slot."""
    return f"sched-{schedule_id}-{slot.astimezone(UTC).strftime(SLOT_FORMAT)}"


def run_now_task_id(schedule_id: str, now: datetime) -> str:
    """``sched-<schedule_id>-now-<YYYYMMDDTHHMMSS.ffffffZ>``: a run-now at that time."""
    return f"sched-{schedule_id}-now-{now.astimezone(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}"


def slots_back(expr: str, tz: ZoneInfo, after: datetime, until: datetime,
               limit: int) -> list[datetime]:
    """The latest ``limit`` slots in (after, until], oldest first, in UTC."""
    if until <= after:
        return []
    # Slots are whole minutes: those <= until are those before the next minute.
    start = until.astimezone(tz).replace(second=0, microsecond=0) + timedelta(minutes=1)
    found: list[datetime] = []
    try:
        it = croniter(expr, start)
        while len(found) < limit:
            slot = it.get_prev(datetime).astimezone(UTC)
            if slot <= after:
                break
            found.append(slot)
    except CroniterBadDateError:
        pass
    return found[::-1]


@dataclass(frozen=True)
class Due:
    on_time: list[datetime]
    missed: datetime | None  # the latest missed slot, if any

    @property
    def last(self) -> datetime | None:
        return self.on_time[-1] if self.on_time else self.missed


def due_slots(rec: ScheduleRecord, now: datetime) -> Due:
    tz = ZoneInfo(rec.timezone)
    edge = now - GRACE
    on_time = slots_back(rec.cron, tz, max(rec.anchor, edge), now, MAX_ON_TIME)
    missed = slots_back(rec.cron, tz, rec.anchor, edge, 1)
    return Due(on_time, missed[0] if missed else None)


# --- firing --------------------------------------------------------------------------


Enqueue = Callable[..., Awaitable["TaskRecord"]]


def project_kw(enqueue: Enqueue, project: str) -> dict[str, Any]:
    """``project=`` for an enqueue function that takes it (the engine's client
    gains it), nothing for one that does not."""
    try:
        params = inspect.signature(enqueue).parameters
    except (TypeError, ValueError):
        return {}
    return {"project": project} if "project" in params else {}


async def enqueue_for(enqueue: Enqueue, rec: ScheduleRecord, task_id: str) -> TaskRecord:
    """Enqueue ``rec``'s job as task ``task_id`` in its project, through ``enqueue``
    (``Client.enqueue``, or an API call's ``jobs.enqueue``)."""
    task: TaskRecord = await enqueue(rec.job, dict(rec.args), task_id=task_id,
                                     **project_kw(enqueue, rec.project))
    return task


async def _enqueue(client: Client, rec: ScheduleRecord, task_id: str) -> TaskRecord:
    return await enqueue_for(client.enqueue, rec, task_id)


async def fire_schedule(store: SqliteScheduleStore, client: Client, rec: ScheduleRecord,
                        now: datetime) -> dict[str, Any]:
    """Fire ``rec``'s due slots; what was done (``fired`` task ids, ``skipped``)."""
    due = due_slots(rec, now)
    if due.last is None:
        return {"fired": [], "skipped": None}
    plan: list[tuple[str, datetime]] = []
    firings: list[FiringRecord] = []
    if due.missed is not None:
        if rec.catch_up:
            plan.append(("catch-up", due.missed))
        else:
            firings.append(FiringRecord(rec.schedule_id, "skipped", due.missed, None, now,
                                        "missed while no worker ran"))
    plan += [("cron", slot) for slot in due.on_time]
    fired: list[str] = []
    for kind, slot in plan:
        task_id = slot_task_id(rec.schedule_id, slot)
        error = None
        try:
            await _enqueue(client, rec, task_id)
            fired.append(task_id)
        except TransientError:
            raise  # Redis or the store: the next tick tries the same slots again
        except DewError as exc:  # the job went away or now refuses these arguments
            error = exc.message
            log.warning("schedule not fired", schedule=rec.name, project=rec.project,
                        task_id=task_id, error=exc.message)
        firings.append(FiringRecord(rec.schedule_id, kind, slot, task_id, now, error))
    moved = await store.advance(rec, due.last, firings)
    if moved:
        log.info("schedule fired", schedule=rec.name, project=rec.project, tasks=fired,
                 skipped=iso(due.missed) if due.missed and not rec.catch_up else None)
    return {"fired": fired, "skipped": iso(due.missed) if not rec.catch_up else None,
            "recorded": moved}


async def fire_due(store: SqliteScheduleStore, client: Client, now: datetime
                   ) -> dict[str, Any]:
    """One tick: fire every active schedule's due slots."""
    fired: list[str] = []
    skipped = 0
    for rec in await store.active():
        try:
            outcome = await fire_schedule(store, client, rec, now)
        except DewError as exc:
            log.warning("schedule tick failed", schedule=rec.name, project=rec.project,
                        error=exc.message)
            continue
        fired += outcome["fired"]
        skipped += outcome["skipped"] is not None
    return {"fired": fired, "skipped": skipped}


# --- operations (the CLI and the API) -----------------------------------------------


async def create(store: SqliteScheduleStore, new: NewSchedule, created_by: str,
                 now: datetime) -> ScheduleRecord:
    rec = ScheduleRecord(
        schedule_id=uuid.uuid4().hex[:16], project=new.project, name=new.name,
        cron=new.cron, timezone=new.timezone, job=new.job, args=new.args, paused=new.paused,
        catch_up=new.catch_up, created_by=created_by, created_at=now, updated_at=now)
    await store.create(rec)
    return rec


async def get(store: SqliteScheduleStore, project: str, name: str) -> ScheduleRecord:
    rec = await store.get(project, check_name(name))
    if rec is None:
        raise NotFound(f"no schedule named {name!r} in project {project}", target=name)
    return rec


async def pause(store: SqliteScheduleStore, project: str, name: str, paused: bool,
                now: datetime) -> ScheduleRecord:
    rec = await get(store, project, name)
    if rec.paused == paused:
        return rec
    return await store.set_paused(rec, paused, now)


async def delete(store: SqliteScheduleStore, project: str, name: str) -> ScheduleRecord:
    rec = await get(store, project, name)
    await store.delete(rec)
    return rec


async def run_now(store: SqliteScheduleStore, enqueue: Enqueue, rec: ScheduleRecord,
                  now: datetime) -> TaskRecord:
    """Enqueue the schedule's job at once (paused or not), as its own task."""
    task = await enqueue_for(enqueue, rec, run_now_task_id(rec.schedule_id, now))
    await store.add_firing(FiringRecord(rec.schedule_id, "run-now", now, task.task_id, now))
    return task


def next_run(rec: ScheduleRecord, now: datetime) -> datetime | None:
    """The next slot that will fire (None while paused)."""
    if rec.paused:
        return None
    try:
        return next_slot(rec.cron, ZoneInfo(rec.timezone), max(now, rec.anchor))
    except InvalidInput:
        return None


def to_json(rec: ScheduleRecord, now: datetime) -> dict[str, Any]:
    return {
        "schedule_id": rec.schedule_id, "project": rec.project, "name": rec.name,
        "cron": rec.cron, "timezone": rec.timezone, "job": rec.job, "args": redact(rec.args),
        "paused": rec.paused, "catch_up": rec.catch_up, "created_by": rec.created_by,
        "created_at": iso(rec.created_at), "updated_at": iso(rec.updated_at),
        "last_slot": iso(rec.last_slot), "next_run": iso(next_run(rec, now)),
    }


async def show(store: SqliteScheduleStore, tasks: TaskStore, rec: ScheduleRecord,
               now: datetime, limit: int = FIRINGS_SHOWN) -> dict[str, Any]:
    """The schedule and its latest firings, each with its task's status."""
    firings = []
    for f in await store.firings(rec.schedule_id, limit):
        task = await tasks.get_task(f.task_id) if f.task_id and not f.error else None
        firings.append({
            "kind": f.kind, "slot": iso(f.slot), "task_id": f.task_id,
            "fired_at": iso(f.fired_at),
            "status": (task.status if task is not None else
                       "refused" if f.error and f.task_id else
                       "skipped" if f.kind == "skipped" else "unknown"),
            "error": f.error,
        })
    return {**to_json(rec, now), "firings": firings}


def enqueue_action(job: str) -> str:
    """What an API caller needs to enqueue ``job`` (``kms.x`` -> ``kms:jobs:enqueue``)."""
    return f"{job.split('.', 1)[0]}:jobs:enqueue"


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"
