"""Test helpers: settings as environment variables, and a worker in a subprocess."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from engine.crypto import HsmConfig
from engine.settings import Settings
from tests.pg_store import store_rows

ROOT = Path(__file__).resolve().parent.parent


def link_shared_token(settings: Settings, config: HsmConfig) -> Settings:
    """Settings whose STATE/hsm points subprocesses at this process's token."""
    hsm = settings.state_dir / "hsm"
    hsm.mkdir(parents=True, exist_ok=True, mode=0o700)
    assert config.softhsm_conf is not None and config.pin_file is not None
    # A link, not a copy: in this process the module is already loaded with that file.
    (hsm / "softhsm2.conf").unlink(missing_ok=True)
    (hsm / "softhsm2.conf").symlink_to(config.softhsm_conf.resolve())
    shutil.copy(config.pin_file, hsm / "user.pin")
    (hsm / "user.pin").chmod(0o600)
    return settings.replace(hsm={"token_label": config.token_label})


class FakeClock:
    """A clock tests move by hand (no sleeping)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as a DEW_<SECTION>_<KEY> variable, for a subprocess."""
    env: dict[str, str] = {}
    for name, values in settings.sections().items():
        for key in dataclasses.fields(values):
            value = getattr(values, key.name)
            text = ",".join(value) if isinstance(value, tuple) else str(value)
            env[f"DEW_{name}_{key.name}".upper()] = text
    return env


def dew_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEW_")}
    env.update(settings_env(settings))
    env.update(extra)
    return env


def run_dew(settings: Settings, *args: str, input: str | None = None,
            timeout: float = 60, env_extra: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], env=dew_env(settings, **(env_extra or {})),
        cwd=ROOT,
        capture_output=True, text=True, input=input, timeout=timeout,
    )


def stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to a process still running and wait for it (SIGKILL after 20 s)."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class WorkerProcess:
    """``dew worker`` in a subprocess, as operators run it."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "worker"], env=dew_env(self.settings),
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_beating()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_beating(self, timeout: float = 20) -> None:
        """Wait for the worker's first heartbeat (read behind the store's back: works
        in sync and async tests alike)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log_path.read_text()[-2000:]}")
            rows = store_rows(self.settings.store_target, "SELECT worker_id FROM workers")
            if any(f":{self.pid}:" in str(r[0]) for r in rows):
                return
            time.sleep(0.1)
        raise RuntimeError("worker did not start")

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)
        self.proc = None


async def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Await ``predicate()`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s (last value {value!r})")
        await asyncio.sleep(interval)
