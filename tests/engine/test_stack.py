"""``make up`` / ``make down``: a private Redis (AOF, unix socket) and one worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import stack
from engine.client import Client
from engine.redis_server import pid_alive
from engine.settings import Settings, load_settings

pytestmark = pytest.mark.slow


def test_up_runs_jobs_and_down_stops_exactly_what_it_started(tmp_path: Path) -> None:
    settings: Settings = load_settings().replace(
        engine={"state_dir": tmp_path / "var"}, log={"console": "off"}
    )
    assert settings.redis_url == f"unix://{tmp_path}/var/run/redis.sock"
    state = stack.up(settings)
    try:
        assert state.redis_pid and state.worker_pid
        assert stack.up(settings) == state  # idempotent: nothing started twice
        assert (settings.run_dir / "redis.pid").exists()

        async def echo() -> object:
            async with await Client.open(settings) as client:
                task = await client.enqueue("engine.echo", {"value": "up"})
                return (await client.wait(task.task_id, timeout=20)).result

        assert asyncio.run(echo()) == "up"
        assert (settings.run_dir / "appendonlydir").is_dir()  # AOF is on
    finally:
        stopped = stack.down(settings)
    assert stopped.redis_pid is None and stopped.worker_pid is None
    assert not pid_alive(state.redis_pid) and not pid_alive(state.worker_pid)
    assert stack.down(settings) == stopped  # nothing left to stop
