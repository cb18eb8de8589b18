"""The KMS's shared core (``KmsCore``): the audit buffer, key lookup and creation,
state changes, the metadata cache and the token calls its parts (key management,
data plane, signing, rotation, import) all build on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

from engine.crypto import CryptoCore, KeyNotFound, KeySpec, KeyUsageError
from engine.crypto.model import KeyFamily
from engine.errors import ConfigError, Conflict, DewError, InvalidInput
from engine.logs import get_logger
from engine.models import iso, utcnow
from handlers.kms.audit_seal import AUDIT_KEY_LABEL
from handlers.kms.errors import (
    AliasExists,
    DefaultKeyProtected,
    KeyDeleted,
    KeyStateError,
    QuotaExceeded,
    UnknownKey,
)
from handlers.kms.format import (
    CipherHeader,
    KeyState,
    KeyUsage,
    Purpose,
    canonical_context,
    check_account,
    check_key_ref,
    check_pending_days,
    context_digest,
    default_service,
    is_key_id,
    pack_after_prefix,
    pad,
    unpad,
)
from handlers.kms.mldsa import CKM_ML_DSA, ml_dsa_generate
from handlers.kms.results import KeyChange, KeyMetadata
from handlers.kms.store import AuditEvent, KeyRecord, KeyVersion, KmsStore, WrappedKey

log = get_logger("dew.kms")
T = TypeVar("T")
_Cached = tuple[KeyRecord, "KeyUse | None"]  # a key read from the registry, its data-plane use
CryptoProvider = Callable[[], Awaitable[CryptoCore]]

DEFAULT_CACHE_TTL = 1.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_CONTEXT = context_digest({})
DEFAULT_AUDIT_FLUSH_INTERVAL = 0.2
AUDIT_BATCH = 500
AUDIT_BACKLOG = 4 * AUDIT_BATCH
CACHE_MAX = 10_000
PREFIXES_MAX = 64
# Operations that *use* a key: each success adds one to the key's count for the day
# (kms_usage), written with the batch of audit entries that records it.
USE_OPERATIONS = frozenset({
    "create_datakey", "create_datakey_without_plaintext", "encrypt_datakey", "decrypt_datakey",
    "encrypt_data", "decrypt_data", "sign", "verify", "generate_mac", "verify_mac",
})


@dataclass
class AuditOp:
    """The audit entry an operation is building (filled in as it learns more)."""

    key_id: str | None
    detail: dict[str, Any] = field(default_factory=dict)
    outcome: str = "success"
    recorded: bool = False  # written already, inside the operation's own transaction


class Audited:
    """The context of one audited operation (``KmsCore.audit``).

    A plain class rather than ``@asynccontextmanager``: this runs around every
    data-plane call, and the generator machinery (async generator, its hooks,
    ``anext``/``athrow``) cost several times what the two methods below do.
    """

    __slots__ = ("_account", "_actor", "_core", "_op", "_operation")

    def __init__(self, core: KmsCore, operation: str, account: str, actor: str | None,
                 key_ref: str | None) -> None:
        self._core = core
        self._operation = operation
        self._account = account
        self._actor = actor
        self._op = AuditOp(key_id=_short(key_ref))

    async def __aenter__(self) -> AuditOp:
        return self._op

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Returns None, never True: an error always goes on to the caller.
        op, core = self._op, self._core
        if exc is None:
            if not op.recorded:
                await core.record(core._event(self._operation, self._account, self._actor, op,
                                              op.outcome))
            return
        if isinstance(exc, DewError):
            await core.failed(self._operation, self._account, self._actor, op.key_id,
                              op.detail, exc)


class KeyUse:
    """What the data plane needs of an enabled AES ENCRYPT_DECRYPT key, made when its
    record is cached: the record, the token label of its current version and the AAD
    prefixes (header bytes 0..64) of the ciphertexts made under it, by plaintext
    length, purpose and context digest; they are the same bytes call after call."""

    __slots__ = ("key_id", "label", "prefixes", "record", "version")

    def __init__(self, record: KeyRecord) -> None:
        self.record = record
        self.key_id = record.key_id
        self.version = record.current_version
        self.label = token_label(record.key_id, record.current_version)
        self.prefixes: dict[tuple[int, Purpose, bytes], bytes] = {}

    def prefix(self, length: int, purpose: Purpose, digest: bytes) -> bytes:
        """Header bytes 0..64 of a ciphertext of ``length`` bytes under the current version."""
        slot = (length, purpose, digest)  # an IntEnum hashes as its int, fast
        prefix = self.prefixes.get(slot)
        if prefix is None:
            prefix = CipherHeader(self.key_id, self.version, length, purpose,
                                  digest).aad_prefix()
            if len(self.prefixes) >= PREFIXES_MAX:  # many contexts: keep it bounded
                self.prefixes.clear()
            self.prefixes[slot] = prefix
        return prefix


def _aad(prefix: bytes, ctx: dict[str, str]) -> bytes:
    """The GCM additional data: the header's first 64 bytes, then the context."""
    return prefix + canonical_context(ctx) if ctx else prefix


