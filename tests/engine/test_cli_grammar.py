"""Engine-wide CLI behaviour (docs/cli.md): exit codes by error class, JSON errors,
configuration that refuses typos, helpful refusals, `dew tasks cancel`, id prefixes,
and help text on every option. Through the real CLI (a subprocess) unless a unit."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from engine import cli
from engine.errors import (
    BackendUnavailable,
    ConfigError,
    Conflict,
    DewError,
    InternalError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    UnknownJob,
    exit_code,
)
from engine.models import FailureRecord, utcnow
from engine.settings import Settings
from engine.store import open_store
from tests.helpers import ROOT, WorkerProcess, dew_env, run_dew


def dew(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``dew`` with extra environment variables."""
    return subprocess.run([sys.executable, "-m", "engine.cli", *args],
                          env=dew_env(settings, **env), cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def json_error(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    error = json.loads(lines[0])["error"]
    assert set(error) == {"code", "message", "fix"}
    return dict(error)


# --------------------------------------------------------------------------- exit codes


def test_exit_codes_are_decided_by_class_alone() -> None:
    """One function maps every error; subclasses (a taken name) cannot differ."""

    class NameTaken(Conflict):
        code = "name_taken"
        exit_code = 2  # ignored: a Conflict is exit 1, whatever a subclass says

    assert exit_code(InvalidInput("x")) == 2
    assert exit_code(ConfigError("x")) == 2
    assert exit_code(UnknownJob("x")) == 2
    assert exit_code(NotFound("x")) == 2
    for error in (Conflict("x"), NameTaken("x"), BackendUnavailable("x"),
                  PermissionDenied("x"), InternalError("x"), DewError("x")):
        assert exit_code(error) == 1, error
    # A failed task's stored error keeps its class's code.
    assert exit_code(DewError.from_dict(NameTaken("x").to_dict())) == 1


def test_the_exit_code_table_holds_through_the_cli(settings: Settings) -> None:
    assert run_dew(settings, "init").returncode == 0
    assert run_dew(settings, "tasks", "list").returncode == 0  # 0 ok
    bad = run_dew(settings, "enqueue", "engine.echo", "--args", "{nope")  # InvalidInput
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    unknown = run_dew(settings, "tasks", "show", "nosuchtask")  # NotFound
    assert unknown.returncode == 2 and "dew tasks list" in unknown.stderr
    config = dew(settings, "tasks", "list", DEW_WORKR_MAX_JOBS="3")  # ConfigError
    assert config.returncode == 2 and "DEW_WORKR_MAX_JOBS" in config.stderr
    job = run_dew(settings, "enqueue", "engine.nope")  # UnknownJob: points to `dew jobs`
    assert job.returncode == 2 and "`dew jobs`" in job.stderr
    # Conflict (refused by state): cancelling a task that has ended.
    task_id = _deferred_task(settings)
    assert run_dew(settings, "tasks", "cancel", task_id).returncode == 0
    again = run_dew(settings, "tasks", "cancel", task_id)
    assert again.returncode == 1 and "nothing to cancel" in again.stderr
    # BackendUnavailable: Redis down and no worker.
    dead = settings.replace(redis={"url": "redis://:secretpw@127.0.0.1:1/0"})
    down = run_dew(dead, "enqueue", "engine.echo", "--args", '{"value": 1}', "--wait",
                   "--timeout", "1")
    assert down.returncode == 1 and "secretpw" not in down.stderr
    assert "no worker is running" in down.stderr


def test_json_errors_are_one_json_line_with_a_code(settings: Settings) -> None:
    run_dew(settings, "init")
    unknown = run_dew(settings, "tasks", "show", "nosuchtask", "--json")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert json_error(unknown)["code"] == "not_found"
    usage = run_dew(settings, "tasks", "list", "--status", "lost", "--json")
    assert usage.returncode == 2 and json_error(usage)["code"] == "usage"
    bad = run_dew(settings, "enqueue", "engine.echo", "--args", "[1]", "--json")
    assert bad.returncode == 2 and json_error(bad)["code"] == "invalid_parameter"
    task_id = _deferred_task(settings)
    run_dew(settings, "tasks", "cancel", task_id)
    again = run_dew(settings, "tasks", "cancel", task_id, "--json")
    error = json_error(again)
    assert again.returncode == 1 and error["code"] == "task_not_cancellable"
    # Without --json the same error is plain text.
    plain = run_dew(settings, "tasks", "show", "nosuchtask")
    assert plain.stderr.startswith("dew: error: no task with id 'nosuchtask'")


# --------------------------------------------------------------------------- configuration


def test_a_state_dir_that_does_not_exist_is_refused_and_nothing_written(
    settings: Settings, tmp_path: Path,
) -> None:
    typo = settings.replace(engine={"state_dir": tmp_path / "vra"})
    for args in (("tasks", "list"), ("failures", "list"), ("jobs",),
                 ("enqueue", "engine.echo", "--args", '{"value": 1}')):
        done = run_dew(typo, *args)
        assert done.returncode == 2, done
        assert "state directory" in done.stderr and "does not exist" in done.stderr
        assert "dew init" in done.stderr and done.stdout == ""
        assert not (tmp_path / "vra").exists()
    # `make down` on a fresh checkout stops nothing and writes nothing.
    down = run_dew(typo, "stack", "down")
    assert down.returncode == 0 and "nothing is running" in down.stdout
    assert not (tmp_path / "vra").exists()


def test_unknown_dew_variables_are_refused_like_unknown_toml_keys(settings: Settings) -> None:
    for var, says in (("DEW_WORKR_MAX_JOBS", "no settings section [workr]"),
                      ("DEW_WORKER_MAX_JOB", "no setting worker.max_job"),
                      ("DEW_STATEDIR", "no settings section [statedir]")):
        done = dew(settings, "tasks", "list", **{var: "3"})
        assert done.returncode == 2, done
        assert f"unknown variable {var}" in done.stderr and says in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    # Variables read where they are used are not settings, and not refused.
    run_dew(settings, "init")
    for var in ("DEW_USER", "DEW_KEEP_TEST_USER", "DEW_TEST_ANYTHING"):
        done = dew(settings, "tasks", "list", **{var: "x"})
        assert done.returncode == 0, (var, done.stderr)


def test_config_is_accepted_before_or_after_the_sub_command(
    settings: Settings, tmp_path: Path,
) -> None:
    run_dew(settings, "init")
    bad = tmp_path / "bad.toml"
    bad.write_text("[worker]\nmax_jobs = 'lots'\n")
    for args in (("--config", str(bad), "tasks", "list"), ("tasks", "list", "--config", str(bad)),
                 ("tasks", "list", f"--config={bad}")):
        done = run_dew(settings, *args)
        assert done.returncode == 2 and "worker.max_jobs must be a whole number" in done.stderr
    good = tmp_path / "good.toml"
    good.write_text("[worker]\nmax_jobs = 7\n")
    done = run_dew(settings, "tasks", "list", "--json", "--config", str(good))
    assert done.returncode == 0 and json.loads(done.stdout) == []


def test_hoisting_config_keeps_everything_else_in_order() -> None:
    assert cli.hoist_config(["tasks", "list", "--config", "a.toml", "--json"]) == [
        "--config", "a.toml", "tasks", "list", "--json"]
    assert cli.hoist_config(["enqueue", "x", "--", "--config"]) == [
        "enqueue", "x", "--", "--config"]


# --------------------------------------------------------------------------- helpful refusals


def test_waiting_with_no_worker_says_so_and_how_to_start_one(settings: Settings) -> None:
    run_dew(settings, "init")
    started = time.monotonic()
    done = run_dew(settings, "enqueue", "engine.echo", "--args", '{"value": 1}', "--wait")
    # No --timeout: it gives up after worker.heartbeat_timeout (2 s in the tests).
    assert time.monotonic() - started < 30
    assert done.returncode == 1, done
    assert "no worker is running: start one with `make up` (or `dew worker`)" in done.stderr
    assert "wait longer" not in done.stderr and "Traceback" not in done.stderr
    # The task is kept for a worker started later.
    listed = json.loads(run_dew(settings, "tasks", "list", "--json").stdout)
    assert [t["status"] for t in listed] == ["queued"]


# --------------------------------------------------------------------------- tasks


def _deferred_task(settings: Settings, seconds: float = 3600, task_id: str | None = None) -> str:
    args = ["enqueue", "engine.echo", "--args", '{"value": 1}', "--defer", str(seconds)]
    if task_id is not None:
        args += ["--task-id", task_id]
    done = run_dew(settings, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_deferred_task_shows_when_it_runs(settings: Settings) -> None:
    task_id = _deferred_task(settings)
    shown = json.loads(run_dew(settings, "tasks", "show", task_id, "--json").stdout)
    assert shown["status"] == "queued" and shown["due_at"] > shown["enqueued_at"]
    text = run_dew(settings, "tasks", "show", task_id).stdout
    assert "runs at" in text and shown["due_at"][:10] in text
    assert "runs at" in run_dew(settings, "tasks", "list").stdout


def test_cancel_stops_a_deferred_task_from_running(
    settings: Settings, worker: WorkerProcess,
) -> None:
    task_id = _deferred_task(settings, seconds=1.5)
    done = run_dew(settings, "tasks", "cancel", task_id, "--json")
    assert done.returncode == 0, done.stderr
    cancelled = json.loads(done.stdout)
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
    # Past its time the worker has had it delivered, and skipped it.
    time.sleep(4)
    shown = json.loads(run_dew(settings, "tasks", "show", task_id, "--json").stdout)
    assert shown["status"] == "cancelled" and shown["attempts"] == 0
    assert shown["started_at"] is None and shown["result"] is None
    listed = json.loads(run_dew(settings, "tasks", "list", "--status", "cancelled",
                                "--json").stdout)
    assert [t["task_id"] for t in listed] == [task_id]
    # A task that is not deferred still runs (the worker is alive).
    ran = run_dew(settings, "enqueue", "engine.echo", "--args", '{"value": 2}', "--wait",
                  "--json", "--timeout", "30")
    assert ran.returncode == 0 and json.loads(ran.stdout)["status"] == "succeeded"
    # Cancelling it now is refused: it has ended.
    ended = run_dew(settings, "tasks", "cancel", json.loads(ran.stdout)["task_id"])
    assert ended.returncode == 1 and "succeeded" in ended.stderr
    # A cancelled task is not retried.
    retry = run_dew(settings, "tasks", "retry", task_id)
    assert retry.returncode == 1 and "cancelled, not failed" in retry.stderr


def test_cancel_refuses_a_running_task(settings: Settings, worker: WorkerProcess) -> None:
    task_id = run_dew(settings, "enqueue", "engine.sleep", "--args",
                      '{"seconds": 4}').stdout.strip()
    deadline = time.monotonic() + 20
    while json.loads(run_dew(settings, "tasks", "show", task_id, "--json").stdout)[
            "status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    done = run_dew(settings, "tasks", "cancel", task_id)
    assert done.returncode == 1 and "is running" in done.stderr


def test_task_and_failure_ids_by_unique_prefix(settings: Settings) -> None:
    run_dew(settings, "init")
    stem = uuid.uuid4().hex[:6]
    first = _deferred_task(settings, task_id=f"{stem}a-one")
    second = _deferred_task(settings, task_id=f"{stem}b-two")
    shown = json.loads(run_dew(settings, "tasks", "show", f"{stem}a", "--json").stdout)
    assert shown["task_id"] == first
    ambiguous = run_dew(settings, "tasks", "show", stem)
    assert ambiguous.returncode == 2 and "ambiguous" in ambiguous.stderr
    assert first in ambiguous.stderr and second in ambiguous.stderr
    assert len(ambiguous.stderr.strip().splitlines()) == 1
    short = run_dew(settings, "tasks", "show", stem[:5])
    assert short.returncode == 2 and "at least 6 characters" in short.stderr
    assert run_dew(settings, "tasks", "cancel", f"{stem}b").returncode == 0
    assert json.loads(run_dew(settings, "tasks", "show", second, "--json").stdout)[
        "status"] == "cancelled"
    assert run_dew(settings, "tasks", "retry", stem).returncode == 2

    async def add_failures() -> None:
        store = await open_store(settings)
        try:
            for suffix in ("x1", "x2", "y3"):
                await store.add_failure(FailureRecord(
                    f"{stem}f{suffix}", first, "engine.echo", None, "state", "boom", "boom",
                    "", "", utcnow()))
        finally:
            await store.close()

    asyncio.run(add_failures())
    shown = json.loads(run_dew(settings, "failures", "show", f"{stem}fy", "--json").stdout)
    assert shown["failure_id"] == f"{stem}fy3"
    ambiguous = run_dew(settings, "failures", "delete", f"{stem}fx")
    assert ambiguous.returncode == 2 and "ambiguous" in ambiguous.stderr
    deleted = run_dew(settings, "failures", "delete", f"{stem}fx1", "--json")
    assert json.loads(deleted.stdout) == {"deleted": 1}
    assert run_dew(settings, "failures", "delete", f"{stem}fx").returncode == 0


# --------------------------------------------------------------------------- help texts


def _walk(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, str]]:
    """(command path, option) of every option and sub-command without help text."""
    missing: list[tuple[str, str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            for name, sub in action.choices.items():
                if name not in helped:
                    missing.append((path, f"command {name}"))
                missing.extend(_walk(sub, f"{path} {name}"))
            continue
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append((path, "/".join(action.option_strings) or action.dest))
    return missing


ENGINE_COMMANDS = {"init", "worker", "jobs", "enqueue", "tasks", "failures", "stack", "api"}


def _missing_help() -> list[tuple[str, str]]:
    return _walk(cli.build_parser(), "dew")


def test_every_engine_option_has_help_text() -> None:
    missing = [(path, option) for path, option in _missing_help()
               if path == "dew" or path.split()[1] in ENGINE_COMMANDS]
    assert missing == []


def test_every_service_option_has_help_text() -> None:
    missing = [(path, option) for path, option in _missing_help()
               if path != "dew" and path.split()[1] not in ENGINE_COMMANDS]
    assert missing == []


def _verbs(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
           ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every leaf command under ``parser`` with its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    return [leaf for name, sub in subs[0].choices.items() for leaf in _verbs(sub, (*path, name))]


# Long-running processes: they print logs, not a result.
NO_JSON = {("worker",), ("api",)}


def test_every_verb_accepts_json_and_its_usage_errors_are_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Walks `dew --help`: every verb has --json; a usage error with it is one JSON line
    with a code, exit 2 (in-process: argparse refuses before anything runs)."""
    monkeypatch.setenv("DEW_STATE_DIR", str(tmp_path / "none"))
    verbs = _verbs(cli.build_parser())
    assert len(verbs) > 80
    for path, parser in verbs:
        if path in NO_JSON:
            continue
        assert "--json" in parser._option_string_actions, f"dew {' '.join(path)}"
        with pytest.raises(SystemExit) as refused:  # argparse's exit, as in the real CLI
            cli.main([*path, "--json", "--no-such-option"])
        assert refused.value.code == 2, path
        captured = capsys.readouterr()
        assert captured.out == "", path
        error = json.loads(captured.err.strip().splitlines()[-1])["error"]
        assert error["code"] == "usage" and error["message"], path
    assert not (tmp_path / "none").exists()
