"""The PostgreSQL backend of the stores (``engine.sql_db``), for several nodes.

``[store] url = "postgresql://..."`` puts every store (tasks, KMS, CSMS, KPS,
identities, schedules) in one PostgreSQL database shared by every node. Stores keep
their SQL; this adapter gives it aiosqlite's shape over an asyncpg pool:

- ``?`` placeholders become ``$n`` (once per statement text, cached); a parameter
  is converted to the type PostgreSQL infers for it (an ``int`` where it wants
  text, a ``bool`` where it wants an integer), as SQLite's dynamic types would take it.
- Migrations are the stores' own scripts, with SQLite's column types mapped
  (``INTEGER`` to ``BIGINT``, ``BLOB`` to ``BYTEA``, ``TEXT`` compared byte-wise
  with ``COLLATE "C"`` as SQLite's ``BINARY`` does: ids and ISO times sort the same).
- ``_transaction()`` takes the store's transaction-scoped advisory lock first:
  where SQLite has one writer per file (``BEGIN IMMEDIATE``), a store here has one
  writer at a time across all nodes, so every check-then-write keeps its meaning.
  Single statements (claims, fenced updates, ``ON CONFLICT``) need no lock: their
  ``WHERE`` is re-checked on the row a concurrent writer left.
- asyncpg's exceptions become engine errors in :func:`pg_errors` and nowhere else.

One pool per database and event loop is shared by the process's stores.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Self

import asyncpg

from engine.errors import BackendUnavailable, Conflict, DewError, InternalError
from engine.sql_db import Dialects, Migration, StoreTarget, check_store_url, pg_ddl, redact_url
from engine.sqlite_db import check_version, statements

_MIGRATION_LOCK = "dew:schema_migrations"


@lru_cache(maxsize=4096)
def placeholders(sql: str) -> str:
    """``?`` to ``$1, $2, ...``, outside quoted strings and identifiers."""
    out, n, quote = [], 0, ""
    for ch in sql:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            n += 1
            out.append(f"${n}")
            continue
        out.append(ch)
    return "".join(out)


def lock_key(name: str) -> int:
    """The advisory lock id of a store (a signed 64-bit number)."""
    return int.from_bytes(hashlib.sha256(f"dew:{name}".encode()).digest()[:8], "big",
                          signed=True)


_TEXT = frozenset({"text", "varchar", "bpchar", "name", "unknown"})
_INT = frozenset({"int8", "int4", "int2"})
_FLOAT = frozenset({"float8", "float4", "numeric"})


def _coerce(value: Any, type_name: str) -> Any:
    """A parameter as PostgreSQL expects it, where SQLite would have taken it as is."""
    if value is None:
        return None
    if type_name in _TEXT:
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, int | float):
            return str(value)
    elif type_name in _INT:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif type_name in _FLOAT:
        if isinstance(value, int | str) and not isinstance(value, bool):
            return float(value)
    elif type_name == "bool" and isinstance(value, int):
        return bool(value)
    return value


def _rowcount(status: str | None) -> int:
    """``UPDATE 3`` -> 3; ``INSERT 0 1`` -> 1; -1 when the status has no count."""
    last = (status or "").rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else -1


@dataclass
class PgCursor:
    """What a statement left: its rows and how many rows it changed."""

    rows: list[asyncpg.Record]
    rowcount: int
    lastrowid: None = None

    async def fetchone(self) -> asyncpg.Record | None:
        return self.rows[0] if self.rows else None

    async def fetchall(self) -> list[asyncpg.Record]:
        return self.rows


class _Call:
    """``conn.execute(...)``: awaited, or used with ``async with`` (aiosqlite's shape)."""

    def __init__(self, backend: PgBackend, sql: str, params: Iterable[Any]) -> None:
        self._run = backend.run(sql, tuple(params))

    def __await__(self) -> Any:
        return self._run.__await__()

    async def __aenter__(self) -> PgCursor:
        return await self._run

    async def __aexit__(self, *exc: object) -> None:
        return None


class PgConnection:
    """The store's ``_conn``: statements on the current transaction's connection, or
    on any of the pool's."""

    def __init__(self, backend: PgBackend) -> None:
        self._backend = backend

    def execute(self, sql: str, parameters: Iterable[Any] = (), /) -> _Call:
        return _Call(self._backend, sql, parameters)

    async def execute_fetchall(
        self, sql: str, parameters: Iterable[Any] = (), /,
    ) -> list[asyncpg.Record]:
        return (await self._backend.run(sql, tuple(parameters))).rows

    async def executemany(
        self, sql: str, parameters: Iterable[Iterable[Any]], /,
    ) -> PgCursor:
        """One statement for each row of ``parameters``: one round trip, not one each."""
        return await self._backend.run_many(sql, [tuple(row) for row in parameters])


# The connection of the transaction this task is in, per backend.
_current: ContextVar[dict[int, asyncpg.Connection] | None] = ContextVar(
    "dew_pg_transaction", default=None)


@dataclass
class _SharedPool:
    pool: asyncpg.Pool
    users: int = 0


@dataclass
class _LoopPools:
    """The pools of one event loop (a pool's connections belong to the loop that made it)."""

    by_url: dict[str, _SharedPool] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopPools] = (
    weakref.WeakKeyDictionary())


