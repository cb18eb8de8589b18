"""The data plane's fast path keeps every guarantee it had.

What changed for speed (``handlers/kms/core.py``, ``store.py``, ``format.py``):
the audit context is a plain class, the use entries' chain text is assembled
by hand (its who-what-which-key tail, their details and the second of their time
memoised), the UTC day of a use is reused, the
ciphertext is built in one allocation from the AAD prefix already made, and a
data key and its IV come from one RNG call in one token hop. Each is checked
here against what it replaced or against the guarantee it must keep: every use
audited and counted, key state checked on every call, a disable or a rotation
by another process seen within the metadata cache's bound (``cache_ttl``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from engine.crypto import CryptoCore
from engine.errors import DewError, InvalidInput
from engine.models import iso
from handlers.kms import core as kms_core_module
from handlers.kms.errors import KeyStateError
from handlers.kms.format import (
    CipherHeader,
    Purpose,
    context_digest,
    pack_ciphertext,
    unpack_ciphertext,
)
from handlers.kms.service import KmsService
from handlers.kms.store import (
    SqliteKmsStore,
    audit_time,
    detail_text,
    entry_body,
    entry_hash,
)
from tests.helpers import FakeClock
from tests.kms.conftest import _destroy_leftovers

KEY_ID = "0b9f3c2e-1d4a-4e5b-8c6d-7e8f9a0b1c2d"
AWKWARD = ["", "plain", 'quo"te', "back\\slash", "tab\there\nnewline\r", "\x00\x1f\x7f",
           "é ü ß 雪", "\u2028\u2029", "\ud800 lone surrogate", "emoji \U0001f600", "</script>"]


def _dumps(value: Any, **options: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, **options)


def test_the_chain_body_is_json_dumps_byte_for_byte() -> None:
    for round_ in range(2):  # the second round's tails come from the memo
        for i, text in enumerate(AWKWARD):
            fields: list[Any] = ["f" * 64, 10**12 + i + round_,
                                 f"2026-01-01T00:00:0{round_}.000000+00:00", text, text[::-1],
                                 f"op{text}", None if i % 2 else text, "success",
                                 _dumps({"k": text})]
            assert entry_body(*fields) == _dumps(fields)
    # A key id of None and the text "null" are different entries.
    fields = ["0" * 64, 1, "t", "a", "b", "op", None, "success", "{}"]
    assert entry_body(*fields) != entry_body(*fields[:6], "null", *fields[7:])
    # So every hash of a chain written before stays what verify recomputes.
    fields = ["0" * 64, 1, "2026-01-01T00:00:00.000000+00:00", "default", "local",
              "create_key", KEY_ID, "success", "{}"]
    assert entry_hash(*fields) == hashlib.sha256(_dumps(fields).encode()).hexdigest()


def test_the_stored_time_is_iso_in_utc_across_seconds_and_zones() -> None:
    start = datetime(2026, 12, 31, 23, 59, 58, 999_998, tzinfo=UTC)
    for step in range(0, 3_000_000, 1_237):
        when = start + timedelta(microseconds=step)
        assert audit_time(when) == iso(when)
    for zone in (timezone(timedelta(0)), timezone(timedelta(hours=-5, minutes=-30))):
        when = start.astimezone(zone)
        assert audit_time(when) == iso(when) == "2026-12-31T23:59:58.999998+00:00"


def test_memoised_details_are_json_dumps_and_keep_equal_values_of_other_types_apart() -> None:
    details: list[dict[str, Any]] = [
        {}, {"length_bits": 256}, {"b": 1, "a": "x"}, {"a": "x", "b": 1}, {"x": 1},
        {"x": True}, {"x": 1.0}, {"x": None}, {"x": [1, 2]}, {"x": {"y": "é"}},
        {"t": AWKWARD[4]},
    ]
    for _ in range(2):  # the second round is served from the memo
        for detail in details:
            assert detail_text(detail) == _dumps(detail, sort_keys=True, default=str)
    assert len({detail_text(d) for d in ({"x": 1}, {"x": True}, {"x": 1.0})}) == 3


def test_the_ciphertext_built_from_its_prefix_is_the_formats() -> None:
    for ctx in ({}, {"purpose": "backup", "é": "x"}):
        header = CipherHeader(KEY_ID, 7, 32, Purpose.DATA_KEY, context_digest(ctx))
        iv, body = bytes(range(12)), bytes(range(48))
        blob = pack_ciphertext(header, iv, body, prefix=header.aad_prefix())
        assert blob == pack_ciphertext(header, iv, body)
        parsed, parsed_iv, parsed_body = unpack_ciphertext(blob, Purpose.DATA_KEY)
        assert (parsed, parsed_iv, parsed_body) == (header, iv, body)
        assert blob[:64] == header.aad_prefix()
        assert header.aad(ctx) == header.aad_prefix() + (
            _dumps(ctx, sort_keys=True).encode() if ctx else b"")


@pytest.fixture
async def buffered(
    kms_store: SqliteKmsStore, core: CryptoCore, clock: FakeClock
) -> AsyncIterator[KmsService]:
    """Use entries buffered as in production (flushed by the test), metadata cached."""
    service = KmsService(kms_store, core, clock=clock, actor="test",
                         audit_flush_interval=3600, cache_ttl=3600)
    yield service
    await service.close()
    await _destroy_leftovers(kms_store, core)


async def test_concurrent_uses_are_each_audited_and_counted(
    buffered: KmsService, kms_store: SqliteKmsStore, clock: FakeClock
) -> None:
    kms = buffered
    key = await kms.create_key("fast/aes")
    sample = await kms.create_datakey(key.key_id, encryption_context={"n": "0"})

    async def one(i: int) -> bytes | None:
        if i % 2:
            return (await kms.create_datakey(key.key_id, (128, 256, 512)[i % 3])).plain_text
        ctx = {"n": "0" if i % 4 else "wrong"}  # every fourth one is refused
        try:
            got = await kms.decrypt_datakey(key.key_id, sample.cipher_text,
                                            encryption_context=ctx)
        except InvalidInput:
            return None
        return got.plain_text

    first = await asyncio.gather(*(one(i) for i in range(120)))
    clock.advance(days=1)  # the next uses fall on the next UTC day
    second = await asyncio.gather(*(one(i) for i in range(40)))
    for i, got in enumerate(first + second):
        if i % 2:
            assert got is not None and len(got) == (16, 32, 64)[i % 3]
        else:
            assert got == (None if i % 4 == 0 else sample.plain_text)
    await kms.flush_audit()

    entries = await kms_store.list_audit(key_id=key.key_id, limit=1000)
    outcomes: dict[tuple[str, str], int] = {}
    for entry in entries:
        slot = (entry.operation, entry.outcome)
        outcomes[slot] = outcomes.get(slot, 0) + 1
    assert outcomes == {("create_key", "success"): 1, ("create_datakey", "success"): 81,
                        ("decrypt_datakey", "success"): 40, ("decrypt_datakey", "failure"): 40}
    refused = [e for e in entries if e.outcome == "failure"]
    assert all('"code":"encryption_context_mismatch"' in e.detail for e in refused)
    days = {(u.day, u.count) for u in await kms_store.usage(key_id=key.key_id)}
    yesterday = (clock.now - timedelta(days=1)).date().isoformat()
    assert days == {(yesterday, 1 + 60 + 30), (clock.now.date().isoformat(), 20 + 10)}
    assert (await kms.audit_verify()).intact


async def test_a_disabled_key_refuses_the_very_next_call_though_cached(
    buffered: KmsService,
) -> None:
    key = await buffered.create_key("fast/disable")
    for _ in range(3):  # its metadata is cached now, for an hour
        await buffered.create_datakey(key.key_id)
    await buffered.disable_key(key.key_id)
    with pytest.raises(KeyStateError, match="is disabled"):
        await buffered.create_datakey(key.key_id)


@pytest.fixture
async def other_process(
    tmp_path: Path, core: CryptoCore, clock: FakeClock
) -> AsyncIterator[KmsService]:
    """Another process's service: its own connection to the same registry file."""
    store = await SqliteKmsStore.open(tmp_path / "kms" / "dew.sqlite3")
    other = KmsService(store, core, clock=clock, actor="other", audit_flush_interval=0)
    yield other
    await other.close()
    await store.close()