def token_label(key_id: str, version: int) -> str:
    return f"kms:{key_id}:v{version}"


def key_name(key: KeyRecord) -> str:
    return f"{key.alias!r} ({key.key_id})"


def not_found(ref: str, account: str) -> UnknownKey:
    # The same words whether the key never existed or belongs to another
    # account: an account must not learn that another account's key exists.
    return UnknownKey(f"no key {ref!r} in account {account!r}")


def _deleted(key: KeyRecord) -> KeyDeleted:
    when = iso(key.deleted_at) or "an earlier date"
    return KeyDeleted(
        f"key deleted: {key_name(key)} was deleted on {when}; data encrypted under it can no "
        "longer be decrypted", target=key.key_id,
    )


def _short(text: str | None, limit: int = 255) -> str | None:
    """Audit fields hold what the caller sent, bounded (it may be garbage)."""
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "…"


class TokenAuditKey:
    """The audit chain's sealing key: HMAC-SHA-256 with ``kms:audit-hmac`` in the token
    (generated on first use: sensitive, never extractable). The store calls it; it
    opens the HSM through the core only in :meth:`prepare` and :meth:`mac`."""

    def __init__(self, core: KmsCore) -> None:
        self._core = core
        self._exists = False

    def ready(self) -> bool:
        return self._core.crypto_open

    async def prepare(self) -> None:
        await self._ensure(await self._core.crypto())

    async def mac(self, message: bytes) -> bytes:
        crypto = await self._core.crypto()
        await self._ensure(crypto)
        return await crypto.sign(AUDIT_KEY_LABEL, message, "HMAC_SHA256")

    async def check(self, message: bytes, tag: bytes) -> bool:
        crypto = await self._core.crypto()
        try:
            return await crypto.verify(AUDIT_KEY_LABEL, message, tag, "HMAC_SHA256")
        except KeyNotFound:
            return False  # this token never sealed anything

    async def _ensure(self, crypto: CryptoCore) -> None:
        if self._exists:
            return
        await crypto.ensure_key(KeySpec.HMAC_256, AUDIT_KEY_LABEL, b"kms:audit")
        self._exists = True


