"""What the HTTPS API adds to the KMS service, on the real SoftHSM token: alias,
description and rotation-interval updates, paged listing, tags, quotas and grants
(including the API's authorization check, ``grant_account``)."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from typing import Any

import pytest

from engine.errors import InvalidInput
from engine.settings import Settings
from handlers.kms.errors import (
    AliasExists,
    DefaultKeyProtected,
    GrantQuotaExceeded,
    KeyStateError,
    RotationUnsupported,
    TagQuotaExceeded,
    UnknownGrant,
    UnknownKey,
    UnknownTag,
)
from handlers.kms.service import KmsService
from handlers.kms.store import SqliteKmsStore
from tests.helpers import FakeClock, run_dew

USER, OTHER_USER, RETIRER, PROJECT = (secrets.token_hex(16) for _ in range(4))


async def _outcomes(kms: KmsService, key_id: str, operation: str) -> list[str]:
    return [e.outcome for e in await kms.audit_list(key_id) if e.operation == operation]


# --------------------------------------------------------------------------- alias, description


async def test_update_alias_and_description(kms: KmsService) -> None:
    one = await kms.create_key("upd/one", description="first")
    two = await kms.create_key("upd/two")
    renamed = await kms.update_key_alias(one.key_id, "upd/renamed")
    assert renamed.key_alias == "upd/renamed" and renamed.key_id == one.key_id
    assert (await kms.describe_key("upd/renamed")).key_id == one.key_id
    with pytest.raises(UnknownKey):
        await kms.describe_key("upd/one")
    assert (await kms.update_key_alias("upd/renamed", "upd/renamed")).key_alias == "upd/renamed"
    assert await _outcomes(kms, one.key_id, "update_key_alias") == ["success", "unchanged"]

    # Refusals change nothing.
    with pytest.raises(AliasExists):
        await kms.update_key_alias(one.key_id, "upd/two")
    for bad in ("svc/default", "has space", "", two.key_id):
        with pytest.raises(InvalidInput):
            await kms.update_key_alias(one.key_id, bad)
    with pytest.raises(InvalidInput, match="description"):
        await kms.update_key_description(one.key_id, "x" * 256)
    with pytest.raises(UnknownKey) as other:
        await kms.update_key_alias(one.key_id, "upd/stolen", account="other")
    with pytest.raises(UnknownKey) as missing:
        await kms.update_key_alias("00000000-0000-4000-8000-000000000000", "upd/x",
                                   account="other")
    assert str(other.value).replace(one.key_id, "ID") == str(missing.value).replace(
        "00000000-0000-4000-8000-000000000000", "ID")
    await kms.describe_key("kps/default")  # made on first request
    for ref in ("kps/default", (await kms.describe_key("kps/default")).key_id):
        with pytest.raises(DefaultKeyProtected):
            await kms.update_key_alias(ref, "kps/mine")
        with pytest.raises(DefaultKeyProtected):
            await kms.update_key_description(ref, "mine")
    await kms.schedule_key_deletion(two.key_id, 7)
    with pytest.raises(KeyStateError, match="pending deletion"):
        await kms.update_key_description(two.key_id, "late")
    with pytest.raises(KeyStateError):
        await kms.update_key_alias(two.key_id, "upd/late")
    shown = await kms.describe_key(one.key_id)
    assert (shown.key_alias, shown.description) == ("upd/renamed", "first")
    assert (await kms.describe_key(two.key_id)).key_alias == "upd/two"

    changed = await kms.update_key_description("upd/renamed", "second")
    assert changed.description == "second"
    assert (await kms.describe_key(one.key_id)).description == "second"
    assert (await kms.audit_verify()).intact


async def test_update_rotation_interval(kms: KmsService, clock: FakeClock) -> None:
    key = await kms.create_key("rot/interval")
    t0 = clock.now
    # Rotation off: the interval is kept for when it is turned on.
    kept = await kms.update_key_rotation_interval(key.key_id, 90)
    assert kept.changed and not kept.status.enabled
    enabled = await kms.enable_key_rotation(key.key_id)
    assert enabled.status.interval_days == 90
    assert enabled.status.next_rotation == t0 + timedelta(days=90)
    # Rotation on: the next rotation counts from when it was turned on.
    clock.advance(days=10)
    moved = await kms.update_key_rotation_interval(key.key_id, 30)
    assert moved.status.interval_days == 30 and moved.status.next_rotation == t0 + timedelta(
        days=30)
    assert not (await kms.update_key_rotation_interval(key.key_id, 30)).changed
    clock.advance(days=25)
    sooner = await kms.update_key_rotation_interval(key.key_id, 31)
    assert sooner.status.next_rotation == clock.now  # t0 + 31 days is past: due now
    for bad in (29, 366, True, "90"):
        with pytest.raises(InvalidInput, match=r"30\.\.365"):
            await kms.update_key_rotation_interval(key.key_id, bad)  # type: ignore[arg-type]
    mac = await kms.create_key("rot/mac", "HMAC_256")
    with pytest.raises(RotationUnsupported):
        await kms.update_key_rotation_interval(mac.key_id, 60)
    with pytest.raises(UnknownKey):
        await kms.update_key_rotation_interval(key.key_id, 60, account="other")
    status = await kms.get_key_rotation_status(key.key_id)
    assert status.enabled and status.interval_days == 31
    assert await _outcomes(kms, key.key_id, "update_key_rotation_interval") == [
        "success", "success", "unchanged", "success"] + ["failure"] * 5


# --------------------------------------------------------------------------- listing


async def test_paging_returns_every_key_once(kms: KmsService, clock: FakeClock) -> None:
    made = []
    for i in range(7):
        made.append((await kms.create_key(f"page/{i}")).key_id)
        if i % 3 == 0:
            clock.advance(seconds=1)  # some keys share a creation time: key id breaks ties
    mac = await kms.create_key("page/mac", "HMAC_256")
    seen: list[str] = []
    marker = None
    pages = 0
    while True:
        page = await kms.list_keys_page(limit=3, marker=marker)
        assert page.total == 8 and len(page.keys) <= 3
        pages += 1
        seen += [k.key_id for k in page.keys]
        marker = page.next_marker
        assert page.truncated == (marker is not None)
        if marker is None:
            break
        assert len(marker) <= 64
    assert pages == 3 and len(seen) == 8 and set(seen) == {*made, mac.key_id}
    assert seen == [k.key_id for k in await kms.list_keys()]  # the same stable order
    # Filters, and the old call shape still returns a list.
    assert [k.key_id for k in await kms.list_keys(key_spec="HMAC_256")] == [mac.key_id]
    assert len(await kms.list_keys(key_spec="ALL")) == 8
    assert await kms.list_keys(key_spec="SM4") == []  # the hosted service's; none here
    assert len(await kms.list_keys(limit=2)) == 2
    aes = await kms.list_keys_page(key_spec="AES_256", limit=5)
    assert aes.total == 7 and len(aes.keys) == 5 and aes.next_marker is not None
    rest = await kms.list_keys(key_spec="AES_256", marker=aes.next_marker)
    assert len(rest) == 2
    await kms.disable_key(made[0])
    disabled = await kms.list_keys_page(state="disabled")
    assert [k.key_id for k in disabled.keys] == [made[0]] and disabled.next_marker is None
    assert (await kms.list_keys_page(account="other")).to_json() == {
        "keys": [], "next_marker": None, "truncated": False, "total": 0}
    for kwargs in ({"limit": 0}, {"limit": 1001}, {"marker": "nope"}, {"key_spec": "FOO"},
                   {"marker": "zz." + made[0]}):
        with pytest.raises(InvalidInput):
            await kms.list_keys_page(**kwargs)


# --------------------------------------------------------------------------- tags


async def test_tags_all_or_nothing(
    kms: KmsService, kms_store: SqliteKmsStore, clock: FakeClock
) -> None:
    one = await kms.create_key("tag/one")
    clock.advance(seconds=1)
    two = await kms.create_key("tag/two")
    clock.advance(seconds=1)
    await kms.create_key("tag/three")
    await kms.create_tag(one.key_id, "env", "prod")
    await kms.create_tag("tag/one", "team", "")
    await kms.create_tag(one.key_id, "env", "staging")  # an existing tag key: new value
    assert await kms.key_tags(one.key_id) == [("env", "staging"), ("team", "")]
    with pytest.raises(UnknownTag):
        await kms.delete_tag(one.key_id, "nope")
    # Batches: all or nothing.
    too_many = [(f"k{i}", "v") for i in range(19)]
    with pytest.raises(TagQuotaExceeded):
        await kms.batch_tags(one.key_id, too_many, "create")
    with pytest.raises(InvalidInput, match="twice"):
        await kms.batch_tags(one.key_id, [("a", "1"), ("a", "2")], "create")
    with pytest.raises(UnknownTag):
        await kms.batch_tags(one.key_id, [("env", ""), ("nope", "")], "delete")
    with pytest.raises(UnknownTag, match="value"):
        await kms.batch_tags(one.key_id, [("env", "prod")], "delete")  # its value is staging
    for bad_key, bad_value in (("", "v"), ("k" * 129, "v"), ("k", "v" * 256), (" k", "v")):
        with pytest.raises(InvalidInput):
            await kms.create_tag(one.key_id, bad_key, bad_value)
    with pytest.raises(InvalidInput, match="action"):
        await kms.batch_tags(one.key_id, [("a", "1")], "update")
    with pytest.raises(UnknownKey):
        await kms.create_tag(one.key_id, "x", "y", account="other")
    with pytest.raises(UnknownKey):
        await kms.key_tags(one.key_id, account="other")
    assert await kms.key_tags(one.key_id) == [("env", "staging"), ("team", "")]

    await kms.batch_tags(one.key_id, [(f"k{i}", "v") for i in range(18)], "create")
    assert len(await kms.key_tags(one.key_id)) == 20
    await kms.batch_tags(one.key_id, [(f"k{i}", "") for i in range(18)], "delete")
    await kms.batch_tags(two.key_id, [("env", "dev"), ("owner", "ann")], "create")
    await kms.delete_tag(two.key_id, "owner")
    assert await kms.project_tags() == {"env": ["dev", "staging"], "team": [""]}
    assert await kms.project_tags(account="other") == {}

    async def found(**kwargs: object) -> list[str]:
        resources, total = await kms.keys_by_tags(**kwargs)  # type: ignore[arg-type]
        assert total >= len(resources)
        return [key.key_alias for key, _ in resources]

    assert await found(tags={"env": []}) == ["tag/one", "tag/two"]
    assert await found(tags={"env": ["staging"]}) == ["tag/one"]
    assert await found(tags={"env": ["staging", "dev"], "team": []}) == ["tag/one"]
    assert await found(tags={}, matches=[("resource_name", "thr")]) == ["tag/three"]
    assert await found(tags={"env": []}, matches=[("resource_name", "two")]) == ["tag/two"]
    assert await found() == ["tag/one", "tag/two", "tag/three"]
    page = await kms.keys_by_tags(limit=1, offset=1)
    assert page.total == 3 and [r.key.key_alias for r in page.resources] == ["tag/two"]
    assert page.resources[0].tags == [("env", "dev")]
    assert page.to_json()["resources"][0]["tags"] == [{"key": "env", "value": "dev"}]
    with pytest.raises(InvalidInput, match="resource_name"):
        await kms.keys_by_tags(matches=[("alias", "x")])

    # Tags go with the key.
    await kms.schedule_key_deletion(two.key_id, 7)
    with pytest.raises(KeyStateError):
        await kms.create_tag(two.key_id, "late", "x")
    clock.advance(days=8)
    assert (await kms.delete_due_keys()).deleted == [two.key_id]
    rows = await kms_store._fetchall("SELECT * FROM kms_tags WHERE key_id = ?", (two.key_id,))
    assert rows == []
    assert await kms.project_tags() == {"env": ["staging"], "team": [""]}
    ops = {(e.operation, e.outcome) for e in await kms.audit_list(one.key_id)}
    assert {("create_tag", "success"), ("batch_tags", "failure"),
            ("delete_tag", "failure")} <= ops
    assert (await kms.audit_verify()).intact


# --------------------------------------------------------------------------- grants, quotas


async def test_grants_and_the_authorization_check(
    kms: KmsService, kms_store: SqliteKmsStore, clock: FakeClock
) -> None:
    key = await kms.create_key("grant/key")
    grant = await kms.create_grant(key.key_id, USER, ["encrypt-data", "describe-key"],
                                   name="app", retiring_principal=RETIRER)
    assert len(grant.grant_id) == 64 and int(grant.grant_id, 16) >= 0
    assert grant.to_json()["operations"] == ["encrypt-data", "describe-key"]
    assert grant.issuing_principal == "test"
    clock.advance(seconds=1)
    domain = await kms.create_grant("grant/key", PROJECT, ["decrypt-data"],
                                    grantee_principal_type="domain")

    async def account_for(op: str, user: str | None = USER, project: str | None = None
                          ) -> str | None:
        return await kms.grant_account(key.key_id, op, user_id=user, project_id=project)

    assert await account_for("encrypt-data") == "default"
    assert await account_for("describe-key") == "default"
    assert await account_for("decrypt-data") is None  # not granted to this user
    assert await account_for("encrypt-data", user=OTHER_USER) is None
    assert await account_for("encrypt-data", user=PROJECT) is None  # a domain grant, not user
    assert await account_for("decrypt-data", user=OTHER_USER, project=PROJECT) == "default"
    assert await account_for("sign") is None and await account_for("encrypt-data", None) is None
    assert await kms.grant_account("grant/key", "encrypt-data", user_id=USER,
                                   project_id=None) is None  # by key id only

    page = await kms.list_grants(key.key_id)
    assert [g.grant_id for g in page.grants] == [grant.grant_id, domain.grant_id]
    assert page.total == 2 and page.next_marker is None
    with pytest.raises(UnknownKey):
        await kms.list_grants(key.key_id, account="other")
    # Bad input: refused, nothing written.
    for args, kwargs, field in (
        ((key.key_id, "ABC", ["encrypt-data"]), {}, "grantee_principal"),
        ((key.key_id, USER, ["rm-rf"]), {}, "operations"),
        ((key.key_id, USER, []), {}, "operations"),
        ((key.key_id, USER, ["encrypt-data"]), {"grantee_principal_type": "group"},
         "grantee_principal_type"),
        ((key.key_id, USER, ["encrypt-data"]), {"retiring_principal": "x"},
         "retiring_principal"),
        ((key.key_id, USER, ["encrypt-data"]), {"name": "a b"}, "name"),
    ):
        with pytest.raises(InvalidInput, match=field) as refused:
            await kms.create_grant(*args, **kwargs)
        assert refused.value.target == field
    with pytest.raises(UnknownKey):
        await kms.create_grant(key.key_id, USER, ["encrypt-data"], account="other")
    with pytest.raises(DefaultKeyProtected):
        await kms.create_grant("kps/default", USER, ["encrypt-data"])
    assert (await kms.list_grants(key.key_id)).total == 2

    # Revoke (the key's account).
    await kms.revoke_grant(key.key_id, domain.grant_id)
    assert await account_for("decrypt-data", user=OTHER_USER, project=PROJECT) is None
    with pytest.raises(UnknownGrant):
        await kms.revoke_grant(key.key_id, domain.grant_id)
    with pytest.raises(UnknownKey):
        await kms.revoke_grant(key.key_id, grant.grant_id, account="other")
    # Retire (the retiring principal or grantee, by id; anyone else: the same refusal).
    retirable = await kms.list_retirable_grants(user_id=RETIRER)
    assert [g.grant_id for g in retirable.grants] == [grant.grant_id]
    with pytest.raises(UnknownGrant) as stranger:
        await kms.retire_grant(key.key_id, grant.grant_id, user_id=OTHER_USER,
                               project_id=PROJECT)
    with pytest.raises(UnknownGrant) as nothing:
        await kms.retire_grant("00000000-0000-4000-8000-000000000000", grant.grant_id,
                               user_id=RETIRER)
    assert str(stranger.value).split(" on key")[0] == str(nothing.value).split(" on key")[0]
    assert await account_for("encrypt-data") == "default"
    await kms.retire_grant(key.key_id, grant.grant_id, user_id=RETIRER, project_id=PROJECT)
    assert await account_for("encrypt-data") is None
    assert (await kms.list_retirable_grants(user_id=RETIRER)).total == 0
    by_grantee = await kms.create_grant(key.key_id, USER, ["create-datakey"])
    await kms.retire_grant(key.key_id, by_grantee.grant_id, user_id=USER)
    assert (await kms.list_grants(key.key_id)).total == 0
    ops = [(e.operation, e.outcome) for e in await kms.audit_list(key.key_id)]
    assert ("revoke_grant", "success") in ops and ("retire_grant", "failure") in ops
    assert ("retire_grant", "success") in ops

    # Grants go with the key; a key pending deletion gets no new ones.
    again = await kms.create_grant(key.key_id, USER, ["encrypt-data"])
    await kms.schedule_key_deletion(key.key_id, 7)
    with pytest.raises(KeyStateError, match="pending deletion"):
        await kms.create_grant(key.key_id, USER, ["encrypt-data"])
    assert await account_for("encrypt-data") == "default"  # using it fails on its state
    clock.advance(days=8)
    await kms.delete_due_keys()
    assert await account_for("encrypt-data") is None
    assert await kms_store._fetchall("SELECT * FROM kms_grants WHERE grant_id = ?",
                                     (again.grant_id,)) == []
    assert (await kms.audit_verify()).intact


async def test_grant_paging_limit_and_quotas(kms: KmsService) -> None:
    key = await kms.create_key("grant/many")
    await kms.create_key("grant/other")
    await kms.describe_key("obs/default")  # default keys do not count
    quotas = {q.type: (q.used, q.quota) for q in await kms.user_quotas()}
    assert quotas == {"CMK": (2, 100), "grant_per_CMK": (0, 100)}
    made = [(await kms.create_grant(key.key_id, secrets.token_hex(16), ["encrypt-data"]))
            .grant_id for _ in range(100)]
    with pytest.raises(GrantQuotaExceeded):
        await kms.create_grant(key.key_id, USER, ["encrypt-data"])
    quotas = {q.type: (q.used, q.quota) for q in await kms.user_quotas()}
    assert quotas == {"CMK": (2, 100), "grant_per_CMK": (100, 100)}
    assert [q.to_json() for q in await kms.user_quotas(account="other")] == [
        {"type": "CMK", "used": 0, "quota": 100},
        {"type": "grant_per_CMK", "used": 0, "quota": 100}]
    seen: list[str] = []
    marker = None
    for _ in range(4):
        page = await kms.list_grants(key.key_id, limit=40, marker=marker)
        assert page.total == 100
        seen += [g.grant_id for g in page.grants]
        marker = page.next_marker
        if marker is None:
            break
    assert len(seen) == 100 and set(seen) == set(made)
    with pytest.raises(InvalidInput):
        await kms.list_grants(key.key_id, limit=101)


# --------------------------------------------------------------------------- CLI


def test_cli_tags_grants_and_updates(kms_settings: Settings) -> None:
    def ok(*args: str) -> Any:
        done = run_dew(kms_settings, "kms", *args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    key = ok("create-key", "--alias", "cli/tagged")
    assert ok("tag", "cli/tagged", "--tag", "env=prod", "--tag", "team=") == [
        {"key": "env", "value": "prod"}, {"key": "team", "value": ""}]
    assert ok("untag", "cli/tagged", "--tag-key", "team") == [{"key": "env", "value": "prod"}]
    grant = ok("create-grant", "cli/tagged", "--grantee", USER, "--operation", "encrypt-data",
               "--operation", "describe-key")
    assert grant["operations"] == ["encrypt-data", "describe-key"]
    assert [g["grant_id"] for g in ok("list-grants", "cli/tagged")] == [grant["grant_id"]]
    assert ok("quotas") == [{"type": "CMK", "used": 1, "quota": 100},
                            {"type": "grant_per_CMK", "used": 1, "quota": 100}]
    assert ok("revoke-grant", "cli/tagged", grant["grant_id"])["revoked"] is True
    assert ok("update-key-alias", "cli/tagged", "--alias", "cli/renamed")["key_id"] == (
        key["key_id"])
    assert ok("update-key-rotation-interval", "cli/renamed", "--interval-days", "60")[
        "changed"] is True
    for args, text in ((("tag", "k", "--tag", "novalue"), "KEY=VALUE"),
                       (("create-grant", "k", "--grantee", "x", "--operation", "encrypt-data"),
                        "--grantee"),
                       (("revoke-grant", "k", "abc"), "GRANT_ID"),
                       (("update-key-rotation-interval", "k", "--interval-days", "7"),
                        "30..365")):
        bad = run_dew(kms_settings, "kms", *args)
        assert bad.returncode == 2 and text in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
