"""The data plane's leaner path keeps every guarantee of the one it replaced.

What changed for speed: the token calls of create-datakey, encrypt and decrypt
await the session pool's future directly (``SessionPool.submit``,
``CryptoCore.submit_*``: no coroutine per layer); the data-key operations audit
inline (the entries ``KmsCore.audit`` would write); an enabled AES key's cached
metadata carries its token label and the AAD prefixes of its ciphertexts
(``KeyUse``); ciphertext headers read before are parsed once (``format``); the UTC
day of a use is found by two comparisons. Each is checked here: every caller of a
batch gets its own result or error, every refusal is audited as before, a rotation
or a disable is seen at once in this process, a damaged ciphertext is refused
whatever was read before, and uses are counted on the right day.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from engine.crypto import CryptoCore, IntegrityCheckFailed
from engine.crypto import _pool as pool_module
from engine.crypto._pool import SessionPool, Worker
from engine.errors import BackendUnavailable, DewError, InvalidInput
from handlers.kms import core as kms_core_module
from handlers.kms import format as f
from handlers.kms.errors import KeyStateError
from handlers.kms.service import KmsService
from handlers.kms.store import AuditEntry, SqliteKmsStore
from tests.helpers import FakeClock
from tests.kms.conftest import _destroy_leftovers

KEY_ID = "0b9f3c2e-1d4a-4e5b-8c6d-7e8f9a0b1c2d"


# --------------------------------------------------------------------------- the pool's batches


class _Session:
    def close(self) -> None:
        pass


class _Token:
    """What the pool asks of a token: a session per thread."""

    label = "fake"

    def open(self, rw: bool = True) -> _Session:
        return _Session()


@pytest.fixture
async def pool() -> AsyncIterator[SessionPool]:
    p = SessionPool(_Token(), 1, per_thread_sessions=True)
    yield p
    await p.close()


async def test_a_batch_gives_every_caller_its_own_result_and_its_own_error(
    pool: SessionPool,
) -> None:
    ran: list[int] = []
    threads: set[int] = set()

    def call(i: int) -> Callable[[Worker], int]:
        def work(w: Worker) -> int:
            ran.append(i)
            threads.add(threading.get_ident())
            if i % 7 == 3:
                raise InvalidInput(f"item {i} refused", code=f"refused_{i}")
            if i % 11 == 5:
                raise ValueError(f"item {i} broke")
            return i * i
        return work

    # Submitted in one turn of the loop: they travel to the thread as one batch.
    futures = [pool.submit(call(i)) for i in range(60)]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert ran == list(range(60))  # in order, each once, on the pool's one thread
    assert threads and threading.get_ident() not in threads and len(threads) == 1
    for i, outcome in enumerate(outcomes):
        if i % 7 == 3:
            assert isinstance(outcome, InvalidInput) and outcome.code == f"refused_{i}"
        elif i % 11 == 5:
            assert isinstance(outcome, ValueError) and str(outcome) == f"item {i} broke"
        else:
            assert outcome == i * i
    # run() is the same hop, awaited.
    assert await pool.run(lambda w: "once") == "once"


async def test_a_cancelled_caller_leaves_the_rest_of_its_batch_alone(pool: SessionPool) -> None:
    gate = threading.Event()

    def slow(w: Worker) -> str:
        gate.wait(5)
        return "first"

    first = pool.submit(slow)
    rest = [pool.submit(lambda w, i=i: i) for i in range(5)]  # type: ignore[misc]
    await asyncio.sleep(0.05)  # the batch is with the thread, held at `slow`
    rest[2].cancel()
    gate.set()
    assert await first == "first"
    assert [await r for i, r in enumerate(rest) if i != 2] == [0, 1, 3, 4]
    assert rest[2].cancelled()


async def test_calls_made_while_a_batch_is_out_wait_for_it_then_go_as_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_module, "HOLD", 5.0)
    two = SessionPool(_Token(), 2, per_thread_sessions=True)
    try:
        gate = threading.Event()
        first = two.submit(lambda w: gate.wait(5))
        await asyncio.sleep(0.05)  # that batch is with a thread now
        seen: list[tuple[int, int]] = []

        def note(i: int) -> Callable[[Worker], int]:
            def work(w: Worker) -> int:
                seen.append((i, threading.get_ident()))
                return i
            return work

        rest = [two.submit(note(i)) for i in range(6)]
        await asyncio.sleep(0.1)
        assert seen == []  # a thread is idle, but they wait for the batch out there
        gate.set()
        assert await first is True
        assert await asyncio.gather(*rest) == list(range(6))
        assert sorted(i for i, _ in seen) == list(range(6))
    finally:
        await two.close()


async def test_a_long_call_holds_the_others_back_no_longer_than_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_module, "HOLD", 0.05)
    two = SessionPool(_Token(), 2, per_thread_sessions=True)
    try:
        gate = threading.Event()
        slow = two.submit(lambda w: gate.wait(5))  # a key generation, say
        await asyncio.sleep(0.02)
        began = time.monotonic()
        assert await asyncio.wait_for(two.submit(lambda w: "quick"), 2) == "quick"
        assert 0.03 <= time.monotonic() - began < 1  # after HOLD, on the other thread
        gate.set()
        assert await slow is True
    finally:
        await two.close()


async def test_no_call_is_taken_after_close(pool: SessionPool) -> None:
    await pool.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        pool.submit(lambda w: 1)


# --------------------------------------------------------------------------- the KMS data plane


@pytest.fixture(params=[0, 1], ids=["threads", "data-process"])
async def cached(
    request: pytest.FixtureRequest, kms_store: SqliteKmsStore, core: CryptoCore,
    clock: FakeClock,
) -> AsyncIterator[KmsService]:
    """Metadata cached for an hour, entries written at once (read back at once); the
    token calls made by the core's threads, or by a data process (hsm.data_processes)."""
    used = core
    if request.param:
        used = CryptoCore(replace(core.config, data_processes=request.param))
        await used.connect()
        assert used.data_process_pids
    service = KmsService(kms_store, used, clock=clock, actor="test", audit_flush_interval=0,
                         cache_ttl=3600)
    yield service
    await service.close()
    await _destroy_leftovers(kms_store, core)
    if used is not core:
        assert used.data_process_pids  # it made the calls, to the end
        await used.close()


