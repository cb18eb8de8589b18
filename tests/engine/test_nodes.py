"""Two nodes form one service (issue 14, "Two nodes").

Node A and node B are two state directories (``DEW_STATE_DIR``), each with its own
``dew worker`` subprocess and log, sharing one Redis (same URL and queue), one
PostgreSQL database (``[store] url``) and one HSM: an HSM node's SoftHSM token
exported by ``dew hsm serve`` (p11-kit server) on a unix socket, reached by both
nodes through p11-kit's client module (tests/nodes.py). Everything is real: the
CLI, the workers, PostgreSQL, Redis, p11-kit, SoftHSM.

The nodes are set up once for the module (a PostgreSQL database, the export and two
workers take ~10 s); a test that kills a worker gets it restarted for the next
one. The Redis is the module's own: arq's cron job ids are global to a Redis, so a
worker another test left behind on the session Redis could take the cron firings
the cron test waits for.

The KMS cron entries fire at seconds 30 and 50 of each minute and CSMS's deletion at
second 40, so the cron test waits for up to a minute: its due work is made when the
module starts (``due_work``) and checked last, so that minute passes while the other
tests run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.client import Client
from engine.crypto import _pkcs11
from engine.hsm import connect_crypto
from engine.models import FINAL_STATUSES, TaskRecord
from engine.redis_server import RedisServer, free_port
from engine.token_keys import declared
from handlers.csms.service import ROTATE_JOB, SecretNotFound, open_secrets
from handlers.kms.wiring import open_kms
from tests.api_process import ApiProcess, make_identities
from tests.conftest import TEST_SETTINGS
from tests.helpers import FakeClock, wait_for
from tests.nodes import (
    Cluster,
    Node,
    base_settings,
    enqueuer_result,
    release,
    start_enqueuer,
    start_workers,
    started_task_ids,
    wait_ready,
)
from tests.pg_store import StoreCluster, store_rows

pytestmark = pytest.mark.slow

# The cron entries these tests wait for: KMS deletions at second 30, CSMS deletions at
# 40, KMS rotations at 50 (each every minute), CSMS rotations queued every 10 s.
CRON_WAIT = 100.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory,
            store_cluster: StoreCluster) -> Iterator[Cluster]:
    """The HSM export and nodes ``a`` and ``b`` with their workers running."""
    root = tmp_path_factory.mktemp("nodes")
    redis = RedisServer(root / "redis", port=free_port())
    redis.start()
    try:
        shared = base_settings(redis.url, f"arq:queue:{uuid.uuid4().hex[:12]}",
                               **TEST_SETTINGS)
        cluster = Cluster.start(shared, root, store_cluster.new_database())
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        redis.stop()


@pytest.fixture
def nodes(cluster: Cluster) -> tuple[Node, Node]:
    """Nodes A and B, both workers running (one a test killed is started again)."""
    start_workers(cluster.nodes)
    return cluster.node("a"), cluster.node("b")


@pytest.fixture
async def client_a(nodes: tuple[Node, Node]) -> AsyncIterator[Client]:
    """A ``Client`` of node A in this process (it signs jobs through the served token)."""
    async with await Client.open(nodes[0].settings) as client:
        yield client


@dataclass
class DueWork:
    """What the cron entries must each do once: KMS keys to rotate and to delete, CSMS
    secrets to rotate and to delete, all due when the module starts."""

    rotate_keys: list[str]
    delete_keys: list[str]
    rotate_secrets: list[str]
    delete_secrets: list[str]


async def _make_due_work(a: Node, b: Node) -> DueWork:
    clock = FakeClock()
    now = clock.now
    work = DueWork([], [], [], [])
    # Through node A: keys whose rotation (every 30 days, turned on 31 days ago) and
    # deletion (7 days' notice, 8 days ago) are due by the workers' real clock.
    async with open_kms(a.settings, actor="test:due-work", clock=clock, cache_ttl=0,
                        audit_flush_interval=0) as kms:
        for i in range(2):
            clock.now = now - timedelta(days=31)
            key = await kms.create_key(f"cron/rotate-{i}")
            await kms.enable_key_rotation(key.key_id, 30)
            work.rotate_keys.append(key.key_id)
            clock.now = now - timedelta(days=8)
            key = await kms.create_key(f"cron/delete-{i}")
            await kms.schedule_key_deletion(key.key_id, 7)
            work.delete_keys.append(key.key_id)
    # Through node B: secrets rotated every 6 h from 7 h ago, and deleted with 7 days'
    # notice 8 days ago.
    async with open_secrets(b.settings, actor="test:due-work", clock=clock) as csms:
        for i in range(2):
            clock.now = now - timedelta(hours=7)
            name = f"cron-rotate-{i}"
            await csms.create(name, f"value-{i}".encode())
            await csms.set_rotation(name, 6 * 3600)
            work.rotate_secrets.append(name)
            clock.now = now - timedelta(days=8)
            name = f"cron-delete-{i}"
            await csms.create(name, f"doomed-{i}".encode())
            await csms.schedule_deletion(name, 7)
            work.delete_secrets.append(name)
    return work


@pytest.fixture(scope="module", autouse=True)
def due_work(cluster: Cluster) -> DueWork:
    """Due rotations and deletions, made when the module starts (see the module doc)."""
    return asyncio.run(_make_due_work(cluster.node("a"), cluster.node("b")))


def _task_rows(node: Node, task_ids: set[str]) -> dict[str, tuple[Any, ...]]:
    """task id -> (status, attempts, worker_id) of those tasks, read from the store."""
    rows = store_rows(node.settings.store_target,
                      "SELECT task_id, status, attempts, worker_id FROM tasks")
    return {str(r[0]): r[1:] for r in rows if str(r[0]) in task_ids}


async def test_the_serving_node_made_every_service_key_once(cluster: Cluster) -> None:
    """``dew hsm serve`` made the engine's and the services' own keys (job signing,
    sealed access keys, KMS audit seals...) before any node connected, so nodes that
    start together never make them: each label is in the served token once."""
    a = cluster.node("a")
    labels = [key.label for key in declared(a.settings)]
    assert {"engine:job-signing", "engine:iam-secret-keys", "kms:audit-hmac"} <= set(labels)
    core = await connect_crypto(a.settings)
    try:
        counts = await core._require().run(lambda w: {
            label: len(_pkcs11.objects_with_label(w.session, label)) for label in labels})
    finally:
        await core.close()
    assert counts == dict.fromkeys(labels, 1)


def test_key_made_on_a_encrypts_on_a_and_decrypts_on_b(nodes: tuple[Node, Node]) -> None:
    """A key created through node A lives in the served token and the shared
    registry: A encrypts with it, B decrypts the ciphertext to the same plaintext,
    the shared audit (read on either node) shows the creation and both uses, and
    each node's ``dew audit verify`` finds the chain intact (with its own anchor)."""
    a, b = nodes
    key = a.dew_json("kms", "create-key", "--alias", "nodes/shared")
    plaintext = "one truth for every node"
    sealed = a.dew_json("kms", "encrypt-data", "nodes/shared", "--plain-text-file", "-",
                        input=plaintext)
    opened = b.dew_json("kms", "decrypt-data", "--cipher-text", sealed["cipher_text"])
    assert opened["key_id"] == sealed["key_id"] == key["key_id"]
    assert base64.b64decode(opened["plain_text_base64"]).decode() == plaintext

    for node in (a, b):
        entries = node.dew_json("audit", "list", "--key", key["key_id"])
        assert [(e["operation"], e["outcome"]) for e in entries] == [
            ("create_key", "success"), ("encrypt_data", "success"),
            ("decrypt_data", "success")], entries
        verdict = node.dew_json("audit", "verify")
        assert verdict["intact"] is True, (node.name, verdict)


