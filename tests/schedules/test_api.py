"""The schedules over HTTPS, called through the official SDK's signer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException

from engine.api.testing import ApiServerThread, StaticCaller, StaticIdentities
from engine.logs import configure_logging
from engine.settings import Settings
from schedules.roles import CATALOG
from tests.engine.api_echo_service import sdk

SERVICES = ["handlers.builtin", "schedules"]
BASE = "/v1/{project_id}/dew/schedules"
ONE = BASE + "/{name}"
SLEEP = {"name": "tick", "cron": "*/5 * * * *", "timezone": "Asia/Tokyo",
         "job": "engine.sleep", "args": {"seconds": 0}}


@pytest.fixture(autouse=True)
def sdk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the SDK writes ~/.huaweicloud


@pytest.fixture
def identities() -> StaticIdentities:
    return StaticIdentities()


@pytest.fixture
def server(settings: Settings, identities: StaticIdentities) -> Iterator[ApiServerThread]:
    api_settings = settings.replace(engine={"services": SERVICES})
    configure_logging(api_settings.log_file, "debug", console="off")
    with ApiServerThread(api_settings, identities=identities) as running:
        yield running


@pytest.fixture
def connect(server: ApiServerThread) -> Iterator[Any]:
    made: list[sdk.GenericClient] = []

    def factory(caller: StaticCaller) -> sdk.GenericClient:
        client = sdk.caller_client(server.url, caller, server.ca_file)
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()


def refusal(call: Any) -> ClientRequestException:
    try:
        call()
    except ClientRequestException as exc:
        return exc
    raise AssertionError("the call succeeded")


def test_the_operations_through_the_sdk(connect: Any, identities: StaticIdentities) -> None:
    ops = connect(identities.add(actions={"dew:schedules:*", "engine:jobs:enqueue"},
                                 project="acme", user="ops"))
    created = sdk.body_of(ops.call("POST", BASE, body=SLEEP))["schedule"]
    assert (created["name"], created["project"], created["timezone"], created["created_by"]) == (
        "tick", "acme", "Asia/Tokyo", "api:ops@acme")
    assert created["next_run"] is not None and created["paused"] is False
    assert created["args"] == {"seconds": 0, "account": "acme"}  # the caller's project
    sid = created["schedule_id"]

    listed = sdk.body_of(ops.call("GET", BASE))
    assert listed["total"] == 1 and listed["schedules"][0]["schedule_id"] == sid

    paused = sdk.body_of(ops.call("POST", ONE + "/pause", path_params={"name": "tick"}))
    assert paused["schedule"]["paused"] is True
    resumed = sdk.body_of(ops.call("POST", ONE + "/resume", path_params={"name": "tick"}))
    assert resumed["schedule"]["paused"] is False

    ran = sdk.body_of(ops.call("POST", ONE + "/run-now", path_params={"name": "tick"}))
    assert ran["task_id"].startswith(f"sched-{sid}-now-") and ran["schedule"] == "tick"
    assert ops.last.headers["X-Dew-Task-Id"] == ran["task_id"]
    shown = sdk.body_of(ops.call("GET", ONE, path_params={"name": "tick"}))["schedule"]
    assert [(f["kind"], f["task_id"]) for f in shown["firings"]] == [("run-now", ran["task_id"])]

    taken = refusal(lambda: ops.call("POST", BASE, body=SLEEP))
    assert (taken.status_code, taken.error_code) == (409, "DEW.0409")

    # Another project sees none of it.
    other = connect(identities.add(actions={"dew:schedules:*"}, project="shop"))
    assert sdk.body_of(other.call("GET", BASE))["total"] == 0
    hidden = refusal(lambda: other.call("GET", ONE, path_params={"name": "tick"}))
    assert (hidden.status_code, hidden.error_code) == (404, "DEW.0404")

    assert ops.call("DELETE", ONE, path_params={"name": "tick"}).status_code == 204
    gone = refusal(lambda: ops.call("GET", ONE, path_params={"name": "tick"}))
    assert gone.status_code == 404 and "no schedule named 'tick'" in gone.error_msg
    assert sdk.body_of(ops.call("GET", BASE))["total"] == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"cron": "61 * * * *"}, "does not parse"),
    ({"cron": "0 0 30 2 *"}, "has no future slot"),
    ({"timezone": "Mars/Olympus_Mons"}, "unknown timezone"),
    ({"job": "nope.job"}, "unknown job name 'nope.job'"),
    ({"args": {"seconds": -1}}, "'seconds' must be between"),
    ({"args": [1]}, "args: must be a JSON object"),
    ({"job": "engine.echo", "args": {"value": 1}}, "has secret arguments"),
    ({"name": "bad name"}, "invalid schedule name"),
    ({"args": {"seconds": 0, "account": "other"}}, "args.account is 'other'"),
    ({"cron": None}, "cron: is required"),
])
def test_bad_input_is_400_naming_the_problem_and_writes_nothing(
    connect: Any, identities: StaticIdentities, change: dict[str, Any], message: str,
) -> None:
    ops = connect(identities.add(actions={"dew:schedules:*", "engine:jobs:enqueue"}))
    body = {k: v for k, v in {**SLEEP, **change}.items() if v is not None}
    refused = refusal(lambda: ops.call("POST", BASE, body=body))
    assert (refused.status_code, refused.error_code) == (400, "DEW.0400")
    assert message in refused.error_msg
    assert sdk.body_of(ops.call("GET", BASE))["total"] == 0


def test_roles_and_the_jobs_enqueue_action(connect: Any, identities: StaticIdentities) -> None:
    no_enqueue = connect(identities.add(actions={"dew:schedules:*"}, project="acme"))
    refused = refusal(lambda: no_enqueue.call("POST", BASE, body=SLEEP))
    assert (refused.status_code, refused.error_code) == (403, "DEW.0403")
    assert "engine:jobs:enqueue" in refused.error_msg
    assert sdk.body_of(no_enqueue.call("GET", BASE))["total"] == 0

    reader = connect(identities.add(actions=set(CATALOG.roles["DEW ScheduleReadOnlyAccess"]),
                                    project="acme"))
    assert sdk.body_of(reader.call("GET", BASE))["total"] == 0
    denied = refusal(lambda: reader.call("POST", BASE, body=SLEEP))
    assert denied.status_code == 403 and "dew:schedules:create" in denied.error_msg

    full = connect(identities.add(actions={*CATALOG.roles["DEW ScheduleFullAccess"],
                                           "engine:jobs:enqueue"}, project="acme"))
    assert full.call("POST", BASE, body=SLEEP).status_code == 200
    # run-now, too, needs the job's enqueue action.
    refused = refusal(lambda: no_enqueue.call("POST", ONE + "/run-now",
                                              path_params={"name": "tick"}))
    assert refused.status_code == 403 and "engine:jobs:enqueue" in refused.error_msg
    denied = refusal(lambda: reader.call("DELETE", ONE, path_params={"name": "tick"}))
    assert denied.status_code == 403 and "dew:schedules:delete" in denied.error_msg
