"""The ``dew`` CLI: JSON shapes, exit codes, and one-line errors that change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.settings import Settings
from tests.helpers import WorkerProcess, run_dew


def assert_bad_input(settings: Settings, *args: str, message: str) -> None:
    result = run_dew(settings, *args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("enqueue", "engine.nope"), "unknown job name 'engine.nope'"),
        (("tasks", "list", "--name", "\udcff"), "argument 4 is not valid UTF-8"),
        (("enqueue", "engine.echo", "--args-file", "/nonexistent/a.json"),
         "cannot read --args-file /nonexistent/a.json: No such file or directory"),
        (("enqueue", "engine.echo", "--args", "{}", "--args-file", "-"),
         "give either --args or --args-file"),
        (("failures", "show", "x\udcfe"), "argument 3 is not valid UTF-8"),
        (("enqueue", "engine.echo", "--args", '{"value":' + "[" * 40 + "]" * 40 + "}"),
         "job arguments nest deeper than 32 levels"),
        (("enqueue", "engine.echo", "--args", '{"value":' + "[" * 5000 + "]" * 5000 + "}"),
         "--args nests too deeply"),
        (("enqueue", "engine.echo", "--args", "[1, 2]"), "must be a JSON object"),
        (("enqueue", "engine.echo", "--args", "{nope"), "--args is not valid JSON"),
        (("enqueue", "engine.echo", "--args", "{}"), "engine.echo needs a 'value'"),
        (("enqueue", "engine.sleep", "--args", '{"seconds": -1}'), "'seconds' must be between"),
        (("enqueue", "engine.echo", "--args", '{"value":1}', "--task-id", "a b"),
         "invalid task id"),
        (("enqueue", "engine.echo", "--args", '{"value":1}', "--defer", "-3"), "--defer"),
        (("enqueue", "engine.echo", "--args", '{"value":1}', "--timeout", "3"),
         "--timeout needs --wait"),
        (("tasks", "list", "--status", "lost"), "invalid choice: 'lost'"),
        (("tasks", "list", "--limit", "0"), "--limit must be between"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("failures", "delete"), "give either a failure id or --all"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    settings: Settings, args: tuple[str, ...], message: str
) -> None:
    assert_bad_input(settings, *args, message=message)
    # Not even the task store or a log file.
    assert not settings.db_path.exists() and not settings.log_file.exists()


def test_unknown_ids(settings: Settings) -> None:
    run_dew(settings, "init")
    before = settings.db_path.read_bytes()
    assert_bad_input(settings, "tasks", "show", "nope", message="no task with id 'nope'")
    assert_bad_input(settings, "failures", "show", "nope", message="no failure record")
    assert_bad_input(settings, "failures", "delete", "nope", message="no failure record")
    assert settings.db_path.read_bytes() == before


def test_unreadable_config(settings: Settings, tmp_path: Path) -> None:
    assert_bad_input(settings, "--config", str(tmp_path / "none.toml"), "tasks", "list",
                     message="cannot read config file")
    bad = tmp_path / "bad.toml"
    bad.write_text("[worker]\nmax_jobs = 'lots'\n")
    assert_bad_input(settings, "--config", str(bad), "tasks", "list",
                     message="worker.max_jobs must be a whole number")


def test_init_creates_state(settings: Settings) -> None:
    result = run_dew(settings, "init")
    assert result.returncode == 0, result.stderr
    assert settings.db_path.exists()


def test_redis_down_is_a_clear_error_not_a_traceback(settings: Settings) -> None:
    dead = settings.replace(redis={"url": "redis://:pw@127.0.0.1:1/0"})
    result = run_dew(dead, "enqueue", "engine.echo", "--args", '{"value": 1}', "--wait",
                     "--timeout", "1")
    # The task is kept in the outbox; waiting for it times out with a clear message.
    assert result.returncode == 1
    assert "still queued after 1.0 s" in result.stderr and "Traceback" not in result.stderr


def test_enqueue_wait_tasks_and_failures(settings: Settings, worker: WorkerProcess) -> None:
    ok = run_dew(settings, "enqueue", "engine.echo", "--args", '{"value": [1, 2]}',
                 "--task-id", "cli-ok", "--wait", "--json")
    assert ok.returncode == 0, ok.stderr
    task = json.loads(ok.stdout)
    assert set(task) == {"task_id", "name", "args", "status", "attempts", "enqueued_at",
                         "due_at", "started_at", "finished_at", "result", "error", "project",
                         "retry_of", "cancel_requested_at", "cancel_requested_by"}
    # engine.echo's value is a declared secret: its result is kept redacted.
    assert (task["task_id"], task["status"], task["result"]) == (
        "cli-ok", "succeeded", "***redacted***")

    again = run_dew(settings, "enqueue", "engine.echo", "--args", '{"value": [1, 2]}',
                    "--task-id", "cli-ok", "--json")
    assert json.loads(again.stdout) == {"task_id": "cli-ok"}

    failed = run_dew(settings, "enqueue", "engine.fail", "--args", '{"message": "nope"}',
                     "--wait")
    assert failed.returncode == 1 and "status    failed" in failed.stdout

    listed = json.loads(run_dew(settings, "tasks", "list", "--json").stdout)
    assert [t["name"] for t in listed] == ["engine.fail", "engine.echo"]
    only = json.loads(run_dew(settings, "tasks", "list", "--status", "failed", "--json").stdout)
    assert [t["name"] for t in only] == ["engine.fail"]
    shown = json.loads(run_dew(settings, "tasks", "show", "cli-ok", "--json").stdout)
    assert shown["result"] == "***redacted***" and shown["args"] == {"value": "***redacted***"}
    human = run_dew(settings, "tasks", "show", listed[0]["task_id"])
    assert "failure " in human.stdout and "nope" in human.stdout

    records = json.loads(run_dew(settings, "failures", "list", "--json").stdout)
    assert len(records) == 1
    record = records[0]
    assert set(record) == {"failure_id", "task_id", "operation", "target", "category", "code",
                           "error", "cause", "fix", "created_at", "retried_at",
                           "retried_by", "retry_task_id"}
    assert (record["operation"], record["error"]) == ("engine.fail", "nope")
    assert run_dew(settings, "failures", "show", record["failure_id"]).returncode == 0
    deleted = run_dew(settings, "failures", "delete", record["failure_id"])
    assert deleted.returncode == 0
    assert json.loads(run_dew(settings, "failures", "list", "--json").stdout) == []
    # Deleting a record changes nothing else.
    assert json.loads(run_dew(settings, "tasks", "show", record["task_id"], "--json").stdout)[
        "status"] == "failed"

    for _ in range(2):
        run_dew(settings, "enqueue", "engine.fail", "--args", "{}", "--wait")
    cleared = run_dew(settings, "failures", "delete", "--all", "--json")
    assert json.loads(cleared.stdout) == {"deleted": 2}


def test_job_arguments_from_a_file_or_stdin(settings: Settings, tmp_path: Path,
                                            worker: WorkerProcess) -> None:
    """Secrets need not appear on the command line (other users see /proc/*/cmdline)."""
    path = tmp_path / "args.json"
    path.write_text('{"seconds": 0.01}')
    done = run_dew(settings, "enqueue", "engine.sleep", "--args-file", str(path), "--wait",
                   "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 0.01
    done = run_dew(settings, "enqueue", "engine.sleep", "--args-file", "-", "--wait", "--json",
                   input='{"seconds": 0.02}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 0.02