@pytest.fixture
async def buffered(
    kms_store: SqliteKmsStore, core: CryptoCore, clock: FakeClock,
) -> AsyncIterator[KmsService]:
    """Use entries written when flushed or when a batch is full (the timer is an hour
    away)."""
    service = KmsService(kms_store, core, clock=clock, actor="test", audit_flush_interval=3600)
    yield service
    await service.close()
    await _destroy_leftovers(kms_store, core)


def _last(entries: list[AuditEntry], operation: str) -> AuditEntry:
    return [e for e in entries if e.operation == operation][-1]


async def test_uses_and_refusals_are_audited_as_the_audit_context_would(
    cached: KmsService, kms_store: SqliteKmsStore,
) -> None:
    kms = cached
    key = await kms.create_key("path/audit")
    other = await kms.create_key("path/other")
    made = await kms.create_datakey("path/audit", 128)
    await kms.decrypt_datakey(key.key_id, made.cipher_text)
    await kms.encrypt_datakey(key.key_id, bytes(24))
    await kms.encrypt_data(key.key_id, b"four")
    await kms.create_datakey_without_plaintext(key.key_id, 512)

    async def refused(call: Any, code: str) -> None:
        with pytest.raises(DewError) as caught:
            await call
        assert caught.value.code == code

    await refused(kms.create_datakey("path/audit", 100), "invalid_datakey_length")
    await refused(kms.create_datakey("path/audit", account="not an account!"),
                  "invalid_account")
    await refused(kms.decrypt_datakey(other.key_id, made.cipher_text), "key_mismatch")
    await refused(kms.encrypt_datakey("path/audit", bytes(8)), "invalid_datakey")
    await refused(kms.decrypt_datakey("path/audit", made.cipher_text,
                                      encryption_context={"a": "b"}),
                  "encryption_context_mismatch")
    await refused(kms.create_datakey("path/nothing"), "key_not_found")
    await kms.disable_key("path/audit")
    await refused(kms.create_datakey("path/audit"), "key_state_invalid")

    rows = await kms_store.list_audit(limit=100)
    seen = [(e.operation, e.account, e.key_id, e.outcome, e.detail, e.actor)
            for e in rows if e.operation in kms_core_module.USE_OPERATIONS]
    kid, oid = key.key_id, other.key_id
    assert seen == [
        ("create_datakey", "default", kid, "success", '{"length_bits":128}', "test"),
        ("decrypt_datakey", "default", kid, "success", "{}", "test"),
        ("encrypt_datakey", "default", kid, "success", '{"length_bits":192}', "test"),
        ("encrypt_data", "default", kid, "success", '{"bytes":4}', "test"),
        ("create_datakey_without_plaintext", "default", kid, "success",
         '{"length_bits":512}', "test"),
        # Refused before the key was found: named as the caller named it ...
        ("create_datakey", "default", "path/audit", "failure",
         '{"code":"invalid_datakey_length"}', "test"),
        ("create_datakey", "not an account!", "path/audit", "failure",
         '{"code":"invalid_account"}', "test"),
        # ... after: by its id.
        ("decrypt_datakey", "default", oid, "failure", '{"code":"key_mismatch"}', "test"),
        ("encrypt_datakey", "default", "path/audit", "failure", '{"code":"invalid_datakey"}',
         "test"),
        ("decrypt_datakey", "default", kid, "failure",
         '{"code":"encryption_context_mismatch"}', "test"),
        ("create_datakey", "default", "path/nothing", "failure", '{"code":"key_not_found"}',
         "test"),
        ("create_datakey", "default", kid, "failure", '{"code":"key_state_invalid"}', "test"),
    ]
    # Only successes are counted as uses.
    assert sum(u.count for u in await kms_store.usage(key_id=kid)) == 5
    assert (await kms.audit_verify()).intact