async def test_another_process_disable_and_rotation_are_seen_within_the_cache_bound(
    kms_store: SqliteKmsStore, core: CryptoCore, clock: FakeClock, other_process: KmsService
) -> None:
    ttl = 0.3
    kms = KmsService(kms_store, core, clock=clock, actor="test", audit_flush_interval=0,
                     cache_ttl=ttl)
    try:
        key = await kms.create_key("fast/other")
        old = await kms.create_datakey(key.key_id)  # cached here from now on
        # Rotated there: a data key made there under version 2 opens here at once
        # (a newer version than the cached one makes this process read the key again).
        await other_process.rotate_key(key.key_id)
        newer = await other_process.create_datakey(key.key_id)
        assert unpack_ciphertext(newer.cipher_text, Purpose.DATA_KEY)[0].key_version == 2
        assert (await kms.decrypt_datakey(key.key_id, newer.cipher_text)).plain_text == \
            newer.plain_text
        assert (await kms.decrypt_datakey(key.key_id, old.cipher_text)).plain_text == \
            old.plain_text
        # Disabled there: refused here once the cached metadata is older than cache_ttl.
        await other_process.disable_key(key.key_id)
        await asyncio.sleep(ttl * 1.5)
        with pytest.raises(KeyStateError, match="is disabled"):
            await kms.decrypt_datakey(key.key_id, old.cipher_text)
        with pytest.raises(KeyStateError, match="is disabled"):
            await kms.create_datakey(key.key_id)
    finally:
        await kms.close()
        await _destroy_leftovers(kms_store, core)