async def test_job_running_on_a_killed_with_sigkill_finishes_on_b(
    nodes: tuple[Node, Node], client_a: Client,
) -> None:
    """A job enqueued through node A and running in A's worker when A is killed with
    SIGKILL is taken over by B once A's heartbeat stops: it ends succeeded, run by
    B's worker, on its second attempt, with no failure record."""
    a, b = nodes

    async def running(task_id: str) -> TaskRecord | None:
        task = await client_a.get(task_id)
        return task if task.status == "running" else None

    # Both workers poll the queue: enqueue until one of these jobs runs on A.
    on_a = None
    for _ in range(20):
        task = await client_a.enqueue("engine.sleep", {"seconds": 4})
        started = await wait_for(lambda t=task.task_id: running(t), timeout=20, interval=0.05)
        if a.owns(started.worker_id):
            on_a = started
            break
    assert on_a is not None, "no job of 20 ran on node A"
    assert on_a.attempts == 1

    a.worker.kill()
    done = await client_a.wait(on_a.task_id, timeout=45)
    assert done.status == "succeeded", done.error
    assert b.owns(done.worker_id), (done.worker_id, b.worker.pid)
    assert done.attempts == 2
    assert await client_a.store.list_failures(task_id=on_a.task_id) == []


async def test_200_jobs_enqueued_on_both_nodes_at_once_run_once_each(
    nodes: tuple[Node, Node],
) -> None:
    """100 jobs enqueued through node A's Client and 100 through B's, by two processes
    at the same time, with both workers running: every task ends succeeded on its
    first attempt, and the two workers' logs show each task started exactly once."""
    a, b = nodes
    procs = [start_enqueuer(node.env(), 100, concurrency=20) for node in (a, b)]
    for proc in procs:
        wait_ready(proc)
    release(procs)
    results = [enqueuer_result(proc) for proc in procs]
    task_ids = {t for r in results for t in r["task_ids"]}
    assert len(task_ids) == 200
    # The two enqueuers ran at the same time.
    assert max(r["started"] for r in results) < min(r["finished"] for r in results), results

    async def finished() -> dict[str, tuple[Any, ...]] | None:
        rows = _task_rows(a, task_ids)
        done = all(row[0] in FINAL_STATUSES for row in rows.values())
        return rows if len(rows) == 200 and done else None

    rows = await wait_for(finished, timeout=60, interval=0.5)
    assert all(row[0] == "succeeded" and row[1] == 1 for row in rows.values()), \
        Counter((row[0], row[1]) for row in rows.values())
    by_node = Counter(n.name for row in rows.values() for n in (a, b) if n.owns(row[2]))
    assert sum(by_node.values()) == 200, by_node

    starts = Counter(t for t in started_task_ids((a, b)) if t in task_ids)
    assert set(starts) == task_ids
    assert all(count == 1 for count in starts.values()), \
        {t: c for t, c in starts.items() if c != 1}


