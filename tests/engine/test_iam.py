"""Identities of the HTTPS API (engine/iam): the store, the per-request lookup, roles,
sealed secret keys, on the real SoftHSM token.

This module is also a test-only service (``SERVICE`` below, named in
``DEW_ENGINE_SERVICES``), so its ``CATALOG`` gives the built-in roles: the tests
depend on no real service's catalog.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from engine.api.principal import RoleCatalog
from engine.crypto import CryptoCore, HsmConfig
from engine.errors import AuthenticationFailed, InvalidInput, NotFound, exit_code
from engine.iam.model import (
    IdentityConflict,
    check_actions,
    check_name,
    parse_cidrs,
    source_allowed,
)
from engine.iam.service import SECRET_KEY_LABEL, Identities, resolve_project
from engine.resources import Resources
from engine.services import ServiceSpec
from engine.settings import Settings
from tests.pg_store import store_rows

CATALOG = RoleCatalog(
    roles={
        "Test Administrator": ("test:*",),
        "Test Reader": ("test:key:list", "test:key:show"),
    },
    actions={
        "test:key:list": "list keys",
        "test:key:show": "show a key",
        "test:key:create": "create a key",
        "test:key:delete": "delete a key",
        "test:crypto:encrypt": "encrypt data",
    },
)
SERVICE = ServiceSpec("testiam", roles="tests.engine.test_iam:CATALOG")
SERVICES = ("handlers.builtin", "tests.engine.test_iam")


@pytest.fixture
def iam_settings(settings: Settings) -> Settings:
    return settings.replace(engine={"services": SERVICES})


@pytest.fixture
async def core(hsm_config: HsmConfig) -> AsyncIterator[CryptoCore]:
    async with CryptoCore(hsm_config) as c:
        yield c


async def open_ids(settings: Settings, core: CryptoCore) -> Identities:
    async def crypto() -> CryptoCore:
        return core

    return await Identities.open(settings, crypto)


@pytest.fixture
async def ids(iam_settings: Settings, core: CryptoCore) -> AsyncIterator[Identities]:
    identities = await open_ids(iam_settings, core)
    yield identities
    await identities.close()


@pytest.fixture
async def other(iam_settings: Settings, core: CryptoCore) -> AsyncIterator[Identities]:
    """A second Identities on the same file: what another process sees."""
    identities = await open_ids(iam_settings, core)
    yield identities
    await identities.close()


def db_rows(settings: Settings, sql: str, *params: object) -> list[tuple[object, ...]]:
    """A statement on the store's database (either backend), behind the store's back."""
    return store_rows(settings.store_target, sql, *params)


# --------------------------------------------------------------------------- the store


async def test_the_default_project_exists_from_the_first_open(
    ids: Identities, other: Identities, iam_settings: Settings
) -> None:
    default = await ids.project("default")
    assert default is not None and re.fullmatch(r"[0-9a-f]{32}", default.project_id)
    assert await other.project(default.project_id) == default  # made once, seen by both
    assert [p.name for p in await ids.list_projects()] == ["default"]
    assert db_rows(iam_settings, "SELECT version FROM schema_migrations WHERE component = 'iam'"
                   ) == [(2,)]
    if not iam_settings.store_target.url:
        assert db_rows(iam_settings, "PRAGMA journal_mode") == [("wal",)]


async def test_projects_users_and_access_keys(ids: Identities) -> None:
    project = await ids.create_project("acme")
    assert re.fullmatch(r"[0-9a-f]{32}", project.project_id)
    assert await ids.project(project.project_id) == project
    assert await ids.project("acme") == project
    assert await ids.project("nope") is None
    with pytest.raises(IdentityConflict, match="a project named 'acme' exists"):
        await ids.create_project("acme")

    user = await ids.create_user("alice", project.project_id, roles=["Test Reader"],
                                 cidrs=["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])
    assert (user.project, user.enabled, user.roles) == ("acme", True, ("Test Reader",))
    assert user.cidrs == ("10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32")
    assert [u.name for u in await ids.list_users("acme")] == ["alice"]
    assert await ids.list_users("default") == []
    with pytest.raises(NotFound, match="no project 'nope'"):
        await ids.list_users("nope")
    with pytest.raises(IdentityConflict, match="a user named 'alice' exists"):
        await ids.create_user("alice", "default")

    record, secret = await ids.create_access_key("alice")
    assert re.fullmatch(r"[A-Z0-9]{20}", record.access_key)
    assert re.fullmatch(r"[A-Za-z0-9]{40}", secret)
    assert (record.user, record.project, record.status) == ("alice", "acme", "active")
    assert [k.access_key for k in await ids.list_access_keys(user.user_id)] == [
        record.access_key]

    caller = await ids.caller(record.access_key)
    assert caller is not None
    assert caller.secret_key == secret.encode("ascii")
    assert caller.active
    assert (caller.user_id, caller.user, caller.project_id, caller.project) == (
        user.user_id, "alice", project.project_id, "acme")
    assert caller.actions == frozenset({"test:key:list", "test:key:show"})
    assert caller.cidrs == user.cidrs
    principal = caller.principal("10.1.2.3")
    assert (principal.project, principal.user, principal.access_key, principal.source_ip) == (
        "acme", "alice", record.access_key, "10.1.2.3")
    assert principal.allows("test:key:show") and not principal.allows("test:key:create")
    assert caller.principal("::ffff:10.9.9.9").user == "alice"  # IPv4-mapped
    assert caller.principal("2001:db8::1").user == "alice"
    with pytest.raises(AuthenticationFailed, match=r"current ip:192\.0\.2\.8 refused"):
        caller.principal("192.0.2.8")

    assert await ids.caller("AAAAAAAAAAAAAAAAAAAA") is None  # unknown
    assert await ids.caller("not an access key") is None


async def test_at_most_two_access_keys_per_user(ids: Identities) -> None:
    await ids.create_user("bob", "default")
    await ids.create_access_key("bob")
    second, _ = await ids.create_access_key("bob")
    with pytest.raises(IdentityConflict, match="2 access keys already") as refused:
        await ids.create_access_key("bob")
    assert exit_code(refused.value) == 1  # refused by the state (docs/cli.md)
    assert len(await ids.list_access_keys("bob")) == 2
    await ids.delete_access_key(second.access_key)
    await ids.create_access_key("bob")
    with pytest.raises(NotFound, match="no access key"):
        await ids.delete_access_key(second.access_key)
    with pytest.raises(NotFound, match="no user 'nobody'"):
        await ids.create_access_key("nobody")


async def test_check_then_write_holds_with_writers_at_once(
    ids: Identities, other: Identities
) -> None:
    """Two processes (their own connections) writing at once: the access-key limit and
    the wrong-password count hold as with one writer."""
    await ids.create_user("ken", "default")
    made = await asyncio.gather(*(s.create_access_key("ken") for s in (ids, other) * 2),
                                return_exceptions=True)
    assert sorted(type(m).__name__ for m in made) == ["IdentityConflict", "IdentityConflict",
                                                      "tuple", "tuple"]
    assert len(await ids.list_access_keys("ken")) == 2

    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    counts = await asyncio.gather(*(s.store.add_sign_in_failure("ken", now)
                                    for s in (ids, other) * 10))
    assert sorted(counts) == list(range(1, 21))  # each counted once, each saw its own
    assert await other.store.sign_in_failures("ken") == (20, now)


async def test_a_change_applies_to_the_very_next_call_in_every_process(
    ids: Identities, other: Identities
) -> None:
    await ids.create_user("carol", "default", roles=["Test Reader"])
    record, secret = await ids.create_access_key("carol")
    ak = record.access_key

    seen = await other.caller(ak)  # another process, the same file
    assert seen is not None and seen.secret_key == secret.encode()
    assert seen.actions == {"test:key:list", "test:key:show"}

    await ids.set_roles("carol", ["Test Administrator"])
    seen = await other.caller(ak)
    assert seen is not None and seen.actions == {"test:*"}
    assert seen.principal("127.0.0.1").allows("test:crypto:encrypt")

    await ids.disable_user("carol")
    seen = await other.caller(ak)
    assert seen is not None and not seen.active
    with pytest.raises(AuthenticationFailed, match="inactive or its user is disabled"):
        seen.principal("127.0.0.1")
    await other.enable_user("carol")
    seen = await ids.caller(ak)
    assert seen is not None and seen.active

    await other.set_access_key_status(ak, "inactive")
    seen = await ids.caller(ak)
    assert seen is not None and not seen.active
    await other.set_access_key_status(ak, "active")

    await ids.set_roles("carol", [])
    seen = await other.caller(ak)
    assert seen is not None and seen.actions == frozenset()
    assert not seen.principal("127.0.0.1").allows("test:key:list")

    await ids.delete_access_key(ak)
    assert await other.caller(ak) is None


async def test_custom_roles(ids: Identities, other: Identities) -> None:
    role = await ids.create_role("Key Keeper", ["test:key:*", "test:crypto:encrypt"],
                                 "keys, and encryption")
    assert role.actions == ("test:key:*", "test:crypto:encrypt") and not role.builtin
    roles = {r.name: r for r in await other.list_roles()}
    assert roles["Test Reader"].builtin and roles["Test Reader"].actions == (
        "test:key:list", "test:key:show")
    assert roles["Key Keeper"] == role
    assert [n for n in roles if not n.startswith("DEW ")] == [
        "Test Administrator", "Test Reader", "Key Keeper"]

    await ids.create_user("dave", "default", roles=["Key Keeper", "Test Reader"])
    record, _ = await ids.create_access_key("dave")
    caller = await other.caller(record.access_key)
    assert caller is not None
    assert caller.actions == {"test:key:*", "test:crypto:encrypt", "test:key:list",
                              "test:key:show"}
    assert caller.principal("127.0.0.1").allows("test:key:delete")

    with pytest.raises(IdentityConflict, match="held by users \\(dave\\)"):
        await other.delete_role("Key Keeper")
    with pytest.raises(IdentityConflict, match="a role named 'Key Keeper' exists"):
        await ids.create_role("Key Keeper", ["test:key:list"])
    with pytest.raises(IdentityConflict, match="'Test Reader' is a built-in role"):
        await ids.create_role("Test Reader", ["test:key:list"])
    with pytest.raises(InvalidInput, match="built-in role; it cannot be deleted"):
        await ids.delete_role("Test Reader")
    with pytest.raises(NotFound, match="no custom role 'Nope'"):
        await ids.delete_role("Nope")

    await ids.set_roles("dave", ["Test Reader"])
    await other.delete_role("Key Keeper")
    assert [r.name for r in await ids.list_roles() if not r.name.startswith("DEW ")] == [
        "Test Administrator", "Test Reader"]


@pytest.mark.parametrize(("actions", "message"), [
    (["test:key:destroy"], "unknown action 'test:key:destroy': it is not an action"),
    (["kms:*"], "unknown action 'kms:\\*': it matches no action"),
    (["test:key"], "unknown action 'test:key'"),
    (["test:key:*", ""], "invalid action ''"),
    ([], "at least one action"),
])
async def test_a_custom_role_with_an_unknown_action_is_refused(
    ids: Identities, actions: list[str], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        await ids.create_role("Broken", actions)
    assert [r.name for r in await ids.list_roles() if not r.builtin] == []


async def test_unknown_roles_are_refused_when_assigned_and_nothing_is_written(
    ids: Identities
) -> None:
    with pytest.raises(InvalidInput, match="unknown role 'Nope'"):
        await ids.create_user("erin", "default", roles=["Test Reader", "Nope"])
    assert await ids.list_users() == []
    await ids.create_user("erin", "default", roles=["Test Reader"])
    with pytest.raises(InvalidInput, match="unknown role 'Nope'"):
        await ids.set_roles("erin", ["Test Administrator", "Nope"])
    user = await ids.user("erin")
    assert user is not None and user.roles == ("Test Reader",)
    with pytest.raises(InvalidInput, match="invalid role name ' x'"):
        await ids.set_roles("erin", [" x"])


@pytest.mark.parametrize(("cidr", "message"), [
    ("10.0.0.1/8", r"host bits set \(the network is 10\.0\.0\.0/8\)"),
    ("10.0.0.0/33", "invalid CIDR '10.0.0.0/33'"),
    ("300.1.1.1", "invalid CIDR '300.1.1.1'"),
    ("2001:db8::1/129", "invalid CIDR '2001:db8::1/129'"),
    ("example.com", "invalid CIDR 'example.com'"),
    ("", "invalid CIDR ''"),
])
async def test_bad_networks_are_refused(ids: Identities, cidr: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_cidrs([cidr])
    with pytest.raises(InvalidInput, match=message):
        await ids.create_user("frank", "default", cidrs=["10.0.0.0/8", cidr])
    assert await ids.list_users() == []


def test_networks_and_names() -> None:
    assert parse_cidrs([" 10.0.0.0/8", "10.0.0.0/8", "::1"]) == ("10.0.0.0/8", "::1/128")
    assert source_allowed([], "anything")  # no networks: any address
    assert source_allowed(["10.0.0.0/8"], "10.255.0.1")
    assert not source_allowed(["10.0.0.0/8"], "11.0.0.1")
    assert not source_allowed(["10.0.0.0/8"], "not-an-ip")
    assert source_allowed(["fe80::/10"], "fe80::1%eth0")
    assert check_name("a.b@c-d_e", "user") == "a.b@c-d_e"
    for bad in ("", "-x", "a b", "x" * 65, "0123456789abcdef0123456789abcdef", "é"):
        with pytest.raises(InvalidInput):
            check_name(bad, "user")
    assert check_actions(["test:*", "test:*"], CATALOG.actions) == ("test:*",)


async def test_a_sealed_secret_key_is_bound_to_its_access_key(
    ids: Identities, iam_settings: Settings
) -> None:
    await ids.create_user("gina", "default", roles=["Test Reader"])
    one, one_secret = await ids.create_access_key("gina")
    two, two_secret = await ids.create_access_key("gina")
    blobs = {str(ak): blob for ak, blob in db_rows(
        iam_settings, "SELECT access_key, secret_sealed FROM iam_access_keys")}
    swap = "UPDATE iam_access_keys SET secret_sealed = ? WHERE access_key = ?"
    db_rows(iam_settings, swap, blobs[two.access_key], one.access_key)  # swap the sealed SKs
    db_rows(iam_settings, swap, blobs[one.access_key], two.access_key)
    for record in (one, two):
        with pytest.raises(AuthenticationFailed) as refused:
            await ids.caller(record.access_key)
        assert refused.value.code == "access_key_unusable"
        assert "cannot be used" in refused.value.message
        assert one_secret not in str(refused.value.to_dict())
        assert two_secret not in str(refused.value.to_dict())

    db_rows(iam_settings, swap, b"\x01" + bytes(40), one.access_key)  # garbage
    db_rows(iam_settings, swap, b"\x01\x02", two.access_key)  # truncated
    for record in (one, two):
        with pytest.raises(AuthenticationFailed, match="cannot be used"):
            await ids.caller(record.access_key)


async def test_no_secret_key_in_the_store_file_the_logs_or_a_repr(
    ids: Identities, iam_settings: Settings
) -> None:
    await ids.create_user("hank", "default", roles=["Test Reader"])
    with capture_logs() as logs:
        record, secret = await ids.create_access_key("hank")
        caller = await ids.caller(record.access_key)
    assert caller is not None and caller.secret_key == secret.encode()
    assert secret not in json.dumps(logs, default=str)
    assert any(e["event"] == "iam.access_key_created" for e in logs)
    assert secret not in repr(caller) and secret not in repr(record)
    assert "secret_key" not in repr(caller)
    assert secret not in str(caller.principal("127.0.0.1"))
    if iam_settings.store_target.url:  # every column of every row of the store's tables
        raw = repr(db_rows(iam_settings, "SELECT k.*, u.* FROM iam_access_keys k "
                           "JOIN iam_users u ON u.user_id = k.user_id")).encode()
    else:  # the file itself, and its WAL
        raw = b"".join(p.read_bytes() for p in (
            iam_settings.db_path, Path(f"{iam_settings.db_path}-wal")) if p.exists())
    assert record.access_key.encode() in raw  # the store was read, the AK is stored
    assert secret.encode() not in raw


async def test_the_sealing_key_is_made_in_the_token(ids: Identities, core: CryptoCore) -> None:
    await ids.create_user("ivan", "default")
    await ids.create_access_key("ivan")
    assert await core.key_exists(SECRET_KEY_LABEL)
    info = await core.key_info(SECRET_KEY_LABEL)
    assert info.spec is not None and info.spec.value == "AES_256"


async def test_resolve_project(ids: Identities, iam_settings: Settings) -> None:
    project = await ids.create_project("acme")
    assert await resolve_project(iam_settings, project.project_id) == "acme"
    assert await resolve_project(iam_settings, "acme") == "acme"
    assert await resolve_project(iam_settings, "free-form") == "free-form"  # no row: as is
    with pytest.raises(InvalidInput, match="no project '0123456789abcdef0123456789abcdef'"):
        await resolve_project(iam_settings, "0123456789abcdef0123456789abcdef")


async def test_the_identities_resource_and_a_crypto_core_of_its_own(
    iam_settings: Settings, core: CryptoCore
) -> None:
    resources = Resources(iam_settings)
    resources.put("crypto", core)  # the process's core (not closed by the resource)
    try:
        ids: Identities = await resources.get("identities")
        assert await resources.get("identities") is ids
        await ids.create_user("judy", "default", roles=["Test Reader"])
        record, secret = await ids.create_access_key("judy")
    finally:
        await resources.close()

    # Without a crypto provider, Identities connects (and closes) a core of its own.
    async with await Identities.open(iam_settings) as own:
        caller = await own.caller(record.access_key)
        assert caller is not None and caller.secret_key == secret.encode()
    assert await core.key_exists(SECRET_KEY_LABEL)  # the shared core still works
