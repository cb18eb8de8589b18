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
import contextlib
import getpass
import hmac
import os
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_der_public_key

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
from engine.crypto.errors import KeyExists
from engine.crypto.model import KeyFamily
from engine.errors import (
    ConfigError,
    Conflict,
    DewError,
    InvalidInput,
    NotFound,
    TransientError,
)
from engine.kms_store import (
    AuditEntry,
    AuditEvent,
    AuditVerdict,
    ImportToken,
    KeyRecord,
    KeyVersion,
    KmsStore,
    RotationRecord,
    SqliteKmsStore,
    WrappedKey,
)
from engine.logs import get_logger
from engine.models import iso, utcnow
from engine.registry import JOBS
from engine.resources import Closer, Resources, resource
from engine.settings import Settings
from handlers.kms_asym import (
    ECDSA_CURVE,
    ENCRYPTION,
    MAC,
    MAX_SIGNATURE_BYTES,
    SIGNING,
    SignRequest,
    check_encryption_algorithm,
    check_mac_algorithm,
    check_mac_message,
    check_sign_key,
    sign_request,
)
from handlers.kms_format import (
    DEFAULT_ACCOUNT,
    MAX_DATA_BYTES,
    ROTATION_DAYS_DEFAULT,
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
    check_origin,
    check_pending_days,
    check_plaintext,
    check_random_bytes,
    check_rotation_days,
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
from handlers.kms_import import (
    WRAPPING_ALGORITHMS,
    WRAPPING_KEY_BITS,
    check_algorithm_fits,
    check_wrapping_algorithm,
    public_fingerprint_input,
    secret_length,
    unwrap_private_key,
)
from handlers.kms_mldsa import CKM_ML_DSA, ml_dsa_generate, ml_dsa_sign, ml_dsa_verify

log = get_logger("dew.kms")
T = TypeVar("T")
CryptoProvider = Callable[[], Awaitable[CryptoCore]]

DEFAULT_CACHE_TTL = 1.0
DEFAULT_AUDIT_FLUSH_INTERVAL = 0.2
AUDIT_BATCH = 500
CACHE_MAX = 10_000
# How long a rotation may hold its key's lease; a crashed one blocks rotation that long.
ROTATION_LEASE = timedelta(minutes=5)
IMPORT_TOKEN_TTL = timedelta(hours=24)
# The HMAC key behind imported material's fingerprints (one per token, made on first use).
FINGERPRINT_LABEL = "kms:import-fingerprint"
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


class RotationUnsupported(Conflict):
    code = "rotation_unsupported"
    default_fix = "Only KMS-generated AES_256 keys rotate; create such a key for rotation."


class RotationInProgress(TransientError):
    code = "rotation_in_progress"
    default_fix = "Another rotation of this key is running; retry in a moment."


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
            "protection": protection(self.key_spec),
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
class SignResult:
    key_id: str
    signature: bytes
    signing_algorithm: str

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "signature": b64(self.signature),
                "signing_algorithm": self.signing_algorithm}


@dataclass(frozen=True)
class VerifyResult:
    key_id: str
    valid: bool
    algorithm: str
    what: str = "signature"  # or "mac"

    def to_json(self) -> dict[str, Any]:
        name = "signing_algorithm" if self.what == "signature" else "mac_algorithm"
        return {"key_id": self.key_id, f"{self.what}_valid": self.valid, name: self.algorithm}


@dataclass(frozen=True)
class MacResult:
    key_id: str
    mac: bytes
    mac_algorithm: str

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "mac": b64(self.mac), "mac_algorithm": self.mac_algorithm}


@dataclass(frozen=True)
class PublicKeyResult:
    key_id: str
    key_spec: str
    key_usage: str
    public_key_pem: str
    algorithms: list[str]

    def to_json(self) -> dict[str, Any]:
        name = ("encryption_algorithms" if self.key_usage == KeyUsage.ENCRYPT_DECRYPT
                else "signing_algorithms")
        return {"key_id": self.key_id, "key_spec": self.key_spec, "key_usage": self.key_usage,
                "public_key": self.public_key_pem, name: self.algorithms}


