"""CSMS: secrets with versions and stages, scheduled deletion, and rotation.

``SecretsService`` is the domain API; the CLI (``dew secrets``), the jobs below,
the scheduler, the demo and the benchmark call it. Rules are pure functions in
:mod:`handlers.csms.model`, the rotation state machine in
:mod:`handlers.csms.rotation`, database access in :mod:`handlers.csms.rotators`,
persistence in :mod:`handlers.csms.store`.

Every version is encrypted with a fresh data key from KMS ``create-datakey``
under the secret's CMK (``csms/default`` unless chosen; KMS creates default
keys on first use), with AES-256-GCM in this process; only the encrypted data
key is stored beside the ciphertext. Values exist in clear only in memory of
the process that needs them (the CLI printing ``get``, the worker rotating).

Jobs:

- ``csms.rotate_secret {name, account?, due?}``: the four rotation steps,
  each recorded on the secret so a re-run resumes; ``due`` (epoch seconds) is
  set by the scheduler, and a run whose secret is no longer due at that time
  does nothing (the schedule changed, or another run rotated it).
- ``csms.delete_due_secrets {}``: deletes secrets whose recovery window is
  over (also run by cron every minute).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from engine.context import JobContext
from engine.errors import Conflict, DewError, InvalidInput, NotFound
from engine.logs import get_logger
from engine.models import iso, utcnow
from engine.registry import JOBS
from engine.resources import Closer, Resources, resource
from engine.settings import Settings
from handlers.csms import model as m
from handlers.csms.config import CsmsSettings
from handlers.csms.envelope import aad, kms_context, open_sealed, seal
from handlers.csms.rotation import RotationState, Step, StepOutcome, advance
from handlers.csms.rotators import (
    CredentialsRejected,
    PermissionDenied,
    Rotator,
    TlsNotVerified,
    rotator_for,
)
from handlers.csms.store import MAX_TAGS, SecretRecord, SqliteCsmsStore, VersionRecord
from handlers.kms.interface import (
    DEFAULT_ACCOUNT,
    KeyCipher,
    check_account,
    check_key_ref,
    default_actor,
    open_key_cipher,
)

log = get_logger("dew.csms")
ROTATE_JOB = "csms.rotate_secret"
DELETE_JOB = "csms.delete_due_secrets"
# The audit chain's operation for a read of a secret value (`dew audit list --secret`).
READ_OPERATION = "csms.get_value"
# Test hook: seconds to pause after step 2 (set) is recorded, so a test can
# kill the worker between steps 2 and 4. Not a setting: DEW_TEST_* is ignored there.
PAUSE_AFTER_SET_ENV = "DEW_TEST_CSMS_PAUSE_AFTER_SET"
CAS_TRIES = 8
# Errors of step set that mean the database did not take the new password.
NOT_APPLIED = (CredentialsRejected, PermissionDenied, TlsNotVerified)
TASK_ID_OK = re.compile(r"^[A-Za-z0-9._-]+$")


# --------------------------------------------------------------------------- errors


class SecretNotFound(NotFound):
    code = "secret_not_found"


class SecretExists(Conflict):
    code = "secret_exists"


class SecretStateError(Conflict):
    code = "secret_state"


class VersionNotFound(NotFound):
    code = "version_not_found"


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class VersionInfo:
    version_id: str
    created_at: datetime
    stages: list[str]
    kms_key_id: str
    expire_time: int | None = None  # epoch seconds; metadata (the API's expire_time)

    def to_json(self) -> dict[str, Any]:
        return {"version_id": self.version_id, "stages": self.stages,
                "created_at": iso(self.created_at), "kms_key_id": self.kms_key_id,
                "expire_time": self.expire_time}


@dataclass(frozen=True, repr=False)
class SecretValue:
    name: str
    version_id: str
    stages: list[str]
    value: bytes

    def __repr__(self) -> str:  # the value must never reach a log line
        return f"SecretValue({self.name!r}, {self.version_id!r}, <{len(self.value)} bytes>)"


@dataclass(frozen=True)
class SecretInfo:
    record: SecretRecord
    stages: dict[str, str]
    version_count: int

    def to_json(self) -> dict[str, Any]:
        r = self.record
        rotation: dict[str, Any] = {
            "enabled": r.rotation_period is not None,
            "period_hours": None if r.rotation_period is None else r.rotation_period // 3600,
            "next_rotation_at": iso(r.next_rotation_at),
            "last_rotated_at": iso(r.last_rotated_at),
            "in_progress": None if r.rotation_step is None else {
                "last_step_done": r.rotation_step, "pending_version": r.rotation_version,
                "task_id": r.rotation_task, "started_at": iso(r.rotation_started)},
        }
        return {
            "name": r.name, "account": r.account, "secret_type": r.secret_type,
            "kms_key": r.kms_key, "description": r.description, "state": r.state,
            "created_at": iso(r.created_at), "updated_at": iso(r.updated_at),
            "deletion_date": iso(r.deletion_date), "versions": self.version_count,
            "stages": dict(sorted(self.stages.items())), "rotation": rotation,
            "failed_rotations": r.failed_rotations, "last_failure": r.last_failure,
        }


@dataclass
class _Limiter:
    """Bounds the rotations running at once in this process, and remembers the peak."""

    bound: int
    active: int = 0
    peak: int = 0
    _sem: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._sem = asyncio.Semaphore(self.bound)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[int]:
        async with self._sem:
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                yield self.active
            finally:
                self.active -= 1


# --------------------------------------------------------------------------- the service


class SecretsService:
    """Secrets of every account, on one store and one KMS."""

    def __init__(
        self, store: SqliteCsmsStore, kms: KeyCipher, *, clock: Callable[[], datetime] = utcnow,
        actor: str = "local", max_rotations: int = 20, db_timeout: float = 5.0,
        rotators: Callable[[m.SecretType, float], Rotator] = rotator_for,
    ) -> None:
        self.store = store
        self.kms = kms
        self.clock = clock
        self.actor = actor
        self.db_timeout = db_timeout
        self.rotators = rotators
        self.limiter = _Limiter(max_rotations)
        self._locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ secrets

    async def create(
        self, name: str, value: bytes, *, account: str = DEFAULT_ACCOUNT,
        kms_key: str = m.DEFAULT_KMS_KEY, description: str = "",
        secret_type: str | m.SecretType = m.SecretType.COMMON, rotation_config: str = "",
    ) -> SecretInfo:
        account, name = check_account(account), m.check_name(name)
        kind = m.check_type(secret_type)
        value = m.check_value(value, kind)
        check_key_ref(kms_key)
        m.check_description(description)
        if await self.store.get_secret(account, name) is not None:
            raise _exists(account, name)
        now = self.clock()
        secret_id = uuid.uuid4().hex
        version = await self._encrypt(account, secret_id, kms_key, m.version_id(1), 1, value)
        record = SecretRecord(
            secret_id=secret_id, account=account, name=name, secret_type=kind.value,
            kms_key=kms_key, description=description, state=m.SecretState.ENABLED,
            created_at=now, updated_at=now, deletion_date=None, next_version=2,
            rotation_period=None, next_rotation_at=None, last_rotated_at=None,
            failed_rotations=0, last_failure=None, rotation_step=None, rotation_version=None,
            rotation_task=None, rotation_started=None, rotation_config=rotation_config,
        )
        if not await self.store.create_secret(record, version, {m.CURRENT: version.version_id}):
            raise _exists(account, name)
        log.info("secret created", account=account, name=name, secret_type=kind.value)
        return SecretInfo(record, {m.CURRENT: version.version_id}, 1)

    async def describe(self, name: str, *, account: str = DEFAULT_ACCOUNT) -> SecretInfo:
        secret = await self._find(account, name)
        return await self._info(secret)

    async def check_usable(self, name: str, *, account: str = DEFAULT_ACCOUNT) -> None:
        """NotFound / pending deletion errors now, before a job is enqueued."""
        await self._live(account, name, "rotate")

    async def list_secrets(self, *, account: str = DEFAULT_ACCOUNT) -> list[SecretInfo]:
        account = check_account(account)
        return [await self._info(s) for s in await self.store.list_secrets(account)]

    @property
    def principal(self) -> str:
        """Who this service acts for, as the audit names them: ``cli:alice@host``, or
        the API's ``api:...`` actor string (``self.actor`` without its ``csms:``)."""
        return self.actor.removeprefix("csms:")

    async def get_value(
        self, name: str, *, account: str = DEFAULT_ACCOUNT, stage: str | None = None,
        version_id: str | None = None,
    ) -> SecretValue:
        """A version's value in clear. Every read past the input checks is audited in
        the KMS audit chain as ``csms.get_value`` (secret, version, account; the
        principal; success or failure), written before the value is returned."""
        if stage is not None and version_id is not None:
            raise InvalidInput("give --stage or --version-id, not both")
        if stage is not None:
            m.check_stage(stage)
        if version_id is not None:
            m.check_version_id(version_id)
        detail: dict[str, Any] = {"secret": name, "version": version_id, "account": account,
                                  "stage": stage if version_id is None else None}
        key_id: str | None = None
        try:
            secret = await self._live(account, name, "read")
            stages = await self.store.stages(secret.secret_id)
            if version_id is None:
                wanted = stage or m.CURRENT
                version_id = stages.get(wanted)
                if version_id is None:
                    raise VersionNotFound(
                        f"no version of secret {name!r} has the stage {wanted}")
            detail["version"] = version_id
            version = await self._version(secret, version_id)
            key_id = version.kms_key_id
            value = await self._decrypt(secret, version)
        except InvalidInput:
            raise  # a malformed name or account: nothing was looked up, nothing to audit
        except DewError as exc:
            try:
                await self._audit_read("failure", {**detail, "code": exc.code}, key_id)
            except DewError as audit_error:  # the read's own error is the one to report
                log.warning("failed secret read not audited", secret=name,
                            error=audit_error.message)
            raise
        await self._audit_read("success", detail, key_id)
        return SecretValue(name, version_id, m.stages_of(stages, version_id), value)

    async def _audit_read(self, outcome: str, detail: dict[str, Any], key_id: str | None
                          ) -> None:
        await self.kms.record_audit(READ_OPERATION, account=str(detail["account"]),
                                    actor=self.principal, outcome=outcome,
                                    detail={k: v for k, v in detail.items() if v is not None},
                                    key_id=key_id)

    async def put_version(
        self, name: str, value: bytes, *, account: str = DEFAULT_ACCOUNT,
        stages: list[str] | None = None, expire_time: int | None = None,
    ) -> VersionInfo:
        """A new version; it takes SYSCURRENT, and the old current takes SYSPREVIOUS.

        With ``stages`` it takes those instead (each taken off the version that had it;
        SYSCURRENT among them moves as above). ``expire_time`` (epoch seconds) is kept
        as the version's metadata."""
        account, name = check_account(account), m.check_name(name)
        wanted = _check_new_stages(stages)
        if expire_time is not None and (isinstance(expire_time, bool)
                                        or not isinstance(expire_time, int) or expire_time < 0):
            raise InvalidInput("expire_time must be epoch seconds", code="invalid_expire_time")
        secret = await self._live(account, name, "change")
        value = m.check_value(value, m.SecretType(secret.secret_type))
        seq = await self.store.allocate_version(secret.secret_id)
        version = replace(await self._encrypt(account, secret.secret_id, secret.kms_key,
                                              m.version_id(seq), seq, value),
                          expire_time=expire_time)
        for _ in range(CAS_TRIES):
            old = await self.store.stages(secret.secret_id)
            new = dict(old)
            for stage in wanted:
                new = m.move_stage(new, stage, version.version_id)
            m.check_stage_count(new)
            if await self.store.add_version(version, old, new, self.clock(), m.MAX_VERSIONS):
                return _version_info(version, new)
        raise _busy(name)

    async def version_info(
        self, name: str, version_id: str, *, account: str = DEFAULT_ACCOUNT
    ) -> VersionInfo:
        """One version's metadata (no value is decrypted)."""
        m.check_version_id(version_id)
        secret = await self._find(account, name)
        version = await self._version(secret, version_id)
        return _version_info(version, await self.store.stages(secret.secret_id))

    async def set_version_expiry(
        self, name: str, version_id: str, expire_time: int | None, *,
        account: str = DEFAULT_ACCOUNT,
    ) -> VersionInfo:
        """Change a version's expire_time (epoch seconds; metadata only)."""
        m.check_version_id(version_id)
        if expire_time is not None and (isinstance(expire_time, bool)
                                        or not isinstance(expire_time, int) or expire_time < 0):
            raise InvalidInput("expire_time must be epoch seconds", code="invalid_expire_time")
        secret = await self._live(account, name, "change")
        changed = await self.store.set_version_expiry(secret.secret_id, version_id, expire_time,
                                                      self.clock())
        if changed is None:
            raise VersionNotFound(f"secret {name!r} has no version {version_id}")
        return _version_info(changed, await self.store.stages(secret.secret_id))

    async def list_versions(
        self, name: str, *, account: str = DEFAULT_ACCOUNT
    ) -> list[VersionInfo]:
        secret = await self._find(account, name)
        stages = await self.store.stages(secret.secret_id)
        return [_version_info(v, stages) for v in await self.store.versions(secret.secret_id)]

    async def stage_info(
        self, name: str, stage: str, *, account: str = DEFAULT_ACCOUNT
    ) -> tuple[str, datetime]:
        """The version a stage is on, and when it was put there."""
        m.check_stage(stage)
        secret = await self._find(account, name)
        stages = await self.store.stages(secret.secret_id)
        if stage not in stages:
            raise VersionNotFound(f"no version of secret {name!r} has the stage {stage}")
        times = await self.store.stage_times(secret.secret_id)
        return stages[stage], times.get(stage, secret.updated_at)

    async def set_stage(
        self, name: str, stage: str, version_id: str, *, account: str = DEFAULT_ACCOUNT
    ) -> dict[str, str]:
        """Put ``stage`` on ``version_id`` (taking it off the version that had it)."""
        m.check_stage(stage)
        m.check_version_id(version_id)
        secret = await self._live(account, name, "change")
        await self._version(secret, version_id)
        return await self._change_stages(secret, lambda s: m.move_stage(s, stage, version_id))

    async def remove_stage(
        self, name: str, stage: str, version_id: str | None = None, *,
        account: str = DEFAULT_ACCOUNT,
    ) -> dict[str, str]:
        m.check_stage(stage)
        if stage in m.PROTECTED_STAGES:
            m.remove_stage({}, stage)  # raises the clear error before anything is opened
        if version_id is not None:
            m.check_version_id(version_id)
        secret = await self._live(account, name, "change")
        return await self._change_stages(secret, lambda s: m.remove_stage(s, stage, version_id))

    async def schedule_deletion(
        self, name: str, recovery_days: int, *, account: str = DEFAULT_ACCOUNT
    ) -> SecretInfo:
        m.check_recovery_days(recovery_days)
        secret = await self._find(account, name)
        if secret.state == m.SecretState.PENDING_DELETION:
            raise SecretStateError(
                f"secret {name!r} is already scheduled for deletion on "
                f"{iso(secret.deletion_date)}", fix=f"dew secrets restore {name} cancels it.")
        now = self.clock()
        changed = await self.store.set_state(secret.secret_id, m.SecretState.ENABLED,
                                             m.SecretState.PENDING_DELETION, now,
                                             now + timedelta(days=recovery_days))
        if changed is None:
            raise _busy(name)
        return await self._info(changed)

    async def restore(self, name: str, *, account: str = DEFAULT_ACCOUNT) -> SecretInfo:
        secret = await self._find(account, name)
        if secret.state != m.SecretState.PENDING_DELETION:
            raise SecretStateError(f"secret {name!r} is not scheduled for deletion")
        changed = await self.store.set_state(secret.secret_id, m.SecretState.PENDING_DELETION,
                                             m.SecretState.ENABLED, self.clock(), None)
        if changed is None:
            raise _busy(name)
        return await self._info(changed)

    async def set_rotation(
        self, name: str, period_seconds: int | None, *, account: str = DEFAULT_ACCOUNT
    ) -> SecretInfo:
        """Rotate every ``period_seconds`` from now on (None: no scheduled rotation)."""
        secret = await self._live(account, name, "change")
        now = self.clock()
        next_at = None if period_seconds is None else now + timedelta(seconds=period_seconds)
        changed = await self.store.set_rotation(secret.secret_id, period_seconds, next_at, now)
        if changed is None:
            raise _not_found(account, name)
        return await self._info(changed)

    async def update(
        self, name: str, *, account: str = DEFAULT_ACCOUNT, description: str | None = None,
        kms_key: str | None = None,
    ) -> SecretInfo:
        """Change the description, and/or the CMK that encrypts later versions (earlier
        versions keep the key they were encrypted under)."""
        if description is not None:
            m.check_description(description)
        if kms_key is not None:
            check_key_ref(kms_key)
        secret = await self._live(account, name, "change")
        changed = await self.store.update_secret(secret.secret_id, self.clock(),
                                                 description=description, kms_key=kms_key)
        if changed is None:
            raise _not_found(account, name)
        return await self._info(changed)

    async def delete_now(self, name: str, *, account: str = DEFAULT_ACCOUNT) -> None:
        """Delete a secret at once, every version with it (the API's DeleteSecret)."""
        secret = await self._find(account, name)
        if not await self.store.delete_secret_now(secret.secret_id):
            raise _not_found(account, name)
        log.info("secret deleted", account=secret.account, name=secret.name)

    async def find(self, ref: str, *, account: str = DEFAULT_ACCOUNT) -> SecretInfo:
        """A secret by its id (the API's ``secret_id``) or, failing that, its name."""
        account = check_account(account)
        if not isinstance(ref, str) or not 1 <= len(ref) <= 64:
            raise _not_found(account, str(ref)[:64])
        secret = await self.store.get_secret_by_id(account, ref)
        if secret is None and m.NAME.match(ref):
            secret = await self.store.get_secret(account, ref)
        if secret is None:
            raise _not_found(account, ref)
        return await self._info(secret)

    async def tags(self, ref: str, *, account: str = DEFAULT_ACCOUNT) -> dict[str, str]:
        info = await self.find(ref, account=account)
        return await self.store.tags(info.record.secret_id)

    async def change_tags(
        self, ref: str, *, account: str = DEFAULT_ACCOUNT, put: dict[str, str] | None = None,
        remove: list[str] | None = None,
    ) -> dict[str, str]:
        """Add or replace ``put`` and delete ``remove`` (all or nothing); at most
        ``MAX_TAGS`` per secret."""
        put = dict(m.check_tag(k, v) for k, v in (put or {}).items())
        remove = [m.check_tag(k, "")[0] for k in (remove or [])]
        info = await self.find(ref, account=account)
        tags = await self.store.change_tags(info.record.secret_id, put, remove, self.clock())
        if tags is None:
            raise InvalidInput(f"a secret has at most {MAX_TAGS} tags", code="too_many_tags")
        return tags

    async def search(
        self, *, account: str = DEFAULT_ACCOUNT, tags: dict[str, list[str]] | None = None,
        name_contains: str | None = None,
    ) -> list[tuple[SecretInfo, dict[str, str]]]:
        """Secrets of an account with their tags, by name: those carrying every key of
        ``tags`` (with one of its values, or any value when the list is empty) and, with
        ``name_contains``, whose name contains it."""
        account = check_account(account)
        all_tags = await self.store.account_tags(account)
        found = []
        for secret in await self.store.list_secrets(account):
            mine = all_tags.get(secret.secret_id, {})
            if any(key not in mine or (values and mine[key] not in values)
                   for key, values in (tags or {}).items()):
                continue
            if name_contains is not None and name_contains not in secret.name:
                continue
            found.append((await self._info(secret), mine))
        return found

    async def delete_due(self, now: datetime | None = None) -> list[str]:
        """Delete every secret whose recovery window is over; ``account/name`` of each."""
        return await _delete_due(self.store, now or self.clock())

    # ------------------------------------------------------------------ rotation

    async def rotate(
        self, name: str, *, account: str = DEFAULT_ACCOUNT, task_id: str = "direct",
        final_attempt: bool = True, due: int | None = None,
    ) -> dict[str, Any]:
        """Run what is left of the secret's rotation (all four steps, or fewer on a re-run).

        A failure is raised (mapped, with the secret as target). When it is final
        (not retryable, or the last try) it is counted on the secret first, and a
        target already given the pending password gets the current one back.
        """
        secret = await self._live(account, name, "rotate")
        if due is not None and not _still_due(secret, due):
            return _skipped(name, account)
        kind = m.SecretType(secret.secret_type)
        lock = self._locks.setdefault(secret.secret_id, asyncio.Lock())
        # The lock: one run per secret in this process; the lease: in every process.
        async with self.limiter.slot() as concurrent, lock, \
                self.store.rotation_lease(secret.secret_id, task_id):
            started = self.clock()
            secret = await self._live(account, name, "rotate")  # fresh, under the lock
            # Checked again: waiting for a slot or the lock can take a while, and a
            # run that held them (or another process) may have rotated it meanwhile.
            if due is not None and not _still_due(secret, due):
                return _skipped(name, account)
            state = await self._resume_state(secret)
            resumed_from = state.done
            steps: list[str] = []
            # Documents decrypted (or made) in this run: each is decrypted at most once.
            docs: dict[str, m.DbDocument] = {}
            step = state.next_step
            try:
                while step is not None:
                    state = advance(state, await self._run_step(step, secret, kind, state,
                                                                task_id, docs, due))
                    steps.append(step.value)
                    if step is Step.SET:
                        await _pause_hook()
                    step = state.next_step
            except _NoLongerDue:
                return _skipped(name, account)
            except DewError as err:
                err.target = f"{account}/{name}"
                if final_attempt or not err.retryable:
                    await self._fail(secret, kind, state, step, err, task_id, due is not None)
                raise
        log.info("secret rotated", account=account, name=name, steps=steps)
        return {
            "name": name, "account": account, "steps": steps,
            "resumed_after": None if resumed_from is None else resumed_from.value,
            "started_at": iso(started), "finished_at": iso(self.clock()),
            "concurrent": concurrent,
        }

    async def _resume_state(self, secret: SecretRecord) -> RotationState:
        stages = await self.store.stages(secret.secret_id)
        pending = stages.get(m.PENDING)
        if secret.rotation_step is None or pending is None or pending != secret.rotation_version:
            # Nothing recorded, or the pending version went away: start over (create
            # reuses a SYSPENDING version if there is one).
            return RotationState()
        return RotationState(Step(secret.rotation_step), pending)

    async def _run_step(
        self, step: Step, secret: SecretRecord, kind: m.SecretType, state: RotationState,
        task_id: str, docs: dict[str, m.DbDocument], due: int | None = None,
    ) -> StepOutcome:
        now = self.clock()
        if step is Step.CREATE:
            return StepOutcome(step, True,
                               await self._create_pending(secret, kind, task_id, docs, due))
        pending = state.pending_version
        assert pending is not None
        if step is Step.FINISH:
            next_at = (None if secret.rotation_period is None
                       else now + timedelta(seconds=secret.rotation_period))
            await self.store.finish_rotation(secret.secret_id, pending, now, next_at)
            return StepOutcome(step, True)
        if kind is not m.SecretType.COMMON:
            rotator = self.rotators(kind, self.db_timeout)
            await self._documents(secret, kind, pending, docs)
            if step is Step.SET:
                # A pending version made in this very run cannot be on the database
                # yet: probing it first only matters when resuming.
                fresh = docs.get("_made") is docs[m.PENDING]
                await _apply_password(rotator, docs, probe=not fresh,
                                      previous=lambda: self._previous(secret, kind, pending))
            else:
                await rotator.login(docs[m.PENDING])
        await self.store.record_step(secret.secret_id, step.value, pending, task_id, now)
        return StepOutcome(step, True)

    async def _create_pending(
        self, secret: SecretRecord, kind: m.SecretType, task_id: str,
        docs: dict[str, m.DbDocument], due: int | None = None,
    ) -> str:
        """Step 1. A scheduled run (``due``) starts a rotation only if the secret is
        still due then, checked in the store's transaction (raises _NoLongerDue)."""
        stages = await self.store.stages(secret.secret_id)
        existing = stages.get(m.PENDING)
        if existing is not None:
            await self.store.record_step(secret.secret_id, Step.CREATE.value, existing,
                                         task_id, self.clock())
            return existing
        if kind is m.SecretType.COMMON:
            value = m.generate_value().encode()
        else:
            current = m.parse_db_document(
                await self._stage_value(secret, stages, m.CURRENT), kind)
            made = current.with_password(
                m.generate_value(32, m.CHARSETS["alphanumeric-symbols"]))
            value = made.to_bytes()
        seq = await self.store.allocate_version(secret.secret_id)
        version = await self._encrypt(secret.account, secret.secret_id, secret.kms_key,
                                      m.version_id(seq), seq, value)
        pending = await self.store.start_pending(
            version, task_id, self.clock(),
            due_at=None if due is None else secret.next_rotation_at)
        if pending is None:
            raise _NoLongerDue
        if kind is not m.SecretType.COMMON and pending == version.version_id:
            docs.update({m.CURRENT: current, m.PENDING: made, "_made": made})
        return pending

    async def _documents(
        self, secret: SecretRecord, kind: m.SecretType, pending: str,
        docs: dict[str, m.DbDocument],
    ) -> dict[str, m.DbDocument]:
        """The pending and current documents (decrypted once per run)."""
        if m.PENDING in docs and m.CURRENT in docs:
            return docs
        stages = await self.store.stages(secret.secret_id)
        docs[m.PENDING] = m.parse_db_document(
            await self._decrypt(secret, await self._version(secret, pending)), kind)
        if stages.get(m.CURRENT) not in (None, pending):
            docs[m.CURRENT] = m.parse_db_document(
                await self._stage_value(secret, stages, m.CURRENT), kind)
        return docs

    async def _previous(
        self, secret: SecretRecord, kind: m.SecretType, pending: str
    ) -> m.DbDocument | None:
        stages = await self.store.stages(secret.secret_id)
        if stages.get(m.PREVIOUS) in (None, pending):
            return None
        return m.parse_db_document(await self._stage_value(secret, stages, m.PREVIOUS), kind)

    async def _fail(
        self, secret: SecretRecord, kind: m.SecretType, state: RotationState,
        step: Step | None, err: DewError, task_id: str, scheduled: bool,
    ) -> None:
        rolled_back = False
        database = kind is not m.SecretType.COMMON and state.pending_version is not None
        # A failure *in* step set may come after the database applied the password
        # (the connection broke after ALTER ROLE / SET PASSWORD): ask the database.
        # Refusals (TLS, login, privilege) come before anything is applied: no need to ask.
        applied = (step is Step.SET and database and state.pending_version is not None
                   and not isinstance(err, NOT_APPLIED)
                   and await self._pending_works(secret, kind, state.pending_version))
        if applied:
            state = advance(state, StepOutcome(Step.SET, True))
            await self.store.record_step(secret.secret_id, Step.SET.value,
                                         state.pending_version, task_id, self.clock())
        if state.target_changed and database and state.pending_version:
            rolled_back = await self._roll_back(secret, kind, state.pending_version)
        if step is not None:
            failed = state.next_step if applied else step
            if failed is not None:
                state = advance(state, StepOutcome(failed, False, rolled_back=rolled_back))
        now = self.clock()
        failure = {
            "task_id": task_id, "step": None if step is None else step.value,
            "code": err.code, "category": err.category, "error": err.message,
            "cause": err.cause, "fix": err.fix, "at": iso(now), "rolled_back": rolled_back,
        }
        next_at = (m.next_after_failure(now, secret.rotation_period) if scheduled
                   else secret.next_rotation_at)
        await self.store.record_failure(
            secret.secret_id, failure, None if state.done is None else state.done.value,
            state.pending_version, now, next_at)
        log.warning("rotation failed", account=secret.account, name=secret.name,
                    step=failure["step"], code=err.code, error=err.message)

    async def _pending_works(self, secret: SecretRecord, kind: m.SecretType,
                             pending: str) -> bool:
        """Whether the database already takes the pending password (False: it does not,
        or it cannot be asked now; a later run asks again before it sets anything)."""
        try:
            docs = await self._documents(secret, kind, pending, {})
            await self.rotators(kind, self.db_timeout).login(docs[m.PENDING])
            return True
        except CredentialsRejected:
            return False
        except DewError as exc:
            log.warning("cannot tell whether the pending password took", name=secret.name,
                        code=exc.code, error=exc.message)
            return False

    async def _roll_back(self, secret: SecretRecord, kind: m.SecretType, pending: str) -> bool:
        """Give the database the current password back (log in with the pending one)."""
        try:
            docs = await self._documents(secret, kind, pending, {})
            current = docs.get(m.CURRENT)
            if current is None:
                return False
            await self.rotators(kind, self.db_timeout).change_password(
                docs[m.PENDING], current.password)
            return True
        except CredentialsRejected:
            return True  # the pending password never took: the current one is in force
        except DewError as exc:
            log.warning("rollback after a failed rotation did not work", name=secret.name,
                        code=exc.code, error=exc.message)
            return False

    # ------------------------------------------------------------------ plumbing

    async def _find(self, account: str, name: str) -> SecretRecord:
        account, name = check_account(account), m.check_name(name)
        secret = await self.store.get_secret(account, name)
        if secret is None:
            raise _not_found(account, name)
        return secret

    async def _live(self, account: str, name: str, action: str) -> SecretRecord:
        secret = await self._find(account, name)
        if secret.state == m.SecretState.PENDING_DELETION:
            raise SecretStateError(
                f"secret {name!r} is pending deletion (on {iso(secret.deletion_date)}) and "
                f"cannot be used to {action}", fix=f"dew secrets restore {name} cancels the "
                "deletion.", target=f"{account}/{name}")
        return secret

    async def _info(self, secret: SecretRecord) -> SecretInfo:
        stages = await self.store.stages(secret.secret_id)
        return SecretInfo(secret, stages, len(await self.store.versions(secret.secret_id)))

    async def _version(self, secret: SecretRecord, version_id: str) -> VersionRecord:
        version = await self.store.get_version(secret.secret_id, version_id)
        if version is None:
            raise VersionNotFound(f"secret {secret.name!r} has no version {version_id}")
        return version

    async def _stage_value(
        self, secret: SecretRecord, stages: dict[str, str], stage: str
    ) -> bytes:
        version_id = stages.get(stage)
        if version_id is None:
            raise VersionNotFound(f"no version of secret {secret.name!r} has the stage {stage}")
        return await self._decrypt(secret, await self._version(secret, version_id))

    async def _change_stages(
        self, secret: SecretRecord, change: Callable[[dict[str, str]], dict[str, str]]
    ) -> dict[str, str]:
        for _ in range(CAS_TRIES):
            stages = await self.store.stages(secret.secret_id)
            new = change(stages)
            m.check_stage_count(new)
            if new == stages or await self.store.replace_stages(
                    secret.secret_id, stages, new, self.clock()):
                return dict(sorted(new.items()))
        raise _busy(secret.name)

    async def _encrypt(
        self, account: str, secret_id: str, kms_key: str, version_id: str, seq: int,
        value: bytes,
    ) -> VersionRecord:
        dk = await self.kms.create_datakey(
            kms_key, 256, account=account, actor=self.actor,
            encryption_context=kms_context(account, secret_id, version_id))
        nonce, ciphertext = seal(dk.plain_text, value, aad(account, secret_id, version_id))
        return VersionRecord(secret_id, version_id, seq, self.clock(), str(dk.key_id),
                             bytes(dk.cipher_text), nonce, ciphertext)

    async def _decrypt(self, secret: SecretRecord, version: VersionRecord) -> bytes:
        dk = await self.kms.decrypt_datakey(
            version.kms_key_id, version.wrapped_dek, account=secret.account, actor=self.actor,
            encryption_context=kms_context(secret.account, secret.secret_id,
                                           version.version_id))
        return open_sealed(dk.plain_text, version.nonce, version.ciphertext,
                           aad(secret.account, secret.secret_id, version.version_id),
                           f"{secret.account}/{secret.name} {version.version_id}")


