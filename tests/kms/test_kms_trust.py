"""Trust boundaries of the KMS: the audit chain sealed in the HSM and anchored outside the
database (M6), concurrent imports of one key (M7), import tokens kept hashed (H3),
rotation fenced by its lease (L5)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest

from engine.crypto import CryptoCore, HsmConfig
from engine.errors import Conflict
from engine.sql_db import StoreTarget
from handlers.kms import store as kms_store_module
from handlers.kms.audit_seal import (
    AUDIT_KEY_LABEL,
    Anchor,
    AnchorDamaged,
    anchor_path,
    format_anchor,
    parse_anchor,
    seal_message,
)
from handlers.kms.byok import wrap_key_material
from handlers.kms.core import token_label
from handlers.kms.errors import RotationInProgress
from handlers.kms.results import KeyMetadata
from handlers.kms.service import KmsService
from handlers.kms.store import (
    AuditEvent,
    AuditVerdict,
    SqliteKmsStore,
    entry_hash,
    import_token_hash,
)
from tests.helpers import FakeClock
from tests.kms import audit_node
from tests.pg_store import admin_sql

# --------------------------------------------------------------------------- helpers


async def _rehash_from(store: SqliteKmsStore, start: int) -> None:
    """What someone who can write the database does after an edit: recompute every
    unkeyed hash from ``start`` on and the head (as the old chain allowed)."""
    rows = await store._fetchall(
        "SELECT seq, time, account, actor, operation, key_id, outcome, detail "
        "FROM audit WHERE seq >= ? ORDER BY seq", (start,))
    prev = ("0" * 64 if start == 1 else
            (await store._fetchone("SELECT hash FROM audit WHERE seq = ?", (start - 1,)))[0])
    for seq, time, account, actor, operation, key_id, outcome, detail in rows:
        digest = entry_hash(prev, seq, time, account, actor, operation, key_id, outcome, detail)
        await store._execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?",
                             (prev, digest, seq))
        prev = digest
    await store._execute(
        "UPDATE audit_head SET seq = (SELECT MAX(seq) FROM audit), hash = ?", (prev,))


async def _entries(kms: KmsService, n: int) -> int:
    """A key and ``n`` uses of it: n + 1 entries, each sealed (unbuffered audit)."""
    await kms.create_key("trust/chain")
    for _ in range(n):
        await kms.encrypt_data("trust/chain", b"x")
    verdict = await kms.audit_verify()
    assert verdict.intact, verdict.reason
    assert verdict.sealed_through == verdict.anchored_at == n + 1 and verdict.unsealed == 0
    return n + 1


@pytest.fixture
async def second_kms(
    kms: KmsService, kms_target: StoreTarget, core: CryptoCore, clock: FakeClock
) -> AsyncIterator[KmsService]:
    """Another service (another connection, as another process has) on the same registry."""
    store = await SqliteKmsStore.open(kms_target)
    other = KmsService(store, core, clock=clock, actor="test-2", audit_flush_interval=0,
                       cache_ttl=0)
    yield other
    await other.close()
    await store.close()


# --------------------------------------------------------------------------- M6: audit


async def test_a_cut_tail_with_a_rewritten_head_is_detected(
    kms: KmsService, kms_target: StoreTarget
) -> None:
    # The audit's scenario: delete the newest entries, point audit_head at the last kept one
    # (and, thoroughly, drop their seals too).
    last = await _entries(kms, 10)
    await admin_sql(kms_target, "DELETE FROM audit WHERE seq > 7",
                    "UPDATE audit_head SET seq = 7, hash = (SELECT hash FROM audit WHERE seq = 7)",
                    "DELETE FROM audit_seals WHERE seq > 7")
    verdict = await kms.audit_verify()
    assert not verdict.intact and verdict.first_broken_seq == 8
    assert f"the audit log ends at entry 7 but was anchored at entry {last}" in verdict.reason
    assert verdict.anchored_at == last


async def test_recomputed_unkeyed_hashes_no_longer_pass(
    kms: KmsService, kms_store: SqliteKmsStore, kms_target: StoreTarget
) -> None:
    await _entries(kms, 5)
    await admin_sql(kms_target, "UPDATE audit SET outcome = 'failure' WHERE seq = 3")
    await _rehash_from(kms_store, 3)
    verdict = await kms.audit_verify()
    assert not verdict.intact and verdict.first_broken_seq == 3
    assert "changed after they were sealed" in verdict.reason
    # Dropping every seal does not help either: the anchor names the real last hash.
    await admin_sql(kms_target, "DELETE FROM audit_seals")
    verdict = await kms.audit_verify()
    assert not verdict.intact and "differs from the anchored one" in verdict.reason


async def test_edited_entries_seals_and_anchors_are_detected(
    kms: KmsService, kms_store: SqliteKmsStore, kms_target: StoreTarget
) -> None:
    last = await _entries(kms, 3)
    # An edited entry (hashes not recomputed): the chain itself breaks there.
    await admin_sql(kms_target, "UPDATE audit SET actor = 'someone else' WHERE seq = 2")
    verdict = await kms.audit_verify()
    assert not verdict.intact and verdict.first_broken_seq == 2 and "changed" in verdict.reason
    await admin_sql(kms_target, "UPDATE audit SET actor = 'test' WHERE seq = 2")
    assert (await kms.audit_verify()).intact

    # A seal that is not the token's.
    good_mac = (await kms_store._fetchone("SELECT mac FROM audit_seals WHERE seq = 2"))[0]
    await admin_sql(kms_target, f"UPDATE audit_seals SET mac = '{'0' * 64}' WHERE seq = 2")
    verdict = await kms.audit_verify()
    assert not verdict.intact and verdict.first_broken_seq == 2
    await admin_sql(kms_target, f"UPDATE audit_seals SET mac = '{good_mac}' WHERE seq = 2")

    # A forged, a damaged and a deleted anchor.
    anchor = anchor_path(kms_target.path)
    real = anchor.read_bytes()
    parsed = parse_anchor(real)
    anchor.write_bytes(format_anchor(Anchor(parsed.seq, parsed.hash, "ab" * 32)))
    verdict = await kms.audit_verify()
    assert not verdict.intact and "not made with this token's audit key" in verdict.reason
    anchor.write_bytes(b"{}")
    verdict = await kms.audit_verify()
    assert not verdict.intact and "damaged" in verdict.reason
    anchor.unlink()
    verdict = await kms.audit_verify()
    if kms_target.dialect == "sqlite":  # one file: every sealed batch moved this anchor
        assert not verdict.intact and "anchor" in verdict.reason and "missing" in verdict.reason
    else:  # a shared database: a node that has not anchored yet (its seals all checked)
        assert verdict.intact and verdict.anchored_at is None
        assert verdict.sealed_through == last and verdict.unsealed == 0
    anchor.write_bytes(real)
    verdict = await kms.audit_verify()
    assert verdict.intact and verdict.entries == last


async def test_the_anchor_file_and_the_sealing_key(
    kms: KmsService, kms_target: StoreTarget, hsm_config: HsmConfig
) -> None:
    last = await _entries(kms, 2)
    anchor = anchor_path(kms_target.path)
    assert stat.S_IMODE(anchor.stat().st_mode) == 0o600
    assert parse_anchor(anchor.read_bytes()).seq == last
    assert not list(anchor.parent.glob("*.tmp"))
    # The key is in the token, sensitive and never extractable.
    lib = pkcs11.lib(hsm_config.module_path)
    with lib.get_token(token_label=hsm_config.token_label).open() as session:
        keys = list(session.get_objects({pkcs11.Attribute.LABEL: AUDIT_KEY_LABEL}))
        assert len(keys) == 1
        assert keys[0][pkcs11.Attribute.SENSITIVE] and not keys[0][pkcs11.Attribute.EXTRACTABLE]
        assert keys[0][pkcs11.Attribute.NEVER_EXTRACTABLE]


def test_anchor_parsing_is_strict() -> None:
    good = Anchor(3, "a" * 64, "b" * 64)
    assert parse_anchor(format_anchor(good)) == good
    for bad in (b"", b"\xff", b"[]", b'{"seq": 0, "hash": "' + b"a" * 64 + b'", "mac": "'
                + b"b" * 64 + b'"}', json.dumps({"seq": True, "hash": "a" * 64,
                                                "mac": "b" * 64}).encode(),
                json.dumps({"seq": 1, "hash": "A" * 64, "mac": "b" * 64}).encode()):
        with pytest.raises(AnchorDamaged):
            parse_anchor(bad)
    assert seal_message(1, "a" * 64) != seal_message(11, "a" * 64)


async def test_a_legacy_unkeyed_log_verifies_and_the_first_seal_covers_it(
    store_target: StoreTarget, core: CryptoCore, clock: FakeClock
) -> None:
    store = await SqliteKmsStore.open(store_target)
    # Entries written as before sealing existed (no key), then the schema of that time.
    await store.append_audit([AuditEvent(clock.now, "default", "old", "describe_key", None,
                                         "success") for _ in range(3)])
    await store.close()
    await admin_sql(store_target, "DROP TABLE audit_seals", "DROP TABLE kms_leases",
                    "UPDATE schema_migrations SET version = 2 WHERE component = 'kms'")
    store = await SqliteKmsStore.open(store_target)  # migration 3
    try:
        kms = KmsService(store, core, clock=clock, actor="test", audit_flush_interval=0)
        verdict = await kms.audit_verify()
        assert verdict.intact and verdict.entries == 3 and verdict.unsealed == 3
        assert verdict.sealed_through is None
        await kms.list_keys()  # the first entry written with the HSM open seals them all
        verdict = await kms.audit_verify()
        assert verdict.intact and verdict.sealed_through == 4 and verdict.unsealed == 0
        # From now on an old entry cannot be rewritten either.
        await admin_sql(store_target, "UPDATE audit SET actor = 'forger' WHERE seq = 1")
        await _rehash_from(store, 1)
        verdict = await kms.audit_verify()
        assert not verdict.intact and verdict.first_broken_seq == 1
        await kms.close()
    finally:
        await store.close()


async def test_key_metadata_reads_do_not_open_the_hsm_and_are_sealed_later(
    kms: KmsService, kms_target: StoreTarget, core: CryptoCore, clock: FakeClock
) -> None:
    await kms.create_key("trust/lazy")
    opened: list[int] = []

    async def provider() -> CryptoCore:
        opened.append(1)
        return core

    store = await SqliteKmsStore.open(kms_target)
    try:
        lazy = KmsService(store, provider, clock=clock, actor="cli", audit_flush_interval=0)
        await lazy.describe_key("trust/lazy")
        assert opened == []  # describe-key does not touch the HSM...
        verdict = await lazy.audit_verify()
        assert verdict.intact and verdict.unsealed == 1  # ...so its entry waits for a seal
        await lazy.disable_key("trust/lazy")  # key management seals at once
        verdict = await lazy.audit_verify()
        assert verdict.intact and verdict.unsealed == 0
        await lazy.close()
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_nodes_appending_at_once_make_one_sealed_chain(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three processes (PostgreSQL: three nodes, each with its own state directory and
    anchor) append sealed batches and create keys under one quota, all at once."""
    monkeypatch.setattr(kms_store_module, "VERIFY_PAGE", 7)  # verify reads many pages
    url = request.getfixturevalue("pg_store_url") if backend == "postgresql" else ""
    shared = tmp_path / "shared" / "dew.sqlite3"
    paths = ([tmp_path / f"node{n}" / "dew.sqlite3" for n in range(3)] if url
             else [shared] * 3)
    secret = os.urandom(32).hex()
    await (await SqliteKmsStore.open(StoreTarget(shared, url))).close()  # migrated up front
    go = tmp_path / "go"
    nodes = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.kms.audit_node", str(path), url, f"n{n}", secret, str(go),
        stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2])
        for n, path in enumerate(paths)]
    go.touch()
    outputs = [await asyncio.wait_for(node.communicate(), 120) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0, 0]
    reports = [json.loads(out) for out, _ in outputs]
    written = sum(r["entries"] for r in reports)
    created = sum(r["created"] for r in reports)
    assert created == audit_node.QUOTA  # the quota check held across the nodes

    async def verdict(path: Path) -> AuditVerdict:
        store = await SqliteKmsStore.open(StoreTarget(path, url))
        store.use_audit_key(audit_node.SoftAuditKey(bytes.fromhex(secret)))
        try:
            return await store.verify_audit()
        finally:
            await store.close()

    store = await SqliteKmsStore.open(StoreTarget(shared, url))
    try:
        # One chain: every entry, seq 1..n without a gap, and entries of the nodes
        # interleaved (they did append at once).
        seqs, actors = zip(*[(int(r[0]), str(r[1]).split("/")[0]) for r in
                             await store._fetchall("SELECT seq, actor FROM audit ORDER BY seq")],
                           strict=True)
        total = written + created
        assert list(seqs) == list(range(1, total + 1))
        assert sum(a != b for a, b in itertools.pairwise(actors)) >= 3
        usage = await store.usage(account="default")
        assert sum(u.count for u in usage) == written
        assert await store.count_custom_keys(audit_node.QUOTA_ACCOUNT) == audit_node.QUOTA
    finally:
        await store.close()
    verdicts = [await verdict(path) for path in paths]
    for v in verdicts:
        assert v.intact, v.reason
        assert v.entries == total and v.sealed_through == total and v.unsealed == 0
    anchored = sorted(v.anchored_at or 0 for v in verdicts)
    if not url:
        assert anchored == [total] * 3  # one file, one anchor
        return
    # Each node anchors the newest batch it wrote: one of them the last one, the
    # others earlier entries, which is no sign of a cut.
    assert anchored[-1] == total and 0 < anchored[0] < total
    # A node that has written nothing has no anchor: its verify checks the seals.
    fresh = await verdict(tmp_path / "node-new" / "dew.sqlite3")
    assert fresh.intact and fresh.anchored_at is None and fresh.sealed_through == total
    # A cut tail (head rewritten, seals dropped) is found by every node whose anchor
    # names a cut entry; a node anchored before the cut vouches only for what it saw.
    cut = anchored[0]
    await admin_sql(StoreTarget(shared, url), f"DELETE FROM audit WHERE seq > {cut}",
                    f"UPDATE audit_head SET seq = {cut}, hash = (SELECT hash FROM audit "
                    f"WHERE seq = {cut})",
                    f"DELETE FROM audit_seals WHERE seq > {cut}")
    after = {v.anchored_at: await verdict(path) for v, path in zip(verdicts, paths, strict=True)}
    newest = after[total]
    assert not newest.intact and newest.first_broken_seq == cut + 1
    assert f"ends at entry {cut} but was anchored at entry {total}" in newest.reason
    assert after[cut].intact and after[cut].entries == cut