def test_an_access_key_made_on_a_is_served_by_the_api_of_b(
    nodes: tuple[Node, Node], tmp_path: Path,
) -> None:
    """Identities live in the shared database and access keys are sealed in the
    shared token: a user and access key made through node A sign requests that node
    B's ``dew api`` serves (A's CLI routed to B's API with ``[cli] api_url``), and the
    shared audit names that user as the caller."""
    a, b = nodes
    ident = asyncio.run(make_identities(
        a.settings, {"nodes-user": ("default", ["KMS CMKFullAccess"], ())}))["nodes-user"]
    a.dew_json("kms", "create-key", "--alias", "nodes/api")
    api = ApiProcess(b.settings, tmp_path / "api-b.out").start()
    try:
        creds = tmp_path / "cli-credentials"
        creds.write_text(json.dumps({"access_key": ident.ak, "secret_key": ident.sk,
                                     "project_id": ident.project_id,
                                     "project": ident.project}))
        creds.chmod(0o600)
        routed = Node(a.name, a.settings.replace(cli={
            "api_url": api.url, "credentials_file": str(creds), "ca_file": str(api.ca)}),
            a.worker)
        made = routed.dew_json("kms", "create-datakey", "nodes/api")
        opened = b.dew_json("kms", "decrypt-datakey", "nodes/api", "--cipher-text",
                            made["cipher_text"])
        assert opened["plain_text"] == made["plain_text"]
    finally:
        api.stop()
    entries = a.dew_json("audit", "list", "--key", made["key_id"],
                         "--operation", "create_datakey")
    assert [e["actor"].split()[0] for e in entries] == ["api:nodes-user@default"], entries


async def _cron_state(a: Node, b: Node, work: DueWork) -> dict[str, Any]:
    """What the cron entries have done so far, per item, read on node B."""
    state: dict[str, Any] = {}
    async with open_kms(b.settings, actor="test:check") as kms:
        for key_id in work.rotate_keys + work.delete_keys:
            record = await kms.core.store.get_key(key_id)
            assert record is not None
            entries = await kms.audit_list(key_id)
            state[key_id] = {
                "state": record.state, "version": record.current_version,
                "rotations": [e.actor for e in entries if e.operation == "rotate_key"],
                "deletions": [e.actor for e in entries if e.operation == "delete_key"]}
    deleted_logs = Counter(
        str(r.get("name")) for n in (a, b) for r in n.log_records()
        if r.get("event") == "secret deleted")
    async with await Client.open(b.settings) as client:
        tasks = await client.list_tasks(name=ROTATE_JOB, limit=1000)
    async with open_secrets(b.settings, actor="test:check") as csms:
        for name in work.rotate_secrets:
            versions = [v.version_id for v in await csms.list_versions(name)]
            runs = [(t.status, t.attempts) for t in tasks if t.args.get("name") == name]
            state[name] = {"versions": versions, "tasks": runs}
        for name in work.delete_secrets:
            try:
                await csms.describe(name)
                gone = False
            except SecretNotFound:
                gone = True
            state[name] = {"gone": gone, "logged": deleted_logs[name]}
    return state