# --------------------------------------------------------------------------- helpers


def _version_info(version: VersionRecord, stages: dict[str, str]) -> VersionInfo:
    return VersionInfo(version.version_id, version.created_at,
                       m.stages_of(stages, version.version_id), version.kms_key_id,
                       version.expire_time)


def _check_new_stages(stages: list[str] | None) -> list[str]:
    if stages is None:
        return [m.CURRENT]
    if not stages or len(stages) > m.MAX_VERSION_STAGES:
        raise InvalidInput(f"a new version takes 1 to {m.MAX_VERSION_STAGES} stages",
                           code="too_many_stages")
    return list(dict.fromkeys(m.check_stage(s) for s in stages))


async def _apply_password(
    rotator: Rotator, docs: dict[str, m.DbDocument], *, probe: bool,
    previous: Callable[[], Awaitable[m.DbDocument | None]],
) -> None:
    """Step 2, idempotent: done if the pending password logs in already (``probe``,
    when resuming); otherwise change it logged in as the current user, or as the
    previous one if the current password is rejected (AWS does the same)."""
    pending = docs[m.PENDING]
    if probe:
        try:
            await rotator.login(pending)
            return
        except CredentialsRejected:
            pass
    current = docs.get(m.CURRENT)
    if current is not None:
        try:
            await rotator.change_password(current, pending.password)
            return
        except CredentialsRejected:
            before = await previous()
            if before is None:
                raise
            await rotator.change_password(before, pending.password)
            return
    raise CredentialsRejected("no stored version of the secret can log in",
                              cause="the secret has no SYSCURRENT database document")


