"""The PostgreSQL backend of the stores as a node meets it: every store's schema in
one database, migrated once by several processes at once; a newer schema, a wrong
URL, a server that is down or goes away mid-run: one line, nothing half-written,
and the next call after the server is back works without a restart."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import BackendUnavailable, SchemaTooNew
from engine.models import utcnow
from engine.pg_db import lock_key, placeholders
from engine.settings import Settings
from engine.sql_db import StoreTarget, pg_ddl
from engine.sqlite_store import SqliteTaskStore
from tests.helpers import run_dew
from tests.pg_store import StoreCluster, store_rows

STORES = {  # component -> the store class that owns it
    "engine": "engine.sqlite_store:SqliteTaskStore",
    "kms": "handlers.kms.store:SqliteKmsStore",
    "csms": "handlers.csms.store:SqliteCsmsStore",
    "kps": "handlers.kps.store:SqliteKpsStore",
    "iam": "engine.iam.store:SqliteIamStore",
    "schedules": "schedules.store:SqliteScheduleStore",
}

OPEN_ALL = """
import asyncio, importlib, sys
from pathlib import Path
from engine.sql_db import StoreTarget

async def main(url, specs):
    target = StoreTarget(Path(sys.argv[1]), url)
    for spec in specs:
        module, name = spec.split(":")
        store = await getattr(importlib.import_module(module), name).open(target)
        await store.close()

asyncio.run(main(sys.argv[2], sys.argv[3:]))
"""


def test_every_store_migrates_once_when_several_nodes_start_at_once(
    pg_store_url: str, tmp_path: Path,
) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_ALL, str(tmp_path / f"n{n}.db"),
                               pg_store_url, *STORES.values()], stderr=subprocess.PIPE)
             for n in range(3)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    target = StoreTarget(tmp_path / "x.db", pg_store_url)
    versions = {str(c): v for c, v in
                store_rows(target, "SELECT component, version FROM schema_migrations")}
    assert set(versions) == set(STORES)
    for component, spec in STORES.items():
        module, name = spec.split(":")
        store_class = getattr(__import__(module, fromlist=[name]), name)
        assert versions[component] == len(store_class.migrations), component
    assert not (tmp_path / "n0.db").exists()  # nothing written to a local SQLite file


async def test_a_node_stopped_in_a_migration_holds_up_only_that_component(
    pg_store_url: str, tmp_path: Path,
) -> None:
    """A node frozen (SIGSTOP, a pause) halfway through migrating a store keeps its
    migration locks until it wakes; another node still opens a store whose schema is up
    to date: that takes no migration lock at all (the stalled-worker takeover test met
    this: a second worker waited for the frozen first one to finish CSMS's migration)."""
    import asyncpg

    target = StoreTarget(tmp_path / "dew.sqlite3", pg_store_url)
    await (await SqliteTaskStore.open(target)).close()
    frozen = await asyncpg.connect(pg_store_url)
    try:
        async with frozen.transaction():
            for name in ("dew:schema_migrations", "dew:schema_migrations:kms"):
                await frozen.execute("SELECT pg_advisory_xact_lock($1)", lock_key(name))
            store = await asyncio.wait_for(SqliteTaskStore.open(target), timeout=10)
            await store.close()
    finally:
        await frozen.close()


async def test_a_newer_schema_is_refused_and_left_as_it_is(pg_store_url: str,
                                                           tmp_path: Path) -> None:
    target = StoreTarget(tmp_path / "dew.sqlite3", pg_store_url)
    await (await SqliteTaskStore.open(target)).close()
    newer = len(SqliteTaskStore.migrations) + 1
    await _admin(pg_store_url, f"UPDATE schema_migrations SET version = {newer} "
                               "WHERE component = 'engine'")
    with pytest.raises(SchemaTooNew, match=f"task store schema version {newer}, newer than"):
        await SqliteTaskStore.open(target)
    assert store_rows(target, "SELECT version FROM schema_migrations WHERE component = "
                              "'engine'") == [(newer,)]


async def test_postgresql_going_away_is_a_retryable_error_and_coming_back_heals(
    pg_store_url: str, store_cluster: StoreCluster, tmp_path: Path,
) -> None:
    store = await SqliteTaskStore.open(StoreTarget(tmp_path / "dew.sqlite3", pg_store_url))
    try:
        now = utcnow()
        await store.create_task("before", "engine.echo", {}, now, now)
        store_cluster.stop("fast")  # every client connection is cut
        try:
            with pytest.raises(BackendUnavailable, match=r"PostgreSQL at .* cannot be reached") \
                    as caught:
                await store.create_task("during", "engine.echo", {}, now, now)
            assert caught.value.retryable and store_cluster.password not in str(caught.value)
        finally:
            store_cluster.start()
        # The same store object, no restart: the pool opens new connections.
        for _ in range(50):
            try:
                await store.create_task("after", "engine.echo", {}, now, now)
                break
            except BackendUnavailable:
                await asyncio.sleep(0.1)
        ids = {t.task_id for t in await store.list_tasks()}
        assert ids == {"before", "after"}  # "during" was refused whole, not half-written
    finally:
        await store.close()


async def test_a_url_of_several_hosts_takes_the_one_that_answers(
    pg_store_url: str, store_cluster: StoreCluster, tmp_path: Path,
) -> None:
    """High availability on the client side: a standby list, as libpq writes it."""
    port = f":{store_cluster.port}/"
    url = pg_store_url.replace(port, f",127.0.0.1{port}").replace("@127.0.0.1", "@127.0.0.1:1")
    assert "@127.0.0.1:1,127.0.0.1:" in url
    store = await SqliteTaskStore.open(StoreTarget(tmp_path / "dew.sqlite3", url))
    try:
        now = utcnow()
        await store.create_task("t", "engine.echo", {}, now, now)
        assert [t.task_id for t in await store.list_tasks()] == ["t"]
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "code", "message"),
    [
        ("mysql://127.0.0.1/dew", 2, "[store] url 'mysql://127.0.0.1/dew' is not a PostgreSQL"),
        ("postgresql://127.0.0.1:99999/dew", 2, "has a bad port '99999'"),
        ("postgresql://h1:5432,h2:x/dew", 2, "has a bad port 'x'"),
        ("postgresql://127.0.0.1:5432", 2, "names no database"),
        ("postgresql://dew:s3cret@127.0.0.1:1/dew", 1,
         "PostgreSQL at postgresql://dew:***@127.0.0.1:1/dew cannot be reached"),
    ],
)
def test_a_bad_or_unreachable_store_url_is_one_line_and_writes_nothing(
    settings: Settings, url: str, code: int, message: str,
) -> None:
    bad = settings.replace(store={"url": ""})
    result = run_dew(bad, "tasks", "list", env_extra={"DEW_STORE_URL": url})
    assert result.returncode == code, result
    first = result.stderr.strip().splitlines()[0]
    assert message in first and "Traceback" not in result.stderr, result.stderr
    assert "s3cret" not in result.stderr
    assert not settings.db_path.exists()