class KmsCore:
    """What every part of the KMS shares: the registry, the token, the audit buffer,
    the metadata cache, key lookup and creation, state changes and token calls."""

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
        # (account, key ref) -> (expiry, record, its KeyUse if the data plane may use it)
        self.cache: dict[tuple[str, str], tuple[float, KeyRecord, KeyUse | None]] = {}
        self._reads: dict[tuple[str, str], asyncio.Future[_Cached]] = {}  # reads under way
        self._generation = 0  # counts forget_keys(): a read begun before one is not cached
        self._pending: list[AuditEvent] = []
        self._usage: dict[tuple[str, str, str], int] = {}  # (account, key id, day) -> uses
        self._day_text: tuple[datetime | None, datetime, str] = (None, _EPOCH, "")
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.TimerHandle | None = None
        self._flush_tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._batch_retry_at = 0.0  # loop time before which a full batch waits for the timer
        self._batch_task: asyncio.Task[None] | None = None  # writing a full batch
        self.audit_key = TokenAuditKey(self)
        store.use_audit_key(self.audit_key)

    async def close(self) -> None:
        """Write the buffered audit entries. Does not close the store or the core."""
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._flush_tasks:
            await asyncio.gather(*self._flush_tasks, return_exceptions=True)
        await self.flush_audit()

    # ------------------------------------------------------------------ audit buffer

    async def flush_audit(self) -> None:
        """Append the buffered use entries now (one transaction)."""
        async with self._flush_lock:
            events, self._pending = self._pending, []
            usage, self._usage = self._usage, {}
            if not events and not usage:
                return
            try:
                await self.store.append_audit(events, usage)
            except DewError:
                # Keep them (in order) for the next flush rather than lose them.
                self._pending[:0] = events
                for slot, n in usage.items():
                    self._usage[slot] = self._usage.get(slot, 0) + n
                raise
            self._batch_retry_at = 0.0  # written: full batches go at once again

    # ------------------------------------------------------------------ internals

    def audit(
        self, operation: str, account: str, actor: str | None, key_ref: str | None
    ) -> Audited:
        """``async with core.audit(...) as op``: the operation's audit entry, recorded when
        the block ends (a failure with its error code)."""
        return Audited(self, operation, account, actor, key_ref)

    def _event(
        self, operation: str, account: str, actor: str | None, op: AuditOp, outcome: str
    ) -> AuditEvent:
        return AuditEvent(self.clock(), _short(account) or "", actor or self.actor, operation,
                          op.key_id, outcome, op.detail)

    async def record(self, event: AuditEvent) -> None:
        if self._buffer(event):
            await self.flush_audit()

    def used(self, operation: str, account: str, actor: str | None, key_id: str,
             detail: dict[str, Any]) -> bool:
        """Buffer the entry of a successful use (``account`` checked already) and count
        the use. True: the caller must ``await flush_audit()`` now (unbuffered, or a
        backlog)."""
        return self._buffer(AuditEvent(self.clock(), account, actor or self.actor, operation,
                                       key_id, "success", detail))

    async def failed(self, operation: str, account: str, actor: str | None,
                     key_ref: str | None, detail: dict[str, Any], exc: DewError) -> None:
        """Record a refused or failed operation with its error code; ``key_ref`` as the
        caller gave it, unless the error names the key it found (by id)."""
        key_id = _short(key_ref)
        if exc.target is not None and is_key_id(exc.target):
            key_id = exc.target  # refused after the key was found: name it by id
        await self.record(AuditEvent(self.clock(), _short(account) or "", actor or self.actor,
                                     operation, key_id, "failure",
                                     {**detail, "code": exc.code}))

    def _buffer(self, event: AuditEvent) -> bool:
        """Buffer ``event`` (counting a use); True when it must be flushed now."""
        self._pending.append(event)
        if (event.outcome == "success" and event.key_id is not None
                and event.operation in USE_OPERATIONS):
            slot = (event.account, event.key_id, self._day(event.time))
            usage = self._usage
            usage[slot] = usage.get(slot, 0) + 1
        pending = len(self._pending)
        if self.audit_flush_interval <= 0 or self._closed or pending >= AUDIT_BACKLOG:
            # Written before the call returns: unbuffered, closing, or a backlog. While
            # a batch is being written the other calls go on (they used to queue behind
            # it, every one of them, leaving the token idle) up to AUDIT_BACKLOG
            # entries; past that they wait, so a stalled disk cannot make the buffer
            # grow without bound.
            return True
        if (pending >= AUDIT_BATCH and not self._flush_lock.locked()
                and (self._batch_task is None or self._batch_task.done())
                and asyncio.get_running_loop().time() >= self._batch_retry_at):
            # A full batch is written now, by a task of its own rather than by the call
            # that filled it: that call's caller would wait for the disk and come back
            # out of step with the others (each such caller costs its own token hop).
            # One such task at a time: the uses until it starts join its batch.
            self._batch_task = self._flush_soon()
        elif self._flusher is None:
            loop = asyncio.get_running_loop()
            self._flusher = loop.call_later(self.audit_flush_interval, self._flush_later)
        return False

    def _day(self, when: datetime) -> str:
        """The UTC day of ``when`` as ISO text; the same day's text is reused, not rebuilt
        (a time within the cached day is found by two comparisons)."""
        start, end, text = self._day_text
        if start is not None and start <= when < end:
            return text
        utc = when.astimezone(UTC)
        start = datetime(utc.year, utc.month, utc.day, tzinfo=UTC)
        text = start.date().isoformat()
        self._day_text = (start, start + timedelta(days=1), text)
        return text

    def _flush_later(self) -> None:
        self._flusher = None
        self._flush_soon()

    def _flush_soon(self) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._flush_quietly())
        self._flush_tasks.add(task)
        task.add_done_callback(self._flush_tasks.discard)
        return task

    async def _flush_quietly(self) -> None:
        try:
            await self.flush_audit()
        except DewError as exc:
            # The entries stay buffered; the next flush (or close) retries them. Not
            # every use from now on: a full batch waits for the timer's next try.
            loop = asyncio.get_running_loop()
            self._batch_retry_at = loop.time() + max(self.audit_flush_interval, 0.05)
            if self._flusher is None and not self._closed:
                self._flusher = loop.call_later(self.audit_flush_interval, self._flush_later)
            log.warning("audit entries not written yet", pending=len(self._pending),
                        error=exc.message)

    @property
    def crypto_open(self) -> bool:
        """True once the HSM is open (sealing the audit then costs no start-up)."""
        return self._crypto is not None

    async def crypto(self) -> CryptoCore:
        if self._crypto is None:
            async with self._crypto_lock:
                if self._crypto is None:
                    assert self._provider is not None
                    self._crypto = await self._provider()
        return self._crypto

    async def lookup(self, ref: str, account: str, *, create_default: bool) -> KeyRecord:
        """The live key ``ref`` (id or alias) of ``account``; never another account's."""
        ref = check_key_ref(ref)
        if is_key_id(ref):
            key = await self.store.get_key(ref)
            if key is None or key.account != account:
                raise not_found(ref, account)
        else:
            key = await self.store.find_alias(account, ref)
            if key is None:
                gone = await self.store.find_deleted_alias(account, ref)
                if gone is not None:
                    raise _deleted(gone)
                service = default_service(ref)
                if service is None or not create_default:
                    raise not_found(ref, account)
                return await self._create_default(service, account)
        if key.state == KeyState.DELETED:
            raise _deleted(key)
        return key

    async def _create_default(self, service: str, account: str) -> KeyRecord:
        alias = f"{service}/default"
        op = AuditOp(key_id=None, detail={"alias": alias, "spec": KeySpec.AES_256.value,
                                      "default_key": True})
        try:
            return await self.generate(account, alias, KeySpec.AES_256,
                                        KeyUsage.ENCRYPT_DECRYPT,
                                        f"Default key of service {service}", default=True,
                                        op=op, actor=None)
        except AliasExists:
            # Another request (maybe another process) created it first: use that one.
            existing = await self.store.find_alias(account, alias)
            if existing is None:
                raise
            return existing

    async def generate(
        self, account: str, alias: str, spec: KeySpec, usage: KeyUsage, description: str,
        *, default: bool, op: AuditOp, actor: str | None, origin: str = "kms",
    ) -> KeyRecord:
        key_id = str(uuid.uuid4())
        label = token_label(key_id, 1)
        now = self.clock()
        core = await self.crypto()
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
                await self.discard(core, label)
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
            await self.discard(core, label)
            raise
        if outcome != "created":
            await self.discard(core, label)
            if outcome == "alias_taken":
                raise AliasExists(f"the alias {alias!r} is already used in account {account!r}")
            raise self.quota_error(account)
        op.recorded = True  # the creation's entry went in with the insert
        log.info("key created", key_id=key_id, account=account, spec=spec.value,
                 default_key=default)
        return key

    @staticmethod
    async def discard(core: CryptoCore, label: str) -> None:
        try:
            await core.destroy_key(label)
        except DewError as exc:
            # An orphan token object is unusable (no registry row points at it).
            log.warning("could not destroy an unregistered token key", label=label,
                        error=exc.message)

    def quota_error(self, account: str) -> QuotaExceeded:
        return QuotaExceeded(
            f"account {account!r} already has {self.quota} custom keys, its quota "
            "(enabled, disabled and pending deletion count; default keys do not)",
        )

    async def transition(
        self, operation: str, ref: str, account: str, actor: str | None, *,
        allowed: set[KeyState], done: set[KeyState], target: KeyState, protect_default: bool,
        pending_days: int | None = None, now: datetime | None = None,
    ) -> KeyChange:
        async with self.audit(operation, account, actor, ref) as op:
            account = check_account(account)
            ref = check_key_ref(ref)
            if operation == "schedule_key_deletion":
                op.detail = {"pending_days": check_pending_days(pending_days)}
            if protect_default and default_service(ref) is not None:
                raise self._default_protected(ref, operation)
            for _ in range(5):  # a concurrent change makes the guarded update miss: re-read
                key = await self.lookup(ref, account, create_default=False)
                op.key_id = key.key_id
                if protect_default and key.default_key:
                    raise self._default_protected(key.alias, operation)
                if key.state in done:
                    op.outcome = "unchanged"
                    return KeyChange(KeyMetadata.of(key), False)
                if key.state not in allowed:
                    raise self.state_refusal(key, operation)
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
                    self.forget_keys()
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
    def state_refusal(key: KeyRecord, operation: str) -> KeyStateError:
        state = key.state.replace("_", " ")
        if operation == "enable_key" and key.state == KeyState.PENDING_DELETION:
            fix = "Cancel the deletion first (dew kms cancel-key-deletion), then enable it."
        elif operation == "disable_key" and key.state == KeyState.PENDING_DELETION:
            fix = "A key pending deletion cannot be used already; nothing to disable."
        else:
            fix = "Check the key's state with dew kms describe-key."
        verb = operation.replace("_key", "").replace("_", " ")
        return KeyStateError(f"cannot {verb} {key_name(key)}: it is {state}", fix=fix,
                             target=key.key_id)

    async def usable(self, ref: str, account: str) -> KeyRecord:
        """An enabled AES key to use; metadata cached for ``cache_ttl`` seconds."""
        return (await self.key_use(ref, account)).record

    def usable_now(self, ref: str, account: str) -> KeyUse | None:
        """The data plane's fast path: the cached, fresh :class:`KeyUse` of ``ref`` in
        ``account`` (an enabled AES ENCRYPT_DECRYPT key), else None: then
        :meth:`key_use` reads the registry, or refuses the key."""
        hit = self.cache.get((account, ref))
        if hit is not None and hit[2] is not None and hit[0] > time.monotonic():
            return hit[2]
        return None

    async def key_use(self, ref: str, account: str) -> KeyUse:
        """:meth:`usable`, as the data plane uses it (a :class:`KeyUse`)."""
        key, use = await self._enabled(ref, account)
        if use is None:
            raise KeyUsageError(
                f"key {key_name(key)} is a {key.spec} key for {key.usage}; data keys and "
                "encrypt-data need an AES_256 ENCRYPT_DECRYPT key",
                target=key.key_id,
            )
        return use

    async def enabled(self, ref: str, account: str) -> KeyRecord:
        """An enabled key of any spec; metadata cached for ``cache_ttl`` seconds."""
        return (await self._enabled(ref, account))[0]

    async def _enabled(self, ref: str, account: str) -> tuple[KeyRecord, KeyUse | None]:
        cache_key = (account, ref)
        hit = self.cache.get(cache_key)
        if hit is not None and hit[0] > time.monotonic():
            key, use = hit[1], hit[2]
        elif self.cache_ttl > 0:
            key, use = await self._read_once(cache_key)
        else:
            key, use = await self._read_key(cache_key)
        if key.state != KeyState.ENABLED:
            state = key.state.replace("_", " ")
            if key.state == KeyState.PENDING_DELETION:
                when = iso(key.scheduled_deletion_date)
                raise KeyStateError(
                    f"key {key_name(key)} is pending deletion (on {when}): only an enabled key "
                    "can be used",
                    fix="Cancel the deletion (dew kms cancel-key-deletion), then enable the key.",
                    target=key.key_id,
                )
            raise KeyStateError(
                f"key {key_name(key)} is {state}: only an enabled key can be used",
                fix="Enable it with dew kms enable-key." if key.state == KeyState.DISABLED
                else "Finish the key's set-up first.",
                target=key.key_id,
            )
        return key, use

    def forget_keys(self) -> None:
        """Drop the cached keys: the next use of any reads the registry, and no read
        begun before this call is cached."""
        self.cache.clear()
        self._reads.clear()
        self._generation += 1

    def _read_once(self, cache_key: tuple[str, str]) -> asyncio.Future[_Cached]:
        """The registry read of an expired key, shared: the callers that find the same
        key expired together wait for one read instead of each making their own."""
        read = self._reads.get(cache_key)
        if read is None:
            read = self._reads[cache_key] = asyncio.ensure_future(self._read_key(cache_key))
            read.add_done_callback(partial(self._read_done, cache_key))
        # A caller cancelled while it waits leaves the read to the others.
        return asyncio.shield(read)

    def _read_done(self, cache_key: tuple[str, str], read: asyncio.Future[_Cached]) -> None:
        if self._reads.get(cache_key) is read:
            del self._reads[cache_key]
        if not read.cancelled():
            read.exception()  # each waiter has it; not "never retrieved" when none is left

    async def _read_key(self, cache_key: tuple[str, str]) -> _Cached:
        generation = self._generation
        account, ref = cache_key
        key = await self.lookup(ref, account, create_default=True)
        use = (KeyUse(key) if key.state == KeyState.ENABLED and key.spec == KeySpec.AES_256
               and key.usage == KeyUsage.ENCRYPT_DECRYPT else None)
        if self.cache_ttl > 0 and generation == self._generation:
            if len(self.cache) >= CACHE_MAX:
                self.cache.clear()
            self.cache[cache_key] = (time.monotonic() + self.cache_ttl, key, use)
        return key, use

    async def in_token(self, key: KeyRecord, call: Awaitable[T]) -> T:
        """Await a token call on ``key``; a vanished key object is explained from the registry."""
        try:
            return await call
        except KeyNotFound:
            raise await self._vanished(key) from None

    async def _vanished(self, key: KeyRecord) -> DewError:
        """Why the token has no object for ``key``: deleted meanwhile, or a wrong token."""
        self.forget_keys()
        fresh = await self.store.get_key(key.key_id)
        if fresh is not None and fresh.state == KeyState.DELETED:
            return _deleted(fresh)
        return ConfigError(
            f"the HSM has no material for key {key_name(key)}",
            cause="the key registry and the token disagree",
            fix="Check that hsm.token_label / DEW_STATE_DIR name the token these keys "
            "were created in.",
            code="hsm_key_material_missing",
        )

    # The data plane's token calls await the pool's future directly (no coroutine per
    # layer), with the AAD prefix of the key's ciphertexts made once (KeyUse).

    async def encrypt(
        self, use: KeyUse, data: bytes, purpose: Purpose, ctx: dict[str, str]
    ) -> bytes:
        prefix = use.prefix(len(data), purpose, context_digest(ctx) if ctx else _NO_CONTEXT)
        core = self._crypto or await self.crypto()
        try:
            iv, body = await core.submit_seal(use.label, pad(data), _aad(prefix, ctx))
        except KeyNotFound:
            raise await self._vanished(use.record) from None
        return pack_after_prefix(prefix, len(data), iv, body)

    async def new_datakey(
        self, use: KeyUse, length: int, ctx: dict[str, str]
    ) -> tuple[bytes, bytes]:
        """A fresh data key of ``length`` bytes from the token RNG and its ciphertext under
        the key's current version: one token hop (random bytes and seal together)."""
        prefix = use.prefix(length, Purpose.DATA_KEY,
                            context_digest(ctx) if ctx else _NO_CONTEXT)
        core = self._crypto or await self.crypto()
        try:
            dek, (iv, body) = await core.submit_data_key(use.label, length, _aad(prefix, ctx))
        except KeyNotFound:
            raise await self._vanished(use.record) from None
        return dek, pack_after_prefix(prefix, length, iv, body)

    async def decrypt(
        self, use: KeyUse, header: CipherHeader, iv: bytes, body: bytes, ctx: dict[str, str],
        prefix: bytes | None = None,
    ) -> bytes:
        """The plaintext of a ciphertext under ``use``'s key; ``prefix``: the ciphertext's
        first 64 bytes, which are its header's AAD prefix (else made from ``header``)."""
        key = use.record
        if header.key_version > use.version:
            # Rotated by another process since we cached the key: read it again.
            self.forget_keys()
            key = await self.store.get_key(key.key_id) or key
        if not 1 <= header.key_version <= key.current_version:
            raise InvalidInput(f"the ciphertext names version {header.key_version} of "
                               f"{key_name(key)}, which does not exist", code="invalid_ciphertext")
        if (context_digest(ctx) if ctx else _NO_CONTEXT) != header.context:
            raise InvalidInput(
                "the encryption context differs from the one used at encryption",
                code="encryption_context_mismatch",
                fix="Pass exactly the encryption context given when the data was encrypted.",
            )
        label = (use.label if header.key_version == use.version
                 else token_label(key.key_id, header.key_version))
        if prefix is None:
            prefix = header.aad_prefix()
        core = self._crypto or await self.crypto()
        try:
            padded = await core.submit_open(label, iv, body, _aad(prefix, ctx))
        except KeyNotFound:
            raise await self._vanished(key) from None
        return unpad(header, padded)