async def _pause_hook() -> None:
    text = os.environ.get(PAUSE_AFTER_SET_ENV)
    if text:
        log.warning("test hook: pausing after step set", seconds=float(text))
        await asyncio.sleep(float(text))


class _NoLongerDue(Exception):
    """A scheduled run found its secret rotated (or rescheduled) by someone else."""


def _skipped(name: str, account: str) -> dict[str, Any]:
    return {"name": name, "account": account, "skipped": True,
            "reason": "not due at that time any more (rotated, or schedule changed)"}


def _still_due(secret: SecretRecord, due: int) -> bool:
    return (secret.next_rotation_at is not None
            and int(secret.next_rotation_at.timestamp()) == due)


def _not_found(account: str, name: str) -> SecretNotFound:
    # The same words whether it never existed or belongs to another account.
    return SecretNotFound(f"no secret {name!r} in account {account!r}",
                          fix="Check the name and --project (dew secrets list).")


def _exists(account: str, name: str) -> SecretExists:
    return SecretExists(f"a secret named {name!r} already exists in account {account!r}",
                        fix="Add a version with dew secrets put-version, or pick another name.")


def _busy(name: str) -> Conflict:
    return Conflict(f"secret {name!r} kept changing while this request ran",
                    code="secret_busy", fix="Retry.")


