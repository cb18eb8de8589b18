"""Task states that tell the truth (issue 16): a batch whose every server failed is a
``failed`` task (``dew tasks list --status failed`` finds it; its failure report gives
the product message once per server); one where some failed ends ``succeeded`` with
``partially_failed`` and the CLI exits 1. Both can be retried."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from engine.settings import Settings
from tests.helpers import WorkerProcess, run_dew
from tests.kps.conftest import Sshd, add_server, dew_ok, password_file, ssh_login

pytestmark = pytest.mark.slow

PORT_FAILURE = "SSH connection failure. Check your port."


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def _add_closed(settings: Settings, name: str, user: str) -> None:
    dew_ok(settings, "servers", "add", name, "--host", "127.0.0.1", "--port",
           str(_closed_port()), "--user", user, "--trust-first-use")


def _json(settings: Settings, *args: str) -> Any:
    done = run_dew(settings, *args, "--json")
    assert done.returncode == 0, (args, done.stderr)
    return json.loads(done.stdout)


def test_all_failed_bind_is_a_failed_task(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    s = kps_settings
    user = sshds[5].user.name
    dew_ok(s, "keypairs", "create", "k", "--managed", "--out", str(tmp_path / "k"))
    _add_closed(s, "c1", user)
    _add_closed(s, "c2", user)
    pw = password_file(tmp_path, sshds[5].user.password)

    done = run_dew(s, "keypairs", "bind", "k", "--server", "c1", "--server", "c2",
                   "--password-file", str(pw), "--json")
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    task_id = result["task_id"]
    assert result["status"] == "failed" and result["failed"] == 2, result
    assert result["succeeded"] == 0 and result["partially_failed"] is False
    assert {r["server"]: (r["status"], r["error"]) for r in result["servers"]} == {
        "c1": ("failed", PORT_FAILURE), "c2": ("failed", PORT_FAILURE)}
    assert all(r["failure_id"] for r in result["servers"])
    assert result["error"]["code"] == "kps_all_servers_failed"

    failed = _json(s, "tasks", "list", "--status", "failed")
    assert task_id in {t["task_id"] for t in failed}, failed
    assert task_id not in {t["task_id"] for t in _json(s, "tasks", "list", "--status",
                                                       "succeeded")}
    shown = _json(s, "tasks", "show", task_id)
    assert shown["status"] == "failed"
    assert "all 2 servers failed" in shown["error"]["message"], shown

    # The failure report: the product message once per server, and one task-level
    # summary (no target) that does not repeat it.
    records = _json(s, "failures", "list", "--task-id", task_id)
    by_target = sorted((str(r["target"]), r["error"]) for r in records)
    assert by_target == [("None", "kps.bind: all 2 servers failed (2 of 2)"),
                         ("c1", PORT_FAILURE), ("c2", PORT_FAILURE)], by_target
    assert sum(r["error"] == PORT_FAILURE for r in records) == 2

    # The text form says it too.
    done = run_dew(s, "keypairs", "bind", "k", "--server", "c1", "--password-file", str(pw))
    assert done.returncode == 1
    assert "FAILED" in done.stdout and PORT_FAILURE in done.stdout, done.stdout
    assert "every server failed" in done.stdout


def test_partly_failed_bind_is_succeeded_partially_failed_and_exits_1(
    kps_settings: Settings, kps_worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path
) -> None:
    s = kps_settings
    good = sshds[5]
    key = tmp_path / "k"
    dew_ok(s, "keypairs", "create", "k", "--managed", "--out", str(key))
    add_server(s, "good", good)
    _add_closed(s, "closed", good.user.name)
    pw = password_file(tmp_path, good.user.password)

    done = run_dew(s, "keypairs", "bind", "k", "--server", "good", "--server", "closed",
                   "--password-file", str(pw), "--json")
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    task_id = result["task_id"]
    assert result["status"] == "succeeded" and result["partially_failed"] is True, result
    assert (result["succeeded"], result["failed"]) == (1, 1)
    rows = {r["server"]: r for r in result["servers"]}
    assert rows["good"]["status"] == "succeeded"
    assert rows["closed"]["status"] == "failed" and rows["closed"]["error"] == PORT_FAILURE
    assert rows["closed"]["failure_id"]
    assert ssh_login(good, key, tmp_path).returncode == 0

    shown = _json(s, "tasks", "show", task_id)
    assert shown["status"] == "succeeded" and shown["result"]["partially_failed"] is True
    records = _json(s, "failures", "list", "--task-id", task_id)
    assert [(r["target"], r["error"]) for r in records] == [("closed", PORT_FAILURE)]

    # The text form names it.
    done = run_dew(s, "keypairs", "bind", "k", "--server", "good", "--server", "closed",
                   "--password-file", str(pw))
    assert done.returncode == 1
    assert "PARTIALLY FAILED: 1 of 2 servers failed" in done.stdout, done.stdout

    # A partly failed task is retried (a new task over the same servers); all good now.
    done = run_dew(s, "tasks", "retry", task_id, "--json")
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)["task_id"]
    assert again != task_id
