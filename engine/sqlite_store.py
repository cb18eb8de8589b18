"""The task store (``TaskStore``), on SQLite (the default) or PostgreSQL.

The connection, its lock discipline and the error mapping come from the backend
(``engine.sql_db``: ``engine.sqlite_db`` or ``engine.pg_db``), shared with the
domain stores; the SQL here is written once for both. The hot writes (enqueue,
running, succeeded) are group-committed (``engine.batching``): each batch is one
multi-row statement (with RETURNING where the caller needs the rows) instead of one
call per task; on SQLite it runs on the event loop's thread when the write lock is
free (``SqliteBackend.hot_fetchall``: a thread hand-off to aiosqlite costs more than
the statement). Its schema is ``MIGRATIONS`` below, applied on open
(``SqlDb.migrate``); each service's store has its own.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.batching import Batcher
from engine.errors import Conflict, InvalidInput, NotFound
from engine.models import (
    DEFAULT_PROJECT,
    CancelRequest,
    FailureRecord,
    Fence,
    TaskRecord,
    TaskStatus,
    WorkerRecord,
    iso,
    not_failed,
    parse_iso,
    project_of,
    retryable,
)
from engine.redaction import redact
from engine.sealing import has_sealed
from engine.sql_db import Backend, Dialects, Migration, SqlDb, pg_ddl

# Each script is idempotent (IF NOT EXISTS): a database made before the
# per-component versions (one PRAGMA user_version for every store) is brought
# under them by running them all once.
_PROJECTS_AND_RETRIES = """
    ALTER TABLE tasks ADD COLUMN project TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE tasks ADD COLUMN retry_of TEXT;
    CREATE UNIQUE INDEX IF NOT EXISTS tasks_retry_of ON tasks (retry_of)
        WHERE retry_of IS NOT NULL;
    CREATE INDEX IF NOT EXISTS tasks_project_enqueued ON tasks (project, enqueued_at);
    ALTER TABLE failures ADD COLUMN retried_at TEXT;
    ALTER TABLE failures ADD COLUMN retried_by TEXT;
    ALTER TABLE failures ADD COLUMN retry_task_id TEXT;
"""
_FILL_PROJECTS = """
    UPDATE tasks SET project = json_extract(args, '$.account')
        WHERE json_type(args, '$.account') = 'text' AND json_extract(args, '$.account') != '';
