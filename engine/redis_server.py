"""A private ``redis-server`` process: for the local stack, the tests and the benchmarks.

The local stack (``make up``) runs it daemonized with AOF on and a unix socket
in the state directory; tests run it in the foreground on a free loopback port
with no persistence, so they can kill and restart it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import BackendUnavailable, ConfigError
from engine.private import PRIVATE_UMASK, private_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise ConfigError(
            "redis-server is not installed",
            fix="Run `make setup` (as root it runs `apt-get install -y redis-server`).",
        )
    return path


@dataclass
class RedisServer:
    directory: Path
    port: int = 0  # 0: unix socket only
    unix_socket: Path | None = None
    appendonly: bool = False
    pidfile: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # A TCP listener gets a password (any local user can reach a loopback port); it
    # goes to redis-server in a 0600 config file, not on its command line.
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://default:{self.password}@127.0.0.1:{self.port}/0"
        assert self.unix_socket is not None
        return f"unix://{self.unix_socket}"

    @property
    def config_file(self) -> Path:
        return self.directory / "redis.conf"

    def command(self, daemonize: bool) -> list[str]:
        cmd = [
            redis_binary(), *([str(self.config_file)] if self.port else []),
            "--bind", "127.0.0.1", "--port", str(self.port),
            "--dir", str(self.directory), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "yes" if daemonize else "no",
            "--logfile", str(self.directory / "redis.log"),
            "--protected-mode", "yes",
        ]
        if self.unix_socket is not None:
            cmd += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        if self.pidfile is not None:
            cmd += ["--pidfile", str(self.pidfile)]
        return cmd

    def start(self, daemonize: bool = False, timeout: float = 10.0) -> None:
        if self.unix_socket is not None and len(str(self.unix_socket)) > 100:
            raise ConfigError(
                f"the Redis socket path {self.unix_socket} is too long for a unix socket",
                fix="Use a shorter DEW_STATE_DIR, or set DEW_REDIS_URL to a redis:// address.",
            )
        private_dir(self.directory)
        if self.port:
            fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as conf:
                conf.write(f"requirepass {self.password}\n")
        if daemonize:
            subprocess.run(self.command(daemonize=True), check=True, capture_output=True,
                           umask=PRIVATE_UMASK)
        else:
            self.process = subprocess.Popen(
                self.command(daemonize=False), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, umask=PRIVATE_UMASK,
            )
        self.wait_ready(timeout)

    def ping(self) -> bool:
        try:
            if self.port:
                conn = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            else:
                assert self.unix_socket is not None
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.settimeout(0.5)
                conn.connect(str(self.unix_socket))
            with conn:
                auth = f"AUTH {self.password}\r\n".encode() if self.port else b""
                conn.sendall(auth + b"PING\r\n")
                return b"+PONG" in conn.recv(64)
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        log = self.directory / "redis.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        raise BackendUnavailable(
            f"redis-server did not start at {self.url}", cause=" ".join(tail)
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the server (SIGKILL simulates a crash: no persistence means data lost)."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(sig)
                self.process.wait(timeout)
            self.process = None
        elif self.pidfile is not None and self.pidfile.exists():
            pid = int(self.pidfile.read_text().strip())
            stop_pid(pid, sig, timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 10.0) -> bool:
    """Signal ``pid`` and wait for it to go; SIGKILL it after ``timeout``. True if it was alive."""
    if not pid_alive(pid):
        return False
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
            if done == pid:
                return True
        except ChildProcessError:
            pass
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True
