"""The KMS service's usage part: how often each key was used, per UTC day.

Every successful use of a key (data keys, encrypt-data / decrypt-data, sign /
verify, generate-mac / verify-mac: the operations whose audit entries are
buffered) adds one to the key's count for the day. The counts are kept beside the
audit buffer in :class:`~handlers.kms.core.KmsCore` and written with each batch of
audit entries, in the same transaction (``kms_usage``), so counting costs no write
of its own; like those entries, a process killed with SIGKILL can lose the last
flush interval's counts. Counts stay after a key is deleted.
"""

from __future__ import annotations

from datetime import date, datetime

from engine.errors import InvalidInput
from handlers.kms.core import KmsCore, not_found
from handlers.kms.format import DEFAULT_ACCOUNT, check_account, check_key_ref, is_key_id
from handlers.kms.results import UsageRow


class Usage:
    """Per-key, per-day use counts."""

    def __init__(self, core: KmsCore) -> None:
        self.core = core

    async def usage(
        self, *, account: str | None = None, key: str | None = None,
        since: date | None = None, actor: str | None = None,
    ) -> list[UsageRow]:
        """Use counts by day (oldest first), of one account (None: every account), one key
        (its id, or its alias in ``account``, default ``default``), from ``since`` (a
        UTC day) on. Buffered uses are written first."""
        async with self.core.audit("usage", account or "", actor, key) as op:
            if account is not None:
                check_account(account)
            if since is not None and (not isinstance(since, date)
                                      or isinstance(since, datetime)):
                raise InvalidInput(f"since: must be a day (YYYY-MM-DD), got {since!r}",
                                   code="invalid_since", target="since")
            key_id = None
            if key is not None:
                ref = check_key_ref(key)
                where = account or DEFAULT_ACCOUNT
                if is_key_id(ref):
                    record = await self.core.store.get_key(ref)
                    if record is None or (account is not None and record.account != account):
                        raise not_found(ref, where)
                else:
                    record = (await self.core.store.find_alias(where, ref)
                              or await self.core.store.find_deleted_alias(where, ref))
                    if record is None:
                        raise not_found(ref, where)
                key_id = op.key_id = record.key_id
            await self.core.flush_audit()
            rows = await self.core.store.usage(
                account, key_id, since.isoformat() if since is not None else None)
            op.detail = {"rows": len(rows)}
            return [UsageRow.of(r) for r in rows]
