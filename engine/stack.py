"""The local stack behind ``make up`` / ``make down``: a private Redis and one worker.

Both run in the background with pid files under ``STATE_DIR/run``; ``down``
stops exactly those processes and nothing else. The private Redis (AOF on, a
unix socket, no TCP port) is started only when ``redis.url`` is empty; with a
configured Redis only the worker is started.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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

    def lines(self) -> list[str]:
        def show(pid: int | None) -> str:
            return f"running (pid {pid})" if pid else "stopped"

        return [f"redis:  {show(self.redis_pid)}", f"worker: {show(self.worker_pid)}"]


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
    return StackStatus(_pid("redis.pid", settings), _pid("worker.pid", settings))


def up(settings: Settings, config_file: str | None = None, timeout: float = 20.0) -> StackStatus:
    private_dir(settings.state_dir)
    private_dir(settings.run_dir)
    private_dir(settings.log_file.parent)
    if not settings.redis.url and status(settings).redis_pid is None:
        private_redis(settings).start(daemonize=True)
    if status(settings).worker_pid is None:
        env = dict(os.environ, DEW_STATE_DIR=str(settings.state_dir.resolve()))
        out = (settings.log_file.parent / "worker.out").open("ab")
        private_files(settings.log_file.parent / "worker.out")
        config = ["--config", str(Path(config_file).resolve())] if config_file else []
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *config, "worker"], env=env, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            umask=PRIVATE_UMASK,
        )
        (settings.run_dir / "worker.pid").write_text(f"{proc.pid}\n")
        private_files(settings.run_dir / "worker.pid")
        _wait_for_worker(settings, proc, timeout)
    return status(settings)


def down(settings: Settings) -> StackStatus:
    worker = _pid("worker.pid", settings)
    if worker is not None:
        stop_pid(worker, timeout=15)
    (settings.run_dir / "worker.pid").unlink(missing_ok=True)
    if not settings.redis.url:
        redis = _pid("redis.pid", settings)
        if redis is not None:
            stop_pid(redis, timeout=15)
    return status(settings)


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
