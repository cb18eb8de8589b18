"""The KMS service's grants part: letting another IAM user (or project) use a key.

A grant names its grantee by id (``user``: an IAM user id; ``domain``: a project
id; 32 lower-case hex characters), the operations it allows (Huawei's names:
``create-datakey``, ``encrypt-data``, ...), optionally a name and a retiring
principal. A key has at most 100 grants; a key pending deletion (or a default key)
gets none. The key's account revokes a grant (:meth:`Grants.revoke_grant`); its
grantee or retiring principal retires it (:meth:`Grants.retire_grant`), identified
by user and project id, not by account.

:meth:`Grants.grant_account` is the API's authorization check for a caller who is
not in the key's account: it reads the registry on every call (no cache), so a
revoked or retired grant stops the very next request. Grants go when the key is
deleted.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from engine.errors import InvalidInput
from handlers.kms.core import KmsCore, key_name
from handlers.kms.errors import DefaultKeyProtected, GrantQuotaExceeded, UnknownGrant
from handlers.kms.format import (
    DEFAULT_ACCOUNT,
    GRANT_LIST_MAX,
    GRANT_OPERATIONS,
    GRANTS_PER_KEY,
    PRINCIPAL,
    check_account,
    check_grant_id,
    check_grant_name,
    check_grantee_type,
    check_key_ref,
    check_limit,
    check_operations,
    check_principal,
    default_service,
    is_key_id,
    page_marker,
    read_marker,
)
from handlers.kms.keys import CHANGEABLE
from handlers.kms.results import Grant, GrantPage, QuotaUsage
from handlers.kms.store import AuditEvent, GrantRecord, KeyRecord


class Grants:
    """Grants on keys, and the account's quotas."""

    def __init__(self, core: KmsCore) -> None:
        self.core = core

    async def create_grant(
        self, key: str, grantee_principal: str, operations: Sequence[str], *,
        name: str | None = None, retiring_principal: str | None = None,
        grantee_principal_type: str = "user", account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, issuing_principal: str | None = None,
    ) -> Grant:
        """Allow ``grantee_principal`` the ``operations`` on ``key``. ``issuing_principal``
        (who grants; default: the actor) is shown in the grant."""
        async with self.core.audit("create_grant", account, actor, key) as op:
            account = check_account(account)
            grantee = check_principal(grantee_principal, "grantee_principal")
            kind = check_grantee_type(grantee_principal_type)
            ops = check_operations(operations)
            name = check_grant_name(name)
            retiring = (None if retiring_principal in (None, "")
                        else check_principal(retiring_principal, "retiring_principal"))
            ref = check_key_ref(key)
            if default_service(ref) is not None:
                raise DefaultKeyProtected(f"{ref!r} is a default key: it cannot be granted")
            record = await self.core.lookup(ref, account, create_default=False)
            op.key_id = record.key_id
            if record.default_key:
                raise DefaultKeyProtected(f"{record.alias!r} is a default key: it cannot be "
                                          "granted", target=record.key_id)
            if record.state not in CHANGEABLE:
                raise self.core.state_refusal(record, "create_grant")
            when = self.core.clock()
            grant = GrantRecord(
                grant_id=secrets.token_hex(32), key_id=record.key_id, name=name,
                grantee_principal=grantee, grantee_principal_type=kind,
                operations=tuple(ops),
                issuing_principal=issuing_principal or actor or self.core.actor,
                retiring_principal=retiring, created_at=when)
            op.detail = {"grant_id": grant.grant_id, "grantee_principal": grantee,
                         "grantee_principal_type": kind, "operations": ops,
                         **({"retiring_principal": retiring} if retiring else {})}
            event = AuditEvent(when, account, actor or self.core.actor, "create_grant",
                               record.key_id, "success", op.detail)
            await self.core.flush_audit()
            outcome = await self.core.store.add_grant(grant, GRANTS_PER_KEY, CHANGEABLE, event)
            if outcome == "too_many":
                raise GrantQuotaExceeded(
                    f"key {key_name(record)} already has {GRANTS_PER_KEY} grants, the most a "
                    "key can have", target=record.key_id)
            if outcome == "key_state":
                fresh = await self.core.store.get_key(record.key_id) or record
                raise self.core.state_refusal(fresh, "create_grant")
            op.recorded = True
            return Grant.of(grant)

    async def list_grants(
        self, key: str, *, limit: int | None = None, marker: str | None = None,
        account: str = DEFAULT_ACCOUNT, actor: str | None = None,
    ) -> GrantPage:
        """The key's grants, oldest first, ``limit`` (1..100, default 100) at a time."""
        async with self.core.audit("list_grants", account, actor, key) as op:
            account = check_account(account)
            size = GRANT_LIST_MAX if limit is None else check_limit(limit, GRANT_LIST_MAX)
            after = None if marker is None else read_marker(marker)
            record = await self.core.lookup(key, account, create_default=False)
            op.key_id = record.key_id
            rows = await self.core.store.list_grants(record.key_id, size + 1, after)
            total = await self.core.store.count_grants(record.key_id)
            op.detail = {"count": min(len(rows), size)}
            return _page(rows, size, total)

    async def revoke_grant(
        self, key: str, grant_id: str, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None,
    ) -> None:
        """The key's account withdraws a grant (UnknownGrant if the key has no such grant)."""
        async with self.core.audit("revoke_grant", account, actor, key) as op:
            account = check_account(account)
            grant_id = check_grant_id(grant_id)
            record = await self.core.lookup(key, account, create_default=False)
            op.key_id = record.key_id
            op.detail = {"grant_id": grant_id}
            if not await self._remove(record, grant_id, "revoke_grant", op.detail, account,
                                      actor):
                raise UnknownGrant(f"key {key_name(record)} has no grant {grant_id}",
                                   target=record.key_id)
            op.recorded = True

    async def retire_grant(
        self, key: str, grant_id: str, *, user_id: str | None = None,
        project_id: str | None = None, account: str | None = None, actor: str | None = None,
    ) -> None:
        """Retire a grant as its retiring principal or grantee (``user_id`` / ``project_id``:
        the caller's IAM user and project ids), or as the key's ``account``. ``key`` is
        the key id (an alias only with ``account``). Whatever is refused (no such key,
        no such grant, not the caller's to retire) is the same UnknownGrant."""
        ref = check_key_ref(key)
        grant_id = check_grant_id(grant_id)
        if account is not None:
            account = check_account(account)
        if not is_key_id(ref) and account is None:
            raise InvalidInput("key_id: retiring a grant needs the key's id", target="key_id",
                               code="invalid_key")
        record: KeyRecord | None
        if is_key_id(ref):
            record = await self.core.store.get_key(ref)
        else:
            assert account is not None
            record = await self.core.store.find_alias(account, ref)
        owner = record.account if record is not None else (account or "")
        who = actor or (f"user:{user_id}" if user_id else None)
        async with self.core.audit("retire_grant", owner, who, key) as op:
            op.detail = {"grant_id": grant_id}
            refused = UnknownGrant(f"no grant {grant_id} on key {ref!r} that this caller can "
                                   "retire")
            if record is None or record.state == "deleted":
                raise refused
            op.key_id = record.key_id
            grant = await self.core.store.get_grant(record.key_id, grant_id)
            callers = {p for p in (user_id, project_id) if p}
            if grant is None or not (
                    (grant.retiring_principal is not None and grant.retiring_principal in callers)
                    or _is_grantee(grant, user_id, project_id)
                    or (account is not None and account == record.account)):
                raise refused
            if not await self._remove(record, grant_id, "retire_grant", op.detail,
                                      record.account, who):
                raise refused  # revoked or retired meanwhile
            op.recorded = True

    async def list_retirable_grants(
        self, *, user_id: str | None = None, project_id: str | None = None,
        limit: int | None = None, marker: str | None = None, account: str | None = None,
        actor: str | None = None,
    ) -> GrantPage:
        """The grants, on keys of any account, whose retiring principal is ``user_id`` or
        ``project_id`` (the caller's ids); ``account`` only names the caller in the audit."""
        async with self.core.audit("list_retirable_grants", account or "", actor, None) as op:
            if account is not None:
                check_account(account)
            principals = [p for p in (user_id, project_id) if p and PRINCIPAL.match(p)]
            size = GRANT_LIST_MAX if limit is None else check_limit(limit, GRANT_LIST_MAX)
            after = None if marker is None else read_marker(marker)
            rows = await self.core.store.retirable_grants(principals, size + 1, after)
            total = await self.core.store.count_retirable(principals)
            op.detail = {"count": min(len(rows), size)}
            return _page(rows, size, total)

    async def grant_account(
        self, key_id: str, operation: str, *, user_id: str | None, project_id: str | None
    ) -> str | None:
        """The account owning ``key_id`` if a grant on it names ``user_id`` (type user) or
        ``project_id`` (type domain) and allows ``operation``; else None. Read from the
        registry every time: a revoked grant stops the next request."""
        if (not isinstance(key_id, str) or not is_key_id(key_id)
                or operation not in GRANT_OPERATIONS or not (user_id or project_id)):
            return None
        for account, grant in await self.core.store.grantee_grants(
                key_id, user_id or None, project_id or None):
            if operation in grant.operations:
                return account
        return None

    async def user_quotas(
        self, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> list[QuotaUsage]:
        """``CMK``: custom keys used / the account's quota; ``grant_per_CMK``: the most
        grants any key of the account has / the limit per key."""
        async with self.core.audit("user_quotas", account, actor, None):
            account = check_account(account)
            keys = await self.core.store.count_custom_keys(account)
            grants = await self.core.store.max_grants_per_key(account)
            return [QuotaUsage("CMK", keys, self.core.quota),
                    QuotaUsage("grant_per_CMK", grants, GRANTS_PER_KEY)]

    async def _remove(self, record: KeyRecord, grant_id: str, operation: str,
                      detail: dict[str, object], account: str, actor: str | None) -> bool:
        """Delete the grant with its audit entry (one transaction); False: no such grant."""
        event = AuditEvent(self.core.clock(), account, actor or self.core.actor, operation,
                           record.key_id, "success", dict(detail))
        await self.core.flush_audit()
        return await self.core.store.remove_grant(record.key_id, grant_id, event)


def _is_grantee(grant: GrantRecord, user_id: str | None, project_id: str | None) -> bool:
    wanted = user_id if grant.grantee_principal_type == "user" else project_id
    return wanted is not None and wanted == grant.grantee_principal


def _page(rows: list[GrantRecord], size: int, total: int) -> GrantPage:
    shown = rows[:size]
    more = len(rows) > size
    marker = page_marker(shown[-1].created_at, shown[-1].grant_id) if more else None
    return GrantPage([Grant.of(g) for g in shown], marker, total)