@dataclass(frozen=True)
class RotationStatus:
    """What get-key-rotation-status shows."""

    key_id: str
    enabled: bool
    interval_days: int | None
    last_rotation: datetime | None
    next_rotation: datetime | None
    rotations: int
    key_version: int

    @classmethod
    def of(cls, key: KeyRecord, rotation: RotationRecord | None) -> RotationStatus:
        if rotation is None:
            return cls(key.key_id, False, None, None, None, 0, key.current_version)
        return cls(key.key_id, rotation.enabled,
                   rotation.interval_days if rotation.enabled else None,
                   rotation.last_rotated_at, rotation.next_rotation_at if rotation.enabled
                   else None, rotation.rotations, key.current_version)

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "rotation_enabled": self.enabled,
                "rotation_interval_days": self.interval_days,
                "last_rotation": iso(self.last_rotation),
                "next_rotation": iso(self.next_rotation),
                "number_of_rotations": self.rotations, "key_version": self.key_version}


@dataclass(frozen=True)
class RotationChange:
    status: RotationStatus
    changed: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.status.to_json(), "changed": self.changed}


@dataclass(frozen=True)
class DeletionReport:
    deleted: list[str]
    versions_destroyed: int
    expired_material: list[str] = field(default_factory=list)  # imported, now pending import

    def to_json(self) -> dict[str, Any]:
        return {"deleted": self.deleted, "versions_destroyed": self.versions_destroyed,
                "expired_material": self.expired_material}


