"""``dew kms`` / ``dew audit`` as users run them: JSON shapes and exit codes."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
from pathlib import Path

from engine.settings import Settings
from tests.helpers import run_dew


def _ok(settings: Settings, *args: str) -> dict[str, object]:
    done = run_dew(settings, "kms", *args, "--json")
    assert done.returncode == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    return data


def _refused(done: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("dew: error: ") and text in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    if code == 2:
        assert len(lines) == 1  # bad input: one line


def test_kms_commands_end_to_end(kms_settings: Settings, tmp_path: Path) -> None:
    key = _ok(kms_settings, "create-key", "--alias", "cli/key", "--description", "d")
    assert key["key_alias"] == "cli/key" and key["key_state"] == "enabled"
    assert _ok(kms_settings, "describe-key", "cli/key")["key_id"] == key["key_id"]

    source = tmp_path / "note.txt"
    source.write_bytes(b"four")
    enc = _ok(kms_settings, "encrypt-data", "cli/key", "--plain-text-file", str(source))
    assert enc["key_id"] == key["key_id"] and len(str(enc["cipher_text"])) == 188
    dec = _ok(kms_settings, "decrypt-data", "--cipher-text", str(enc["cipher_text"]))
    assert base64.b64decode(str(dec["plain_text_base64"])) == b"four"

    dk = _ok(kms_settings, "create-datakey", "cli/key", "--length-bits", "512")
    assert len(bytes.fromhex(str(dk["plain_text"]))) == 64
    back = _ok(kms_settings, "decrypt-datakey", "cli/key", "--cipher-text", str(dk["cipher_text"]))
    assert back == {"key_id": key["key_id"], "plain_text": dk["plain_text"]}  # no echo
    assert len(bytes.fromhex(str(_ok(kms_settings, "gen-random", "--bytes", "16")
                                 ["random_data"]))) == 16

    listed = json.loads(run_dew(kms_settings, "kms", "list-keys", "--json").stdout)
    assert [k["key_alias"] for k in listed] == ["cli/key"]
    human = run_dew(kms_settings, "audit", "list", "--key", "cli/key")
    assert human.returncode == 0 and "create_key" in human.stdout
    assert run_dew(kms_settings, "audit", "verify").returncode == 0


def test_bad_input_exits_2_with_one_line(kms_settings: Settings, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(4097))
    for args, text in (
        (("create-key", "--alias", "x/default"), "reserved"),
        (("create-key", "--alias", "has space"), "invalid alias"),
        (("create-key", "--alias", "ok", "--spec", "AES_128"), "invalid key spec"),
        (("encrypt-data", "k", "--plain-text-file", str(big)), "at most 4096"),
        (("schedule-key-deletion", "k", "--pending-days", "6"), "between 7 and 1096"),
        (("schedule-key-deletion", "k", "--pending-days", "1097"), "between 7 and 1096"),
        (("gen-random", "--bytes", "0"), "1..1024"),
        (("describe-key", "k", "--project", "bad account"), "--project: invalid account"),
        (("decrypt-data", "--cipher-text", "%%%"), "Base64"),
    ):
        _refused(run_dew(kms_settings, "kms", *args), 2, text)
    # Refused before anything was opened: no task store, no key.
    assert not kms_settings.db_path.exists()
    _refused(run_dew(kms_settings, "kms", "describe-key", "nope"), 2, "no key 'nope'")
    _refused(run_dew(kms_settings, "kms", "create-key"), 2, "--alias")  # argparse


def test_operational_failures_exit_1_and_audit_verify(kms_settings: Settings) -> None:
    _ok(kms_settings, "create-key", "--alias", "cli/off")
    enc = _ok(kms_settings, "encrypt-data", "cli/off", "--plain-text-base64", "aGk=")
    blob = bytearray(base64.b64decode(str(enc["cipher_text"])))
    blob[-1] ^= 1
    _refused(run_dew(kms_settings, "kms", "decrypt-data", "--cipher-text",
                     base64.b64encode(blob).decode()), 1, "integrity check failed")
    _ok(kms_settings, "disable-key", "cli/off")
    _refused(run_dew(kms_settings, "kms", "encrypt-data", "cli/off", "--plain-text-base64",
                     "aGk="), 1, "is disabled")
    _refused(run_dew(kms_settings, "kms", "disable-key", "kps/default"), 1, "default key")

    verdict = run_dew(kms_settings, "audit", "verify", "--json")
    assert verdict.returncode == 0 and json.loads(verdict.stdout)["intact"] is True
    with sqlite3.connect(kms_settings.db_path) as db:
        db.execute("UPDATE audit SET actor = 'someone else' WHERE seq = 2")
    broken = run_dew(kms_settings, "audit", "verify")
    assert broken.returncode == 1
    assert "BROKEN at seq 2" in broken.stdout


def test_project_by_name_or_id_and_the_account_alias(kms_settings: Settings) -> None:
    """The CLI names projects as the API does: --project takes a name or a project id."""
    made = run_dew(kms_settings, "iam", "create-project", "shop", "--json")
    assert made.returncode == 0, made.stderr
    project_id = json.loads(made.stdout)["project_id"]
    key = _ok(kms_settings, "create-key", "--alias", "shop/orders", "--project", project_id)
    assert key["account"] == "shop"
    for option in (("--project", "shop"), ("--account", "shop"), ("--project", project_id)):
        listed = run_dew(kms_settings, "kms", "list-keys", *option, "--json")
        assert listed.returncode == 0, listed.stderr
        assert ("deprecated" in listed.stderr) == (option[0] == "--account")
        assert [k["key_id"] for k in json.loads(listed.stdout)] == [key["key_id"]]
    # Another project does not see it; an id that is no project is refused.
    assert json.loads(run_dew(kms_settings, "kms", "list-keys", "--json").stdout) == []
    _refused(run_dew(kms_settings, "kms", "list-keys", "--project", "f" * 32), 2, "project")
