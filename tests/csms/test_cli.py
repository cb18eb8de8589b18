"""``dew secrets``: exit codes, one-line errors, nothing written on bad input,
``get`` printing only the value, JSON shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.settings import Settings
from tests.helpers import run_dew
from tests.pg_store import store_rows


def _secret_rows(settings: Settings) -> int:
    rows = store_rows(settings.store_target, "SELECT COUNT(*) FROM csms_secrets")
    return int(str(rows[0][0])) if rows else 0


@pytest.mark.parametrize("args", [
    ["create", "bad name", "--generate"],
    ["create", "ok", "--generate", "--length", "7"],
    ["create", "ok", "--generate", "--charset", "emoji"],
    ["create", "ok", "--value-file", "/nonexistent/file"],
    ["create", "ok", "--generate", "--type", "ORACLE"],
    ["create", "ok", "--value-file", "-", "--type", "RDS_POSTGRESQL"],
    ["create", "ok", "--value-file", "-", "--length", "9"],
    ["create", "ok", "--generate", "--project", "bad account"],
    ["create", "ok", "--value-file", "-", "--generate"],
    ["get", "ok", "--out", "/nonexistent/dir/value"],
    ["delete", "ok", "--recovery-days", "31"],
    ["set-rotation", "ok", "--period", "5h"],
    ["remove-stage", "ok", "--stage", "SYSPREVIOUS"],
    ["set-stage", "ok", "--stage", "X", "--version-id", "first"],
    ["get", "missing"],
    ["rotate", "missing"],
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(settings: Settings,
                                                         args: list[str]) -> None:
    done = run_dew(settings, "secrets", *args, input="not json")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("dew: error: ") and done.stderr.count("\n") == 1
    assert done.stdout == ""
    assert _secret_rows(settings) == 0


def test_cli_round_trip(settings: Settings, tmp_path: Path) -> None:
    value_file = tmp_path / "value.txt"
    value_file.write_bytes(b"line one\nline two")
    made = run_dew(settings, "secrets", "create", "cli.s", "--value-file", str(value_file),
                   "--description", "from a file", "--json")
    assert made.returncode == 0, made.stderr
    shown = json.loads(made.stdout)
    assert shown["stages"] == {"SYSCURRENT": "v1"} and shown["failed_rotations"] == 0
    assert "line one" not in made.stdout

    got = run_dew(settings, "secrets", "get", "cli.s")
    assert (got.returncode, got.stdout, got.stderr) == (0, "line one\nline two", "")
    put = run_dew(settings, "secrets", "put-version", "cli.s", "--generate", "--length", "12",
                  "--charset", "digits", "--json")
    assert json.loads(put.stdout)["version_id"] == "v2"
    got = run_dew(settings, "secrets", "get", "cli.s", "--json")
    data = json.loads(got.stdout)
    assert data["version_id"] == "v2" and data["value"].isdigit() and len(data["value"]) == 12
    prev = run_dew(settings, "secrets", "get", "cli.s", "--stage", "SYSPREVIOUS")
    assert prev.stdout == "line one\nline two"
    versions = json.loads(run_dew(settings, "secrets", "versions", "cli.s", "--json").stdout)
    assert [(v["version_id"], v["stages"]) for v in versions] == [
        ("v1", ["SYSPREVIOUS"]), ("v2", ["SYSCURRENT"])]
    rot = run_dew(settings, "secrets", "set-rotation", "cli.s", "--period", "24h", "--json")
    assert json.loads(rot.stdout)["rotation"]["period_hours"] == 24
    listed = json.loads(run_dew(settings, "secrets", "list", "--json").stdout)
    assert [s["name"] for s in listed] == ["cli.s"]
    other = run_dew(settings, "secrets", "list", "--project", "other", "--json")
    assert json.loads(other.stdout) == []
    gone = run_dew(settings, "secrets", "delete", "cli.s", "--recovery-days", "7")
    assert gone.returncode == 0 and "pending_deletion" in gone.stdout
    blocked = run_dew(settings, "secrets", "get", "cli.s")
    # Refused by the secret's state: exit 1 in the exit-code table (docs/cli.md).
    assert blocked.returncode == 1 and "pending deletion" in blocked.stderr
    assert run_dew(settings, "secrets", "restore", "cli.s").returncode == 0
    assert run_dew(settings, "secrets", "get", "cli.s").stdout == data["value"]


def test_no_option_takes_a_secret_value_on_the_command_line() -> None:
    """Audit L2: values come from --value-file (- for stdin) or --generate; every
    other option that takes an argument is a name, a label, a number or a path."""
    import argparse

    from handlers.csms.cli import register

    commands = argparse.ArgumentParser().add_subparsers(dest="command")
    register(commands, {})
    not_secret = {"--project", "--stage", "--version-id", "--kms-key", "--description",
                  "--type", "--length", "--charset", "--recovery-days", "--timeout",
                  "--period", "--value-file", "--out", "name"}
    top = commands.choices["secrets"]
    [actions] = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    for action_name, sub in actions.choices.items():
        for opt in sub._actions:
            if opt.nargs == 0 or isinstance(opt, argparse._HelpAction):
                continue
            label = opt.option_strings[0] if opt.option_strings else opt.dest
            assert label in not_secret, f"dew secrets {action_name} {label}"
        if action_name in ("create", "put-version"):
            options = {o for a in sub._actions for o in a.option_strings}
            assert {"--value-file", "--generate"} <= options
