"""The KPS CLI follows docs/cli.md's grammar (issue 16): objects positional, inputs
``--<name>-file`` with ``-`` for stdin, ``--owner`` / ``--login-user`` / ``--format``,
``--out`` prints no payload, old spellings work with one deprecation line, ``--json``
errors are JSON, and a job-backed verb says when no worker is running. Through the
real CLI (subprocesses), except the parser checks."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from engine import cli
from engine.settings import Settings
from handlers.kps import cli as kps_cli
from handlers.kps.cli_jobs import progress_bar, result_text
from handlers.kps.keys import PRIVATE_FORMATS
from tests.helpers import run_dew
from tests.kps.conftest import dew_ok


def warning(old: str, new: str, as_json: bool = False) -> str:
    """The one deprecation line (a JSON line when ``--json`` is on the command line)."""
    message = f"{old} is deprecated and will be removed in the next release; use {new}"
    if as_json:
        return json.dumps({"warning": {"code": "deprecated", "message": message}}) + "\n"
    return f"dew: warning: {message}\n"


def json_error(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert done.stdout == "", done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    error: dict[str, str] = json.loads(lines[0])["error"]
    assert set(error) == {"code", "message", "fix"}
    return error


def test_parser_takes_positionals_after_options_and_old_flags(
        capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    for argv in (["bind", "web", "a", "b", "--password-file", "-"],
                 ["bind", "--password-file", "-", "web", "a", "b"],
                 ["bind", "web", "--password-file", "-", "a", "b"]):
        args = parser.parse_args(["keypairs", *argv])
        assert (args.keypair, args.servers, args.password_file) == ("web", ["a", "b"], "-")
    old = parser.parse_args(["keypairs", "unbind", "web", "a", "--server", "b",
                             "--private-key-file", "k"])
    kps_cli.merge_old_spellings(old)
    assert old.servers == ["a", "b"] and old.private_key_file == "k"
    assert capsys.readouterr().err == warning("--server", "the positional SERVER")
    convert = parser.parse_args(["keypairs", "convert", "in.ppk", "--format", "pem"])
    kps_cli.merge_old_spellings(convert)
    assert convert.private_key_file == "in.ppk"
    assert capsys.readouterr().err == warning("the positional IN", "--private-key-file")
    assert kps_cli.FORMATS == PRIVATE_FORMATS
    assert progress_bar("bind", 1, 2, width=4) == "bind [##..] 1/2 servers"


def test_result_text_of_a_cancelled_batch() -> None:
    text = result_text({
        "operation": "bind", "keypair": "k", "fingerprint": "SHA256:x", "task_id": "t1",
        "status": "cancelled", "succeeded": 1, "failed": 0, "skipped": 1,
        "servers": [{"server": "a", "status": "succeeded", "changed": True},
                    {"server": "b", "status": "skipped", "reason": "cancelled"}]})
    assert text.splitlines()[1:] == [
        f"  {'a':24} succeeded  changed", f"  {'b':24} skipped    not started (cancelled)",
        "1 succeeded, 0 failed, 1 skipped",
        "task t1 CANCELLED: the skipped servers were not changed (enqueue the job again "
        "for them)"]


@pytest.mark.slow
def test_keypairs_new_and_old_spellings_and_out(kps_settings: Settings,
                                                 tmp_path: Path) -> None:
    s = kps_settings
    key = tmp_path / "web"
    created = dew_ok(s, "keypairs", "create", "web", "--owner", "alice", "--managed",
                     "--out", str(key))
    assert created["owner"] == "alice" and created["managed"] is True
    assert created["out"] == str(key) and created["bytes"] == key.stat().st_size
    assert "PRIVATE KEY" not in json.dumps(created)
    # The old --user: the same owner, and exactly one deprecation line.
    old = run_dew(s, "keypairs", "show", "web", "--user", "alice", "--json")
    assert old.returncode == 0 and json.loads(old.stdout)["owner"] == "alice"
    assert old.stderr == warning("--user", "--owner", as_json=True)
    # --out: the key goes to the file (0600), stdout is one summary line.
    pem = tmp_path / "web.pem"
    exported = run_dew(s, "keypairs", "export-private", "web", "--owner", "alice",
                       "--format", "pem", "--out", str(pem))
    assert exported.returncode == 0, exported.stderr
    assert pem.read_text().startswith("-----BEGIN ") and pem.stat().st_mode & 0o777 == 0o600
    assert exported.stdout == f"wrote private key ({pem.stat().st_size} bytes) to {pem}\n"
    # convert reads stdin (-); the old --to still works, with one line.
    ppk = tmp_path / "web.ppk"
    converted = run_dew(s, "keypairs", "convert", "--private-key-file", "-", "--to", "ppk",
                        "--out", str(ppk), "--json", input=key.read_text())
    assert converted.returncode == 0, converted.stderr
    assert converted.stderr == warning("--to", "--format", as_json=True)
    assert json.loads(converted.stdout) == {
        "format": "ppk", "out": str(ppk), "bytes": ppk.stat().st_size,
        "private_key_file": str(ppk)}
    assert ppk.read_text().startswith("PuTTY-User-Key-File-3: ")
    # Without --out the key is the output (with --json, inside the JSON).
    printed = run_dew(s, "keypairs", "convert", "--private-key-file", str(ppk), "--format",
                      "pem", "--json")
    assert printed.returncode == 0 and printed.stderr == "", printed.stderr
    assert json.loads(printed.stdout)["private_key"].startswith("-----BEGIN ")
    # An unknown key pair with --json: one JSON line with its code, exit 2.
    unknown = run_dew(s, "keypairs", "show", "nope", "--owner", "alice", "--json")
    assert unknown.returncode == 2 and json_error(unknown)["code"] == "keypair_not_found"


def test_servers_login_user_and_host_key_from_stdin(kps_settings: Settings,
                                                    tmp_path: Path) -> None:
    s = kps_settings
    host_key = tmp_path / "host"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                   check=True)
    done = run_dew(s, "servers", "add", "s1", "--host", "127.0.0.1", "--login-user", "bob",
                   "--host-key-file", "-", "--json",
                   input=host_key.with_suffix(".pub").read_text())
    assert done.returncode == 0 and done.stderr == "", done.stderr
    new = json.loads(done.stdout)
    assert new["user"] == "bob" and new["host_key_pinned"] is True
    old = run_dew(s, "servers", "add", "s2", "--host", "127.0.0.1", "--user", "carol",
                  "--trust-first-use", "--json")
    assert old.returncode == 0 and json.loads(old.stdout)["user"] == "carol"
    assert old.stderr == warning("--user", "--login-user", as_json=True)
    shown = run_dew(s, "servers", "show", "s1")
    assert "\nsudo             no\n" in shown.stdout and "True" not in shown.stdout
    assert "\nlogin_user       bob\n" in shown.stdout
    bad = run_dew(s, "servers", "add", "s3", "--host", "h", "--port", "0",
                  "--trust-first-use", "--json")
    assert bad.returncode == 2 and "--port" in json_error(bad)["message"]


@pytest.mark.slow
def test_bind_without_a_worker_says_so_and_keeps_the_task(kps_settings: Settings,
                                                          tmp_path: Path) -> None:
    """The no-worker check of ``Client.wait`` (heartbeat_timeout 2 s in tests)."""
    s = kps_settings
    assert s.worker.heartbeat_timeout <= 2.0
    dew_ok(s, "keypairs", "create", "k", "--out", str(tmp_path / "k"))
    dew_ok(s, "servers", "add", "s1", "--host", "127.0.0.1", "--host-key-file",
           str(tmp_path / "k.pub"))
    started = time.monotonic()
    done = run_dew(s, "keypairs", "bind", "k", "--password-file", "-", "s1", input="pw\n")
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 15
    assert "no worker is running: start one with `make up` (or `dew worker`)" in done.stderr
    # The old --server (one deprecation line); a missing SERVER is a usage error.
    queued = run_dew(s, "keypairs", "bind", "k", "--server", "s1", "--password-file", "-",
                     "--no-wait", input="pw\n")
    assert queued.returncode == 0 and queued.stderr == warning("--server",
                                                               "the positional SERVER")
    missing = run_dew(s, "keypairs", "bind", "k", "--password-file", "-", "--json",
                      input="pw\n")
    assert missing.returncode == 2 and json_error(missing)["code"] == "usage"
    tasks = json.loads(run_dew(s, "tasks", "list", "--json").stdout)
    assert [(t["name"], t["status"]) for t in tasks] == [("kps.bind", "queued")] * 2
