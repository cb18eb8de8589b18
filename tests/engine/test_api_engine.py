"""The engine over HTTPS (handlers/builtin/api.py), called through the official SDK's
signer: enqueue, tasks, failure records, job names, project isolation and roles."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException

from engine.api.testing import ApiServerThread, StaticCaller, StaticIdentities
from engine.logs import configure_logging
from engine.settings import Settings
from engine.store import open_store
from handlers.builtin.roles import CATALOG
from tests.engine.api_echo_service import sdk
from tests.helpers import WorkerProcess

SERVICES = ["handlers.builtin", "tests.engine.retry_service"]
TASKS = "/v1/{project_id}/dew/tasks"
FAILURES = "/v1/{project_id}/dew/failures"
OPERATOR = set(CATALOG.roles["DEW TaskOperator"]) | {"retrytest:jobs:enqueue"}


@pytest.fixture(autouse=True)
def sdk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the SDK writes ~/.huaweicloud


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    api_settings = settings.replace(engine={"services": SERVICES}, api={"job_wait": 5.0})
    configure_logging(api_settings.log_file, "debug", console="off")
    return api_settings


@pytest.fixture
def identities() -> StaticIdentities:
    return StaticIdentities()


@pytest.fixture
def alice(identities: StaticIdentities) -> StaticCaller:
    return identities.add(actions=OPERATOR, project="acme", user="alice")


@pytest.fixture
def bob(identities: StaticIdentities) -> StaticCaller:
    return identities.add(actions=OPERATOR, project="other", user="bob")


@pytest.fixture
def server(api_settings: Settings, identities: StaticIdentities) -> Iterator[ApiServerThread]:
    with ApiServerThread(api_settings, identities=identities) as running:
        yield running


class Api:
    """One caller's SDK client, closed at the end."""

    def __init__(self, server: ApiServerThread, caller: StaticCaller) -> None:
        self.client = sdk.caller_client(server.url, caller, server.ca_file)

    def call(self, method: str, path: str, body: Any = None,
             query: dict[str, Any] | None = None) -> tuple[int, Any]:
        response = self.client.call(method, path, body=body, query=list((query or {}).items()))
        return response.status_code, sdk.body_of(response)

    def refused(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None) -> ClientRequestException:
        try:
            self.call(method, path, body, query)
        except ClientRequestException as exc:
            return exc
        raise AssertionError(f"{method} {path} succeeded")

    def enqueue(self, name: str, args: Any = None, **extra: Any) -> dict[str, Any]:
        status, body = self.call("POST", TASKS, {"name": name, "args": args, **extra})
        assert status == 202, body
        assert self.client.last.headers["X-Dew-Task-Id"] == body["task_id"]
        return dict(body)

    def tasks(self, **query: Any) -> list[dict[str, Any]]:
        status, body = self.call("GET", TASKS, query=query)
        assert status == 200
        return list(body["tasks"])

    def wait(self, task_id: str, status: str = "failed", timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            _, task = self.call("GET", f"{TASKS}/{task_id}")
            if task["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
                assert task["status"] == status, task
                return dict(task)
            time.sleep(0.1)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def connect(server: ApiServerThread) -> Iterator[Any]:
    made: list[Api] = []

    def factory(caller: StaticCaller) -> Api:
        made.append(Api(server, caller))
        return made[-1]

    yield factory
    for api in made:
        api.close()


def stored_tasks(settings: Settings) -> list[Any]:
    async def read() -> list[Any]:
        store = await open_store(settings)
        try:
            return await store.list_tasks(limit=1000)
        finally:
            await store.close()

    return asyncio.run(read())


# --- enqueue ---------------------------------------------------------------------------


def test_enqueue_answers_202_with_the_task_of_the_callers_project(
    connect: Any, alice: StaticCaller, api_settings: Settings,
) -> None:
    api = connect(alice)
    task = api.enqueue("engine.sleep", {"seconds": 0}, defer=3600)
    assert task["status"] == "queued" and task["name"] == "engine.sleep"
    assert task["project"] == "acme" and task["retry_of"] is None
    # The job runs for the caller's project.
    assert task["args"] == {"seconds": 0, "account": "acme"}
    [stored] = stored_tasks(api_settings)
    assert (stored.task_id, stored.project) == (task["task_id"], "acme")
    assert stored.due_at > stored.enqueued_at  # deferred


def test_the_same_task_id_is_one_task(connect: Any, alice: StaticCaller,
                                      api_settings: Settings) -> None:
    api = connect(alice)
    first = api.enqueue("engine.sleep", {"seconds": 0}, task_id="nightly-1", defer=3600)
    again = api.enqueue("engine.sleep", {"seconds": 0}, task_id="nightly-1", defer=3600)
    assert first["task_id"] == again["task_id"] == "nightly-1"
    assert len(stored_tasks(api_settings)) == 1


@pytest.mark.parametrize(("body", "message"), [
    ({"name": "engine.nosuch"}, "unknown job name 'engine.nosuch'"),
    ({"name": "engine.sleep", "args": [1]}, "args: must be a JSON object"),
    ({"name": "engine.sleep", "args": "x"}, "args: must be a JSON object"),
    ({"name": "engine.sleep", "args": {"seconds": "soon"}}, "'seconds' must be a number"),
    ({"name": "engine.sleep", "args": {"seconds": 0}, "task_id": "bad id!"},
     "invalid task id"),
    ({"name": "engine.sleep", "args": {"seconds": 0}, "defer": -1}, "--defer must be"),
    ({"args": {}}, "name: is required"),
    ({"name": "engine.fail", "task_id": "used-1"}, "task id used-1 is already used by another "
                                                    "job (engine.sleep)"),
])
def test_bad_input_is_400_naming_the_problem_and_writes_nothing(
    connect: Any, alice: StaticCaller, api_settings: Settings, body: dict[str, Any],
    message: str,
) -> None:
    api = connect(alice)
    api.enqueue("engine.sleep", {"seconds": 0}, task_id="used-1", defer=3600)
    refused = api.refused("POST", TASKS, body)
    assert refused.status_code == 400, refused.error_msg
    assert refused.error_code == "DEW.0400"
    assert message in refused.error_msg
    assert [t.task_id for t in stored_tasks(api_settings)] == ["used-1"]


def test_a_job_for_another_account_is_refused(connect: Any, alice: StaticCaller,
                                              api_settings: Settings) -> None:
    refused = connect(alice).refused("POST", TASKS, {"name": "engine.sleep",
                                                     "args": {"seconds": 0, "account": "other"}})
    assert (refused.status_code, refused.error_code) == (403, "DEW.0403")
    assert "caller's project (acme)" in refused.error_msg
    assert stored_tasks(api_settings) == []


# --- roles ----------------------------------------------------------------------------


def test_enqueuing_follows_the_roles(connect: Any, identities: StaticIdentities,
                                     api_settings: Settings) -> None:
    kms_admin = connect(identities.add(actions={"kms:*"}, project="acme", user="kadmin"))
    refused = kms_admin.refused("POST", TASKS, {"name": "kps.bind", "args": {}})
    assert (refused.status_code, refused.error_code) == (403, "DEW.0403")
    assert refused.error_msg == "user kadmin is not allowed to do kps:jobs:enqueue"
    refused = kms_admin.refused("POST", TASKS, {"name": "engine.sleep", "args": {"seconds": 0}})
    assert "engine:jobs:enqueue" in refused.error_msg
    assert "dew:tasks:list" in kms_admin.refused("GET", TASKS).error_msg
    assert stored_tasks(api_settings) == []

    reader = connect(identities.add(actions=CATALOG.roles["DEW TaskReadOnlyAccess"],
                                    project="acme", user="reader"))
    assert reader.tasks() == []
    assert "engine:jobs:enqueue" in reader.refused(
        "POST", TASKS, {"name": "engine.sleep", "args": {"seconds": 0}}).error_msg
    assert "dew:failures:delete" in reader.refused("DELETE", FAILURES).error_msg
    assert "dew:tasks:retry" in reader.refused("POST", f"{TASKS}/x/retry").error_msg


def test_the_job_list_names_the_action_of_each_job(connect: Any, alice: StaticCaller) -> None:
    status, body = connect(alice).call("GET", "/v1/{project_id}/dew/jobs")
    assert status == 200
    jobs = {j["name"]: j for j in body["jobs"]}
    assert jobs["engine.sleep"]["enqueue_action"] == "engine:jobs:enqueue"
    assert jobs["engine.sleep"]["allowed"] is True
    assert jobs["engine.echo"]["secret_fields"] == ["value"]
    assert jobs["retrytest.needs_file"]["description"].startswith("Return the text")


# --- listing and isolation -------------------------------------------------------------


def test_list_filters_and_pages(connect: Any, alice: StaticCaller) -> None:
    api = connect(alice)
    made = [api.enqueue("engine.sleep", {"seconds": i}, defer=3600)["task_id"]
            for i in range(5)]
    api.enqueue("engine.fail", {}, defer=3600)
    assert len(api.tasks()) == 6
    assert [t["task_id"] for t in api.tasks(name="engine.sleep")] == made[::-1]
    assert api.tasks(status="succeeded") == []
    _, page = api.call("GET", TASKS, query={"name": "engine.sleep", "limit": 2})
    assert [t["task_id"] for t in page["tasks"]] == made[:2:-1][:2]
    _, rest = api.call("GET", TASKS, query={"name": "engine.sleep", "limit": 10,
                                            "marker": page["next_marker"]})
    assert [t["task_id"] for t in rest["tasks"]] == made[2::-1]
    assert rest["next_marker"] is None
    first = api.tasks(name="engine.sleep")[-1]
    since = api.tasks(since=first["enqueued_at"], name="engine.sleep")
    assert len(since) == 5
    assert api.tasks(until=first["enqueued_at"]) == []
    assert "status: must be one of" in api.refused("GET", TASKS, query={"status": "x"}).error_msg
    assert "since: must be an ISO 8601" in api.refused(
        "GET", TASKS, query={"since": "yesterday"}).error_msg
    assert "limit: must be" in api.refused("GET", TASKS, query={"limit": 0}).error_msg


def test_another_project_sees_none_of_the_tasks_and_failures(
    connect: Any, alice: StaticCaller, bob: StaticCaller, api_settings: Settings,
    tmp_path: Path,
) -> None:
    worker = WorkerProcess(api_settings, tmp_path / "worker.out").start()
    try:
        api, other = connect(alice), connect(bob)
        task = api.enqueue("engine.fail", {"message": "nope"})
        api.wait(task["task_id"], "failed")
        _, listed = api.call("GET", FAILURES)
        [record] = listed["failures"]
        assert (record["task_id"], record["error"]) == (task["task_id"], "nope")
        _, shown = api.call("GET", f"{FAILURES}/{record['failure_id']}")
        assert shown == record

        assert other.tasks() == []
        assert other.call("GET", FAILURES)[1]["failures"] == []
        for path in (f"{TASKS}/{task['task_id']}", f"{FAILURES}/{record['failure_id']}"):
            refused = other.refused("GET", path)
            assert (refused.status_code, refused.error_code) == (404, "DEW.0404")
        assert other.refused("POST", f"{TASKS}/{task['task_id']}/retry").status_code == 404
        assert other.refused("DELETE", f"{FAILURES}/{record['failure_id']}").status_code == 404
        assert other.call("DELETE", FAILURES)[1] == {"deleted": 0}
        # A used task id is refused without telling whose it is.
        refused = other.refused("POST", TASKS, {"name": "engine.fail",
                                                "task_id": task["task_id"]})
        assert refused.status_code == 400
        assert refused.error_msg == f"task id {task['task_id']} is already used"
        # A marker of another project's listing is not a way in either.
        assert other.refused("GET", TASKS, query={"marker": task["task_id"]}).status_code == 400

        # The owner deletes its records: one, then all.
        second = api.enqueue("engine.fail", {"message": "again"})
        api.wait(second["task_id"], "failed")
        status, _ = api.call("DELETE", f"{FAILURES}/{record['failure_id']}")
        assert status == 204
        assert api.refused("GET", f"{FAILURES}/{record['failure_id']}").status_code == 404
        assert api.call("DELETE", FAILURES, query={"operation": "engine.fail"})[1] == {
            "deleted": 1}
        assert api.call("GET", FAILURES)[1]["failures"] == []
    finally:
        worker.stop()
