"""``dew schedules`` end to end, as operators run it (subprocesses)."""

from __future__ import annotations

import json
import re

import pytest

from engine.settings import Settings
from tests.helpers import run_dew

SLEEP = '{"seconds": 0}'
# Only what these commands need: each `dew` then starts without the KMS, CSMS or KPS.
SERVICES = ["handlers.builtin", "schedules"]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(engine={"services": SERVICES})


def dew_json(settings: Settings, *args: str) -> object:
    done = run_dew(settings, "schedules", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


BAD = [
    (["--cron", "61 * * * *"], "cron expression '61 * * * *' does not parse"),
    (["--cron", "* * * *"], "does not parse: it needs 5 fields"),
    (["--cron", "0 0 30 2 *"], "cron expression '0 0 30 2 *' has no future slot"),
    (["--timezone", "Mars/Olympus_Mons"], "unknown timezone 'Mars/Olympus_Mons'"),
    (["--timezone", "../../etc/passwd"], "unknown timezone"),
    (["--job", "nope.job"], "unknown job name 'nope.job'"),
    (["--args", '{"seconds": -1}'], "'seconds' must be between 0 and 3600"),
    (["--args", "[1]"], "job arguments must be a JSON object"),
    (["--args", "{"], "--args is not valid JSON"),
    (["--job", "engine.echo", "--args", '{"value": 1}'], "job engine.echo has secret arguments"),
    (["--args", '{"seconds": 0, "account": "other"}'], "args.account is 'other'"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(
    settings: Settings, change: list[str], message: str,
) -> None:
    options = {"--cron": "* * * * *", "--job": "engine.sleep", "--args": SLEEP}
    for flag, value in zip(change[::2], change[1::2], strict=True):
        options[flag] = value
    argv = ["schedules", "add", "s1"] + [w for kv in options.items() for w in kv]
    done = run_dew(settings, *argv)
    assert done.returncode == 2, done.stdout
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert dew_json(settings, "list", "--kind", "user") == []


def test_the_verbs_end_to_end(settings: Settings) -> None:
    rec = dew_json(settings, "add", "nightly", "--cron", "0 3 * * *", "--timezone",
                   "Europe/Berlin", "--job", "engine.sleep", "--args", SLEEP, "--catch-up")
    assert isinstance(rec, dict)
    assert (rec["name"], rec["cron"], rec["timezone"], rec["job"], rec["args"],
            rec["catch_up"], rec["paused"], rec["project"]) == (
        "nightly", "0 3 * * *", "Europe/Berlin", "engine.sleep", {"seconds": 0}, True, False,
        "default")
    assert rec["created_by"].startswith("cli:")
    assert rec["next_run"][11:16] in ("01:00", "02:00")  # 03:00 in Berlin, in UTC
    sid = rec["schedule_id"]

    again = run_dew(settings, "schedules", "add", "nightly", "--cron", "* * * * *", "--job",
                    "engine.sleep", "--args", SLEEP)
    assert again.returncode == 1 and "already has a schedule named 'nightly'" in again.stderr
    # Another project has its own names.
    other = dew_json(settings, "add", "nightly", "--project", "shop", "--cron", "* * * * *",
                     "--job", "engine.sleep", "--args", '{"seconds": 0, "account": "shop"}')
    assert isinstance(other, dict) and other["project"] == "shop"

    rows = dew_json(settings, "list")
    assert isinstance(rows, list)
    assert [r["name"] for r in rows if r["kind"] == "builtin"] == [
        "engine.sweep_outbox", "schedules.fire_due"]
    assert [(r["name"], r["schedule_id"]) for r in rows if r["kind"] == "user"] == [
        ("nightly", sid)]
    text = run_dew(settings, "schedules", "list", "--kind", "user")
    assert re.search(r"nightly\s+0 3 \* \* \*\s+Europe/Berlin\s+\S+\s+engine.sleep", text.stdout)

    paused = dew_json(settings, "pause", "nightly")
    assert isinstance(paused, dict) and paused["paused"] is True and paused["next_run"] is None
    resumed = dew_json(settings, "resume", "nightly")
    assert isinstance(resumed, dict) and resumed["paused"] is False and resumed["next_run"]

    ran = dew_json(settings, "run-now", "nightly")
    assert isinstance(ran, dict)
    assert ran["task_id"].startswith(f"sched-{sid}-now-") and ran["task_status"] == "queued"
    shown = dew_json(settings, "show", "nightly")
    assert isinstance(shown, dict)
    assert [(f["kind"], f["task_id"], f["status"]) for f in shown["firings"]] == [
        ("run-now", ran["task_id"], "queued")]
    human = run_dew(settings, "schedules", "show", "nightly")
    assert "last firings" in human.stdout and ran["task_id"] in human.stdout
    task = run_dew(settings, "tasks", "show", ran["task_id"], "--json")
    assert json.loads(task.stdout)["name"] == "engine.sleep"

    gone = dew_json(settings, "delete", "nightly")
    assert gone == {"deleted": "nightly", "schedule_id": sid, "project": "default"}
    missing = run_dew(settings, "schedules", "show", "nightly")
    assert missing.returncode == 2 and "no schedule named 'nightly'" in missing.stderr
    assert dew_json(settings, "list", "--kind", "user") == []
    assert [r["name"] for r in dew_json(settings, "list", "--kind", "user", "--project",  # type: ignore[union-attr]
                                        "shop")] == ["nightly"]