async def test_a_rotation_here_is_used_by_the_very_next_call_though_cached(
    cached: KmsService,
) -> None:
    kms = cached
    key = await kms.create_key("path/rotate")
    before = [await kms.create_datakey(key.key_id, encryption_context={"n": str(i)})
              for i in range(3)]  # cached, with the prefixes of version 1
    await kms.rotate_key(key.key_id)
    after = await kms.create_datakey(key.key_id, encryption_context={"n": "0"})
    assert f.unpack_ciphertext(after.cipher_text, f.Purpose.DATA_KEY)[0].key_version == 2
    for i, old in enumerate([*before, after]):
        got = await kms.decrypt_datakey(key.key_id, old.cipher_text,
                                        encryption_context={"n": str(i % 3)})
        assert got.plain_text == old.plain_text
    blob = (await kms.encrypt_data(key.key_id, b"x" * 17)).cipher_text
    assert f.unpack_ciphertext(blob, f.Purpose.DATA)[0].key_version == 2
    assert (await kms.decrypt_data(blob)).plain_text == b"x" * 17
    await kms.disable_key(key.key_id)
    with pytest.raises(KeyStateError):
        await kms.decrypt_datakey(key.key_id, after.cipher_text,
                                  encryption_context={"n": "0"})


async def test_many_contexts_and_lengths_each_get_their_own_header(
    cached: KmsService, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kms_core_module, "PREFIXES_MAX", 4)  # overflows, is cleared, refills
    kms = cached
    key = await kms.create_key("path/contexts")
    made = []
    for i in range(12):
        ctx = {"tenant": f"t{i % 6}"} if i % 3 else None
        if i % 2:
            made.append((ctx, await kms.create_datakey(key.key_id, (128, 256, 512)[i % 3],
                                                       encryption_context=ctx)))
        else:
            made.append((ctx, await kms.encrypt_datakey(key.key_id, os.urandom(16 + i),
                                                        encryption_context=ctx)))
    for ctx, result in made:
        header = f.unpack_ciphertext(result.cipher_text, f.Purpose.DATA_KEY)[0]
        assert header.context == f.context_digest(ctx or {})
        opened = await kms.decrypt_datakey(key.key_id, result.cipher_text,
                                           encryption_context=ctx)
        assert opened.plain_text is not None and len(opened.plain_text) == header.length
        with pytest.raises(InvalidInput, match="encryption context differs"):
            await kms.decrypt_datakey(key.key_id, result.cipher_text,
                                      encryption_context={"tenant": "someone else"})


async def test_uses_are_counted_on_their_utc_day_whatever_order_the_clock_gives(
    buffered: KmsService, kms_store: SqliteKmsStore, clock: FakeClock,
) -> None:
    kms = buffered
    clock.now = datetime(2026, 3, 1, 23, 59, 59, 999_000, tzinfo=UTC)
    key = await kms.create_key("path/days")
    # Before and after midnight, back again, then a time given in another zone.
    for step in (timedelta(0), timedelta(milliseconds=2), timedelta(milliseconds=-2),
                 timedelta(days=1), timedelta(days=-2)):
        clock.now += step
        await kms.create_datakey(key.key_id)
    clock.now = datetime(2026, 3, 3, 1, 0, tzinfo=UTC).astimezone(
        timezone(timedelta(hours=-5)))  # 20:00 on the 2nd there, the 3rd in UTC
    await kms.create_datakey(key.key_id)
    await kms.flush_audit()
    days = sorted((u.day, u.count) for u in await kms_store.usage(key_id=key.key_id))
    assert days == [("2026-02-28", 1), ("2026-03-01", 2), ("2026-03-02", 2),
                    ("2026-03-03", 1)]


