"""CSMS persistence: secrets, their encrypted versions, stages and rotation state.

``SqliteCsmsStore`` is a store of :mod:`engine.sql_db` (component ``csms``): in the
SQLite file beside the task store, or in the PostgreSQL database every node shares.
What must hold with several processes on several machines, and how:

- Every check-then-write (a name taken, a stage map compared, a pending version
  present, a secret due for rotation or deletion) is one ``_transaction()``: one
  writer of this store at a time everywhere (SQLite's ``BEGIN IMMEDIATE``,
  PostgreSQL's advisory lock of the store), so the check still holds at the write.
- Stage changes are compare-and-swap: the caller passes the stage map it decided
  from, and the write happens only if the stored map is still that one, so two
  writers never leave a stage on two versions or lose SYSCURRENT.
- One rotation of a secret at a time: a run holds the secret's rotation lease
  (``rotation_lease()``: owner and expiry, taken by one conditional ``UPDATE``,
  renewed while the run lasts); a run in another process or node waits for it. A
  run that died leaves it to expire, or to its own task's re-run at once.
- Rows are written only for a secret that is still there (SQLite does not check
  the foreign keys; PostgreSQL would refuse the write): a secret deleted meanwhile
  is ``Conflict(code="secret_gone")`` on both.

Only ciphertext is stored: a version row holds the KMS-encrypted data key,
the nonce and the AES-GCM ciphertext, never a value. Backend errors become
engine errors in the backend (``engine.sqlite_db``, ``engine.pg_db``) and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from engine.errors import Conflict, DewError
from engine.logs import get_logger
from engine.models import iso, parse_iso, utcnow
from engine.sql_db import Migration, Row, SqlDb

SECRET_COLUMNS = (
    "secret_id, account, name, secret_type, kms_key, description, state, created_at, "
    "updated_at, deletion_date, next_version, rotation_period, next_rotation_at, "
    "last_rotated_at, failed_rotations, last_failure, rotation_step, rotation_version, "
    "rotation_task, rotation_started, rotation_config"
)
VERSION_COLUMNS = (
    "secret_id, version_id, seq, created_at, kms_key_id, wrapped_dek, nonce, ciphertext, "
    "expire_time"
)
MAX_TAGS = 20  # per secret
log = get_logger("dew.csms")

PENDING = "SYSPENDING"
CURRENT = "SYSCURRENT"
PREVIOUS = "SYSPREVIOUS"
# A rotation's lease on its secret: renewed every third of it while the run lasts,
# so it lapses only when the run's process is gone (or stalled that long).
LEASE_SECONDS = 60.0
LEASE_POLL_SECONDS = 0.2  # how often a run waiting for another's lease looks again


@dataclass(frozen=True)
class SecretRecord:
    secret_id: str
    account: str
    name: str
    secret_type: str
    kms_key: str
    description: str
    state: str
    created_at: datetime
    updated_at: datetime
    deletion_date: datetime | None
    next_version: int
    rotation_period: int | None  # seconds; None: no scheduled rotation
    next_rotation_at: datetime | None
    last_rotated_at: datetime | None
    failed_rotations: int
    last_failure: dict[str, Any] | None
    rotation_step: str | None
    rotation_version: str | None
    rotation_task: str | None
    rotation_started: datetime | None
    # The API's rotation_config (RDS-FG: {"InstanceId", "SecretSubType"}), as given; no
    # secret in it (connection details and credentials are in the value).
    rotation_config: str = ""


@dataclass(frozen=True, repr=False)
class VersionRecord:
    secret_id: str
    version_id: str
    seq: int
    created_at: datetime
    kms_key_id: str
    wrapped_dek: bytes
    nonce: bytes
    ciphertext: bytes
    expire_time: int | None = None  # epoch seconds (the API's expire_time); metadata only

    def __repr__(self) -> str:
        return f"VersionRecord({self.secret_id!r}, {self.version_id!r})"


# This store's schema, numbered from 1 and tracked as component "csms" in the
# database's schema_migrations table (engine.sql_db).
MIGRATIONS: tuple[Migration, ...] = (
    # 1: csms: secrets (rotation schedule and state, failure count), versions, stages
    """
    CREATE TABLE IF NOT EXISTS csms_secrets (
        secret_id        TEXT PRIMARY KEY,
        account          TEXT NOT NULL,
        name             TEXT NOT NULL,
        secret_type      TEXT NOT NULL,
        kms_key          TEXT NOT NULL,
        description      TEXT NOT NULL DEFAULT '',
        state            TEXT NOT NULL CHECK (state IN ('enabled','pending_deletion')),
        created_at       TEXT NOT NULL,
        updated_at       TEXT NOT NULL,
        deletion_date    TEXT,
        next_version     INTEGER NOT NULL,
        rotation_period  INTEGER,
        next_rotation_at TEXT,
        last_rotated_at  TEXT,
        failed_rotations INTEGER NOT NULL DEFAULT 0,
        last_failure     TEXT,
        rotation_step    TEXT,
        rotation_version TEXT,
        rotation_task    TEXT,
        rotation_started TEXT
    );
    CREATE UNIQUE INDEX IF NOT EXISTS csms_secrets_account_name ON csms_secrets (account, name);
    CREATE INDEX IF NOT EXISTS csms_secrets_rotation_due ON csms_secrets (next_rotation_at)
        WHERE next_rotation_at IS NOT NULL;
    CREATE INDEX IF NOT EXISTS csms_secrets_deletion_due ON csms_secrets (deletion_date)
        WHERE deletion_date IS NOT NULL;
    CREATE TABLE IF NOT EXISTS csms_versions (
        secret_id   TEXT NOT NULL REFERENCES csms_secrets (secret_id),
        version_id  TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        created_at  TEXT NOT NULL,
        kms_key_id  TEXT NOT NULL,
        wrapped_dek BLOB NOT NULL,
        nonce       BLOB NOT NULL,
        ciphertext  BLOB NOT NULL,
        PRIMARY KEY (secret_id, version_id)
    );
    CREATE TABLE IF NOT EXISTS csms_stages (
        secret_id  TEXT NOT NULL REFERENCES csms_secrets (secret_id),
        stage      TEXT NOT NULL,
        version_id TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (secret_id, stage)
    );
    CREATE INDEX IF NOT EXISTS csms_stages_version ON csms_stages (secret_id, version_id);
    """,
    # 2: the HTTPS API: rotation_config of a secret, expire_time of a version, tags
    """
    ALTER TABLE csms_secrets ADD COLUMN rotation_config TEXT NOT NULL DEFAULT '';
    ALTER TABLE csms_versions ADD COLUMN expire_time INTEGER;
    CREATE TABLE IF NOT EXISTS csms_tags (
        secret_id TEXT NOT NULL REFERENCES csms_secrets (secret_id),
        tag_key   TEXT NOT NULL,
        tag_value TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (secret_id, tag_key)
    );
    """,
    # 3: the rotation lease (one rotation of a secret at a time, in every process):
    # who holds it (the run's task id) and until when (ISO UTC, text order is time order)
    """
    ALTER TABLE csms_secrets ADD COLUMN rotation_owner TEXT;
    ALTER TABLE csms_secrets ADD COLUMN rotation_lease TEXT;
    """,
)


class SqliteCsmsStore(SqlDb):
    what = "the secrets store"
    conflict_code = "csms_store_conflict"
    conflict_fix = "Retry; another process changed the same secret at the same time."
    schema = "csms"
    migrations = MIGRATIONS

    # --- secrets ---------------------------------------------------------------------

    async def create_secret(
        self, secret: SecretRecord, version: VersionRecord, stages: Mapping[str, str]
    ) -> bool:
        """Insert a secret with its first version; False when the name is taken."""
        async with self._transaction():
            taken = await self._fetchone(
                "SELECT 1 FROM csms_secrets WHERE account = ? AND name = ?",
                (secret.account, secret.name))
            if taken is not None:
                return False
            await self._conn.execute(
                f"INSERT INTO csms_secrets ({SECRET_COLUMNS}) VALUES ({_marks(21)})",
                _secret_params(secret))
            await self._insert_version(version)
            await self._write_stages(secret.secret_id, {}, stages, secret.created_at)
        return True

    async def get_secret(self, account: str, name: str) -> SecretRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {SECRET_COLUMNS} FROM csms_secrets WHERE account = ? AND name = ?",
                (account, name))
        return None if row is None else _secret(row)

    async def list_secrets(self, account: str) -> list[SecretRecord]:
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {SECRET_COLUMNS} FROM csms_secrets WHERE account = ? ORDER BY name",
                (account,))
        return [_secret(r) for r in rows]

    async def allocate_version(self, secret_id: str) -> int:
        """The next version number of a secret (a number is never handed out twice)."""
        async with self._transaction():
            row = await self._fetchone(
                "UPDATE csms_secrets SET next_version = next_version + 1 WHERE secret_id = ? "
                "RETURNING next_version - 1", (secret_id,))
        if row is None:
            raise _gone()
        return int(row[0])

    async def set_state(
        self, secret_id: str, from_state: str, to_state: str, now: datetime,
        deletion_date: datetime | None,
    ) -> SecretRecord | None:
        """Guarded state change; None when the secret is not in ``from_state``."""
        async with self._transaction():
            row = await self._fetchone(
                "UPDATE csms_secrets SET state = ?, deletion_date = ?, updated_at = ? "
                f"WHERE secret_id = ? AND state = ? RETURNING {SECRET_COLUMNS}",
                (to_state, iso(deletion_date), iso(now), secret_id, from_state))
        return None if row is None else _secret(row)

    async def set_rotation(
        self, secret_id: str, period: int | None, next_at: datetime | None, now: datetime
    ) -> SecretRecord | None:
        async with self._transaction():
            row = await self._fetchone(
                "UPDATE csms_secrets SET rotation_period = ?, next_rotation_at = ?, "
                f"updated_at = ? WHERE secret_id = ? RETURNING {SECRET_COLUMNS}",
                (period, iso(next_at), iso(now), secret_id))
        return None if row is None else _secret(row)

    async def due_rotations(self, before: datetime, limit: int = 1000) -> list[SecretRecord]:
        """Enabled secrets whose next rotation is at or before ``before``, earliest first."""
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {SECRET_COLUMNS} FROM csms_secrets WHERE next_rotation_at IS NOT NULL "
                "AND next_rotation_at <= ? AND state = 'enabled' "
                "ORDER BY next_rotation_at LIMIT ?", (iso(before), limit))
        return [_secret(r) for r in rows]

    async def due_deletions(self, now: datetime) -> list[SecretRecord]:
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {SECRET_COLUMNS} FROM csms_secrets WHERE state = 'pending_deletion' "
                "AND deletion_date <= ? ORDER BY deletion_date", (iso(now),))
        return [_secret(r) for r in rows]

    async def delete_secret(self, secret_id: str, due_by: datetime) -> bool:
        """Remove a secret pending deletion whose date has come, with every version."""
        async with self._transaction():
            row = await self._fetchone(
                "SELECT 1 FROM csms_secrets WHERE secret_id = ? AND state = 'pending_deletion' "
                "AND deletion_date <= ?", (secret_id, iso(due_by)))
            if row is None:
                return False
            await self._remove(secret_id)
        return True

    async def delete_secret_now(self, secret_id: str) -> bool:
        """Remove a secret at once (the API's DeleteSecret), with its versions and tags."""
        async with self._transaction():
            row = await self._fetchone("SELECT 1 FROM csms_secrets WHERE secret_id = ?",
                                       (secret_id,))
            if row is None:
                return False
            await self._remove(secret_id)
        return True

    async def _remove(self, secret_id: str) -> None:
        for table in ("csms_tags", "csms_stages", "csms_versions", "csms_secrets"):
            await self._conn.execute(f"DELETE FROM {table} WHERE secret_id = ?", (secret_id,))

    async def get_secret_by_id(self, account: str, secret_id: str) -> SecretRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {SECRET_COLUMNS} FROM csms_secrets WHERE account = ? AND secret_id = ?",
                (account, secret_id))
        return None if row is None else _secret(row)

    async def update_secret(
        self, secret_id: str, now: datetime, *, description: str | None = None,
        kms_key: str | None = None,
    ) -> SecretRecord | None:
        """Change the description and/or the CMK of later versions."""
        async with self._transaction():
            row = await self._fetchone(
                "UPDATE csms_secrets SET description = COALESCE(?, description), "
                "kms_key = COALESCE(?, kms_key), updated_at = ? "
                f"WHERE secret_id = ? RETURNING {SECRET_COLUMNS}",
                (description, kms_key, iso(now), secret_id))
        return None if row is None else _secret(row)

    # --- tags --------------------------------------------------------------------------

    async def tags(self, secret_id: str) -> dict[str, str]:
        async with self._locked():
            rows = await self._fetchall(
                "SELECT tag_key, tag_value FROM csms_tags WHERE secret_id = ? ORDER BY tag_key",
                (secret_id,))
        return {str(r[0]): str(r[1]) for r in rows}

    async def account_tags(self, account: str) -> dict[str, dict[str, str]]:
        """Every tag of the account's secrets: secret id -> {key: value}."""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT t.secret_id, t.tag_key, t.tag_value FROM csms_tags t JOIN csms_secrets s "
                "ON s.secret_id = t.secret_id WHERE s.account = ? ORDER BY t.tag_key",
                (account,))
        out: dict[str, dict[str, str]] = {}
        for r in rows:
            out.setdefault(str(r[0]), {})[str(r[1])] = str(r[2])
        return out

    async def change_tags(
        self, secret_id: str, put: Mapping[str, str], remove: list[str], now: datetime,
        max_tags: int = MAX_TAGS,
    ) -> dict[str, str] | None:
        """Set ``put`` (a key's value is replaced) and delete ``remove``, in one
        transaction; None (nothing written) when the secret would pass ``max_tags``."""
        async with self._transaction():
            await self._check_exists(secret_id)
            rows = await self._fetchall(
                "SELECT tag_key, tag_value FROM csms_tags WHERE secret_id = ?", (secret_id,))
            tags = {str(r[0]): str(r[1]) for r in rows}
            for key in remove:
                tags.pop(key, None)
            tags.update(put)
            if len(tags) > max_tags:
                return None
            for key in remove:
                await self._conn.execute(
                    "DELETE FROM csms_tags WHERE secret_id = ? AND tag_key = ?", (secret_id, key))
            for key, value in put.items():
                await self._conn.execute(
                    "INSERT INTO csms_tags (secret_id, tag_key, tag_value) VALUES (?, ?, ?) "
                    "ON CONFLICT (secret_id, tag_key) DO UPDATE SET tag_value = excluded.tag_value",
                    (secret_id, key, value))
            await self._touch(secret_id, now)
        return dict(sorted(tags.items()))

    # --- versions and stages ---------------------------------------------------------

    async def stages(self, secret_id: str) -> dict[str, str]:
        async with self._locked():
            return await self._stages(secret_id)

    async def versions(self, secret_id: str) -> list[VersionRecord]:
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {VERSION_COLUMNS} FROM csms_versions WHERE secret_id = ? "
                "ORDER BY seq", (secret_id,))
        return [_version(r) for r in rows]

    async def get_version(self, secret_id: str, version_id: str) -> VersionRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {VERSION_COLUMNS} FROM csms_versions WHERE secret_id = ? "
                "AND version_id = ?", (secret_id, version_id))
        return None if row is None else _version(row)

    async def add_version(
        self, version: VersionRecord, expected: Mapping[str, str], stages: Mapping[str, str],
        now: datetime, keep: int,
    ) -> bool:
        """Insert a version and move stages, if the stages are still ``expected``.

        Versions past ``keep`` that carry no stage are pruned, oldest first.
        """
        async with self._transaction():
            if await self._stages(version.secret_id) != dict(expected):
                return False
            await self._insert_version(version)
            await self._write_stages(version.secret_id, expected, stages, now)
            await self._conn.execute(
                "DELETE FROM csms_versions WHERE secret_id = ? AND version_id IN ("
                " SELECT version_id FROM csms_versions v WHERE secret_id = ? AND NOT EXISTS"
                " (SELECT 1 FROM csms_stages s WHERE s.secret_id = v.secret_id"
                "  AND s.version_id = v.version_id)"
                " ORDER BY seq LIMIT (SELECT CASE WHEN COUNT(*) > ? THEN COUNT(*) - ? ELSE 0"
                "  END FROM csms_versions WHERE secret_id = ?))",
                (version.secret_id, version.secret_id, keep, keep, version.secret_id))
            await self._touch(version.secret_id, now)
        return True

    async def replace_stages(
        self, secret_id: str, expected: Mapping[str, str], stages: Mapping[str, str],
        now: datetime,
    ) -> bool:
        """Compare-and-swap of the whole stage map; False if it changed meanwhile."""
        async with self._transaction():
            if await self._stages(secret_id) != dict(expected):
                return False
            await self._write_stages(secret_id, expected, stages, now)
            await self._touch(secret_id, now)
        return True

    async def stage_times(self, secret_id: str) -> dict[str, datetime]:
        """When each stage was last put on its version."""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT stage, updated_at FROM csms_stages WHERE secret_id = ?", (secret_id,))
        return {str(r[0]): _ts(str(r[1])) for r in rows}

    async def set_version_expiry(
        self, secret_id: str, version_id: str, expire_time: int | None, now: datetime
    ) -> VersionRecord | None:
        async with self._transaction():
            row = await self._fetchone(
                "UPDATE csms_versions SET expire_time = ? WHERE secret_id = ? AND version_id = ? "
                f"RETURNING {VERSION_COLUMNS}", (expire_time, secret_id, version_id))
            if row is not None:
                await self._touch(secret_id, now)
        return None if row is None else _version(row)

    # --- rotation --------------------------------------------------------------------

    async def start_pending(
        self, version: VersionRecord, task_id: str, now: datetime,
        due_at: datetime | None = None,
    ) -> str | None:
        """Add ``version`` as SYSPENDING unless a pending version exists; record step
        ``create``. Returns the pending version id (the existing one, if any).

        With ``due_at`` (a scheduled run) this happens only if the secret's next
        rotation is still ``due_at``; None otherwise: another run (in any process)
        rotated it, or the schedule changed, since the caller looked."""
        async with self._transaction():
            row = await self._fetchone(
                "SELECT next_rotation_at FROM csms_secrets WHERE secret_id = ?",
                (version.secret_id,))
            if row is None:
                raise _gone()
            if due_at is not None and row[0] != iso(due_at):
                return None
            stages = await self._stages(version.secret_id)
            pending = stages.get(PENDING)
            if pending is None:
                await self._insert_version(version)
                await self._write_stages(version.secret_id, stages,
                                         {**stages, PENDING: version.version_id}, now)
                pending = version.version_id
            await self._step(version.secret_id, "create", pending, task_id, now)
        return pending

    async def record_step(
        self, secret_id: str, step: str, pending: str | None, task_id: str, now: datetime
    ) -> None:
        async with self._transaction():
            await self._step(secret_id, step, pending, task_id, now)

    async def finish_rotation(
        self, secret_id: str, pending: str, now: datetime, next_at: datetime | None
    ) -> bool:
        """SYSCURRENT to the pending version, the old current to SYSPREVIOUS, SYSPENDING
        dropped, rotation state cleared: one transaction. False if ``pending`` is no
        longer the pending version (another run finished it)."""
        async with self._transaction():
            stages = await self._stages(secret_id)
            if stages.get(PENDING) != pending:
                return False
            new = {s: v for s, v in stages.items() if s != PENDING}
            old = new.get(CURRENT)
            new[CURRENT] = pending
            if old is not None and old != pending:
                new[PREVIOUS] = old
            await self._write_stages(secret_id, stages, new, now)
            await self._conn.execute(
                "UPDATE csms_secrets SET rotation_step = NULL, rotation_version = NULL, "
                "rotation_task = NULL, rotation_started = NULL, last_rotated_at = ?, "
                "next_rotation_at = ?, updated_at = ? WHERE secret_id = ?",
                (iso(now), iso(next_at), iso(now), secret_id))
        return True

    async def record_failure(
        self, secret_id: str, failure: Mapping[str, Any], step: str | None,
        pending: str | None, now: datetime, next_at: datetime | None,
    ) -> None:
        """One more failed rotation, the last failure, and where a re-run resumes."""
        async with self._transaction():
            await self._conn.execute(
                "UPDATE csms_secrets SET failed_rotations = failed_rotations + 1, "
                "last_failure = ?, rotation_step = ?, rotation_version = ?, "
                "next_rotation_at = CASE WHEN rotation_period IS NULL THEN NULL ELSE ? END, "
                "updated_at = ? WHERE secret_id = ?",
                (json.dumps(dict(failure), separators=(",", ":")), step, pending, iso(next_at),
                 iso(now), secret_id))

    @contextlib.asynccontextmanager
    async def rotation_lease(self, secret_id: str, owner: str) -> AsyncIterator[None]:
        """Hold the secret's rotation lease for the block: one rotation of a secret at a
        time in every process and node. Waits while another run holds it (until that
        run ends, or its lease lapses); ``owner`` (the run's task id) takes it over at
        once from an earlier run of the same task (that run's worker died). Raises
        Conflict(secret_gone) if the secret is deleted meanwhile."""
        while not await self.claim_rotation(secret_id, owner, LEASE_SECONDS):
            await asyncio.sleep(LEASE_POLL_SECONDS)
        renewal = asyncio.create_task(self._renew_lease(secret_id, owner))
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            try:
                # Shielded: a cancelled run still frees the secret at once.
                await asyncio.shield(self.release_rotation(secret_id, owner))
            except DewError as exc:
                # Not the run's outcome (a retry would rotate again): the lease lapses.
                log.warning("rotation lease not released", secret_id=secret_id,
                            code=exc.code, error=exc.message)

    async def claim_rotation(self, secret_id: str, owner: str, seconds: float) -> bool:
        """Take or renew the lease for ``seconds`` from now: one statement, so two
        claims (any processes, any nodes) never both succeed. False: another holds it."""
        now = utcnow()  # the wall clock (every node's, kept by NTP), not a service's
        async with self._locked():
            row = await self._fetchone(
                "UPDATE csms_secrets SET rotation_owner = ?, rotation_lease = ? "
                "WHERE secret_id = ? AND (rotation_owner IS NULL OR rotation_owner = ? "
                "OR rotation_lease < ?) RETURNING 1",
                (owner, iso(now + timedelta(seconds=seconds)), secret_id, owner, iso(now)))
            if row is not None:
                return True
            await self._check_exists(secret_id)
        return False

    async def release_rotation(self, secret_id: str, owner: str) -> None:
        await self._execute(
            "UPDATE csms_secrets SET rotation_owner = NULL, rotation_lease = NULL "
            "WHERE secret_id = ? AND rotation_owner = ?", (secret_id, owner))

    async def _renew_lease(self, secret_id: str, owner: str) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            try:
                if not await self.claim_rotation(secret_id, owner, LEASE_SECONDS):
                    log.warning("rotation lease lost: this run was stalled past it",
                                secret_id=secret_id, task_id=owner)
            except DewError as exc:  # the store is away: the next renewal tries again
                log.warning("rotation lease not renewed", secret_id=secret_id,
                            code=exc.code, error=exc.message)

    # --- plumbing --------------------------------------------------------------------

    async def _check_exists(self, secret_id: str) -> None:
        if await self._fetchone("SELECT 1 FROM csms_secrets WHERE secret_id = ?",
                                (secret_id,)) is None:
            raise _gone()

    async def _step(
        self, secret_id: str, step: str, pending: str | None, task_id: str, now: datetime
    ) -> None:
        await self._conn.execute(
            "UPDATE csms_secrets SET rotation_step = ?, rotation_version = ?, rotation_task = ?, "
            "rotation_started = COALESCE(rotation_started, ?), updated_at = ? "
            "WHERE secret_id = ?", (step, pending, task_id, iso(now), iso(now), secret_id))

    async def _touch(self, secret_id: str, now: datetime) -> None:
        await self._conn.execute("UPDATE csms_secrets SET updated_at = ? WHERE secret_id = ?",
                                 (iso(now), secret_id))

    async def _stages(self, secret_id: str) -> dict[str, str]:
        rows = await self._fetchall(
            "SELECT stage, version_id FROM csms_stages WHERE secret_id = ?", (secret_id,))
        return {str(r[0]): str(r[1]) for r in rows}

    async def _write_stages(
        self, secret_id: str, old: Mapping[str, str], new: Mapping[str, str], now: datetime
    ) -> None:
        for stage in set(old) - set(new):
            await self._conn.execute(
                "DELETE FROM csms_stages WHERE secret_id = ? AND stage = ?", (secret_id, stage))
        for stage, version in new.items():
            if old.get(stage) != version:
                await self._conn.execute(
                    "INSERT INTO csms_stages (secret_id, stage, version_id, updated_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (secret_id, stage) DO UPDATE SET "
                    "version_id = excluded.version_id, updated_at = excluded.updated_at",
                    (secret_id, stage, version, iso(now)))

    async def _insert_version(self, v: VersionRecord) -> None:
        await self._conn.execute(
            f"INSERT INTO csms_versions ({VERSION_COLUMNS}) VALUES ({_marks(9)})",
            (v.secret_id, v.version_id, v.seq, iso(v.created_at), v.kms_key_id, v.wrapped_dek,
             v.nonce, v.ciphertext, v.expire_time))


