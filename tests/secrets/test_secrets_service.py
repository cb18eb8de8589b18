"""The secrets service in this process: versions, stages, deletion, accounts,
envelope encryption (nothing in clear in the database), COMMON rotation and
the scheduler's enqueue-once."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest

from engine.client import Client
from engine.errors import InvalidInput, NotFound, SecurityError
from engine.settings import Settings
from handlers import secrets_model as m
from handlers.secrets import (
    ROTATE_JOB,
    SecretExists,
    SecretNotFound,
    SecretsService,
    SecretStateError,
    enqueue_due_rotations,
)
from tests.secrets.conftest import FakeClock

VALUE = b"correct horse battery staple 7f3a"


async def test_versions_and_stages(csms: SecretsService) -> None:
    info = await csms.create("app.key", VALUE, description="d")
    assert info.stages == {m.CURRENT: "v1"}
    assert (await csms.get_value("app.key")).value == VALUE
    v2 = await csms.put_version("app.key", b"second")
    assert (v2.version_id, v2.stages) == ("v2", [m.CURRENT])
    versions = {v.version_id: v.stages for v in await csms.list_versions("app.key")}
    assert versions == {"v1": [m.PREVIOUS], "v2": [m.CURRENT]}
    assert (await csms.get_value("app.key", stage=m.PREVIOUS)).value == VALUE
    assert (await csms.get_value("app.key", version_id="v2")).value == b"second"

    # A stage names one version at a time: moving it takes it off the other.
    await csms.set_stage("app.key", "BLUE", "v1")
    stages = await csms.set_stage("app.key", "BLUE", "v2")
    assert stages["BLUE"] == "v2" and list(stages.values()).count("v2") == 2
    # Moving SYSCURRENT back hands SYSPREVIOUS to the version that had it.
    stages = await csms.set_stage("app.key", m.CURRENT, "v1")
    assert (stages[m.CURRENT], stages[m.PREVIOUS]) == ("v1", "v2")
    for stage in (m.CURRENT, m.PREVIOUS):
        with pytest.raises(InvalidInput, match="cannot be removed"):
            await csms.remove_stage("app.key", stage)
    assert "BLUE" not in await csms.remove_stage("app.key", "BLUE")
    with pytest.raises(SecretExists):
        await csms.create("app.key", b"again")
    with pytest.raises(InvalidInput):
        await csms.get_value("app.key", version_id="v9x")


async def test_bad_input_changes_nothing(csms: SecretsService) -> None:
    await csms.create("s1", VALUE)
    before = await csms.describe("s1")
    calls = [
        lambda: csms.put_version("s1", b"x" * (m.MAX_VALUE_BYTES + 1)),
        lambda: csms.set_stage("s1", "bad stage", "v1"),
        lambda: csms.set_stage("s1", "OK", "v7"),
        lambda: csms.create("s2", b"{}", secret_type="RDS_POSTGRESQL"),
        lambda: csms.schedule_deletion("s1", 31),
    ]
    for call in calls:
        with pytest.raises((InvalidInput, NotFound)):
            await call()
    after = await csms.describe("s1")
    assert after.to_json() == before.to_json()
    assert [s.record.name for s in await csms.list_secrets()] == ["s1"]


async def test_accounts_isolate_secrets(csms: SecretsService) -> None:
    await csms.create("shared-name", b"alpha", account="a")
    await csms.create("shared-name", b"beta", account="b")
    assert (await csms.get_value("shared-name", account="a")).value == b"alpha"
    assert (await csms.get_value("shared-name", account="b")).value == b"beta"
    with pytest.raises(SecretNotFound, match="no secret 'shared-name' in account 'c'"):
        await csms.get_value("shared-name", account="c")
    assert [s.record.account for s in await csms.list_secrets(account="a")] == ["a"]


async def test_deletion_window_restore_and_due_deletion(csms: SecretsService,
                                                        clock: FakeClock) -> None:
    csms.clock = clock
    await csms.create("old", VALUE)
    info = await csms.schedule_deletion("old", 7)
    assert info.record.state == "pending_deletion"
    calls = [lambda: csms.get_value("old"), lambda: csms.put_version("old", b"x"),
             lambda: csms.rotate("old")]
    for call in calls:
        with pytest.raises(SecretStateError, match="pending deletion"):
            await call()
    with pytest.raises(SecretStateError, match="already scheduled"):
        await csms.schedule_deletion("old", 7)
    await csms.restore("old")
    assert (await csms.get_value("old")).value == VALUE
    await csms.schedule_deletion("old", 7)
    assert await csms.delete_due(clock.now + timedelta(days=6)) == []
    assert await csms.delete_due(clock.now + timedelta(days=7, seconds=1)) == ["default/old"]
    with pytest.raises(SecretNotFound):
        await csms.describe("old")
    await csms.create("old", b"reborn")  # the name is free again


async def test_values_are_enveloped_under_the_chosen_cmk(
    csms: SecretsService, settings: Settings
) -> None:
    await csms.kms.create_key("team-key", account="default")  # type: ignore[attr-defined]
    await csms.create("k1", VALUE, kms_key="team-key")
    await csms.create("k2", VALUE)  # csms/default, created on first use
    keys = {k.key_alias for k in await csms.kms.list_keys()}  # type: ignore[attr-defined]
    assert {"team-key", "csms/default"} <= keys
    with sqlite3.connect(settings.db_path) as db:
        rows = db.execute("SELECT secret_id, wrapped_dek, ciphertext FROM csms_versions").fetchall()
        dump = "\n".join(db.iterdump()).encode()
    assert len(rows) == 2 and rows[0][1] != rows[1][1]  # a fresh data key per version
    assert VALUE not in dump and VALUE not in settings.db_path.read_bytes()
    # A ciphertext moved onto another secret does not open there.
    with sqlite3.connect(settings.db_path) as db:
        db.execute("UPDATE csms_versions SET ciphertext = (SELECT ciphertext FROM csms_versions "
                   "WHERE secret_id = ?) WHERE secret_id = ?", (rows[0][0], rows[1][0]))
    other = "k1" if rows[1][0] == (await csms.store.get_secret("default", "k1")
                                   or pytest.fail()).secret_id else "k2"
    with pytest.raises(SecurityError, match="integrity check failed"):
        await csms.get_value(other)


async def test_common_rotation_and_resume_reuses_pending(csms: SecretsService) -> None:
    await csms.create("c1", VALUE)
    result = await csms.rotate("c1")
    assert result["steps"] == ["create", "set", "test", "finish"]
    stages = await csms.store.stages((await csms.store.get_secret("default", "c1")
                                      or pytest.fail()).secret_id)
    assert stages == {m.CURRENT: "v2", m.PREVIOUS: "v1"}
    assert (await csms.get_value("c1", stage=m.PREVIOUS)).value == VALUE
    # A SYSPENDING version left by an interrupted run is reused, not duplicated.
    secret = await csms.store.get_secret("default", "c1")
    assert secret is not None
    await csms.set_stage("c1", m.PENDING, "v1")
    result = await csms.rotate("c1")
    assert result["steps"] == ["create", "set", "test", "finish"]
    assert (await csms.get_value("c1")).version_id == "v1"
    assert len(await csms.list_versions("c1")) == 2
    info = (await csms.describe("c1")).to_json()
    assert info["rotation"]["in_progress"] is None and info["failed_rotations"] == 0


async def test_due_rotation_is_enqueued_once(
    csms: SecretsService, client: Client, clock: FakeClock
) -> None:
    csms.clock = clock
    await csms.create("sched", VALUE)
    await csms.set_rotation("sched", 6 * 3600)
    assert (await enqueue_due_rotations(csms.store, client, clock.now, 20))["queued"] == 0
    clock.advance(hours=6)
    for _ in range(3):  # three scheduler looks at the same due rotation
        await enqueue_due_rotations(csms.store, client, clock.now, 20)
    tasks = await client.list_tasks(name=ROTATE_JOB)
    assert len(tasks) == 1 and tasks[0].task_id.startswith("csms.rotate:default:sched:")
    # A rotation due within the look-ahead is queued early, deferred to its due time.
    await csms.create("soon", VALUE)
    await csms.set_rotation("soon", 6 * 3600)
    clock.advance(hours=6, seconds=-15)
    await enqueue_due_rotations(csms.store, client, clock.now, 20)
    soon = [t for t in await client.list_tasks(name=ROTATE_JOB) if ":soon:" in t.task_id]
    assert len(soon) == 1 and soon[0].due_at > soon[0].enqueued_at + timedelta(seconds=10)
    # A stale scheduled run (the schedule moved) does nothing.
    result = await csms.rotate("sched", due=123)
    assert result["skipped"] is True
