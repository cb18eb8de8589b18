"""User schedules' persistence: the schedules and their last firings.

The schema is this module's ``MIGRATIONS`` (component ``schedules`` of
``schema_migrations``), in the engine's store (``engine.sql_db``: the SQLite file, or
``[store] url``'s PostgreSQL database shared by every node). A schedule's name is
unique per project.

With several workers on several machines: ``advance`` moves a schedule's last fired
slot with a compare-and-set and records that tick's firings in the same
``_transaction()`` (one writer of this store at a time on either backend), so two
nodes' cron ticks firing at once record a slot once: one moves the slot, the other's
compare fails and it writes nothing. A firing's primary key (schedule, kind, slot)
with ``ON CONFLICT DO NOTHING`` keeps it one row whatever writes it twice.
``create`` checks the name in the transaction of its insert (and ``UNIQUE`` backs it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from engine.errors import Conflict
from engine.models import iso, parse_iso
from engine.sql_db import Row, SqlDb

COLUMNS = ("schedule_id, project, name, cron, timezone, job, args, paused, catch_up, "
           "created_by, created_at, updated_at, last_slot")
FIRING_COLUMNS = "schedule_id, kind, slot, task_id, fired_at, error"
# A slot's firing is recorded once: a second insert of the same key does nothing.
INSERT_FIRING = (f"INSERT INTO user_schedule_firings ({FIRING_COLUMNS}) "
                 "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")

MIGRATIONS: tuple[str, ...] = (
    # 1: user schedules and their firings (a firing: one task enqueued for a slot,
    # a catch-up run, a run-now, or a note that missed slots were skipped).
    """
    CREATE TABLE IF NOT EXISTS user_schedules (
        schedule_id TEXT PRIMARY KEY,
        project     TEXT NOT NULL,
        name        TEXT NOT NULL,
        cron        TEXT NOT NULL,
        timezone    TEXT NOT NULL,
        job         TEXT NOT NULL,
        args        TEXT NOT NULL,
        paused      INTEGER NOT NULL CHECK (paused IN (0, 1)),
        catch_up    INTEGER NOT NULL CHECK (catch_up IN (0, 1)),
        created_by  TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        last_slot   TEXT,
        UNIQUE (project, name)
    );
    CREATE TABLE IF NOT EXISTS user_schedule_firings (
        schedule_id TEXT NOT NULL,
        kind        TEXT NOT NULL CHECK (kind IN ('cron','catch-up','run-now','skipped')),
        slot        TEXT NOT NULL,
        task_id     TEXT,
        fired_at    TEXT NOT NULL,
        error       TEXT,
        PRIMARY KEY (schedule_id, kind, slot)
    );
    CREATE INDEX IF NOT EXISTS user_schedule_firings_recent
        ON user_schedule_firings (schedule_id, fired_at);
    """,
)


@dataclass(frozen=True)
class ScheduleRecord:
    schedule_id: str
    project: str
    name: str
    cron: str
    timezone: str
    job: str
    args: dict[str, Any]
    paused: bool
    catch_up: bool
    created_by: str
    created_at: datetime
    updated_at: datetime
    # The latest slot the schedule is done with (fired, caught up or skipped);
    # None until the first one. Slots after max(last_slot, created_at) are due.
    last_slot: datetime | None = None

    @property
    def anchor(self) -> datetime:
        return self.last_slot or self.created_at


@dataclass(frozen=True)
class FiringRecord:
    schedule_id: str
    kind: str  # cron | catch-up | run-now | skipped
    slot: datetime  # the slot (run-now: the request time; skipped: the latest missed slot)
    task_id: str | None
    fired_at: datetime
    error: str | None = None


class SqliteScheduleStore(SqlDb):
    what = "the schedule store"
    conflict_code = "schedule_conflict"
    conflict_fix = "Retry; another process changed the same schedule."
    schema = "schedules"
    migrations = MIGRATIONS

    async def create(self, rec: ScheduleRecord) -> None:
        """Insert ``rec``; Conflict when its project already has a schedule of that name."""
        async with self._transaction():
            taken = await self._fetchone(
                "SELECT 1 FROM user_schedules WHERE project = ? AND name = ?",
                (rec.project, rec.name))
            if taken is not None:
                raise Conflict(f"project {rec.project} already has a schedule named "
                               f"{rec.name!r}", code="schedule_exists", target=rec.name)
            await self._conn.execute(
                f"INSERT INTO user_schedules ({COLUMNS}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.schedule_id, rec.project, rec.name, rec.cron, rec.timezone, rec.job,
                 json.dumps(rec.args), int(rec.paused), int(rec.catch_up), rec.created_by,
                 iso(rec.created_at), iso(rec.updated_at), iso(rec.last_slot)))

    async def get(self, project: str, name: str) -> ScheduleRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {COLUMNS} FROM user_schedules WHERE project = ? AND name = ?",
                (project, name))
        return None if row is None else _schedule(row)

    async def list_schedules(self, project: str | None = None) -> list[ScheduleRecord]:
        """A project's schedules by name (every project's when None)."""
        sql = f"SELECT {COLUMNS} FROM user_schedules"
        params: tuple[Any, ...] = ()
        if project is not None:
            sql += " WHERE project = ?"
            params = (project,)
        async with self._locked():
            rows = await self._fetchall(sql + " ORDER BY project, name", params)
        return [_schedule(r) for r in rows]

    async def active(self) -> list[ScheduleRecord]:
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {COLUMNS} FROM user_schedules WHERE paused = 0 ORDER BY schedule_id")
        return [_schedule(r) for r in rows]

    async def set_paused(self, rec: ScheduleRecord, paused: bool, now: datetime
                         ) -> ScheduleRecord:
        """Pause or resume. Resuming moves the last slot to ``now``: the slots of
        the pause are never run, not even caught up."""
        last = now if not paused and rec.paused else rec.last_slot
        await self._execute(
            "UPDATE user_schedules SET paused = ?, updated_at = ?, last_slot = ? "
            "WHERE schedule_id = ?", (int(paused), iso(now), iso(last), rec.schedule_id))
        return replace(rec, paused=paused, updated_at=now, last_slot=last)

    async def delete(self, rec: ScheduleRecord) -> bool:
        async with self._transaction():
            cursor = await self._conn.execute(
                "DELETE FROM user_schedules WHERE schedule_id = ?", (rec.schedule_id,))
            await self._conn.execute(
                "DELETE FROM user_schedule_firings WHERE schedule_id = ?", (rec.schedule_id,))
            return int(cursor.rowcount) > 0

    async def advance(self, rec: ScheduleRecord, last_slot: datetime,
                      firings: Sequence[FiringRecord]) -> bool:
        """Compare-and-set: move the last slot from what ``rec`` read to ``last_slot``
        and record ``firings``, only if no other tick moved it meanwhile (False)."""
        async with self._transaction():
            # SQLite's "last_slot IS ?", spelt so that PostgreSQL takes it too.
            cursor = await self._conn.execute(
                "UPDATE user_schedules SET last_slot = ? WHERE schedule_id = ? AND "
                "(last_slot = ? OR (last_slot IS NULL AND CAST(? AS TEXT) IS NULL)) "
                "AND paused = 0",
                (iso(last_slot), rec.schedule_id, iso(rec.last_slot), iso(rec.last_slot)))
            if int(cursor.rowcount) != 1:
                return False
            await self._insert_firings(firings)
        return True

    async def add_firing(self, firing: FiringRecord) -> None:
        """Record one firing (run-now); one statement, its key keeps it one row."""
        await self._execute(INSERT_FIRING, _firing_params(firing))

    async def _insert_firings(self, firings: Sequence[FiringRecord]) -> None:
        for f in firings:
            await self._conn.execute(INSERT_FIRING, _firing_params(f))

    async def firings(self, schedule_id: str, limit: int = 20) -> list[FiringRecord]:
        """The latest firings, newest first."""
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {FIRING_COLUMNS} FROM user_schedule_firings WHERE schedule_id = ? "
                "ORDER BY fired_at DESC, slot DESC LIMIT ?", (schedule_id, limit))
        return [FiringRecord(str(r["schedule_id"]), str(r["kind"]), _time(r["slot"]),
                             r["task_id"], _time(r["fired_at"]), r["error"]) for r in rows]


def _firing_params(f: FiringRecord) -> tuple[Any, ...]:
    return (f.schedule_id, f.kind, iso(f.slot), f.task_id, iso(f.fired_at), f.error)


def _time(text: str) -> datetime:
    value = parse_iso(text)
    assert value is not None
    return value


def _schedule(row: Row) -> ScheduleRecord:
    return ScheduleRecord(
        schedule_id=str(row["schedule_id"]), project=str(row["project"]),
        name=str(row["name"]), cron=str(row["cron"]), timezone=str(row["timezone"]),
        job=str(row["job"]), args=json.loads(row["args"]), paused=bool(row["paused"]),
        catch_up=bool(row["catch_up"]), created_by=str(row["created_by"]),
        created_at=_time(row["created_at"]), updated_at=_time(row["updated_at"]),
        last_slot=parse_iso(row["last_slot"]))
