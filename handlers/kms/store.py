"""The KMS key registry and the hash-chained audit log, in the stores' database.

``KmsStore`` is the interface the KMS service uses; ``SqliteKmsStore`` implements it
as a store of :mod:`engine.sql_db` (component ``kms``, schema ``MIGRATIONS`` below,
applied on open): in the SQLite file of the state directory, or in the PostgreSQL
database every node shares (``[store] url``). The SQL is written once; where the
dialects differ (a JSON field, a substring, migration 3's fix of old rows) it is
given as :class:`~engine.sql_db.Dialects`.

What must hold with several processes on several machines, and how:

- Every check-then-write (an alias or a quota checked, a key's state guarded, tags
  or grants counted) and every audit append is one ``_transaction()``: one writer
  of this store at a time everywhere (SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's
  advisory lock of the store), so the check still holds at the write.
- The audit chain stays one chain: an append reads the head, chains its entries
  after it, moves the head and seals the batch in that one transaction; ``seq`` is
  the primary key besides, so even a writer outside the lock could only fail, never
  fork the chain or leave a gap.
- One rotation of a key at a time (``claim_rotation``: the lease taken in a
  transaction; ``renew_rotation`` fences each destructive step), one import or
  removal of a key's material at a time (``claim_lease``: one upsert whose ``WHERE``
  is re-checked on the row a concurrent writer left), and an import finishes only
  while the key is still ``pending_import`` under that lease (``finish_import``).
- ``verify_audit`` reads the chain, the head and the seals in one ``_snapshot()``.

Audit chain: entry ``seq`` holds ``prev_hash`` (the hash of entry ``seq - 1``,
64 zeros for the first) and ``hash`` = SHA-256 over its previous hash and its
own stored fields. ``audit_head`` keeps the last ``(seq, hash)``. The hashes
alone are unkeyed, so each append batch is also *sealed* (``audit_seals``: an
HMAC made in the token over the batch's last ``(seq, hash)``, through the
:class:`~handlers.kms.audit_seal.AuditKey` the KMS core hands the store) and
the newest seal a node wrote is anchored in a file of that node
(:mod:`handlers.kms.audit_seal`, which also says what an anchor proves when several
nodes append): an edited entry, recomputed hashes, or a cut tail with a rewritten
``audit_head`` all fail :meth:`SqliteKmsStore.verify_audit`.

Backend errors become engine errors in the backend (``engine.sqlite_db``,
``engine.pg_db``) and nowhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, Protocol

from engine.errors import ConfigError, DewError
from engine.logs import get_logger
from engine.models import iso, parse_iso
from engine.private import private_dir
from engine.sql_db import Dialect, Dialects, Migration, Row, SqlDb, pg_ddl
from handlers.kms.audit_seal import (
    Anchor,
    AnchorDamaged,
    AuditKey,
    anchor_path,
    read_anchor,
    seal_message,
    write_anchor,
)

log = get_logger("dew.kms")

GENESIS_HASH = "0" * 64
KEY_COLUMNS = (
    "key_id, account, alias, spec, usage, state, origin, default_key, description, created_at, "
    "updated_at, scheduled_deletion_date, deleted_at, current_version"
)
VERSION_COLUMNS = "key_id, version, token_label, created_at, destroyed_at"
ROTATION_COLUMNS = (
    "key_id, enabled, interval_days, next_rotation_at, last_rotated_at, rotations, "
    "last_request, lease_until"
)
GRANT_COLUMNS = (
    "grant_id, key_id, name, grantee_principal, grantee_principal_type, operations, "
    "issuing_principal, retiring_principal, created_at"
)
AUDIT_COLUMNS = (
    "seq, time, account, actor, operation, key_id, outcome, detail, prev_hash, hash"
)
CreateOutcome = Literal["created", "alias_taken", "quota_exceeded"]
_NO_PARAMS: tuple[Any, ...] = ()
SEAL_CHECKS_AT_ONCE = 256
VERIFY_PAGE = 5000  # audit entries read at once by verify_audit


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    account: str
    alias: str
    spec: str
    usage: str
    state: str
    origin: str
    default_key: bool
    description: str
    created_at: datetime
    updated_at: datetime
    scheduled_deletion_date: datetime | None
    deleted_at: datetime | None
    current_version: int


@dataclass(frozen=True)
class KeyVersion:
    key_id: str
    version: int
    token_label: str
    created_at: datetime
    destroyed_at: datetime | None = None


@dataclass(frozen=True)
class RotationRecord:
    """A key's rotation schedule and history (migration 5)."""

    key_id: str
    enabled: bool
    interval_days: int
    next_rotation_at: datetime | None
    last_rotated_at: datetime | None
    rotations: int
    last_request: str | None  # the task that made the last rotation (re-runs are no-ops)
    lease_until: datetime | None


@dataclass(frozen=True)
class WrappedKey:
    """A private key the token cannot hold, wrapped under the key version's token AES key."""

    wrapped: bytes
    public_key: bytes  # DER SubjectPublicKeyInfo


@dataclass(frozen=True)
class ImportToken:
    token: str  # as given to the caller; the store keeps only its SHA-256 (import_token_hash)
    key_id: str
    account: str
    algorithm: str
    wrapping_label: str
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class ImportRecord:
    key_id: str
    fingerprint: str
    imported_at: datetime
    material_expires_at: datetime | None


@dataclass(frozen=True)
class GrantRecord:
    """A grant (migration 4): who may use a key for which operations."""

    grant_id: str
    key_id: str
    name: str | None
    grantee_principal: str
    grantee_principal_type: str  # user | domain
    operations: tuple[str, ...]
    issuing_principal: str
    retiring_principal: str | None
    created_at: datetime


@dataclass(frozen=True)
class UsageRecord:
    """How often a key was used on one UTC day (migration 4)."""

    account: str
    key_id: str
    key_alias: str
    day: str  # YYYY-MM-DD (UTC)
    count: int


TagOutcome = Literal["changed", "too_many", "missing", "key_gone"]
GrantOutcome = Literal["created", "too_many", "key_state"]
UpdateOutcome = Literal["updated", "alias_taken", "key_state"]
UsageCounts = Mapping[tuple[str, str, str], int]  # (account, key id, day) -> uses


class AuditEvent(NamedTuple):
    """One thing to record: who did what to which key, and how it ended. A named tuple:
    every key use makes one, and a frozen dataclass's set-up cost as much as hashing
    the entry."""

    time: datetime
    account: str
    actor: str
    operation: str
    key_id: str | None
    outcome: str  # success | failure | unchanged
    detail: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class AuditEntry:
    """A stored, chained audit entry (text fields exactly as stored)."""

    seq: int
    time: str
    account: str
    actor: str
    operation: str
    key_id: str | None
    outcome: str
    detail: str
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "time": self.time, "account": self.account, "actor": self.actor,
            "operation": self.operation, "key_id": self.key_id, "outcome": self.outcome,
            "detail": json.loads(self.detail), "prev_hash": self.prev_hash, "hash": self.hash,
        }


# An entry's ``detail.secret``. PostgreSQL reads JSON text as ``json``; its ``->>``
# refuses a whole document that holds the escape of a NUL character (text cannot hold
# one), so that escape is read as U+0001 first: no entry breaks the query, and a
# secret's name has no NUL to match.
_DETAIL_SECRET = Dialects(
    sqlite="json_extract(detail, '$.secret')",
    postgresql="(CAST(replace(detail, E'\\\\u0000', E'\\\\u0001') AS json) ->> 'secret')")
# ``actor`` holds the text given (a substring, case and all).
_HAS_ACTOR = Dialects(sqlite="instr(actor, ?) > 0", postgresql="strpos(actor, ?) > 0")


