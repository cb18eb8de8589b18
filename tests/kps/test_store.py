"""The KPS store's contract, on either backend (``store_target``: SQLite, or
PostgreSQL with ``DEW_TEST_STORE=postgresql``): key pairs (names, scopes, quota),
servers, host key pins, bindings and a job's per-server progress; and its
check-then-writes raced by several processes (as on several nodes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from engine.models import utcnow
from engine.sql_db import StoreTarget
from handlers.kps.store import KeyPairRecord, ServerRecord, SqliteKpsStore
from tests.csms.store_helpers import race

T0 = datetime(2026, 1, 1, tzinfo=utcnow().tzinfo)


@pytest.fixture
async def store(store_target: StoreTarget) -> AsyncIterator[SqliteKpsStore]:
    s = await SqliteKpsStore.open(store_target)
    yield s
    await s.close()


def pair(name: str, owner: str = "alice", scope: str = "user", **fields: Any) -> KeyPairRecord:
    record = KeyPairRecord(
        keypair_id=f"kp-{scope}-{owner}-{name}", account="acct", owner=owner, scope=scope,
        name=name, algorithm="SSH_ED25519", key_type="ssh",
        public_key=f"ssh-ed25519 AAAA{name} {name}", fingerprint=f"SHA256:{name}",
        managed=False, private_key=None, created_at=T0, updated_at=T0)
    return replace(record, **fields)


def server(name: str, **fields: Any) -> ServerRecord:
    record = ServerRecord(
        server_id=f"srv-{name}", account="acct", name=name, host="127.0.0.1", port=22,
        login_user="root", host_key=None, trust_first_use=True, sshd_config=None,
        reload_command=None, authorized_keys=None, created_at=T0)
    return replace(record, **fields)


async def test_key_pair_names_scopes_and_quota(store: SqliteKpsStore) -> None:
    assert await store.create_keypair(pair("mine"), quota=2) == "created"
    assert await store.create_keypair(pair("mine", owner="bob"), quota=2) == "created"
    assert await store.create_keypair(pair("mine", keypair_id="x"), quota=2) == "name_taken"
    # An account pair's name must be free for everyone who sees it.
    assert await store.create_keypair(pair("mine", scope="account"), quota=2) == "name_taken"
    assert await store.create_keypair(pair("team", scope="account"), quota=2) == "created"
    assert await store.create_keypair(pair("team", owner="bob"), quota=2) == "name_taken"
    assert await store.create_keypair(pair("ops", scope="account"), quota=2) == "created"
    assert await store.create_keypair(pair("more", scope="account"), quota=2) == \
        "quota_exceeded"
    assert await store.count_account_keypairs("acct") == 2
    found = await store.find_keypair("acct", "bob", "team")
    assert found is not None and found.scope == "account"
    assert [(p.name, p.owner) for p in await store.list_keypairs("acct", "alice")] == \
        [("mine", "alice"), ("ops", "alice"), ("team", "alice")]
    # user -> account scope: refused on a name clash (bob's "mine") or over the quota.
    mine = await store.find_keypair("acct", "alice", "mine")
    assert mine is not None
    assert await store.upgrade_keypair(mine, quota=5, now=T0) == "name_taken"
    solo = pair("solo")
    await store.create_keypair(solo, quota=2)
    assert await store.upgrade_keypair(solo, quota=2, now=T0) == "quota_exceeded"
    assert await store.upgrade_keypair(solo, quota=3, now=T0) == "created"
    upgraded = await store.get_keypair(solo.keypair_id)
    assert upgraded is not None and upgraded.scope == "account"
    assert await store.set_description(solo.keypair_id, "d", T0)
    assert await store.set_private_key(solo.keypair_id, '{"envelope": 1}', T0)
    kept = await store.get_keypair(solo.keypair_id)
    assert kept is not None and (kept.description, kept.managed, kept.private_key) == \
        ("d", True, '{"envelope": 1}')
    assert await store.set_private_key(solo.keypair_id, None, T0)
    forgot = await store.get_keypair(solo.keypair_id)
    assert forgot is not None and (forgot.managed, forgot.private_key) == (False, None)
    assert not await store.set_description("nope", "d", T0)


async def test_servers_pins_bindings_and_progress(store: SqliteKpsStore) -> None:
    a, b = server("a", sudo=True, port=2222), server("b")
    assert await store.add_server(a) and await store.add_server(b)
    assert not await store.add_server(server("a", server_id="other"))
    assert await store.find_server("acct", "a") == a
    assert [s.name for s in await store.list_servers("acct")] == ["a", "b"]
    # The first pin wins.
    assert await store.pin_host_key(a.server_id, "ssh-ed25519 FIRST") == "ssh-ed25519 FIRST"
    assert await store.pin_host_key(a.server_id, "ssh-ed25519 OTHER") == "ssh-ed25519 FIRST"
    assert await store.pin_host_key("missing", "k") is None

    old, new = pair("old", scope="account"), pair("new", scope="account")
    for p in (old, new):
        await store.create_keypair(p, quota=10)
    assert await store.bind(old.keypair_id, a.server_id, T0, "t1")
    assert await store.bind(old.keypair_id, b.server_id, T0, "t1")
    assert await store.bind(old.keypair_id, a.server_id, T0, "t1")  # again: one row
    assert await store.servers_of(old.keypair_id) == ["a", "b"]
    assert await store.delete_keypair(old.keypair_id) == "bound"
    assert await store.remove_server(a.server_id) == "bound"
    # replace: the new pair's binding takes the old one's place, in one transaction.
    assert await store.bind(new.keypair_id, a.server_id, T0, "t2", replaces=old.keypair_id)
    assert await store.bound_keys(a.server_id) == [(new.keypair_id, new.public_key)]
    assert await store.keypairs_on(b.server_id) == ["old"]
    await store.bind(new.keypair_id, b.server_id, T0, "t3")
    await store.unbind_all_on(b.server_id, keep=new.keypair_id)  # reset
    assert await store.keypairs_on(b.server_id) == ["new"]
    await store.unbind(new.keypair_id, a.server_id)
    assert await store.keypairs_on(a.server_id) == []
    assert await store.delete_keypair(old.keypair_id) == "deleted"
    assert await store.delete_keypair(old.keypair_id) == "missing"
    # A key pair (or server) deleted while its job ran gets no binding, on either backend.
    assert not await store.bind(old.keypair_id, a.server_id, T0, "t4")
    assert not await store.bind(new.keypair_id, "gone", T0, "t4")
    assert await store.remove_server(a.server_id) == "deleted"
    assert await store.remove_server(a.server_id) == "missing"

    await store.set_progress("job", "a", "running", "", T0)
    await store.set_progress("job", "b", "running", "", T0)
    await store.set_progress("job", "a", "succeeded", "ok", T0 + timedelta(seconds=1))
    assert await store.progress("job") == {"a": "succeeded", "b": "running"}
    assert await store.progress("other") == {}


RACER = """
import asyncio, json, sys
from pathlib import Path
from engine.models import utcnow
from engine.sql_db import StoreTarget
from handlers.kps.store import KeyPairRecord, ServerRecord, SqliteKpsStore