def _all_done(state: dict[str, Any], work: DueWork) -> bool:
    return (all(state[k]["version"] >= 2 for k in work.rotate_keys)
            and all(state[k]["state"] == "deleted" for k in work.delete_keys)
            and all(len(state[s]["versions"]) >= 2
                    and all(t[0] == "succeeded" for t in state[s]["tasks"])
                    for s in work.rotate_secrets)
            and all(state[s]["gone"] for s in work.delete_secrets))


async def test_cron_of_two_nodes_fires_each_due_rotation_and_deletion_once(
    nodes: tuple[Node, Node], due_work: DueWork,
) -> None:
    """Both nodes' workers run the whole cron table on one Redis and one database.
    Each due KMS key rotation happened once (version 2, one rotate_key audit entry,
    by the cron entry), each due KMS key deletion once (one delete_key audit entry),
    each due CSMS rotation once (one task, though both nodes queue due rotations
    every 10 s; one new version), and each due CSMS deletion once (one
    'secret deleted' record in the two nodes' logs)."""
    a, b = nodes
    state: dict[str, Any] = {}

    async def done() -> bool:
        state.update(await _cron_state(a, b, due_work))
        return _all_done(state, due_work)

    try:
        await wait_for(done, timeout=CRON_WAIT, interval=1.0)
    except AssertionError as exc:
        raise AssertionError(f"cron work not done: {state}") from exc
    # A firing in progress when the last item was seen finishes its writes.
    await asyncio.sleep(1.0)
    state = await _cron_state(a, b, due_work)
    for key_id in due_work.rotate_keys:
        assert state[key_id]["state"] == "enabled" and state[key_id]["version"] == 2, state
        assert state[key_id]["rotations"] == ["cron:kms.rotate_due_keys"], state[key_id]
    for key_id in due_work.delete_keys:
        assert state[key_id]["deletions"] == ["cron:kms.delete_due_keys"], state[key_id]
    for name in due_work.rotate_secrets:
        assert len(state[name]["versions"]) == 2, state[name]
        assert [status for status, _ in state[name]["tasks"]] == ["succeeded"], state[name]
    for name in due_work.delete_secrets:
        assert state[name] == {"gone": True, "logged": 1}, state[name]


async def test_the_hsm_export_going_away_is_retried_and_heals(
    cluster: Cluster, nodes: tuple[Node, Node], client_a: Client,
) -> None:
    """Jobs that reach the workers while the HSM export is down (each job's signature
    is checked in the token, a sealed argument opened there) fail transiently: none is
    refused as forged, none fails for good, none gives a wrong result. When the export
    is back, the same workers (no restart) run them to success."""
    tasks = [await client_a.enqueue("engine.echo", {"value": f"sealed {n}"}, defer=1.0)
             for n in range(4)]
    cluster.export.stop()
    try:
        await asyncio.sleep(4.0)  # the jobs came due and met the missing HSM
        during = {t.task_id: await client_a.get(t.task_id) for t in tasks}
        assert all(t.status in ("queued", "running") for t in during.values()), during
        assert await client_a.store.list_failures(limit=1000) == []
    finally:
        cluster.export.start()
    pids = [node.worker.pid for node in nodes]
    for task in tasks:
        done = await client_a.wait(task.task_id, timeout=90)
        assert done.status == "succeeded", done.error
    assert [node.worker.pid for node in nodes] == pids
    assert await client_a.store.list_failures(limit=1000) == []
    records = [r for node in nodes for r in node.log_records()]
    # Met, and said in one line each: no traceback, no job refused as unsigned.
    assert any(r.get("code") == "hsm_unreachable" for r in records)
    assert not [r for r in records if "exception" in r and "HSM" in str(r.get("event"))]
    assert not [r for r in records if "not signed" in str(r.get("event"))
                or "signature does not match" in str(r)]
