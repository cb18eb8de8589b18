"""Fixtures for KPS: a real local user with a password, and real OpenSSH sshd processes
(tests/kps/sshd_servers.py: one user, many sshd, each proven to own its port).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.settings import Settings
from tests.helpers import ROOT, WorkerProcess, dew_env, run_dew
from tests.kps.sshd_servers import (
    SSHD,
    RootSshd,
    Sshd,
    TestUser,
    create_user,
    delete_user,
    free_ports,
    start_pool,
    stop_pool,
)

__all__ = ["Sshd", "TestUser"]

POOL_SIZE = 20

KPS_TEST_SETTINGS = {"connect_timeout": 5.0, "login_timeout": 8.0, "command_timeout": 15.0,
                     "retries": 1, "retry_delay": 0.2, "concurrency": 50}

if not (os.geteuid() == 0 and Path(SSHD).exists() and shutil.which("useradd")):
    pytest.skip("KPS tests need root, useradd and openssh-server", allow_module_level=True)


@pytest.fixture(scope="session")
def ssh_user() -> Iterator[TestUser]:
    user = create_user()
    try:
        yield user
    finally:
        # DEW_KEEP_TEST_USER=1 keeps the user and its home, to read the sshd logs after.
        delete_user(user.name, keep=bool(os.environ.get("DEW_KEEP_TEST_USER")))


@pytest.fixture(scope="session")
def sshd_pool(ssh_user: TestUser) -> Iterator[list[Sshd]]:
    """POOL_SIZE sshd instances for the whole session (tests reset what they use)."""
    pool = start_pool(ssh_user, POOL_SIZE, ssh_user.home / "sshd")
    try:
        yield pool
    finally:
        stop_pool(pool)


@pytest.fixture
def sshds(sshd_pool: list[Sshd]) -> list[Sshd]:
    for s in sshd_pool:
        s.reset()
    return sshd_pool


@pytest.fixture(scope="session")
def sudo_user(ssh_user: TestUser) -> Iterator[TestUser]:
    """The test user with passwordless sudo (a sudoers drop-in, removed at teardown).
    Needs the Debian package ``sudo``."""
    assert shutil.which("sudo"), "install the Debian package 'sudo' (.ci/system-packages)"
    drop_in = Path(f"/etc/sudoers.d/dew-test-{ssh_user.name}")
    drop_in.write_text(f"{ssh_user.name} ALL=(ALL) NOPASSWD: ALL\n")
    drop_in.chmod(0o440)
    try:
        yield ssh_user
    finally:
        drop_in.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def root_sshd(ssh_user: TestUser) -> Iterator[RootSshd]:
    """One sshd run by root with a root-owned config (0644, in a root-owned 0755
    directory): the login user needs sudo to edit it or to reload sshd."""
    base = Path(f"/etc/dew-kps-test-{ssh_user.name}")
    sshd = RootSshd(ssh_user, free_ports(1)[0], base)
    sshd.setup()
    try:
        sshd.start_verified()
        yield sshd
    finally:
        sshd.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def kps_worker(kps_settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(kps_settings, tmp_path / "worker.out")
    proc.start()
    yield proc
    proc.stop()


def password_file(tmp: Path, password: str) -> Path:
    path = tmp / "password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


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
    host_key = [] if "--trust-first-use" in extra else ["--host-key-file",
                                                        str(sshd.host_key_pub)]
    dew_ok(settings, "servers", "add", name, "--host", "127.0.0.1", "--port", str(sshd.port),
           "--login-user", sshd.user.name, *host_key, "--authorized-keys",
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
        [sys.executable, "-m", "tests.kps.enqueue_sealed", name],
        input=json.dumps(args), env=dew_env(settings), cwd=ROOT, capture_output=True,
        text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]  # the task id (log lines may come first)
