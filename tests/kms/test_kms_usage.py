"""Per-key use counts per UTC day: counted beside the buffered audit entries, written
with their batch (same transaction), read by ``KmsService.usage`` and
``dew kms usage``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import pytest

from engine.crypto import CryptoCore
from engine.errors import BackendUnavailable, InvalidInput
from engine.settings import Settings
from handlers.kms.errors import UnknownKey
from handlers.kms.service import KmsService
from handlers.kms.store import AuditEvent, SqliteKmsStore
from tests.helpers import FakeClock, run_dew


@pytest.fixture
async def buffered(
    kms_store: SqliteKmsStore, core: CryptoCore, clock: FakeClock
) -> AsyncIterator[KmsService]:
    """A service whose use entries stay buffered until flushed (as in production, but
    with an interval no test reaches)."""
    service = KmsService(kms_store, core, clock=clock, actor="test",
                         audit_flush_interval=3600)
    yield service
    await service.close()
    rows = await kms_store._fetchall(
        "SELECT token_label FROM kms_key_versions WHERE destroyed_at IS NULL")
    for row in rows:
        await core.destroy_key(str(row[0]))


def _counts(rows: Sequence[Any]) -> dict[tuple[str, str], int]:
    return {(r.key_alias, r.day.isoformat()): r.count for r in rows}


async def test_uses_are_counted_per_day_and_written_with_the_audit_batch(
    buffered: KmsService, kms_store: SqliteKmsStore, clock: FakeClock
) -> None:
    kms = buffered
    key = await kms.create_key("use/aes")
    mac = await kms.create_key("use/mac", "HMAC_256")
    today = clock.now.date().isoformat()
    for _ in range(7):
        await kms.encrypt_data(key.key_id, b"x")
    # Buffered: neither the entries nor the counts are written yet.
    assert await kms_store.usage() == []
    await kms.flush_audit()
    assert [(r.key_id, r.day, r.count) for r in await kms_store.usage()] == [
        (key.key_id, today, 7)]

    # Other uses count; failures, reads and management do not.
    blob = (await kms.encrypt_data("use/aes", b"y", encryption_context={"a": "1"})).cipher_text
    await kms.decrypt_data(blob, encryption_context={"a": "1"})
    with pytest.raises(InvalidInput):
        await kms.decrypt_data(blob, encryption_context={"a": "2"})
    dk = await kms.create_datakey("use/aes")
    await kms.decrypt_datakey("use/aes", dk.cipher_text)
    await kms.generate_mac("use/mac", b"m")
    await kms.describe_key("use/aes")
    await kms.list_keys()
    await kms.disable_key("use/mac")
    rows = await kms.usage()  # flushes first
    assert _counts(rows) == {("use/aes", today): 11, ("use/mac", today): 1}
    assert rows[0].to_json() == {"account": "default", "key_id": key.key_id,
                                 "key_alias": "use/aes", "day": today, "count": 11}

    # The next UTC day is another row; `since` and `key` filter.
    clock.advance(days=1)
    tomorrow = clock.now.date()
    for _ in range(3):
        await kms.encrypt_data("use/aes", b"z")
    assert _counts(await kms.usage(key="use/aes")) == {
        ("use/aes", today): 11, ("use/aes", tomorrow.isoformat()): 3}
    assert _counts(await kms.usage(since=tomorrow)) == {("use/aes", tomorrow.isoformat()): 3}
    assert _counts(await kms.usage(key=mac.key_id)) == {("use/mac", today): 1}
    assert await kms.usage(since=tomorrow + timedelta(days=1)) == []
    ops = [e.operation for e in await kms.audit_list(key.key_id)]
    assert ops.count("encrypt_data") == 11  # every counted use has its audit entry
    assert (await kms.audit_verify()).intact


async def test_accounts_and_refusals(buffered: KmsService, clock: FakeClock) -> None:
    kms = buffered
    mine = await kms.create_key("acct/key")
    theirs = await kms.create_key("acct/key", account="other")
    await kms.encrypt_data("acct/key", b"a")
    for _ in range(2):
        await kms.encrypt_data("acct/key", b"b", account="other")
    day = clock.now.date().isoformat()
    assert [(r.account, r.count) for r in await kms.usage(account="default")] == [
        ("default", 1)]
    assert [(r.account, r.count) for r in await kms.usage(account="other")] == [("other", 2)]
    assert {(r.account, r.key_id, r.day.isoformat()) for r in await kms.usage()} == {
        ("default", mine.key_id, day), ("other", theirs.key_id, day)}
    assert [r.count for r in await kms.usage(key="acct/key", account="other")] == [2]
    # Another account's key is unknown, in the same words as no key at all.
    with pytest.raises(UnknownKey, match="no key"):
        await kms.usage(key=theirs.key_id, account="default")
    with pytest.raises(UnknownKey, match="no key"):
        await kms.usage(key="acct/none")
    for bad in ({"since": "2026-01-01"}, {"account": "bad account"}, {"key": "has space"}):
        with pytest.raises(InvalidInput):
            await kms.usage(**bad)  # type: ignore[arg-type]


async def test_a_failed_flush_keeps_the_counts(
    buffered: KmsService, kms_store: SqliteKmsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    kms = buffered
    await kms.create_key("flaky")
    for _ in range(4):
        await kms.encrypt_data("flaky", b"x")
    real = kms_store.append_audit

    async def down(events: Sequence[AuditEvent], usage: Any = None) -> None:
        raise BackendUnavailable("the registry is busy")

    monkeypatch.setattr(kms_store, "append_audit", down)
    with pytest.raises(BackendUnavailable):
        await kms.flush_audit()
    monkeypatch.setattr(kms_store, "append_audit", real)
    await kms.encrypt_data("flaky", b"x")
    await kms.flush_audit()
    assert [r.count for r in await kms_store.usage()] == [5]  # none lost, none twice
    assert (await kms.audit_verify()).intact


async def test_cli_usage_json(kms_settings: Settings, shared_kms: KmsService,
                              clock: FakeClock) -> None:
    key = await shared_kms.create_key("cli/used")
    for _ in range(3):
        await shared_kms.encrypt_data("cli/used", b"abc")
    await shared_kms.create_key("cli/other", account="acme")
    await shared_kms.encrypt_data("cli/other", b"abc", account="acme")
    await shared_kms.flush_audit()
    # One more use through the CLI itself (its own process, its own flush on exit).
    plain = kms_settings.state_dir / "plain.txt"
    plain.write_bytes(b"four")
    done = run_dew(kms_settings, "kms", "encrypt-data", "cli/used", "--plain-text-file",
                   str(plain), "--json")
    assert done.returncode == 0, done.stderr
    day = clock.now.date().isoformat()

    done = run_dew(kms_settings, "kms", "usage", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    # The CLI process's clock is the real one: its use may land on another day than
    # the fake clock's; count per key over all days.
    assert sum(r["count"] for r in rows if r["key_id"] == key.key_id) == 4
    assert {r["account"] for r in rows} == {"default"}
    assert day in {r["day"] for r in rows}
    assert rows[0]["key_alias"] == "cli/used"

    every = json.loads(run_dew(kms_settings, "kms", "usage", "--all-projects",
                               "--json").stdout)
    assert {r["account"] for r in every} == {"default", "acme"}
    acme = json.loads(run_dew(kms_settings, "kms", "usage", "--project", "acme",
                              "--key", "cli/other", "--json").stdout)
    assert [r["count"] for r in acme] == [1]
    later = json.loads(run_dew(kms_settings, "kms", "usage", "--since", "2999-01-01",
                               "--json").stdout)
    assert later == []
    human = run_dew(kms_settings, "kms", "usage")
    assert human.returncode == 0 and "cli/used" in human.stdout and "USES" in human.stdout

    for args, text in ((("--since", "2026-1-1"), "YYYY-MM-DD"),
                       (("--since", "2026-02-30"), "YYYY-MM-DD"),
                       (("--key", "has space"), "invalid key"),
                       (("--project", "bad account"), "invalid account")):
        bad = run_dew(kms_settings, "kms", "usage", *args)
        assert bad.returncode == 2, bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dew: error: ") and text in lines[0]
    missing = run_dew(kms_settings, "kms", "usage", "--key", "cli/none")
    assert missing.returncode == 2 and "no key 'cli/none'" in missing.stderr
