"""The KMS service's tags part: Huawei TagItems (key, value) on keys, and finding keys
by them.

A key has at most 20 tags, each key different (1..128 characters; values 0..255).
Tags change only on a key that is enabled, disabled or pending import; a change is
all or nothing, written with its audit entry in one transaction. Tags go when the
key is deleted (``kms.delete_due_keys``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from engine.errors import InvalidInput
from handlers.kms.core import AuditOp, KmsCore, key_name
from handlers.kms.errors import KeyDeleted, TagQuotaExceeded, UnknownTag
from handlers.kms.format import (
    DEFAULT_ACCOUNT,
    LIST_LIMIT_MAX,
    TAGS_PER_KEY,
    check_account,
    check_limit,
    check_offset,
    check_tag_key,
    check_tag_value,
    check_tags,
)
from handlers.kms.keys import CHANGEABLE
from handlers.kms.results import KeyMetadata, TaggedKey, TaggedKeys
from handlers.kms.store import AuditEvent, KeyRecord

MATCH_KEYS = ("resource_name",)
FILTER_TAGS_MAX = 20  # tag keys in one keys_by_tags filter
FILTER_VALUES_MAX = 20  # values of one tag key in a filter


class Tags:
    """Tags on keys: create, delete, batches, and the searches of the tag API."""

    def __init__(self, core: KmsCore) -> None:
        self.core = core

    async def create_tag(
        self, key: str, tag_key: str, tag_value: str = "", *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None,
    ) -> None:
        """Add a tag to ``key``, or give an existing tag key this value."""
        async with self.core.audit("create_tag", account, actor, key) as op:
            account = check_account(account)
            pair = (check_tag_key(tag_key), check_tag_value(tag_value))
            record = await self._changeable(key, account, "create_tag", op)
            op.detail = {"tag_key": pair[0]}
            await self._change(record, op, actor, "create_tag", put=[pair], remove=[])

    async def delete_tag(
        self, key: str, tag_key: str, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None,
    ) -> None:
        """Remove the tag ``tag_key`` from ``key``; UnknownTag if it has none."""
        async with self.core.audit("delete_tag", account, actor, key) as op:
            account = check_account(account)
            name = check_tag_key(tag_key)
            record = await self._changeable(key, account, "delete_tag", op)
            op.detail = {"tag_key": name}
            await self._change(record, op, actor, "delete_tag", put=[], remove=[(name, None)])

    async def batch_tags(
        self, key: str, tags: Sequence[tuple[str, str]], action: str,
        *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
    ) -> None:
        """Create (or update) or delete several tags at once: all of them, or none.
        Deleting: every tag key must be there, with that value when one is given (an
        empty value matches any)."""
        async with self.core.audit("batch_tags", account, actor, key) as op:
            account = check_account(account)
            if action not in ("create", "delete"):
                raise InvalidInput(f"action: must be create or delete, got {action!r}",
                                   code="invalid_tag_action", target="action")
            pairs = check_tags(tags)
            record = await self._changeable(key, account, "batch_tags", op)
            op.detail = {"action": action, "tag_keys": [k for k, _ in pairs]}
            if action == "create":
                await self._change(record, op, actor, "batch_tags", put=pairs, remove=[])
            else:
                await self._change(record, op, actor, "batch_tags", put=[],
                                   remove=[(k, v or None) for k, v in pairs])

    async def key_tags(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> list[tuple[str, str]]:
        """The key's tags, by tag key."""
        async with self.core.audit("key_tags", account, actor, key) as op:
            record = await self.core.lookup(key, check_account(account), create_default=True)
            op.key_id = record.key_id
            return await self.core.store.key_tags(record.key_id)

    async def project_tags(
        self, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> dict[str, list[str]]:
        """Every tag key used on the account's keys, with its distinct values (sorted)."""
        async with self.core.audit("project_tags", account, actor, None) as op:
            account = check_account(account)
            out: dict[str, list[str]] = {}
            for _, tag_key, value in await self.core.store.account_tags(account):
                values = out.setdefault(tag_key, [])
                if value not in values:
                    values.append(value)
            op.detail = {"tag_keys": len(out)}
            return out

    async def keys_by_tags(
        self, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        tags: Mapping[str, Sequence[str]] | None = None,
        matches: Sequence[tuple[str, str]] | None = None, limit: int | None = 10,
        offset: int | None = 0,
    ) -> TaggedKeys:
        """The account's keys that have, for every tag key of ``tags``, one of its values
        (an empty list: any value), and whose alias contains the value of each
        ``("resource_name", text)`` of ``matches``. Oldest first; ``limit`` (1..1000,
        default 10) from ``offset`` (default 0); the total counts every match. Unpacks
        as ``(resources, total)``, each resource as ``(KeyMetadata, tags)``."""
        async with self.core.audit("keys_by_tags", account, actor, None) as op:
            account = check_account(account)
            wanted = _check_filter(tags or {})
            names = _check_matches(matches or [])
            size = 10 if limit is None else check_limit(limit, LIST_LIMIT_MAX)
            start = 0 if offset is None else check_offset(offset)
            by_key: dict[str, list[tuple[str, str]]] = {}
            for key_id, tag_key, value in await self.core.store.account_tags(account):
                by_key.setdefault(key_id, []).append((tag_key, value))
            found: list[TaggedKey] = []
            for record in await self.core.store.list_keys(account):
                key_tags = sorted(by_key.get(record.key_id, []))
                if _selected(record, dict(key_tags), wanted, names):
                    found.append(TaggedKey(KeyMetadata.of(record), key_tags))
            op.detail = {"count": len(found)}
            return TaggedKeys(found[start:start + size], len(found))

    # ------------------------------------------------------------------ internals

    async def _changeable(self, ref: str, account: str, operation: str, op: AuditOp
                          ) -> KeyRecord:
        record = await self.core.lookup(ref, account, create_default=False)
        op.key_id = record.key_id
        if record.state not in CHANGEABLE:
            raise self.core.state_refusal(record, operation)
        return record

    async def _change(
        self, record: KeyRecord, op: AuditOp, actor: str | None, operation: str, *,
        put: list[tuple[str, str]], remove: list[tuple[str, str | None]],
    ) -> None:
        when = self.core.clock()
        event = AuditEvent(when, record.account, actor or self.core.actor, operation,
                           record.key_id, "success", op.detail)
        await self.core.flush_audit()
        outcome, missing = await self.core.store.change_tags(
            record.key_id, put, remove, TAGS_PER_KEY, event)
        if outcome == "missing":
            raise UnknownTag(f"key {key_name(record)} has no tag {missing!r}"
                             + ("" if all(v is None for _, v in remove) else
                                " with that value"), target=record.key_id)
        if outcome == "too_many":
            raise TagQuotaExceeded(f"key {key_name(record)} would have more than "
                                   f"{TAGS_PER_KEY} tags", target=record.key_id)
        if outcome == "key_gone":
            raise KeyDeleted(f"key deleted: {key_name(record)} was deleted",
                             target=record.key_id)
        op.recorded = True


def _check_filter(tags: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
    if not isinstance(tags, Mapping) or len(tags) > FILTER_TAGS_MAX:
        raise InvalidInput(f"tags: at most {FILTER_TAGS_MAX} tag keys", code="invalid_tag",
                           target="tags")
    wanted: dict[str, set[str]] = {}
    for tag_key, values in tags.items():
        name = check_tag_key(tag_key, "tags.key")
        if isinstance(values, str) or not isinstance(values, Sequence) or (
                len(values) > FILTER_VALUES_MAX):
            raise InvalidInput(f"tags.values: a list of at most {FILTER_VALUES_MAX} values",
                               code="invalid_tag", target="tags.values")
        wanted[name] = {check_tag_value(v, "tags.values") for v in values}
    return wanted


def _check_matches(matches: Sequence[tuple[str, str]]) -> list[str]:
    if not isinstance(matches, list | tuple):
        raise InvalidInput("matches: must be a list of (key, value) pairs",
                           code="invalid_match", target="matches")
    names: list[str] = []
    for item in matches:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise InvalidInput("matches: each match is a (key, value) pair",
                               code="invalid_match", target="matches")
        if item[0] not in MATCH_KEYS:
            raise InvalidInput(f"matches.key: must be resource_name, got {item[0]!r}",
                               code="invalid_match", target="matches.key")
        names.append(check_tag_value(item[1], "matches.value"))
    return names


def _selected(record: KeyRecord, tags: dict[str, str], wanted: dict[str, set[str]],
              names: list[str]) -> bool:
    for tag_key, values in wanted.items():
        if tag_key not in tags or (values and tags[tag_key] not in values):
            return False
    return all(name in record.alias for name in names)