class HeldReads:
    """The registry's ``get_key`` counted; while ``hold`` is on, a read's answer is
    held back (as read) until ``release``."""

    def __init__(self, store: SqliteKmsStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.hold = False
        self.gate = asyncio.Event()
        self._read = store.get_key
        monkeypatch.setattr(store, "get_key", self.get_key)

    async def get_key(self, key_id: str) -> Any:
        self.calls += 1
        held, record = self.hold, await self._read(key_id)
        if held:
            await self.gate.wait()
        return record

    def release(self) -> None:
        self.hold = False
        self.gate.set()


async def _expired_and_held(kms: KmsService, store: SqliteKmsStore,
                            monkeypatch: pytest.MonkeyPatch, alias: str) -> tuple[Any, HeldReads]:
    """A new key whose cached entry is gone (as after an expiry: its next use reads it),
    with the registry's answers held back until ``release``."""
    key = await kms.create_key(alias)
    reads = HeldReads(store, monkeypatch)
    kms.core.forget_keys()
    reads.hold = True
    return key, reads


async def test_callers_that_find_a_key_expired_together_share_one_registry_read(
    buffered: KmsService, kms_store: SqliteKmsStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    kms = buffered
    key, reads = await _expired_and_held(kms, kms_store, monkeypatch, "fast/herd")
    calls = [asyncio.ensure_future(kms.create_datakey(key.key_id)) for _ in range(40)]
    await asyncio.sleep(0.05)
    assert reads.calls == 1
    calls[0].cancel()  # a caller that gives up leaves the read to the others
    reads.release()
    done = await asyncio.gather(*calls[1:])
    assert len({d.plain_text for d in done}) == 39 and reads.calls == 1
    assert calls[0].cancelled()
    # A read that fails fails every caller waiting for it, with the same error.
    missing = "0b9f3c2e-1d4a-4e5b-8c6d-000000000000"
    refused = await asyncio.gather(*(kms.create_datakey(missing) for _ in range(5)),
                                   return_exceptions=True)
    assert reads.calls == 2
    assert all(isinstance(r, DewError) and r.code == "key_not_found" for r in refused)


async def test_a_read_begun_before_a_disable_here_is_not_cached(
    buffered: KmsService, kms_store: SqliteKmsStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    kms = buffered
    key, reads = await _expired_and_held(kms, kms_store, monkeypatch, "fast/stale")
    early = asyncio.ensure_future(kms.create_datakey(key.key_id))
    await asyncio.sleep(0.05)  # it has read the key, enabled, and waits with it
    reads.hold = False
    await kms.disable_key(key.key_id)
    reads.release()
    await early  # it began before the disable: it may still use what it read
    # But that read is not kept: refused from now on.
    with pytest.raises(KeyStateError, match="is disabled"):
        await kms.create_datakey(key.key_id)


async def test_uses_go_on_while_a_full_batch_is_written_up_to_the_backlog(
    buffered: KmsService, kms_store: SqliteKmsStore, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kms_core_module, "AUDIT_BATCH", 5)
    monkeypatch.setattr(kms_core_module, "AUDIT_BACKLOG", 20)
    key = await buffered.create_key("fast/backlog")
    # Another process holds the database's write lock: the batch write has to wait.
    other = sqlite3.connect(tmp_path / "kms" / "dew.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        # The 5th use fills a batch: a task of its own takes it to write (and waits);
        # the use itself does not wait for the disk.
        for _ in range(5):
            await asyncio.wait_for(buffered.create_datakey(key.key_id), 5)
        await asyncio.sleep(0.2)
        assert not buffered.core._pending
        # The next uses go on while it waits, up to 20 buffered (the backlog): the
        # 20th and later buffer their entry and wait for the batch, so no caller runs
        # ahead of the disk by more than the backlog.
        uses = [asyncio.create_task(buffered.create_datakey(key.key_id)) for _ in range(30)]
        await asyncio.sleep(0.5)
        assert sum(task.done() for task in uses) == 19
        assert len(buffered.core._pending) == 30
    finally:
        other.execute("COMMIT")
        other.close()
    await asyncio.gather(*uses)
    await buffered.flush_audit()
    assert [u.count for u in await kms_store.usage(key_id=key.key_id)] == [35]
    entries = await kms_store.list_audit(key_id=key.key_id, limit=100)
    assert [e.operation for e in entries].count("create_datakey") == 35
    assert (await buffered.audit_verify()).intact