# --------------------------------------------------------------------------- M7: imports


async def test_concurrent_imports_of_one_key_leave_it_usable(
    kms: KmsService, second_kms: KmsService, clock: FakeClock, core: CryptoCore
) -> None:
    wrapping = None
    for round_ in range(4):
        key = await kms.create_key(f"trust/race{round_}", origin="external")
        params = await kms.get_parameters_for_import(key.key_id)
        wrapped = wrap_key_material(params.public_key_pem.encode(), os.urandom(32),
                                    "RSAES_OAEP_SHA_256")
        results = await asyncio.gather(
            kms.import_key_material(key.key_id, params.import_token, wrapped),
            second_kms.import_key_material(key.key_id, params.import_token, wrapped),
            return_exceptions=True)
        done = [r for r in results if isinstance(r, KeyMetadata)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(done) == 1 and len(refused) == 1, [
            f"{type(r).__name__}: {r} (cause: {getattr(r, 'cause', '')})" for r in results]
        assert isinstance(refused[0], Conflict), refused[0]
        assert refused[0].code in ("import_in_progress", "key_state_invalid")
        assert (await second_kms.describe_key(key.key_id)).key_state == "enabled"
        blob = (await second_kms.encrypt_data(key.key_id, b"round")).cipher_text
        assert (await kms.decrypt_data(blob)).plain_text == b"round"
        wrapping = await kms.store.get_import_token(params.import_token)
    assert wrapping is not None
    # The wrapping key goes once its tokens expired.
    clock.advance(hours=25)
    await kms.delete_due_keys()
    assert not await core.key_exists(wrapping.wrapping_label)


async def test_an_import_waits_for_a_removal_of_material(
    kms: KmsService, clock: FakeClock, core: CryptoCore
) -> None:
    key = await kms.create_key("trust/held", origin="external")
    params = await kms.get_parameters_for_import(key.key_id)
    wrapped = wrap_key_material(params.public_key_pem.encode(), os.urandom(32),
                                "RSAES_OAEP_SHA_256")
    # Another process holds the key's material lease (an import or a removal running).
    assert await kms.store.claim_lease(key.key_id, "material", clock.now,
                                       clock.now.replace(year=clock.now.year + 1))
    with pytest.raises(Conflict) as caught:
        await kms.import_key_material(key.key_id, params.import_token, wrapped)
    assert caught.value.code == "import_in_progress"
    assert not await core.key_exists(token_label(key.key_id, 1))  # nothing touched
    wrapping = await kms.store.get_import_token(params.import_token)
    assert wrapping is not None
    clock.advance(hours=25)
    await kms.delete_due_keys()
    assert not await core.key_exists(wrapping.wrapping_label)


# --------------------------------------------------------------------------- H3: tokens


async def test_import_tokens_are_stored_hashed(
    kms: KmsService, kms_store: SqliteKmsStore, kms_target: StoreTarget, clock: FakeClock,
    core: CryptoCore,
) -> None:
    key = await kms.create_key("trust/token", origin="external")
    params = await kms.get_parameters_for_import(key.key_id)
    token = params.import_token
    await kms.flush_audit()
    path = kms_target.path
    raw = token.encode()
    for name in (path, Path(f"{path}-wal")):
        if name.exists():
            assert raw not in name.read_bytes(), name
    stored = [r[0] for r in await kms_store._fetchall("SELECT token FROM kms_import_tokens")]
    assert stored == [import_token_hash(token)]
    # Lookups hash what is presented; the hash itself is not a token.
    found = await kms.store.get_import_token(token)
    assert found is not None and found.key_id == key.key_id
    assert await kms.store.get_import_token(stored[0]) is None
    wrapped = wrap_key_material(params.public_key_pem.encode(), os.urandom(32),
                                "RSAES_OAEP_SHA_256")
    assert (await kms.import_key_material(key.key_id, token, wrapped)).key_state == "enabled"

    # A token stored in clear by an older version is expired by migration 3 (a
    # PostgreSQL database starts at a version that never kept one).
    if kms_target.dialect == "sqlite":
        legacy = "L" * 43
        await admin_sql(
            kms_target, "INSERT INTO kms_import_tokens (token, key_id, account, algorithm, "
            f"wrapping_label, created_at, expires_at) SELECT '{legacy}', key_id, account, "
            "algorithm, wrapping_label, created_at, expires_at FROM kms_import_tokens",
            "UPDATE schema_migrations SET version = 2 WHERE component = 'kms'")
        reopened = await SqliteKmsStore.open(kms_target)
        try:
            rows = await reopened._fetchall(
                "SELECT token, created_at = expires_at FROM kms_import_tokens ORDER BY token")
            assert legacy not in {r[0] for r in rows}
            assert sorted(bool(r[1]) for r in rows) == [False, True]
            assert await reopened.get_import_token(legacy) is None
        finally:
            await reopened.close()
    clock.advance(hours=25)
    await kms.delete_due_keys()
    assert found is not None and not await core.key_exists(found.wrapping_label)


# --------------------------------------------------------------------------- L5: rotation


async def test_a_rotator_past_its_lease_destroys_nothing(
    kms: KmsService, core: CryptoCore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await kms.create_key("trust/rot")
    old = (await kms.encrypt_data(key.key_id, b"v1")).cipher_text
    generate = core.generate_key
    stalled = False

    async def stalling_generate(spec: Any, label: str, key_id: bytes) -> Any:
        nonlocal stalled
        info = await generate(spec, label, key_id)
        if not stalled:
            # The first rotator stalls after making v2, past its 5-minute lease; a
            # second one takes over, replaces the "orphan" and registers its v2.
            stalled = True
            clock.advance(minutes=6)
            assert (await kms.rotate_key(key.key_id)).status.key_version == 2
        return info

    monkeypatch.setattr(core, "generate_key", stalling_generate)
    with pytest.raises(RotationInProgress, match="outlived its lease"):
        await kms.rotate_key(key.key_id)
    monkeypatch.undo()
    # The registered v2 is intact: new data uses it, old data still opens.
    assert await core.key_exists(token_label(key.key_id, 2))
    kms.core.forget_keys()
    new = (await kms.encrypt_data(key.key_id, b"v2")).cipher_text
    assert (await kms.decrypt_data(new)).plain_text == b"v2"
    assert (await kms.decrypt_data(old)).plain_text == b"v1"
    status = await kms.get_key_rotation_status(key.key_id)
    assert status.key_version == 2 and status.rotations == 1
    # And the lease is free again for the next rotation.
    assert (await kms.rotate_key(key.key_id)).status.key_version == 3
