"""kill -9 the worker in the middle of a 20-server bind; after a restart every server
has the key exactly once and every authorized_keys file is intact.

Also the fixture property this test once flaked on: every sshd of the pool owns its
port. Ports drawn with bind-to-0-and-close repeat now and then; an instance whose
port was taken exited while another instance answered in its place, so one server
of the 20 presented another's host key ("does not match the pinned key")."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from engine.settings import Settings
from tests.helpers import WorkerProcess, run_dew
from tests.kps.conftest import Sshd, TestUser, add_server, dew_ok, enqueue_sealed
from tests.kps.sshd_servers import PortLost
from tests.pg_store import store_rows

pytestmark = pytest.mark.slow


def test_killed_worker_mid_bind(kps_settings: Settings, sshds: list[Sshd],
                                tmp_path: Path) -> None:
    # Few servers at once, so the kill lands with some done and some not.
    s = kps_settings.replace(kps={"concurrency": 2})
    key = tmp_path / "k"
    dew_ok(s, "keypairs", "create", "k", "--managed", "--out", str(key))
    keep = {}
    for i, sshd in enumerate(sshds[:20]):
        add_server(s, f"s{i}", sshd)
        text = f"# server {i}\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsab" \
               f"gH5C9okWi0dh2l9GKJl other{i}\n"
        sshd.authorized_keys.write_text(text)
        os.chown(sshd.authorized_keys, sshd.user.uid, sshd.user.gid)
        sshd.authorized_keys.chmod(0o600)
        keep[i] = text
    first = WorkerProcess(s, tmp_path / "w1.out").start()
    task_id = enqueue_sealed(s, "kps.bind", {
        "keypair": "k", "servers": [f"s{i}" for i in range(20)],
        "auth": {"password": sshds[0].user.password}, "user": "root"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = store_rows(s.store_target, "SELECT COUNT(*) FROM kps_task_servers "
                          "WHERE task_id = ? AND status = 'succeeded'", task_id)
        done = int(str(rows[0][0])) if rows else 0
        if done >= 3:
            break
        time.sleep(0.05)
    first.kill()
    assert done < 20, "the kill came too late to prove anything"
    second = WorkerProcess(s, tmp_path / "w2.out").start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            shown = dew_ok(s, "tasks", "show", task_id)
            if shown["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.3)
        assert shown["status"] == "succeeded", shown
        assert shown["attempts"] == 2
        result = shown["result"]
        assert result["failed"] == 0, result  # type: ignore[index]
    finally:
        second.stop()
    public = Path(f"{key}.pub").read_text().split()[1]
    for i, sshd in enumerate(sshds[:20]):
        text = sshd.authorized_keys.read_text()
        assert text.count(public) == 1, (i, text)
        assert text.startswith(keep[i]), (i, text)
        assert len(text.splitlines()) == 3
        assert not list(sshd.authorized_keys.parent.glob(".dew.*"))  # no temp file left
    assert run_dew(s, "failures", "list", "--task-id", task_id, "--json").stdout.strip() == "[]"


def _presented_host_key(port: int) -> str:
    scan = subprocess.run(["ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", str(port),
                           "127.0.0.1"], capture_output=True, text=True, timeout=30)
    return " ".join(scan.stdout.split()[1:3])


def test_sshd_on_a_taken_port_is_moved(sshd_pool: list[Sshd], ssh_user: TestUser) -> None:
    taken = sshd_pool[0]
    dup = Sshd(ssh_user, taken.port, ssh_user.home / "sshd" / "dup")
    dup.setup()
    try:
        dup.start()
        # Something answers with an SSH banner on the port, but it is not this instance.
        with pytest.raises(PortLost):
            dup.wait_listening()
        dup.start_verified()
        assert dup.port != taken.port
        own = " ".join(dup.host_key_pub.read_text().split()[:2])
        assert _presented_host_key(dup.port) == own
        assert _presented_host_key(taken.port) == " ".join(
            taken.host_key_pub.read_text().split()[:2])
    finally:
        dup.stop()
    ports = [s.port for s in sshd_pool]
    assert len(set(ports)) == len(ports)
