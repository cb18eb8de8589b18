"""KPS jobs for an account other than ``default`` (audit M4): the credential is sealed
under that account's key, and the worker opens it there."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.settings import Settings
from tests.helpers import WorkerProcess
from tests.kps.conftest import Sshd, add_server, dew_ok, password_file, ssh_login

pytestmark = pytest.mark.slow


def test_bind_and_unbind_for_account_acme(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    s, server = kps_settings, sshds[0]
    acme = ("--project", "acme")
    key = tmp_path / "ka"
    dew_ok(s, "keypairs", "create", "ka", "--managed", "--out", str(key), *acme)
    add_server(s, "s-acme", server, *acme)
    pw = password_file(tmp_path, server.user.password)
    out = dew_ok(s, "keypairs", "bind", "ka", "--server", "s-acme", "--password-file", str(pw),
                 *acme)
    assert out["succeeded"] == 1 and out["failed"] == 0, out
    assert ssh_login(server, key, tmp_path).returncode == 0
    out = dew_ok(s, "keypairs", "unbind", "ka", "--server", "s-acme", "--private-key", str(key),
                 *acme)
    assert out["succeeded"] == 1, out
    assert ssh_login(server, key, tmp_path).returncode != 0
    # The default account sees neither the key pair nor the server.
    assert dew_ok(s, "keypairs", "list") == []