@dataclass(frozen=True)
class AuditFilter:
    """What ``dew audit list`` narrows the entries to (every field optional, all ANDed):
    ``secret`` (a CSMS secret's name, ``detail.secret``), ``operation`` (exact),
    ``actor`` (a substring), ``outcome`` (exact), ``since`` / ``until`` (inclusive)."""

    secret: str | None = None
    operation: str | None = None
    actor: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def sql(self, dialect: Dialect) -> tuple[list[str], list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.secret is not None:
            clauses.append(f"{_DETAIL_SECRET.for_dialect(dialect)} = ?")
            params.append(self.secret)
        for column, value in (("operation", self.operation), ("outcome", self.outcome)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.actor is not None:
            clauses.append(_HAS_ACTOR.for_dialect(dialect))
            params.append(self.actor)
        # Times are stored as ISO 8601 UTC with microseconds: text order is time order.
        if self.since is not None:
            clauses.append("time >= ?")
            params.append(iso(self.since))
        if self.until is not None:
            clauses.append("time <= ?")
            params.append(iso(self.until))
        return clauses, params


@dataclass(frozen=True)
class AuditVerdict:
    intact: bool
    entries: int
    first_broken_seq: int | None = None
    reason: str = ""
    sealed_through: int | None = None  # the newest entry a valid seal covers
    anchored_at: int | None = None  # the entry the anchor file names
    unsealed: int = 0  # newest entries no seal covers yet (written without the HSM open)

    def to_json(self) -> dict[str, Any]:
        return {"intact": self.intact, "entries": self.entries,
                "first_broken_seq": self.first_broken_seq, "reason": self.reason,
                "sealed_through": self.sealed_through, "anchored_at": self.anchored_at,
                "unsealed": self.unsealed}


def import_token_hash(token: str) -> str:
    """What the registry keeps of an import token: its SHA-256 (hex), never the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# What json.dumps(..., ensure_ascii=False) does to a string, in C. The chain body
# below is assembled from it by hand: a JSONEncoder builds its C encoder (and
# json.dumps with options a whole JSONEncoder) per call, most of what appending one
# entry cost. tests/kms/test_kms_fast_path.py checks the bytes are json.dumps's.
_json_str: Callable[[str], str] = json.encoder.encode_basestring
_detail_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                default=str).encode
_detail_memo: dict[tuple[tuple[str, Any], ...], str] = {}
DETAIL_MEMO_MAX = 1024
_MEMO_SCALARS = frozenset({str, int, type(None)})
_tail_memo: dict[tuple[str, str, str, str | None, str, str], str] = {}
# The stored text of the last second an entry was made in, by its fields.
_second_memo: dict[tuple[int, int, int, int, int, int], str] = {}


def entry_body(
    prev_hash: str, seq: int, time: str, account: str, actor: str, operation: str,
    key_id: str | None, outcome: str, detail: str,
) -> str:
    """``json.dumps([prev_hash, seq, ...], separators=(",", ":"), ensure_ascii=False)``."""
    q = _json_str
    # Uses repeat who, what, which key and how: that JSON tail is made once and reused.
    slot = (account, actor, operation, key_id, outcome, detail)
    tail = _tail_memo.get(slot)
    if tail is None:
        kid = "null" if key_id is None else q(key_id)
        tail = f"{q(account)},{q(actor)},{q(operation)},{kid},{q(outcome)},{q(detail)}]"
        if len(_tail_memo) >= DETAIL_MEMO_MAX:
            _tail_memo.clear()
        _tail_memo[slot] = tail
    return f"[{q(prev_hash)},{int.__repr__(seq)},{q(time)},{tail}"


def entry_hash(
    prev_hash: str, seq: int, time: str, account: str, actor: str, operation: str,
    key_id: str | None, outcome: str, detail: str,
) -> str:
    """The chain's hash of one entry: SHA-256 of a JSON array of its stored fields."""
    body = entry_body(prev_hash, seq, time, account, actor, operation, key_id, outcome, detail)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def detail_text(detail: Mapping[str, Any]) -> str:
    """An entry's stored detail: sorted, compact JSON. Uses of a key repeat the same few
    details (``{"length_bits": 256}``), so their text is made once and reused."""
    items = tuple(detail.items())
    for key, value in items:
        # Only text and whole-number values: 1 == True == 1.0 would share a memo slot.
        if key.__class__ is not str or value.__class__ not in _MEMO_SCALARS:
            return _detail_json(detail)
    text = _detail_memo.get(items)
    if text is None:
        text = _detail_json(detail)
        if len(_detail_memo) >= DETAIL_MEMO_MAX:
            _detail_memo.clear()
        _detail_memo[items] = text
    return text


def audit_time(when: datetime) -> str:
    """An entry's stored time: :func:`engine.models.iso`, without its None case. Entries
    made in the same second share all but the microseconds, formatted once."""
    if when.tzinfo is not UTC:
        return when.astimezone(UTC).isoformat(timespec="microseconds")
    second = (when.second, when.minute, when.hour, when.day, when.month, when.year)
    text = _second_memo.get(second)
    if text is None:
        _second_memo.clear()
        text = _second_memo[second] = when.replace(microsecond=0, tzinfo=None).isoformat()
    return f"{text}.{when.microsecond:06d}+00:00"


class KmsStore(Protocol):
    """What the KMS service needs from persistence (:class:`SqliteKmsStore`, on either
    backend)."""

    async def close(self) -> None: ...

    def use_audit_key(self, key: AuditKey | None) -> None:
        """The token key that seals audit batches (None: append unsealed). A
        :class:`~handlers.kms.core.KmsCore` hands it over when it is made on the store."""

    async def create_key(
        self, key: KeyRecord, version: KeyVersion, event: AuditEvent, quota: int | None,
        wrapped: WrappedKey | None = None,
    ) -> CreateOutcome:
        """Insert a key and its first version (and its wrapped private key), and audit
        it, in one transaction. The alias and quota checks happen inside it."""

    async def get_wrapped(self, key_id: str, version: int) -> WrappedKey | None: ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def find_alias(self, account: str, alias: str) -> KeyRecord | None:
        """The live (not deleted) key with this alias in the account."""

    async def find_deleted_alias(self, account: str, alias: str) -> KeyRecord | None:
        """The most recently deleted key that had this alias in the account."""

    async def list_keys(
        self, account: str, state: str | None = None, *, spec: str | None = None,
        limit: int | None = None, after: tuple[str, str] | None = None,
    ) -> list[KeyRecord]:
        """Live keys by creation time, then key id; ``after`` = (created_at ISO, key id)
        of the last key of the previous page."""

    async def count_keys(
        self, account: str, state: str | None = None, spec: str | None = None
    ) -> int: ...

    async def count_custom_keys(self, account: str) -> int: ...

    async def update_key(
        self, key_id: str, from_states: Iterable[str], now: datetime, event: AuditEvent, *,
        alias: str | None = None, description: str | None = None,
    ) -> tuple[UpdateOutcome, KeyRecord | None]:
        """Change the alias and/or description of a key still in ``from_states``, and
        audit, in one transaction; nothing is written unless the outcome is ``updated``."""

    async def key_tags(self, key_id: str) -> list[tuple[str, str]]: ...

    async def account_tags(self, account: str) -> list[tuple[str, str, str]]:
        """(key id, tag key, value) of every live key of the account."""

    async def change_tags(
        self, key_id: str, put: Sequence[tuple[str, str]],
        remove: Sequence[tuple[str, str | None]], max_tags: int, event: AuditEvent,
    ) -> tuple[TagOutcome, str | None]:
        """Upsert ``put``, delete ``remove`` (each must exist; with a value, that value),
        audit: all in one transaction, or nothing (and the missing tag key)."""

    async def add_grant(
        self, grant: GrantRecord, max_grants: int, key_states: Iterable[str], event: AuditEvent
    ) -> GrantOutcome:
        """Insert the grant and audit, if the key is in ``key_states`` and has fewer than
        ``max_grants`` grants: one transaction."""

    async def get_grant(self, key_id: str, grant_id: str) -> GrantRecord | None: ...

    async def list_grants(
        self, key_id: str, limit: int | None = None, after: tuple[str, str] | None = None
    ) -> list[GrantRecord]: ...

    async def count_grants(self, key_id: str) -> int: ...

    async def max_grants_per_key(self, account: str) -> int: ...

    async def remove_grant(self, key_id: str, grant_id: str, event: AuditEvent) -> bool:
        """Delete the grant and audit it (one transaction); False: no such grant."""

    async def retirable_grants(
        self, principals: Sequence[str], limit: int | None = None,
        after: tuple[str, str] | None = None,
    ) -> list[GrantRecord]:
        """Grants of live keys whose retiring principal is one of ``principals``."""

    async def count_retirable(self, principals: Sequence[str]) -> int: ...

    async def grantee_grants(
        self, key_id: str, user_id: str | None, project_id: str | None
    ) -> list[tuple[str, GrantRecord]]:
        """(owning account, grant) of the live key's grants naming ``user_id`` (type
        user) or ``project_id`` (type domain). Always read from the database."""

    async def usage(
        self, account: str | None = None, key_id: str | None = None, since: str | None = None
    ) -> list[UsageRecord]:
        """Per-day use counts, oldest day first."""

    async def change_state(
        self, key_id: str, from_states: Iterable[str], to_state: str, now: datetime,
        event: AuditEvent, *, scheduled_deletion_date: datetime | None = None,
        deleted_at: datetime | None = None, due_by: datetime | None = None,
    ) -> KeyRecord | None:
        """Guarded transition plus its audit entry, atomically; None (and nothing
        written) when the key is not in one of ``from_states`` (or not due by ``due_by``)."""

    async def versions(self, key_id: str) -> list[KeyVersion]: ...

    async def mark_version_destroyed(self, key_id: str, version: int, now: datetime) -> bool:
        """Record that a version's token objects are gone; False if already recorded."""

    async def due_for_deletion(self, now: datetime) -> list[KeyRecord]: ...

    async def get_rotation(self, key_id: str) -> RotationRecord | None: ...

    async def set_rotation(
        self, key_id: str, enabled: bool, interval_days: int,
        next_rotation_at: datetime | None, event: AuditEvent,
    ) -> RotationRecord:
        """Create or change the schedule, and audit it, in one transaction."""

    async def claim_rotation(self, key_id: str, now: datetime, until: datetime) -> bool:
        """Take the key's rotation lease (free, or expired before ``now``)."""

    async def renew_rotation(self, key_id: str, held: datetime, until: datetime) -> bool:
        """Extend the rotation lease to ``until`` if it is still the one that ends at
        ``held`` (nobody took it over): the fence before a destructive step."""

    async def release_rotation(self, key_id: str, held: datetime | None = None) -> None:
        """Drop the lease (only the one ending at ``held``, when given)."""

    async def add_version(
        self, key_id: str, expected_version: int, version: KeyVersion, event: AuditEvent,
        request: str | None, lease: datetime | None = None,
    ) -> KeyRecord | None:
        """Make ``version`` current (if the key is still at ``expected_version`` and
        enabled, and, given ``lease``, its rotation lease is still that one), count the
        rotation, move the schedule on, release the lease and audit: one transaction.
        None (nothing written) when the guard misses."""

    async def claim_lease(
        self, key_id: str, purpose: str, now: datetime, until: datetime
    ) -> bool:
        """Take the key's ``purpose`` lease (free, or expired before ``now``) until ``until``."""

    async def renew_lease(
        self, key_id: str, purpose: str, held: datetime, until: datetime
    ) -> bool:
        """Extend the lease ending at ``held`` to ``until``; False if it is not ours any more."""

    async def release_lease(self, key_id: str, purpose: str, held: datetime) -> None: ...

    async def due_rotations(self, now: datetime) -> list[str]:
        """Enabled keys whose scheduled rotation is due."""

    async def add_import_token(self, token: ImportToken, event: AuditEvent) -> None:
        """Keep the token's hash (not the token) and audit, in one transaction."""

    async def get_import_token(self, token: str) -> ImportToken | None:
        """The token presented (looked up by its hash)."""

    async def current_wrapping_label(self, account: str, since: datetime) -> str | None:
        """The account's wrapping key first used at or after ``since`` (to reuse it)."""

    async def expired_wrapping_labels(self, now: datetime) -> list[str]:
        """Wrapping keys whose every import token has expired (their tokens are dropped)."""

    async def get_import(self, key_id: str) -> ImportRecord | None: ...

    async def finish_import(
        self, key_id: str, fingerprint: str, expires_at: datetime | None, now: datetime,
        event: AuditEvent, lease: datetime | None = None,
    ) -> KeyRecord | None:
        """pending_import -> enabled, with the fingerprint and expiry: one transaction;
        given ``lease``, only while the key's ``material`` lease is still that one."""

    async def expired_material(self, now: datetime) -> list[KeyRecord]:
        """Keys whose imported material's expiration time has come."""

    async def deleted_with_material(self) -> list[KeyRecord]:
        """Deleted keys whose token objects are not all destroyed yet."""

    async def has_deletion_work(self, now: datetime) -> bool: ...

    async def append_audit(
        self, events: Sequence[AuditEvent], usage: UsageCounts | None = None
    ) -> None:
        """Append buffered entries and add ``usage`` to the per-day key use counts, in
        one transaction."""

    async def list_audit(
        self, key_id: str | None = None, account: str | None = None, limit: int = 100,
        *, where: AuditFilter | None = None,
    ) -> list[AuditEntry]: ...

    async def verify_audit(self) -> AuditVerdict:
        """Walk the chain, check the seals in the token and this node's anchor file."""


# Migration 3's tables (see there).
_SEALS_AND_LEASES = """
    CREATE TABLE IF NOT EXISTS audit_seals (
        seq INTEGER PRIMARY KEY,
        mac TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS kms_leases (
        key_id  TEXT NOT NULL,
        purpose TEXT NOT NULL,
        until   TEXT NOT NULL,
        PRIMARY KEY (key_id, purpose)
    );
"""

# This store's schema, numbered from 1 and tracked as component "kms" in the
# database's schema_migrations table (engine.sql_db). Scripts are idempotent; a
# script without a PostgreSQL text of its own gets SQLite's column types mapped
# (engine.sql_db.pg_ddl).
MIGRATIONS: tuple[Migration, ...] = (
    # 1: KMS key registry (keys, their versions in the HSM) and the hash-chained audit log
    """
    CREATE TABLE IF NOT EXISTS kms_keys (
        key_id       TEXT PRIMARY KEY,
        account      TEXT NOT NULL,
        alias        TEXT NOT NULL,
        spec         TEXT NOT NULL,
        usage        TEXT NOT NULL,
        state        TEXT NOT NULL CHECK (state IN
                        ('enabled','disabled','pending_deletion','pending_import','deleted')),
        origin       TEXT NOT NULL CHECK (origin IN ('kms','external')),
        default_key  INTEGER NOT NULL CHECK (default_key IN (0, 1)),
        description  TEXT NOT NULL DEFAULT '',
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL,
        scheduled_deletion_date TEXT,
        deleted_at   TEXT,
        current_version INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX IF NOT EXISTS kms_keys_account_alias ON kms_keys (account, alias)
        WHERE state <> 'deleted';
    CREATE INDEX IF NOT EXISTS kms_keys_account_created ON kms_keys (account, created_at);
    CREATE INDEX IF NOT EXISTS kms_keys_state_due ON kms_keys (state, scheduled_deletion_date);
    CREATE TABLE IF NOT EXISTS kms_key_versions (
        key_id       TEXT NOT NULL REFERENCES kms_keys (key_id),
        version      INTEGER NOT NULL,
        token_label  TEXT NOT NULL UNIQUE,
        created_at   TEXT NOT NULL,
        destroyed_at TEXT,
        PRIMARY KEY (key_id, version)
    );
    CREATE TABLE IF NOT EXISTS audit (
        seq       INTEGER PRIMARY KEY,
        time      TEXT NOT NULL,
        account   TEXT NOT NULL,
        actor     TEXT NOT NULL,
        operation TEXT NOT NULL,
        key_id    TEXT,
        outcome   TEXT NOT NULL,
        detail    TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash      TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS audit_key_seq ON audit (key_id, seq);
    CREATE TABLE IF NOT EXISTS audit_head (
        id   INTEGER PRIMARY KEY CHECK (id = 1),
        seq  INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    """,
    # 2: kms part two: key rotation (schedule, count, and a lease so one rotation runs
    # at a time per key: a crashed rotation's orphan token object is then safe to replace);
    # imported key material (keyed fingerprint, expiry) and import tokens; keys the token
    # cannot hold (ML-DSA), kept wrapped under a token AES key
    """
    CREATE TABLE IF NOT EXISTS kms_rotation (
        key_id           TEXT PRIMARY KEY REFERENCES kms_keys (key_id),
        enabled          INTEGER NOT NULL CHECK (enabled IN (0, 1)),
        interval_days    INTEGER NOT NULL,
        next_rotation_at TEXT,
        last_rotated_at  TEXT,
        rotations        INTEGER NOT NULL DEFAULT 0,
        last_request     TEXT,
        lease_until      TEXT
    );
    CREATE INDEX IF NOT EXISTS kms_rotation_due ON kms_rotation (next_rotation_at)
        WHERE enabled = 1;
    CREATE TABLE IF NOT EXISTS kms_imports (
        key_id              TEXT PRIMARY KEY REFERENCES kms_keys (key_id),
        fingerprint         TEXT NOT NULL,
        imported_at         TEXT NOT NULL,
        material_expires_at TEXT
    );
    CREATE INDEX IF NOT EXISTS kms_imports_expiry ON kms_imports (material_expires_at)
        WHERE material_expires_at IS NOT NULL;
    CREATE TABLE IF NOT EXISTS kms_import_tokens (
        token          TEXT PRIMARY KEY,
        key_id         TEXT NOT NULL REFERENCES kms_keys (key_id),
        account        TEXT NOT NULL,
        algorithm      TEXT NOT NULL,
        wrapping_label TEXT NOT NULL,
        created_at     TEXT NOT NULL,
        expires_at     TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS kms_import_tokens_wrapping
        ON kms_import_tokens (account, wrapping_label, created_at);
    CREATE TABLE IF NOT EXISTS kms_wrapped_keys (
        key_id     TEXT NOT NULL REFERENCES kms_keys (key_id),
        version    INTEGER NOT NULL,
        wrapped    BLOB NOT NULL,
        public_key BLOB NOT NULL,
        PRIMARY KEY (key_id, version)
    );
    """,
    # 3: trust boundaries. audit_seals: an HMAC made in the token over the last
    # (seq, hash) of each append batch, so the chain cannot be recomputed by whoever
    # writes this file (older entries are covered by the first seal after them: no
    # re-keying). kms_leases: per-key leases (the BYOK "material" lease serialises
    # imports and removals of material). Import tokens are kept as SHA-256 from now on;
    # those stored in clear before are expired (their wrapping keys then get destroyed).
    Dialects(sqlite=_SEALS_AND_LEASES + """
    UPDATE kms_import_tokens SET token = 'expired-' || lower(hex(randomblob(32))),
        expires_at = created_at
        WHERE length(token) <> 64 AND token NOT LIKE 'expired-%';
    """,
    # A PostgreSQL database starts at this engine's version: no token kept in clear.
             postgresql=pg_ddl(_SEALS_AND_LEASES)),
    # 4: the HTTPS API's KMS data. kms_tags: a key's tags (Huawei TagItem; at most 20 a
    # key). kms_grants: who else may use a key, for which operations (at most 100 a key).
    # kms_usage: uses of a key per UTC day, added with each batch of use audit entries.
    # Tags and grants go when the key is deleted; usage counts stay.
    """
    CREATE TABLE IF NOT EXISTS kms_tags (
        key_id    TEXT NOT NULL REFERENCES kms_keys (key_id),
        tag_key   TEXT NOT NULL,
        tag_value TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (key_id, tag_key)
    );
    CREATE INDEX IF NOT EXISTS kms_tags_by_tag ON kms_tags (tag_key, tag_value);
    CREATE TABLE IF NOT EXISTS kms_grants (
        grant_id               TEXT PRIMARY KEY,
        key_id                 TEXT NOT NULL REFERENCES kms_keys (key_id),
        name                   TEXT,
        grantee_principal      TEXT NOT NULL,
        grantee_principal_type TEXT NOT NULL CHECK (grantee_principal_type IN
                                   ('user', 'domain')),
        operations             TEXT NOT NULL,
        issuing_principal      TEXT NOT NULL,
        retiring_principal     TEXT,
        created_at             TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS kms_grants_key ON kms_grants (key_id, created_at, grant_id);
    CREATE INDEX IF NOT EXISTS kms_grants_grantee ON kms_grants (key_id, grantee_principal);
    CREATE INDEX IF NOT EXISTS kms_grants_retiring ON kms_grants (retiring_principal)
        WHERE retiring_principal IS NOT NULL;
    CREATE TABLE IF NOT EXISTS kms_usage (
        account TEXT NOT NULL,
        key_id  TEXT NOT NULL,
        day     TEXT NOT NULL,
        count   INTEGER NOT NULL,
        PRIMARY KEY (account, key_id, day)
    );
    CREATE INDEX IF NOT EXISTS kms_usage_day ON kms_usage (day);
    """,
)


@dataclass
class _Batch:
    """One write transaction's audit append: the key to seal it with, and the seal."""

    key: AuditKey | None
    anchor: Anchor | None = None


class SqliteKmsStore(SqlDb):
    what = "the KMS registry"
    conflict_code = "kms_registry_conflict"
    conflict_fix = "Retry; another process changed the same key at the same time."
    schema = "kms"
    migrations = MIGRATIONS
    _audit_key: AuditKey | None = None

    def use_audit_key(self, key: AuditKey | None) -> None:
        self._audit_key = key

    # --- keys ------------------------------------------------------------------------

    async def create_key(
        self, key: KeyRecord, version: KeyVersion, event: AuditEvent, quota: int | None,
        wrapped: WrappedKey | None = None,
    ) -> CreateOutcome:
        async with self._audited() as batch:
            taken = await self._fetchone(
                "SELECT 1 FROM kms_keys WHERE account = ? AND alias = ? AND state <> 'deleted'",
                (key.account, key.alias),
            )
            if taken is not None:
                return "alias_taken"
            if quota is not None:
                row = await self._fetchone(
                    "SELECT COUNT(*) FROM kms_keys WHERE account = ? AND default_key = 0 "
                    "AND state <> 'deleted'", (key.account,),
                )
                if row is not None and int(row[0]) >= quota:
                    return "quota_exceeded"
            await self._conn.execute(
                f"INSERT INTO kms_keys ({KEY_COLUMNS}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key.key_id, key.account, key.alias, key.spec, key.usage, key.state, key.origin,
                 int(key.default_key), key.description, iso(key.created_at),
                 iso(key.updated_at), iso(key.scheduled_deletion_date), iso(key.deleted_at),
                 key.current_version),
            )
            await self._conn.execute(
                f"INSERT INTO kms_key_versions ({VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (version.key_id, version.version, version.token_label, iso(version.created_at),
                 iso(version.destroyed_at)),
            )
            if wrapped is not None:
                await self._conn.execute(
                    "INSERT INTO kms_wrapped_keys (key_id, version, wrapped, public_key) "
                    "VALUES (?, ?, ?, ?)",
                    (key.key_id, version.version, wrapped.wrapped, wrapped.public_key))
            await self._append([event], batch)
        return "created"

    async def get_wrapped(self, key_id: str, version: int) -> WrappedKey | None:
        async with self._locked():
            row = await self._fetchone(
                "SELECT wrapped, public_key FROM kms_wrapped_keys WHERE key_id = ? AND "
                "version = ?", (key_id, version))
        return None if row is None else WrappedKey(bytes(row[0]), bytes(row[1]))

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {KEY_COLUMNS} FROM kms_keys WHERE key_id = ?", (key_id,))
        return None if row is None else _key(row)

    async def find_alias(self, account: str, alias: str) -> KeyRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {KEY_COLUMNS} FROM kms_keys WHERE account = ? AND alias = ? "
                "AND state <> 'deleted'", (account, alias),
            )
        return None if row is None else _key(row)

    async def find_deleted_alias(self, account: str, alias: str) -> KeyRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {KEY_COLUMNS} FROM kms_keys WHERE account = ? AND alias = ? "
                "AND state = 'deleted' ORDER BY deleted_at DESC LIMIT 1", (account, alias),
            )
        return None if row is None else _key(row)

    async def list_keys(
        self, account: str, state: str | None = None, *, spec: str | None = None,
        limit: int | None = None, after: tuple[str, str] | None = None,
    ) -> list[KeyRecord]:
        where, params = _key_filter(account, state, spec)
        if after is not None:
            where += " AND (created_at, key_id) > (?, ?)"
            params += after
        sql = f"SELECT {KEY_COLUMNS} FROM kms_keys WHERE {where} ORDER BY created_at, key_id"
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        async with self._locked():
            rows = await self._fetchall(sql, params)
        return [_key(r) for r in rows]

    async def count_keys(
        self, account: str, state: str | None = None, spec: str | None = None
    ) -> int:
        where, params = _key_filter(account, state, spec)
        async with self._locked():
            row = await self._fetchone(f"SELECT COUNT(*) FROM kms_keys WHERE {where}", params)
        return 0 if row is None else int(row[0])

    async def update_key(
        self, key_id: str, from_states: Iterable[str], now: datetime, event: AuditEvent, *,
        alias: str | None = None, description: str | None = None,
    ) -> tuple[UpdateOutcome, KeyRecord | None]:
        states = tuple(from_states)
        marks = ", ".join("?" for _ in states)
        sets, params = ["updated_at = ?"], [iso(now)]
        if alias is not None:
            sets.append("alias = ?")
            params.append(alias)
        if description is not None:
            sets.append("description = ?")
            params.append(description)
        async with self._audited() as batch:
            if alias is not None:
                taken = await self._fetchone(
                    "SELECT 1 FROM kms_keys WHERE account = (SELECT account FROM kms_keys "
                    "WHERE key_id = ?) AND alias = ? AND state <> 'deleted' AND key_id <> ?",
                    (key_id, alias, key_id))
                if taken is not None:
                    return "alias_taken", None
            row = await self._fetchone(
                f"UPDATE kms_keys SET {', '.join(sets)} WHERE key_id = ? AND state IN "
                f"({marks}) RETURNING {KEY_COLUMNS}", (*params, key_id, *states))
            if row is None:
                return "key_state", None
            await self._append([event], batch)
        return "updated", _key(row)

    async def count_custom_keys(self, account: str) -> int:
        async with self._locked():
            row = await self._fetchone(
                "SELECT COUNT(*) FROM kms_keys WHERE account = ? AND default_key = 0 "
                "AND state <> 'deleted'", (account,),
            )
        return 0 if row is None else int(row[0])

    async def change_state(
        self, key_id: str, from_states: Iterable[str], to_state: str, now: datetime,
        event: AuditEvent, *, scheduled_deletion_date: datetime | None = None,
        deleted_at: datetime | None = None, due_by: datetime | None = None,
    ) -> KeyRecord | None:
        states = tuple(from_states)
        marks = ", ".join("?" for _ in states)
        sql = (
            "UPDATE kms_keys SET state = ?, updated_at = ?, scheduled_deletion_date = ?, "
            f"deleted_at = ? WHERE key_id = ? AND state IN ({marks})"
        )
        params: tuple[Any, ...] = (to_state, iso(now), iso(scheduled_deletion_date),
                                   iso(deleted_at), key_id, *states)
        if due_by is not None:
            sql += " AND scheduled_deletion_date <= ?"
            params += (iso(due_by),)
        async with self._audited() as batch:
            row = await self._fetchone(sql + f" RETURNING {KEY_COLUMNS}", params)
            if row is None:
                return None
            record = _key(row)
            if to_state == "deleted":  # a deleted key's tags and grants go with it
                await self._conn.execute("DELETE FROM kms_tags WHERE key_id = ?", (key_id,))
                await self._conn.execute("DELETE FROM kms_grants WHERE key_id = ?", (key_id,))
            await self._append([event], batch)
        return record

    async def versions(self, key_id: str) -> list[KeyVersion]:
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {VERSION_COLUMNS} FROM kms_key_versions WHERE key_id = ? "
                "ORDER BY version", (key_id,),
            )
        return [_version(r) for r in rows]

    async def mark_version_destroyed(self, key_id: str, version: int, now: datetime) -> bool:
        async with self._locked():
            cursor = await self._conn.execute(
                "UPDATE kms_key_versions SET destroyed_at = ? WHERE key_id = ? AND version = ? "
                "AND destroyed_at IS NULL", (iso(now), key_id, version),
            )
            return int(cursor.rowcount) == 1

    async def due_for_deletion(self, now: datetime) -> list[KeyRecord]:
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {KEY_COLUMNS} FROM kms_keys WHERE state = 'pending_deletion' "
                "AND scheduled_deletion_date <= ? ORDER BY scheduled_deletion_date", (iso(now),),
            )
        return [_key(r) for r in rows]

    async def deleted_with_material(self) -> list[KeyRecord]:
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {KEY_COLUMNS} FROM kms_keys WHERE state = 'deleted' AND key_id IN "
                "(SELECT key_id FROM kms_key_versions WHERE destroyed_at IS NULL)",
            )
        return [_key(r) for r in rows]

    async def has_deletion_work(self, now: datetime) -> bool:
        async with self._locked():
            row = await self._fetchone(
                "SELECT EXISTS (SELECT 1 FROM kms_keys WHERE state = 'pending_deletion' "
                "AND scheduled_deletion_date <= ?) OR EXISTS (SELECT 1 FROM kms_keys k "
                "JOIN kms_key_versions v ON v.key_id = k.key_id "
                "WHERE k.state = 'deleted' AND v.destroyed_at IS NULL) OR EXISTS (SELECT 1 "
                "FROM kms_imports i JOIN kms_keys k ON k.key_id = i.key_id WHERE "
                "i.material_expires_at <= ? AND k.state IN ('enabled', 'disabled')) OR EXISTS "
                "(SELECT 1 FROM kms_import_tokens GROUP BY wrapping_label "
                "HAVING MAX(expires_at) <= ?)",
                (iso(now), iso(now), iso(now)),
            )
        return bool(row and row[0])

    # --- rotation --------------------------------------------------------------------

    async def get_rotation(self, key_id: str) -> RotationRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {ROTATION_COLUMNS} FROM kms_rotation WHERE key_id = ?", (key_id,))
        return None if row is None else _rotation(row)

    async def set_rotation(
        self, key_id: str, enabled: bool, interval_days: int,
        next_rotation_at: datetime | None, event: AuditEvent,
    ) -> RotationRecord:
        async with self._audited() as batch:
            row = await self._fetchone(
                "INSERT INTO kms_rotation (key_id, enabled, interval_days, next_rotation_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (key_id) DO UPDATE SET enabled = "
                "excluded.enabled, interval_days = excluded.interval_days, next_rotation_at = "
                f"excluded.next_rotation_at RETURNING {ROTATION_COLUMNS}",
                (key_id, int(enabled), interval_days, iso(next_rotation_at)),
            )
            assert row is not None
            await self._append([event], batch)
        return _rotation(row)

    async def claim_rotation(self, key_id: str, now: datetime, until: datetime) -> bool:
        async with self._transaction():
            await self._conn.execute(
                "INSERT INTO kms_rotation (key_id, enabled, interval_days) VALUES (?, 0, 365) "
                "ON CONFLICT (key_id) DO NOTHING", (key_id,))
            row = await self._fetchone(
                "UPDATE kms_rotation SET lease_until = ? WHERE key_id = ? AND "
                "(lease_until IS NULL OR lease_until < ?) RETURNING key_id",
                (iso(until), key_id, iso(now)),
            )
        return row is not None

    async def renew_rotation(self, key_id: str, held: datetime, until: datetime) -> bool:
        return await self._execute(
            "UPDATE kms_rotation SET lease_until = ? WHERE key_id = ? AND lease_until = ?",
            (iso(until), key_id, iso(held))) == 1

    async def release_rotation(self, key_id: str, held: datetime | None = None) -> None:
        if held is None:
            await self._execute("UPDATE kms_rotation SET lease_until = NULL WHERE key_id = ?",
                                (key_id,))
        else:
            await self._execute("UPDATE kms_rotation SET lease_until = NULL WHERE key_id = ? "
                                "AND lease_until = ?", (key_id, iso(held)))

    async def add_version(
        self, key_id: str, expected_version: int, version: KeyVersion, event: AuditEvent,
        request: str | None, lease: datetime | None = None,
    ) -> KeyRecord | None:
        now = iso(version.created_at)
        fence, fence_params = "", _NO_PARAMS
        if lease is not None:
            fence = (" AND EXISTS (SELECT 1 FROM kms_rotation r WHERE r.key_id = "
                     "kms_keys.key_id AND r.lease_until = ?)")
            fence_params = (iso(lease),)
        async with self._audited() as batch:
            row = await self._fetchone(
                "UPDATE kms_keys SET current_version = ?, updated_at = ? WHERE key_id = ? "
                f"AND current_version = ? AND state = 'enabled'{fence} RETURNING {KEY_COLUMNS}",
                (version.version, now, key_id, expected_version, *fence_params),
            )
            if row is None:
                return None
            await self._conn.execute(
                f"INSERT INTO kms_key_versions ({VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (key_id, version.version, version.token_label, now, None),
            )
            schedule = await self._fetchone(
                "SELECT enabled, interval_days FROM kms_rotation WHERE key_id = ?", (key_id,))
            # The next scheduled rotation counts from this one, whoever asked for it.
            following = (version.created_at + timedelta(days=int(schedule[1]))
                         if schedule is not None and schedule[0] else None)
            await self._conn.execute(
                "INSERT INTO kms_rotation (key_id, enabled, interval_days, rotations, "
                "last_rotated_at, last_request) VALUES (?, 0, 365, 1, ?, ?) "
                "ON CONFLICT (key_id) DO UPDATE SET rotations = kms_rotation.rotations + 1, "
                "last_rotated_at = excluded.last_rotated_at, last_request = "
                "excluded.last_request, lease_until = NULL, next_rotation_at = ?",
                (key_id, now, request, iso(following)),
            )
            await self._append([event], batch)
        return _key(row)

    async def due_rotations(self, now: datetime) -> list[str]:
        async with self._locked():
            rows = await self._fetchall(
                "SELECT r.key_id FROM kms_rotation r JOIN kms_keys k ON k.key_id = r.key_id "
                "WHERE r.enabled = 1 AND r.next_rotation_at <= ? AND k.state = 'enabled' "
                "ORDER BY r.next_rotation_at", (iso(now),),
            )
        return [str(r[0]) for r in rows]

    # --- leases ----------------------------------------------------------------------

    async def claim_lease(
        self, key_id: str, purpose: str, now: datetime, until: datetime
    ) -> bool:
        async with self._locked():
            row = await self._fetchone(
                "INSERT INTO kms_leases (key_id, purpose, until) VALUES (?, ?, ?) "
                "ON CONFLICT (key_id, purpose) DO UPDATE SET until = excluded.until "
                "WHERE kms_leases.until < ? RETURNING key_id",
                (key_id, purpose, iso(until), iso(now)),
            )
        return row is not None

    async def renew_lease(
        self, key_id: str, purpose: str, held: datetime, until: datetime
    ) -> bool:
        return await self._execute(
            "UPDATE kms_leases SET until = ? WHERE key_id = ? AND purpose = ? AND until = ?",
            (iso(until), key_id, purpose, iso(held))) == 1

    async def release_lease(self, key_id: str, purpose: str, held: datetime) -> None:
        await self._execute(
            "DELETE FROM kms_leases WHERE key_id = ? AND purpose = ? AND until = ?",
            (key_id, purpose, iso(held)))

    # --- imports ---------------------------------------------------------------------

    async def add_import_token(self, token: ImportToken, event: AuditEvent) -> None:
        async with self._audited() as batch:
            await self._conn.execute(
                "INSERT INTO kms_import_tokens (token, key_id, account, algorithm, "
                "wrapping_label, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (import_token_hash(token.token), token.key_id, token.account, token.algorithm,
                 token.wrapping_label, iso(token.created_at), iso(token.expires_at)),
            )
            await self._append([event], batch)

    async def get_import_token(self, token: str) -> ImportToken | None:
        async with self._locked():
            row = await self._fetchone(
                "SELECT key_id, account, algorithm, wrapping_label, created_at, "
                "expires_at FROM kms_import_tokens WHERE token = ?", (import_token_hash(token),))
        if row is None:
            return None
        return ImportToken(token, row["key_id"], row["account"], row["algorithm"],
                           row["wrapping_label"], _ts(row["created_at"]),
                           _ts(row["expires_at"]))

    async def current_wrapping_label(self, account: str, since: datetime) -> str | None:
        async with self._locked():
            row = await self._fetchone(
                "SELECT wrapping_label FROM kms_import_tokens WHERE account = ? "
                "GROUP BY wrapping_label HAVING MIN(created_at) >= ? "
                "ORDER BY MIN(created_at) DESC LIMIT 1", (account, iso(since)),
            )
        return None if row is None else str(row[0])

    async def expired_wrapping_labels(self, now: datetime) -> list[str]:
        async with self._transaction():
            rows = await self._fetchall(
                "SELECT wrapping_label FROM kms_import_tokens GROUP BY wrapping_label "
                "HAVING MAX(expires_at) <= ?", (iso(now),),
            )
            labels = [str(r[0]) for r in rows]
            await self._conn.executemany(
                "DELETE FROM kms_import_tokens WHERE wrapping_label = ?",
                [(label,) for label in labels])
        return labels

    async def get_import(self, key_id: str) -> ImportRecord | None:
        async with self._locked():
            row = await self._fetchone(
                "SELECT key_id, fingerprint, imported_at, material_expires_at FROM kms_imports "
                "WHERE key_id = ?", (key_id,))
        if row is None:
            return None
        return ImportRecord(row["key_id"], row["fingerprint"], _ts(row["imported_at"]),
                            parse_iso(row["material_expires_at"]))

    async def finish_import(
        self, key_id: str, fingerprint: str, expires_at: datetime | None, now: datetime,
        event: AuditEvent, lease: datetime | None = None,
    ) -> KeyRecord | None:
        fence, fence_params = "", _NO_PARAMS
        if lease is not None:
            fence = (" AND EXISTS (SELECT 1 FROM kms_leases l WHERE l.key_id = "
                     "kms_keys.key_id AND l.purpose = 'material' AND l.until = ?)")
            fence_params = (iso(lease),)
        async with self._audited() as batch:
            row = await self._fetchone(
                "UPDATE kms_keys SET state = 'enabled', updated_at = ? WHERE key_id = ? "
                f"AND state = 'pending_import'{fence} RETURNING {KEY_COLUMNS}",
                (iso(now), key_id, *fence_params))
            if row is None:
                return None
            # The first import's fingerprint stays: a re-import must match it.
            await self._conn.execute(
                "INSERT INTO kms_imports (key_id, fingerprint, imported_at, "
                "material_expires_at) VALUES (?, ?, ?, ?) ON CONFLICT (key_id) DO UPDATE SET "
                "imported_at = excluded.imported_at, "
                "material_expires_at = excluded.material_expires_at",
                (key_id, fingerprint, iso(now), iso(expires_at)),
            )
            await self._append([event], batch)
        return _key(row)

    async def expired_material(self, now: datetime) -> list[KeyRecord]:
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {', '.join('k.' + c.strip() for c in KEY_COLUMNS.split(','))} "
                "FROM kms_keys k JOIN kms_imports i ON i.key_id = k.key_id "
                "WHERE i.material_expires_at <= ? AND k.state IN ('enabled', 'disabled')",
                (iso(now),),
            )
        return [_key(r) for r in rows]

    # --- tags ------------------------------------------------------------------------

    async def key_tags(self, key_id: str) -> list[tuple[str, str]]:
        async with self._locked():
            rows = await self._fetchall(
                "SELECT tag_key, tag_value FROM kms_tags WHERE key_id = ? ORDER BY tag_key",
                (key_id,))
        return [(str(r[0]), str(r[1])) for r in rows]

    async def account_tags(self, account: str) -> list[tuple[str, str, str]]:
        async with self._locked():
            rows = await self._fetchall(
                "SELECT t.key_id, t.tag_key, t.tag_value FROM kms_tags t JOIN kms_keys k "
                "ON k.key_id = t.key_id WHERE k.account = ? AND k.state <> 'deleted' "
                "ORDER BY t.tag_key, t.tag_value, t.key_id", (account,))
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    async def change_tags(
        self, key_id: str, put: Sequence[tuple[str, str]],
        remove: Sequence[tuple[str, str | None]], max_tags: int, event: AuditEvent,
    ) -> tuple[TagOutcome, str | None]:
        async with self._audited() as batch:
            live = await self._fetchone(
                "SELECT 1 FROM kms_keys WHERE key_id = ? AND state <> 'deleted'", (key_id,))
            if live is None:
                return "key_gone", None
            current = {str(r[0]): str(r[1]) for r in await self._fetchall(
                "SELECT tag_key, tag_value FROM kms_tags WHERE key_id = ?", (key_id,))}
            for tag_key, value in remove:
                if tag_key not in current or (value is not None and current[tag_key] != value):
                    return "missing", tag_key
                del current[tag_key]
            current.update(put)
            if len(current) > max_tags:
                return "too_many", None
            await self._conn.executemany(
                "DELETE FROM kms_tags WHERE key_id = ? AND tag_key = ?",
                [(key_id, tag_key) for tag_key, _ in remove])
            await self._conn.executemany(
                "INSERT INTO kms_tags (key_id, tag_key, tag_value) VALUES (?, ?, ?) "
                "ON CONFLICT (key_id, tag_key) DO UPDATE SET tag_value = excluded.tag_value",
                [(key_id, tag_key, value) for tag_key, value in put])
            await self._append([event], batch)
        return "changed", None

    # --- grants ----------------------------------------------------------------------

    async def add_grant(
        self, grant: GrantRecord, max_grants: int, key_states: Iterable[str], event: AuditEvent
    ) -> GrantOutcome:
        states = tuple(key_states)
        marks = ", ".join("?" for _ in states)
        async with self._audited() as batch:
            key = await self._fetchone(
                f"SELECT 1 FROM kms_keys WHERE key_id = ? AND state IN ({marks})",
                (grant.key_id, *states))
            if key is None:
                return "key_state"
            count = await self._fetchone(
                "SELECT COUNT(*) FROM kms_grants WHERE key_id = ?", (grant.key_id,))
            if count is not None and int(count[0]) >= max_grants:
                return "too_many"
            await self._conn.execute(
                f"INSERT INTO kms_grants ({GRANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (grant.grant_id, grant.key_id, grant.name, grant.grantee_principal,
                 grant.grantee_principal_type, json.dumps(list(grant.operations)),
                 grant.issuing_principal, grant.retiring_principal, iso(grant.created_at)))
            await self._append([event], batch)
        return "created"

    async def get_grant(self, key_id: str, grant_id: str) -> GrantRecord | None:
        async with self._locked():
            row = await self._fetchone(
                f"SELECT {GRANT_COLUMNS} FROM kms_grants WHERE key_id = ? AND grant_id = ?",
                (key_id, grant_id))
        return None if row is None else _grant(row)

    async def list_grants(
        self, key_id: str, limit: int | None = None, after: tuple[str, str] | None = None
    ) -> list[GrantRecord]:
        return await self._grants("key_id = ?", (key_id,), limit, after)

    async def count_grants(self, key_id: str) -> int:
        async with self._locked():
            row = await self._fetchone(
                "SELECT COUNT(*) FROM kms_grants WHERE key_id = ?", (key_id,))
        return 0 if row is None else int(row[0])

    async def max_grants_per_key(self, account: str) -> int:
        async with self._locked():
            row = await self._fetchone(
                "SELECT COALESCE(MAX(n), 0) FROM (SELECT COUNT(*) AS n FROM kms_grants g "
                "JOIN kms_keys k ON k.key_id = g.key_id WHERE k.account = ? "
                "AND k.state <> 'deleted' GROUP BY g.key_id) AS per_key", (account,))
        return 0 if row is None else int(row[0])

    async def remove_grant(self, key_id: str, grant_id: str, event: AuditEvent) -> bool:
        async with self._audited() as batch:
            row = await self._fetchone(
                "DELETE FROM kms_grants WHERE key_id = ? AND grant_id = ? RETURNING grant_id",
                (key_id, grant_id))
            if row is None:
                return False
            await self._append([event], batch)
        return True

    async def retirable_grants(
        self, principals: Sequence[str], limit: int | None = None,
        after: tuple[str, str] | None = None,
    ) -> list[GrantRecord]:
        if not principals:
            return []
        marks = ", ".join("?" for _ in principals)
        return await self._grants(
            f"retiring_principal IN ({marks}) AND key_id IN (SELECT key_id FROM kms_keys "
            "WHERE state <> 'deleted')", tuple(principals), limit, after)

    async def count_retirable(self, principals: Sequence[str]) -> int:
        if not principals:
            return 0
        marks = ", ".join("?" for _ in principals)
        async with self._locked():
            row = await self._fetchone(
                f"SELECT COUNT(*) FROM kms_grants WHERE retiring_principal IN ({marks}) AND "
                "key_id IN (SELECT key_id FROM kms_keys WHERE state <> 'deleted')",
                tuple(principals))
        return 0 if row is None else int(row[0])

    async def grantee_grants(
        self, key_id: str, user_id: str | None, project_id: str | None
    ) -> list[tuple[str, GrantRecord]]:
        columns = ", ".join("g." + c.strip() for c in GRANT_COLUMNS.split(","))
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT k.account AS owner, {columns} FROM kms_grants g JOIN kms_keys k "
                "ON k.key_id = g.key_id WHERE g.key_id = ? AND k.state <> 'deleted' AND "
                "((g.grantee_principal_type = 'user' AND g.grantee_principal = ?) OR "
                "(g.grantee_principal_type = 'domain' AND g.grantee_principal = ?)) "
                "ORDER BY g.created_at, g.grant_id", (key_id, user_id, project_id))
        return [(str(r["owner"]), _grant(r)) for r in rows]

    async def _grants(
        self, where: str, params: tuple[Any, ...], limit: int | None,
        after: tuple[str, str] | None,
    ) -> list[GrantRecord]:
        if after is not None:
            where += " AND (created_at, grant_id) > (?, ?)"
            params += after
        sql = f"SELECT {GRANT_COLUMNS} FROM kms_grants WHERE {where} ORDER BY created_at, grant_id"
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        async with self._locked():
            rows = await self._fetchall(sql, params)
        return [_grant(r) for r in rows]

    # --- usage -----------------------------------------------------------------------

    async def usage(
        self, account: str | None = None, key_id: str | None = None, since: str | None = None
    ) -> list[UsageRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        for clause, value in (("u.account = ?", account), ("u.key_id = ?", key_id),
                              ("u.day >= ?", since)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT u.account, u.key_id, COALESCE(k.alias, '') AS alias, u.day, u.count "
                f"FROM kms_usage u LEFT JOIN kms_keys k ON k.key_id = u.key_id {where} "
                "ORDER BY u.day, u.account, alias, u.key_id", params)
        return [UsageRecord(str(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]))
                for r in rows]

    # --- audit -----------------------------------------------------------------------

    async def append_audit(
        self, events: Sequence[AuditEvent], usage: UsageCounts | None = None
    ) -> None:
        """Append buffered use entries; sealed when the token is open already (a seal
        covers every entry before it, so the next sealed batch covers these). The uses
        they record are counted per key and day in the same transaction."""
        if not events and not usage:
            return
        async with self._audited(open_token=False) as batch:
            if usage:
                await self._conn.executemany(
                    "INSERT INTO kms_usage (account, key_id, day, count) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (account, key_id, day) DO UPDATE SET "
                    "count = kms_usage.count + excluded.count",
                    [(account, key_id, day, n) for (account, key_id, day), n in usage.items()])
            if events:
                await self._append(events, batch)

    async def list_audit(
        self, key_id: str | None = None, account: str | None = None, limit: int = 100,
        *, where: AuditFilter | None = None,
    ) -> list[AuditEntry]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("key_id", key_id), ("account", account)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if where is not None:
            more, values = where.sql(self.dialect)
            clauses += more
            params += values
        sql_where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT {AUDIT_COLUMNS} FROM (SELECT {AUDIT_COLUMNS} FROM audit {sql_where} "
                "ORDER BY seq DESC LIMIT ?) AS newest ORDER BY seq", (*params, limit),
            )
        return [_entry(r) for r in rows]

    async def verify_audit(self) -> AuditVerdict:
        """Walk the whole chain; the first entry that does not fit is reported. Then
        the seals (in the token) and this node's anchor file: a cut tail, recomputed
        hashes or a forged anchor are reported too (and, on SQLite, a missing one)."""
        path = anchor_path(self._path)
        # The anchor first: read after the chain, a concurrent append's newer anchor
        # would look like a cut. (An anchor names an entry committed before it was
        # written, so the snapshot below, taken later, has that entry.)
        damaged = None
        try:
            anchor = await asyncio.to_thread(read_anchor, path)
        except AnchorDamaged as exc:
            anchor, damaged = None, str(exc)
        expected_seq, prev, count = 1, GENESIS_HASH, 0
        hashes: dict[int, str] = {}
        # One consistent read: a concurrent append cannot show a half chain.
        async with self._snapshot():
            seals = {int(r[0]): str(r[1]) for r in await self._fetchall(
                "SELECT seq, mac FROM audit_seals ORDER BY seq")}
            wanted = set(seals) | ({anchor.seq} if anchor is not None else set())
            after = 0
            while True:  # in pages: the log may be longer than memory should hold
                rows = await self._fetchall(
                    f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, VERIFY_PAGE))
                for row in rows:
                    entry = _entry(row)
                    broken = _check_entry(entry, expected_seq, prev)
                    if broken:
                        return AuditVerdict(False, count, broken[0], broken[1])
                    if entry.seq in wanted:
                        hashes[entry.seq] = entry.hash
                    expected_seq, prev, count = entry.seq + 1, entry.hash, count + 1
                if len(rows) < VERIFY_PAGE:
                    break
                after = expected_seq - 1
            head = await self._fetchone("SELECT seq, hash FROM audit_head WHERE id = 1")
        head_seq, head_hash = (int(head[0]), str(head[1])) if head else (0, GENESIS_HASH)
        if (head_seq, head_hash) != (expected_seq - 1, prev):
            return AuditVerdict(
                False, count, expected_seq,
                f"the chain ends at seq {expected_seq - 1} but its head says {head_seq}: "
                "newest entries were deleted or the head was edited",
            )
        if damaged is not None:
            return AuditVerdict(False, count, None,
                                f"the audit anchor {path} is damaged ({damaged}): it was "
                                "edited or replaced")
        return await self._check_seals(count, expected_seq - 1, seals, hashes, anchor, path)

    async def _check_seals(
        self, count: int, last: int, seals: dict[int, str], hashes: dict[int, str],
        anchor: Anchor | None, path: Path,
    ) -> AuditVerdict:
        """The chain is consistent up to ``last``; now the keyed part."""
        if not seals and anchor is None:
            # Never sealed: a log from before sealing, or written without the HSM.
            return AuditVerdict(True, count, unsealed=count)
        key = self._audit_key
        if key is None:
            raise ConfigError("the audit log is sealed: checking it needs the HSM",
                              fix="Verify it through the KMS service (dew audit verify).")
        good = 0  # the newest entry a verified seal covers
        if anchor is not None:
            if not await key.check(seal_message(anchor.seq, anchor.hash),
                                   bytes.fromhex(anchor.mac)):
                return AuditVerdict(False, count, None,
                                    f"the audit anchor {path} was not made with this token's "
                                    "audit key: it was forged or belongs to another token",
                                    anchored_at=anchor.seq)
            if anchor.seq > last:
                return AuditVerdict(
                    False, count, last + 1,
                    f"the audit log ends at entry {last} but was anchored at entry "
                    f"{anchor.seq}: the newest entries were deleted", anchored_at=anchor.seq)
        beyond = [seq for seq in seals if seq > last]
        if beyond:
            return AuditVerdict(
                False, count, last + 1,
                f"the audit log ends at entry {last} but entry {beyond[0]} was sealed: the "
                "newest entries were deleted", anchored_at=anchor.seq if anchor else None)
        order = list(seals)
        for start in range(0, len(order), SEAL_CHECKS_AT_ONCE):
            chunk = order[start:start + SEAL_CHECKS_AT_ONCE]
            # Many token calls in flight at once: the pool's threads all work.
            valid = await asyncio.gather(*(
                key.check(seal_message(seq, hashes[seq]), bytes.fromhex(seals[seq]))
                for seq in chunk))
            for seq, ok in zip(chunk, valid, strict=True):
                if not ok:
                    return AuditVerdict(
                        False, count, good + 1,
                        f"entries {good + 1}..{seq} were changed after they were sealed (the "
                        f"seal of entry {seq} does not match)", sealed_through=good or None,
                        anchored_at=anchor.seq if anchor else None)
                good = seq
        if anchor is None:
            if self.dialect == "sqlite":
                # One file, one machine: every sealed batch moved this anchor.
                return AuditVerdict(
                    False, count, None,
                    f"the audit anchor {path} is missing, but the log is sealed up to entry "
                    f"{good}: the anchor was deleted", sealed_through=good)
            # A shared database: the seals may all be other nodes'; this node has
            # anchored none yet. Intact as far as the seals go.
            return AuditVerdict(True, count, sealed_through=good or None,
                                unsealed=last - good)
        if hashes.get(anchor.seq) != anchor.hash:
            return AuditVerdict(
                False, count, min(good + 1, anchor.seq),
                f"entry {anchor.seq} differs from the anchored one: entries up to it were "
                "rewritten", sealed_through=good or None, anchored_at=anchor.seq)
        sealed = max(good, anchor.seq)
        return AuditVerdict(True, count, sealed_through=sealed, anchored_at=anchor.seq,
                            unsealed=last - sealed)

    @asynccontextmanager
    async def _audited(self, *, open_token: bool = True) -> AsyncIterator[_Batch]:
        """A write transaction that appends audit entries, sealed with the token key
        when it can be (``open_token``: open the HSM for it first, outside the write
        lock); the anchor file moves on after the commit."""
        key = self._audit_key
        if key is not None and open_token and not key.ready():
            try:
                await key.prepare()
            except DewError as exc:
                # Written unsealed; the next sealed batch covers these entries.
                log.warning("audit entries written unsealed: the HSM is not available",
                            error=exc.message)
        batch = _Batch(key if key is not None and key.ready() else None)
        async with self._transaction():
            yield batch
        if batch.anchor is not None:
            await self._anchor(batch.anchor)

    async def _anchor(self, anchor: Anchor) -> None:
        try:
            await asyncio.to_thread(_write_anchor, anchor_path(self._path), anchor)
        except (OSError, DewError) as exc:
            # The entries and their seal are committed; the anchor lags behind.
            log.error("the audit anchor could not be written", seq=anchor.seq,
                      error=exc.message if isinstance(exc, DewError)
                      else exc.strerror or str(exc))

    async def _append(self, events: Iterable[AuditEvent], batch: _Batch) -> None:
        """Chain ``events`` after the head and seal the batch; inside ``_audited``."""
        head = await self._fetchone("SELECT seq, hash FROM audit_head WHERE id = 1")
        seq, prev = (int(head[0]), str(head[1])) if head else (0, GENESIS_HASH)
        rows = []
        for event in events:
            seq += 1
            time = audit_time(event.time)
            detail = detail_text(event.detail)
            digest = entry_hash(prev, seq, time, event.account, event.actor, event.operation,
                                event.key_id, event.outcome, detail)
            rows.append((seq, time, event.account, event.actor, event.operation, event.key_id,
                         event.outcome, detail, prev, digest))
            prev = digest
        # One round trip to the connection's thread for the whole batch.
        await self._conn.executemany(
            f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        await self._conn.execute(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            (seq, prev),
        )
        if batch.key is None or not rows:
            return
        try:
            # One token call per batch: the seal of its last entry covers all before it.
            tag = (await batch.key.mac(seal_message(seq, prev))).hex()
        except DewError as exc:
            log.warning("audit entries written unsealed: sealing failed", error=exc.message)
            return
        await self._conn.execute(
            "INSERT INTO audit_seals (seq, mac) VALUES (?, ?) "
            "ON CONFLICT (seq) DO UPDATE SET mac = excluded.mac", (seq, tag))
        batch.anchor = Anchor(seq, prev, tag)

    # --- plumbing --------------------------------------------------------------------


def _write_anchor(path: Path, anchor: Anchor) -> None:
    try:
        write_anchor(path, anchor)
    except FileNotFoundError:
        # SQLite made the directory for its file; with PostgreSQL nothing of the store
        # did (a state directory is there once dew init ran; a test's may not be).
        private_dir(path.parent)
        write_anchor(path, anchor)


def _check_entry(entry: AuditEntry, seq: int, prev: str) -> tuple[int, str] | None:
    if entry.seq != seq:
        return seq, f"entry {seq} is missing (the next one is {entry.seq})"
    if entry.prev_hash != prev:
        return entry.seq, f"entry {entry.seq} does not point at the hash of entry {seq - 1}"
    recomputed = entry_hash(entry.prev_hash, entry.seq, entry.time, entry.account, entry.actor,
                            entry.operation, entry.key_id, entry.outcome, entry.detail)
    if recomputed != entry.hash:
        return entry.seq, f"entry {entry.seq} was changed after it was written"
    return None




def _ts(text: str) -> datetime:
    ts = parse_iso(text)
    assert ts is not None
    return ts


def _key(row: Row) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"], account=row["account"], alias=row["alias"], spec=row["spec"],
        usage=row["usage"], state=row["state"], origin=row["origin"],
        default_key=bool(row["default_key"]), description=row["description"],
        created_at=_ts(row["created_at"]), updated_at=_ts(row["updated_at"]),
        scheduled_deletion_date=parse_iso(row["scheduled_deletion_date"]),
        deleted_at=parse_iso(row["deleted_at"]), current_version=int(row["current_version"]),
    )


