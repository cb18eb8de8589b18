"""Trust boundaries on real sshd: no lock-out and no false report (audit H1, H2, M1,
M2, M3, L3), and a login user that is not root (``--sudo``).

Each test fails on the old behaviour: the audit's reproduction is the test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from engine.settings import Settings
from tests.helpers import WorkerProcess, run_dew
from tests.kps.conftest import (
    RootSshd,
    Sshd,
    TestUser,
    add_server,
    dew_ok,
    password_file,
    ssh_login,
    ssh_password_probe,
)
from tests.pg_store import admin_sql

pytestmark = pytest.mark.slow

PASSWORD_OFF = "Permission denied (publickey)."
PASSWORD_ON = "Permission denied (publickey,password)."


def _job(settings: Settings, *args: str) -> tuple[int, dict[str, object]]:
    """A KPS job through the CLI: (exit code, the JSON result)."""
    done = run_dew(settings, "keypairs", *args, "--json")
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def _server_row(result: dict[str, object]) -> dict[str, object]:
    rows = result["servers"]
    assert isinstance(rows, list) and len(rows) == 1, result
    row: dict[str, object] = rows[0]
    return row


def _bound(settings: Settings, server: str) -> object:
    return dew_ok(settings, "servers", "show", server)["keypairs"]


def _set_config(sshd: Sshd, text: str) -> None:
    """Give the running sshd another config (the fixture's reset puts the base one back)."""
    sshd.config.write_text(text)
    since = sshd.log_size()
    os.kill(sshd.pid, signal.SIGHUP)
    sshd.wait_listening(since)


def _probe(sshd: Sshd, tmp: Path) -> str:
    return ssh_password_probe(sshd, tmp).stderr


def test_unbind_with_failing_reload_keeps_the_way_in(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    """H1: password login is turned on (and proven) before the key goes; a failed
    reload puts every file back, and the registry still says bound."""
    s, a = kps_settings, sshds[6]
    key = tmp_path / "k1"
    dew_ok(s, "keypairs", "create", "k1", "--managed", "--out", str(key))
    add_server(s, "a", a)
    pw = password_file(tmp_path, a.user.password)
    dew_ok(s, "keypairs", "bind", "k1", "--server", "a", "--password-file", str(pw),
           "--disable-password")
    assert PASSWORD_OFF in _probe(a, tmp_path)
    keys_before, config_before = a.authorized_keys.read_bytes(), a.config.read_bytes()
    asyncio.run(admin_sql(s.store_target,
                          "UPDATE kps_servers SET reload_command = 'false' WHERE name = 'a'"))

    code, result = _job(s, "unbind", "k1", "--server", "a", "--private-key", str(key),
                        "--enable-password")
    assert code == 1
    row = _server_row(result)
    assert row["status"] == "failed" and row["code"] == "sshd_reload_failed", row
    assert a.authorized_keys.read_bytes() == keys_before
    assert a.config.read_bytes() == config_before
    assert ssh_login(a, key, tmp_path).returncode == 0
    assert _bound(s, "a") == ["k1"]


def test_password_off_only_with_a_proven_key(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    """H2: an unmanaged pair, and a managed one sshd never reads (another
    AuthorizedKeysFile), leave password login on; the server fails."""
    s, b, c = kps_settings, sshds[7], sshds[8]
    pw = password_file(tmp_path, b.user.password)
    dew_ok(s, "keypairs", "create", "unm", "--out", str(tmp_path / "unm"))  # not managed
    add_server(s, "b", b)
    config = b.config.read_bytes()
    code, result = _job(s, "bind", "unm", "--server", "b", "--password-file", str(pw),
                        "--disable-password")
    assert code == 1
    row = _server_row(result)
    assert row["status"] == "failed" and row["code"] == "password_off_unproven", row
    assert PASSWORD_ON in _probe(b, tmp_path)
    assert b.config.read_bytes() == config
    assert not b.authorized_keys.exists()
    failures = json.loads(run_dew(s, "failures", "list", "--task-id", str(result["task_id"]),
                                  "--json").stdout)
    # The server's record (the task failed too: its task-level record only summarises).
    server_records = [f for f in failures if f["target"] == "b"]
    assert len(server_records) == 1, failures
    assert "private key" in server_records[0]["cause"], failures

    # The engine writes ~/.ssh/authorized_keys; this sshd reads authorized_keys_<port>.
    key = tmp_path / "m"
    dew_ok(s, "keypairs", "create", "m", "--managed", "--out", str(key))
    default_file = c.user.home / ".ssh" / "authorized_keys"
    default_file.unlink(missing_ok=True)
    dew_ok(s, "servers", "add", "c", "--host", "127.0.0.1", "--port", str(c.port), "--user",
           c.user.name, "--host-key", str(c.host_key_pub), "--sshd-config", str(c.config),
           "--reload-command", c.reload_command)
    config = c.config.read_bytes()
    code, result = _job(s, "bind", "m", "--server", "c", "--password-file", str(pw),
                        "--disable-password")
    assert code == 1
    row = _server_row(result)
    assert row["status"] == "failed" and row["code"] == "login_check_failed", row
    assert PASSWORD_ON in _probe(c, tmp_path)
    assert c.config.read_bytes() == config
    assert not default_file.exists()  # put back as it was: absent
    assert _bound(s, "c") == []


def test_match_block_keeping_password_login_fails_the_server(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    """M1: a trailing ``Match all / PasswordAuthentication yes`` is seen (offered
    methods, sshd -T): the server fails and every file is put back."""
    s, d = kps_settings, sshds[9]
    _set_config(d, d.base_config() + "Match all\n  PasswordAuthentication yes\n")
    config = d.config.read_bytes()
    k0, key = tmp_path / "k0", tmp_path / "k"
    dew_ok(s, "keypairs", "create", "k0", "--managed", "--out", str(k0))
    dew_ok(s, "keypairs", "create", "k", "--managed", "--out", str(key))
    add_server(s, "d", d)
    pw = password_file(tmp_path, d.user.password)
    dew_ok(s, "keypairs", "bind", "k0", "--server", "d", "--password-file", str(pw))
    keys = d.authorized_keys.read_bytes()
    # Authenticated with a key, as in the audit (no password to try afterwards).
    code, result = _job(s, "bind", "k", "--server", "d", "--private-key", str(k0),
                        "--disable-password")
    assert code == 1
    row = _server_row(result)
    assert row["status"] == "failed" and row["code"] == "password_login_unproven", row
    assert row["error"] == "Password login could not be turned off."
    assert d.config.read_bytes() == config
    assert d.authorized_keys.read_bytes() == keys
    assert PASSWORD_ON in _probe(d, tmp_path)
    assert _bound(s, "d") == ["k0"]


def test_reset_removes_every_bound_key(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    """M2: bob's reset removes alice's bound key (lost or compromised) and her binding."""
    s, e = kps_settings, sshds[10]
    ka, kb = tmp_path / "ka", tmp_path / "kb"
    dew_ok(s, "keypairs", "create", "ka", "--user", "alice", "--out", str(ka))
    dew_ok(s, "keypairs", "create", "kb", "--user", "bob", "--managed", "--out", str(kb))
    add_server(s, "e", e)
    pw = password_file(tmp_path, e.user.password)
    dew_ok(s, "keypairs", "bind", "ka", "--user", "alice", "--server", "e",
           "--password-file", str(pw))
    assert ssh_login(e, ka, tmp_path).returncode == 0
    out = dew_ok(s, "keypairs", "reset", "kb", "--user", "bob", "--server", "e",
                 "--password-file", str(pw))
    assert out["succeeded"] == 1, out
    alice = Path(f"{ka}.pub").read_text().split()[1]
    assert alice not in e.authorized_keys.read_text()
    assert ssh_login(e, ka, tmp_path).returncode != 0
    assert ssh_login(e, kb, tmp_path).returncode == 0
    assert dew_ok(s, "keypairs", "show", "ka", "--user", "alice")["servers"] == []
    assert _bound(s, "e") == ["kb"]


def test_unbind_refused_for_another_reason_is_not_unbound(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    """M3: StrictModes refuses every key while the home is world-writable: the unbind
    fails, the key stays bound (and works once the home is fixed)."""
    s, f = kps_settings, sshds[11]
    key = tmp_path / "k"
    dew_ok(s, "keypairs", "create", "k", "--managed", "--out", str(key))
    add_server(s, "f", f)
    pw = password_file(tmp_path, f.user.password)
    dew_ok(s, "keypairs", "bind", "k", "--server", "f", "--password-file", str(pw))
    home = f.user.home
    mode = home.stat().st_mode & 0o7777
    home.chmod(mode | 0o002)
    try:
        code, result = _job(s, "unbind", "k", "--server", "f", "--private-key", str(key))
    finally:
        home.chmod(mode)
    assert code == 1
    row = _server_row(result)
    assert row["status"] == "failed", row
    assert _bound(s, "f") == ["k"]
    assert ssh_login(f, key, tmp_path).returncode == 0


def test_symlinked_files_are_edited_in_place(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    """L3: a symlinked authorized_keys and sshd_config stay links; their targets change."""
    s, g = kps_settings, sshds[12]
    user = g.user
    central = user.home / f"central_{g.port}"
    central.mkdir(mode=0o700, exist_ok=True)
    os.chown(central, user.uid, user.gid)
    target = central / "keys"
    target.write_text("# managed centrally\n")
    os.chown(target, user.uid, user.gid)
    target.chmod(0o600)
    g.authorized_keys.symlink_to(target)
    config_link = g.dir / "sshd_config.link"
    config_link.unlink(missing_ok=True)
    config_link.symlink_to(g.config)
    key = tmp_path / "k"
    dew_ok(s, "keypairs", "create", "k", "--managed", "--out", str(key))
    dew_ok(s, "servers", "add", "g", "--host", "127.0.0.1", "--port", str(g.port), "--user",
           user.name, "--host-key", str(g.host_key_pub), "--authorized-keys",
           g.authorized_keys_setting, "--sshd-config", str(config_link),
           "--reload-command", g.reload_command)
    pw = password_file(tmp_path, user.password)
    out = dew_ok(s, "keypairs", "bind", "k", "--server", "g", "--password-file", str(pw),
                 "--disable-password")
    assert out["succeeded"] == 1, out
    assert g.authorized_keys.is_symlink() and config_link.is_symlink()
    assert target.read_text().startswith("# managed centrally\n")
    assert Path(f"{key}.pub").read_text().split()[1] in target.read_text()
    assert "PasswordAuthentication no" in g.config.read_text()
    assert ssh_login(g, key, tmp_path).returncode == 0
    assert PASSWORD_OFF in _probe(g, tmp_path)
    config_link.unlink()


def test_login_user_not_root_with_and_without_sudo(
    kps_settings: Settings, kps_worker: WorkerProcess, root_sshd: RootSshd,
    sudo_user: TestUser, tmp_path: Path
) -> None:
    """A root-run sshd whose config is root-owned: without --sudo a clear permission
    message and nothing changed; with --sudo password login goes off, proven."""
    s, r = kps_settings, root_sshd
    r.authorized_keys.unlink(missing_ok=True)
    key = tmp_path / "k"
    dew_ok(s, "keypairs", "create", "k", "--managed", "--out", str(key))
    common = ["--host", "127.0.0.1", "--port", str(r.port), "--user", sudo_user.name,
              "--host-key", str(r.host_key_pub), "--authorized-keys", r.authorized_keys_setting,
              "--sshd-config", str(r.config), "--reload-command", r.reload_command]
    dew_ok(s, "servers", "add", "plain", *common)
    dew_ok(s, "servers", "add", "sudo", *common, "--sudo")
    assert dew_ok(s, "servers", "show", "sudo")["sudo"] is True
    pw = password_file(tmp_path, sudo_user.password)
    config = r.config.read_bytes()

    code, result = _job(s, "bind", "k", "--server", "plain", "--password-file", str(pw),
                        "--disable-password")
    assert code == 1
    row = _server_row(result)
    assert row["code"] == "server_permission_denied", row
    assert row["error"] == (f"cannot write {r.config} as user {sudo_user.name}: permission "
                            "denied; add the server with --sudo")
    assert not r.authorized_keys.exists()  # nothing half-done
    assert r.config.read_bytes() == config

    out = dew_ok(s, "keypairs", "bind", "k", "--server", "sudo", "--password-file", str(pw),
                 "--disable-password")
    assert out["succeeded"] == 1, out
    assert _server_row(out)["pw_login_state"] == "changed"
    stat = r.config.stat()
    assert (stat.st_uid, stat.st_mode & 0o777) == (0, 0o644)
    assert "PasswordAuthentication no" in r.config.read_text()
    keys = r.authorized_keys.stat()
    assert (keys.st_uid, keys.st_mode & 0o777) == (sudo_user.uid, 0o600)
    assert ssh_login(r, key, tmp_path).returncode == 0
    assert PASSWORD_OFF in _probe(r, tmp_path)
