"""Who read a secret, and when: every ``dew secrets get`` is an entry in the KMS audit
chain (``csms.get_value``: the secret, the version, the principal, the outcome), and
``dew audit list`` filters by secret, operation, actor, outcome, key, project and time."""

from __future__ import annotations

import getpass
import json
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.settings import Settings
from tests.helpers import run_dew


def _audit(settings: Settings, *args: str) -> list[dict[str, Any]]:
    done = run_dew(settings, "audit", "list", *args, "--json")
    assert done.returncode == 0, done.stderr
    entries: list[dict[str, Any]] = json.loads(done.stdout)
    return entries


def _ok(settings: Settings, *args: str) -> str:
    done = run_dew(settings, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_who_read_db_app_is_answered_by_audit_list_secret(settings: Settings) -> None:
    s = settings
    before = datetime.now(UTC) - timedelta(seconds=1)
    _ok(s, "secrets", "create", "db.app", "--generate")
    _ok(s, "secrets", "create", "other", "--generate")
    _ok(s, "secrets", "put-version", "db.app", "--generate")
    value = _ok(s, "secrets", "get", "db.app")
    assert value
    _ok(s, "secrets", "get", "db.app", "--version-id", "v1")
    _ok(s, "secrets", "get", "other", "--json")
    missing = run_dew(s, "secrets", "get", "db.app", "--version-id", "v9")
    assert missing.returncode == 2

    reads = _audit(s, "--secret", "db.app")
    me = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    assert [(e["operation"], e["outcome"], e["detail"].get("version")) for e in reads] == [
        ("csms.get_value", "success", "v2"), ("csms.get_value", "success", "v1"),
        ("csms.get_value", "failure", "v9")]
    for entry in reads:
        assert entry["actor"] == me, entry
        assert entry["detail"]["secret"] == "db.app"
        assert entry["detail"]["account"] == "default" and entry["account"] == "default"
        when = datetime.fromisoformat(entry["time"])
        assert before <= when <= datetime.now(UTC) + timedelta(seconds=1)
    assert reads[0]["key_id"] and reads[0]["key_id"] == reads[1]["key_id"]
    assert reads[2]["detail"]["code"] == "version_not_found"
    # The text form names the secret and the version after the actor.
    text = _ok(s, "audit", "list", "--secret", "db.app")
    assert "csms.get_value" in text and "secret db.app v2" in text and me in text

    # The filters combine.
    assert [e["detail"]["version"] for e in _audit(s, "--secret", "db.app", "--outcome",
                                                    "failure")] == ["v9"]
    assert {e["detail"]["secret"] for e in _audit(s, "--operation", "csms.get_value")} == {
        "db.app", "other"}
    assert len(_audit(s, "--operation", "csms.get_value", "--actor",
                      getpass.getuser())) == 4
    assert _audit(s, "--operation", "csms.get_value", "--actor", "api:nobody") == []
    assert _audit(s, "--secret", "db.app", "--since",
                  (datetime.now(UTC) + timedelta(hours=1)).isoformat()) == []
    assert _audit(s, "--secret", "db.app", "--until", "2000-01-01") == []
    assert len(_audit(s, "--secret", "db.app", "--since", before.strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"), "--until", "2999-01-01T00:00:00Z")) == 3
    assert len(_audit(s, "--secret", "db.app", "--project", "default")) == 3
    assert _audit(s, "--secret", "db.app", "--project", "elsewhere") == []
    by_key = _audit(s, "--key", str(reads[0]["key_id"]), "--operation", "csms.get_value",
                    "--outcome", "success")
    assert len(by_key) == 3  # db.app twice, other once (the same default key)
    decrypts = _audit(s, "--operation", "decrypt_datakey")
    assert decrypts and all(e["operation"] == "decrypt_datakey" for e in decrypts)

    # Still one intact chain.
    verdict = json.loads(_ok(s, "audit", "verify", "--json"))
    assert verdict["intact"], verdict


def test_audit_list_refuses_bad_filters(settings: Settings) -> None:
    for args in (["--since", "yesterday"], ["--until", "2026-13-01"],
                 ["--outcome", "maybe"], ["--secret", ""],
                 ["--since", "2026-12-02", "--until", "2026-12-01"]):
        done = run_dew(settings, "audit", "list", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("dew: error: ") or "usage:" in done.stderr, done.stderr