@dataclass(frozen=True)
class ImportParameters:
    key_id: str
    public_key_pem: str
    import_token: str
    expiration_time: datetime
    wrapping_algorithm: str

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "public_key": self.public_key_pem,
                "import_token": self.import_token,
                "expiration_time": iso(self.expiration_time),
                "wrapping_algorithm": self.wrapping_algorithm}


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
        origin: str = "kms",
    ) -> KeyMetadata:
        """A new custom key, generated in the token (never extractable); with
        ``origin="external"`` a key without material, pending import (BYOK)."""
        async with self._audit("create_key", account, actor, None) as op:
            account = check_account(account)
            alias = check_custom_alias(alias)
            key_spec = check_spec(spec)
            key_usage = check_usage(key_spec, usage)
            description = check_description(description)
            origin = check_origin(origin)
            if origin == "external" and key_spec.family is KeyFamily.MLDSA:
                raise InvalidInput("ML-DSA key material cannot be imported",
                                   code="invalid_origin")
            op.detail = {"alias": alias, "spec": key_spec.value, "usage": key_usage.value,
                         **({"origin": origin} if origin != "kms" else {})}
            # Checked before the (possibly slow) generation, and again atomically
            # with the insert, so that nothing is generated for a refused request.
            if await self.store.find_alias(account, alias) is not None:
                raise AliasExists(f"the alias {alias!r} is already used in account {account!r}")
            if await self.store.count_custom_keys(account) >= self.quota:
                raise self._quota_error(account)
            key = await self._generate(account, alias, key_spec, key_usage, description,
                                       default=False, op=op, actor=actor, origin=origin)
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
        expired = [key.key_id for key in await self.store.expired_material(now)
                   if await self._remove_imported(key, now, who, "material_expired")]
        for label in await self.store.expired_wrapping_labels(now):
            core = await self._core()
            await core.destroy_key(label)  # every import token using it has expired
        return DeletionReport(deleted, destroyed, expired)

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
        key: str | None = None, encryption_algorithm: str | None = None,
    ) -> DecryptResult:
        """Decrypt encrypt-data output (bytes, or its Base64); the key comes from inside it.

        With an ``encryption_algorithm`` (``RSAES_OAEP_SHA_256`` / ``_SHA_1``) the
        ciphertext is a raw RSA-OAEP ciphertext made offline with the public key of
        ``key``, an RSA ENCRYPT_DECRYPT key; it is decrypted in the token.
        """
        if encryption_algorithm not in (None, "SYMMETRIC_DEFAULT"):
            return await self._rsa_decrypt(cipher_text, key, encryption_algorithm, account,
                                           actor, encryption_context)
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

    # ------------------------------------------------------------------ importing material

    async def get_parameters_for_import(
        self, key: str, wrapping_algorithm: str = "RSAES_OAEP_SHA_256", *,
        account: str = DEFAULT_ACCOUNT, actor: str | None = None, now: datetime | None = None,
    ) -> ImportParameters:
        """A wrapping public key (RSA 4096, in the token) and an import token, both
        valid 24 hours. The account's wrapping key is reused for a day (generating
        one takes seconds); each call gets its own token."""
        async with self._audit("get_parameters_for_import", account, actor, key) as op:
            account = check_account(account)
            algorithm = check_wrapping_algorithm(wrapping_algorithm)
            record = await self._importable(key, account, op)
            check_algorithm_fits(algorithm, KeySpec(record.spec))
            when = now or self.clock()
            core = await self._core()
            label = await self.store.current_wrapping_label(account, when - IMPORT_TOKEN_TTL)
            if label is None or not await core.key_exists(label):
                label = f"kms-import:{account}:{uuid.uuid4()}"
                await core.generate_wrapping_key(label, WRAPPING_KEY_BITS)
            der = await core.public_key_spki_der(label)
            pem = serialization.load_der_public_key(der).public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            token = ImportToken(secrets.token_urlsafe(32), record.key_id, account, algorithm,
                                label, when, when + IMPORT_TOKEN_TTL)
            op.detail = {"wrapping_algorithm": algorithm, "expiration_time": iso(token.expires_at)}
            await self.flush_audit()
            await self.store.add_import_token(token, AuditEvent(
                when, account, actor or self.actor, "get_parameters_for_import",
                record.key_id, "success", op.detail))
            op.recorded = True
            return ImportParameters(record.key_id, pem.decode("ascii"), token.token,
                                    token.expires_at, algorithm)

    async def import_key_material(
        self, key: str, import_token: str, encrypted_key_material: bytes | str, *,
        expiration_time: datetime | None = None, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, now: datetime | None = None,
    ) -> KeyMetadata:
        """Unwrap material made with :func:`handlers.kms_import.wrap_key_material` into
        the token (sensitive, not extractable); the key becomes enabled."""
        async with self._audit("import_key_material", account, actor, key) as op:
            account = check_account(account)
            blob = (decode_base64("encrypted_key_material", encrypted_key_material)
                    if isinstance(encrypted_key_material, str) else bytes(encrypted_key_material))
            record = await self._importable(key, account, op)
            when = now or self.clock()
            token = await self.store.get_import_token(str(import_token))
            if token is None or token.key_id != record.key_id or token.account != account:
                raise InvalidInput(f"the import token is not one issued for {_name(record)}",
                                   code="invalid_import_token",
                                   fix="Use the token from get-parameters-for-import of this key.")
            if when >= token.expires_at:
                raise InvalidInput(
                    f"the import token expired on {iso(token.expires_at)}",
                    code="import_token_expired",
                    fix="Get new import parameters and wrap the material again.")
            if expiration_time is not None and expiration_time.tzinfo is None:
                raise InvalidInput("the expiration time needs a time zone",
                                   code="invalid_expiration_time")
            if expiration_time is not None and expiration_time <= when:
                raise InvalidInput("the expiration time is in the past",
                                   code="invalid_expiration_time")
            spec = KeySpec(record.spec)
            check_algorithm_fits(token.algorithm, spec)
            op.detail = {"wrapping_algorithm": token.algorithm,
                         "expiration_time": iso(expiration_time)}
            core = await self._core()
            hash_name = WRAPPING_ALGORITHMS[token.algorithm]
            label = token_label(record.key_id, 1)
            key_id_attr = f"{record.key_id}:v1".encode()
            if spec.is_asymmetric:
                k = WRAPPING_KEY_BITS // 8
                aes_key = await core.rsa_oaep_decrypt(token.wrapping_label, blob[:k], hash_name)
                private = unwrap_private_key(aes_key, blob[k:], spec)
                fingerprint = await self._fingerprint(spec, public_fingerprint_input(private))
                await self._check_same_material(record, fingerprint)
                def create() -> Awaitable[Any]:
                    return core.import_key_pair(spec, label, key_id_attr, private)
            else:
                material = await core.rsa_oaep_decrypt(token.wrapping_label, blob, hash_name)
                if len(material) != secret_length(spec):
                    raise InvalidInput(f"{spec.value} material is {secret_length(spec)} bytes, "
                                       f"got {len(material)}", code="invalid_key_material")
                fingerprint = await self._fingerprint(spec, material)
                await self._check_same_material(record, fingerprint)
                def create() -> Awaitable[Any]:
                    return core.import_secret_key(spec, label, key_id_attr, material)
            # No registered material (pending import): an object there is an orphan of an
            # earlier attempt or of a deletion that did not finish. Replace it.
            await core.destroy_key(label)
            await create()
            event = AuditEvent(when, account, actor or self.actor, "import_key_material",
                               record.key_id, "success", op.detail)
            await self.flush_audit()
            done = await self.store.finish_import(record.key_id, fingerprint, expiration_time,
                                                  when, event)
            if done is None:
                await self._discard(core, label)
                raise KeyStateError(f"key {_name(record)} changed during the import; retry",
                                    target=record.key_id)
            op.recorded = True
            self._cache.clear()
            return KeyMetadata.of(done)

    async def delete_imported_key_material(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        now: datetime | None = None,
    ) -> KeyChange:
        """Destroy imported material; the key waits for the same material again."""
        async with self._audit("delete_imported_key_material", account, actor, key) as op:
            record = await self._lookup(key, check_account(account), create_default=False)
            op.key_id = record.key_id
            if record.origin != "external":
                raise KeyStateError(f"key {_name(record)} was generated by KMS: it has no "
                                    "imported material", target=record.key_id,
                                    fix="Schedule its deletion instead.")
            if record.state == KeyState.PENDING_IMPORT:
                op.outcome = "unchanged"
                return KeyChange(KeyMetadata.of(record), False)
            changed = await self._remove_imported(record, now or self.clock(),
                                                  actor or self.actor,
                                                  "delete_imported_key_material")
            if not changed:
                raise self._state_refusal(record, "delete_imported_key_material")
            op.recorded = True
            fresh = await self.store.get_key(record.key_id)
            return KeyChange(KeyMetadata.of(fresh or record), True)

    async def _remove_imported(
        self, key: KeyRecord, now: datetime, actor: str, operation: str
    ) -> bool:
        """enabled/disabled -> pending_import (audited), then destroy the token objects."""
        event = AuditEvent(now, key.account, actor, operation, key.key_id, "success",
                           {"from": key.state, "to": KeyState.PENDING_IMPORT.value})
        await self.flush_audit()
        changed = await self.store.change_state(
            key.key_id, [KeyState.ENABLED.value, KeyState.DISABLED.value],
            KeyState.PENDING_IMPORT.value, now, event)
        if changed is None:
            return False
        self._cache.clear()
        core = await self._core()
        # If this fails, the orphan object is replaced by the next import.
        await core.destroy_key(token_label(key.key_id, 1))
        log.info("imported key material removed", key_id=key.key_id, reason=operation)
        return True

    async def _importable(self, ref: str, account: str, op: _Op) -> KeyRecord:
        record = await self._lookup(ref, account, create_default=False)
        op.key_id = record.key_id
        if record.origin != "external":
            raise KeyStateError(
                f"key {_name(record)} was generated by KMS; only keys created with "
                "--origin external take imported material", target=record.key_id,
                fix="Create a key with create-key --origin external.")
        if record.state != KeyState.PENDING_IMPORT:
            raise KeyStateError(
                f"key {_name(record)} is {record.state.replace('_', ' ')}, not pending import",
                target=record.key_id,
                fix="Delete its imported material first (delete-imported-key-material).")
        return record

    async def _fingerprint(self, spec: KeySpec, material: bytes) -> str:
        """A keyed fingerprint (HMAC in the token): identifies material without revealing
        it to whoever reads the registry."""
        core = await self._core()
        if not await core.key_exists(FINGERPRINT_LABEL):
            # KeyExists: another process made it first; use that one.
            with contextlib.suppress(KeyExists):
                await core.generate_key(KeySpec.HMAC_256, FINGERPRINT_LABEL, b"kms:fingerprint")
        tag = await core.sign(FINGERPRINT_LABEL, spec.value.encode() + b"\0" + material,
                              "HMAC_SHA256")
        return tag.hex()

    async def _check_same_material(self, key: KeyRecord, fingerprint: str) -> None:
        previous = await self.store.get_import(key.key_id)
        if previous is not None and not hmac.compare_digest(previous.fingerprint, fingerprint):
            raise Conflict(
                f"key {_name(key)} had other key material: only the identical material can "
                "be imported again", code="import_material_mismatch", target=key.key_id,
                fix="Import the material imported first, or create a new key for new material.")

    # ------------------------------------------------------------------ rotation

    async def enable_key_rotation(
        self, key: str, interval_days: int = ROTATION_DAYS_DEFAULT, *,
        account: str = DEFAULT_ACCOUNT, actor: str | None = None, now: datetime | None = None,
    ) -> RotationChange:
        """Rotate ``key`` every ``interval_days`` (30..365), the first one that far from now."""
        return await self._set_rotation("enable_key_rotation", key, True,
                                        check_rotation_days(interval_days), account, actor, now)

    async def disable_key_rotation(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        now: datetime | None = None,
    ) -> RotationChange:
        return await self._set_rotation("disable_key_rotation", key, False, None, account,
                                        actor, now)

    async def get_key_rotation_status(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> RotationStatus:
        async with self._audit("get_key_rotation_status", account, actor, key) as op:
            record = await self._lookup(key, check_account(account), create_default=True)
            op.key_id = record.key_id
            return RotationStatus.of(record, await self.store.get_rotation(record.key_id))

    async def rotate_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        now: datetime | None = None, request: str | None = None,
    ) -> RotationChange:
        """Add a new key version in the token and make it current (encryption uses it;
        older versions keep decrypting). ``request`` (a task id) makes re-runs no-ops."""
        async with self._audit("rotate_key", account, actor, key) as op:
            record = await self._lookup(key, check_account(account), create_default=True)
            op.key_id = record.key_id
            self._check_rotatable(record)
            if record.state != KeyState.ENABLED:
                raise self._state_refusal(record, "rotate_key")
            rotation = await self.store.get_rotation(record.key_id)
            if request is not None and rotation is not None and rotation.last_request == request:
                op.outcome = "unchanged"
                return RotationChange(RotationStatus.of(record, rotation), False)
            when = now or self.clock()
            if not await self.store.claim_rotation(record.key_id, when, when + ROTATION_LEASE):
                raise RotationInProgress(f"a rotation of {_name(record)} is already running",
                                         target=record.key_id)
            try:
                rotated = await self._add_version(record.key_id, when, actor, request, op)
            except BaseException:
                await self.store.release_rotation(record.key_id)
                raise
            return RotationChange(
                RotationStatus.of(rotated, await self.store.get_rotation(record.key_id)), True)

    async def rotate_due_keys(
        self, now: datetime | None = None, *, actor: str | None = None
    ) -> dict[str, Any]:
        """Rotate every key whose scheduled rotation is due (what the cron entry runs)."""
        when = now or self.clock()
        rotated: list[str] = []
        failed: dict[str, str] = {}
        for key_id in await self.store.due_rotations(when):
            record = await self.store.get_key(key_id)
            rotation = await self.store.get_rotation(key_id)
            if record is None or rotation is None:
                continue
            try:
                # One request per due time: two workers' cron runs rotate once.
                change = await self.rotate_key(
                    key_id, account=record.account, actor=actor, now=when,
                    request=f"schedule:{iso(rotation.next_rotation_at)}")
            except DewError as exc:
                failed[key_id] = exc.code
                log.warning("scheduled rotation failed", key_id=key_id, error=exc.message)
                continue
            if change.changed:
                rotated.append(key_id)
        return {"rotated": rotated, "failed": failed}

    async def _add_version(
        self, key_id: str, when: datetime, actor: str | None, request: str | None, op: _Op
    ) -> KeyRecord:
        """With the rotation lease held: generate version n+1, then register it."""
        record = await self.store.get_key(key_id)
        if record is None or record.state != KeyState.ENABLED:
            raise KeyStateError(f"key {key_id} is no longer enabled", target=key_id)
        old, new = record.current_version, record.current_version + 1
        label = token_label(key_id, new)
        core = await self._core()
        try:
            await core.generate_key(KeySpec.AES_256, label, f"{key_id}:v{new}".encode())
        except KeyExists:
            # We hold the lease and the registry says v{old}: the object is an orphan
            # of a rotation that crashed before registering it. Replace it.
            await core.destroy_key(label)
            await core.generate_key(KeySpec.AES_256, label, f"{key_id}:v{new}".encode())
        op.detail = {"from_version": old, "to_version": new,
                     **({"request": request} if request else {})}
        event = AuditEvent(when, record.account, actor or self.actor, "rotate_key", key_id,
                           "success", op.detail)
        await self.flush_audit()
        rotated = await self.store.add_version(key_id, old, KeyVersion(key_id, new, label, when),
                                               event, request)
        if rotated is None:
            await self._discard(core, label)
            raise KeyStateError(f"key {_name(record)} changed during its rotation; retry",
                                target=key_id)
        op.recorded = True
        self._cache.clear()
        log.info("key rotated", key_id=key_id, version=new)
        return rotated

    async def _set_rotation(
        self, operation: str, key: str, enabled: bool, interval: int | None, account: str,
        actor: str | None, now: datetime | None,
    ) -> RotationChange:
        async with self._audit(operation, account, actor, key) as op:
            record = await self._lookup(key, check_account(account), create_default=True)
            op.key_id = record.key_id
            self._check_rotatable(record)
            current = await self.store.get_rotation(record.key_id)
            if (current is not None and current.enabled == enabled
                    and (not enabled or current.interval_days == interval)) or (
                    current is None and not enabled):
                op.outcome = "unchanged"
                return RotationChange(RotationStatus.of(record, current), False)
            when = now or self.clock()
            days = interval or (current.interval_days if current else ROTATION_DAYS_DEFAULT)
            # The first rotation is one interval from now (or from the last rotation).
            base = current.last_rotated_at if current and current.last_rotated_at else when
            following = max(base + timedelta(days=days), when) if enabled else None
            op.detail = {"enabled": enabled, "interval_days": days,
                         "next_rotation": iso(following)}
            event = AuditEvent(when, record.account, actor or self.actor, operation,
                               record.key_id, "success", op.detail)
            await self.flush_audit()
            saved = await self.store.set_rotation(record.key_id, enabled, days, following, event)
            op.recorded = True
            return RotationChange(RotationStatus.of(record, saved), True)

    @staticmethod
    def _check_rotatable(key: KeyRecord) -> None:
        if key.origin != "kms":
            raise RotationUnsupported(
                f"key {_name(key)} holds imported key material, which cannot rotate",
                fix="Rotate imported keys yourself: create a new key, import new material.",
                target=key.key_id)
        if key.spec != KeySpec.AES_256:
            raise RotationUnsupported(
                f"key {_name(key)} is a {key.spec} key; only AES_256 keys rotate",
                target=key.key_id)

    # ------------------------------------------------------------------ asymmetric keys, MACs

    async def sign(
        self, key: str, message: bytes, algorithm: str, message_type: str = "RAW", *,
        account: str = DEFAULT_ACCOUNT, actor: str | None = None,
    ) -> SignResult:
        """Sign ``message`` (RAW: at most 4096 bytes, hashed here; DIGEST: its digest)."""
        async with self._audit("sign", account, actor, key) as op:
            account = check_account(account)
            request = sign_request(algorithm, message, message_type)
            op.detail = {"algorithm": request.algorithm, "message_type": request.message_type}
            record = await self._signing_key(key, account, request, op)
            core = await self._core()
            label = token_label(record.key_id, record.current_version)
            if request.ml_dsa is not None:
                signature = await self._ml_dsa_sign(record, request.digest)
            else:
                assert request.core_algorithm is not None
                signature = await self._in_token(record, core.sign_digest(
                    label, request.digest, request.core_algorithm))
            return SignResult(record.key_id, signature, request.algorithm)

    async def verify(
        self, key: str, message: bytes, signature: bytes, algorithm: str,
        message_type: str = "RAW", *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
    ) -> VerifyResult:
        """Whether ``signature`` is valid for ``message`` (checked in the token)."""
        async with self._audit("verify", account, actor, key) as op:
            account = check_account(account)
            request = sign_request(algorithm, message, message_type)
            if not isinstance(signature, bytes | bytearray) or not (
                0 < len(signature) <= MAX_SIGNATURE_BYTES
            ):
                raise InvalidInput(f"the signature must be 1..{MAX_SIGNATURE_BYTES} bytes",
                                   code="invalid_signature")
            op.detail = {"algorithm": request.algorithm, "message_type": request.message_type}
            record = await self._signing_key(key, account, request, op)
            if request.ml_dsa is not None:
                public = load_der_public_key((await self._wrapped(record)).public_key)
                valid = ml_dsa_verify(public, bytes(signature), request.digest)
            else:
                assert request.core_algorithm is not None
                core = await self._core()
                valid = await self._in_token(record, core.verify_digest(
                    token_label(record.key_id, record.current_version), request.digest,
                    bytes(signature), request.core_algorithm))
            op.detail["valid"] = valid
            return VerifyResult(record.key_id, valid, request.algorithm)

    async def get_public_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> PublicKeyResult:
        """The public half of an RSA / EC key as SubjectPublicKeyInfo PEM."""
        async with self._audit("get_public_key", account, actor, key) as op:
            record = await self._enabled(key, check_account(account))
            op.key_id = record.key_id
            if not KeySpec(record.spec).is_asymmetric:
                raise KeyUsageError(f"key {_name(record)} is a {record.spec} key: it has no "
                                    "public key", target=record.key_id)
            if KeySpec(record.spec).family is KeyFamily.MLDSA:
                der = (await self._wrapped(record)).public_key
            else:
                core = await self._core()
                der = await self._in_token(record, core.public_key_spki_der(
                    token_label(record.key_id, record.current_version)))
            pem = serialization.load_der_public_key(der).public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            return PublicKeyResult(record.key_id, record.spec, record.usage,
                                   pem.decode("ascii"), _algorithms_of(record))

    async def generate_mac(
        self, key: str, message: bytes, algorithm: str | None = None, *,
        account: str = DEFAULT_ACCOUNT, actor: str | None = None,
    ) -> MacResult:
        """HMAC of ``message`` (at most 4096 bytes) in the token with an HMAC key."""
        async with self._audit("generate_mac", account, actor, key) as op:
            account = check_account(account)
            data = check_mac_message(message)
            record, algo = await self._mac_key(key, account, algorithm, op)
            core = await self._core()
            mac = await self._in_token(record, core.sign(
                token_label(record.key_id, record.current_version), data, algo))
            return MacResult(record.key_id, mac, op.detail["algorithm"])

    async def verify_mac(
        self, key: str, message: bytes, mac: bytes, algorithm: str | None = None, *,
        account: str = DEFAULT_ACCOUNT, actor: str | None = None,
    ) -> VerifyResult:
        """Whether ``mac`` is the HMAC of ``message`` (compared in the token)."""
        async with self._audit("verify_mac", account, actor, key) as op:
            account = check_account(account)
            data = check_mac_message(message)
            if not isinstance(mac, bytes | bytearray) or not 0 < len(mac) <= 64:
                raise InvalidInput("the MAC must be 1..64 bytes", code="invalid_mac")
            record, algo = await self._mac_key(key, account, algorithm, op)
            core = await self._core()
            valid = await self._in_token(record, core.verify(
                token_label(record.key_id, record.current_version), data, bytes(mac), algo))
            op.detail["valid"] = valid
            return VerifyResult(record.key_id, valid, op.detail["algorithm"], "mac")

    async def _rsa_decrypt(
        self, cipher_text: bytes | str, key: str | None, algorithm: str, account: str,
        actor: str | None, encryption_context: dict[str, str] | None,
    ) -> DecryptResult:
        async with self._audit("decrypt_data", account, actor, key) as op:
            account = check_account(account)
            hash_name = check_encryption_algorithm(algorithm)
            op.detail = {"algorithm": algorithm}
            if key is None:
                raise InvalidInput(f"{algorithm} needs the key (--key): an RSA ciphertext "
                                   "does not name it", code="key_required")
            if encryption_context:
                raise InvalidInput("RSA ciphertexts take no encryption context",
                                   code="invalid_encryption_context")
            blob = (decode_base64("cipher_text", cipher_text) if isinstance(cipher_text, str)
                    else bytes(cipher_text))
            record = await self._enabled(key, account)
            op.key_id = record.key_id
            if record.spec.split("_", 1)[0] != "RSA" or record.usage != KeyUsage.ENCRYPT_DECRYPT:
                raise KeyUsageError(
                    f"key {_name(record)} is a {record.spec} key for {record.usage}; {algorithm}"
                    " needs an RSA ENCRYPT_DECRYPT key", target=record.key_id)
            core = await self._core()
            plain = await self._in_token(record, core.rsa_oaep_decrypt(
                token_label(record.key_id, record.current_version), blob, hash_name))
            op.detail["bytes"] = len(plain)
            return DecryptResult(record.key_id, plain)

    async def _wrapped(self, record: KeyRecord) -> WrappedKey:
        wrapped = await self.store.get_wrapped(record.key_id, record.current_version)
        if wrapped is None:
            raise ConfigError(f"the registry has no wrapped private key for {_name(record)}",
                              code="hsm_key_material_missing",
                              cause="the key registry is incomplete")
        return wrapped

    async def _ml_dsa_sign(self, record: KeyRecord, message: bytes) -> bytes:
        """Unwrap the private key in the token, sign in memory, forget it."""
        wrapped = await self._wrapped(record)
        core = await self._core()
        seed = await self._in_token(record, core.unwrap_secret(
            token_label(record.key_id, record.current_version), wrapped.wrapped))
        return ml_dsa_sign(KeySpec(record.spec), seed, message)

    async def _signing_key(
        self, ref: str, account: str, request: SignRequest, op: _Op
    ) -> KeyRecord:
        record = await self._enabled(ref, account)
        op.key_id = record.key_id
        try:
            check_sign_key(record.spec, record.usage, request.algorithm, _name(record))
        except KeyUsageError as exc:
            exc.target = record.key_id
            raise
        return record

    async def _mac_key(
        self, ref: str, account: str, algorithm: str | None, op: _Op
    ) -> tuple[KeyRecord, Any]:
        record = await self._enabled(ref, account)
        op.key_id = record.key_id
        if record.usage != KeyUsage.GENERATE_VERIFY_MAC:
            raise KeyUsageError(f"key {_name(record)} is a {record.spec} key for "
                                f"{record.usage}; MACs need a GENERATE_VERIFY_MAC key",
                                target=record.key_id)
        try:
            algo = check_mac_algorithm(algorithm, record.spec, _name(record))
        except KeyUsageError as exc:
            exc.target = record.key_id
            raise
        op.detail = {"algorithm": next(n for n, (_, a) in MAC.items() if a is algo)}
        return record, algo

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
        *, default: bool, op: _Op, actor: str | None, origin: str = "kms",
    ) -> KeyRecord:
        key_id = str(uuid.uuid4())
        label = token_label(key_id, 1)
        now = self.clock()
        core = await self._core()
        external = origin == "external"
        wrapped: WrappedKey | None = None
        if spec.family is KeyFamily.MLDSA:
            if CKM_ML_DSA in await core.mechanisms():
                log.warning("the token offers ML-DSA, but keys are still kept wrapped "
                            "(the token path is not implemented)", spec=spec.value)
            # No ML-DSA in the token: its AES key for this version wraps the private key.
            await core.generate_key(KeySpec.AES_256, label, f"{key_id}:v1".encode())
            try:
                seed, public_der = ml_dsa_generate(spec)
                wrapped = WrappedKey(await core.wrap_secret(label, seed), public_der)
            except BaseException:
                await self._discard(core, label)
                raise
        elif not external:  # an external key gets its material (and token objects) on import
            await core.generate_key(spec, label, f"{key_id}:v1".encode())
        key = KeyRecord(
            key_id=key_id, account=account, alias=alias, spec=spec.value, usage=usage.value,
            state=(KeyState.PENDING_IMPORT if external else KeyState.ENABLED).value,
            origin=origin, default_key=default,
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
                key, KeyVersion(key_id, 1, label, now), event, None if default else self.quota,
                wrapped)
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
        key = await self._enabled(ref, account)
        if key.spec != KeySpec.AES_256 or key.usage != KeyUsage.ENCRYPT_DECRYPT:
            raise KeyUsageError(
                f"key {_name(key)} is a {key.spec} key for {key.usage}; data keys and "
                "encrypt-data need an AES_256 ENCRYPT_DECRYPT key",
                target=key.key_id,
            )
        return key

    async def _enabled(self, ref: str, account: str) -> KeyRecord:
        """An enabled key of any spec; metadata cached for ``cache_ttl`` seconds."""
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
        if header.key_version > key.current_version:
            # Rotated by another process since we cached the key: read it again.
            self._cache.clear()
            key = await self.store.get_key(key.key_id) or key
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


