"""bind / unbind / replace / reset on real sshd, proven with the real OpenSSH client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import redis

from engine.settings import Settings
from tests.csms.store_helpers import stored_bytes
from tests.helpers import WorkerProcess, run_dew
from tests.kps.conftest import (
    Sshd,
    add_server,
    dew_ok,
    enqueue_sealed,
    password_file,
    ssh_login,
    ssh_password_probe,
)

pytestmark = pytest.mark.slow


def _failures(settings: Settings, task_id: str) -> dict[str, dict[str, object]]:
    done = run_dew(settings, "failures", "list", "--task-id", task_id, "--json")
    assert done.returncode == 0, done.stderr
    return {str(r["target"]): r for r in json.loads(done.stdout)}


def test_bind_login_idempotent_unbind_and_password_switch(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    s = kps_settings
    a, b = sshds[0], sshds[1]
    # A file with lines of its own, a comment and no final newline: kept byte for byte.
    a.authorized_keys.write_text("# keep me\r\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0"
                                 "SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl other\n\nno-newline-junk")
    original = a.authorized_keys.read_bytes()
    os.chown(a.authorized_keys, a.user.uid, a.user.gid)
    a.authorized_keys.chmod(0o600)
    key = tmp_path / "k1"
    created = dew_ok(s, "keypairs", "create", "k1", "--managed", "--out", str(key))
    keygen = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert keygen == created["keygen"]
    add_server(s, "a", a)
    add_server(s, "b", b, "--trust-first-use")
    pw = password_file(tmp_path, a.user.password)
    assert ssh_login(a, key, tmp_path).returncode != 0

    out = dew_ok(s, "keypairs", "bind", "k1", "--server", "a", "--server", "b",
                 "--password-file", str(pw))
    assert out["succeeded"] == 2 and out["failed"] == 0, out
    assert all(r["verified"] for r in out["servers"])  # type: ignore[union-attr]
    for server in (a, b):
        login = ssh_login(server, key, tmp_path)
        assert login.returncode == 0 and "logged-in" in login.stdout, login.stderr
        assert server.authorized_keys.stat().st_mode & 0o777 == 0o600
        assert server.authorized_keys.stat().st_uid == server.user.uid
    assert (a.user.home / ".ssh").stat().st_mode & 0o777 == 0o700
    assert a.authorized_keys.read_bytes().startswith(original + b"\n")
    shown = dew_ok(s, "servers", "show", "b")
    assert shown["host_key"] and shown["keypairs"] == ["k1"]  # pinned on first use

    # Twice: added once.
    again = dew_ok(s, "keypairs", "bind", "k1", "--server", "a", "--password-file", str(pw))
    assert again["servers"][0]["changed"] is False  # type: ignore[index]
    public = Path(f"{key}.pub").read_text().split()[1]
    assert a.authorized_keys.read_text().count(public) == 1
    assert run_dew(s, "keypairs", "delete", "k1").returncode == 1  # refused while bound

    # Password off: the real client is offered publickey only; then on again.
    off = dew_ok(s, "keypairs", "bind", "k1", "--server", "a", "--password-file", str(pw),
                 "--disable-password")
    # Not redacted (audit L4): the field is not named like a password.
    assert off["servers"][0]["pw_login_state"] == "changed", off  # type: ignore[index]
    probe = ssh_password_probe(a, tmp_path)
    assert "Permission denied (publickey)" in probe.stderr, probe.stderr
    assert ssh_login(a, key, tmp_path).returncode == 0

    # Unbind (with its own private key) and password on again.
    out = dew_ok(s, "keypairs", "unbind", "k1", "--server", "a", "--server", "b",
                 "--private-key", str(key), "--enable-password")
    assert out["succeeded"] == 2, out
    assert ssh_login(a, key, tmp_path).returncode != 0
    assert ssh_login(b, key, tmp_path).returncode != 0
    # The bind gave the last line its missing newline; every byte else is as it was.
    assert a.authorized_keys.read_bytes() == original + b"\n"
    probe = ssh_password_probe(a, tmp_path)
    assert "Permission denied (publickey,password)" in probe.stderr, probe.stderr
    dew_ok(s, "keypairs", "delete", "k1")


def test_replace_and_reset(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    s = kps_settings
    a = sshds[2]
    old, new, newer = tmp_path / "old", tmp_path / "new", tmp_path / "newer"
    dew_ok(s, "keypairs", "create", "old", "--out", str(old))  # not managed: never stored
    dew_ok(s, "keypairs", "create", "new", "--managed", "--algorithm", "ECDSA_NISTP256",
           "--out", str(new))
    dew_ok(s, "keypairs", "create", "newer", "--managed", "--algorithm", "SSH_RSA_2048",
           "--out", str(newer))
    add_server(s, "a", a)
    pw = password_file(tmp_path, a.user.password)
    dew_ok(s, "keypairs", "bind", "old", "--server", "a", "--password-file", str(pw))
    assert ssh_login(a, old, tmp_path).returncode == 0
    # replace: authenticate with the old private key; the old key is refused after.
    out = dew_ok(s, "keypairs", "replace", "new", "--server", "a", "--private-key", str(old))
    assert out["succeeded"] == 1, out
    assert ssh_login(a, new, tmp_path).returncode == 0
    assert ssh_login(a, old, tmp_path).returncode != 0
    assert dew_ok(s, "keypairs", "show", "old")["servers"] == []
    # reset: the private key of "new" is lost; the password installs "newer".
    out = dew_ok(s, "keypairs", "reset", "newer", "--server", "a", "--password-file", str(pw))
    assert out["succeeded"] == 1, out
    assert ssh_login(a, newer, tmp_path).returncode == 0
    assert ssh_login(a, new, tmp_path).returncode != 0
    assert dew_ok(s, "servers", "show", "a")["keypairs"] == ["newer"]


def test_failure_records(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    s = kps_settings
    good, other = sshds[3], sshds[4]
    key = tmp_path / "k"
    dew_ok(s, "keypairs", "create", "k", "--managed", "--out", str(key))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    silent = socket.socket()  # accepts (the kernel's backlog) but never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        add_server(s, "good", good)
        dew_ok(s, "servers", "add", "closed", "--host", "127.0.0.1", "--port",
               str(closed_port), "--user", good.user.name, "--trust-first-use")
        dew_ok(s, "servers", "add", "silent", "--host", "127.0.0.1", "--port",
               str(silent.getsockname()[1]), "--user", good.user.name, "--trust-first-use")
        # The key pinned for "changed" is another instance's host key.
        dew_ok(s, "servers", "add", "changed", "--host", "127.0.0.1", "--port",
               str(good.port), "--user", good.user.name, "--host-key",
               str(other.host_key_pub), "--authorized-keys", good.authorized_keys_setting)
        pw = password_file(tmp_path, good.user.password)
        done = run_dew(s, "keypairs", "bind", "k", "--server", "good", "--server", "closed",
                       "--server", "silent", "--server", "changed", "--password-file", str(pw),
                       "--json")
        assert done.returncode == 1, done.stderr
        result = json.loads(done.stdout)
        by_server = {r["server"]: r for r in result["servers"]}
        assert by_server["good"]["status"] == "succeeded"
        records = _failures(s, result["task_id"])
        assert records["closed"]["error"] == "SSH connection failure. Check your port."
        assert records["silent"]["error"] == ("Timeout: socket is not established. "
                                              "Check your security group rules.")
        assert records["changed"]["category"] == "security"
        assert records["closed"]["category"] == "SSH connection"
        assert records["closed"]["fix"] and records["closed"]["cause"]
        assert "good" not in records
        assert ssh_login(good, key, tmp_path).returncode == 0

        # Wrong password: its own record, and the server is left as it was.
        before = good.authorized_keys.read_bytes()
        dew_ok(s, "keypairs", "create", "k2", "--managed", "--out", str(tmp_path / "k2"))
        bad = password_file(tmp_path, "not-the-password")
        done = run_dew(s, "keypairs", "bind", "k2", "--server", "good", "--password-file",
                       str(bad), "--json")
        assert done.returncode == 1
        records = _failures(s, json.loads(done.stdout)["task_id"])
        assert records["good"]["error"] == "Invalid server login credential."
        assert good.authorized_keys.read_bytes() == before

        # A batch naming two key pairs, and one over the limit: refused as a whole.
        task_id = enqueue_sealed(s, "kps.bind", {
            "keypair": "k", "servers": ["good", {"server": "closed", "keypair": "k2"}],
            "auth": {"password": good.user.password}, "user": "root"})
        _wait_final(s, task_id)
        records = _failures(s, task_id)
        assert records["None"]["error"] == "Key pairs to be bound in batches are inconsistent."
        task_id = enqueue_sealed(s, "kps.bind", {
            "keypair": "k", "servers": [f"s{i}" for i in range(101)],
            "auth": {"password": good.user.password}, "user": "root"})
        _wait_final(s, task_id)
        records = _failures(s, task_id)
        assert records["None"]["error"] == "Too many key pairs to be bound in batches."
        assert records["None"]["category"] == "batch"
        assert good.authorized_keys.read_bytes() == before
    finally:
        silent.close()


def _wait_final(settings: Settings, task_id: str) -> None:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = run_dew(settings, "tasks", "show", task_id, "--json")
        if json.loads(done.stdout)["status"] in ("succeeded", "failed"):
            return
        time.sleep(0.3)
    raise AssertionError("task did not finish")


def test_secrets_never_in_clear(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    s = kps_settings
    a = sshds[5]
    key = tmp_path / "k"
    dew_ok(s, "keypairs", "create", "k", "--managed", "--out", str(key))
    add_server(s, "a", a)
    pw = password_file(tmp_path, a.user.password)
    dew_ok(s, "keypairs", "bind", "k", "--server", "a", "--password-file", str(pw))
    dew_ok(s, "keypairs", "unbind", "k", "--server", "a", "--private-key", str(key))
    private_body = "".join(key.read_text().splitlines()[1:-1])
    secrets_ = [a.user.password, private_body[:40], private_body[-40:]]
    r = redis.Redis.from_url(s.redis_url)
    dumped = b"".join((k + (r.dump(k) or b"")) for k in r.keys("*"))
    blobs = {"redis": dumped, "db": stored_bytes(s.store_target),
             "logs": b"".join(p.read_bytes() for p in s.state_dir.rglob("*.log"))
             + (tmp_path / "worker.out").read_bytes()}
    for where, blob in blobs.items():
        for secret in secrets_:
            assert secret.encode() not in blob, f"a secret is in clear in {where}"


async def test_snapshot_reads_files_in_the_same_session(sshds: list[Sshd]) -> None:
    """``snapshot(read=)`` brings the files back as ``read_files`` does (symlinks
    resolved, absent files, home-relative paths), in one command on the server: a
    fan-out pays for every command sshd starts."""
    from handlers.kps.ssh import Credential, Target, Timeouts, connect

    s = sshds[6]
    ssh_dir = s.user.home / ".ssh"
    real = ssh_dir / f"real_{s.port}"
    # Bytes that look like the script's framing must not split anything.
    real.write_bytes(b"ssh-ed25519 AAAA one\n\n0 1 /fake\nno-final-newline")
    link = ssh_dir / f"link_{s.port}"
    link.unlink(missing_ok=True)
    link.symlink_to(real)
    for path in (real, link):
        os.chown(path, s.user.uid, s.user.gid, follow_symlinks=False)
    target = Target("t", "127.0.0.1", s.port, s.user.name,
                    " ".join(s.host_key_pub.read_text().split()[:2]))
    wanted = [f".ssh/link_{s.port}", f"~/.ssh/absent_{s.port}", str(real)]
    session = await connect(target, Credential(password=s.user.password), Timeouts())
    try:
        started = s.log().count("Starting session:")
        snap = await session.snapshot(read=wanted)
        assert s.log().count("Starting session:") == started + 1
        assert snap.home == str(s.user.home) and snap.login == s.user.name
        assert [f.path for f in snap.files] == [str(link), str(ssh_dir / f"absent_{s.port}"),
                                                str(real)]
        assert list(snap.files) == await session.read_files([f.path for f in snap.files])
        assert snap.files[0].real == str(real) and snap.files[0].content == real.read_bytes()
        assert snap.files[1].content is None and snap.files[1].writable
        plain = await session.snapshot()
        assert plain.files == () and plain.home == snap.home
    finally:
        await session.close()
        link.unlink()
        real.unlink()


def test_asyncssh_steps_logged_only_at_debug() -> None:
    """asyncssh's per-connection INFO lines cost the worker some 30 % of its CPU in a
    fan-out: kept only when the engine logs at debug."""
    import logging

    from handlers.kps.ssh import quiet_asyncssh_log

    root, asyncssh_log = logging.getLogger(), logging.getLogger("asyncssh")
    levels = root.level, asyncssh_log.level
    try:
        root.setLevel(logging.INFO)
        quiet_asyncssh_log()
        assert not asyncssh_log.isEnabledFor(logging.INFO)
        assert asyncssh_log.isEnabledFor(logging.WARNING)
        root.setLevel(logging.DEBUG)
        quiet_asyncssh_log()
        assert asyncssh_log.isEnabledFor(logging.INFO)
    finally:
        root.setLevel(levels[0])
        asyncssh_log.setLevel(levels[1])
