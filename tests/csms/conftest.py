"""Fixtures for CSMS tests: the shared SoftHSM token, a secrets service in this
process, workers with extra environment, a private PostgreSQL cluster with
scram-sha-256 password auth, and users on the machine's MariaDB server.

SoftHSM reads SOFTHSM2_CONF once per process: the root ``settings`` fixture
links ``STATE/hsm/softhsm2.conf`` to this process's shared token, so the CLI
and workers in subprocesses see the same keys and the same database file.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from engine.crypto import CryptoCore, HsmConfig
from engine.redis_server import free_port
from engine.settings import Settings
from handlers.csms.service import SecretsService
from handlers.csms.store import SqliteCsmsStore
from handlers.kms.service import KmsService
from handlers.kms.store import SqliteKmsStore
from tests.helpers import ROOT, FakeClock, WorkerProcess, dew_env

PG_BIN = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1]).parent \
    if list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) else Path("/nonexistent")





@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The root settings (linked to this process's token) with short DB timeouts."""
    return settings.replace(csms={"db_timeout": 2.0})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def core(hsm_config: HsmConfig) -> AsyncIterator[CryptoCore]:
    async with CryptoCore(hsm_config) as c:
        yield c


@pytest.fixture
async def csms(settings: Settings, core: CryptoCore) -> AsyncIterator[SecretsService]:
    """A secrets service in this process, on the test's database (real clock)."""
    kms_store = await SqliteKmsStore.open(settings.db_path)
    kms = KmsService(kms_store, core, actor="test", audit_flush_interval=0, cache_ttl=0)
    store = await SqliteCsmsStore.open(settings.db_path)
    yield SecretsService(store, kms, actor="test", db_timeout=2.0)
    await kms.close()
    await store.close()
    # The token is shared by the session: destroy the CMKs this test made.
    for row in await kms_store._fetchall(
            "SELECT token_label FROM kms_key_versions WHERE destroyed_at IS NULL"):
        await core.destroy_key(str(row[0]))
    await kms_store.close()


class EnvWorker(WorkerProcess):
    """``dew worker`` with extra environment variables (test hooks)."""

    def __init__(self, settings: Settings, log_path: Path, **env: str) -> None:
        super().__init__(settings, log_path)
        self.env = env

    def start(self, wait: bool = True) -> EnvWorker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "worker"],
            env=dew_env(self.settings, **self.env), cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_beating()
        return self


@pytest.fixture
def env_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., EnvWorker]]:
    started: list[EnvWorker] = []

    def factory(settings_: Settings | None = None, **env: str) -> EnvWorker:
        proc = EnvWorker(settings_ or settings, tmp_path / f"worker{len(started)}.out", **env)
        started.append(proc)
        return proc.start()

    yield factory
    for proc in started:
        proc.stop()


# --------------------------------------------------------------------------- PostgreSQL


def _as_postgres(args: list[str]) -> list[str]:
    # initdb refuses to run as root: run the cluster as the postgres OS user.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@dataclass
class PgCluster:
    data: Path
    port: int
    superpass: str
    log: Path

    def start(self) -> None:
        subprocess.run(_as_postgres([
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
            "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off -c max_connections=300",
            "start"]), check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                                     "-w", "stop"]), capture_output=True, timeout=60)

    async def admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres",
                                     password=self.superpass, database="postgres", ssl=False)

    async def create_user(self, name: str, password: str) -> None:
        conn = await self.admin()
        try:
            await conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        finally:
            await conn.close()

    def document(self, user: str, password: str, port: int | None = None) -> dict[str, object]:
        return {"engine": "postgresql", "host": "127.0.0.1", "port": port or self.port,
                "username": user, "password": password, "dbname": "postgres", "ssl": False}


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A private cluster: scram-sha-256 for every login, so a wrong password fails."""
    if not (PG_BIN / "initdb").exists():
        pytest.fail("PostgreSQL is not installed (initdb): run `make setup`")
    base = Path(tempfile.mkdtemp(prefix="dew-pg-"))
    data = base / "data"
    superpass = secrets.token_hex(12)
    pwfile = base / "pw"
    pwfile.write_text(superpass + "\n")
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        for path in (base, pwfile):
            os.chown(path, pg.pw_uid, pg.pw_gid)
    subprocess.run(_as_postgres([
        str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile),
        "-A", "scram-sha-256", "--no-sync", "-E", "UTF8"]),
        check=True, capture_output=True, timeout=120)
    cluster = PgCluster(data, free_port(), superpass, base / "pg.log")
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)


async def pg_login(doc: dict[str, object]) -> bool:
    """Whether ``doc``'s user logs in with ``doc``'s password (anything else raises)."""
    try:
        conn = await asyncpg.connect(host=str(doc["host"]), port=int(str(doc["port"])),
                                     user=str(doc["username"]), password=str(doc["password"]),
                                     database="postgres", ssl=False, timeout=5)
    except asyncpg.InvalidPasswordError:
        return False
    await conn.close()
    return True


# --------------------------------------------------------------------------- MariaDB


def mysql_root(sql: str) -> None:
    subprocess.run(["mysql", "-uroot", "-e", sql], check=True, capture_output=True, timeout=30)


@pytest.fixture
def mariadb_user() -> Iterator[tuple[str, str]]:
    """A user of the machine's MariaDB created IDENTIFIED BY a password, for TCP logins."""
    if shutil.which("mysql") is None:
        pytest.fail("the MariaDB client is not installed: run `make setup`")
    user, password = f"dew_t_{secrets.token_hex(4)}", secrets.token_hex(12)
    mysql_root(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'")
    yield user, password
    mysql_root(f"DROP USER IF EXISTS '{user}'@'127.0.0.1'")


async def wait_until(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)