def _key_filter(
    account: str, state: str | None, spec: str | None
) -> tuple[str, tuple[Any, ...]]:
    where = "account = ? AND state <> 'deleted'"
    params: tuple[Any, ...] = (account,)
    if state is not None:
        where += " AND state = ?"
        params += (state,)
    if spec is not None:
        where += " AND spec = ?"
        params += (spec,)
    return where, params


def _grant(row: Row) -> GrantRecord:
    return GrantRecord(
        grant_id=row["grant_id"], key_id=row["key_id"], name=row["name"],
        grantee_principal=row["grantee_principal"],
        grantee_principal_type=row["grantee_principal_type"],
        operations=tuple(json.loads(row["operations"])),
        issuing_principal=row["issuing_principal"],
        retiring_principal=row["retiring_principal"], created_at=_ts(row["created_at"]),
    )


def _version(row: Row) -> KeyVersion:
    return KeyVersion(
        key_id=row["key_id"], version=int(row["version"]), token_label=row["token_label"],
        created_at=_ts(row["created_at"]), destroyed_at=parse_iso(row["destroyed_at"]),
    )


def _rotation(row: Row) -> RotationRecord:
    return RotationRecord(
        key_id=row["key_id"], enabled=bool(row["enabled"]),
        interval_days=int(row["interval_days"]),
        next_rotation_at=parse_iso(row["next_rotation_at"]),
        last_rotated_at=parse_iso(row["last_rotated_at"]), rotations=int(row["rotations"]),
        last_request=row["last_request"], lease_until=parse_iso(row["lease_until"]),
    )


def _entry(row: Row) -> AuditEntry:
    return AuditEntry(
        seq=int(row["seq"]), time=row["time"], account=row["account"], actor=row["actor"],
        operation=row["operation"], key_id=row["key_id"], outcome=row["outcome"],
        detail=row["detail"], prev_hash=row["prev_hash"], hash=row["hash"],
    )
