"""Fixtures for KPS: a real local user with a password, and real OpenSSH sshd processes.

Each sshd runs *as the test user* on its own loopback port, with its own host key,
config (``StrictModes yes``, PAM password login) and ``AuthorizedKeysFile
.ssh/authorized_keys_<port>``, so many instances share one user. Running sshd as
that user lets a job edit the instance's sshd_config and reload it with
``kill -HUP <pid>`` (the server's reload command) as the login user, as root
would on a real server. PAM checks the password through ``unix_chkpwd``.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.redis_server import free_port
from engine.settings import Settings
from tests.helpers import ROOT, dew_env, run_dew

SSHD = "/usr/sbin/sshd"
POOL_SIZE = 20

KPS_TEST_SETTINGS = {"connect_timeout": 5.0, "login_timeout": 8.0, "command_timeout": 15.0,
                     "retries": 1, "retry_delay": 0.2, "concurrency": 50}

if not (os.geteuid() == 0 and Path(SSHD).exists() and shutil.which("useradd")):
    pytest.skip("KPS tests need root, useradd and openssh-server", allow_module_level=True)


@dataclass
class TestUser:
    name: str
    password: str
    uid: int
    gid: int
    home: Path


@dataclass
class Sshd:
    """One sshd instance on 127.0.0.1:port, running as the test user."""

    user: TestUser
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def host_key_pub(self) -> Path:
        return self.dir / "host_key.pub"

    @property
    def authorized_keys(self) -> Path:
        return self.user.home / ".ssh" / f"authorized_keys_{self.port}"

    @property
    def authorized_keys_setting(self) -> str:
        return f".ssh/authorized_keys_{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def reload_command(self) -> str:
        return f"kill -HUP {self.pid}"

    def base_config(self) -> str:
        return (
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir}/host_key\n"
            f"PidFile {self.dir}/sshd.pid\nAuthorizedKeysFile {self.authorized_keys_setting}\n"
            "StrictModes yes\nUsePAM yes\nPasswordAuthentication yes\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin no\nLogLevel VERBOSE\n"
            "MaxStartups 100:30:200\n"
        )

    def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(self.dir / "host_key")], check=True)
        self.config.write_text(self.base_config())
        _chown_tree(self.dir, self.user)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-f", str(self.config), "-E", str(self.dir / "log")],
            user=self.user.uid, group=self.user.gid, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_listening(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(8).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd on {self.port} did not start: {self.log()[-1000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        path = self.dir / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def reset(self) -> None:
        """Forget what earlier tests did: no key file, the original config (reloaded)."""
        self.authorized_keys.unlink(missing_ok=True)
        if self.config.read_text() != self.base_config():
            self.config.write_text(self.base_config())
            os.kill(self.pid, signal.SIGHUP)
            time.sleep(0.2)
            self.wait_listening()


def _chown_tree(path: Path, user: TestUser) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, user.uid, user.gid)


@pytest.fixture(scope="session")
def ssh_user() -> Iterator[TestUser]:
    name = "dewkps" + secrets.token_hex(3)
    password = "Pw-" + secrets.token_urlsafe(12)
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True)
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
        entry = pwd.getpwnam(name)
        home = Path(entry.pw_dir)
        (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
        os.chown(home / ".ssh", entry.pw_uid, entry.pw_gid)
        Path("/run/sshd").mkdir(exist_ok=True)
        yield TestUser(name, password, entry.pw_uid, entry.pw_gid, home)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)  # only this user's
        if not os.environ.get("DEW_KEEP_TEST_USER"):  # set it to read the sshd logs after
            subprocess.run(["userdel", "-r", "-f", name], check=False, capture_output=True)


@pytest.fixture(scope="session")
def sshd_pool(ssh_user: TestUser) -> Iterator[list[Sshd]]:
    """POOL_SIZE sshd instances for the whole session (tests reset what they use)."""
    pool = [Sshd(ssh_user, free_port(), ssh_user.home / "sshd" / f"i{i}")
            for i in range(POOL_SIZE)]
    try:
        for s in pool:
            s.setup()
            s.start()
        for s in pool:
            s.wait_listening()
        yield pool
    finally:
        for s in pool:
            s.stop()


@pytest.fixture
def sshds(sshd_pool: list[Sshd]) -> list[Sshd]:
    for s in sshd_pool:
        s.reset()
    return sshd_pool


@pytest.fixture
def kps_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.replace(kps=KPS_TEST_SETTINGS, hsm={"pool_size": 1})


def dew_ok(settings: Settings, *args: str) -> dict[str, object]:
    """Run ``dew ... --json`` and return its JSON (the command must succeed)."""
    done = run_dew(settings, *args, "--json")
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    data: dict[str, object] = json.loads(done.stdout)
    return data


def add_server(settings: Settings, name: str, sshd: Sshd, *extra: str) -> None:
    host_key = [] if "--trust-first-use" in extra else ["--host-key", str(sshd.host_key_pub)]
    dew_ok(settings, "servers", "add", name, "--host", "127.0.0.1", "--port", str(sshd.port),
           "--user", sshd.user.name, *host_key, "--authorized-keys",
           sshd.authorized_keys_setting, "--sshd-config", str(sshd.config),
           "--reload-command", sshd.reload_command, *extra)


def ssh_login(sshd: Sshd, key: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    """The real OpenSSH client, key only, host key pinned."""
    known = tmp / f"known_{sshd.port}"
    known.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key_pub.read_text()}")
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(sshd.port), "-o", "BatchMode=yes",
         "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}",
         "-o", "StrictHostKeyChecking=yes", "-o", "PasswordAuthentication=no",
         "-F", "/dev/null", f"{sshd.user.name}@127.0.0.1", "echo logged-in"],
        capture_output=True, text=True, timeout=30)


def ssh_password_probe(sshd: Sshd, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Which methods the server offers (BatchMode: no password is typed)."""
    known = tmp / f"known_{sshd.port}"
    known.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key_pub.read_text()}")
    return subprocess.run(
        ["ssh", "-p", str(sshd.port), "-o", "BatchMode=yes",
         "-o", "PreferredAuthentications=password", "-o", f"UserKnownHostsFile={known}",
         "-F", "/dev/null", f"{sshd.user.name}@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=30)


def enqueue_sealed(settings: Settings, name: str, args: dict[str, object]) -> str:
    """Seal ``auth`` and enqueue a job from another process (as another system would)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.keypairs.enqueue_sealed", name],
        input=json.dumps(args), env=dew_env(settings), cwd=ROOT, capture_output=True,
        text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