@asynccontextmanager
async def pg_errors(location: str, what: str, code: str, fix: str) -> AsyncIterator[None]:
    """Map asyncpg's and the network's exceptions inside the block to engine errors."""
    try:
        yield
    except DewError:
        raise
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise Conflict(f"{what} refused a conflicting write", cause=str(exc), code=code,
                       fix=fix) from None
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidCatalogNameError) as exc:
        raise BackendUnavailable(
            f"PostgreSQL at {location} refused the login for {what}: {exc}",
            fix="Check the user, password and database of [store] url, and pg_hba.conf.",
        ) from None
    except (asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
            asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError,
            asyncpg.PostgresConnectionError, asyncpg.SerializationError,
            asyncpg.DeadlockDetectedError, asyncpg.QueryCanceledError,
            asyncpg.LockNotAvailableError, asyncpg.AdminShutdownError,
            OSError, TimeoutError) as exc:
        text = str(exc) or type(exc).__name__
        raise BackendUnavailable(
            f"PostgreSQL at {location} cannot be reached for {what}: {text}",
            fix="Check that the PostgreSQL server runs and [store] url names it; retry.",
        ) from None
    except asyncpg.PostgresError as exc:
        raise InternalError(f"{what}: PostgreSQL refused a statement: {exc}",
                            cause=type(exc).__name__) from None