def rotation_task_id(account: str, name: str, due: int) -> str:
    """The deterministic task id of the scheduled rotation due at ``due``: the
    engine's idempotent enqueue turns every further enqueue of it into a no-op."""
    task_id = f"csms.rotate:{account}:{name}:{due}"
    if len(task_id) <= 128 and TASK_ID_OK.match(task_id.replace(":", "")):
        return task_id
    digest = hashlib.sha256(f"{account}\0{name}".encode()).hexdigest()[:32]
    return f"csms.rotate:{digest}:{due}"


class Enqueuer(Protocol):
    async def enqueue(
        self, name: str, args: dict[str, Any] | None = None, task_id: str | None = None,
        defer: float | None = None,
    ) -> Any: ...


async def enqueue_due_rotations(
    store: SqliteCsmsStore, client: Enqueuer, now: datetime, lookahead: float
) -> dict[str, Any]:
    """Enqueue the rotation of every secret due by ``now + lookahead``, each once
    (deterministic task id), deferred to its due time, so it starts on time
    rather than at the next look."""
    queued = []
    for secret in await store.due_rotations(now + timedelta(seconds=lookahead)):
        assert secret.next_rotation_at is not None
        due = int(secret.next_rotation_at.timestamp())
        defer = max(0.0, (secret.next_rotation_at - now).total_seconds())
        args: dict[str, Any] = {"name": secret.name, "account": secret.account, "due": due}
        task = await client.enqueue(ROTATE_JOB, args,
                                    task_id=rotation_task_id(secret.account, secret.name, due),
                                    defer=defer or None)
        queued.append(task.task_id)
    return {"queued": len(queued)}