"""

MIGRATIONS: tuple[Migration, ...] = (
    # 1: tasks, failure records, workers
    """
    CREATE TABLE IF NOT EXISTS tasks (
        task_id     TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        args        TEXT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('queued','running','succeeded','failed')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        enqueued_at TEXT NOT NULL,
        due_at      TEXT NOT NULL,
        started_at  TEXT,
        finished_at TEXT,
        result      TEXT,
        error       TEXT,
        worker_id   TEXT
    );
    CREATE INDEX IF NOT EXISTS tasks_status_enqueued ON tasks (status, enqueued_at);
    CREATE INDEX IF NOT EXISTS tasks_name_enqueued ON tasks (name, enqueued_at);
    CREATE INDEX IF NOT EXISTS tasks_enqueued ON tasks (enqueued_at);
    CREATE TABLE IF NOT EXISTS failures (
        failure_id  TEXT PRIMARY KEY,
        task_id     TEXT NOT NULL,
        operation   TEXT NOT NULL,
        target      TEXT,
        category    TEXT NOT NULL,
        code        TEXT NOT NULL,
        error       TEXT NOT NULL,
        cause       TEXT NOT NULL,
        fix         TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS failures_operation_created ON failures (operation, created_at);
    CREATE INDEX IF NOT EXISTS failures_created ON failures (created_at);
    CREATE INDEX IF NOT EXISTS failures_task ON failures (task_id);
    CREATE TABLE IF NOT EXISTS workers (
        worker_id    TEXT PRIMARY KEY,
        host         TEXT NOT NULL,
        pid          INTEGER NOT NULL,
        started_at   TEXT NOT NULL,
        heartbeat_at TEXT NOT NULL
    );
    """,
    # 2: the signature of each job (engine.job_signing), delivered again by the sweeper
    """
    ALTER TABLE tasks ADD COLUMN signature TEXT;
    """,
    # 3: the project that enqueued each task (existing rows: the job's `account`
    # argument, else 'default'); retries (a new task linked to the failed one, noted
    # on its failure records). A PostgreSQL database starts at this engine's version:
    # it has no old rows to fill.
    Dialects(sqlite=_PROJECTS_AND_RETRIES + _FILL_PROJECTS,
             postgresql=pg_ddl(_PROJECTS_AND_RETRIES)),
    # 4: status 'cancelled' (`dew tasks cancel`): SQLite changes a CHECK constraint
    # only by rebuilding the table (same columns, same rows, same indexes).
    """
    DROP TABLE IF EXISTS tasks_v4;
    CREATE TABLE tasks_v4 (
        task_id     TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        args        TEXT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('queued','running','succeeded','failed',
                                                    'cancelled')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        enqueued_at TEXT NOT NULL,
        due_at      TEXT NOT NULL,
        started_at  TEXT,
        finished_at TEXT,
        result      TEXT,
        error       TEXT,
        worker_id   TEXT,
        signature   TEXT,
        project     TEXT NOT NULL DEFAULT 'default',
        retry_of    TEXT
    );
    INSERT INTO tasks_v4 (task_id, name, args, status, attempts, enqueued_at, due_at,
        started_at, finished_at, result, error, worker_id, signature, project, retry_of)
        SELECT task_id, name, args, status, attempts, enqueued_at, due_at, started_at,
            finished_at, result, error, worker_id, signature, project, retry_of FROM tasks;
    DROP TABLE tasks;
    ALTER TABLE tasks_v4 RENAME TO tasks;
    CREATE INDEX IF NOT EXISTS tasks_status_enqueued ON tasks (status, enqueued_at);
    CREATE INDEX IF NOT EXISTS tasks_name_enqueued ON tasks (name, enqueued_at);
    CREATE INDEX IF NOT EXISTS tasks_enqueued ON tasks (enqueued_at);
    CREATE UNIQUE INDEX IF NOT EXISTS tasks_retry_of ON tasks (retry_of)
        WHERE retry_of IS NOT NULL;
    CREATE INDEX IF NOT EXISTS tasks_project_enqueued ON tasks (project, enqueued_at);
    """,
    # 5: a cancel request on a running task (`dew tasks cancel` of a job with safe
    # points): when and by whom. On the task row, not in Redis, so it outlives a Redis
    # or worker restart: the run that takes the task over after a crash sees it too.
    """
    ALTER TABLE tasks ADD COLUMN cancel_requested_at TEXT;
    ALTER TABLE tasks ADD COLUMN cancel_requested_by TEXT;
    """,
)

Row = tuple[str | None, ...]  # statement parameters of one batched write

TASK_COLUMNS = (
    "task_id, name, args, status, attempts, enqueued_at, due_at, started_at, finished_at, "
    "result, error, worker_id, signature, project, retry_of, cancel_requested_at, "
    "cancel_requested_by"
)
FAILURE_COLUMNS = (
    "failure_id, task_id, operation, target, category, code, error, cause, fix, created_at, "
    "retried_at, retried_by, retry_task_id"
)
# A failure record belongs to the project of its task.
_FAILURE_PROJECT = ("EXISTS (SELECT 1 FROM tasks WHERE tasks.task_id = failures.task_id "
                    "AND tasks.project = ?)")


class SqliteTaskStore(SqlDb):
    schema = "engine"
    migrations = MIGRATIONS

    def __init__(self, backend: Backend, path: Path) -> None:
        super().__init__(backend, path)
        # The hot writes (one each per enqueue, run and success) are group-committed.
        self._creates = Batcher(self._create_batch)
        self._runs = Batcher(self._running_batch)
        self._successes = Batcher(self._succeeded_batch)

    # --- tasks -----------------------------------------------------------------

    async def create_task(
        self, task_id: str, name: str, args: dict[str, Any], now: datetime, due_at: datetime,
        signature: str | None = None, project: str = DEFAULT_PROJECT,
    ) -> tuple[TaskRecord, bool]:
        return await self._creates.submit(
            (task_id, name, _dump(args), iso(now), iso(due_at), signature, project))

    async def _create_batch(self, items: Sequence[Row]) -> list[tuple[TaskRecord, bool]]:
        ids = [str(item[0]) for item in items]
        created = await self._hot_by_id(
            f"""INSERT INTO tasks (task_id, name, args, status, attempts, enqueued_at, due_at,
                signature, project)
            VALUES {_rows("(?, ?, ?, 'queued', 0, ?, ?, ?, ?)", len(items))}
            ON CONFLICT (task_id) DO NOTHING RETURNING {TASK_COLUMNS}""",
            [p for item in items for p in item],
        )
        existing = await self._hot_rows_by_id([i for i in ids if i not in created])
        results, seen = [], set(existing)
        for task_id in ids:
            row = created.get(task_id) or existing[task_id]
            results.append((_task(row), task_id not in seen))
            seen.add(task_id)
        return results

    async def create_retry(
        self, task_id: str, retry_of: str, name: str, args: dict[str, Any], now: datetime,
        signature: str | None, project: str, retried_by: str,
    ) -> TaskRecord:
        async with self._transaction():
            row = await self._fetchone(
                "SELECT status, EXISTS (SELECT 1 FROM failures f WHERE f.task_id = t.task_id"
                " AND f.retried_at IS NULL) AS reported FROM tasks t WHERE task_id = ?",
                (retry_of,))
            if row is None:
                raise NotFound(f"no task with id {retry_of!r}", target=retry_of)
            if not retryable(row["status"], bool(row["reported"])):
                raise Conflict(not_failed(retry_of, row["status"]), code="task_not_failed",
                               target=retry_of)
            done = await self._fetchone("SELECT task_id FROM tasks WHERE retry_of = ?",
                                        (retry_of,))
            if done is not None:
                raise Conflict(
                    f"task {retry_of} was already retried as task {done['task_id']}",
                    code="already_retried", target=retry_of,
                    fix=f"Look at task {done['task_id']}; retry that one if it failed too.")
            created = await self._fetchone(
                f"""INSERT INTO tasks (task_id, name, args, status, attempts, enqueued_at, due_at,
                    signature, project, retry_of)
                VALUES (?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?) RETURNING {TASK_COLUMNS}""",
                (task_id, name, _dump(args), iso(now), iso(now), signature, project, retry_of))
            await self._conn.execute(
                "UPDATE failures SET retried_at = ?, retried_by = ?, retry_task_id = ? "
                "WHERE task_id = ?", (iso(now), retried_by, task_id, retry_of))
            await self._forget_sealed([retry_of])
        assert created is not None
        return _task(created)

    async def get_task(self, task_id: str, project: str | None = None) -> TaskRecord | None:
        where, params = _where(task_id=task_id, project=project)
        async with self._locked():
            row = await self._fetchone(f"SELECT {TASK_COLUMNS} FROM tasks {where}", params)
        return None if row is None else _task(row)

    async def list_tasks(
        self, status: TaskStatus | None = None, name: str | None = None, limit: int = 100,
        project: str | None = None, since: datetime | None = None,
        until: datetime | None = None, marker: str | None = None,
    ) -> list[TaskRecord]:
        clauses, params = _clauses(status=status, name=name, project=project)
        if since is not None:
            clauses.append("enqueued_at >= ?")
            params.append(str(iso(since)))
        if until is not None:
            clauses.append("enqueued_at < ?")
            params.append(str(iso(until)))
        async with self._locked():
            if marker is not None:
                mark = await self._fetchone(
                    "SELECT enqueued_at, task_id FROM tasks WHERE task_id = ?"
                    + (" AND project = ?" if project is not None else ""),
                    (marker, project) if project is not None else (marker,))
                if mark is None:
                    raise InvalidInput(f"marker: no task with id {marker!r}", target="marker")
                clauses.append("(enqueued_at, task_id) < (?, ?)")
                params.extend((mark["enqueued_at"], mark["task_id"]))
            where = "WHERE " + " AND ".join(clauses) if clauses else ""
            rows = await self._fetchall(
                f"SELECT {TASK_COLUMNS} FROM tasks {where} "
                "ORDER BY enqueued_at DESC, task_id DESC LIMIT ?",
                (*params, limit),
            )
        return [_task(r) for r in rows]

    async def unfinished_tasks(self, limit: int = 10_000) -> list[TaskRecord]:
        async with self._locked():
            rows = await self._fetchall(
                f"""SELECT {TASK_COLUMNS} FROM tasks WHERE status IN ('queued', 'running')
                ORDER BY enqueued_at LIMIT ?""",
                (limit,),
            )
        return [_task(r) for r in rows]

    async def mark_running(
        self,
        task_id: str,
        name: str,
        args: dict[str, Any],
        worker_id: str,
        now: datetime,
        enqueued_at: datetime,
        signature: str | None = None,
        live_since: datetime | None = None,
    ) -> tuple[TaskRecord, bool]:
        return await self._runs.submit(
            (task_id, name, _dump(args), iso(enqueued_at), iso(enqueued_at), iso(now), worker_id,
             signature, project_of(args), iso(live_since or now))
        )

    async def _running_batch(self, items: Sequence[Row]) -> list[tuple[TaskRecord, bool]]:
        ids = [str(item[0]) for item in items]
        live_since = min(str(item[9]) for item in items)
        # A claim: a running task is taken over only from a worker whose heartbeat
        # stopped (the sweeper freed its job); never from a live one, this one
        # included (a second delivery while its run goes on).
        rows = await self._hot_by_id(
            f"""INSERT INTO tasks (task_id, name, args, status, attempts, enqueued_at, due_at,
                                   started_at, worker_id, signature, project)
            VALUES {_rows("(?, ?, ?, 'running', 1, ?, ?, ?, ?, ?, ?)", len(items))}
            ON CONFLICT (task_id) DO UPDATE SET
                status = 'running', attempts = tasks.attempts + 1,
                started_at = excluded.started_at, worker_id = excluded.worker_id,
                signature = COALESCE(tasks.signature, excluded.signature)
            WHERE tasks.status NOT IN {_FINAL} AND (
                tasks.status = 'queued' OR tasks.worker_id IS NULL
                OR tasks.worker_id NOT IN (
                    SELECT worker_id FROM workers WHERE heartbeat_at >= ?))
            RETURNING {TASK_COLUMNS}""",
            [p for item in items for p in item[:9]] + [live_since],
        )
        claimed = set(rows)
        # Tasks that ended, or that a live run holds, are returned as they are.
        rows |= await self._hot_rows_by_id([i for i in ids if i not in rows])
        return [(_task(rows[i]), i in claimed) for i in ids]

    async def mark_succeeded(
        self, task_id: str, result: Any, now: datetime, args: dict[str, Any] | None = None,
        fence: Fence | None = None,
    ) -> bool:
        worker, attempt = (fence.worker_id, str(fence.attempt)) if fence else (None, None)
        return await self._successes.submit(
            (iso(now), _dump(result), None if args is None else _dump(args), task_id, worker,
             attempt))

    async def _succeeded_batch(self, items: Sequence[Row]) -> list[bool]:
        rows = await self._hot_fetchall(
            f"""UPDATE tasks SET status = 'succeeded', finished_at = done.column1,
                result = done.column2, error = NULL,
                args = COALESCE(done.column3, tasks.args)
            FROM (VALUES {_rows("(?, ?, ?, ?, ?, ?)", len(items))}) AS done
            WHERE tasks.task_id = done.column4 AND tasks.status NOT IN {_FINAL}
                AND (done.column5 IS NULL OR (tasks.worker_id = done.column5
                                              AND tasks.attempts = CAST(done.column6
                                                                        AS INTEGER)))
            RETURNING tasks.task_id""",
            [p for item in items for p in item],
        )
        done = {str(r[0]) for r in rows}
        return [str(item[3]) in done for item in items]

    async def mark_retrying(
        self, task_id: str, error: dict[str, Any], due_at: datetime, now: datetime,
        fence: Fence | None = None,
    ) -> bool:
        return await self._execute(
            f"""UPDATE tasks SET status = 'queued', error = ?, due_at = ?, worker_id = NULL
            WHERE task_id = ? AND status NOT IN {_FINAL} {_FENCED}""",
            (_dump(error), iso(due_at), task_id, *_fence_params(fence)),
        ) == 1

    async def mark_failed(
        self, task_id: str, error: dict[str, Any], failure: FailureRecord | None, now: datetime,
        args: dict[str, Any] | None = None, fence: Fence | None = None,
    ) -> bool:
        async with self._transaction():
            cursor = await self._conn.execute(
                f"""UPDATE tasks SET status = 'failed', finished_at = ?, error = ?,
                    args = COALESCE(?, args)
                WHERE task_id = ? AND status NOT IN {_FINAL} {_FENCED}""",
                (iso(now), _dump(error), None if args is None else _dump(args), task_id,
                 *_fence_params(fence)),
            )
            # A re-run of a task that another run already finished must not add a
            # second failure record.
            if failure is not None and cursor.rowcount == 1:
                await self._insert_failure(failure)
            return bool(cursor.rowcount == 1)

    async def cancel_task(
        self, task_id: str, error: dict[str, Any], now: datetime, project: str | None = None,
        by: str = "", cancellable: Collection[str] = (),
    ) -> TaskRecord:
        """Queued (or deferred, or waiting for a retry): cancelled at once, a worker it is
        delivered to skips it. Running a job in ``cancellable``: a cancel request is
        recorded (the first one stands) and the task is returned still running.
        NotFound: no such task (in ``project``). Conflict: running a job without safe
        points, or ended."""
        where, params = _where(task_id=task_id, project=project)
        async with self._transaction():
            row = await self._fetchone(f"SELECT name, status FROM tasks {where}", params)
            if row is None:
                raise NotFound(f"no task with id {task_id!r} (`dew tasks list` lists them)",
                               target=task_id)
            if row["status"] == "running" and row["name"] in cancellable:
                await self._conn.execute(
                    "UPDATE tasks SET cancel_requested_at = ?, cancel_requested_by = ? "
                    "WHERE task_id = ? AND cancel_requested_at IS NULL",
                    (iso(now), by, task_id))
                updated = await self._fetchone(
                    f"SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,))
            elif row["status"] != "queued":
                raise Conflict(_not_cancellable(task_id, row["status"], row["name"]),
                               code="task_not_cancellable", target=task_id)
            else:
                # A request made while it ran (it went back to queued since) stands.
                updated = await self._fetchone(
                    f"""UPDATE tasks SET status = 'cancelled', finished_at = ?, error = ?,
                        worker_id = NULL, cancel_requested_at = COALESCE(cancel_requested_at, ?),
                        cancel_requested_by = CASE WHEN cancel_requested_at IS NULL THEN ?
                                              ELSE cancel_requested_by END
                    WHERE task_id = ? AND status = 'queued' RETURNING {TASK_COLUMNS}""",
                    (iso(now), _dump(error), iso(now), by, task_id))
                await self._forget_sealed([task_id])
        assert updated is not None
        return _task(updated)

    async def cancel_request(self, task_id: str) -> CancelRequest | None:
        async with self._locked():
            row = await self._fetchone(
                "SELECT cancel_requested_at, cancel_requested_by FROM tasks "
                "WHERE task_id = ? AND cancel_requested_at IS NOT NULL", (task_id,))
        if row is None:
            return None
        return CancelRequest(_required_ts(row[0]), row[1] or "")

    async def mark_cancelled(
        self, task_id: str, error: dict[str, Any], result: Any, now: datetime,
        args: dict[str, Any] | None = None, fence: Fence | None = None,
    ) -> bool:
        return await self._execute(
            f"""UPDATE tasks SET status = 'cancelled', finished_at = ?, error = ?, result = ?,
                args = COALESCE(?, args)
            WHERE task_id = ? AND status NOT IN {_FINAL} {_FENCED}""",
            (iso(now), _dump(error), _dump(result), None if args is None else _dump(args),
             task_id, *_fence_params(fence)),
        ) == 1

    async def task_ids_by_prefix(
        self, prefix: str, project: str | None = None, limit: int = 10,
    ) -> list[str]:
        """Up to ``limit`` task ids that start with ``prefix`` (in ``project``)."""
        return await self._ids_by_prefix("tasks", "task_id", prefix, project, limit)

    async def failure_ids_by_prefix(
        self, prefix: str, project: str | None = None, limit: int = 10,
    ) -> list[str]:
        """Up to ``limit`` failure record ids that start with ``prefix`` (in ``project``)."""
        return await self._ids_by_prefix("failures", "failure_id", prefix, project, limit)

    async def _ids_by_prefix(
        self, table: str, column: str, prefix: str, project: str | None, limit: int,
    ) -> list[str]:
        # A range, not LIKE: ids may hold '_' and the primary key index serves it.
        clauses = [f"{column} >= ?", f"{column} < ?"]
        params: list[Any] = [prefix, prefix + "\U0010ffff"]
        if project is not None:
            clauses.append("project = ?" if table == "tasks" else _FAILURE_PROJECT)
            params.append(project)
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {column} FROM {table} WHERE {' AND '.join(clauses)} "
                f"ORDER BY {column} LIMIT ?", (*params, limit))
        return [str(r[0]) for r in rows]

    async def release_claim(self, task_id: str, fence: Fence) -> bool:
        """Put a run's task back to queued (its run was cancelled), if it still holds it."""
        return await self._execute(
            f"""UPDATE tasks SET status = 'queued', worker_id = NULL
            WHERE task_id = ? AND status = 'running' {_FENCED}""",
            (task_id, *_fence_params(fence)),
        ) == 1

    async def holds(self, task_id: str, fence: Fence) -> bool:
        """Whether the task still shows ``fence``'s claim (a handler asks before acting)."""
        async with self._locked():
            row = await self._fetchone(
                "SELECT 1 FROM tasks WHERE task_id = ? AND status = 'running' "
                "AND worker_id = ? AND attempts = ?", (task_id, fence.worker_id, fence.attempt))
        return row is not None

    # --- failure records ---------------------------------------------------------

    async def add_failure(self, failure: FailureRecord) -> None:
        async with self._locked():
            await self._insert_failure(failure)

    async def list_failures(
        self, operation: str | None = None, task_id: str | None = None, limit: int = 100,
        project: str | None = None, marker: str | None = None,
    ) -> list[FailureRecord]:
        clauses, params = _failure_clauses(project, operation=operation, task_id=task_id)
        async with self._locked():
            if marker is not None:
                mark_where, mark_params = _failure_clauses(project, failure_id=marker)
                mark = await self._fetchone(
                    f"SELECT created_at, failure_id FROM failures WHERE {' AND '.join(mark_where)}",
                    mark_params)
                if mark is None:
                    raise InvalidInput(f"marker: no failure record with id {marker!r}",
                                       target="marker")
                clauses.append("(created_at, failure_id) < (?, ?)")
                params.extend((mark["created_at"], mark["failure_id"]))
            where = "WHERE " + " AND ".join(clauses) if clauses else ""
            rows = await self._fetchall(
                f"SELECT {FAILURE_COLUMNS} FROM failures {where} "
                "ORDER BY created_at DESC, failure_id DESC LIMIT ?",
                (*params, limit),
            )
        return [_failure(r) for r in rows]

    async def get_failure(
        self, failure_id: str, project: str | None = None,
    ) -> FailureRecord | None:
        clauses, params = _failure_clauses(project, failure_id=failure_id)
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {FAILURE_COLUMNS} FROM failures WHERE {' AND '.join(clauses)}", params
            )
        return None if row is None else _failure(row)

    async def delete_failure(self, failure_id: str, project: str | None = None) -> bool:
        clauses, params = _failure_clauses(project, failure_id=failure_id)
        return await self._delete_failures(" AND ".join(clauses), params) == 1

    async def delete_all_failures(
        self, project: str | None = None, operation: str | None = None,
    ) -> int:
        clauses, params = _failure_clauses(project, operation=operation)
        return await self._delete_failures(" AND ".join(clauses) or "TRUE", params)

    async def _delete_failures(self, where: str, params: Sequence[Any]) -> int:
        """Delete failure records; a failed task left with none keeps no sealed value
        (nobody can retry it from a report any more)."""
        async with self._transaction():
            rows = await self._fetchall(
                f"SELECT DISTINCT task_id FROM failures WHERE {where}", params)
            cursor = await self._conn.execute(f"DELETE FROM failures WHERE {where}",
                                              tuple(params))
            orphans = [str(r[0]) for r in rows if await self._fetchone(
                "SELECT 1 FROM failures WHERE task_id = ?", (r[0],)) is None]
            await self._forget_sealed(orphans)
            return int(cursor.rowcount)

    async def _forget_sealed(self, task_ids: Sequence[str]) -> None:
        """Drop the sealed values a failed task kept for a retry (inside a transaction)."""
        for task_id in task_ids:
            row = await self._fetchone(
                f"SELECT args FROM tasks WHERE task_id = ? AND status IN {_FINAL}",
                (task_id,))
            if row is not None and has_sealed(args := json.loads(row[0])):
                await self._conn.execute("UPDATE tasks SET args = ? WHERE task_id = ?",
                                         (_dump(redact(args)), task_id))

    # --- workers -----------------------------------------------------------------

    async def heartbeat(self, worker: WorkerRecord) -> None:
        await self._execute(
            """INSERT INTO workers (worker_id, host, pid, started_at, heartbeat_at)
            VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at""",
            (worker.worker_id, worker.host, worker.pid, iso(worker.started_at),
             iso(worker.heartbeat_at)),
        )

    async def remove_worker(self, worker_id: str) -> None:
        await self._execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    async def live_workers(self, since: datetime) -> set[str]:
        async with self._locked():
            rows = await self._fetchall(
                "SELECT worker_id FROM workers WHERE heartbeat_at >= ?", (iso(since),)
            )
        return {str(r[0]) for r in rows}

    # --- plumbing ----------------------------------------------------------------

    async def _insert_failure(self, f: FailureRecord) -> None:
        await self._conn.execute(
            f"INSERT INTO failures ({FAILURE_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (f.failure_id, f.task_id, f.operation, f.target, f.category, f.code, f.error,
             f.cause, f.fix, iso(f.created_at), iso(f.retried_at), f.retried_by,
             f.retry_task_id),
        )


    async def _hot_by_id(self, sql: str, params: Sequence[Any]) -> dict[str, sqlite3.Row]:
        return {row["task_id"]: row for row in await self._hot_fetchall(sql, params)}

    async def _hot_rows_by_id(self, ids: Sequence[str]) -> dict[str, sqlite3.Row]:
        if not ids:
            return {}
        return await self._hot_by_id(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE task_id IN ({_rows('?', len(ids))})", ids)

    async def _rows_by_id(self, ids: Sequence[str]) -> dict[str, sqlite3.Row]:
        if not ids:
            return {}
        return await self._fetch_by_id(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE task_id IN ({_rows('?', len(ids))})", ids
        )

    async def _fetch_by_id(self, sql: str, params: Sequence[Any]) -> dict[str, sqlite3.Row]:
        return {row["task_id"]: row for row in await self._fetchall(sql, params)}




def _not_cancellable(task_id: str, status: str, name: str) -> str:
    if status == "running":
        return (f"task {task_id} is running, and its job {name} has no safe point to stop "
                "at: it ends by itself (`dew tasks show` follows it)")
    return f"task {task_id} is {status}: it has ended, there is nothing to cancel"


def _rows(template: str, count: int) -> str:
    """``(?, ?), (?, ?), ...``: one statement writes a whole batch."""
    return ", ".join([template] * count)


# The statuses of a task that ended (engine.models.FINAL_STATUSES): nothing runs it again.
_FINAL = "('succeeded', 'failed', 'cancelled')"

# Writes of one run: they hold only while the row still shows that run's claim.
_FENCED = "AND (CAST(? AS TEXT) IS NULL OR (worker_id = ? AND attempts = ?))"


def _fence_params(fence: Fence | None) -> tuple[Any, ...]:
    if fence is None:
        return (None, None, None)
    return (fence.worker_id, fence.worker_id, fence.attempt)


def _clauses(**filters: str | None) -> tuple[list[str], list[str]]:
    clauses = [f"{column} = ?" for column, value in filters.items() if value is not None]
    params = [value for value in filters.values() if value is not None]
    return clauses, params


def _where(**filters: str | None) -> tuple[str, list[str]]:
    clauses, params = _clauses(**filters)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def _failure_clauses(project: str | None, **filters: str | None) -> tuple[list[str], list[str]]:
    clauses, params = _clauses(**filters)
    if project is not None:
        clauses.append(_FAILURE_PROJECT)
        params.append(project)
    return clauses, params



def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _task(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        task_id=row["task_id"],
        name=row["name"],
        args=_load(row["args"]),
        status=row["status"],
        attempts=int(row["attempts"]),
        enqueued_at=_required_ts(row["enqueued_at"]),
        due_at=_required_ts(row["due_at"]),
        started_at=parse_iso(row["started_at"]),
        finished_at=parse_iso(row["finished_at"]),
        result=_load(row["result"]),
        error=_load(row["error"]),
        worker_id=row["worker_id"],
        signature=row["signature"],
        project=row["project"],
        retry_of=row["retry_of"],
        cancel_requested_at=parse_iso(row["cancel_requested_at"]),
        cancel_requested_by=row["cancel_requested_by"],
    )


def _failure(row: sqlite3.Row) -> FailureRecord:
    return FailureRecord(
        failure_id=row["failure_id"],
        task_id=row["task_id"],
        operation=row["operation"],
        target=row["target"],
        category=row["category"],
        code=row["code"],
        error=row["error"],
        cause=row["cause"],
        fix=row["fix"],
        created_at=_required_ts(row["created_at"]),
        retried_at=parse_iso(row["retried_at"]),
        retried_by=row["retried_by"],
        retry_task_id=row["retry_task_id"],
    )


def _required_ts(text: str) -> datetime:
    ts = parse_iso(text)
    assert ts is not None
    return ts
