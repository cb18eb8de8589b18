"""The identity store: projects, users, their roles, access keys and custom roles.

Tables in the engine's store (``engine.sql_db``: the SQLite file, or ``[store] url``'s
PostgreSQL database shared by every node), schema ``MIGRATIONS`` below (component
``iam`` of ``schema_migrations``). A secret key is stored only as the blob the service
sealed under the HSM (``secret_sealed``); this module never sees it in clear.

With several processes on several machines: checks that need the database (a taken
name, a role still held, the access-key limit, an unknown custom role) run in the
``_transaction()`` of the write they guard (one writer of this store at a time on
either backend) and raise engine errors, which roll it back. The wrong-password count
is one atomic upsert (``ON CONFLICT ... RETURNING``): every node's failure counts.
Console sessions are keyed by a random token's hash: creating one checks nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from engine.errors import InvalidInput, NotFound
from engine.iam.model import (
    DEFAULT_PROJECT,
    AccessKey,
    IdentityConflict,
    Project,
    Role,
    User,
    is_id,
    new_id,
)
from engine.models import iso, parse_iso, utcnow
from engine.sql_db import Dialects, Row, SqlDb

# This store's schema, numbered from 1 and tracked as component "iam".
MIGRATIONS: tuple[str, ...] = (
    # 1: projects, users and their roles, access keys (SK sealed), custom roles
    """
    CREATE TABLE IF NOT EXISTS iam_projects (
        project_id  TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS iam_users (
        user_id     TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        project_id  TEXT NOT NULL REFERENCES iam_projects (project_id),
        enabled     INTEGER NOT NULL CHECK (enabled IN (0, 1)),
        cidrs       TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS iam_users_project ON iam_users (project_id, name);
    CREATE TABLE IF NOT EXISTS iam_user_roles (
        user_id     TEXT NOT NULL REFERENCES iam_users (user_id),
        role        TEXT NOT NULL,
        PRIMARY KEY (user_id, role)
    );
    CREATE INDEX IF NOT EXISTS iam_user_roles_role ON iam_user_roles (role);
    CREATE TABLE IF NOT EXISTS iam_roles (
        name        TEXT PRIMARY KEY,
        actions     TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        created_at  TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS iam_access_keys (
        access_key    TEXT PRIMARY KEY,
        user_id       TEXT NOT NULL REFERENCES iam_users (user_id),
        secret_sealed BLOB NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('active', 'inactive')),
        created_at    TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS iam_access_keys_user ON iam_access_keys (user_id);
    """,
    # 2: the web console: a user's password (argon2id), its sessions (by the hash of
    # the cookie's token: reading the file gives no live session) and the count of
    # wrong passwords in a row per user name (known or not: the slow-down tells nothing)
    """
    ALTER TABLE iam_users ADD COLUMN password_hash TEXT;
    CREATE TABLE IF NOT EXISTS iam_console_sessions (
        token_hash  TEXT PRIMARY KEY,
        user_id     TEXT NOT NULL REFERENCES iam_users (user_id),
        csrf        TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        last_seen   TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS iam_console_sessions_user ON iam_console_sessions (user_id);
    CREATE TABLE IF NOT EXISTS iam_sign_in_failures (
        name          TEXT PRIMARY KEY,
        failures      INTEGER NOT NULL,
        last_failure  TEXT NOT NULL
    );
    """,
)

# A user's roles, each with its custom actions, as JSON text: [[role, actions], ...]
# (actions: the custom role's JSON text; null for a role that is not custom). The
# same text on both backends ('[]' for no role), read by the service's json.loads.
ROLES_WITH_ACTIONS = Dialects(
    sqlite="""(SELECT json_group_array(json_array(r.role, c.actions))
            FROM iam_user_roles r LEFT JOIN iam_roles c ON c.name = r.role
            WHERE r.user_id = u.user_id)""",
    postgresql="""(SELECT COALESCE(json_agg(json_build_array(r.role, c.actions)), '[]')::text
            FROM iam_user_roles r LEFT JOIN iam_roles c ON c.name = r.role
            WHERE r.user_id = u.user_id)""")
# The user's role names, sorted, as a JSON array (text).
ROLE_NAMES = Dialects(
    sqlite="""(SELECT json_group_array(role) FROM (
                SELECT role FROM iam_user_roles r WHERE r.user_id = u.user_id ORDER BY role))""",
    postgresql="""(SELECT COALESCE(json_agg(r.role ORDER BY r.role), '[]')::text
            FROM iam_user_roles r WHERE r.user_id = u.user_id)""")


def _with_roles(template: str, roles: Dialects) -> Dialects:
    return Dialects(sqlite=template.format(roles=roles.sqlite),
                    postgresql=template.format(roles=roles.postgresql))


# What the console's Principal needs: read anew on every console request.
USER_PRINCIPAL_SQL = _with_roles("""
    SELECT u.user_id, u.name AS user, u.enabled, u.cidrs, p.project_id, p.name AS project,
           {roles} AS roles
    FROM iam_users u JOIN iam_projects p ON p.project_id = u.project_id
    WHERE u.user_id = ?""", ROLES_WITH_ACTIONS)

CALLER_SQL = _with_roles("""
    SELECT k.access_key, k.secret_sealed, k.status, u.user_id, u.name AS user,
           u.enabled, u.cidrs, p.project_id, p.name AS project,
           {roles} AS roles
    FROM iam_access_keys k JOIN iam_users u ON u.user_id = k.user_id
         JOIN iam_projects p ON p.project_id = u.project_id
    WHERE k.access_key = ?""", ROLES_WITH_ACTIONS)

USER_SELECT = _with_roles("""
    SELECT u.user_id, u.name, u.project_id, p.name AS project, u.enabled, u.cidrs,
           u.created_at, {roles} AS roles
    FROM iam_users u JOIN iam_projects p ON p.project_id = u.project_id
""", ROLE_NAMES)
KEY_SELECT = """
    SELECT k.access_key, k.user_id, u.name AS user, u.project_id, p.name AS project,
           k.status, k.created_at
    FROM iam_access_keys k JOIN iam_users u ON u.user_id = k.user_id
         JOIN iam_projects p ON p.project_id = u.project_id
"""


class SqliteIamStore(SqlDb):
    what = "the identity store"
    conflict_code = "iam_store_conflict"
    conflict_fix = "Retry; another process changed the same record."
    schema = "iam"
    migrations = MIGRATIONS
    _reader_conn: sqlite3.Connection | None = None

    async def migrate(self) -> None:
        """The schema, then the project ``default`` (what the CLI's default account
        was), which always exists: made on first open, read-only checked after."""
        await super().migrate()
        async with self._locked():
            row = await self._fetchone("SELECT 1 FROM iam_projects WHERE name = ?",
                                       (DEFAULT_PROJECT,))
        if row is None:
            async with self._transaction():
                await self._conn.execute(
                    "INSERT INTO iam_projects (project_id, name, created_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO NOTHING", (new_id(), DEFAULT_PROJECT, iso(utcnow())))

    def _sql(self, statement: Dialects) -> str:
        return statement.for_dialect(self.dialect)

    # --- projects --------------------------------------------------------------------

    async def get_project(self, ref: str) -> Project | None:
        """By 32-hex id or by name."""
        column = "project_id" if is_id(ref) else "name"
        async with self._locked():
            row = await self._fetchone(
                f"SELECT project_id, name, created_at FROM iam_projects WHERE {column} = ?",
                (ref,))
        return None if row is None else _project(row)

    async def list_projects(self) -> list[Project]:
        async with self._locked():
            rows = await self._fetchall(
                "SELECT project_id, name, created_at FROM iam_projects ORDER BY name")
        return [_project(r) for r in rows]

    async def create_project(self, project: Project) -> None:
        async with self._transaction():
            if await self._fetchone("SELECT 1 FROM iam_projects WHERE name = ?",
                                    (project.name,)) is not None:
                raise IdentityConflict(f"a project named {project.name!r} exists",
                                       code="project_exists", target=project.name,
                                       fix="Choose another name.")
            await self._conn.execute(
                "INSERT INTO iam_projects (project_id, name, created_at) VALUES (?, ?, ?)",
                (project.project_id, project.name, iso(project.created_at)))

    # --- users -----------------------------------------------------------------------

    async def get_user(self, ref: str) -> User | None:
        """By 32-hex id or by name."""
        column = "u.user_id" if is_id(ref) else "u.name"
        async with self._locked():
            row = await self._fetchone(f"{self._sql(USER_SELECT)} WHERE {column} = ?",
                                       (ref,))
        return None if row is None else _user(row)

    async def list_users(self, project_id: str | None = None) -> list[User]:
        where, params = ("WHERE u.project_id = ?", (project_id,)) if project_id else ("", ())
        async with self._locked():
            rows = await self._fetchall(f"{self._sql(USER_SELECT)} {where} ORDER BY u.name",
                                        params)
        return [_user(r) for r in rows]

    async def create_user(self, user: User, builtin_roles: Collection[str]) -> None:
        """Insert ``user`` with its roles; refused (nothing written) on a taken name, a
        project that is gone or a role that is neither built in nor a custom one."""
        async with self._transaction():
            if await self._fetchone("SELECT 1 FROM iam_users WHERE name = ?",
                                    (user.name,)) is not None:
                raise IdentityConflict(f"a user named {user.name!r} exists",
                                       code="user_exists", target=user.name,
                                       fix="Choose another name.")
            if await self._fetchone("SELECT 1 FROM iam_projects WHERE project_id = ?",
                                    (user.project_id,)) is None:
                raise NotFound(f"no project {user.project!r}", code="project_not_found")
            await self._check_roles(user.roles, builtin_roles)
            await self._conn.execute(
                "INSERT INTO iam_users (user_id, name, project_id, enabled, cidrs, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (user.user_id, user.name, user.project_id, int(user.enabled),
                 json.dumps(list(user.cidrs)), iso(user.created_at)))
            await self._insert_roles(user.user_id, user.roles)

    async def set_roles(self, user_id: str, roles: Sequence[str],
                        builtin_roles: Collection[str]) -> bool:
        """Replace the user's roles; False when the user is gone."""
        async with self._transaction():
            if await self._fetchone("SELECT 1 FROM iam_users WHERE user_id = ?",
                                    (user_id,)) is None:
                return False
            await self._check_roles(roles, builtin_roles)
            await self._conn.execute("DELETE FROM iam_user_roles WHERE user_id = ?", (user_id,))
            await self._insert_roles(user_id, roles)
        return True

    async def set_enabled(self, user_id: str, enabled: bool) -> bool:
        return await self._execute("UPDATE iam_users SET enabled = ? WHERE user_id = ?",
                                   (int(enabled), user_id)) > 0

    async def _check_roles(self, roles: Sequence[str], builtin_roles: Collection[str]) -> None:
        for role in roles:
            if role in builtin_roles:
                continue
            if await self._fetchone("SELECT 1 FROM iam_roles WHERE name = ?", (role,)) is None:
                raise InvalidInput(f"unknown role {role!r} (dew iam list-roles)",
                                   code="invalid_role", target=role)

    async def _insert_roles(self, user_id: str, roles: Sequence[str]) -> None:
        for role in roles:
            await self._conn.execute(
                "INSERT INTO iam_user_roles (user_id, role) VALUES (?, ?) "
                "ON CONFLICT DO NOTHING", (user_id, role))

    # --- access keys -----------------------------------------------------------------

    async def count_access_keys(self, user_id: str) -> int:
        async with self._locked():
            return await self._count_keys(user_id)

    async def _count_keys(self, user_id: str) -> int:
        row = await self._fetchone("SELECT COUNT(*) FROM iam_access_keys WHERE user_id = ?",
                                   (user_id,))
        return 0 if row is None else int(row[0])

    async def create_access_key(self, access_key: str, user_id: str, sealed: bytes,
                                now: datetime, limit: int) -> None:
        async with self._transaction():
            if await self._fetchone("SELECT 1 FROM iam_users WHERE user_id = ?",
                                    (user_id,)) is None:
                raise NotFound(f"no user with id {user_id!r}", code="user_not_found")
            if await self._count_keys(user_id) >= limit:
                raise _key_limit(limit)
            await self._conn.execute(
                "INSERT INTO iam_access_keys (access_key, user_id, secret_sealed, status, "
                "created_at) VALUES (?, ?, ?, 'active', ?)",
                (access_key, user_id, sealed, iso(now)))

    async def get_access_key(self, access_key: str) -> AccessKey | None:
        async with self._locked():
            row = await self._fetchone(f"{KEY_SELECT} WHERE k.access_key = ?", (access_key,))
        return None if row is None else _access_key(row)

    async def list_access_keys(self, user_id: str) -> list[AccessKey]:
        async with self._locked():
            rows = await self._fetchall(
                f"{KEY_SELECT} WHERE k.user_id = ? ORDER BY k.created_at", (user_id,))
        return [_access_key(r) for r in rows]

    async def delete_access_key(self, access_key: str) -> bool:
        return await self._execute("DELETE FROM iam_access_keys WHERE access_key = ?",
                                   (access_key,)) > 0

    async def set_access_key_status(self, access_key: str, status: str) -> bool:
        return await self._execute("UPDATE iam_access_keys SET status = ? WHERE access_key = ?",
                                   (status, access_key)) > 0

    async def caller_row(self, access_key: str) -> Row | None:
        """Everything a request needs about ``access_key``, in one statement (so one
        snapshot): the sealed SK, status, user, project, and each role of the user with
        its custom actions (JSON; null for a role that is not custom).

        SQLite: read on a reader connection of this process, in the calling thread: a
        WAL read of one indexed row never waits for writers and costs less than the
        hop to the store's own thread. If the file is busy anyway (a recovery), the
        store's connection reads it. PostgreSQL: one statement on the pool."""
        if self.dialect == "sqlite":
            try:
                row: Row | None = self._reader().execute(
                    CALLER_SQL.sqlite, (access_key,)).fetchone()
                return row
            except sqlite3.OperationalError:
                pass
        async with self._locked():
            found: Row | None = await self._fetchone(self._sql(CALLER_SQL), (access_key,))
        return found

    def _reader(self) -> sqlite3.Connection:
        if self._reader_conn is None:
            conn = sqlite3.connect(self._path, timeout=0.05, check_same_thread=False,
                                   isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only = ON")
            self._reader_conn = conn
        return self._reader_conn

    async def close(self) -> None:
        if self._reader_conn is not None:
            self._reader_conn.close()
            self._reader_conn = None
        await super().close()

    # --- console: passwords, sessions, wrong passwords ----------------------------

    async def set_password(self, user_id: str, password_hash: str) -> bool:
        """Store the user's password hash and end its console sessions (False: no user)."""
        async with self._transaction():
            cursor = await self._conn.execute(
                "UPDATE iam_users SET password_hash = ? WHERE user_id = ?",
                (password_hash, user_id))
            if cursor.rowcount == 0:
                return False
            await self._conn.execute("DELETE FROM iam_console_sessions WHERE user_id = ?",
                                     (user_id,))
        return True

    async def password_of(self, name: str) -> tuple[str, str | None, bool] | None:
        """(user id, password hash or None, enabled) of the user named ``name``."""
        async with self._locked():
            row = await self._fetchone(
                "SELECT user_id, password_hash, enabled FROM iam_users WHERE name = ?", (name,))
        if row is None:
            return None
        return str(row[0]), None if row[1] is None else str(row[1]), bool(row[2])

    async def user_principal_row(self, user_id: str) -> Row | None:
        async with self._locked():
            row: Row | None = await self._fetchone(self._sql(USER_PRINCIPAL_SQL), (user_id,))
        return row

    async def create_session(self, token_hash: str, user_id: str, csrf: str,
                             now: datetime, password_hash: str) -> bool:
        """Store a session of a fresh random token (its hash) for ``user_id``, only while
        the user is enabled and ``password_hash`` (the one the password was checked
        against) is still its own; False otherwise. In the transaction set_password
        writes in: a password changed during the sign-in (whose check takes a fifth
        of a second) ends that session too, before it begins."""
        async with self._transaction():
            row = await self._fetchone(
                "SELECT 1 FROM iam_users WHERE user_id = ? AND password_hash = ? "
                "AND enabled = 1", (user_id, password_hash))
            if row is None:
                return False
            await self._conn.execute(
                "INSERT INTO iam_console_sessions (token_hash, user_id, csrf, created_at, "
                "last_seen) VALUES (?, ?, ?, ?, ?)",
                (token_hash, user_id, csrf, iso(now), iso(now)))
        return True

    async def get_session(self, token_hash: str) -> tuple[str, str, datetime] | None:
        """(user id, CSRF token, last seen) of a session."""
        async with self._locked():
            row = await self._fetchone(
                "SELECT user_id, csrf, last_seen FROM iam_console_sessions "
                "WHERE token_hash = ?", (token_hash,))
        if row is None:
            return None
        seen = parse_iso(row[2])
        assert seen is not None
        return str(row[0]), str(row[1]), seen

    async def touch_session(self, token_hash: str, now: datetime) -> None:
        await self._execute("UPDATE iam_console_sessions SET last_seen = ? WHERE token_hash = ?",
                            (iso(now), token_hash))

    async def delete_session(self, token_hash: str) -> bool:
        return await self._execute("DELETE FROM iam_console_sessions WHERE token_hash = ?",
                                   (token_hash,)) > 0

    async def delete_idle_sessions(self, seen_before: datetime) -> int:
        return await self._execute("DELETE FROM iam_console_sessions WHERE last_seen < ?",
                                   (iso(seen_before),))

    async def count_sessions(self, user_id: str) -> int:
        async with self._locked():
            row = await self._fetchone(
                "SELECT COUNT(*) FROM iam_console_sessions WHERE user_id = ?", (user_id,))
        return 0 if row is None else int(row[0])

    async def sign_in_failures(self, name: str) -> tuple[int, datetime | None]:
        """Wrong passwords in a row for ``name`` and when the last one came."""
        async with self._locked():
            row = await self._fetchone(
                "SELECT failures, last_failure FROM iam_sign_in_failures WHERE name = ?",
                (name,))
        return (0, None) if row is None else (int(row[0]), parse_iso(row[1]))

    async def add_sign_in_failure(self, name: str, now: datetime) -> int:
        """One more wrong password for ``name``; the count now (every process sees it).
        One statement: concurrent failures on several nodes each count."""
        async with self._locked():
            rows = await self._fetchall(
                "INSERT INTO iam_sign_in_failures (name, failures, last_failure) "
                "VALUES (?, 1, ?) ON CONFLICT (name) DO UPDATE SET "
                "failures = iam_sign_in_failures.failures + 1, "
                "last_failure = excluded.last_failure RETURNING failures",
                (name, iso(now)))
        return int(rows[0][0]) if rows else 0

    async def clear_sign_in_failures(self, name: str) -> None:
        await self._execute("DELETE FROM iam_sign_in_failures WHERE name = ?", (name,))

    # --- custom roles ----------------------------------------------------------------

    async def create_role(self, role: Role, now: datetime) -> None:
        async with self._transaction():
            if await self._fetchone("SELECT 1 FROM iam_roles WHERE name = ?",
                                    (role.name,)) is not None:
                raise IdentityConflict(f"a role named {role.name!r} exists", code="role_exists",
                                       target=role.name, fix="Choose another name.")
            await self._conn.execute(
                "INSERT INTO iam_roles (name, actions, description, created_at) "
                "VALUES (?, ?, ?, ?)",
                (role.name, json.dumps(list(role.actions)), role.description, iso(now)))

    async def delete_role(self, name: str) -> None:
        """NotFound when there is no such custom role; refused while a user holds it."""
        async with self._transaction():
            if await self._fetchone("SELECT 1 FROM iam_roles WHERE name = ?",
                                    (name,)) is None:
                raise NotFound(f"no custom role {name!r}", code="role_not_found", target=name)
            holders = await self._fetchall(
                "SELECT u.name FROM iam_user_roles r JOIN iam_users u ON u.user_id = r.user_id "
                "WHERE r.role = ? ORDER BY u.name LIMIT 5", (name,))
            if holders:
                names = ", ".join(str(h[0]) for h in holders)
                raise IdentityConflict(
                    f"the role {name!r} is held by users ({names})", code="role_in_use",
                    target=name, fix="Take it from them first (dew iam set-roles).")
            await self._conn.execute("DELETE FROM iam_roles WHERE name = ?", (name,))

    async def list_roles(self) -> list[Role]:
        async with self._locked():
            rows = await self._fetchall(
                "SELECT name, actions, description FROM iam_roles ORDER BY name")
        return [Role(str(r[0]), tuple(json.loads(r[1])), False, str(r[2])) for r in rows]


def _key_limit(limit: int) -> IdentityConflict:
    return IdentityConflict(
        f"the user has {limit} access keys already, the most a user may have",
        code="access_key_limit", fix="Delete one first (dew iam delete-access-key).")


def _project(row: Any) -> Project:
    created = parse_iso(row[2])
    assert created is not None
    return Project(str(row[0]), str(row[1]), created)


def _user(row: Any) -> User:
    created = parse_iso(row["created_at"])
    assert created is not None
    return User(
        user_id=str(row["user_id"]), name=str(row["name"]), project_id=str(row["project_id"]),
        project=str(row["project"]), enabled=bool(row["enabled"]),
        roles=tuple(sorted(json.loads(row["roles"] or "[]"))),
        cidrs=tuple(json.loads(row["cidrs"])),
        created_at=created)


def _access_key(row: Any) -> AccessKey:
    created = parse_iso(row["created_at"])
    assert created is not None
    return AccessKey(
        access_key=str(row["access_key"]), user_id=str(row["user_id"]), user=str(row["user"]),
        project_id=str(row["project_id"]), project=str(row["project"]),
        status=str(row["status"]), created_at=created)