def pair(name, keypair_id):  # as the test module's (not imported: pytest takes a second)
    return KeyPairRecord(keypair_id, "acct", "alice", "account", name, "SSH_ED25519", "ssh",
                         f"ssh-ed25519 AAAA{name}", f"SHA256:{name}", False, None, utcnow(),
                         utcnow())

async def main(n, path, url):
    store = await SqliteKpsStore.open(StoreTarget(Path(path), url))
    one = ServerRecord(f"srv{n}", "acct", "one", "127.0.0.1", 22, "root", None, True, None,
                       None, None, utcnow())
    print("ready", flush=True)
    sys.stdin.readline()  # go: every process is ready
    same = await store.create_keypair(pair("same", f"s{n}"), 3)
    quota = [await store.create_keypair(pair(f"q{n}-{i}", f"q{n}-{i}"), 3) for i in range(2)]
    added = await store.add_server(one)
    pinned = await store.pin_host_key("srv-pin", f"ssh-ed25519 KEY{n}")
    print(json.dumps([same, quota, added, pinned]))
    await store.close()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
"""


async def test_check_then_writes_hold_across_processes(
    store: SqliteKpsStore, store_target: StoreTarget,
) -> None:
    """Four processes (as on four nodes) race at once: one name, the account's quota
    (3 account pairs) never passed, one server name, one host key pin."""
    assert await store.add_server(server("pin"))
    outs = race(RACER, store_target)
    results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    same, quota, added, pinned = (list(column) for column in zip(*results, strict=True))
    created = [*same, *(o for outcomes in quota for o in outcomes)]
    # One "same" at most; once it is there, the others' name is taken (checked first).
    assert same.count("created") == 0 or sorted(same) == ["created", *["name_taken"] * 3]
    assert created.count("created") == 3 == await store.count_account_keypairs("acct")
    assert set(created) <= {"created", "name_taken", "quota_exceeded"}
    assert added.count(True) == 1 and [s.name for s in await store.list_servers("acct")] \
        == ["one", "pin"]
    assert len(set(pinned)) == 1
    pin = await store.get_server("srv-pin")
    assert pin is not None and pin.host_key == pinned[0]
