"""KMS: customer master keys in the HSM, data keys, encrypt-data, scheduled deletion.

``KmsService`` is the domain API; the CLI (``dew kms``), the jobs below, the
demo and secret-argument sealing all call it. Keys live in the token (through
:mod:`engine.crypto`), their registry and the audit chain in the task store's
database (:mod:`engine.kms_store`); input checks and the ciphertext format are
pure functions in :mod:`handlers.kms_format`.

Jobs (idempotent under arq re-runs: each checks the key's state, then acts
with a guarded update):

- ``kms.schedule_key_deletion {key, pending_days, account?}``: 7..1096 days.
  A key already pending deletion is left as it is (``changed: false``).
- ``kms.cancel_key_deletion {key, account?}``: back to **disabled**, as the
  hosted service does (enable it again explicitly). A key that is not pending
  deletion is left as it is.
- ``kms.delete_due_keys {}``: marks due keys deleted, destroys their token
  objects, audits both; also run by cron every minute.

Two process-local shortcuts keep the data plane (create-datakey, encrypt,
decrypt) close to the speed of a bare PKCS#11 call:

- key metadata for *using* a key is cached for ``cache_ttl`` seconds (1 s by
  default). Changes made by this process take effect at once; changes made by
  another process (disable, schedule deletion) within ``cache_ttl``. Key
  management always reads the registry. A key whose material was destroyed
  fails in the token anyway, and is then reported as deleted.
- audit entries of key *uses* are buffered and appended in batches every
  ``audit_flush_interval`` seconds (0.2 s; 0 appends each one at once), and on
  close. Key management entries are written in the same transaction as the
  change they record. A process killed with SIGKILL can lose the last
  ``audit_flush_interval`` of use entries, never a management entry.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from engine.context import JobContext
from engine.crypto import (
    CryptoCore,
    KeyNotFound,
    KeySpec,
    KeyUsageError,
    ensure_token,
    hsm_config_from_settings,
    unpack_sealed,
)
from engine.errors import ConfigError, Conflict, DewError, InvalidInput, NotFound
from engine.kms_store import (
    AuditEntry,
    AuditEvent,
    AuditVerdict,
    KeyRecord,
    KeyVersion,
    KmsStore,
    SqliteKmsStore,
)
from engine.logs import get_logger
from engine.models import iso, utcnow
from engine.registry import JOBS
from engine.resources import Closer, Resources, resource
from engine.settings import Settings
from handlers.kms_format import (
    DEFAULT_ACCOUNT,
    MAX_DATA_BYTES,
    CipherHeader,
    KeyState,
    KeyUsage,
    Purpose,
    b64,
    check_account,
    check_context,
    check_custom_alias,
    check_description,
    check_key_ref,
    check_length_bits,
    check_pending_days,
    check_plaintext,
    check_random_bytes,
    check_spec,
    check_usage,
    ciphertext_size,
    context_digest,
    decode_base64,
    default_service,
    is_key_id,
    pack_ciphertext,
    pad,
    unpack_ciphertext,
    unpad,
)

log = get_logger("dew.kms")
T = TypeVar("T")
CryptoProvider = Callable[[], Awaitable[CryptoCore]]

DEFAULT_CACHE_TTL = 1.0
DEFAULT_AUDIT_FLUSH_INTERVAL = 0.2
AUDIT_BATCH = 500
CACHE_MAX = 10_000
DATA_KEY_BYTES = (16, 64)  # what encrypt-datakey accepts (128..512 bits)


# --------------------------------------------------------------------------- errors


class UnknownKey(NotFound):
    code = "key_not_found"
    default_fix = "Check the key id or alias and the account (--account)."


class KeyStateError(Conflict):
    code = "key_state_invalid"


class KeyDeleted(Conflict):
    code = "key_deleted"
    default_fix = "Nothing can bring the key back; data encrypted under it is lost."


class QuotaExceeded(Conflict):
    code = "kms_quota_exceeded"
    default_fix = "Schedule the deletion of keys you no longer need, or raise kms.quota."


class AliasExists(Conflict):
    code = "alias_exists"
    default_fix = "Choose another alias, or use the existing key."


class DefaultKeyProtected(Conflict):
    code = "default_key_protected"
    default_fix = "Default keys are managed by their service; create a custom key instead."


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class KeyMetadata:
    """What describe-key / list-keys show (the JSON contract of ``dew kms``)."""

    key_id: str
    key_alias: str
    key_spec: str
    key_usage: str
    key_state: str
    origin: str
    default_key: bool
    scheduled_deletion_date: datetime | None
    account: str
    created_at: datetime
    description: str
    key_version: int

    @classmethod
    def of(cls, key: KeyRecord) -> KeyMetadata:
        return cls(key.key_id, key.alias, key.spec, key.usage, key.state, key.origin,
                   key.default_key, key.scheduled_deletion_date, key.account, key.created_at,
                   key.description, key.current_version)

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id, "key_alias": self.key_alias, "key_spec": self.key_spec,
            "key_usage": self.key_usage, "key_state": self.key_state, "origin": self.origin,
            "default_key": self.default_key,
            "scheduled_deletion_date": iso(self.scheduled_deletion_date),
            "account": self.account, "created_at": iso(self.created_at),
            "description": self.description, "key_version": self.key_version,
        }


@dataclass(frozen=True)
class KeyChange:
    key: KeyMetadata
    changed: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.key.to_json(), "changed": self.changed}


@dataclass(frozen=True, repr=False)
class DataKeyResult:
    key_id: str
    plain_text: bytes | None
    cipher_text: bytes

    def __repr__(self) -> str:  # the plaintext DEK must never reach a log line
        shown = "None" if self.plain_text is None else f"<{len(self.plain_text)} bytes hidden>"
        return f"DataKeyResult(key_id={self.key_id!r}, plain_text={shown}, ...)"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key_id": self.key_id}
        if self.plain_text is not None:
            out["plain_text"] = self.plain_text.hex()
        out["cipher_text"] = self.cipher_text.hex()
        return out


@dataclass(frozen=True)
class EncryptResult:
    key_id: str
    cipher_text: bytes

    @property
    def cipher_text_base64(self) -> str:
        return b64(self.cipher_text)

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "cipher_text": self.cipher_text_base64}


@dataclass(frozen=True, repr=False)
class DecryptResult:
    key_id: str
    plain_text: bytes

    def __repr__(self) -> str:
        return f"DecryptResult(key_id={self.key_id!r}, plain_text=<{len(self.plain_text)} bytes>)"

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "plain_text_base64": b64(self.plain_text)}


@dataclass(frozen=True)
class DeletionReport:
    deleted: list[str]
    versions_destroyed: int

    def to_json(self) -> dict[str, Any]:
        return {"deleted": self.deleted, "versions_destroyed": self.versions_destroyed}


@dataclass
class _Op:
    """The audit entry an operation is building (filled in as it learns more)."""

    key_id: str | None
    detail: dict[str, Any] = field(default_factory=dict)
    outcome: str = "success"
    recorded: bool = False  # written already, inside the operation's own transaction


def token_label(key_id: str, version: int) -> str:
    return f"kms:{key_id}:v{version}"


def _name(key: KeyRecord) -> str:
    return f"{key.alias!r} ({key.key_id})"


def _not_found(ref: str, account: str) -> UnknownKey:
    # The same words whether the key never existed or belongs to another
    # account: an account must not learn that another account's key exists.
    return UnknownKey(f"no key {ref!r} in account {account!r}")


def _deleted(key: KeyRecord) -> KeyDeleted:
    when = iso(key.deleted_at) or "an earlier date"
    return KeyDeleted(
        f"key deleted: {_name(key)} was deleted on {when}; data encrypted under it can no "
        "longer be decrypted", target=key.key_id,
    )


# --------------------------------------------------------------------------- the service


class KmsService:
    """Customer master keys of every account, on one token and one registry."""

    def __init__(
        self,
        store: KmsStore,
        crypto: CryptoCore | CryptoProvider,
        *,
        quota: int = 100,
        clock: Callable[[], datetime] = utcnow,
        actor: str = "local",
        cache_ttl: float = DEFAULT_CACHE_TTL,
        audit_flush_interval: float = DEFAULT_AUDIT_FLUSH_INTERVAL,
    ) -> None:
        self.store = store
        self.quota = quota
        self.clock = clock
        self.actor = actor
        self.cache_ttl = cache_ttl
        self.audit_flush_interval = audit_flush_interval
        if isinstance(crypto, CryptoCore):
            self._crypto: CryptoCore | None = crypto
            self._provider: CryptoProvider | None = None
        else:
            self._crypto, self._provider = None, crypto
        self._crypto_lock = asyncio.Lock()
        self._cache: dict[tuple[str, str], tuple[float, KeyRecord]] = {}
        self._pending: list[AuditEvent] = []
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.TimerHandle | None = None
        self._flush_tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def close(self) -> None:
        """Write the buffered audit entries. Does not close the store or the core."""
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._flush_tasks:
            await asyncio.gather(*self._flush_tasks, return_exceptions=True)
        await self.flush_audit()

    # ------------------------------------------------------------------ key management

    async def create_key(
        self, alias: str, spec: KeySpec | str = KeySpec.AES_256, usage: str | None = None,
        description: str = "", *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
    ) -> KeyMetadata:
        """A new custom key, generated in the token (never extractable)."""
        async with self._audit("create_key", account, actor, None) as op:
            account = check_account(account)
            alias = check_custom_alias(alias)
            key_spec = check_spec(spec)
            key_usage = check_usage(key_spec, usage)
            description = check_description(description)
            op.detail = {"alias": alias, "spec": key_spec.value, "usage": key_usage.value}
            # Checked before the (possibly slow) generation, and again atomically
            # with the insert, so that nothing is generated for a refused request.
            if await self.store.find_alias(account, alias) is not None:
                raise AliasExists(f"the alias {alias!r} is already used in account {account!r}")
            if await self.store.count_custom_keys(account) >= self.quota:
                raise self._quota_error(account)
            key = await self._generate(account, alias, key_spec, key_usage, description,
                                       default=False, op=op, actor=actor)
            return KeyMetadata.of(key)

    async def describe_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> KeyMetadata:
        async with self._audit("describe_key", account, actor, key) as op:
            record = await self._lookup(key, check_account(account), create_default=True)
            op.key_id = record.key_id
            return KeyMetadata.of(record)

    async def list_keys(
        self, *, state: str | None = None, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None,
    ) -> list[KeyMetadata]:
        async with self._audit("list_keys", account, actor, None) as op:
            account = check_account(account)
            if state is not None and (state not in KeyState.__members__.values()
                                      or state == KeyState.DELETED):
                choices = ", ".join(s.value for s in KeyState if s is not KeyState.DELETED)
                raise InvalidInput(f"invalid key state {state!r}; choose one of {choices}",
                                   code="invalid_key_state")
            keys = await self.store.list_keys(account, state)
            op.detail = {"count": len(keys)}
            return [KeyMetadata.of(k) for k in keys]

    async def enable_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> KeyChange:
        return await self._transition(
            "enable_key", key, account, actor,
            allowed={KeyState.DISABLED}, done={KeyState.ENABLED}, target=KeyState.ENABLED,
            protect_default=False,
        )

    async def disable_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> KeyChange:
        return await self._transition(
            "disable_key", key, account, actor,
            allowed={KeyState.ENABLED}, done={KeyState.DISABLED}, target=KeyState.DISABLED,
            protect_default=True,
        )

    async def schedule_key_deletion(
        self, key: str, pending_days: int, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, now: datetime | None = None,
    ) -> KeyChange:
        """Pending deletion for 7..1096 days; a key already pending is left as it is."""
        return await self._transition(
            "schedule_key_deletion", key, account, actor,
            allowed={KeyState.ENABLED, KeyState.DISABLED, KeyState.PENDING_IMPORT},
            done={KeyState.PENDING_DELETION}, target=KeyState.PENDING_DELETION,
            protect_default=True, pending_days=pending_days, now=now,
        )

    async def cancel_key_deletion(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        now: datetime | None = None,
    ) -> KeyChange:
        """Back to *disabled* (the hosted service's rule); other states are left alone."""
        return await self._transition(
            "cancel_key_deletion", key, account, actor,
            allowed={KeyState.PENDING_DELETION},
            done={KeyState.ENABLED, KeyState.DISABLED, KeyState.PENDING_IMPORT},
            target=KeyState.DISABLED, protect_default=True, now=now,
        )

    async def delete_due_keys(
        self, now: datetime | None = None, *, actor: str | None = None
    ) -> DeletionReport:
        """Delete every key whose pending period is over; safe to run any number of times.

        Marking the key deleted comes first (guarded: a cancellation that wins
        the race keeps the key), destroying its token objects second; a run
        that stopped in between is finished by the next one.
        """
        now = now or self.clock()
        who = actor or self.actor
        deleted: list[str] = []
        await self.flush_audit()
        for key in await self.store.due_for_deletion(now):
            event = AuditEvent(now, key.account, who, "delete_key", key.key_id, "success",
                               {"scheduled_deletion_date": iso(key.scheduled_deletion_date)})
            marked = await self.store.change_state(
                key.key_id, [KeyState.PENDING_DELETION.value], KeyState.DELETED.value, now, event,
                scheduled_deletion_date=key.scheduled_deletion_date, deleted_at=now,
                due_by=now,
            )
            if marked is not None:
                deleted.append(key.key_id)
                log.info("key deleted", key_id=key.key_id, account=key.account)
        self._cache.clear()
        destroyed = 0
        for key in await self.store.deleted_with_material():
            destroyed += await self._destroy_material(key, now, who)
        return DeletionReport(deleted, destroyed)

    async def _destroy_material(self, key: KeyRecord, now: datetime, actor: str) -> int:
        count = 0
        for version in await self.store.versions(key.key_id):
            if version.destroyed_at is not None:
                continue
            try:
                core = await self._core()
                await core.destroy_key(version.token_label)
            except DewError as exc:
                await self._record(AuditEvent(
                    now, key.account, actor, "destroy_key_material", key.key_id, "failure",
                    {"version": version.version, "code": exc.code}))
                raise
            # Two runs at once (cron and a job) both get here; one records it.
            if await self.store.mark_version_destroyed(key.key_id, version.version, now):
                await self._record(AuditEvent(
                    now, key.account, actor, "destroy_key_material", key.key_id, "success",
                    {"version": version.version}))
                count += 1
        return count

    # ------------------------------------------------------------------ data keys

    async def create_datakey(
        self, key: str, length_bits: int = 256, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> DataKeyResult:
        """A fresh data key: plaintext (use it, forget it) and cipher text (store it)."""
        return await self._new_datakey("create_datakey", key, length_bits, account, actor,
                                       encryption_context, keep_plaintext=True)

    async def create_datakey_without_plaintext(
        self, key: str, length_bits: int = 256, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> DataKeyResult:
        return await self._new_datakey("create_datakey_without_plaintext", key, length_bits,
                                       account, actor, encryption_context, keep_plaintext=False)

    async def _new_datakey(
        self, operation: str, key: str, length_bits: int, account: str, actor: str | None,
        context: dict[str, str] | None, *, keep_plaintext: bool,
    ) -> DataKeyResult:
        async with self._audit(operation, account, actor, key) as op:
            account = check_account(account)
            bits = check_length_bits(length_bits)
            ctx = check_context(context)
            record = await self._usable(key, account)
            op.key_id, op.detail = record.key_id, {"length_bits": bits}
            header = CipherHeader(record.key_id, record.current_version, bits // 8,
                                  Purpose.DATA_KEY, context_digest(ctx))
            core = await self._core()
            label = token_label(record.key_id, record.current_version)
            dek = await self._in_token(record, core.generate_data_key(
                label, bits // 8, header.aad(ctx)))
            iv, body = unpack_sealed(dek.wrapped)
            blob = pack_ciphertext(header, iv, body)
            return DataKeyResult(record.key_id, dek.plaintext if keep_plaintext else None, blob)

    async def encrypt_datakey(
        self, key: str, plain_text: bytes, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> DataKeyResult:
        """Encrypt a caller's data key (16..64 bytes) under ``key``."""
        async with self._audit("encrypt_datakey", account, actor, key) as op:
            account = check_account(account)
            low, high = DATA_KEY_BYTES
            if not isinstance(plain_text, bytes | bytearray) or not low <= len(plain_text) <= high:
                raise InvalidInput(f"a data key must be {low}..{high} bytes "
                                   f"({low * 8}..{high * 8} bits)", code="invalid_datakey")
            ctx = check_context(encryption_context)
            record = await self._usable(key, account)
            op.key_id, op.detail = record.key_id, {"length_bits": len(plain_text) * 8}
            blob = await self._encrypt(record, bytes(plain_text), Purpose.DATA_KEY, ctx)
            return DataKeyResult(record.key_id, None, blob)

    async def decrypt_datakey(
        self, key: str, cipher_text: bytes, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> DataKeyResult:
        """The plaintext of a data key made by create-datakey / encrypt-datakey under ``key``."""
        async with self._audit("decrypt_datakey", account, actor, key) as op:
            account = check_account(account)
            ctx = check_context(encryption_context)
            header, iv, body = unpack_ciphertext(bytes(cipher_text), Purpose.DATA_KEY)
            record = await self._usable(key, account)
            op.key_id = record.key_id
            if header.key_id != record.key_id:
                raise InvalidInput(
                    f"this data key was not encrypted under {_name(record)}",
                    code="key_mismatch",
                    fix="Pass the key the data key was created with (decrypt-data needs none).",
                )
            plain = await self._decrypt(record, header, iv, body, ctx)
            return DataKeyResult(record.key_id, plain, bytes(cipher_text))

    # ------------------------------------------------------------------ encrypt-data

    async def encrypt_data(
        self, key: str, plain_text: bytes, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> EncryptResult:
        """Encrypt up to 4096 bytes directly under a CMK (self-describing ciphertext)."""
        async with self._audit("encrypt_data", account, actor, key) as op:
            account = check_account(account)
            data = check_plaintext(plain_text)
            ctx = check_context(encryption_context)
            record = await self._usable(key, account)
            op.key_id, op.detail = record.key_id, {"bytes": len(data)}
            blob = await self._encrypt(record, data, Purpose.DATA, ctx)
            return EncryptResult(record.key_id, blob)

    async def decrypt_data(
        self, cipher_text: bytes | str, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> DecryptResult:
        """Decrypt encrypt-data output (bytes, or its Base64); the key comes from inside it."""
        async with self._audit("decrypt_data", account, actor, None) as op:
            account = check_account(account)
            ctx = check_context(encryption_context)
            blob = (decode_base64("cipher_text", cipher_text) if isinstance(cipher_text, str)
                    else bytes(cipher_text))
            if len(blob) > ciphertext_size(MAX_DATA_BYTES):
                raise InvalidInput("the ciphertext is longer than any encrypt-data output",
                                   code="invalid_ciphertext")
            header, iv, body = unpack_ciphertext(blob, Purpose.DATA)
            op.key_id = header.key_id
            record = await self._usable(header.key_id, account)
            plain = await self._decrypt(record, header, iv, body, ctx)
            op.detail = {"bytes": len(plain)}
            return DecryptResult(record.key_id, plain)

    async def gen_random(
        self, n: int, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> bytes:
        """``n`` (1..1024) random bytes from the token's RNG."""
        async with self._audit("gen_random", account, actor, None) as op:
            check_account(account)
            n = check_random_bytes(n)
            op.detail = {"bytes": n}
            core = await self._core()
            return await core.random_bytes(n)

    # ------------------------------------------------------------------ audit

    async def audit_list(
        self, key: str | None = None, *, account: str | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        """Audit entries, oldest first (the newest ``limit``); ``key`` is an id or an alias."""
        if not 1 <= limit <= 100_000:
            raise InvalidInput(f"limit must be between 1 and 100000, got {limit}")
        if account is not None:
            check_account(account)
        key_id = None
        if key is not None:
            ref = check_key_ref(key)
            if is_key_id(ref):
                key_id = ref
            else:
                found = await self.store.find_alias(account or DEFAULT_ACCOUNT, ref)
                found = found or await self.store.find_deleted_alias(
                    account or DEFAULT_ACCOUNT, ref)
                if found is None:
                    raise _not_found(ref, account or DEFAULT_ACCOUNT)
                key_id = found.key_id
        await self.flush_audit()
        return await self.store.list_audit(key_id=key_id, account=account, limit=limit)

    async def audit_verify(self) -> AuditVerdict:
        await self.flush_audit()
        return await self.store.verify_audit()

    async def flush_audit(self) -> None:
        """Append the buffered use entries now (one transaction)."""
        async with self._flush_lock:
            events, self._pending = self._pending, []
            if not events:
                return
            try:
                await self.store.append_audit(events)
            except DewError:
                # Keep them (in order) for the next flush rather than lose them.
                self._pending[:0] = events
                raise

    # ------------------------------------------------------------------ internals

    @asynccontextmanager
    async def _audit(
        self, operation: str, account: str, actor: str | None, key_ref: str | None
    ) -> AsyncIterator[_Op]:
        op = _Op(key_id=_short(key_ref))
        try:
            yield op
        except DewError as exc:
            op.detail = {**op.detail, "code": exc.code}
            if exc.target is not None and is_key_id(exc.target):
                op.key_id = exc.target  # refused after the key was found: name it by id
            await self._record(self._event(operation, account, actor, op, "failure"))
            raise
        if not op.recorded:
            await self._record(self._event(operation, account, actor, op, op.outcome))

    def _event(
        self, operation: str, account: str, actor: str | None, op: _Op, outcome: str
    ) -> AuditEvent:
        return AuditEvent(self.clock(), _short(account) or "", actor or self.actor, operation,
                          op.key_id, outcome, op.detail)

    async def _record(self, event: AuditEvent) -> None:
        self._pending.append(event)
        if self.audit_flush_interval <= 0 or self._closed or len(self._pending) >= AUDIT_BATCH:
            await self.flush_audit()
        elif self._flusher is None:
            loop = asyncio.get_running_loop()
            self._flusher = loop.call_later(self.audit_flush_interval, self._flush_later)

    def _flush_later(self) -> None:
        self._flusher = None
        task = asyncio.get_running_loop().create_task(self._flush_quietly())
        self._flush_tasks.add(task)
        task.add_done_callback(self._flush_tasks.discard)

    async def _flush_quietly(self) -> None:
        try:
            await self.flush_audit()
        except DewError as exc:
            # The entries stay buffered; the next flush (or close) retries them.
            log.warning("audit entries not written yet", pending=len(self._pending),
                        error=exc.message)

    async def _core(self) -> CryptoCore:
        if self._crypto is None:
            async with self._crypto_lock:
                if self._crypto is None:
                    assert self._provider is not None
                    self._crypto = await self._provider()
        return self._crypto

    async def _lookup(self, ref: str, account: str, *, create_default: bool) -> KeyRecord:
        """The live key ``ref`` (id or alias) of ``account``; never another account's."""
        ref = check_key_ref(ref)
        if is_key_id(ref):
            key = await self.store.get_key(ref)
            if key is None or key.account != account:
                raise _not_found(ref, account)
        else:
            key = await self.store.find_alias(account, ref)
            if key is None:
                gone = await self.store.find_deleted_alias(account, ref)
                if gone is not None:
                    raise _deleted(gone)
                service = default_service(ref)
                if service is None or not create_default:
                    raise _not_found(ref, account)
                return await self._create_default(service, account)
        if key.state == KeyState.DELETED:
            raise _deleted(key)
        return key

    async def _create_default(self, service: str, account: str) -> KeyRecord:
        alias = f"{service}/default"
        op = _Op(key_id=None, detail={"alias": alias, "spec": KeySpec.AES_256.value,
                                      "default_key": True})
        try:
            return await self._generate(account, alias, KeySpec.AES_256,
                                        KeyUsage.ENCRYPT_DECRYPT,
                                        f"Default key of service {service}", default=True,
                                        op=op, actor=None)
        except AliasExists:
            # Another request (maybe another process) created it first: use that one.
            existing = await self.store.find_alias(account, alias)
            if existing is None:
                raise
            return existing

    async def _generate(
        self, account: str, alias: str, spec: KeySpec, usage: KeyUsage, description: str,
        *, default: bool, op: _Op, actor: str | None,
    ) -> KeyRecord:
        key_id = str(uuid.uuid4())
        label = token_label(key_id, 1)
        now = self.clock()
        core = await self._core()
        await core.generate_key(spec, label, f"{key_id}:v1".encode())
        key = KeyRecord(
            key_id=key_id, account=account, alias=alias, spec=spec.value, usage=usage.value,
            state=KeyState.ENABLED.value, origin="kms", default_key=default,
            description=description,
            created_at=now, updated_at=now, scheduled_deletion_date=None, deleted_at=None,
            current_version=1,
        )
        op.key_id = key_id
        event = AuditEvent(now, account, actor or self.actor,
                           "create_default_key" if default else "create_key", key_id,
                           "success", op.detail)
        await self.flush_audit()
        try:
            outcome = await self.store.create_key(
                key, KeyVersion(key_id, 1, label, now), event, None if default else self.quota)
        except BaseException:
            await self._discard(core, label)
            raise
        if outcome != "created":
            await self._discard(core, label)
            if outcome == "alias_taken":
                raise AliasExists(f"the alias {alias!r} is already used in account {account!r}")
            raise self._quota_error(account)
        op.recorded = True  # the creation's entry went in with the insert
        log.info("key created", key_id=key_id, account=account, spec=spec.value,
                 default_key=default)
        return key

    @staticmethod
    async def _discard(core: CryptoCore, label: str) -> None:
        try:
            await core.destroy_key(label)
        except DewError as exc:
            # An orphan token object is unusable (no registry row points at it).
            log.warning("could not destroy an unregistered token key", label=label,
                        error=exc.message)

    def _quota_error(self, account: str) -> QuotaExceeded:
        return QuotaExceeded(
            f"account {account!r} already has {self.quota} custom keys, its quota "
            "(enabled, disabled and pending deletion count; default keys do not)",
        )

    async def _transition(
        self, operation: str, ref: str, account: str, actor: str | None, *,
        allowed: set[KeyState], done: set[KeyState], target: KeyState, protect_default: bool,
        pending_days: int | None = None, now: datetime | None = None,
    ) -> KeyChange:
        async with self._audit(operation, account, actor, ref) as op:
            account = check_account(account)
            ref = check_key_ref(ref)
            if operation == "schedule_key_deletion":
                op.detail = {"pending_days": check_pending_days(pending_days)}
            if protect_default and default_service(ref) is not None:
                raise self._default_protected(ref, operation)
            for _ in range(5):  # a concurrent change makes the guarded update miss: re-read
                key = await self._lookup(ref, account, create_default=False)
                op.key_id = key.key_id
                if protect_default and key.default_key:
                    raise self._default_protected(key.alias, operation)
                if key.state in done:
                    op.outcome = "unchanged"
                    return KeyChange(KeyMetadata.of(key), False)
                if key.state not in allowed:
                    raise self._state_refusal(key, operation)
                when = now or self.clock()
                date = (when + timedelta(days=pending_days)
                        if target == KeyState.PENDING_DELETION and pending_days else None)
                event = AuditEvent(when, account, actor or self.actor, operation, key.key_id,
                                   "success", {**op.detail, "from": key.state,
                                               "to": target.value,
                                               **({"scheduled_deletion_date": iso(date)}
                                                  if date else {})})
                await self.flush_audit()
                changed = await self.store.change_state(
                    key.key_id, [key.state], target.value, when, event,
                    scheduled_deletion_date=date)
                if changed is not None:
                    op.recorded = True
                    self._cache.clear()
                    log.info("key state changed", key_id=key.key_id, operation=operation,
                             state=target)
                    return KeyChange(KeyMetadata.of(changed), True)
            raise Conflict(f"the key {ref!r} keeps changing; try again",
                           code="key_state_contended")

    @staticmethod
    def _default_protected(alias: str, operation: str) -> DefaultKeyProtected:
        what = operation.replace("_key", "").replace("_", " ")
        return DefaultKeyProtected(
            f"{alias!r} is a default key: it cannot be disabled or scheduled for deletion "
            f"({what} refused)",
        )

    @staticmethod
    def _state_refusal(key: KeyRecord, operation: str) -> KeyStateError:
        state = key.state.replace("_", " ")
        if operation == "enable_key" and key.state == KeyState.PENDING_DELETION:
            fix = "Cancel the deletion first (dew kms cancel-key-deletion), then enable it."
        elif operation == "disable_key" and key.state == KeyState.PENDING_DELETION:
            fix = "A key pending deletion cannot be used already; nothing to disable."
        else:
            fix = "Check the key's state with dew kms describe-key."
        verb = operation.replace("_key", "").replace("_", " ")
        return KeyStateError(f"cannot {verb} {_name(key)}: it is {state}", fix=fix,
                             target=key.key_id)

    async def _usable(self, ref: str, account: str) -> KeyRecord:
        """An enabled AES key to use; metadata cached for ``cache_ttl`` seconds."""
        cache_key = (account, ref)
        hit = self._cache.get(cache_key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            key = hit[1]
        else:
            key = await self._lookup(ref, account, create_default=True)
            if self.cache_ttl > 0:
                if len(self._cache) >= CACHE_MAX:
                    self._cache.clear()
                self._cache[cache_key] = (now + self.cache_ttl, key)
        if key.state != KeyState.ENABLED:
            state = key.state.replace("_", " ")
            if key.state == KeyState.PENDING_DELETION:
                when = iso(key.scheduled_deletion_date)
                raise KeyStateError(
                    f"key {_name(key)} is pending deletion (on {when}): only an enabled key "
                    "can be used",
                    fix="Cancel the deletion (dew kms cancel-key-deletion), then enable the key.",
                    target=key.key_id,
                )
            raise KeyStateError(
                f"key {_name(key)} is {state}: only an enabled key can be used",
                fix="Enable it with dew kms enable-key." if key.state == KeyState.DISABLED
                else "Finish the key's set-up first.",
                target=key.key_id,
            )
        if key.spec != KeySpec.AES_256 or key.usage != KeyUsage.ENCRYPT_DECRYPT:
            raise KeyUsageError(
                f"key {_name(key)} is a {key.spec} key for {key.usage}; data keys and "
                "encrypt-data need an AES_256 ENCRYPT_DECRYPT key",
                target=key.key_id,
            )
        return key

    async def _in_token(self, key: KeyRecord, call: Awaitable[T]) -> T:
        """Await a token call on ``key``; a vanished key object is explained from the registry."""
        try:
            return await call
        except KeyNotFound:
            self._cache.clear()
            fresh = await self.store.get_key(key.key_id)
            if fresh is not None and fresh.state == KeyState.DELETED:
                raise _deleted(fresh) from None
            raise ConfigError(
                f"the HSM has no material for key {_name(key)}",
                cause="the key registry and the token disagree",
                fix="Check that hsm.token_label / DEW_STATE_DIR name the token these keys "
                "were created in.",
                code="hsm_key_material_missing",
            ) from None

    async def _encrypt(
        self, key: KeyRecord, data: bytes, purpose: Purpose, ctx: dict[str, str]
    ) -> bytes:
        header = CipherHeader(key.key_id, key.current_version, len(data), purpose,
                              context_digest(ctx))
        core = await self._core()
        sealed = await self._in_token(key, core.seal(
            token_label(key.key_id, key.current_version), pad(data), header.aad(ctx)))
        return pack_ciphertext(header, sealed.iv, sealed.ciphertext)

    async def _decrypt(
        self, key: KeyRecord, header: CipherHeader, iv: bytes, body: bytes, ctx: dict[str, str]
    ) -> bytes:
        if not 1 <= header.key_version <= key.current_version:
            raise InvalidInput(f"the ciphertext names version {header.key_version} of "
                               f"{_name(key)}, which does not exist", code="invalid_ciphertext")
        if context_digest(ctx) != header.context:
            raise InvalidInput(
                "the encryption context differs from the one used at encryption",
                code="encryption_context_mismatch",
                fix="Pass exactly the encryption context given when the data was encrypted.",
            )
        core = await self._core()
        padded = await self._in_token(key, core.open(
            token_label(key.key_id, header.key_version), iv, body, header.aad(ctx)))
        return unpad(header, padded)


def _short(text: str | None, limit: int = 255) -> str | None:
    """Audit fields hold what the caller sent, bounded (it may be garbage)."""
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "…"


# --------------------------------------------------------------------------- wiring


def default_actor(kind: str) -> str:
    """Who did it, for the audit log: ``cli:alice@host`` or ``worker:host:pid``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    if kind == "worker":
        return f"worker:{socket.gethostname()}:{os.getpid()}"
    return f"{kind}:{user}@{socket.gethostname()}"


async def connect_crypto(settings: Settings) -> CryptoCore:
    """A connected crypto core for ``settings``, initialising the token if there is none."""
    await asyncio.to_thread(ensure_token, settings)
    core = CryptoCore(hsm_config_from_settings(settings))
    await core.connect()
    return core


@resource("crypto")
async def _crypto_resource(resources: Resources) -> tuple[CryptoCore, Closer]:
    core = await connect_crypto(resources.settings)
    return core, core.close


@resource("kms_store")
async def _kms_store_resource(resources: Resources) -> tuple[SqliteKmsStore, Closer]:
    store = await SqliteKmsStore.open(resources.settings.db_path)
    return store, store.close


@resource("kms")
async def _kms_resource(resources: Resources) -> tuple[KmsService, Closer]:
    store = await resources.get("kms_store")

    async def crypto() -> CryptoCore:
        # The HSM is opened on the first key use, not when a cron tick finds nothing due.
        core: CryptoCore = await resources.get("crypto")
        return core

    service = KmsService(store, crypto, quota=resources.settings.kms.quota,
                         actor=default_actor("worker"))
    return service, service.close


@asynccontextmanager
async def open_kms(
    settings: Settings, *, actor: str | None = None, **options: Any
) -> AsyncIterator[KmsService]:
    """A KMS service for one command or script; everything is closed on exit.

    The HSM is connected (and the token initialised if missing) only when an
    operation needs it, so ``describe-key`` or ``audit list`` do not touch it.
    """
    async with AsyncExitStack() as stack:
        store = await SqliteKmsStore.open(settings.db_path)
        stack.push_async_callback(store.close)
        cores: list[CryptoCore] = []

        async def crypto() -> CryptoCore:
            core = await connect_crypto(settings)
            cores.append(core)
            return core

        async def close_cores() -> None:
            for core in cores:
                await core.close()

        stack.push_async_callback(close_cores)
        service = KmsService(store, crypto, quota=settings.kms.quota,
                             actor=actor or default_actor("cli"), **options)
        stack.push_async_callback(service.close)
        yield service


# --------------------------------------------------------------------------- jobs


def _only(args: dict[str, Any], allowed: Iterable[str], job: str) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise InvalidInput(f"{job} does not take {', '.join(map(repr, unknown))}")


def _check_key_job(args: dict[str, Any], job: str, extra: tuple[str, ...] = ()) -> None:
    _only(args, ("key", "account", *extra), job)
    key = check_key_ref(args.get("key"))
    check_account(args.get("account", DEFAULT_ACCOUNT))
    if default_service(key) is not None:
        raise DefaultKeyProtected(
            f"{key!r} is a default key: it cannot be disabled or scheduled for deletion"
        )


def check_schedule_args(args: dict[str, Any]) -> None:
    _check_key_job(args, "kms.schedule_key_deletion", ("pending_days",))
    check_pending_days(args.get("pending_days"))


def check_cancel_args(args: dict[str, Any]) -> None:
    _check_key_job(args, "kms.cancel_key_deletion")


def check_delete_due_args(args: dict[str, Any]) -> None:
    _only(args, (), "kms.delete_due_keys")


def _job_actor(ctx: JobContext) -> str:
    return f"job:{ctx.name}:{ctx.task_id}"


@JOBS.job("kms.schedule_key_deletion", validate=check_schedule_args)
async def schedule_key_deletion_job(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    """Schedule a key's deletion in 7..1096 days (state pending_deletion)."""
    kms: KmsService = await ctx.resources.get("kms")
    change = await kms.schedule_key_deletion(
        args["key"], args["pending_days"], account=args.get("account", DEFAULT_ACCOUNT),
        actor=_job_actor(ctx), now=ctx.now(),
    )
    return change.to_json()


@JOBS.job("kms.cancel_key_deletion", validate=check_cancel_args)
async def cancel_key_deletion_job(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    """Cancel a scheduled key deletion (the key comes back disabled)."""
    kms: KmsService = await ctx.resources.get("kms")
    change = await kms.cancel_key_deletion(
        args["key"], account=args.get("account", DEFAULT_ACCOUNT), actor=_job_actor(ctx),
        now=ctx.now(),
    )
    return change.to_json()


@JOBS.job("kms.delete_due_keys", validate=check_delete_due_args)
async def delete_due_keys_job(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    """Destroy the keys whose pending deletion period is over."""
    return await delete_due_keys(ctx.resources, ctx.now(), actor=_job_actor(ctx))


async def delete_due_keys(
    resources: Resources, now: datetime | None = None, *, actor: str | None = None
) -> dict[str, Any]:
    """What the job and the cron entry run: cheap when nothing is due (no HSM)."""
    store: KmsStore = await resources.get("kms_store")
    if not await store.has_deletion_work(now or utcnow()):
        return DeletionReport([], 0).to_json()
    kms: KmsService = await resources.get("kms")
    report = await kms.delete_due_keys(now, actor=actor)
    return report.to_json()
