"""Fixtures for CSMS tests: the shared SoftHSM token, a secrets service in this
process, workers with extra environment, a private PostgreSQL cluster with
scram-sha-256 password auth and TLS (a throw-away CA, :mod:`tests.csms.pki`),
users on the machine's MariaDB server (no TLS), and a private MariaDB server
with TLS started once per session.

SoftHSM reads SOFTHSM2_CONF once per process: the root ``settings`` fixture
links ``STATE/hsm/softhsm2.conf`` to this process's shared token, so the CLI
and workers in subprocesses see the same keys and the same database file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from engine.crypto import CryptoCore, HsmConfig
from engine.redis_server import free_port
from engine.settings import Settings
from handlers.csms.service import SecretsService
from handlers.csms.store import SqliteCsmsStore
from handlers.kms.service import KmsService
from handlers.kms.store import SqliteKmsStore
from tests.csms.pki import Ca
from tests.helpers import ROOT, FakeClock, WorkerProcess, dew_env
from tests.pg_store import PG_BIN, as_postgres, initdb

# Server certificates name only this host: a secret naming 127.0.0.1 gets a host name
# mismatch under verify-full (and is accepted under verify-ca).
TLS_HOST = "localhost"
TLS_ONLY_GROUP = "dew_tls_only"  # pg_hba: members log in over TLS only (hostssl)


@dataclass(frozen=True)
class Pki:
    ca: Ca  # signs the test servers' certificates
    other_ca: Ca  # signs nothing the servers use: "the wrong CA"


@pytest.fixture(scope="session")
def pki() -> Pki:
    return Pki(Ca.make("dew test CA"), Ca.make("dew unrelated CA"))


def _chown(path: Path, user: str) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
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
    kms_store = await SqliteKmsStore.open(settings.store_target)
    kms = KmsService(kms_store, core, actor="test", audit_flush_interval=0, cache_ttl=0)
    store = await SqliteCsmsStore.open(settings.store_target)
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


@dataclass
class PgCluster:
    data: Path
    port: int
    superpass: str
    log: Path
    ca_pem: str = ""  # the CA of the server certificate (for TLS_HOST)

    def start(self) -> None:
        subprocess.run(as_postgres([
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
            "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off -c max_connections=300",
            "start"]), check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast",
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
        """A value document in the older form, ``"ssl": false``: the plaintext opt-out."""
        return {"engine": "postgresql", "host": "127.0.0.1", "port": port or self.port,
                "username": user, "password": password, "dbname": "postgres", "ssl": False}

    def tls_document(self, user: str, password: str, **fields: Any) -> dict[str, object]:
        """A value document with verified TLS (verify-full by default, the CA given)."""
        return {"engine": "postgresql", "host": TLS_HOST, "port": self.port,
                "username": user, "password": password, "dbname": "postgres",
                "tls_ca": self.ca_pem, **fields}

    async def create_tls_only_user(self, name: str, password: str) -> None:
        """A user pg_hba lets in over TLS only (hostssl; hostnossl: reject)."""
        await self.create_user(name, password)
        conn = await self.admin()
        try:
            with contextlib.suppress(asyncpg.DuplicateObjectError):
                await conn.execute(f"CREATE ROLE {TLS_ONLY_GROUP} NOLOGIN")
            await conn.execute(f"GRANT {TLS_ONLY_GROUP} TO {name}")
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def without_tls(self) -> AsyncIterator[None]:
        """The server with ``ssl = off`` (reloaded, no restart) while in the block."""
        await self._set_ssl("off")
        try:
            yield
        finally:
            await self._set_ssl("on")

    async def _set_ssl(self, value: str) -> None:
        conn = await self.admin()
        try:
            await conn.execute(f"ALTER SYSTEM SET ssl = {value}")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        deadline = time.monotonic() + 10
        while True:  # the postmaster applies the reload asynchronously
            conn = await self.admin()
            try:
                if await conn.fetchval("SHOW ssl") == value:
                    return
            finally:
                await conn.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"ssl did not become {value}")
            await asyncio.sleep(0.05)


@pytest.fixture(scope="session")
def pg_cluster(pki: Pki) -> Iterator[PgCluster]:
    """A private cluster: scram-sha-256 for every login, so a wrong password fails;
    TLS on with a certificate for TLS_HOST from ``pki.ca`` (key 0600, owned by the
    user running the cluster); members of TLS_ONLY_GROUP log in over TLS only."""
    base, superpass = initdb("dew-pg-")
    data = base / "data"
    _enable_pg_tls(data, pki.ca)
    cluster = PgCluster(data, free_port(), superpass, base / "pg.log", pki.ca.pem)
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)


def _enable_pg_tls(data: Path, ca: Ca) -> None:
    cert, key = ca.issue_server(data, [TLS_HOST])
    for path in (cert, key):
        _chown(path, "postgres")  # the server refuses a key not its own or not 0600
    with (data / "postgresql.conf").open("a") as conf:
        conf.write("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    hba = data / "pg_hba.conf"
    hba.write_text(
        f"hostssl all +{TLS_ONLY_GROUP} 127.0.0.1/32 scram-sha-256\n"
        f"hostnossl all +{TLS_ONLY_GROUP} 127.0.0.1/32 reject\n" + hba.read_text())


async def pg_login(doc: dict[str, object]) -> bool:
    """Whether ``doc``'s user logs in with ``doc``'s password (anything else raises)."""
    tls: ssl.SSLContext | bool = False
    if isinstance(doc.get("tls_ca"), str):  # over TLS, as the secret says (TLS-only users)
        tls = ssl.create_default_context(cadata=str(doc["tls_ca"]))
        tls.check_hostname = doc.get("tls") != "verify-ca"
    try:
        conn = await asyncpg.connect(host=str(doc["host"]), port=int(str(doc["port"])),
                                     user=str(doc["username"]), password=str(doc["password"]),
                                     database="postgres", ssl=tls, timeout=5)
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


@dataclass
class MariaServer:
    """A private ``mariadbd`` with TLS (certificate for TLS_HOST from ``pki.ca``),
    on 127.0.0.1:port; root logs in over the unix socket without a password."""

    base: Path
    port: int
    ca_pem: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.base / "sock"

    def start(self) -> None:
        data = self.base / "data"
        if not data.exists():
            data.mkdir()
            _chown(data, "mysql")
            subprocess.run(
                ["mariadb-install-db", "--no-defaults", f"--datadir={data}",
                 "--auth-root-authentication-method=normal", f"--user={_mysql_user()}",
                 "--skip-test-db"], check=True, capture_output=True, timeout=120)
        log = (self.base / "mariadbd.out").open("ab")
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", f"--user={_mysql_user()}",
             f"--pid-file={self.base / 'mariadbd.pid'}", "--skip-log-bin",
             "--innodb-buffer-pool-size=16M", "--skip-name-resolve",
             f"--ssl-ca={self.base / 'ca.pem'}", f"--ssl-cert={self.base / 'server.crt'}",
             f"--ssl-key={self.base / 'server.key'}"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mariadbd exited ({self.proc.returncode}): "
                                     + (self.base / "mariadbd.out").read_text()[-2000:])
            if self.root_try("SELECT 1"):
                return
            if time.monotonic() > deadline:
                raise AssertionError("mariadbd did not answer in 60 s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def root_try(self, sql: str) -> bool:
        done = subprocess.run(["mysql", "--no-defaults", f"--socket={self.socket}", "-uroot",
                               "-e", sql], capture_output=True, timeout=30)
        return done.returncode == 0

    def root(self, sql: str) -> None:
        if not self.root_try(sql):
            raise AssertionError(f"mysql failed: {sql}")

    def create_user(self, name: str, password: str) -> None:
        self.root(f"CREATE USER '{name}'@'127.0.0.1' IDENTIFIED BY '{password}'")

    def document(self, user: str, password: str, **fields: Any) -> dict[str, object]:
        """A value document with verified TLS (verify-full by default, the CA given)."""
        return {"engine": "mariadb", "host": TLS_HOST, "port": self.port, "username": user,
                "password": password, "dbname": "", "tls_ca": self.ca_pem, **fields}


def _mysql_user() -> str:
    # mariadbd refuses to run as root unless told to: as root, run it as mysql.
    return "mysql" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture(scope="session")
def mariadb_tls(pki: Pki) -> Iterator[MariaServer]:
    """A private MariaDB server with TLS, started once per session (a few seconds)."""
    for tool in ("mariadbd", "mariadb-install-db", "mysql"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (Debian: mariadb-server, mariadb-client)")
    base = Path(tempfile.mkdtemp(prefix="dew-maria-"))
    _chown(base, "mysql")
    pki.ca.write(base / "ca.pem")
    paths = pki.ca.issue_server(base, [TLS_HOST])
    for path in (base / "ca.pem", *paths):
        _chown(path, "mysql")
    server = MariaServer(base, free_port(), pki.ca.pem)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
