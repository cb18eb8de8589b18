"""The local stack behind ``make up`` / ``make down``: a private Redis, one worker, the API.

They run in the background with pid files under ``STATE_DIR/run`` and their
terminal output in ``STATE_DIR/logs/{worker,api}.out``; ``down`` stops exactly
those processes and nothing else (the API first, then the worker, then Redis).
The private Redis (AOF on, a unix socket, no TCP port) is started only when
``redis.url`` and ``redis.sentinels`` are empty; with a configured Redis (or
Sentinels) only the worker and the API are.
``up`` returns once the worker beats and the API's port answers.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from engine.errors import BackendUnavailable
from engine.models import utcnow
from engine.private import PRIVATE_UMASK, private_dir, private_files
from engine.redis_server import RedisServer, pid_alive, stop_pid
from engine.settings import Settings
from engine.store import open_store


@dataclass(frozen=True)
class StackStatus:
    redis_pid: int | None
    worker_pid: int | None
    api_pid: int | None = None

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {name: {"running": pid is not None, "pid": pid} for name, pid in
                (("redis", self.redis_pid), ("worker", self.worker_pid), ("api", self.api_pid))}

    def lines(self) -> list[str]:
        def show(pid: int | None) -> str:
            return f"running (pid {pid})" if pid else "stopped"

        return [f"redis:  {show(self.redis_pid)}", f"worker: {show(self.worker_pid)}",
                f"api:    {show(self.api_pid)}"]


def private_redis(settings: Settings) -> RedisServer:
    run = settings.run_dir.resolve()
    return RedisServer(
        directory=run, unix_socket=run / "redis.sock", appendonly=True,
        pidfile=run / "redis.pid",
    )


def _pid(path_name: str, settings: Settings) -> int | None:
    path = settings.run_dir / path_name
    if not path.exists():
        return None
    try:
        pid = int(path.read_text().strip())
    except ValueError:
        return None
    return pid if pid_alive(pid) else None


def status(settings: Settings) -> StackStatus:
    return StackStatus(_pid("redis.pid", settings), _pid("worker.pid", settings),
                       _pid("api.pid", settings))


def up(settings: Settings, config_file: str | None = None, timeout: float = 20.0) -> StackStatus:
    private_dir(settings.state_dir)
    private_dir(settings.run_dir)
    private_dir(settings.log_file.parent)
    if settings.private_redis and status(settings).redis_pid is None:
        private_redis(settings).start(daemonize=True)
    if status(settings).worker_pid is None:
        proc = _start(settings, "worker", config_file)
        _wait_for_worker(settings, proc, timeout)
    if status(settings).api_pid is None:
        out = settings.log_file.parent / "api.out"
        offset = out.stat().st_size if out.exists() else 0
        proc = _start(settings, "api", config_file)
        _wait_for_api(settings, proc, offset, timeout)
    return status(settings)


def _start(settings: Settings, command: str, config_file: str | None) -> subprocess.Popen[bytes]:
    """``dew COMMAND`` in the background: output to logs/COMMAND.out, pid in run/COMMAND.pid."""
    env = dict(os.environ, DEW_STATE_DIR=str(settings.state_dir.resolve()))
    out_path = settings.log_file.parent / f"{command}.out"
    out = out_path.open("ab")
    private_files(out_path)
    config = ["--config", str(Path(config_file).resolve())] if config_file else []
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *config, command], env=env, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            umask=PRIVATE_UMASK,
        )
    finally:
        out.close()
    pid_file = settings.run_dir / f"{command}.pid"
    pid_file.write_text(f"{proc.pid}\n")
    private_files(pid_file)
    return proc


def down(settings: Settings) -> StackStatus:
    # The API first (its calls may still enqueue), then the worker, then Redis.
    for name in ("api", "worker"):
        pid = _pid(f"{name}.pid", settings)
        if pid is not None:
            stop_pid(pid, timeout=15)
        (settings.run_dir / f"{name}.pid").unlink(missing_ok=True)
    if settings.private_redis:
        redis = _pid("redis.pid", settings)
        if redis is not None:
            stop_pid(redis, timeout=15)
    return status(settings)


LISTENING = re.compile(r"dew api listening on https?://\[?([^\]\s]*?)\]?:([0-9]+) ")


def _wait_for_api(settings: Settings, proc: subprocess.Popen[bytes], offset: int,
                  timeout: float) -> None:
    """Wait until the new API process says it listens (in its part of api.out) and
    its port answers."""
    out = settings.log_file.parent / "api.out"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            (settings.run_dir / "api.pid").unlink(missing_ok=True)
            lines = _new_output(out, offset).strip().splitlines()
            said = [line for line in lines if line.startswith("dew: error:")] or lines
            raise BackendUnavailable("the API exited at start-up" + (
                f": {said[-1]}" if said else ""), fix=f"Read {out}.")
        match = LISTENING.search(_new_output(out, offset))
        if match is not None:
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(match[1], match[1])
            try:
                socket.create_connection((host, int(match[2])), timeout=0.5).close()
                return
            except OSError:
                pass
        time.sleep(0.1)
    raise BackendUnavailable("the API did not start in time", fix=f"Read {out}.")


def _new_output(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(65536).decode(errors="replace")
    except OSError:
        return ""


def _wait_for_worker(settings: Settings, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until the new worker writes its first heartbeat."""

    async def beating() -> bool:
        store = await open_store(settings)
        try:
            since = utcnow() - timedelta(seconds=settings.worker.heartbeat_timeout)
            return any(f":{proc.pid}:" in w for w in await store.live_workers(since))
        finally:
            await store.close()

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BackendUnavailable(
                "the worker exited at start-up",
                fix=f"Read {settings.log_file.parent / 'worker.out'}.",
            )
        if asyncio.run(beating()):
            return
        time.sleep(0.2)
    raise BackendUnavailable("the worker did not start in time",
                             fix=f"Read {settings.log_file.parent / 'worker.out'}.")
