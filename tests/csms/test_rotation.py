"""Rotation through real workers on real databases: a private PostgreSQL cluster
(scram-sha-256, verified TLS) and the machine's MariaDB (no TLS: explicit
opt-out). Proves the new password logs in and the old one does not, failures
leave SYSCURRENT working and are recorded, a worker killed between steps 2 and
4 is finished by the next one, scheduled rotations start on time with a
concurrency bound, and no value is in clear in Redis, the stores or the
logs."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import aiomysql
import pymysql.err
import pytest
import redis

from engine.client import Client
from engine.models import parse_iso
from engine.redis_server import RedisServer, free_port
from engine.settings import Settings
from handlers.csms import model as m
from handlers.csms.service import PAUSE_AFTER_SET_ENV, ROTATE_JOB, SecretsService
from tests.csms.conftest import EnvWorker, PgCluster, pg_login
from tests.csms.store_helpers import stored_bytes
from tests.helpers import run_dew, wait_for

pytestmark = pytest.mark.slow


async def _doc(csms: SecretsService, name: str, stage: str = m.CURRENT) -> dict[str, object]:
    value = await csms.get_value(name, stage=stage)
    doc: dict[str, object] = json.loads(value.value)
    return doc


def _scan_for(values: list[str], settings: Settings, redis_server: RedisServer,
              logs: list[Path]) -> list[str]:
    """Where any of ``values`` appears in clear: Redis keys and values, the stores
    (SQLite files, or PostgreSQL rows), the log files."""
    found = []
    r = redis.Redis.from_url(redis_server.url)
    blobs: list[tuple[str, bytes]] = []
    for key in r.scan_iter("*"):
        kind = r.type(key)
        if kind == b"string":
            blobs.append((f"redis {key!r}", key + (r.get(key) or b"")))
        elif kind == b"zset":
            blobs.append((f"redis {key!r}", b" ".join(v for v, _ in r.zrange(key, 0, -1,
                                                                             withscores=True))))
        elif kind == b"hash":
            blobs.append((f"redis {key!r}", b" ".join(k + v for k, v in r.hgetall(key).items())))
        elif kind == b"list":
            blobs.append((f"redis {key!r}", b" ".join(r.lrange(key, 0, -1))))
        elif kind == b"set":
            blobs.append((f"redis {key!r}", b" ".join(r.smembers(key))))
    blobs.append(("the stores", stored_bytes(settings.store_target)))
    for path in [*settings.state_dir.rglob("dew.sqlite3*"), *logs,
                 *settings.log_file.parent.glob("*")]:
        if path.is_file():
            blobs.append((str(path), path.read_bytes()))
    for value in values:
        for where, blob in blobs:
            if value.encode() in blob:
                found.append(f"{value[:3]}... in {where}")
    return found


async def test_postgres_rotation_changes_the_password(
    csms: SecretsService, settings: Settings, pg_cluster: PgCluster, redis_server: RedisServer,
    env_worker: Callable[..., EnvWorker], tmp_path: Path,
) -> None:
    # Over verified TLS (the default), as a user pg_hba lets in over TLS only.
    await pg_cluster.create_tls_only_user("rot_ok", "initial-pw-Q7x")
    original = pg_cluster.tls_document("rot_ok", "initial-pw-Q7x")
    await csms.create("pg-ok", json.dumps(original).encode(), secret_type="RDS_POSTGRESQL")
    worker = env_worker()

    done = run_dew(settings, "secrets", "rotate", "pg-ok", "--json", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == ["create", "set", "test", "finish"]

    current = await _doc(csms, "pg-ok")
    assert current["password"] != original["password"]
    assert await pg_login(current) is True
    assert await pg_login(original) is False  # the old password no longer works
    assert await _doc(csms, "pg-ok", m.PREVIOUS) == original
    worker.stop()
    leaks = _scan_for([str(original["password"]), str(current["password"])], settings,
                      redis_server, [worker.log_path])
    assert leaks == []


async def test_failed_rotation_keeps_current_and_is_recorded(
    csms: SecretsService, client: Client, pg_cluster: PgCluster,
    env_worker: Callable[..., EnvWorker],
) -> None:
    await pg_cluster.create_user("rot_down", "down-pw-1")
    doc = pg_cluster.document("rot_down", "down-pw-1")
    await csms.create("pg-down", json.dumps(doc).encode(), secret_type="RDS_POSTGRESQL")
    wrong = pg_cluster.document("rot_down", "down-pw-1", port=free_port())
    await csms.create("pg-wrong-port", json.dumps(wrong).encode(), secret_type="RDS_POSTGRESQL")
    env_worker()

    pg_cluster.stop()
    try:
        tasks = [await client.enqueue(ROTATE_JOB, {"name": n}) for n in ("pg-down",
                                                                          "pg-wrong-port")]
        finished = [await client.wait(t.task_id, timeout=60) for t in tasks]
    finally:
        pg_cluster.start()
    for task in finished:
        assert task.status == "failed"
        assert task.attempts == 3  # transient: retried with backoff, then recorded
        [record] = await client.store.list_failures(task_id=task.task_id)
        assert record.code == "db_unreachable" and record.category == "database"
        assert "the target cannot be reached, check host and port" in record.error
        assert record.cause and record.fix and record.target in ("default/pg-down",
                                                                 "default/pg-wrong-port")
    info = (await csms.describe("pg-down")).to_json()
    assert info["failed_rotations"] == 1
    assert info["last_failure"]["code"] == "db_unreachable"
    assert info["last_failure"]["step"] == "set"
    assert info["stages"][m.CURRENT] == "v1"
    assert await pg_login(await _doc(csms, "pg-down")) is True  # still the working one
    shown = (await csms.describe("pg-wrong-port")).to_json()
    assert shown["failed_rotations"] == 1

    # The next rotation resumes with the same pending version and succeeds.
    task = await client.enqueue(ROTATE_JOB, {"name": "pg-down"})
    assert (await client.wait(task.task_id, timeout=60)).status == "succeeded"
    assert (await csms.get_value("pg-down")).version_id == "v2"
    assert await pg_login(await _doc(csms, "pg-down")) is True


async def test_worker_killed_between_set_and_finish(
    csms: SecretsService, client: Client, pg_cluster: PgCluster,
    env_worker: Callable[..., EnvWorker],
) -> None:
    await pg_cluster.create_user("rot_kill", "kill-pw-1")
    original = pg_cluster.document("rot_kill", "kill-pw-1")
    await csms.create("pg-kill", json.dumps(original).encode(), secret_type="RDS_POSTGRESQL")
    first = env_worker(**{PAUSE_AFTER_SET_ENV: "60"})
    task = await client.enqueue(ROTATE_JOB, {"name": "pg-kill"})

    async def after_set() -> bool:
        secret = await csms.store.get_secret("default", "pg-kill")
        return secret is not None and secret.rotation_step == "set"

    await wait_for(after_set, timeout=30, interval=0.05)
    first.kill()  # SIGKILL after step 2: the database has the pending password
    assert await pg_login(original) is False
    assert await pg_login(await _doc(csms, "pg-kill", m.PENDING)) is True

    env_worker()
    done = await client.wait(task.task_id, timeout=60)
    assert done.status == "succeeded", done.error
    assert done.result is not None and done.result["resumed_after"] == "set"
    assert done.result["steps"] == ["test", "finish"]
    assert await pg_login(await _doc(csms, "pg-kill")) is True
    assert await _doc(csms, "pg-kill", m.PREVIOUS) == original
    assert len(await csms.list_versions("pg-kill")) == 2  # the pending version was reused


async def _mysql_login(doc: dict[str, object]) -> bool:
    try:
        conn = await aiomysql.connect(host=str(doc["host"]), port=int(str(doc["port"])),
                                      user=str(doc["username"]), password=str(doc["password"]))
    except pymysql.err.OperationalError as exc:
        if exc.args[0] == 1045:
            return False
        raise
    conn.close()
    return True


async def test_mariadb_rotation_and_wrong_credentials(
    csms: SecretsService, client: Client, mariadb_user: tuple[str, str],
    env_worker: Callable[..., EnvWorker],
) -> None:
    user, password = mariadb_user
    # The machine's MariaDB has no TLS: these secrets opt out explicitly (without
    # it the rotation is refused, see test_tls.py).
    original = {"engine": "mariadb", "host": "127.0.0.1", "port": 3306, "username": user,
                "password": password, "dbname": "", "tls": "disable"}
    await csms.create("maria", json.dumps(original).encode(), secret_type="RDS_MYSQL")
    await csms.create("maria-bad", json.dumps({**original, "password": "wrong-one"}).encode(),
                      secret_type="RDS_MYSQL")
    env_worker()
    ok = await client.enqueue(ROTATE_JOB, {"name": "maria"})
    bad = await client.enqueue(ROTATE_JOB, {"name": "maria-bad"})
    assert (await client.wait(ok.task_id, timeout=60)).status == "succeeded"
    current = await _doc(csms, "maria")
    assert await _mysql_login(current) is True
    assert await _mysql_login(original) is False
    assert await _doc(csms, "maria", m.PREVIOUS) == original

    failed = await client.wait(bad.task_id, timeout=60)
    assert (failed.status, failed.attempts) == ("failed", 1)  # permanent: not retried
    [record] = await client.store.list_failures(task_id=bad.task_id)
    assert record.code == "db_credentials" and "wrong credentials" in record.error
    assert "wrong-one" not in record.cause + record.error
    assert (await csms.describe("maria-bad")).record.failed_rotations == 1


async def test_due_rotations_start_on_time_with_a_bound(
    csms: SecretsService, client: Client, settings: Settings,
    env_worker: Callable[..., EnvWorker], tmp_path: Path,
) -> None:
    names = [f"due-{i}" for i in range(9)]
    due_at = csms.clock() + timedelta(seconds=4)
    for name in names:
        await csms.create(name, b"value-" + name.encode())
        secret = await csms.set_rotation(name, 6 * 3600)
        await csms.store.set_rotation(secret.record.secret_id, 6 * 3600, due_at, csms.clock())
    bounded = settings.replace(csms={"max_concurrent_rotations": 3})
    env_worker(bounded, **{PAUSE_AFTER_SET_ENV: "0.4"})

    async def all_rotated() -> bool:
        tasks = await client.list_tasks(name=ROTATE_JOB, status="succeeded")
        return len(tasks) == len(names)

    try:
        await wait_for(all_rotated, timeout=45, interval=0.2)
    except AssertionError as exc:
        raise AssertionError(await _evidence(client, csms, names, settings, tmp_path)) from exc
    tasks = await client.list_tasks(name=ROTATE_JOB)
    assert len(tasks) == len(names)  # each due rotation enqueued once
    starts = [parse_iso(t.result["started_at"]) for t in tasks if t.result]
    assert all(s is not None and s >= due_at - timedelta(seconds=0.5) for s in starts)
    lateness = max((s - due_at).total_seconds() for s in starts if s is not None)
    assert lateness < 10, lateness  # the hosted service may be up to an hour late
    peak = max(int(t.result["concurrent"]) for t in tasks if t.result)
    assert 2 <= peak <= 3
    for name in names:
        # Rotated exactly once: one new version, the original is SYSPREVIOUS. Its
        # number is not asserted: a run retried after a transient error may have
        # drawn one already (numbers are never reused, so they can skip).
        info = await csms.describe(name)
        versions = [v.version_id for v in await csms.list_versions(name)]
        once = (len(versions) == 2 and info.stages.get(m.PREVIOUS) == "v1"
                and info.stages[m.CURRENT] == versions[1] != "v1"
                and m.PENDING not in info.stages and info.record.failed_rotations == 0)
        assert once, await _evidence(client, csms, names, settings, tmp_path)
        assert info.record.next_rotation_at is not None
        assert info.record.next_rotation_at > due_at + timedelta(hours=5)


async def _evidence(client: Client, csms: SecretsService, names: list[str],
                    settings: Settings, tmp_path: Path) -> str:
    """Tasks, secrets and the worker's warnings, for a failure message."""
    lines = []
    for t in await client.list_tasks(limit=100):
        lines.append(f"task {t.task_id} {t.status} attempts={t.attempts} "
                     f"enqueued={t.enqueued_at} due={t.due_at} result={t.result} "
                     f"error={t.error}")
    for name in names:
        info = (await csms.describe(name)).to_json()
        versions = [v.version_id for v in await csms.list_versions(name)]
        lines.append(f"secret {name} stages={info['stages']} versions={versions} "
                     f"rotation={info['rotation']} failed={info['failed_rotations']} "
                     f"last_failure={info['last_failure']}")
    for path in (settings.log_file, *sorted(tmp_path.glob("worker*.out"))):
        if path.is_file():
            lines.append(f"--- {path} (not debug)")
            lines.extend(line for line in path.read_text(errors="replace").splitlines()
                         if '"level": "debug"' not in line)
    return "\n".join(lines)
