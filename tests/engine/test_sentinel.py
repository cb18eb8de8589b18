"""Redis Sentinel (``[redis] sentinels``): settings, connection, and a real failover.

The failover test runs a private master (``requirepass``), a replica of it and one
Sentinel watching it (quorum 1), all on loopback ports, and a ``dew worker`` and a
client that know only the Sentinel's address. The master is SIGKILLed: Sentinel
promotes the replica, and the worker and the client follow it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from engine.api.operations import MANAGE
from engine.api.ratelimit import OverLimit, RateLimits, sentinel_uri
from engine.client import Client
from engine.errors import BackendUnavailable, ConfigError, exit_code
from engine.queue import FAILOVER_WAIT, Queue, redis_settings, redis_where
from engine.redis_server import free_port, redis_binary
from engine.services import default_config_text
from engine.settings import Settings, build_settings
from tests.helpers import ROOT, WorkerProcess, dew_env

DEFAULTS = default_config_text()
MASTER = "dewmaster"


# -- settings ---------------------------------------------------------------------------

def test_sentinel_settings_from_toml_and_environment() -> None:
    s = build_settings(DEFAULTS)
    assert (s.redis.sentinels, s.redis.sentinel_master, s.private_redis) == ((), "mymaster", True)
    s = build_settings(DEFAULTS, '[redis]\nsentinels = ["10.0.0.1:26379", "[fd00::2]:26380"]\n'
                       'sentinel_master = "queue-1"\n')
    assert s.redis.sentinels == ("10.0.0.1:26379", "[fd00::2]:26380")
    assert (s.redis.sentinel_master, s.private_redis) == ("queue-1", False)
    s = build_settings(DEFAULTS, environ={"DEW_REDIS_SENTINELS": "a:1, b:2,",
                                          "DEW_REDIS_SENTINEL_MASTER": "m"})
    assert (s.redis.sentinels, s.redis.sentinel_master) == (("a:1", "b:2"), "m")


@pytest.mark.parametrize(("config", "environ", "message"), [
    ('[redis]\nsentinels = ["10.0.0.1"]\n', {}, "redis.sentinels: each entry must be host:port"),
    (None, {"DEW_REDIS_SENTINELS": "h:0"}, "redis.sentinels: each entry must be host:port"),
    (None, {"DEW_REDIS_SENTINELS": "h:65536"}, "redis.sentinels: each entry must be host:port"),
    (None, {"DEW_REDIS_SENTINELS": "h:26379/x"}, "redis.sentinels: each entry must be host:port"),
    ('[redis]\nsentinels = 26379\n', {}, "redis.sentinels must be a list of strings"),
    (None, {"DEW_REDIS_SENTINELS": "h:1", "DEW_REDIS_URL": "redis://h:6379/0"},
     "redis.url and redis.sentinels exclude each other"),
    (None, {"DEW_REDIS_SENTINEL_MASTER": "my master"}, "redis.sentinel_master must be"),
    (None, {"DEW_REDIS_SENTINEL_MASTER": ""}, "redis.sentinel_master must be"),
])
def test_bad_sentinel_settings(config: str | None, environ: dict[str, str],
                               message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        build_settings(DEFAULTS, config, environ=environ)
    assert exit_code(caught.value) == 2


def test_redis_settings_with_sentinels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = build_settings(DEFAULTS, environ={"DEW_REDIS_SENTINELS": "10.0.0.1:26379,[::1]:26380",
                                          "DEW_REDIS_SENTINEL_MASTER": MASTER})
    monkeypatch.delenv("DEW_REDIS_PASSWORD", raising=False)
    # Sentinels are reached over TCP, so is the master they name: it needs a password.
    with pytest.raises(ConfigError, match=f"Redis master '{MASTER}' of the Sentinels "
                       r"10.0.0.1:26379, \[::1\]:26380 is reached over TCP without a password"):
        redis_settings(s)
    monkeypatch.setenv("DEW_REDIS_PASSWORD", "s3cret")
    rs = redis_settings(s)
    assert (rs.host, rs.sentinel, rs.sentinel_master) == (
        [("10.0.0.1", 26379), ("::1", 26380)], True, MASTER)
    assert (rs.password, rs.database, rs.conn_timeout, rs.retry is not None) == (
        "s3cret", 0, 2, True)
    monkeypatch.delenv("DEW_REDIS_PASSWORD")
    secret = tmp_path / "redis.pw"
    secret.write_text("from-file\n")
    secret.chmod(0o600)
    assert redis_settings(s.replace(redis={"password_file": str(secret)})).password == "from-file"
    assert redis_where(s) == (f"Redis master '{MASTER}' of the Sentinels 10.0.0.1:26379, "
                              "[::1]:26380")
    assert sentinel_uri(s.redis.sentinels, MASTER) == (
        f"async+redis+sentinel://10.0.0.1:26379,[::1]:26380/{MASTER}")


async def test_no_sentinel_answering_fails_at_once(settings: Settings,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No Sentinel answers: Redis is down for us, and the caller hears so at once (no
    failover wait), in one line naming the Sentinels and the master."""
    monkeypatch.setenv("DEW_REDIS_PASSWORD", "unused")
    s = settings.replace(redis={"url": "", "sentinels": [f"127.0.0.1:{free_port()}"],
                                "sentinel_master": MASTER})
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"Redis master '{MASTER}' of the Sentinels "
                       "127.0.0.1:[0-9]+ cannot be reached") as caught:
        await Queue.connect(s)
    assert time.monotonic() - started < FAILOVER_WAIT / 2
    assert "no Sentinel answers" in (caught.value.cause or "")


