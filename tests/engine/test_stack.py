"""``make up`` / ``make down``: a private Redis (AOF, unix socket), one worker, the API."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import requests

from engine import stack
from engine.client import Client
from engine.crypto import HsmConfig
from engine.errors import BackendUnavailable
from engine.redis_server import free_port, pid_alive
from engine.settings import Settings, load_settings
from tests.helpers import link_shared_token

pytestmark = pytest.mark.slow


def test_up_runs_jobs_and_down_stops_exactly_what_it_started(
    tmp_path: Path, hsm_config: HsmConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This process signs jobs with the session's token; the stack's worker checks
    # them with the same one.
    monkeypatch.setenv("DEW_HSM_TOKEN_LABEL", hsm_config.token_label)
    listen = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("DEW_API_LISTEN", listen)  # what the stack's `dew api` reads
    settings: Settings = link_shared_token(load_settings().replace(
        engine={"state_dir": tmp_path / "var"}, log={"console": "off"}
    ), hsm_config)
    assert settings.redis_url == f"unix://{tmp_path}/var/run/redis.sock"
    state = stack.up(settings)
    try:
        assert state.redis_pid and state.worker_pid and state.api_pid
        assert stack.up(settings) == state  # idempotent: nothing started twice
        assert (settings.run_dir / "redis.pid").exists()
        assert state.lines()[2] == f"api:    running (pid {state.api_pid})"
        # The API answers over TLS with its local CA (an unsigned call: 401, error shape).
        with requests.Session() as http:
            http.trust_env = False
            reply = http.get(f"https://{listen}/v1/p/kms/tags",
                             verify=str(settings.state_dir / "tls" / "ca.pem"))
        assert reply.status_code in (401, 404)
        assert reply.json()["request_id"] == reply.headers["X-Request-Id"]
        out = (settings.log_file.parent / "api.out").read_text()
        assert f"dew api listening on https://{listen} (CA: " in out

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
            "worker.pid", "redis.sock", "appendonlydir", "api.out", "api.pid", "ca.pem",
            "ca-key.pem", "server.pem", "server-key.pem"}
    finally:
        stopped = stack.down(settings)
    assert stopped.redis_pid is None and stopped.worker_pid is None and stopped.api_pid is None
    assert not pid_alive(state.redis_pid) and not pid_alive(state.worker_pid)
    assert not pid_alive(state.api_pid)
    assert stack.down(settings) == stopped  # nothing left to stop
    assert "Application shutdown complete." in settings.log_file.read_text()


def test_up_reports_an_api_that_cannot_start(
    tmp_path: Path, hsm_config: HsmConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEW_HSM_TOKEN_LABEL", hsm_config.token_label)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("DEW_API_LISTEN", f"127.0.0.1:{taken.getsockname()[1]}")
        settings: Settings = link_shared_token(load_settings().replace(
            engine={"state_dir": tmp_path / "var"}, log={"console": "off"}
        ), hsm_config)
        try:
            with pytest.raises(BackendUnavailable, match=r"the API exited at start-up: dew: "
                               r"error: cannot listen on 127.0.0.1:.*Address already in use"):
                stack.up(settings)
            state = stack.status(settings)
            assert state.api_pid is None and state.worker_pid and state.redis_pid
        finally:
            stack.down(settings)
