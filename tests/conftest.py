"""Shared fixtures: a private redis-server per test session, settings in a temp dir,
a client, and ``dew worker`` subprocesses."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from engine.client import Client
from engine.crypto import HsmConfig
from engine.crypto.testing import shared_softhsm_config
from engine.redis_server import RedisServer, free_port
from engine.settings import Settings, load_settings
from engine.sql_db import StoreTarget
from tests.helpers import WorkerProcess, link_shared_token
from tests.pg_store import StoreCluster, on_postgresql, process_cluster

# Short intervals so crash and loss recovery take seconds in tests.
TEST_SETTINGS = {
    "worker": {"poll_delay": 0.01, "heartbeat_interval": 0.5, "heartbeat_timeout": 2.0,
               "job_timeout": 60},
    "retry": {"max_tries": 3, "backoff_base": 0.05, "backoff_max": 0.2},
    "sweeper": {"interval": 1, "grace": 0.5},
    "log": {"console": "off", "level": "debug"},
}


@pytest.fixture(autouse=True)
def _process_umask() -> Iterator[None]:
    """A test that runs ``engine.cli.main`` in this process leaves the CLI's private
    umask (077) behind; later tests' directories (a test sshd's, made by root for
    another user) would then be closed to their users. Restore it after each test."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hsm_config() -> HsmConfig:
    """The process's one SoftHSM token (SoftHSM reads its config once per process)."""
    return shared_softhsm_config()


@pytest.fixture(scope="session")
def store_cluster() -> StoreCluster:
    """This test process's private PostgreSQL cluster (tests/pg_store.py)."""
    return process_cluster()


@pytest.fixture
def pg_store_url(store_cluster: StoreCluster) -> str:
    """A fresh PostgreSQL database for this test's stores (``[store] url``)."""
    return store_cluster.new_database()


@pytest.fixture
def store_target(tmp_path: Path, request: pytest.FixtureRequest) -> StoreTarget:
    """Where a store test puts its store: a SQLite file, or (``DEW_TEST_STORE=
    postgresql``) a fresh PostgreSQL database."""
    url = request.getfixturevalue("pg_store_url") if on_postgresql() else ""
    return StoreTarget(tmp_path / "state" / "dew.sqlite3", url)


@pytest.fixture
def settings(
    tmp_path: Path, redis_server: RedisServer, hsm_config: HsmConfig,
    request: pytest.FixtureRequest,
) -> Settings:
    """A temp state dir, the session's Redis (emptied), short timeouts, and the
    shared HSM token linked in, so this process, ``dew`` subprocesses and workers
    all use the same keys. With ``DEW_TEST_STORE=postgresql`` the stores are in a
    fresh PostgreSQL database."""
    if not redis_server.ping():  # a test killed it: bring it back for the next one
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    # A queue of its own: a worker some earlier test left behind can never take
    # this test's jobs from the shared Redis.
    queue = f"arq:queue:{uuid.uuid4().hex[:12]}"
    settings = load_settings().replace(
        engine={"state_dir": tmp_path / "var"}, redis={"url": redis_server.url, "queue": queue},
        **TEST_SETTINGS,
    )
    if on_postgresql():
        settings = settings.replace(store={"url": request.getfixturevalue("pg_store_url")})
    return link_shared_token(settings, hsm_config)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with await Client.open(settings) as c:
        yield c


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A running ``dew worker``; stopped at the end of the test."""
    proc = WorkerProcess(settings, tmp_path / "worker.out")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def make_worker(settings: Settings, tmp_path: Path) -> Iterator[type[WorkerProcess]]:
    """Start workers by hand (``make_worker().start()``); all stopped at the end."""
    started: list[WorkerProcess] = []

    def factory(wait: bool = True) -> WorkerProcess:
        proc = WorkerProcess(settings, tmp_path / f"worker{len(started)}.out")
        started.append(proc)
        return proc.start(wait)

    yield factory  # type: ignore[misc]
    for proc in started:
        proc.stop()
