"""One node of tests/kms/test_kms_trust.py's concurrent-append test, as a process.

``python -m tests.kms.audit_node PATH URL NODE SECRET GO`` opens the KMS store
(``PATH``: the node's side-file base, ``URL``: the shared PostgreSQL database, or
empty for the SQLite file ``PATH``), waits until the file ``GO`` exists, then appends
sealed audit batches from several coroutines and tries to create keys under a quota,
all at once; it prints what it wrote as JSON. The seals are made with
:class:`SoftAuditKey`, the token's HMAC done in software with ``SECRET``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from engine.sql_db import StoreTarget
from handlers.kms.store import AuditEvent, KeyRecord, KeyVersion, SqliteKmsStore

WRITERS = 4  # coroutines appending at once in each node
ROUNDS = 25  # batches each of them appends
QUOTA = 5  # custom keys account "quota" may have; each node tries to create this many
QUOTA_ACCOUNT = "quota"


class SoftAuditKey:
    """An :class:`~handlers.kms.audit_seal.AuditKey` in software (no HSM in the nodes)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def ready(self) -> bool:
        return True

    async def prepare(self) -> None:
        return None

    async def mac(self, message: bytes) -> bytes:
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    async def check(self, message: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(await self.mac(message), tag)


def _key(node: str, n: int, now: datetime) -> tuple[KeyRecord, KeyVersion]:
    key_id = f"{node}-key-{n}"
    record = KeyRecord(key_id, QUOTA_ACCOUNT, f"{node}/{n}", "AES_256", "ENCRYPT_DECRYPT",
                       "enabled", "kms", False, "", now, now, None, None, 1)
    return record, KeyVersion(key_id, 1, f"kms:{key_id}:v1", now)


async def main(path: str, url: str, node: str, secret: str, go: str) -> None:
    store = await SqliteKmsStore.open(StoreTarget(Path(path), url))
    store.use_audit_key(SoftAuditKey(bytes.fromhex(secret)))
    while not Path(go).exists():  # every node starts at once
        time.sleep(0.005)
    now = datetime.now(UTC)
    day = now.date().isoformat()
    entries = 0

    async def writer(w: int) -> None:
        nonlocal entries
        for i in range(ROUNDS):
            events = [AuditEvent(now, "default", f"{node}/{w}", "encrypt_data", None, "success",
                                 {"round": i, "n": n}) for n in range(1 + i % 3)]
            await store.append_audit(events, {("default", f"key-{node}", day): len(events)})
            entries += len(events)

    async def creator(n: int) -> str:
        record, version = _key(node, n, now)
        event = AuditEvent(now, QUOTA_ACCOUNT, node, "create_key", record.key_id, "success")
        return await store.create_key(record, version, event, QUOTA)

    try:
        *_, created = await asyncio.gather(
            *(writer(w) for w in range(WRITERS)),
            asyncio.gather(*(creator(n) for n in range(QUOTA))))
    finally:
        await store.close()
    print(json.dumps({"entries": entries, "created": created.count("created")}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