def test_init_with_a_store_it_cannot_reach_makes_nothing(settings: Settings,
                                                         tmp_path: Path) -> None:
    fresh = settings.replace(engine={"state_dir": tmp_path / "fresh"})
    result = run_dew(fresh, "init", env_extra={
        "DEW_STORE_URL": "postgresql://dew@127.0.0.1:1/dew"})
    assert result.returncode == 1 and "cannot be reached" in result.stderr, result
    assert not (tmp_path / "fresh").exists()


def test_a_wrong_password_and_a_newer_schema_name_what_to_check(
    settings: Settings, store_cluster: StoreCluster,
) -> None:
    url = store_cluster.new_database()
    wrong = url.replace(store_cluster.password, "wrong-password")
    result = run_dew(settings, "tasks", "list", env_extra={"DEW_STORE_URL": wrong})
    assert result.returncode == 1, result
    assert "refused the login" in result.stderr and "[store] url" in result.stderr
    assert "wrong-password" not in result.stderr and "Traceback" not in result.stderr
    assert run_dew(settings, "tasks", "list", env_extra={"DEW_STORE_URL": url}).returncode == 0
    asyncio.run(_admin(url, "UPDATE schema_migrations SET version = version + 1 "
                            "WHERE component = 'engine'"))
    result = run_dew(settings, "tasks", "list", env_extra={"DEW_STORE_URL": url})
    assert result.returncode == 1, result
    assert "newer than this engine" in result.stderr.splitlines()[0]


def test_sql_is_carried_over_as_written() -> None:
    assert placeholders("SELECT '?', \"a?\" FROM t WHERE a = ? AND b = ?") == \
        "SELECT '?', \"a?\" FROM t WHERE a = $1 AND b = $2"
    assert pg_ddl("  id INTEGER PRIMARY KEY AUTOINCREMENT,\n  blob BLOB,\n  name TEXT NOT NULL") \
        == ('  id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,\n  blob BYTEA,\n'
            '  name TEXT COLLATE "C" NOT NULL')


async def _admin(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