# --------------------------------------------------------------------------- wiring


@resource("csms_store")
async def _csms_store_resource(resources: Resources) -> tuple[SqliteCsmsStore, Closer]:
    store = await SqliteCsmsStore.open(resources.settings.store_target)
    return store, store.close


@resource("csms")
async def _csms_resource(resources: Resources) -> tuple[SecretsService, None]:
    config = resources.settings.section(CsmsSettings)
    service = SecretsService(
        await resources.get("csms_store"), await resources.get("kms"),
        actor="csms:" + default_actor("worker"),
        max_rotations=config.max_concurrent_rotations,
        db_timeout=config.db_timeout,
    )
    return service, None


@asynccontextmanager
async def open_secrets(
    settings: Settings, *, actor: str | None = None, **options: Any
) -> AsyncIterator[SecretsService]:
    """A secrets service for one command or script; everything is closed on exit.
    The HSM is opened only when a value is encrypted or decrypted."""
    config = settings.section(CsmsSettings)
    async with AsyncExitStack() as stack:
        kms = await stack.enter_async_context(open_key_cipher(settings))
        store = await SqliteCsmsStore.open(settings.store_target)
        stack.push_async_callback(store.close)
        yield SecretsService(store, kms, actor="csms:" + (actor or default_actor("cli")),
                             max_rotations=config.max_concurrent_rotations,
                             db_timeout=config.db_timeout, **options)