async def test_a_full_batch_written_by_its_own_task_keeps_its_entries_when_that_fails(
    buffered: KmsService, kms_store: SqliteKmsStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kms_core_module, "AUDIT_BATCH", 4)
    kms = buffered
    key = await kms.create_key("path/batch")
    real = kms_store.append_audit
    failures = 0

    async def failing(*args: Any) -> None:
        nonlocal failures
        failures += 1
        raise BackendUnavailable("the disk is gone for a moment")

    monkeypatch.setattr(kms_store, "append_audit", failing)
    for _ in range(6):  # the 4th fills a batch: its task fails, the uses do not
        await kms.create_datakey(key.key_id)
        await asyncio.sleep(0.01)
    assert failures == 1 and len(kms.core._pending) == 6
    monkeypatch.setattr(kms_store, "append_audit", real)
    for _ in range(2):  # no batch is tried again before the timer's next try ...
        await kms.create_datakey(key.key_id)
    await asyncio.sleep(0.1)
    assert failures == 1 and len(kms.core._pending) == 8
    await kms.flush_audit()  # ... which writes everything, in order
    entries = await kms_store.list_audit(key_id=key.key_id, limit=100)
    assert [e.operation for e in entries] == ["create_key"] + ["create_datakey"] * 8
    assert [u.count for u in await kms_store.usage(key_id=key.key_id)] == [8]


async def test_uses_past_a_full_batch_join_it_rather_than_start_one_each(
    buffered: KmsService, kms_store: SqliteKmsStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kms_core_module, "AUDIT_BATCH", 4)
    kms = buffered
    disk = asyncio.Event()
    try:
        key = await kms.create_key("path/one-batch")
        await kms.create_datakey(key.key_id)  # its metadata is cached now
        await kms.flush_audit()
        real = kms_store.append_audit
        batches: list[int] = []

        async def slow(events: Any, usage: Any = None) -> None:
            batches.append(len(events))
            await disk.wait()
            await real(events, usage)

        monkeypatch.setattr(kms_store, "append_audit", slow)
        # 40 uses come back from the token: the 4th fills a batch; the ones after it
        # join that batch (or, once it is being written, the next), none starts a
        # writer of its own.
        await asyncio.gather(*(kms.create_datakey(key.key_id) for _ in range(40)))
        await asyncio.sleep(0.05)
        assert len(kms.core._flush_tasks) == 1 and len(batches) == 1
        disk.set()
        await kms.flush_audit()
        assert sum(batches) == 40 and len(batches) <= 2
        assert [u.count for u in await kms_store.usage(key_id=key.key_id)] == [41]
    finally:
        disk.set()  # else the fixture's close would wait for it


# --------------------------------------------------------------------------- the header memo


def _blob(n: int, purpose: f.Purpose = f.Purpose.DATA) -> bytes:
    header = f.CipherHeader(KEY_ID, 3, n, purpose, f.context_digest({}))
    return f.pack_ciphertext(header, os.urandom(12), os.urandom(f.padded_length(n) + 16))


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except (InvalidInput, IntegrityCheckFailed) as exc:
        return type(exc), str(exc), exc.cause


def test_a_header_read_before_does_not_let_damage_through() -> None:
    good = _blob(20)
    f.unpack_ciphertext(good, f.Purpose.DATA)  # its header is remembered now
    assert good[:64] in f._HEADERS
    damaged = [good[:-1], good + b"\x00", good[:130], good[:64]]
    for offset in (64, 70, 75, 76, 90, 107, 108, 130):  # IV, header digest, body
        tampered = bytearray(good)
        tampered[offset] ^= 0x01
        damaged.append(bytes(tampered))
    for blob in [*damaged, good]:
        for purpose in f.Purpose:
            remembered = _outcome(lambda b=blob, p=purpose: f.unpack_ciphertext(b, p))
            fresh = _outcome(lambda b=blob, p=purpose: f._unpack(b, p))
            assert remembered == fresh
    # Bytes-like input is read as bytes, memo or not.
    assert f.unpack_ciphertext(bytearray(good), f.Purpose.DATA) == \
        f.unpack_ciphertext(good, f.Purpose.DATA)


def test_the_header_memo_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f, "HEADER_MEMO_MAX", 8)
    monkeypatch.setattr(f, "_HEADERS", {})
    for n in range(30):
        blob = _blob(n)
        assert f.unpack_ciphertext(blob, f.Purpose.DATA)[0].length == n
        assert len(f._HEADERS) <= 8


def test_the_ciphertext_packed_after_its_prefix_is_the_formats() -> None:
    for n in (0, 1, 16, 33):
        header = f.CipherHeader(KEY_ID, 2, n, f.Purpose.DATA, f.context_digest({"a": "b"}))
        iv, body = os.urandom(12), os.urandom(f.padded_length(n) + 16)
        packed = f.pack_after_prefix(header.aad_prefix(), n, iv, body)
        assert packed == f.pack_ciphertext(header, iv, body)
        assert f.unpack_ciphertext(packed, f.Purpose.DATA) == (header, iv, body)
        with pytest.raises(ValueError):
            f.pack_after_prefix(header.aad_prefix(), n + 16, iv, body)
        with pytest.raises(ValueError):
            f.pack_after_prefix(header.aad_prefix(), n, iv[:11], body)
