"""A private PostgreSQL cluster for the stores' PostgreSQL backend (``[store] url``).

One cluster per test process (initdb in a temporary directory, run as the
``postgres`` OS user when the tests run as root: initdb refuses root), password
logins only (scram-sha-256), on 127.0.0.1 and a free port. Each test gets a database
of its own, owned by the ``dew`` role the stores log in as.

``DEW_TEST_STORE=postgresql`` makes the root ``settings`` fixture (tests/conftest.py)
put every store of a test in such a database: the same tests, on the other backend.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import pwd
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from engine.pg_db import placeholders
from engine.sql_db import StoreTarget

PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
PG_BIN = PG_BINS[-1].parent if PG_BINS else Path("/nonexistent")
ROLE = "dew"


def on_postgresql() -> bool:
    """Whether this run puts the stores in PostgreSQL (``DEW_TEST_STORE``)."""
    return os.environ.get("DEW_TEST_STORE", "sqlite") == "postgresql"


_PROCESS_CLUSTER: list[StoreCluster] = []


def process_cluster() -> StoreCluster:
    """This test process's cluster, started on first use and removed at exit (fixtures
    of any scope, and plain context managers such as tests/api_process.py, share it)."""
    if not _PROCESS_CLUSTER:
        from engine.redis_server import free_port

        cluster = StoreCluster.create(free_port())
        atexit.register(cluster.remove)
        _PROCESS_CLUSTER.append(cluster)
    return _PROCESS_CLUSTER[0]


def as_postgres(args: list[str]) -> list[str]:
    """initdb refuses to run as root: the cluster runs as the postgres OS user."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def initdb(prefix: str, *options: str) -> tuple[Path, str]:
    """A new cluster in a temporary directory (BASE/data): password logins only
    (scram-sha-256), the superuser ``postgres`` with a fresh password; (BASE, password)."""
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError("PostgreSQL is not installed (initdb): run `make setup`")
    base = Path(tempfile.mkdtemp(prefix=prefix))
    password = secrets.token_hex(12)
    pwfile = base / "pw"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        for path in (base, pwfile):
            os.chown(path, pg.pw_uid, pg.pw_gid)
    subprocess.run(as_postgres([
        str(PG_BIN / "initdb"), "-D", str(base / "data"), "-U", "postgres", "--pwfile",
        str(pwfile), "-A", "scram-sha-256", "--no-sync", "-E", "UTF8", *options]),
        check=True, capture_output=True, timeout=120)
    return base, password


@dataclass
class StoreCluster:
    base: Path
    port: int
    password: str
    _next: int = 0

    @property
    def data(self) -> Path:
        return self.base / "data"

    @classmethod
    def create(cls, port: int) -> StoreCluster:
        base, password = initdb("dew-store-pg-", "--locale", "C.UTF-8")
        cluster = cls(base, port, password)
        cluster.start()
        cluster.psql(f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}'")
        return cluster

    def start(self) -> None:
        subprocess.run(as_postgres([
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "pg.log"),
            "-w", "-t", "60", "-o",
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=400",
            "start"]), check=True, capture_output=True, timeout=90)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode,
                                     "-w", "stop"]), capture_output=True, timeout=60)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres") -> str:
        env = {**os.environ, "PGPASSWORD": self.password}
        done = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
             "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            env=env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {done.stderr.strip()}")
        return done.stdout.strip()

    def new_database(self) -> str:
        """A fresh database of the ``dew`` role; its URL (password included)."""
        self._next += 1
        name = f"dew_{os.getpid()}_{self._next}"
        self.psql(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"


sqlite_only = pytest.mark.skipif(
    on_postgresql(), reason="a mechanism of the SQLite backend (DEW_TEST_STORE=postgresql)")


async def admin_sql(target: StoreTarget, *statements: str) -> None:
    """Statements a test runs on a store's database behind the store's back."""
    if target.url:
        conn = await asyncpg.connect(target.url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()
        return
    with sqlite3.connect(target.path) as db:
        for statement in statements:
            db.execute(statement)


def store_rows(target: StoreTarget, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Rows of one query on a store's database, from sync or async code alike (a
    thread of its own for PostgreSQL: the caller may be inside a running loop)."""
    if not target.url:
        if not target.path.exists():
            return []
        with sqlite3.connect(target.path, timeout=10) as db:
            try:
                return db.execute(sql, params).fetchall()
            except sqlite3.OperationalError:
                return []  # no such table yet

    async def query() -> list[tuple[object, ...]]:
        conn = await asyncpg.connect(target.url)
        try:
            return [tuple(r) for r in await conn.fetch(placeholders(sql), *params)]
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await conn.close()

    result: list[list[tuple[object, ...]]] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(query())))
    thread.start()
    thread.join(30)
    return result[0] if result else []