def protection(spec: str) -> str:
    """``hsm``: the key lives in the token; ``hsm-wrapped``: the token cannot hold it
    (ML-DSA in SoftHSM), so it is stored wrapped under a token AES key (RFC 5649)
    and unwrapped in memory only for an operation."""
    return "hsm-wrapped" if spec.startswith("ML_DSA") else "hsm"


def _algorithms_of(key: KeyRecord) -> list[str]:
    """What get-public-key lists as usable with the key."""
    if key.spec.startswith("ML_DSA"):
        return [key.spec]
    if key.usage == KeyUsage.ENCRYPT_DECRYPT:
        return list(ENCRYPTION)
    if key.spec.startswith("EC"):
        return [name for name, spec in ECDSA_CURVE.items() if spec.value == key.spec]
    return [name for name in SIGNING if name.startswith("RSASSA")]


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


def check_rotate_args(args: dict[str, Any]) -> None:
    _only(args, ("key", "account"), "kms.rotate_key")
    check_key_ref(args.get("key"))
    check_account(args.get("account", DEFAULT_ACCOUNT))


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


@JOBS.job("kms.rotate_key", validate=check_rotate_args)
async def rotate_key_job(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    """Rotate a KMS-generated AES_256 key now (a new version; old data still decrypts)."""
    kms: KmsService = await ctx.resources.get("kms")
    change = await kms.rotate_key(
        args["key"], account=args.get("account", DEFAULT_ACCOUNT), actor=_job_actor(ctx),
        now=ctx.now(), request=ctx.task_id,
    )
    return change.to_json()


async def rotate_due_keys(
    resources: Resources, now: datetime | None = None, *, actor: str | None = None
) -> dict[str, Any]:
    """What the cron entry runs: cheap when nothing is due (no HSM)."""
    store: KmsStore = await resources.get("kms_store")
    if not await store.due_rotations(now or utcnow()):
        return {"rotated": [], "failed": {}}
    kms: KmsService = await resources.get("kms")
    return await kms.rotate_due_keys(now or utcnow(), actor=actor)
