"""The KMS service's rotation part: scheduled and on-demand rotation of AES_256 keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from engine.crypto import KeySpec
from engine.crypto.errors import KeyExists
from engine.errors import DewError
from engine.logs import get_logger
from engine.models import iso
from handlers.kms.core import AuditOp, KmsCore, key_name, token_label
from handlers.kms.errors import KeyStateError, RotationInProgress, RotationUnsupported
from handlers.kms.format import (
    DEFAULT_ACCOUNT,
    ROTATION_DAYS_DEFAULT,
    KeyState,
    check_account,
    check_rotation_days,
)
from handlers.kms.results import RotationChange, RotationStatus
from handlers.kms.store import AuditEvent, KeyRecord, KeyVersion

log = get_logger("dew.kms")


# How long a rotation may hold its key's lease; a crashed one blocks rotation that long.
ROTATION_LEASE = timedelta(minutes=5)


@dataclass
class _Lease:
    """Our rotation lease on a key; its end identifies it (a takeover sets another)."""

    key_id: str
    until: datetime


class Rotation:
    """Key rotation: on demand, on a schedule, and its status."""

    def __init__(self, core: KmsCore) -> None:
        self.core = core

    async def enable_key_rotation(
        self, key: str, interval_days: int | None = None, *,
        account: str = DEFAULT_ACCOUNT, actor: str | None = None, now: datetime | None = None,
    ) -> RotationChange:
        """Rotate ``key`` every ``interval_days`` (30..365), the first one that far from now.
        Without ``interval_days``: the interval set before (update_key_rotation_interval),
        else 365 days."""
        days = None if interval_days is None else check_rotation_days(interval_days)
        return await self._set_rotation("enable_key_rotation", key, True, days, account,
                                        actor, now)

    async def update_key_rotation_interval(
        self, key: str, days: int, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, now: datetime | None = None,
    ) -> RotationChange:
        """Change the rotation interval (30..365 days) of a key that can rotate. When
        rotation is on, the next rotation moves to one new interval after the last
        rotation (or after rotation was turned on), or now if that is past; when it is
        off, the interval is kept for when it is turned on."""
        async with self.core.audit("update_key_rotation_interval", account, actor, key) as op:
            account = check_account(account)
            interval = check_rotation_days(days)
            record = await self.core.lookup(key, account, create_default=False)
            op.key_id = record.key_id
            self._check_rotatable(record)
            if record.state == KeyState.PENDING_DELETION:
                raise self.core.state_refusal(record, "update_key_rotation_interval")
            current = await self.core.store.get_rotation(record.key_id)
            if current is not None and current.interval_days == interval:
                op.outcome = "unchanged"
                return RotationChange(RotationStatus.of(record, current), False)
            when = now or self.core.clock()
            enabled = current is not None and current.enabled
            following = None
            if enabled and current is not None:
                # The schedule's anchor (last rotation, or when rotation was turned on) stays.
                anchor = current.last_rotated_at or (
                    current.next_rotation_at - timedelta(days=current.interval_days)
                    if current.next_rotation_at else when)
                following = max(anchor + timedelta(days=interval), when)
            op.detail = {"enabled": enabled, "interval_days": interval,
                         "from_interval_days": current.interval_days if current else None,
                         "next_rotation": iso(following)}
            event = AuditEvent(when, record.account, actor or self.core.actor,
                               "update_key_rotation_interval", record.key_id, "success",
                               op.detail)
            await self.core.flush_audit()
            saved = await self.core.store.set_rotation(record.key_id, enabled, interval,
                                                       following, event)
            op.recorded = True
            return RotationChange(RotationStatus.of(record, saved), True)

    async def disable_key_rotation(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        now: datetime | None = None,
    ) -> RotationChange:
        return await self._set_rotation("disable_key_rotation", key, False, None, account,
                                        actor, now)

    async def get_key_rotation_status(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> RotationStatus:
        async with self.core.audit("get_key_rotation_status", account, actor, key) as op:
            record = await self.core.lookup(key, check_account(account), create_default=True)
            op.key_id = record.key_id
            return RotationStatus.of(record, await self.core.store.get_rotation(record.key_id))

    async def rotate_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        now: datetime | None = None, request: str | None = None,
    ) -> RotationChange:
        """Add a new key version in the token and make it current (encryption uses it;
        older versions keep decrypting). ``request`` (a task id) makes re-runs no-ops."""
        async with self.core.audit("rotate_key", account, actor, key) as op:
            record = await self.core.lookup(key, check_account(account), create_default=True)
            op.key_id = record.key_id
            self._check_rotatable(record)
            if record.state != KeyState.ENABLED:
                raise self.core.state_refusal(record, "rotate_key")
            rotation = await self.core.store.get_rotation(record.key_id)
            if request is not None and rotation is not None and rotation.last_request == request:
                op.outcome = "unchanged"
                return RotationChange(RotationStatus.of(record, rotation), False)
            when = now or self.core.clock()
            lease = _Lease(record.key_id, when + ROTATION_LEASE)
            if not await self.core.store.claim_rotation(record.key_id, when, lease.until):
                raise RotationInProgress(f"a rotation of {key_name(record)} is already running",
                                         target=record.key_id)
            try:
                rotated = await self._add_version(record.key_id, when, actor, request, op, lease)
            except BaseException:
                # Only our own lease: a rotator that took over an expired one keeps it.
                await self.core.store.release_rotation(record.key_id, lease.until)
                raise
            return RotationChange(
                RotationStatus.of(rotated, await self.core.store.get_rotation(record.key_id)), True)

    async def rotate_due_keys(
        self, now: datetime | None = None, *, actor: str | None = None
    ) -> dict[str, Any]:
        """Rotate every key whose scheduled rotation is due (what the cron entry runs)."""
        when = now or self.core.clock()
        rotated: list[str] = []
        failed: dict[str, str] = {}
        for key_id in await self.core.store.due_rotations(when):
            record = await self.core.store.get_key(key_id)
            rotation = await self.core.store.get_rotation(key_id)
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
        self, key_id: str, when: datetime, actor: str | None, request: str | None, op: AuditOp,
        lease: _Lease,
    ) -> KeyRecord:
        """With the rotation lease held: generate version n+1, then register it. Before
        any token object is destroyed the lease is checked (and renewed): a rotator that
        stalled past its lease must not destroy what the one after it registered (L5)."""
        record = await self.core.store.get_key(key_id)
        if record is None or record.state != KeyState.ENABLED:
            raise KeyStateError(f"key {key_id} is no longer enabled", target=key_id)
        old, new = record.current_version, record.current_version + 1
        label = token_label(key_id, new)
        core = await self.core.crypto()
        try:
            await core.generate_key(KeySpec.AES_256, label, f"{key_id}:v{new}".encode())
        except KeyExists:
            # If we still hold the lease and the registry still says v{old}, the object
            # is an orphan of a rotation that crashed before registering it. Replace it.
            await self._fence(lease, record)
            fresh = await self.core.store.get_key(key_id)
            if fresh is None or fresh.current_version != old:
                raise KeyStateError(f"key {key_name(record)} changed during its rotation; "
                                    "retry", target=key_id) from None
            await core.destroy_key(label)
            await core.generate_key(KeySpec.AES_256, label, f"{key_id}:v{new}".encode())
        op.detail = {"from_version": old, "to_version": new,
                     **({"request": request} if request else {})}
        event = AuditEvent(when, record.account, actor or self.core.actor, "rotate_key", key_id,
                           "success", op.detail)
        await self.core.flush_audit()
        rotated = await self.core.store.add_version(
            key_id, old, KeyVersion(key_id, new, label, when), event, request,
            lease=lease.until)
        if rotated is None:
            # Our object is unregistered; destroy it only if the lease is still ours and
            # nothing registered v{new}: otherwise the label is another rotator's version.
            await self._fence(lease, record)
            if all(v.version != new for v in await self.core.store.versions(key_id)):
                await self.core.discard(core, label)
            raise KeyStateError(f"key {key_name(record)} changed during its rotation; retry",
                                target=key_id)
        op.recorded = True
        self.core.forget_keys()
        log.info("key rotated", key_id=key_id, version=new)
        return rotated

    async def _set_rotation(
        self, operation: str, key: str, enabled: bool, interval: int | None, account: str,
        actor: str | None, now: datetime | None,
    ) -> RotationChange:
        async with self.core.audit(operation, account, actor, key) as op:
            record = await self.core.lookup(key, check_account(account), create_default=True)
            op.key_id = record.key_id
            self._check_rotatable(record)
            current = await self.core.store.get_rotation(record.key_id)
            if enabled and interval is None:
                interval = current.interval_days if current else ROTATION_DAYS_DEFAULT
            if (current is not None and current.enabled == enabled
                    and (not enabled or current.interval_days == interval)) or (
                    current is None and not enabled):
                op.outcome = "unchanged"
                return RotationChange(RotationStatus.of(record, current), False)
            when = now or self.core.clock()
            days = interval or (current.interval_days if current else ROTATION_DAYS_DEFAULT)
            # The first rotation is one interval from now (or from the last rotation).
            base = current.last_rotated_at if current and current.last_rotated_at else when
            following = max(base + timedelta(days=days), when) if enabled else None
            op.detail = {"enabled": enabled, "interval_days": days,
                         "next_rotation": iso(following)}
            event = AuditEvent(when, record.account, actor or self.core.actor, operation,
                               record.key_id, "success", op.detail)
            await self.core.flush_audit()
            saved = await self.core.store.set_rotation(record.key_id, enabled, days, following,
                                                       event)
            op.recorded = True
            return RotationChange(RotationStatus.of(record, saved), True)

    async def _fence(self, lease: _Lease, key: KeyRecord) -> None:
        """Renew the lease if it is still ours; RotationInProgress if another rotator
        took it over (ours expired): then nothing may be destroyed."""
        until = max(lease.until, self.core.clock() + ROTATION_LEASE)
        if not await self.core.store.renew_rotation(lease.key_id, lease.until, until):
            log.warning("rotation lease lost; nothing destroyed", key_id=lease.key_id)
            raise RotationInProgress(
                f"the rotation of {key_name(key)} outlived its lease and another rotation "
                "took over; nothing was destroyed", target=lease.key_id)
        lease.until = until

    @staticmethod
    def _check_rotatable(key: KeyRecord) -> None:
        if key.origin != "kms":
            raise RotationUnsupported(
                f"key {key_name(key)} holds imported key material, which cannot rotate",
                fix="Rotate imported keys yourself: create a new key, import new material.",
                target=key.key_id)
        if key.spec != KeySpec.AES_256:
            raise RotationUnsupported(
                f"key {key_name(key)} is a {key.spec} key; only AES_256 keys rotate",
                target=key.key_id)
