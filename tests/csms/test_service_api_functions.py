"""What the secrets service gained for the HTTPS API: versions with chosen stages and
an expiry, stage times, update, immediate deletion, tags (all or nothing, at most
20), search by tags and name, lookup by id; and the API module's pure request readers
(the store's migrations on an older database: tests/csms/test_store.py)."""

from __future__ import annotations

import json
import string

import pytest

from engine.errors import InvalidInput
from handlers.csms import api
from handlers.csms import model as m
from handlers.csms.service import (
    SecretInfo,
    SecretNotFound,
    SecretsService,
    SecretStateError,
)

VALUE = b"correct horse battery staple 7f3a"


async def test_versions_with_chosen_stages_and_expiry(csms: SecretsService) -> None:
    await csms.create("app", VALUE)
    blue = await csms.put_version("app", b"blue", stages=["BLUE", "GREEN"],
                                  expire_time=2_000_000_000)
    assert (blue.version_id, blue.stages, blue.expire_time) == ("v2", ["BLUE", "GREEN"],
                                                                2_000_000_000)
    assert (await csms.get_value("app")).version_id == "v1"  # SYSCURRENT did not move
    both = await csms.put_version("app", b"both", stages=[m.CURRENT, "BLUE"])
    assert both.stages == [m.CURRENT, "BLUE"]
    versions = {v.version_id: v.stages for v in await csms.list_versions("app")}
    assert versions == {"v1": [m.PREVIOUS], "v2": ["GREEN"], "v3": [m.CURRENT, "BLUE"]}
    changed = await csms.set_version_expiry("app", "v1", 1_900_000_000)
    assert changed.expire_time == 1_900_000_000
    assert (await csms.version_info("app", "v1")).expire_time == 1_900_000_000
    version_id, when = await csms.stage_info("app", "BLUE")
    assert version_id == "v3" and when is not None
    for bad in ([], [f"S{i}" for i in range(13)], ["a" * 65]):
        with pytest.raises(InvalidInput):
            await csms.put_version("app", b"x", stages=bad)
    with pytest.raises(InvalidInput):
        await csms.put_version("app", b"x", expire_time=-1)
    assert len(await csms.list_versions("app")) == 3  # nothing written on refusal


async def test_update_delete_now_and_lookup_by_id(csms: SecretsService) -> None:
    info = await csms.create("gone", VALUE)
    assert (await csms.find(info.record.secret_id)).record.name == "gone"
    assert (await csms.find("gone")).record.secret_id == info.record.secret_id
    updated = await csms.update("gone", description="new words")
    assert updated.record.description == "new words"
    await csms.schedule_deletion("gone", 7)
    with pytest.raises(SecretStateError):
        await csms.update("gone", description="no")
    await csms.delete_now("gone")  # even while pending deletion
    with pytest.raises(SecretNotFound):
        await csms.describe("gone")
    with pytest.raises(SecretNotFound):
        await csms.find(info.record.secret_id)


async def test_tags_all_or_nothing_and_search(csms: SecretsService) -> None:
    a = await csms.create("svc-a", VALUE)
    await csms.create("svc-b", VALUE)
    await csms.create("svc-c", VALUE, account="other")
    assert await csms.change_tags(a.record.secret_id, put={"env": "prod", "team": "x"}) == {
        "env": "prod", "team": "x"}
    await csms.change_tags("svc-b", put={"env": "dev"})
    await csms.change_tags("svc-c", put={"env": "prod"}, account="other")
    with pytest.raises(InvalidInput, match="at most 20"):
        await csms.change_tags("svc-a", put={f"k{i}": "v" for i in range(19)})
    with pytest.raises(InvalidInput):
        await csms.change_tags("svc-a", put={"_sys_x": "v"})
    assert await csms.tags("svc-a") == {"env": "prod", "team": "x"}  # unchanged
    assert await csms.change_tags("svc-a", remove=["team"]) == {"env": "prod"}

    def names(found: list[tuple[SecretInfo, dict[str, str]]]) -> list[str]:
        return [info.record.name for info, _ in found]

    assert names(await csms.search(tags={"env": ["prod"]})) == ["svc-a"]
    assert names(await csms.search(tags={"env": []})) == ["svc-a", "svc-b"]
    assert names(await csms.search(name_contains="-b")) == ["svc-b"]
    assert names(await csms.search(tags={"env": ["prod"]}, account="other")) == ["svc-c"]
    await csms.delete_now("svc-a")  # tags go with the secret
    assert names(await csms.search(tags={"env": []})) == ["svc-b"]


def test_api_request_readers() -> None:
    assert api.secret_value({"secret_string": "héllo"}) == "héllo".encode()
    assert api.secret_value({"secret_binary": "AP8="}) == b"\x00\xff"
    for bad, field in (({}, "secret_string"), ({"secret_binary": "%%"}, "secret_binary"),
                       ({"secret_string": "x" * 32769}, "secret_string"),
                       ({"secret_string": "a", "secret_binary": "YQ=="}, "secret_string")):
        with pytest.raises(InvalidInput) as info:
            api.secret_value(bad)
        assert info.value.message.startswith(field)
    pg = json.dumps({"engine": "postgres"}).encode()
    maria = json.dumps({"engine": "MariaDB"}).encode()
    assert api.secret_kind({"secret_type": "RDS-FG"}, pg) is m.SecretType.RDS_POSTGRESQL
    assert api.secret_kind({"secret_type": "GaussDB-FG"}, maria) is m.SecretType.RDS_MYSQL
    assert api.secret_kind({}, b"anything") is m.SecretType.COMMON
    for data, value in (({"secret_type": "GaussDB-FG"}, pg), ({"secret_type": "RDS-FG"}, b"x"),
                        ({"secret_type": "KV"}, b"x")):
        with pytest.raises(InvalidInput):
            api.secret_kind(data, value)
    assert api.rotation_config({"rotation_config": '{"InstanceId": "i"}'}) == \
        '{"InstanceId": "i"}'
    for text in ("[1]", '{"SecretSubType": "MultiUser"}', "x" * 1025):
        with pytest.raises(InvalidInput) as info:
            api.rotation_config({"rotation_config": text})
        assert info.value.message.startswith("rotation_config")


def test_generate_password() -> None:
    digits = m.generate_password(20, exclude_lowercase=True, exclude_uppercase=True,
                                 exclude_punctuation=True)
    assert len(digits) == 20 and digits.isdigit()
    mixed = m.generate_password(8, require_each_included_type=True, exclude_characters="0O")
    assert {c for c in mixed} & set(string.punctuation) and "0" not in mixed
    with pytest.raises(InvalidInput):
        m.generate_password(12, exclude_lowercase=True, exclude_uppercase=True,
                            exclude_numbers=True, exclude_punctuation=True)
    with pytest.raises(InvalidInput):
        m.generate_password(7)
    assert m.format_period(30 * 86400) == "30d" and m.format_period(36 * 3600) == "36h"