def test_worker_says_which_sentinels(settings: Settings) -> None:
    sentinel = f"127.0.0.1:{free_port()}"
    s = settings.replace(redis={"url": "", "sentinels": [sentinel], "sentinel_master": MASTER})
    done = subprocess.run([sys.executable, "-m", "engine.cli", "worker"], cwd=ROOT,
                          env=dew_env(s, DEW_REDIS_PASSWORD="unused"), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("dew: error:")]
    assert said and f"Redis master '{MASTER}' of the Sentinels {sentinel} cannot be " \
        "reached" in said[0], done.stderr
    assert "Traceback" not in done.stderr


# -- a real failover --------------------------------------------------------------------

@dataclass
class RedisProcess:
    """One redis-server (or Sentinel) in the foreground, configured by a 0600 file."""

    directory: Path
    port: int
    lines: list[str]
    sentinel: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "redis.conf"  # Sentinel rewrites its file: writable
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join([
                f"port {self.port}", "bind 127.0.0.1", "protected-mode yes",
                f"dir {self.directory}", f"logfile {self.directory / 'redis.log'}",
                *([] if self.sentinel else ['save ""', "appendonly no"]), *self.lines, ""]))
        self.process = subprocess.Popen(
            [redis_binary(), str(conf), *(["--sentinel"] if self.sentinel else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            (self.process.kill if kill else self.process.terminate)()
            self.process.wait(10)


@dataclass
class SentinelSet:
    master: RedisProcess
    replica: RedisProcess
    sentinel: RedisProcess
    password: str

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.password,
                           socket_timeout=2, decode_responses=True)

    def replication(self, port: int) -> dict[str, Any]:
        with self.client(port) as r:
            return cast(dict[str, Any], r.info("replication"))

    def named_master(self) -> int | None:
        """The master's port, as the Sentinel names it."""
        with redis.Redis(host="127.0.0.1", port=self.sentinel.port, socket_timeout=2) as s:
            addr = s.sentinel_get_master_addr_by_name(MASTER)
        return int(addr[1]) if addr else None

    def stop(self) -> None:
        for proc in (self.sentinel, self.replica, self.master):
            proc.stop()


def until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    password = secrets.token_urlsafe(24)
    ports = [free_port() for _ in range(3)]
    while len(set(ports)) < 3:  # free_port may hand out a port twice
        ports = [free_port() for _ in range(3)]
    # The same password on both (the replica may be promoted); a replica's first sync
    # starts at once (Redis 7 waits 5 s for more replicas by default).
    auth = [f"requirepass {password}", f"masterauth {password}", "repl-diskless-sync-delay 0"]
    master = RedisProcess(tmp_path / "master", ports[0], auth).start()
    replica = RedisProcess(tmp_path / "replica", ports[1],
                           [*auth, f"replicaof 127.0.0.1 {ports[0]}"]).start()
    sentinel = RedisProcess(tmp_path / "sentinel", ports[2], [
        f"sentinel monitor {MASTER} 127.0.0.1 {ports[0]} 1",
        f"sentinel auth-pass {MASTER} {password}",
        # Longer than a command's own retries (about 3 s): the wait for the new
        # master (engine.queue.FAILOVER_WAIT) is what carries the worker through.
        f"sentinel down-after-milliseconds {MASTER} 3000",
        f"sentinel failover-timeout {MASTER} 5000",
    ], sentinel=True)
    found = SentinelSet(master, replica, sentinel, password)
    try:
        def replica_in_sync() -> bool:
            try:
                return found.replication(replica.port).get("master_link_status") == "up"
            except redis.RedisError:
                return False

        until("the replica syncs with the master", replica_in_sync, 15)
        sentinel.start()

        def sentinel_knows_replica() -> bool:
            try:
                with redis.Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=2) as s:
                    return bool(s.sentinel_slaves(MASTER))
            except redis.RedisError:
                return False

        until("the Sentinel sees the replica", sentinel_knows_replica, 15)
        assert found.named_master() == master.port
        yield found
    finally:
        found.stop()


async def test_wrong_master_password_fails_without_waiting(
    settings: Settings, sentinel_set: SentinelSet, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Sentinels answer and name a live master that refuses the password: no
    failover mends that, so no failover wait either."""
    monkeypatch.setenv("DEW_REDIS_PASSWORD", "not-the-password-7q")
    s = settings.replace(redis={"url": "", "sentinels": [
        f"127.0.0.1:{sentinel_set.sentinel.port}"], "sentinel_master": MASTER})
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"Redis master '{MASTER}' of the "
                       "Sentinels 127.0.0.1:[0-9]+ cannot be reached") as caught:
        await Queue.connect(s)
    assert time.monotonic() - started < FAILOVER_WAIT / 2
    assert "AuthenticationError" in (caught.value.cause or "")
    assert "not-the-password-7q" not in str(caught.value.to_dict())


@pytest.mark.slow
async def test_worker_and_client_follow_a_sentinel_failover(
    settings: Settings, sentinel_set: SentinelSet, tmp_path: Path,
) -> None:
    secret = tmp_path / "redis.pw"
    secret.write_text(sentinel_set.password + "\n")
    secret.chmod(0o600)
    # Only the Sentinel's address: no URL, no master port anywhere.
    s = settings.replace(redis={
        "url": "", "sentinels": [f"127.0.0.1:{sentinel_set.sentinel.port}"],
        "sentinel_master": MASTER, "password_file": str(secret)})
    worker = WorkerProcess(s, tmp_path / "worker.out").start()
    try:
        async with await Client.open(s) as client:
            first = await client.enqueue("engine.echo", {"value": 1})
            assert (await client.wait(first.task_id, timeout=20)).status == "succeeded"

            # The API's rate limits count in the same master, found the same way.
            limits = RateLimits(s.replace(api={"rate_manage": "2/minute"}))
            try:
                await limits.check("p1", MANAGE)
                await limits.check("p1", MANAGE)
                with pytest.raises(OverLimit):
                    await limits.check("p1", MANAGE)
            finally:
                await limits.close()
            with sentinel_set.client(sentinel_set.master.port) as r:
                assert r.keys("dew:api-limits:*")

            sentinel_set.master.stop(kill=True)  # SIGKILL: no goodbye to anyone
            # Enqueued while the Sentinel promotes the replica: the push waits for it.
            during = await client.enqueue("engine.echo", {"value": 2})
            until("the Sentinel promotes the replica",
                  lambda: sentinel_set.named_master() == sentinel_set.replica.port, 15)
            assert sentinel_set.replication(sentinel_set.replica.port)["role"] == "master"

            after = await client.enqueue("engine.echo", {"value": 3})
            for task in (during, after):
                done = await client.wait(task.task_id, timeout=20)
                assert (done.status, done.attempts) == ("succeeded", 1), done
        # The worker that ran them is the one started before the failover.
        assert worker.proc is not None and worker.proc.poll() is None, \
            (tmp_path / "worker.out").read_text()[-2000:]
    finally:
        worker.stop()
