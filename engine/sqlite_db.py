"""One SQLite connection as every store of the engine uses it.

The task store and the domain stores (KMS keys, secrets, key pairs) share one
database file, each with its own aiosqlite connection set up the same way: WAL,
``synchronous=NORMAL``, a busy timeout so that processes queue for the write
lock instead of failing, and one lock per connection held by every statement
(``_locked`` blocks: reads, writes and transactions), so a statement of one coroutine
never lands inside (and is rolled back with) another coroutine's transaction.
Transactions use ``BEGIN IMMEDIATE`` so two processes never deadlock on a lock
upgrade. ``sqlite_errors`` is the one place sqlite3 exceptions become engine
errors.

The hot writes (one group-committed statement per batch, ``_hot_fetchall``) skip
the thread: handing a statement to aiosqlite's thread and back costs more than the
statement (GIL hand-offs and wake-ups: ~0.1 ms of the loop's time per statement on
two shared cores, against tens of microseconds for a batch of the statement itself).
They run at once on the loop's thread, on a second
connection (``DirectConnection``) that never waits: when another connection holds
the write lock, nothing is written and the statement goes the usual way, waiting in
the thread. Same file, same WAL and ``synchronous=NORMAL``, the same one statement:
the same durability. That connection never checkpoints on the loop (a checkpoint
fsyncs): every ``CHECKPOINT_EVERY`` direct writes the store checkpoints in the
thread, the hot writes waiting meanwhile, as after SQLite's own auto-checkpoint.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar, Self

import aiosqlite

from engine.errors import BackendUnavailable, ConfigError, Conflict, DewError
from engine.private import private_dir, private_files


@asynccontextmanager
async def sqlite_errors(
    path: Path, what: str, conflict_code: str, conflict_fix: str
) -> AsyncIterator[None]:
    """Map sqlite3 exceptions raised inside the block to engine errors."""
    try:
        yield
    except DewError:
        raise
    except sqlite3.IntegrityError as exc:
        raise Conflict(f"{what} refused a conflicting write", cause=str(exc),
                       code=conflict_code, fix=conflict_fix) from None
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "locked" in text or "busy" in text:
            raise BackendUnavailable(
                f"{what} {path} is busy", cause=text,
                fix="Retry; another process holds a long write lock.",
            ) from None
        raise BackendUnavailable(
            f"{what} {path} cannot be used: {text}",
            fix="Check that the state directory exists and is writable.",
        ) from None
    except sqlite3.DatabaseError as exc:
        raise ConfigError(
            f"{path} is not a usable task store: {exc}",
            fix="Point DEW_STATE_DIR at a directory holding a dew-engine task store.",
        ) from None


CHECKPOINT_EVERY = 100  # hot writes (batches): a few hundred to a few thousand WAL pages


class DirectConnection:
    """A plain sqlite3 connection for short writes on the event loop's own thread,
    opened on first use (the store's schema is current by then). It never waits for
    the write lock and never checkpoints: ``fetchall`` returns None instead (nothing
    was written), and the store checkpoints in its thread."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self.writes = 0  # since the last checkpoint

    def fetchall(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row] | None:
        """Run one statement now; None when the file is locked by another connection
        (SQLite rolled the statement back whole: nothing of it was written), or when
        this connection was closed (the store's own says what that means)."""
        if self._closed:
            return None
        conn = self._conn or self._open()
        try:
            rows = conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                return None
            raise
        self.writes += 1
        return rows

    def _open(self) -> sqlite3.Connection:
        # Used only from the loop's thread; not checked, so a store closed from
        # another thread's loop can still close it.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._conn = conn
        return conn

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


class SqliteDb:
    """Base of the SQLite stores: the connection, its lock and the plumbing."""

    what: ClassVar[str] = "the task store"
    conflict_code: ClassVar[str] = "store_conflict"
    conflict_fix: ClassVar[str] = "Retry; another process changed the same record."
    # The store's schema: its component name and numbered scripts, applied on open.
    schema: ClassVar[str] = ""
    migrations: ClassVar[tuple[str, ...]] = ()

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path
        self._tx_lock = asyncio.Lock()
        self._direct = DirectConnection(path)
        # Held by each hot write (they run without a pause) and across a checkpoint.
        self._hot_lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: Path) -> Self:
        private_dir(path.parent)
        errors = sqlite_errors(path, cls.what, cls.conflict_code, cls.conflict_fix)
        async with errors:
            conn = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            async with sqlite_errors(path, cls.what, cls.conflict_code, cls.conflict_fix):
                conn.row_factory = aiosqlite.Row
                await conn.execute("PRAGMA busy_timeout = 15000")
                await conn.execute("PRAGMA journal_mode = WAL")
                await conn.execute("PRAGMA synchronous = NORMAL")
            private_files(path, Path(f"{path}-wal"), Path(f"{path}-shm"))
            return cls(conn, path)
        except BaseException:
            await conn.close()  # its thread would keep the process alive
            raise

    @classmethod
    async def open(cls, path: Path) -> Self:
        """The store's own connection, once its schema is current (created or upgraded)."""
        store = await cls.connect(path)
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
        return store

    async def migrate(self) -> None:
        """Run this store's scripts the file has not had yet. Each store (the task
        store, each service's) numbers its own, as a row of ``schema_migrations``;
        one transaction, so two processes opening the file at once migrate once."""
        if not self.schema:
            return
        async with self._transaction():
            await self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            row = await self._fetchone(
                "SELECT version FROM schema_migrations WHERE component = ?", (self.schema,))
            current = int(row[0]) if row else 0
            latest = len(self.migrations)
            if current > latest:
                raise ConfigError(
                    f"{self._path} has {self.what} schema version {current}, newer than this "
                    f"engine ({latest})",
                    fix="Upgrade dew-engine, or point DEW_STATE_DIR at another directory.",
                )
            for script in self.migrations[current:]:
                for statement in _statements(script):
                    await self._conn.execute(statement)
            if latest > current:
                await self._conn.execute(
                    "INSERT INTO schema_migrations (component, version) VALUES (?, ?) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (self.schema, latest))

    async def close(self) -> None:
        self._direct.close()
        await self._conn.close()

    async def set_busy_timeout(self, ms: int) -> None:
        """How long a statement waits for another process's write lock."""
        async with self._locked():
            await self._conn.execute(f"PRAGMA busy_timeout = {int(ms)}")

    def _mapped(self) -> AbstractAsyncContextManager[None]:
        return sqlite_errors(self._path, self.what, self.conflict_code, self.conflict_fix)

    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The connection's lock and the error mapping, around every statement.

        Reads hold the lock too: a read left open between its ``execute`` and
        ``fetch`` keeps a read snapshot, and another coroutine's
        ``BEGIN IMMEDIATE`` on the same connection then fails at once with
        "database is locked" (SQLite does not wait on the busy timeout to upgrade
        a stale snapshot); a read run inside another coroutine's transaction would
        also see writes that may yet be rolled back."""
        async with self._tx_lock, self._mapped():
            yield

    async def _execute(self, sql: str, params: Iterable[Any]) -> int:
        """One write statement; returns the number of rows it changed."""
        async with self._locked():
            cursor = await self._conn.execute(sql, tuple(params))
            return int(cursor.rowcount)

    async def _fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        async with self._conn.execute(sql, tuple(params)) as cursor:
            return await cursor.fetchone()

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        # One hop to the connection's thread (execute, fetch and close there), not three.
        return list(await self._conn.execute_fetchall(sql, tuple(params)))

    async def _hot_fetchall(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        """One statement of the hot path (a group-committed batch): on the loop's
        thread when the write lock is free, else in the thread once it is."""
        async with self._hot_lock:
            if self._direct.writes >= CHECKPOINT_EVERY:
                self._direct.writes = 0
                await self._checkpoint_wal()
            async with self._mapped():
                rows = self._direct.fetchall(sql, params)
        if rows is None:
            async with self._locked():
                return await self._fetchall(sql, params)
        return rows

    async def _checkpoint_wal(self) -> None:
        """Copy the WAL back into the file, in the thread (its fsyncs block), as
        SQLite's own auto-checkpoint would after a commit: with no hot write in
        between, so that the next one starts the WAL over instead of growing it."""
        try:
            async with self._locked():
                # Read to the end: a statement left open would hold a read snapshot,
                # and with it the WAL, which could then never be reset.
                await self._fetchall("PRAGMA wal_checkpoint(PASSIVE)")
        except DewError:
            pass  # the next one, or any other connection's commit, does it

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        async with self._locked():
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