# --------------------------------------------------------------------------- jobs


def check_rotate_args(args: dict[str, Any]) -> None:
    unknown = sorted(set(args) - {"name", "account", "due"})
    if unknown:
        raise InvalidInput(f"{ROTATE_JOB} does not take {', '.join(unknown)}")
    m.check_name(args.get("name"))
    check_account(args.get("account", DEFAULT_ACCOUNT))
    due = args.get("due")
    if due is not None and (isinstance(due, bool) or not isinstance(due, int) or due < 0):
        raise InvalidInput("'due' must be epoch seconds")


def check_delete_args(args: dict[str, Any]) -> None:
    if args:
        raise InvalidInput(f"{DELETE_JOB} takes no arguments")


@JOBS.job(ROTATE_JOB, validate=check_rotate_args, fields={
    "name": "string: the secret", "account": "string, optional: the project (name)",
    "due": "integer, optional: epoch seconds of the scheduled rotation"})
async def rotate_secret_job(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    """Rotate a secret: create, set, test, finish (resumes a rotation left halfway)."""
    service: SecretsService = await ctx.resources.get("csms")
    final = ctx.attempt >= ctx.settings.retry.max_tries
    return await service.rotate(args["name"], account=args.get("account", DEFAULT_ACCOUNT),
                                task_id=ctx.task_id, final_attempt=final, due=args.get("due"))


@JOBS.job(DELETE_JOB, validate=check_delete_args)
async def delete_due_secrets_job(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    """Delete secrets whose recovery window is over."""
    return await delete_due_secrets(ctx.resources, ctx.now())


async def delete_due_secrets(resources: Resources, now: datetime | None = None
                             ) -> dict[str, Any]:
    """What the cron entry runs; the KMS/HSM is not opened (deletion needs no key)."""
    store: SqliteCsmsStore = await resources.get("csms_store")
    return {"deleted": await _delete_due(store, now or utcnow())}


async def _delete_due(store: SqliteCsmsStore, now: datetime) -> list[str]:
    deleted = []
    for secret in await store.due_deletions(now):
        if await store.delete_secret(secret.secret_id, now):
            deleted.append(f"{secret.account}/{secret.name}")
            log.info("secret deleted", account=secret.account, name=secret.name)
    return deleted
