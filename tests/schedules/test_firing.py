"""User schedules: firing with a controllable clock (no waiting for minutes), and
with two real workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from engine.client import Client, check_task_id
from engine.errors import NotFound
from engine.models import utcnow
from engine.registry import default_registry
from engine.settings import Settings
from schedules import service
from schedules.store import FiringRecord, ScheduleRecord, SqliteScheduleStore
from tests.helpers import FakeClock

T0 = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
SLEEP = {"seconds": 0}


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[SqliteScheduleStore]:
    s = await SqliteScheduleStore.open(settings.store_target)
    yield s
    await s.close()


async def add(settings: Settings, store: SqliteScheduleStore, name: str, cron: str,
              now: datetime, **options: object) -> ScheduleRecord:
    new = service.check_new(default_registry(settings), "default", name, cron,
                            str(options.pop("timezone", "UTC")), "engine.sleep", SLEEP, now,
                            **options)  # type: ignore[arg-type]
    return await service.create(store, new, "test", now)


async def sched_tasks(client: Client, rec: ScheduleRecord) -> list[str]:
    return sorted(t.task_id for t in await client.list_tasks(name="engine.sleep", limit=1000)
                  if t.task_id.startswith(f"sched-{rec.schedule_id}-"))


async def test_every_minute_fires_once_per_slot_with_two_ticks_at_once(
    settings: Settings, store: SqliteScheduleStore, client: Client,
) -> None:
    clock = FakeClock(T0)
    rec = await add(settings, store, "every-minute", "* * * * *", clock())
    assert (await service.fire_due(store, client, clock()))["fired"] == []  # nothing due yet

    other_store = await SqliteScheduleStore.open(settings.store_target)
    try:
        async with await Client.open(settings) as other:
            for minute in (1, 2, 3):
                clock.now = T0.replace(second=0) + timedelta(minutes=minute, seconds=0.2)
                # Two workers' ticks at the same moment, each on its own connections.
                await asyncio.gather(service.fire_due(store, client, clock()),
                                     service.fire_due(other_store, other, clock()))
                await service.fire_due(store, client, clock())  # a third, late: nothing new
    finally:
        await other_store.close()

    expected = [f"sched-{rec.schedule_id}-20260101T12{m:02d}Z" for m in (1, 2, 3)]
    assert await sched_tasks(client, rec) == expected
    for task_id in expected:
        assert check_task_id(task_id) == task_id
    firings = await store.firings(rec.schedule_id)
    assert sorted(f.task_id or "" for f in firings) == expected  # one firing per slot
    assert {f.kind for f in firings} == {"cron"}
    assert (await store.get("default", "every-minute")).last_slot == datetime(  # type: ignore[union-attr]
        2026, 1, 1, 12, 3, tzinfo=UTC)


async def test_a_slot_is_recorded_once_by_ticks_at_once(
    settings: Settings, store: SqliteScheduleStore,
) -> None:
    """Two processes' ticks advancing the same schedule from the same read: exactly
    one moves the slot and records its firing; a firing written twice is one row."""
    rec = await add(settings, store, "race", "* * * * *", T0)
    slot = T0.replace(second=0) + timedelta(minutes=1)
    firing = FiringRecord(rec.schedule_id, "cron", slot, "t-1", slot)
    other_store = await SqliteScheduleStore.open(settings.store_target)
    try:
        moved = await asyncio.gather(*(s.advance(rec, slot, [firing])
                                       for s in (store, other_store) * 3))
        assert sorted(moved) == [False] * 5 + [True]
        await asyncio.gather(store.add_firing(firing), other_store.add_firing(firing))
    finally:
        await other_store.close()
    assert await store.firings(rec.schedule_id) == [firing]
    assert (await store.get("default", "race")).last_slot == slot  # type: ignore[union-attr]


async def test_slot_in_the_schedules_timezone(
    settings: Settings, store: SqliteScheduleStore, client: Client,
) -> None:
    clock = FakeClock(datetime(2026, 7, 1, 0, 0, tzinfo=UTC))
    rec = await add(settings, store, "berlin", "0 3 * * *", clock(), timezone="Europe/Berlin")
    assert service.next_run(rec, clock()) == datetime(2026, 7, 1, 1, 0, tzinfo=UTC)  # CEST
    clock.now = datetime(2026, 7, 1, 1, 0, 5, tzinfo=UTC)
    assert (await service.fire_due(store, client, clock()))["fired"] == [
        f"sched-{rec.schedule_id}-20260701T0100Z"]


async def test_a_paused_schedule_does_not_fire_and_resumes_from_now(
    settings: Settings, store: SqliteScheduleStore, client: Client,
) -> None:
    clock = FakeClock(T0)
    rec = await add(settings, store, "p", "* * * * *", clock(), catch_up=True)
    await service.pause(store, "default", "p", True, clock())
    clock.advance(minutes=10)
    assert (await service.fire_due(store, client, clock()))["fired"] == []
    assert service.to_json(await service.get(store, "default", "p"), clock())["next_run"] is None
    await service.pause(store, "default", "p", False, clock())  # resume at 12:10:30
    clock.advance(seconds=40)  # 12:11:10: only the 12:11 slot, no catch-up of the pause
    assert (await service.fire_due(store, client, clock()))["fired"] == [
        f"sched-{rec.schedule_id}-20260101T1211Z"]
    assert await sched_tasks(client, rec) == [f"sched-{rec.schedule_id}-20260101T1211Z"]


async def test_a_deleted_schedule_is_gone(
    settings: Settings, store: SqliteScheduleStore, client: Client,
) -> None:
    clock = FakeClock(T0)
    rec = await add(settings, store, "gone", "* * * * *", clock())
    await service.delete(store, "default", "gone")
    with pytest.raises(NotFound, match="no schedule named 'gone'"):
        await service.get(store, "default", "gone")
    clock.advance(minutes=1)
    assert (await service.fire_due(store, client, clock()))["fired"] == []
    assert await sched_tasks(client, rec) == []
    assert await store.firings(rec.schedule_id) == []


@pytest.mark.parametrize("catch_up", [False, True])
async def test_missed_slots_are_skipped_or_run_once(
    settings: Settings, store: SqliteScheduleStore, client: Client, catch_up: bool,
) -> None:
    clock = FakeClock(T0)
    rec = await add(settings, store, "hourly", "0 * * * *", clock(), catch_up=catch_up)
    clock.now = datetime(2026, 1, 1, 15, 30, tzinfo=UTC)  # no worker ran for 13:00-15:00
    outcome = await service.fire_due(store, client, clock())
    caught = f"sched-{rec.schedule_id}-20260101T1500Z"
    assert outcome["fired"] == ([caught] if catch_up else [])
    assert await sched_tasks(client, rec) == ([caught] if catch_up else [])
    [firing] = await store.firings(rec.schedule_id)
    assert (firing.kind, firing.slot) == ("catch-up" if catch_up else "skipped",
                                          datetime(2026, 1, 1, 15, tzinfo=UTC))
    clock.now = datetime(2026, 1, 1, 16, 0, 5, tzinfo=UTC)  # back to normal
    assert (await service.fire_due(store, client, clock()))["fired"] == [
        f"sched-{rec.schedule_id}-20260101T1600Z"]


async def test_a_slot_a_little_late_still_fires(
    settings: Settings, store: SqliteScheduleStore, client: Client,
) -> None:
    clock = FakeClock(T0)
    rec = await add(settings, store, "late", "* * * * *", clock())
    clock.now = datetime(2026, 1, 1, 12, 2, 50, tzinfo=UTC)  # a restart: 12:01 is 110 s late
    assert (await service.fire_due(store, client, clock()))["fired"] == [
        f"sched-{rec.schedule_id}-20260101T1201Z", f"sched-{rec.schedule_id}-20260101T1202Z"]


async def test_run_now_and_show(
    settings: Settings, store: SqliteScheduleStore, client: Client,
) -> None:
    clock = FakeClock(T0)
    rec = await add(settings, store, "manual", "0 0 1 1 *", clock(), paused=True)
    task = await service.run_now(store, client.enqueue, rec, clock())
    assert task.task_id == f"sched-{rec.schedule_id}-now-20260101T120030.000000Z"
    shown = await service.show(store, client.store, rec, clock())
    assert shown["paused"] is True and shown["next_run"] is None
    assert shown["firings"] == [{
        "kind": "run-now", "slot": "2026-01-01T12:00:30.000000+00:00", "task_id": task.task_id,
        "fired_at": "2026-01-01T12:00:30.000000+00:00", "status": "queued", "error": None}]


@pytest.mark.slow
async def test_two_real_workers_fire_each_slot_once(
    settings: Settings, store: SqliteScheduleStore, client: Client, make_worker: object,
) -> None:
    """The job schedules.fire_due twice at once on two workers (and their own cron
    entry besides): each due slot's task runs once."""
    now = utcnow()
    rec = ScheduleRecord("feedc0ffee000001", "default", "real", "* * * * *", "UTC",
                         "engine.sleep", SLEEP, False, False, "test", now - timedelta(seconds=90),
                         now)
    await store.create(rec)
    make_worker()  # type: ignore[operator]
    make_worker()  # type: ignore[operator]
    ticks = await asyncio.gather(*(client.enqueue("schedules.fire_due", {}) for _ in range(2)))
    for tick in ticks:
        done = await client.wait(tick.task_id, timeout=30)
        assert done.status == "succeeded", done.error
    expected = [service.slot_task_id(rec.schedule_id, s) for s in service.slots_back(
        "* * * * *", service.check_timezone("UTC"), rec.created_at, now, 5)]
    assert expected and set(await sched_tasks(client, rec)) >= set(expected)
    for task_id in await sched_tasks(client, rec):
        done = await client.wait(task_id, timeout=30)
        assert (done.status, done.attempts) == ("succeeded", 1)
    firings = await store.firings(rec.schedule_id)
    assert len({f.task_id for f in firings}) == len(firings)  # one firing per slot
