"""Fixtures for KMS tests: the process's shared SoftHSM token, a registry per test,
an injectable clock, and settings that let subprocesses (CLI, worker) use the
same token.

SoftHSM reads SOFTHSM2_CONF once per process, so everything in this process
uses ``shared_softhsm_config()``. A ``dew`` subprocess finds its token through
``STATE/hsm/softhsm2.conf``; ``kms_settings`` writes that file naming the shared
token directory (and copies the PIN file), so the CLI, a worker and this
process all see the same keys, and the same task store database.

The registry is where ``store_target`` says (tests/conftest.py): a SQLite file, or
with ``DEW_TEST_STORE=postgresql`` a fresh PostgreSQL database, the file's name then
the base of the node-local audit anchor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from engine.crypto import CryptoCore, HsmConfig
from engine.settings import Settings
from engine.sql_db import StoreTarget
from handlers.kms.service import KmsService
from handlers.kms.store import SqliteKmsStore
from tests.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def core(hsm_config: HsmConfig) -> AsyncIterator[CryptoCore]:
    async with CryptoCore(hsm_config) as c:
        yield c


async def _destroy_leftovers(store: SqliteKmsStore, core: CryptoCore) -> None:
    # The token is shared by the whole session: remove what this test created.
    rows = await store._fetchall(  # test cleanup reads the registry directly
        "SELECT token_label FROM kms_key_versions WHERE destroyed_at IS NULL")
    for row in rows:
        await core.destroy_key(str(row[0]))


@pytest.fixture
def kms_target(store_target: StoreTarget, tmp_path: Path) -> StoreTarget:
    """Where ``kms_store`` is: ``tmp_path/kms/dew.sqlite3``, or this test's PostgreSQL
    database (that path the base of the node's side files, the audit anchor)."""
    return replace(store_target, path=tmp_path / "kms" / "dew.sqlite3")


@pytest.fixture
async def kms_store(kms_target: StoreTarget) -> AsyncIterator[SqliteKmsStore]:
    store = await SqliteKmsStore.open(kms_target)
    yield store
    await store.close()


@pytest.fixture
async def kms(
    kms_store: SqliteKmsStore, core: CryptoCore, clock: FakeClock
) -> AsyncIterator[KmsService]:
    """A service with a fake clock and unbuffered audit (each entry written at once)."""
    service = KmsService(kms_store, core, clock=clock, actor="test", audit_flush_interval=0)
    yield service
    await service.close()
    await _destroy_leftovers(kms_store, core)


@pytest.fixture
async def kms_settings(settings: Settings, hsm_config: HsmConfig) -> AsyncIterator[Settings]:
    """The linked settings; keys that subprocesses made are destroyed afterwards."""
    linked = settings
    yield linked
    if linked.store.url or linked.db_path.exists():  # keys made by subprocesses (CLI, worker)
        store = await SqliteKmsStore.open(linked.store_target)
        try:
            async with CryptoCore(hsm_config) as c:
                await _destroy_leftovers(store, c)
        finally:
            await store.close()


@pytest.fixture
async def shared_kms(
    kms_settings: Settings, core: CryptoCore, clock: FakeClock
) -> AsyncIterator[KmsService]:
    """A service on ``kms_settings``' database: what the CLI and workers see too."""
    store = await SqliteKmsStore.open(kms_settings.store_target)
    service = KmsService(store, core, clock=clock, actor="test", audit_flush_interval=0,
                         cache_ttl=0)
    yield service
    await service.close()
    await _destroy_leftovers(store, core)
    await store.close()
