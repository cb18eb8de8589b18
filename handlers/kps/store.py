"""KPS persistence: SSH key pairs, servers, and which key pair is bound where.

``SqliteKpsStore`` is a store of :mod:`engine.sql_db` (component ``kps`` of the
database's ``schema_migrations``; opening the store runs the scripts it lacks): in
the SQLite file beside the task store, or in the PostgreSQL database every node
shares. What must hold with several processes on several machines, and how:

- Every check-then-write (a name taken, the account's quota, a key pair or server
  still bound, a binding's key pair and server still there) is one
  ``_transaction()``: one writer of this store at a time everywhere (SQLite's
  ``BEGIN IMMEDIATE``, PostgreSQL's advisory lock of the store), so the check still
  holds at the write. The unique indexes on names back the name checks.
- The rest are single statements that no check depends on the absence of: pinning
  a host key (``WHERE host_key IS NULL``: the first pin wins), a job's progress row
  (``ON CONFLICT DO UPDATE``), removing bindings, a description or an envelope.

A managed private key is stored only as the envelope the service hands in (never in
clear). Backend errors become engine errors in the backend (``engine.sqlite_db``,
``engine.pg_db``) and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from engine.models import iso, parse_iso
from engine.sql_db import Migration, Row, SqlDb

KEYPAIR_COLUMNS = (
    "keypair_id, account, owner, scope, name, algorithm, key_type, public_key, fingerprint, "
    "managed, private_key, created_at, updated_at, description"
)
SERVER_COLUMNS = (
    "server_id, account, name, host, port, login_user, host_key, trust_first_use, sshd_config, "
    "reload_command, authorized_keys, created_at, sudo"
)
CreateOutcome = Literal["created", "name_taken", "quota_exceeded"]
DeleteOutcome = Literal["deleted", "bound", "missing"]


@dataclass(frozen=True, repr=False)
class KeyPairRecord:
    keypair_id: str
    account: str
    owner: str
    scope: str  # user | account
    name: str
    algorithm: str
    key_type: str  # ssh | x509
    public_key: str  # the OpenSSH line
    fingerprint: str
    managed: bool
    private_key: str | None  # the envelope (JSON), never the key in clear
    created_at: datetime
    updated_at: datetime
    description: str = ""

    def __repr__(self) -> str:
        return (f"KeyPairRecord({self.name!r}, {self.algorithm}, {self.scope}, "
                f"managed={self.managed})")


@dataclass(frozen=True)
class ServerRecord:
    server_id: str
    account: str
    name: str
    host: str
    port: int
    login_user: str
    host_key: str | None  # pinned OpenSSH public key line
    trust_first_use: bool
    sshd_config: str | None
    reload_command: str | None
    authorized_keys: str | None
    created_at: datetime
    sudo: bool = False  # privileged steps run through ``sudo -n`` (a login user not root)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "host": self.host, "port": self.port, "user": self.login_user,
            "host_key": self.host_key, "trust_first_use": self.trust_first_use,
            "host_key_pinned": self.host_key is not None, "sshd_config": self.sshd_config,
            "reload_command": self.reload_command, "authorized_keys": self.authorized_keys,
            "sudo": self.sudo, "account": self.account, "created_at": iso(self.created_at),
        }


# This store's schema, numbered from 1 and tracked as component "kps" in the
# database's schema_migrations table (engine.sql_db).
MIGRATIONS: tuple[Migration, ...] = (
    # 1: kps: SSH key pairs, servers and which key pair is bound to which server
    # (IF NOT EXISTS: safe whatever position the CSMS migration takes beside it)
    """
    CREATE TABLE IF NOT EXISTS kps_keypairs (
        keypair_id   TEXT PRIMARY KEY,
        account      TEXT NOT NULL,
        owner        TEXT NOT NULL,
        scope        TEXT NOT NULL CHECK (scope IN ('user','account')),
        name         TEXT NOT NULL,
        algorithm    TEXT NOT NULL,
        key_type     TEXT NOT NULL CHECK (key_type IN ('ssh','x509')),
        public_key   TEXT NOT NULL,
        fingerprint  TEXT NOT NULL,
        managed      INTEGER NOT NULL CHECK (managed IN (0, 1)),
        private_key  TEXT,
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL
    );
    CREATE UNIQUE INDEX IF NOT EXISTS kps_keypairs_user_name
        ON kps_keypairs (account, owner, name) WHERE scope = 'user';
    CREATE UNIQUE INDEX IF NOT EXISTS kps_keypairs_account_name
        ON kps_keypairs (account, name) WHERE scope = 'account';
    CREATE TABLE IF NOT EXISTS kps_servers (
        server_id       TEXT PRIMARY KEY,
        account         TEXT NOT NULL,
        name            TEXT NOT NULL,
        host            TEXT NOT NULL,
        port            INTEGER NOT NULL,
        login_user      TEXT NOT NULL,
        host_key        TEXT,
        trust_first_use INTEGER NOT NULL CHECK (trust_first_use IN (0, 1)),
        sshd_config     TEXT,
        reload_command  TEXT,
        authorized_keys TEXT,
        created_at      TEXT NOT NULL,
        UNIQUE (account, name)
    );
    CREATE TABLE IF NOT EXISTS kps_bindings (
        keypair_id  TEXT NOT NULL REFERENCES kps_keypairs (keypair_id),
        server_id   TEXT NOT NULL REFERENCES kps_servers (server_id),
        bound_at    TEXT NOT NULL,
        task_id     TEXT,
        PRIMARY KEY (keypair_id, server_id)
    );
    CREATE INDEX IF NOT EXISTS kps_bindings_server ON kps_bindings (server_id);
    CREATE TABLE IF NOT EXISTS kps_task_servers (
        task_id     TEXT NOT NULL,
        server      TEXT NOT NULL,
        status      TEXT NOT NULL,
        detail      TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        PRIMARY KEY (task_id, server)
    );
    """,
    # 2: kps_servers.sudo: the login user is not root; privileged steps run through
    # `sudo -n`. SQLite has no ADD COLUMN IF NOT EXISTS: the runner applies a script
    # once per file, in the transaction that records the version, so it never meets
    # the column twice (migration 1 never creates it).
    """
    ALTER TABLE kps_servers ADD COLUMN sudo INTEGER NOT NULL DEFAULT 0 CHECK (sudo IN (0, 1))
    """,
    # 3: kps_keypairs.description (the API's UpdateKeypairDescription).
    """
    ALTER TABLE kps_keypairs ADD COLUMN description TEXT NOT NULL DEFAULT ''
    """,
)


class SqliteKpsStore(SqlDb):
    what = "the KPS registry"
    conflict_code = "kps_registry_conflict"
    conflict_fix = "Retry; another process changed the same record."
    schema = "kps"
    migrations = MIGRATIONS

    # --- key pairs -------------------------------------------------------------------

    async def create_keypair(self, pair: KeyPairRecord, quota: int) -> CreateOutcome:
        async with self._transaction():
            if await self._visible_name_taken(pair.account, pair.owner, pair.name, pair.scope):
                return "name_taken"
            if pair.scope == "account" and await self._account_count(pair.account) >= quota:
                return "quota_exceeded"
            await self._conn.execute(
                f"INSERT INTO kps_keypairs ({KEYPAIR_COLUMNS}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pair.keypair_id, pair.account, pair.owner, pair.scope, pair.name,
                 pair.algorithm, pair.key_type, pair.public_key, pair.fingerprint,
                 int(pair.managed), pair.private_key, iso(pair.created_at),
                 iso(pair.updated_at), pair.description),
            )
        return "created"

    async def _account_count(self, account: str) -> int:
        row = await self._fetchone(
            "SELECT COUNT(*) FROM kps_keypairs WHERE account = ? AND scope = 'account'",
            (account,))
        return 0 if row is None else int(row[0])

    async def _visible_name_taken(self, account: str, owner: str, name: str, scope: str
                                  ) -> bool:
        # A user sees their own pairs and the account's: a name must be unambiguous
        # for everyone who can see it.
        sql = ("SELECT 1 FROM kps_keypairs WHERE account = ? AND name = ? AND "
               "(scope = 'account' OR owner = ?)")
        params: tuple[Any, ...] = (account, name, owner)
        if scope == "account":
            sql = "SELECT 1 FROM kps_keypairs WHERE account = ? AND name = ?"
            params = (account, name)
        return await self._fetchone(sql, params) is not None

    async def find_keypair(self, account: str, user: str, name: str) -> KeyPairRecord | None:
        """The pair named ``name`` that ``user`` sees: their own, else the account's."""
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {KEYPAIR_COLUMNS} FROM kps_keypairs WHERE account = ? AND name = ? "
                "AND (scope = 'account' OR owner = ?) ORDER BY scope = 'account' LIMIT 1",
                (account, name, user),
            )
        return None if row is None else _keypair(row)

    async def get_keypair(self, keypair_id: str) -> KeyPairRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {KEYPAIR_COLUMNS} FROM kps_keypairs WHERE keypair_id = ?", (keypair_id,))
        return None if row is None else _keypair(row)

    async def list_keypairs(self, account: str, user: str) -> list[KeyPairRecord]:
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {KEYPAIR_COLUMNS} FROM kps_keypairs WHERE account = ? AND "
                "(scope = 'account' OR owner = ?) ORDER BY name, scope", (account, user))
        return [_keypair(r) for r in rows]

    async def delete_keypair(self, keypair_id: str) -> DeleteOutcome:
        async with self._transaction():
            if await self._fetchone("SELECT 1 FROM kps_bindings WHERE keypair_id = ?",
                                    (keypair_id,)) is not None:
                return "bound"
            cursor = await self._conn.execute(
                "DELETE FROM kps_keypairs WHERE keypair_id = ?", (keypair_id,))
            return "deleted" if cursor.rowcount else "missing"

    async def upgrade_keypair(self, pair: KeyPairRecord, quota: int, now: datetime
                              ) -> CreateOutcome:
        """user -> account scope; refused on a name clash or over the quota."""
        async with self._transaction():
            clash = await self._fetchone(
                "SELECT 1 FROM kps_keypairs WHERE account = ? AND name = ? AND keypair_id <> ?",
                (pair.account, pair.name, pair.keypair_id))
            if clash is not None:
                return "name_taken"
            if await self._account_count(pair.account) >= quota:
                return "quota_exceeded"
            await self._conn.execute(
                "UPDATE kps_keypairs SET scope = 'account', updated_at = ? WHERE keypair_id = ?",
                (iso(now), pair.keypair_id))
        return "created"

    async def set_description(self, keypair_id: str, description: str, now: datetime
                              ) -> bool:
        async with self._locked():
            cursor = await self._conn.execute(
                "UPDATE kps_keypairs SET description = ?, updated_at = ? WHERE keypair_id = ?",
                (description, iso(now), keypair_id))
            return bool(cursor.rowcount)

    async def set_private_key(self, keypair_id: str, envelope: str | None, now: datetime
                              ) -> bool:
        """Keep (an envelope) or forget (None) the managed private key of a pair."""
        async with self._locked():
            cursor = await self._conn.execute(
                "UPDATE kps_keypairs SET managed = ?, private_key = ?, updated_at = ? "
                "WHERE keypair_id = ?",
                (int(envelope is not None), envelope, iso(now), keypair_id))
            return bool(cursor.rowcount)

    async def count_account_keypairs(self, account: str) -> int:
        async with self._locked():
            return await self._account_count(account)

    # --- servers ---------------------------------------------------------------------

    async def add_server(self, server: ServerRecord) -> bool:
        """False when the name is taken."""
        async with self._transaction():
            if await self._fetchone("SELECT 1 FROM kps_servers WHERE account = ? AND name = ?",
                                    (server.account, server.name)) is not None:
                return False
            await self._conn.execute(
                f"INSERT INTO kps_servers ({SERVER_COLUMNS}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (server.server_id, server.account, server.name, server.host, server.port,
                 server.login_user, server.host_key, int(server.trust_first_use),
                 server.sshd_config, server.reload_command, server.authorized_keys,
                 iso(server.created_at), int(server.sudo)),
            )
        return True

    async def find_server(self, account: str, name: str) -> ServerRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {SERVER_COLUMNS} FROM kps_servers WHERE account = ? AND name = ?",
                (account, name))
        return None if row is None else _server(row)

    async def get_server(self, server_id: str) -> ServerRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {SERVER_COLUMNS} FROM kps_servers WHERE server_id = ?", (server_id,))
        return None if row is None else _server(row)

    async def list_servers(self, account: str) -> list[ServerRecord]:
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {SERVER_COLUMNS} FROM kps_servers WHERE account = ? ORDER BY name",
                (account,))
        return [_server(r) for r in rows]

    async def remove_server(self, server_id: str) -> DeleteOutcome:
        async with self._transaction():
            if await self._fetchone("SELECT 1 FROM kps_bindings WHERE server_id = ?",
                                    (server_id,)) is not None:
                return "bound"
            cursor = await self._conn.execute(
                "DELETE FROM kps_servers WHERE server_id = ?", (server_id,))
            return "deleted" if cursor.rowcount else "missing"

    async def pin_host_key(self, server_id: str, host_key: str) -> str | None:
        """Pin ``host_key`` unless a key is pinned already; return the pinned key."""
        async with self._transaction():
            await self._conn.execute(
                "UPDATE kps_servers SET host_key = ? WHERE server_id = ? AND host_key IS NULL",
                (host_key, server_id))
            row = await self._fetchone("SELECT host_key FROM kps_servers WHERE server_id = ?",
                                       (server_id,))
        return None if row is None else row[0]

    # --- bindings --------------------------------------------------------------------

    async def bind(self, keypair_id: str, server_id: str, now: datetime, task_id: str | None,
                   replaces: str | None = None) -> bool:
        """Record the binding (and drop the one it replaces) in one transaction; False
        (nothing written) when the key pair or the server was deleted meanwhile: SQLite
        does not check the foreign keys, PostgreSQL would refuse the row."""
        async with self._transaction():
            if await self._fetchone(
                    "SELECT 1 WHERE EXISTS (SELECT 1 FROM kps_keypairs WHERE keypair_id = ?) "
                    "AND EXISTS (SELECT 1 FROM kps_servers WHERE server_id = ?)",
                    (keypair_id, server_id)) is None:
                return False
            if replaces is not None and replaces != keypair_id:
                await self._conn.execute(
                    "DELETE FROM kps_bindings WHERE keypair_id = ? AND server_id = ?",
                    (replaces, server_id))
            await self._conn.execute(
                "INSERT INTO kps_bindings (keypair_id, server_id, bound_at, task_id) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (keypair_id, server_id) DO NOTHING",
                (keypair_id, server_id, iso(now), task_id))
        return True

    async def unbind(self, keypair_id: str, server_id: str) -> None:
        async with self._locked():
            await self._conn.execute(
                "DELETE FROM kps_bindings WHERE keypair_id = ? AND server_id = ?",
                (keypair_id, server_id))

    async def unbind_all_on(self, server_id: str, keep: str) -> None:
        """After a reset only ``keep`` is bound on the server (the old keys are gone)."""
        async with self._locked():
            await self._conn.execute(
                "DELETE FROM kps_bindings WHERE server_id = ? AND keypair_id <> ?",
                (server_id, keep))

    async def servers_of(self, keypair_id: str) -> list[str]:
        async with self._locked():
            rows = await self._fetchall(
                "SELECT s.name FROM kps_bindings b JOIN kps_servers s USING (server_id) "
                "WHERE b.keypair_id = ? ORDER BY s.name", (keypair_id,))
        return [r[0] for r in rows]

    async def bound_keys(self, server_id: str) -> list[tuple[str, str]]:
        """(keypair id, public key) of every binding on the server, whoever owns it."""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT k.keypair_id, k.public_key FROM kps_bindings b "
                "JOIN kps_keypairs k USING (keypair_id) WHERE b.server_id = ? "
                "ORDER BY k.keypair_id", (server_id,))
        return [(r[0], r[1]) for r in rows]

    async def keypairs_on(self, server_id: str) -> list[str]:
        async with self._locked():
            rows = await self._fetchall(
                "SELECT k.name FROM kps_bindings b JOIN kps_keypairs k USING (keypair_id) "
                "WHERE b.server_id = ? ORDER BY k.name", (server_id,))
        return [r[0] for r in rows]

    # --- per-server progress of a job (what the CLI's progress bar reads) -----------

    async def set_progress(self, task_id: str, server: str, status: str, detail: str,
                           now: datetime) -> None:
        async with self._locked():
            await self._conn.execute(
                "INSERT INTO kps_task_servers (task_id, server, status, detail, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_id, server) DO UPDATE SET "
                "status = excluded.status, detail = excluded.detail, "
                "updated_at = excluded.updated_at", (task_id, server, status, detail, iso(now)))

    async def progress(self, task_id: str) -> dict[str, str]:
        """Server name -> status (running, succeeded, failed) for one job."""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT server, status FROM kps_task_servers WHERE task_id = ?", (task_id,))
        return {r[0]: r[1] for r in rows}



def _ts(text: str) -> datetime:
    ts = parse_iso(text)
    assert ts is not None
    return ts


def _keypair(row: Row) -> KeyPairRecord:
    return KeyPairRecord(
        keypair_id=row["keypair_id"], account=row["account"], owner=row["owner"],
        scope=row["scope"], name=row["name"], algorithm=row["algorithm"],
        key_type=row["key_type"], public_key=row["public_key"], fingerprint=row["fingerprint"],
        managed=bool(row["managed"]), private_key=row["private_key"],
        created_at=_ts(row["created_at"]), updated_at=_ts(row["updated_at"]),
        description=row["description"] or "",
    )


def _server(row: Row) -> ServerRecord:
    return ServerRecord(
        server_id=row["server_id"], account=row["account"], name=row["name"], host=row["host"],
        port=int(row["port"]), login_user=row["login_user"], host_key=row["host_key"],
        trust_first_use=bool(row["trust_first_use"]), sshd_config=row["sshd_config"],
        reload_command=row["reload_command"], authorized_keys=row["authorized_keys"],
        created_at=_ts(row["created_at"]), sudo=bool(row["sudo"]),
    )
