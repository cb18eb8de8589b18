"""``dew secrets`` follows the CLI grammar (docs/cli.md, issue 16): the secret is
positional, a value comes from ``--value-file`` (``-``: stdin), ``--out`` prints no
payload, stages print one way, the old ``--value-stdin`` still works with one
deprecation line, and errors with ``--json`` are one JSON line with a code.
Through the real CLI (subprocesses), few calls."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from engine.settings import Settings
from handlers.csms.cli import register, stage_map, version_stages
from tests.helpers import run_dew

ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:\+00:00|Z)"  # engine.models.iso


def secrets(settings: Settings, *args: str, input: str | None = None) -> tuple[int, str, str]:
    done = run_dew(settings, "secrets", *args, input=input)
    return done.returncode, done.stdout, done.stderr


def test_stages_print_one_way() -> None:
    assert stage_map({"BLUE": "v2", "SYSPREVIOUS": "v1", "SYSCURRENT": "v2"}) == (
        "SYSCURRENT=v2 SYSPREVIOUS=v1 BLUE=v2")
    assert version_stages(["SYSCURRENT", "BLUE"]) == "SYSCURRENT,BLUE"
    assert (stage_map({}), version_stages([])) == ("-", "-")


def test_every_secrets_option_and_verb_has_help_text() -> None:
    commands = argparse.ArgumentParser().add_subparsers(dest="command")
    register(commands, {})
    [verbs] = [a for a in commands.choices["secrets"]._actions
               if isinstance(a, argparse._SubParsersAction)]
    assert all(choice.help for choice in verbs._choices_actions)
    missing = [(verb, a.dest) for verb, sub in verbs.choices.items() for a in sub._actions
               if not a.help or a.help == argparse.SUPPRESS]
    assert missing == []


def test_new_grammar_old_spelling_out_and_json_errors(settings: Settings,
                                                      tmp_path: Path) -> None:
    code, out, err = secrets(settings, "create", "g.s", "--value-file", "-", "--project",
                             "p1", input="first")
    assert code == 0, err
    assert re.search(r"^stages +SYSCURRENT=v1$", out, re.M)
    assert re.search(rf"^created +{ISO_UTC}$", out, re.M)

    # The old spelling still works, and says once what to use instead.
    code, out, err = secrets(settings, "put-version", "g.s", "--value-stdin", "--project",
                             "p1", input="second")
    assert code == 0
    assert err == ("dew: warning: --value-stdin is deprecated and will be removed in the "
                   "next release; use --value-file -\n")
    assert re.search(r"^stages +SYSCURRENT$", out, re.M)

    code, out, _ = secrets(settings, "set-stage", "g.s", "--stage", "BLUE", "--version-id",
                           "v2", "--project", "p1")
    assert code == 0
    assert re.search(r"^stages +SYSCURRENT=v2 SYSPREVIOUS=v1 BLUE=v2$", out, re.M)
    code, out, _ = secrets(settings, "versions", "g.s", "--project", "p1")
    assert re.search(rf"^v2 +{ISO_UTC}  SYSCURRENT,BLUE$", out, re.M), out

    # --out: the value goes to the file only; text is one summary line, JSON has no value.
    target = tmp_path / "value"
    code, out, err = secrets(settings, "get", "g.s", "--out", str(target), "--project", "p1")
    assert (code, err) == (0, "")
    assert target.read_bytes() == b"second" and target.stat().st_mode & 0o077 == 0
    assert out == f"wrote the value of g.s v2 (6 bytes) to {target}\n"
    code, out, _ = secrets(settings, "get", "g.s", "--stage", "SYSPREVIOUS", "--out",
                           str(target), "--json", "--project", "p1")
    assert json.loads(out) == {"name": "g.s", "version_id": "v1", "stages": ["SYSPREVIOUS"],
                               "out": str(target), "bytes": 5}
    assert target.read_bytes() == b"first"


def test_json_errors_and_a_duplicate_secret_exits_like_a_duplicate_alias(
    settings: Settings,
) -> None:
    assert secrets(settings, "create", "d.s", "--generate")[0] == 0
    # A name already taken is refused by the store's state: exit 1, as a taken key alias.
    code, out, err = secrets(settings, "create", "d.s", "--generate", "--json")
    assert (code, out) == (1, "")
    assert json.loads(err)["error"]["code"] == "secret_exists"
    code, out, err = secrets(settings, "get", "nope", "--json")
    assert (code, out) == (2, "")
    error = json.loads(err)["error"]
    assert error["code"] == "secret_not_found" and set(error) == {"code", "message", "fix"}
    code, _, err = secrets(settings, "delete", "d.s", "--json")
    assert code == 2 and json.loads(err)["error"]["code"] == "usage"
    assert "--recovery-days" in json.loads(err)["error"]["message"]
