"""``dew schedules`` follows the CLI grammar (docs/cli.md, issue 16): the schedule is
positional, job arguments come from ``--args-file`` (``-``: stdin), ``--kind``
replaces ``--builtin``/``--user`` (which still work, with one deprecation line),
times print as ISO 8601 UTC, and errors with ``--json`` are one JSON line with a
code. Through the real CLI (subprocesses), few calls."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from engine.settings import Settings
from schedules.cli import register
from tests.helpers import run_dew

ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:\+00:00|Z)"  # engine.models.iso


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Only what these commands need: each `dew` then starts without the KMS, CSMS or KPS.
    return settings.replace(engine={"services": ["handlers.builtin", "schedules"]})


def test_every_schedules_option_and_verb_has_help_text() -> None:
    commands = argparse.ArgumentParser().add_subparsers(dest="command")
    register(commands, {})
    [verbs] = [a for a in commands.choices["schedules"]._actions
               if isinstance(a, argparse._SubParsersAction)]
    assert all(choice.help for choice in verbs._choices_actions)
    missing = [(verb, a.dest) for verb, sub in verbs.choices.items() for a in sub._actions
               if not a.help or a.help == argparse.SUPPRESS]
    assert missing == []


def test_new_grammar_old_spellings_and_json_errors(settings: Settings) -> None:
    added = run_dew(settings, "schedules", "add", "nightly", "--cron", "0 3 * * *", "--job",
                    "engine.sleep", "--args-file", "-", input='{"seconds": 0}')
    assert added.returncode == 0, added.stderr
    assert re.search(rf"^next_run +{ISO_UTC}$", added.stdout, re.M)
    assert re.search(r"^paused +no$", added.stdout, re.M)

    new = run_dew(settings, "schedules", "list", "--kind", "user")
    assert new.returncode == 0 and new.stderr == ""
    assert re.search(rf"^nightly +0 3 \* \* \* +UTC +{ISO_UTC}  engine.sleep$", new.stdout,
                     re.M), new.stdout
    # The old spelling still works, and says once what to use instead.
    old = run_dew(settings, "schedules", "list", "--user")
    assert (old.returncode, old.stdout) == (0, new.stdout)
    assert old.stderr == ("dew: warning: --user is deprecated and will be removed in the "
                          "next release; use --kind user\n")

    missing = run_dew(settings, "schedules", "pause", "nosuch", "--json")
    assert (missing.returncode, missing.stdout) == (2, "")
    error = json.loads(missing.stderr)["error"]
    assert error["code"] == "not_found" and set(error) == {"code", "message", "fix"}
    usage = run_dew(settings, "schedules", "list", "--kind", "mine", "--json")
    assert usage.returncode == 2 and json.loads(usage.stderr)["error"]["code"] == "usage"