def _gone() -> Conflict:
    return Conflict("the secret was deleted meanwhile", code="secret_gone")


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _secret_params(s: SecretRecord) -> tuple[Any, ...]:
    return (s.secret_id, s.account, s.name, s.secret_type, s.kms_key, s.description, s.state,
            iso(s.created_at), iso(s.updated_at), iso(s.deletion_date), s.next_version,
            s.rotation_period, iso(s.next_rotation_at), iso(s.last_rotated_at),
            s.failed_rotations,
            None if s.last_failure is None else json.dumps(s.last_failure),
            s.rotation_step, s.rotation_version, s.rotation_task, iso(s.rotation_started),
            s.rotation_config)


def _ts(text: str) -> datetime:
    ts = parse_iso(text)
    assert ts is not None
    return ts


def _secret(row: Row) -> SecretRecord:
    period = row["rotation_period"]
    failure = row["last_failure"]
    return SecretRecord(
        secret_id=row["secret_id"], account=row["account"], name=row["name"],
        secret_type=row["secret_type"], kms_key=row["kms_key"], description=row["description"],
        state=row["state"], created_at=_ts(row["created_at"]),
        updated_at=_ts(row["updated_at"]), deletion_date=parse_iso(row["deletion_date"]),
        next_version=int(row["next_version"]),
        rotation_period=None if period is None else int(period),
        next_rotation_at=parse_iso(row["next_rotation_at"]),
        last_rotated_at=parse_iso(row["last_rotated_at"]),
        failed_rotations=int(row["failed_rotations"]),
        last_failure=None if failure is None else json.loads(failure),
        rotation_step=row["rotation_step"], rotation_version=row["rotation_version"],
        rotation_task=row["rotation_task"], rotation_started=parse_iso(row["rotation_started"]),
        rotation_config=row["rotation_config"] or "",
    )


def _version(row: Row) -> VersionRecord:
    return VersionRecord(
        secret_id=row["secret_id"], version_id=row["version_id"], seq=int(row["seq"]),
        created_at=_ts(row["created_at"]), kms_key_id=row["kms_key_id"],
        wrapped_dek=bytes(row["wrapped_dek"]), nonce=bytes(row["nonce"]),
        ciphertext=bytes(row["ciphertext"]),
        expire_time=None if row["expire_time"] is None else int(row["expire_time"]),
    )
