"""The SQLite backend of the stores (``engine.sql_db``): the embedded default.

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
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal, Self

import aiosqlite

from engine.errors import BackendUnavailable, ConfigError, Conflict, DewError, SchemaTooNew
from engine.private import private_dir, private_files
from engine.sql_db import Dialects, Migration


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


class SqliteBackend:
    """A store's aiosqlite connection, its lock and the plumbing (``engine.sql_db``)."""

    dialect: Literal["sqlite"] = "sqlite"

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self.conn = conn
        self._path = path
        self.location = str(path)
        self._tx_lock = asyncio.Lock()
        self._direct = DirectConnection(path)
        # Held by each hot write (they run without a pause) and across a checkpoint.
        self._hot_lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: Path, what: str, code: str, fix: str) -> Self:
        private_dir(path.parent)
        async with sqlite_errors(path, what, code, fix):
            conn = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            async with sqlite_errors(path, what, code, fix):
                conn.row_factory = aiosqlite.Row
                await conn.execute("PRAGMA busy_timeout = 15000")
                await conn.execute("PRAGMA journal_mode = WAL")
                await conn.execute("PRAGMA synchronous = NORMAL")
            private_files(path, Path(f"{path}-wal"), Path(f"{path}-shm"))
            return cls(conn, path)
        except BaseException:
            await conn.close()  # its thread would keep the process alive
            raise

    async def migrate(
        self, component: str, migrations: Sequence[Migration], what: str, code: str, fix: str,
    ) -> None:
        async with self.transaction(what, code, fix, lock=component):
            await self.conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            row = await self.fetchone(
                "SELECT version FROM schema_migrations WHERE component = ?", (component,))
            current = int(row[0]) if row else 0
            check_version(current, len(migrations), what, self.location)
            for script in migrations[current:]:
                text = script.for_dialect("sqlite") if isinstance(script, Dialects) else script
                for statement in statements(text):
                    await self.conn.execute(statement)
            if len(migrations) > current:
                await self.conn.execute(
                    "INSERT INTO schema_migrations (component, version) VALUES (?, ?) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (component, len(migrations)))

    async def close(self) -> None:
        self._direct.close()
        await self.conn.close()

    async def set_busy_timeout(self, ms: int) -> None:
        async with self._tx_lock:
            await self.conn.execute(f"PRAGMA busy_timeout = {int(ms)}")

    def mapped(self, what: str, code: str, fix: str) -> AbstractAsyncContextManager[None]:
        return sqlite_errors(self._path, what, code, fix)

    @asynccontextmanager
    async def locked(self, what: str, code: str, fix: str) -> AsyncIterator[None]:
        """The connection's lock and the error mapping, around every statement.

        Reads hold the lock too: a read left open between its ``execute`` and
        ``fetch`` keeps a read snapshot, and another coroutine's
        ``BEGIN IMMEDIATE`` on the same connection then fails at once with
        "database is locked" (SQLite does not wait on the busy timeout to upgrade
        a stale snapshot); a read run inside another coroutine's transaction would
        also see writes that may yet be rolled back."""
        async with self._tx_lock, self.mapped(what, code, fix):
            yield

    async def fetchone(self, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
        async with self.conn.execute(sql, tuple(params)) as cursor:
            return await cursor.fetchone()

    async def fetchall(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        # One hop to the connection's thread (execute, fetch and close there), not three.
        return list(await self.conn.execute_fetchall(sql, tuple(params)))

    async def hot_fetchall(
        self, sql: str, params: Sequence[Any], what: str, code: str, fix: str,
    ) -> list[sqlite3.Row]:
        """One statement of the hot path (a group-committed batch): on the loop's
        thread when the write lock is free, else in the thread once it is."""
        async with self._hot_lock:
            if self._direct.writes >= CHECKPOINT_EVERY:
                self._direct.writes = 0
                await self._checkpoint_wal(what, code, fix)
            async with self.mapped(what, code, fix):
                rows = self._direct.fetchall(sql, params)
        if rows is None:
            async with self.locked(what, code, fix):
                return await self.fetchall(sql, params)
        return rows

    async def _checkpoint_wal(self, what: str, code: str, fix: str) -> None:
        """Copy the WAL back into the file, in the thread (its fsyncs block), as
        SQLite's own auto-checkpoint would after a commit: with no hot write in
        between, so that the next one starts the WAL over instead of growing it."""
        try:
            async with self.locked(what, code, fix):
                # Read to the end: a statement left open would hold a read snapshot,
                # and with it the WAL, which could then never be reset.
                await self.fetchall("PRAGMA wal_checkpoint(PASSIVE)", ())
        except DewError:
            pass  # the next one, or any other connection's commit, does it

    @asynccontextmanager
    async def transaction(self, what: str, code: str, fix: str, lock: str) -> AsyncIterator[None]:
        # ``lock`` names the store; SQLite has one write lock for the whole file.
        async with self.locked(what, code, fix):
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
            await self.conn.execute("COMMIT")

    @asynccontextmanager
    async def snapshot(self, what: str, code: str, fix: str) -> AsyncIterator[None]:
        async with self.locked(what, code, fix):
            await self.conn.execute("BEGIN")
            try:
                yield
            finally:
                await self.conn.execute("COMMIT")


def check_version(current: int, latest: int, what: str, location: str) -> None:
    """A database whose schema is newer than this engine's is refused, unchanged."""
    if current > latest:
        raise SchemaTooNew(
            f"{location} has {what} schema version {current}, newer than this "
            f"engine ({latest})",
            fix="Upgrade dew-engine on this node, or point it at another database.",
        )


def statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