class PgBackend:
    """One store's view of the shared pool."""

    dialect: Literal["postgresql"] = "postgresql"

    def __init__(self, shared: _SharedPool, pools: _LoopPools, url: str, location: str) -> None:
        self._shared = shared
        self._pools = pools
        self._url = url
        self.location = location
        self.conn = PgConnection(self)
        self._closed = False

    @classmethod
    async def connect(cls, target: StoreTarget) -> Self:
        check_store_url(target.url)
        location = redact_url(target.url)
        pools = _POOLS.setdefault(asyncio.get_running_loop(), _LoopPools())
        async with pools.lock:
            shared = pools.by_url.get(target.url)
            if shared is None:
                async with pg_errors(location, "the stores", "store_conflict", ""):
                    pool = await asyncpg.create_pool(
                        target.url, min_size=min(target.pool_min, target.pool_max),
                        max_size=target.pool_max, timeout=target.connect_timeout,
                        command_timeout=None, statement_cache_size=1024)
                shared = pools.by_url[target.url] = _SharedPool(pool)
            shared.users += 1
        return cls(shared, pools, target.url, location)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._shared.users -= 1
        if self._shared.users == 0 and self._pools.by_url.get(self._url) is self._shared:
            del self._pools.by_url[self._url]
            await self._shared.pool.close()

    async def set_busy_timeout(self, ms: int) -> None:
        """SQLite's wait for the write lock; PostgreSQL waits on its row locks."""

    def mapped(self, what: str, code: str, fix: str) -> Any:
        return pg_errors(self.location, what, code, fix)

    def locked(self, what: str, code: str, fix: str) -> Any:
        # No lock of our own: each statement outside a transaction takes a pooled
        # connection, and PostgreSQL orders concurrent writers itself.
        return pg_errors(self.location, what, code, fix)

    @asynccontextmanager
    async def transaction(self, what: str, code: str, fix: str, lock: str) -> AsyncIterator[None]:
        async with self._connection(what, code, fix, write_lock=lock):
            yield

    @asynccontextmanager
    async def snapshot(self, what: str, code: str, fix: str) -> AsyncIterator[None]:
        async with self._connection(what, code, fix, isolation="repeatable_read",
                                    readonly=True):
            yield

    @asynccontextmanager
    async def _connection(
        self, what: str, code: str, fix: str, *, write_lock: str = "",
        isolation: str = "read_committed", readonly: bool = False,
    ) -> AsyncIterator[None]:
        held = _current.get() or {}
        async with pg_errors(self.location, what, code, fix), \
                self._shared.pool.acquire() as conn, \
                conn.transaction(isolation=isolation, readonly=readonly):
            if write_lock:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(write_lock))
            token = _current.set({**held, id(self): conn})
            try:
                yield
            finally:
                _current.reset(token)

    async def run(self, sql: str, params: Sequence[Any]) -> PgCursor:
        """One statement, on this task's transaction if it is in one."""
        if sql.lstrip()[:6].upper() == "PRAGMA":
            return PgCursor([], -1)
        return await self._on_connection(lambda conn: _run(conn, sql, params))

    async def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> PgCursor:
        """One statement for each row of parameters, on this task's transaction if it
        is in one (asyncpg's ``executemany``: pipelined, all or nothing)."""
        if not rows:
            return PgCursor([], 0)
        return await self._on_connection(lambda conn: _run_many(conn, sql, rows))

    async def _on_connection(
        self, work: Callable[[asyncpg.Connection], Awaitable[PgCursor]],
    ) -> PgCursor:
        held = _current.get()
        conn = held.get(id(self)) if held else None
        if conn is not None:
            return await work(conn)
        async with self._shared.pool.acquire() as pooled:
            return await work(pooled)

    async def fetchone(self, sql: str, params: Sequence[Any]) -> asyncpg.Record | None:
        rows = (await self.run(sql, params)).rows
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Sequence[Any]) -> list[asyncpg.Record]:
        return (await self.run(sql, params)).rows

    async def hot_fetchall(
        self, sql: str, params: Sequence[Any], what: str, code: str, fix: str,
    ) -> list[asyncpg.Record]:
        async with self.locked(what, code, fix):
            return (await self.run(sql, params)).rows

    async def migrate(
        self, component: str, migrations: Sequence[Migration], what: str, code: str, fix: str,
    ) -> None:
        latest = len(migrations)
        # Up to date (every start but the first): no lock, so a node that stopped in
        # the middle of another component's migration holds nobody up.
        current = await self._version(component, what, code, fix)
        if current is not None:
            check_version(current, latest, what, self.location)
            if current == latest:
                return
        else:
            # One lock for the shared table: CREATE TABLE IF NOT EXISTS is not safe
            # against a concurrent one in PostgreSQL (a unique violation in the catalog).
            async with self._connection(what, code, fix, write_lock=_MIGRATION_LOCK):
                await self.run("CREATE TABLE IF NOT EXISTS schema_migrations ("
                               " component TEXT COLLATE \"C\" PRIMARY KEY,"
                               " version BIGINT NOT NULL)", ())
        # One component's scripts under its own lock: nodes migrate it once.
        async with self._connection(what, code, fix,
                                    write_lock=f"{_MIGRATION_LOCK}:{component}"):
            current = await self._version(component, what, code, fix) or 0
            check_version(current, latest, what, self.location)
            for script in migrations[current:]:
                text = (script.for_dialect("postgresql") if isinstance(script, Dialects)
                        else pg_ddl(script))
                for statement in statements(text):
                    await self.run(statement, ())
            if latest > current:
                await self.run(
                    "INSERT INTO schema_migrations (component, version) VALUES (?, ?) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (component, latest))

    async def _version(self, component: str, what: str, code: str, fix: str) -> int | None:
        """The component's schema version; None before any store made the table."""
        async with self.mapped(what, code, fix):
            try:
                row = await self.fetchone(
                    "SELECT version FROM schema_migrations WHERE component = ?", (component,))
            except asyncpg.UndefinedTableError:
                return None
        return 0 if row is None else int(row[0])


async def _run(conn: asyncpg.Connection, sql: str, params: Sequence[Any]) -> PgCursor:
    text = placeholders(sql)
    if not params:
        if _returns_rows(text):
            rows = await conn.fetch(text)
            return PgCursor(rows, len(rows))
        return PgCursor([], _rowcount(await conn.execute(text)))
    # The statement's parameter types (prepared once per connection, cached by
    # asyncpg) tell how to pass each value.
    statement = await conn._prepare(text, use_cache=True)
    types = statement.get_parameters()
    args = [_coerce(v, t.name) for v, t in zip(params, types, strict=False)]
    rows = await statement.fetch(*args)
    count = _rowcount(statement.get_statusmsg())
    return PgCursor(rows, len(rows) if count < 0 else count)


async def _run_many(
    conn: asyncpg.Connection, sql: str, rows: Sequence[Sequence[Any]],
) -> PgCursor:
    statement = await conn._prepare(placeholders(sql), use_cache=True)
    types = [t.name for t in statement.get_parameters()]
    await statement.executemany(
        [[_coerce(v, t) for v, t in zip(row, types, strict=False)] for row in rows])
    return PgCursor([], -1)  # asyncpg does not count the rows of an executemany


def _returns_rows(sql: str) -> bool:
    head = sql.lstrip()[:6].upper()
    return head in ("SELECT", "WITH", "VALUES") or "RETURNING" in sql.upper()
