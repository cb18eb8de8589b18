"""``make up`` / ``make down``: a private Redis (AOF, unix socket) and one worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import stack
from engine.client import Client
from engine.crypto import HsmConfig
from engine.redis_server import pid_alive
from engine.settings import Settings, load_settings
from tests.helpers import link_shared_token

pytestmark = pytest.mark.slow


def test_up_runs_jobs_and_down_stops_exactly_what_it_started(
    tmp_path: Path, hsm_config: HsmConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This process signs jobs with the session's token; the stack's worker checks
    # them with the same one.
    monkeypatch.setenv("DEW_HSM_TOKEN_LABEL", hsm_config.token_label)
    settings: Settings = link_shared_token(load_settings().replace(
        engine={"state_dir": tmp_path / "var"}, log={"console": "off"}
    ), hsm_config)
    assert settings.redis_url == f"unix://{tmp_path}/var/run/redis.sock"
    state = stack.up(settings)
    try:
        assert state.redis_pid and state.worker_pid
        assert stack.up(settings) == state  # idempotent: nothing started twice
        assert (settings.run_dir / "redis.pid").exists()

        async def echo() -> object:
            async with await Client.open(settings) as client:
                task = await client.enqueue("engine.sleep", {"seconds": 0.01})
                return (await client.wait(task.task_id, timeout=20)).result

        assert asyncio.run(echo()) == 0.01
        assert (settings.run_dir / "appendonlydir").is_dir()  # AOF is on
        # Private state: no file or directory another local user can read (the socket
        # is srwx------; everything else 0600 / 0700).
        loose = [f"{p} {oct(p.stat().st_mode & 0o777)}"
                 for p in [settings.state_dir, *settings.state_dir.rglob("*")]
                 if not p.is_symlink() and p.stat().st_mode & 0o077]
        assert loose == []
        assert {p.name for p in settings.state_dir.rglob("*")} >= {
            "dew.sqlite3", "dew.sqlite3-wal", "dew.log", "worker.out", "redis.pid",
            "worker.pid", "redis.sock", "appendonlydir"}
    finally:
        stopped = stack.down(settings)
    assert stopped.redis_pid is None and stopped.worker_pid is None
    assert not pid_alive(state.redis_pid) and not pid_alive(state.worker_pid)
    assert stack.down(settings) == stopped  # nothing left to stop
