"""The SQLite task store (aiosqlite, WAL): the default backend of ``TaskStore``.

One connection per process. Every write that is a single statement runs in
autocommit (an UPSERT with RETURNING where it must read too), so concurrent
coroutines never share a transaction; the few multi-statement writes hold a
lock and use ``BEGIN IMMEDIATE`` so that two processes (worker, CLI, sweeper)
queue on SQLite's busy timeout instead of failing on a lock upgrade.
Migrations are numbered SQL scripts tracked in ``PRAGMA user_version``.
sqlite3 errors are mapped to engine errors here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from engine.errors import BackendUnavailable, ConfigError, DewError
from engine.models import FailureRecord, TaskRecord, TaskStatus, WorkerRecord, iso, parse_iso

MIGRATIONS: tuple[str, ...] = (
    # 1: tasks, failure records, workers
    """
    CREATE TABLE tasks (
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
    CREATE INDEX tasks_status_enqueued ON tasks (status, enqueued_at);
    CREATE INDEX tasks_name_enqueued ON tasks (name, enqueued_at);
    CREATE INDEX tasks_enqueued ON tasks (enqueued_at);
    CREATE TABLE failures (
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
    CREATE INDEX failures_operation_created ON failures (operation, created_at);
    CREATE INDEX failures_created ON failures (created_at);
    CREATE INDEX failures_task ON failures (task_id);
    CREATE TABLE workers (
        worker_id    TEXT PRIMARY KEY,
        host         TEXT NOT NULL,
        pid          INTEGER NOT NULL,
        started_at   TEXT NOT NULL,
        heartbeat_at TEXT NOT NULL
    );
    """,
)

TASK_COLUMNS = (
    "task_id, name, args, status, attempts, enqueued_at, due_at, started_at, finished_at, "
    "result, error, worker_id"
)
FAILURE_COLUMNS = (
    "failure_id, task_id, operation, target, category, code, error, cause, fix, created_at"
)


class SqliteTaskStore:
    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path
        self._tx_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteTaskStore:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the state directory {path.parent}: {exc.strerror}"
            ) from None
        async with _mapped(path):
            conn = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            async with _mapped(path):
                conn.row_factory = aiosqlite.Row
                await conn.execute("PRAGMA busy_timeout = 15000")
                await conn.execute("PRAGMA journal_mode = WAL")
                await conn.execute("PRAGMA synchronous = NORMAL")
                store = cls(conn, path)
                await store._migrate()
                return store
        except BaseException:
            await conn.close()  # its thread would keep the process alive
            raise

    async def close(self) -> None:
        await self._conn.close()

    @property
    def schema_version(self) -> int:
        return len(MIGRATIONS)

    async def _migrate(self) -> None:
        async with self._transaction():
            row = await self._fetchone("PRAGMA user_version")
            current = int(row[0]) if row else 0
            if current > len(MIGRATIONS):
                raise ConfigError(
                    f"{self._path} has schema version {current}, newer than this engine "
                    f"({len(MIGRATIONS)})",
                    fix="Upgrade dew-engine, or point DEW_STATE_DIR at another directory.",
                )
            for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in _statements(script):
                    await self._conn.execute(statement)
                await self._conn.execute(f"PRAGMA user_version = {number}")

    # --- tasks -----------------------------------------------------------------

    async def create_task(
        self, task_id: str, name: str, args: dict[str, Any], now: datetime, due_at: datetime
    ) -> tuple[TaskRecord, bool]:
        row = await self._write_returning(
            f"""INSERT INTO tasks (task_id, name, args, status, attempts, enqueued_at, due_at)
            VALUES (?, ?, ?, 'queued', 0, ?, ?)
            ON CONFLICT (task_id) DO NOTHING RETURNING {TASK_COLUMNS}""",
            (task_id, name, _dump(args), iso(now), iso(due_at)),
        )
        if row is not None:
            return _task(row), True
        existing = await self.get_task(task_id)
        assert existing is not None  # the conflict proves the row exists; rows are never deleted
        return existing, False

    async def get_task(self, task_id: str) -> TaskRecord | None:
        async with _mapped(self._path):
            row = await self._fetchone(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
            )
        return None if row is None else _task(row)

    async def list_tasks(
        self, status: TaskStatus | None = None, name: str | None = None, limit: int = 100
    ) -> list[TaskRecord]:
        where, params = _where(status=status, name=name)
        async with _mapped(self._path):
            rows = await self._fetchall(
                f"SELECT {TASK_COLUMNS} FROM tasks {where} ORDER BY enqueued_at DESC LIMIT ?",
                (*params, limit),
            )
        return [_task(r) for r in rows]

    async def unfinished_tasks(self, limit: int = 10_000) -> list[TaskRecord]:
        async with _mapped(self._path):
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
    ) -> TaskRecord:
        row = await self._write_returning(
            f"""INSERT INTO tasks (task_id, name, args, status, attempts, enqueued_at, due_at,
                                   started_at, worker_id)
            VALUES (?, ?, ?, 'running', 1, ?, ?, ?, ?)
            ON CONFLICT (task_id) DO UPDATE SET
                status = 'running', attempts = attempts + 1,
                started_at = excluded.started_at, worker_id = excluded.worker_id
            WHERE status NOT IN ('succeeded', 'failed')
            RETURNING {TASK_COLUMNS}""",
            (task_id, name, _dump(args), iso(enqueued_at), iso(enqueued_at), iso(now), worker_id),
        )
        if row is not None:
            return _task(row)
        final = await self.get_task(task_id)
        assert final is not None
        return final

    async def mark_succeeded(self, task_id: str, result: Any, now: datetime) -> None:
        await self._execute(
            """UPDATE tasks SET status = 'succeeded', finished_at = ?, result = ?, error = NULL
            WHERE task_id = ? AND status NOT IN ('succeeded', 'failed')""",
            (iso(now), _dump(result), task_id),
        )

    async def mark_retrying(
        self, task_id: str, error: dict[str, Any], due_at: datetime, now: datetime
    ) -> None:
        await self._execute(
            """UPDATE tasks SET status = 'queued', error = ?, due_at = ?, worker_id = NULL
            WHERE task_id = ? AND status NOT IN ('succeeded', 'failed')""",
            (_dump(error), iso(due_at), task_id),
        )

    async def mark_failed(
        self, task_id: str, error: dict[str, Any], failure: FailureRecord | None, now: datetime
    ) -> None:
        async with self._transaction():
            cursor = await self._conn.execute(
                """UPDATE tasks SET status = 'failed', finished_at = ?, error = ?
                WHERE task_id = ? AND status NOT IN ('succeeded', 'failed')""",
                (iso(now), _dump(error), task_id),
            )
            # A re-run of a task that another run already finished must not add a
            # second failure record.
            if failure is not None and cursor.rowcount == 1:
                await self._insert_failure(failure)

    # --- failure records ---------------------------------------------------------

    async def add_failure(self, failure: FailureRecord) -> None:
        async with self._tx_lock, _mapped(self._path):
            await self._insert_failure(failure)

    async def list_failures(
        self, operation: str | None = None, task_id: str | None = None, limit: int = 100
    ) -> list[FailureRecord]:
        where, params = _where(operation=operation, task_id=task_id)
        async with _mapped(self._path):
            rows = await self._fetchall(
                f"SELECT {FAILURE_COLUMNS} FROM failures {where} ORDER BY created_at DESC LIMIT ?",
                (*params, limit),
            )
        return [_failure(r) for r in rows]

    async def get_failure(self, failure_id: str) -> FailureRecord | None:
        async with _mapped(self._path):
            row = await self._fetchone(
                f"SELECT {FAILURE_COLUMNS} FROM failures WHERE failure_id = ?", (failure_id,)
            )
        return None if row is None else _failure(row)

    async def delete_failure(self, failure_id: str) -> bool:
        return await self._execute("DELETE FROM failures WHERE failure_id = ?", (failure_id,)) == 1

    async def delete_all_failures(self) -> int:
        return await self._execute("DELETE FROM failures", ())

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
        async with _mapped(self._path):
            rows = await self._fetchall(
                "SELECT worker_id FROM workers WHERE heartbeat_at >= ?", (iso(since),)
            )
        return {str(r[0]) for r in rows}

    # --- plumbing ----------------------------------------------------------------

    async def _insert_failure(self, f: FailureRecord) -> None:
        await self._conn.execute(
            f"INSERT INTO failures ({FAILURE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (f.failure_id, f.task_id, f.operation, f.target, f.category, f.code, f.error,
             f.cause, f.fix, iso(f.created_at)),
        )

    # Every write holds _tx_lock: a statement of another coroutine must never
    # land inside (and be rolled back with) a multi-statement transaction.
    async def _execute(self, sql: str, params: Iterable[Any]) -> int:
        async with self._tx_lock, _mapped(self._path):
            cursor = await self._conn.execute(sql, tuple(params))
            return int(cursor.rowcount)

    async def _write_returning(self, sql: str, params: Iterable[Any]) -> sqlite3.Row | None:
        async with self._tx_lock, _mapped(self._path):
            return await self._fetchone(sql, params)

    async def _fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        async with self._conn.execute(sql, tuple(params)) as cursor:
            return await cursor.fetchone()

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._conn.execute(sql, tuple(params)) as cursor:
            return list(await cursor.fetchall())

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        async with self._tx_lock, _mapped(self._path):
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")


@asynccontextmanager
async def _mapped(path: Path) -> AsyncIterator[None]:
    """The one place sqlite3 errors become engine errors."""
    try:
        yield
    except DewError:
        raise
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "locked" in text or "busy" in text:
            raise BackendUnavailable(
                f"the task store {path} is busy", cause=text, fix="Retry; another process holds "
                "a long write lock."
            ) from None
        raise BackendUnavailable(
            f"the task store {path} cannot be used: {text}",
            fix="Check that the state directory exists and is writable.",
        ) from None
    except sqlite3.DatabaseError as exc:
        raise ConfigError(
            f"{path} is not a usable task store: {exc}",
            fix="Point DEW_STATE_DIR at a directory holding a dew-engine task store.",
        ) from None


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _where(**filters: str | None) -> tuple[str, list[str]]:
    clauses = [f"{column} = ?" for column, value in filters.items() if value is not None]
    params = [value for value in filters.values() if value is not None]
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


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
    )


def _required_ts(text: str) -> datetime:
    ts = parse_iso(text)
    assert ts is not None
    return ts
