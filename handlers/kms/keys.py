"""Key management: create, describe, list, enable/disable, scheduled deletion, the audit log."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from engine.crypto import KeySpec
from engine.crypto.model import KeyFamily
from engine.errors import DewError, InvalidInput
from engine.logs import get_logger
from engine.models import iso
from handlers.kms.byok_ops import KeyImport
from handlers.kms.core import AuditOp, KmsCore, _short, not_found
from handlers.kms.errors import AliasExists, DefaultKeyProtected, ImportInProgress
from handlers.kms.format import (
    DEFAULT_ACCOUNT,
    LIST_LIMIT_MAX,
    KeyState,
    check_account,
    check_custom_alias,
    check_description,
    check_key_ref,
    check_limit,
    check_origin,
    check_spec,
    check_spec_filter,
    check_usage,
    default_service,
    is_key_id,
    page_marker,
    read_marker,
)
from handlers.kms.results import (
    DeletionReport,
    KeyChange,
    KeyMetadata,
    KeyPage,
)
from handlers.kms.store import AuditEntry, AuditEvent, AuditFilter, AuditVerdict, KeyRecord

log = get_logger("dew.kms")

# Another service's audited operation: ``csms.get_value`` (never a bare KMS word).
OTHER_OPERATION = re.compile(r"^[a-z][a-z0-9_]{0,31}\.[a-z][a-z0-9_.]{0,63}$")

# The states in which a key's alias, description, tags and grants may change.
CHANGEABLE = (KeyState.ENABLED.value, KeyState.DISABLED.value, KeyState.PENDING_IMPORT.value)


class KeyManagement:
    """The life of customer master keys, and the audit log of every operation."""

    def __init__(self, core: KmsCore, byok: KeyImport) -> None:
        self.core = core
        self.byok = byok

    async def create_key(
        self, alias: str, spec: KeySpec | str = KeySpec.AES_256, usage: str | None = None,
        description: str = "", *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        origin: str = "kms",
    ) -> KeyMetadata:
        """A new custom key, generated in the token (never extractable); with
        ``origin="external"`` a key without material, pending import (BYOK)."""
        async with self.core.audit("create_key", account, actor, None) as op:
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
            if await self.core.store.find_alias(account, alias) is not None:
                raise AliasExists(f"the alias {alias!r} is already used in account {account!r}")
            if await self.core.store.count_custom_keys(account) >= self.core.quota:
                raise self.core.quota_error(account)
            key = await self.core.generate(account, alias, key_spec, key_usage, description,
                                       default=False, op=op, actor=actor, origin=origin)
            return KeyMetadata.of(key)

    async def describe_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> KeyMetadata:
        async with self.core.audit("describe_key", account, actor, key) as op:
            record = await self.core.lookup(key, check_account(account), create_default=True)
            op.key_id = record.key_id
            return KeyMetadata.of(record)

    async def list_keys(
        self, *, state: str | None = None, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, key_spec: str | None = None, limit: int | None = None,
        marker: str | None = None,
    ) -> list[KeyMetadata]:
        """The account's keys, oldest first; all of them unless ``limit`` (1..1000) is
        given (``marker``: a :meth:`list_keys_page` page's ``next_marker``)."""
        page = await self._page("list_keys", account, actor, state, key_spec, limit, marker)
        return page.keys

    async def list_keys_page(
        self, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        state: str | None = None, key_spec: str | None = None, limit: int = 50,
        marker: str | None = None,
    ) -> KeyPage:
        """One page of the account's keys in a stable order (creation time, then key id):
        following ``next_marker`` until it is None shows every key once. ``key_spec``
        None or ``ALL``: every spec. ``total`` counts every key the filters match."""
        return await self._page("list_keys", account, actor, state, key_spec, limit, marker)

    async def _page(
        self, operation: str, account: str, actor: str | None, state: str | None,
        key_spec: str | None, limit: int | None, marker: str | None,
    ) -> KeyPage:
        async with self.core.audit(operation, account, actor, None) as op:
            account = check_account(account)
            if state is not None and (state not in KeyState.__members__.values()
                                      or state == KeyState.DELETED):
                choices = ", ".join(s.value for s in KeyState if s is not KeyState.DELETED)
                raise InvalidInput(f"invalid key state {state!r}; choose one of {choices}",
                                   code="invalid_key_state", target="key_state")
            spec = check_spec_filter(key_spec)
            if limit is not None:
                limit = check_limit(limit, LIST_LIMIT_MAX)
            after = None if marker is None else read_marker(marker)
            store = self.core.store
            # One more than asked: whether there is a next page, without a second query.
            keys = await store.list_keys(account, state, spec=spec,
                                         limit=None if limit is None else limit + 1, after=after)
            more = limit is not None and len(keys) > limit
            keys = keys[:limit] if limit is not None else keys
            total = (len(keys) if limit is None and after is None
                     else await store.count_keys(account, state, spec))
            op.detail = {"count": len(keys), **({"marker": marker} if marker else {})}
            next_marker = page_marker(keys[-1].created_at, keys[-1].key_id) if more else None
            return KeyPage([KeyMetadata.of(k) for k in keys], next_marker, total)

    async def update_key_alias(
        self, key: str, alias: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> KeyMetadata:
        """Give a custom key another alias (the create-key rules; unique in the account).
        Default keys keep theirs; a key pending deletion cannot change."""
        async with self.core.audit("update_key_alias", account, actor, key) as op:
            account = check_account(account)
            alias = check_custom_alias(alias)
            record = await self._changeable(key, account, "update_key_alias", op)
            if record.alias == alias:
                op.outcome = "unchanged"
                return KeyMetadata.of(record)
            op.detail = {"from": record.alias, "to": alias}
            return await self._update(record, op, actor, alias=alias)

    async def update_key_description(
        self, key: str, description: str, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None,
    ) -> KeyMetadata:
        """Change a custom key's description (at most 255 printable characters)."""
        async with self.core.audit("update_key_description", account, actor, key) as op:
            account = check_account(account)
            description = check_description(description)
            record = await self._changeable(key, account, "update_key_description", op)
            if record.description == description:
                op.outcome = "unchanged"
                return KeyMetadata.of(record)
            op.detail = {"length": len(description)}
            return await self._update(record, op, actor, description=description)

    async def _changeable(
        self, ref: str, account: str, operation: str, op: AuditOp
    ) -> KeyRecord:
        ref = check_key_ref(ref)
        what = operation.removeprefix("update_key_")
        if default_service(ref) is not None:
            raise DefaultKeyProtected(f"{ref!r} is a default key: its {what} cannot change")
        record = await self.core.lookup(ref, account, create_default=False)
        op.key_id = record.key_id
        if record.default_key:
            raise DefaultKeyProtected(f"{record.alias!r} is a default key: its {what} cannot "
                                      "change", target=record.key_id)
        if record.state not in CHANGEABLE:
            raise self.core.state_refusal(record, operation)
        return record

    async def _update(
        self, record: KeyRecord, op: AuditOp, actor: str | None, *, alias: str | None = None,
        description: str | None = None,
    ) -> KeyMetadata:
        when = self.core.clock()
        operation = "update_key_alias" if alias is not None else "update_key_description"
        event = AuditEvent(when, record.account, actor or self.core.actor, operation,
                           record.key_id, "success", op.detail)
        await self.core.flush_audit()
        outcome, changed = await self.core.store.update_key(
            record.key_id, CHANGEABLE, when, event, alias=alias, description=description)
        if outcome == "alias_taken":
            raise AliasExists(f"the alias {alias!r} is already used in account "
                              f"{record.account!r}", target=record.key_id)
        if changed is None:  # its state changed meanwhile
            fresh = await self.core.store.get_key(record.key_id) or record
            raise self.core.state_refusal(fresh, operation)
        op.recorded = True
        self.core.forget_keys()
        log.info("key changed", key_id=record.key_id, operation=operation)
        return KeyMetadata.of(changed)

    async def enable_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> KeyChange:
        return await self.core.transition(
            "enable_key", key, account, actor,
            allowed={KeyState.DISABLED}, done={KeyState.ENABLED}, target=KeyState.ENABLED,
            protect_default=False,
        )

    async def disable_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> KeyChange:
        return await self.core.transition(
            "disable_key", key, account, actor,
            allowed={KeyState.ENABLED}, done={KeyState.DISABLED}, target=KeyState.DISABLED,
            protect_default=True,
        )

    async def schedule_key_deletion(
        self, key: str, pending_days: int, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, now: datetime | None = None,
    ) -> KeyChange:
        """Pending deletion for 7..1096 days; a key already pending is left as it is."""
        return await self.core.transition(
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
        return await self.core.transition(
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
        now = now or self.core.clock()
        who = actor or self.core.actor
        deleted: list[str] = []
        await self.core.flush_audit()
        for key in await self.core.store.due_for_deletion(now):
            event = AuditEvent(now, key.account, who, "delete_key", key.key_id, "success",
                               {"scheduled_deletion_date": iso(key.scheduled_deletion_date)})
            marked = await self.core.store.change_state(
                key.key_id, [KeyState.PENDING_DELETION.value], KeyState.DELETED.value, now, event,
                scheduled_deletion_date=key.scheduled_deletion_date, deleted_at=now,
                due_by=now,
            )
            if marked is not None:
                deleted.append(key.key_id)
                log.info("key deleted", key_id=key.key_id, account=key.account)
        self.core.forget_keys()
        destroyed = 0
        for key in await self.core.store.deleted_with_material():
            destroyed += await self._destroy_material(key, now, who)
        expired: list[str] = []
        for key in await self.core.store.expired_material(now):
            try:
                if await self.byok.remove_imported(key, now, who, "material_expired"):
                    expired.append(key.key_id)
            except ImportInProgress:
                continue  # an import or removal holds the key: the next run sees it again
        for label in await self.core.store.expired_wrapping_labels(now):
            core = await self.core.crypto()
            await core.destroy_key(label)  # every import token using it has expired
        return DeletionReport(deleted, destroyed, expired)

    async def _destroy_material(self, key: KeyRecord, now: datetime, actor: str) -> int:
        count = 0
        for version in await self.core.store.versions(key.key_id):
            if version.destroyed_at is not None:
                continue
            try:
                core = await self.core.crypto()
                await core.destroy_key(version.token_label)
            except DewError as exc:
                await self.core.record(AuditEvent(
                    now, key.account, actor, "destroy_key_material", key.key_id, "failure",
                    {"version": version.version, "code": exc.code}))
                raise
            # Two runs at once (cron and a job) both get here; one records it.
            if await self.core.store.mark_version_destroyed(key.key_id, version.version, now):
                await self.core.record(AuditEvent(
                    now, key.account, actor, "destroy_key_material", key.key_id, "success",
                    {"version": version.version}))
                count += 1
        return count

    async def record_audit(
        self, operation: str, *, account: str, actor: str, outcome: str,
        detail: dict[str, Any], key_id: str | None = None,
    ) -> None:
        """An entry in the audit chain for another service's operation (``csms.get_value``:
        who read which secret version). Written before returning: an operation whose
        audit cannot be written fails (a value is not handed out unaudited)."""
        service, _, name = operation.partition(".")
        if not (service and name and OTHER_OPERATION.match(operation)):
            raise InvalidInput(f"an audited operation of another service is SERVICE.NAME, "
                               f"got {operation[:60]!r}")
        if outcome not in ("success", "failure"):
            raise InvalidInput(f"outcome must be success or failure, got {outcome[:20]!r}")
        await self.core.record(AuditEvent(
            self.core.clock(), _short(account) or "", _short(actor) or self.core.actor,
            operation, _short(key_id), outcome,
            {k: _short(v) if isinstance(v, str) else v for k, v in detail.items()}))
        await self.core.flush_audit()

    async def audit_list(
        self, key: str | None = None, *, account: str | None = None, limit: int = 100,
        where: AuditFilter | None = None,
    ) -> list[AuditEntry]:
        """Audit entries, oldest first (the newest ``limit``); ``key`` is an id or an alias;
        ``where`` narrows them further (secret, operation, actor, outcome, time range)."""
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
                found = await self.core.store.find_alias(account or DEFAULT_ACCOUNT, ref)
                found = found or await self.core.store.find_deleted_alias(
                    account or DEFAULT_ACCOUNT, ref)
                if found is None:
                    raise not_found(ref, account or DEFAULT_ACCOUNT)
                key_id = found.key_id
        await self.core.flush_audit()
        return await self.core.store.list_audit(key_id=key_id, account=account, limit=limit,
                                                where=where)

    async def audit_verify(self) -> AuditVerdict:
        await self.core.flush_audit()
        return await self.core.store.verify_audit()
