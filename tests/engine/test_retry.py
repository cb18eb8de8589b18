"""Retrying a failed task once its cause is fixed: over HTTPS (through the SDK's
signer), with ``dew tasks retry`` and ``dew failures retry``, and the store's
migration that gave tasks their project."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.api.testing import ApiServerThread, StaticCaller, StaticIdentities
from engine.client import Client
from engine.errors import Conflict
from engine.redaction import REDACTED
from engine.settings import Settings
from engine.sqlite_store import MIGRATIONS, SqliteTaskStore
from engine.store import open_store
from tests.engine.test_api_engine import (
    FAILURES,
    OPERATOR,
    SERVICES,
    TASKS,
    Api,
    api_settings,  # noqa: F401 - fixtures
    sdk_home,  # noqa: F401
)
from tests.helpers import WorkerProcess, run_dew

JOB = "retrytest.needs_file"


@pytest.fixture
def worker(api_settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:  # noqa: F811
    proc = WorkerProcess(api_settings, tmp_path / "worker.out").start()
    yield proc
    proc.stop()


@pytest.fixture
def identities() -> StaticIdentities:
    return StaticIdentities()


@pytest.fixture
def apis(api_settings: Settings, identities: StaticIdentities,  # noqa: F811
         ) -> Iterator[dict[str, Api]]:
    callers: dict[str, StaticCaller] = {
        "alice": identities.add(actions=OPERATOR, project="acme", user="alice"),
        "bob": identities.add(actions=OPERATOR, project="other", user="bob"),
        "sleeper": identities.add(actions={"dew:*", "engine:jobs:enqueue"}, project="acme",
                                  user="sleeper"),
    }
    with ApiServerThread(api_settings, identities=identities) as server:
        made = {name: Api(server, caller) for name, caller in callers.items()}
        yield made
        for api in made.values():
            api.close()


def test_a_failed_task_is_retried_once_its_cause_is_fixed(
    apis: dict[str, Api], worker: WorkerProcess, tmp_path: Path,
) -> None:
    alice = apis["alice"]
    needed = tmp_path / "needed.txt"
    task = alice.enqueue(JOB, {"path": str(needed)})
    failed = alice.wait(task["task_id"], "failed")
    assert failed["error"]["code"] == "missing_file"
    [record] = alice.call("GET", FAILURES)[1]["failures"]
    assert record["retried_at"] is None

    needed.write_text("here now")
    status, retry = alice.call("POST", f"{TASKS}/{task['task_id']}/retry")
    assert status == 202
    assert alice.client.last.headers["X-Dew-Task-Id"] == retry["task_id"]
    assert retry["retry_of"] == task["task_id"] and retry["task_id"] != task["task_id"]
    assert (retry["name"], retry["args"], retry["project"]) == (JOB, task["args"], "acme")
    done = alice.wait(retry["task_id"], "succeeded")
    assert done["result"] == "here now"

    _, record = alice.call("GET", f"{FAILURES}/{record['failure_id']}")
    assert record["retry_task_id"] == retry["task_id"]
    assert record["retried_by"].startswith("api:alice@acme ak=")
    assert datetime.fromisoformat(record["retried_at"]) <= datetime.now(UTC)
    # The failed task stays as it was (its record is the history).
    assert alice.wait(task["task_id"], "failed")["retry_of"] is None

    again = alice.refused("POST", f"{TASKS}/{task['task_id']}/retry")
    assert (again.status_code, again.error_code) == (409, "DEW.0409")
    assert again.error_msg == f"task {task['task_id']} was already retried as task " \
                              f"{retry['task_id']}"
    # Another project cannot retry it, nor learn that it exists.
    assert apis["bob"].refused("POST", f"{TASKS}/{task['task_id']}/retry").status_code == 404


def test_retrying_a_task_that_did_not_fail_is_refused(
    apis: dict[str, Api], worker: WorkerProcess,
) -> None:
    alice = apis["alice"]
    queued = alice.enqueue("engine.sleep", {"seconds": 0}, defer=3600)
    refused = alice.refused("POST", f"{TASKS}/{queued['task_id']}/retry")
    assert (refused.status_code, refused.error_code) == (409, "DEW.0409")
    assert refused.error_msg == (f"task {queued['task_id']} is queued, not failed: only a "
                                 "failed task (or one that reported failed targets) can be retried "
                                 "(it has not ended yet)")
    done = alice.enqueue("engine.sleep", {"seconds": 0})
    alice.wait(done["task_id"], "succeeded")
    refused = alice.refused("POST", f"{TASKS}/{done['task_id']}/retry")
    assert refused.error_msg == (f"task {done['task_id']} is succeeded, not failed: only a "
                                 "failed task (or one that reported failed targets) can be retried")
    assert alice.refused("POST", f"{TASKS}/nosuch/retry").status_code == 404


def test_retry_through_a_failure_record_needs_the_jobs_role(
    apis: dict[str, Api], worker: WorkerProcess, tmp_path: Path,
) -> None:
    alice, sleeper = apis["alice"], apis["sleeper"]
    needed = tmp_path / "later.txt"
    task = alice.enqueue(JOB, {"path": str(needed)})
    alice.wait(task["task_id"], "failed")
    [record] = alice.call("GET", FAILURES, query={"task_id": task["task_id"]})[1]["failures"]
    # Same project, may retry tasks, but not enqueue retrytest.* jobs.
    refused = sleeper.refused("POST", f"{FAILURES}/{record['failure_id']}/retry")
    assert refused.status_code == 403
    assert refused.error_msg == "user sleeper is not allowed to do retrytest:jobs:enqueue"
    needed.write_text("ok")
    status, retry = alice.call("POST", f"{FAILURES}/{record['failure_id']}/retry")
    assert status == 202 and retry["retry_of"] == task["task_id"]
    alice.wait(retry["task_id"], "succeeded")


def test_the_cli_retry_verbs(api_settings: Settings, worker: WorkerProcess,  # noqa: F811
                             tmp_path: Path) -> None:
    fixed = [tmp_path / f"f{i}.txt" for i in range(3)]

    async def enqueue() -> list[str]:
        async with await Client.open(api_settings) as client:
            ids = [(await client.enqueue(JOB, {"path": str(p)}, project="acme")).task_id
                   for p in fixed]
            ids.append((await client.enqueue("engine.fail", {"message": "x"})).task_id)
            for task_id in ids:
                await client.wait(task_id, timeout=30)
            return ids

    one, two, three, other = asyncio.run(enqueue())
    for path in fixed:
        path.write_text("fixed")

    # A task of project acme is not found in another project.
    out = run_dew(api_settings, "tasks", "retry", one, "--project", "other")
    assert out.returncode == 2 and f"no task with id '{one}'" in out.stderr
    out = run_dew(api_settings, "tasks", "retry", one, "--json")
    assert out.returncode == 0, out.stderr
    retried = json.loads(out.stdout)
    assert retried["retry_of"] == one and retried["project"] == "acme"
    out = run_dew(api_settings, "tasks", "retry", one)
    assert out.returncode == 1 and "already retried" in out.stderr

    records = json.loads(run_dew(api_settings, "failures", "list", "--task-id", two,
                                 "--json").stdout)
    out = run_dew(api_settings, "failures", "retry", records[0]["failure_id"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"task {two} retried as task ")

    out = run_dew(api_settings, "failures", "retry", "--all", "--operation", JOB, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [r["task_id"] for r in result["retried"]] == [three]
    assert result["skipped"] == []
    shown = json.loads(run_dew(api_settings, "failures", "list", "--task-id", three,
                               "--json").stdout)
    assert shown[0]["retried_by"].startswith("cli:")
    assert run_dew(api_settings, "failures", "show", shown[0]["failure_id"]).stdout.count(
        "retried") == 1

    async def outcome() -> list[str]:
        async with await Client.open(api_settings) as client:
            retries = await client.store.list_tasks(name=JOB, limit=100)
            return [(await client.wait(t.task_id, timeout=30)).status
                    for t in retries if t.retry_of]

    assert asyncio.run(outcome()) == ["succeeded"] * 3
    # engine.fail has not been retried: the task store says which project it is in.
    out = run_dew(api_settings, "failures", "list", "--project", "acme", "--json")
    assert other not in out.stdout
    out = run_dew(api_settings, "failures", "list", "--project", "default", "--json")
    assert other in out.stdout
    assert run_dew(api_settings, "failures", "retry").returncode == 2
    assert run_dew(api_settings, "failures", "retry", "x", "--operation", JOB).returncode == 2


def test_the_client_refuses_to_retry_a_task_whose_secrets_are_gone(
    api_settings: Settings,  # noqa: F811
) -> None:
    async def scenario() -> None:
        store = await open_store(api_settings)
        now = datetime.now(UTC)
        await store.create_task("s1", "engine.echo", {"value": {"$sealed": "x"}}, now, now)
        await store.mark_failed("s1", {"code": "x"}, None, now, {"value": "***redacted***"})
        await store.close()
        async with await Client.open(api_settings) as client:
            with pytest.raises(Conflict, match="secret arguments are gone"):
                await client.retry("s1", "test")

    asyncio.run(scenario())


def test_migration_3_gives_existing_tasks_their_project(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # a task store of version 2
        for script in MIGRATIONS[:2]:
            old.executescript(script)
        old.execute("CREATE TABLE schema_migrations (component TEXT PRIMARY KEY, "
                    "version INTEGER NOT NULL)")
        old.execute("INSERT INTO schema_migrations VALUES ('engine', 2)")
        now = datetime.now(UTC).isoformat()
        for task_id, args in (("a", {"account": "shop"}), ("b", {}), ("c", {"account": 7})):
            old.execute("INSERT INTO tasks (task_id, name, args, status, enqueued_at, due_at) "
                        "VALUES (?, 'engine.sleep', ?, 'queued', ?, ?)",
                        (task_id, json.dumps(args), now, now))
    old.close()

    async def scenario() -> dict[str, Any]:
        store = await SqliteTaskStore.open(path)
        try:
            got: dict[str, Any] = {t.task_id: t.project for t in await store.list_tasks()}
            got["shop-only"] = [t.task_id for t in await store.list_tasks(project="shop")]
            return got
        finally:
            await store.close()

    assert asyncio.run(scenario()) == {"a": "shop", "b": "default", "c": "default",
                                       "shop-only": ["a"]}


def test_a_failed_task_keeps_its_sealed_secret_for_one_retry(
    api_settings: Settings, tmp_path: Path,  # noqa: F811
) -> None:
    """A failed task keeps its secret argument, sealed for it alone; the retry opens it
    and seals it again for the new task. Afterwards, or once its failure records are
    deleted, the failed task keeps no sealed value."""
    needed = tmp_path / "needed.txt"

    async def failed(client: Client) -> str:
        task = await client.enqueue("retrytest.needs_file",
                                    {"path": str(needed), "token": "s3cret-token"})
        assert (await client.wait(task.task_id, timeout=30)).status == "failed"
        return task.task_id

    # The KMS seals job secrets (resource "sealer").
    settings = api_settings.replace(engine={"services": [*SERVICES, "handlers.kms"]})

    async def scenario() -> None:
        async with await Client.open(settings) as client:
            first = await failed(client)
            kept = (await client.get(first)).args["token"]
            assert isinstance(kept, dict) and "$sealed" in kept
            needed.write_text("fixed")
            retry = await client.retry(first, "test")
            done = await client.wait(retry.task_id, timeout=30)
            assert done.status == "succeeded", done.error
            assert done.result == {"text": "fixed", "opened_bytes": len("s3cret-token")}
            assert (await client.get(first)).args["token"] == REDACTED

            needed.unlink()
            second = await failed(client)
            assert await client.store.delete_all_failures() >= 1
            assert (await client.get(second)).args["token"] == REDACTED
            with pytest.raises(Conflict, match="secret arguments are gone"):
                await client.retry(second, "test")
        raw = settings.db_path.read_bytes()
        assert b"s3cret-token" not in raw

    worker = WorkerProcess(settings, tmp_path / "worker.out").start()
    try:
        asyncio.run(scenario())
    finally:
        worker.stop()
