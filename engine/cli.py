"""The ``dew`` command line (docs/cli.md).

Exit codes (``engine.errors.exit_code``, the one mapping): 0 success; 1 the
operation failed or its target's state refused it (a task failed, a name is
taken, a backend is down); 2 bad input or an unknown object (unknown job, bad
JSON, unknown id, unreadable config), in which case nothing was written; 130
interrupted. Errors are one line on stderr (two with a ``fix:``), never a
traceback; with ``--json`` they are one JSON line ``{"error": {"code", "message",
"fix"}}`` on stderr, and results are JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence

from engine import render
from engine.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    ConfigError,
    DewError,
    InvalidInput,
    NotFound,
    exit_code,
)
from engine.private import private_umask
from engine.services import ServiceSpec, configured_packages, load_part, load_specs

# typing costs every `dew` start ~8 ms; annotations are strings here, so only mypy needs it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

    from engine.settings import Settings
    from engine.store import TaskStore

Command = Callable[[argparse.Namespace, "Settings"], Awaitable[int] | int]
# Kept in step with engine.models.TASK_STATUSES (a test checks): importing the
# models here would cost every `dew --help` the dataclasses machinery.
TASK_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
# Engine command groups declared like a service's commands: their parsers are built
# (and their modules imported) only when they run, so `dew --help` stays cheap.
ENGINE_GROUPS = (
    ServiceSpec("iam", commands={"iam": "identities of the HTTPS API: projects, users, "
                                        "access keys, roles"}, cli="engine.iam.cli"),
    # One HSM for several nodes: `dew hsm serve` exports this node's token (p11-kit).
    ServiceSpec("hsm", commands={"hsm": "share this node's HSM token with other nodes "
                                        "(p11-kit server)"}, cli="engine.hsm_serve"),
)


# Whether errors are printed as JSON (``--json`` anywhere on the command line); set
# by ``main`` before parsing, so that usage errors follow it too.
_json_errors = False


# argparse asks gettext for a translation of each of its ~200 strings (a file search
# each, ~10 ms of a `dew kms` start); Python ships no catalogue for them.
setattr(argparse, "_", str)  # noqa: B010


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        report_error(InvalidInput(message, code="usage", fix=f"See `{self.prog} --help`."),
                     _json_errors, usage_of=self.prog)
        sys.exit(EXIT_BAD_INPUT)


def report_error(exc: DewError, as_json: bool, usage_of: str | None = None) -> None:
    """An error on stderr: one line (two with a specific ``fix:``), or with
    ``as_json`` one line ``{"error": {"code", "message", "fix"}}``."""
    if as_json:
        sys.stderr.write(json.dumps({"error": {"code": exc.code, "message": exc.message,
                                               "fix": exc.fix}}) + "\n")
        return
    if usage_of is not None:
        sys.stderr.write(f"dew: error: {exc.message} (see `{usage_of} --help`)\n")
        return
    sys.stderr.write(f"dew: error: {exc.message}\n")
    # Bad input is one line (its message says what to do instead); an operational
    # error also says what to do.
    if exc.fix and exit_code(exc) != EXIT_BAD_INPUT:
        sys.stderr.write(f"dew: fix: {exc.fix}\n")


def _project_names(args: argparse.Namespace, settings: Settings) -> None:
    """A ``--project`` given as a 32-hex project id becomes the project's name, which
    is what the services call the account (the API names projects by id)."""
    ref = getattr(args, "account", None)
    if isinstance(ref, str) and len(ref) == 32 and all(c in "0123456789abcdef" for c in ref):
        import asyncio

        from engine.iam.service import resolve_project

        args.account = asyncio.run(resolve_project(settings, ref))


ID_PREFIX = 6  # the shortest id prefix accepted for a whole id
TASK_ID_HELP = f"the task's id, or a unique prefix of it (at least {ID_PREFIX} characters)"
FAILURE_ID_HELP = (f"the failure record's id, or a unique prefix of it (at least {ID_PREFIX} "
                   "characters)")


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print JSON (errors too: one JSON line on stderr)")


def _task_id_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task_id", metavar="TASK", help=TASK_ID_HELP)


def _project_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", dest="account", metavar="PROJECT",
                        help="only this project's (name or id; default: every project)")


def retried_by() -> str:
    """Who retries from the command line: ``cli:USER@HOST``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


def build_parser(
    specs: Sequence[ServiceSpec] | None = None, load: Sequence[ServiceSpec] | None = None
) -> ArgumentParser:
    """The parser with the generic verbs and every service's commands (the
    configured services when ``specs`` is None). Only the services in ``load``
    (all when None) get their full sub-commands; the others are listed by name
    and help, so `dew --help` imports no service."""
    if specs is None:
        specs = load_specs(configured_packages(None, os.environ))
    parser = ArgumentParser(prog="dew", description="dew-engine: self-hosted DEW job engine.")
    parser.add_argument("--config", metavar="FILE", help="a TOML file overriding the defaults")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=ArgumentParser)

    _json_option(sub.add_parser("init", help="create the state directory and the task store"))
    p = sub.add_parser("worker", help="run a worker in the foreground")
    p.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    p = sub.add_parser("jobs", help="list the job names this engine knows, with their arguments")
    _json_option(p)

    p = sub.add_parser("enqueue", help="enqueue a job")
    p.add_argument("name", help="job name, e.g. engine.echo")
    p.add_argument("--args", default=None, help="job arguments as a JSON object (visible "
                   "to other local users in the process list: use --args-file for secrets)")
    p.add_argument("--args-file", metavar="FILE", help="job arguments from a JSON file, or "
                   "- for standard input")
    p.add_argument("--task-id", help="idempotency key: the same id twice is one task")
    p.add_argument("--defer", type=float, metavar="SECONDS", help="run no earlier than this")
    p.add_argument("--wait", action="store_true", help="wait and print the final task")
    p.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up after S s")
    _json_option(p)

    tasks = sub.add_parser("tasks", help="inspect, retry and cancel tasks").add_subparsers(
        dest="action", metavar="ACTION", required=True, parser_class=ArgumentParser)
    p = tasks.add_parser("list", help="list tasks, newest first")
    p.add_argument("--status", choices=TASK_STATUSES, help="only tasks in this state")
    p.add_argument("--name", help="only tasks of this job name, e.g. engine.echo")
    _project_option(p)
    p.add_argument("--limit", type=int, default=50, help="at most this many (default: 50)")
    _json_option(p)
    p = tasks.add_parser("show", help="show one task")
    _task_id_argument(p)
    _project_option(p)
    _json_option(p)
    p = tasks.add_parser("retry", help="run a failed task again (as a new task), once its "
                         "cause is fixed")
    _task_id_argument(p)
    _project_option(p)
    _json_option(p)
    p = tasks.add_parser("cancel", help="cancel a task: a queued or deferred one never "
                         "runs; a running one stops at its next safe point, if its job "
                         "has any")
    _task_id_argument(p)
    _project_option(p)
    _json_option(p)

    failures = sub.add_parser("failures", help="inspect and clear failed-task reports")
    fsub = failures.add_subparsers(dest="action", metavar="ACTION", required=True,
                                   parser_class=ArgumentParser)
    p = fsub.add_parser("list", help="list failure records, newest first")
    p.add_argument("--operation", help="only the records of this job, e.g. kps.bind")
    p.add_argument("--task-id", help="only the records of this task (its full id)")
    _project_option(p)
    p.add_argument("--limit", type=int, default=100, help="at most this many (default: 100)")
    _json_option(p)
    p = fsub.add_parser("show", help="show one failure record")
    p.add_argument("failure_id", help=FAILURE_ID_HELP)
    _project_option(p)
    _json_option(p)
    p = fsub.add_parser("delete", help="delete one failure record, or all of them")
    p.add_argument("failure_id", nargs="?", help=FAILURE_ID_HELP)
    p.add_argument("--all", action="store_true", help="every failure record (of --project)")
    _project_option(p)
    _json_option(p)
    p = fsub.add_parser("retry", help="retry the failed task of a failure record (or of "
                        "all records not retried yet), once the cause is fixed")
    p.add_argument("failure_id", nargs="?", help=FAILURE_ID_HELP)
    p.add_argument("--all", action="store_true", help="every record not retried yet")
    p.add_argument("--operation", help="with --all: only the records of this job")
    _project_option(p)
    _json_option(p)

    stack = sub.add_parser("stack", help="the local stack: private Redis, a worker, the API")
    ssub = stack.add_subparsers(dest="action", metavar="ACTION", required=True,
                                parser_class=ArgumentParser)
    for name, text in (("up", "start what is not running"), ("down", "stop what `up` started"),
                       ("status", "show what is running")):
        _json_option(ssub.add_parser(name, help=text))

    p = sub.add_parser("api", help="serve the HTTPS API (the official DEW SDKs' protocol)")
    p.add_argument("--listen", metavar="HOST:PORT", help="override [api] listen "
                   "(e.g. 127.0.0.1:8443, [::1]:8443; port 0: any free port)")

    for spec in (*specs, *ENGINE_GROUPS):
        if spec.cli is None:
            continue
        if load is None or spec in load:
            load_part(spec, spec.cli).register(sub, COMMANDS)
        else:
            for name, help_text in spec.commands.items():
                sub.add_parser(name, help=help_text, add_help=False)
    return parser


def chosen_command(argv: Sequence[str]) -> str | None:
    """The sub-command ``argv`` names (the first word that is not an option)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--config":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def config_option(argv: Sequence[str]) -> str | None:
    for i, word in enumerate(argv):
        if word == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--config="):
            return word.partition("=")[2]
        if not word.startswith("-"):
            break
    return None


# --- commands ------------------------------------------------------------------------


async def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from engine.crypto import ensure_token
    from engine.store import open_store
    from engine.token_keys import make_token_keys

    store = await open_store(settings)  # a store that cannot be reached: nothing made
    await store.close()
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # stores may be elsewhere
    created = await asyncio.to_thread(ensure_token, settings)
    await make_token_keys(settings)
    _print({"state_dir": str(settings.state_dir), "task_store": settings.store_target.location,
            "hsm_token": settings.hsm.token_label, "hsm_token_created": created}, args.json,
           lambda d: f"state directory {d['state_dir']} ready (task store {d['task_store']})\n"
                     f"HSM token {d['hsm_token']!r} "
                     + ("created" if d["hsm_token_created"] else "present"))
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from redis.exceptions import RedisError

    from engine.queue import redis_where, unavailable
    from engine.worker import run_worker

    try:
        run_worker(settings, burst=args.burst)
    except (RedisError, OSError) as exc:
        # arq's poll loop ends on a Redis outage longer than the retries; the task
        # store keeps every task, so a restarted worker (or `make up`) carries on.
        raise unavailable(exc, redis_where(settings)) from None
    return 0


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    from engine.registry import default_registry

    registry = default_registry(settings)
    if args.json:
        print(json.dumps([{"name": spec.name, "description": spec.description,
                           "fields": dict(spec.fields),
                           "secret_fields": sorted(spec.secret_fields)} for spec in registry],
                         indent=2))
    for spec in registry if not args.json else ():
        print(f"{spec.name:32} {spec.description}")
        for name, meaning in spec.fields.items():
            print(f"    {name:28} {meaning}")
    for error in registry.unavailable.values():
        sys.stderr.write(f"dew: warning: {error.message}\n")
    return 0


async def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    from engine.client import Client, check_defer, check_json_args, check_task_id
    from engine.registry import default_registry

    source, text = _job_args_text(args)
    try:
        job_args = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{source} is not valid JSON: {exc.msg} at column {exc.colno}",
                           ) from None
    except RecursionError:
        raise InvalidInput(f"{source} nests too deeply") from None
    if args.timeout is not None and not args.wait:
        raise InvalidInput("--timeout needs --wait")
    # Check everything before the task store is opened: bad input writes nothing.
    default_registry(settings).check_args(args.name, check_json_args(job_args))
    if args.task_id is not None:
        check_task_id(args.task_id)
    check_defer(args.defer)
    async with await Client.open(settings) as client:
        task = await client.enqueue(args.name, job_args, task_id=args.task_id, defer=args.defer)
        if not args.wait:
            print(json.dumps({"task_id": task.task_id}) if args.json else task.task_id)
            return 0
        task = await client.wait(task.task_id, timeout=args.timeout, require_worker=True)
    _print(task.to_json(), args.json, render.task)
    return 0 if task.status == "succeeded" else 1


async def resolve_id(kind: str, ref: str, exists: Callable[[str], Awaitable[bool]],
                     by_prefix: Callable[[str], Awaitable[list[str]]], hint: str) -> str:
    """The whole id ``ref`` names: itself when it exists, else the one id it is a
    prefix of (at least ``ID_PREFIX`` characters). NotFound when none; InvalidInput
    (listing the candidates) when several."""
    if await exists(ref):
        return ref
    if len(ref) >= ID_PREFIX:
        found = await by_prefix(ref)
        if len(found) == 1:
            return found[0]
        if found:
            shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
            raise InvalidInput(f"{kind} id prefix {ref!r} is ambiguous: it starts {shown} "
                               "(give more characters)", code="ambiguous_id", target=ref)
        raise NotFound(f"no {kind} with id {ref!r} or an id starting so ({hint})", target=ref)
    raise NotFound(f"no {kind} with id {ref!r} ({hint}; a prefix needs at least {ID_PREFIX} "
                   "characters)", target=ref)


async def resolve_task(store: TaskStore, ref: str, project: str | None) -> str:
    async def exists(task_id: str) -> bool:
        return await store.get_task(task_id, project) is not None

    async def by_prefix(prefix: str) -> list[str]:
        return await store.task_ids_by_prefix(prefix, project, limit=6)

    return await resolve_id("task", ref, exists, by_prefix, "`dew tasks list` lists them")


async def resolve_failure(store: TaskStore, ref: str, project: str | None) -> str:
    async def exists(failure_id: str) -> bool:
        return await store.get_failure(failure_id, project) is not None

    async def by_prefix(prefix: str) -> list[str]:
        return await store.failure_ids_by_prefix(prefix, project, limit=6)

    return await resolve_id("failure record", ref, exists, by_prefix,
                            "`dew failures list` lists them")


async def cmd_tasks(args: argparse.Namespace, settings: Settings) -> int:
    from engine.store import open_store

    if args.action == "list":
        _check_limit(args.limit)
    if args.action == "retry":
        from engine.client import Client

        async with await Client.open(settings) as client:
            task_id = await resolve_task(client.store, args.task_id, args.account)
            retry = await client.retry(task_id, retried_by(), args.account)
        _print(retry.to_json(), args.json,
               lambda t: f"task {task_id} retried as task {t['task_id']}")
        return 0
    if args.action == "cancel":
        return await _cancel_task(args, settings)
    store = await open_store(settings)
    try:
        if args.action == "list":
            tasks = await store.list_tasks(args.status, args.name, args.limit,
                                           project=args.account)
            _print([t.to_json() for t in tasks], args.json, render.task_table)
        else:
            task_id = await resolve_task(store, args.task_id, args.account)
            found = await store.get_task(task_id, args.account)
            if found is None:
                raise NotFound(f"no task with id {args.task_id!r}")
            failures = await store.list_failures(task_id=found.task_id)
            shown = found.to_json()
            if not args.json:
                shown["failures"] = [f.to_json() for f in failures]
            _print(shown, args.json, render.task)
    finally:
        await store.close()
    return 0


async def _cancel_task(args: argparse.Namespace, settings: Settings) -> int:
    """A queued task is cancelled at once; a running one of a job with safe points is
    asked to stop (the registry, imported only then, says which jobs have them)."""
    from engine.store import cancel_task, open_store

    def cancellable() -> frozenset[str]:
        from engine.registry import default_registry

        return default_registry(settings).cancellable()

    store = await open_store(settings)
    try:
        task_id = await resolve_task(store, args.task_id, args.account)
        task = await cancel_task(store, task_id, retried_by(), args.account, cancellable)
    finally:
        await store.close()
    _print(task.to_json(), args.json, render.cancelled)
    return 0


async def cmd_failures(args: argparse.Namespace, settings: Settings) -> int:
    from engine.store import open_store

    if args.action in ("delete", "retry") and bool(args.failure_id) == bool(args.all):
        raise InvalidInput("give either a failure id or --all")
    if args.action == "retry" and args.operation and not args.all:
        raise InvalidInput("--operation goes with --all")
    if args.action == "list":
        _check_limit(args.limit)
    if args.action == "retry":
        return await _retry_failures(args, settings)
    store = await open_store(settings)
    try:
        if args.action == "list":
            records = await store.list_failures(args.operation, args.task_id, args.limit,
                                                project=args.account)
            _print([f.to_json() for f in records], args.json, render.failure_table)
        elif args.action == "show":
            failure_id = await resolve_failure(store, args.failure_id, args.account)
            record = await store.get_failure(failure_id, args.account)
            if record is None:
                raise NotFound(f"no failure record with id {args.failure_id!r}")
            _print(record.to_json(), args.json, render.failure)
        elif args.all:
            count = await store.delete_all_failures(args.account)
            _print({"deleted": count}, args.json, lambda d: f"deleted {d['deleted']} record(s)")
        else:
            failure_id = await resolve_failure(store, args.failure_id, args.account)
            if not await store.delete_failure(failure_id, args.account):
                raise NotFound(f"no failure record with id {args.failure_id!r}")
            _print({"deleted": 1}, args.json, lambda d: f"deleted {failure_id}")
    finally:
        await store.close()
    return 0


async def _retry_failures(args: argparse.Namespace, settings: Settings) -> int:
    """``dew failures retry ID|--all``: each failed task once (a task with several
    records is retried once). With --all, records already retried are passed over,
    and a task that cannot be retried is reported and the others still are (exit 1)."""
    from engine.client import Client
    from engine.errors import Conflict

    by = retried_by()
    retried: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    async with await Client.open(settings) as client:
        if args.all:
            records = [r for r in await client.store.list_failures(
                args.operation, None, 10_000, project=args.account) if r.retried_at is None]
        else:
            failure_id = await resolve_failure(client.store, args.failure_id, args.account)
            record = await client.store.get_failure(failure_id, args.account)
            if record is None:
                raise NotFound(f"no failure record with id {args.failure_id!r}")
            records = [record]
        seen: set[str] = set()
        for record in reversed(records):  # oldest first
            if record.task_id in seen:
                continue
            seen.add(record.task_id)
            try:
                if await client.store.get_task(record.task_id) is None:
                    raise Conflict(f"failure record {record.failure_id} has no task to retry "
                                   f"(task {record.task_id} was never recorded)")
                task = await client.retry(record.task_id, by, args.account)
            except (Conflict, NotFound) as exc:
                if not args.all:
                    raise
                skipped.append({"failure_id": record.failure_id, "task_id": record.task_id,
                                "reason": exc.message})
                continue
            retried.append({"failure_id": record.failure_id, "task_id": record.task_id,
                            "retry_task_id": task.task_id})
    if args.json:
        print(json.dumps({"retried": retried, "skipped": skipped}, indent=2))
    else:
        for item in retried:
            print(f"task {item['task_id']} retried as task {item['retry_task_id']}")
        for item in skipped:
            print(f"skipped {item['failure_id']}: {item['reason']}")
        if not retried and not skipped:
            print("no failure records to retry")
    return 1 if skipped else 0


def cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    from engine import stack

    if args.action == "up":
        state = stack.up(settings, config_file=args.config)
    elif args.action == "down":
        state = stack.down(settings)
    else:
        state = stack.status(settings)
    _print(state.to_json(), args.json, lambda _: "\n".join(state.lines()))
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from engine.api.server import serve

    return serve(settings, listen=args.listen)


COMMANDS: dict[str, Command] = {
    "init": cmd_init,
    "worker": cmd_worker,
    "jobs": cmd_jobs,
    "enqueue": cmd_enqueue,
    "tasks": cmd_tasks,
    "failures": cmd_failures,
    "stack": cmd_stack,
    "api": cmd_api,
}


MAX_ARGS_FILE_BYTES = 1024 * 1024


def _job_args_text(args: argparse.Namespace) -> tuple[str, str]:
    """Where the job arguments come from, and their text."""
    if args.args is not None and args.args_file is not None:
        raise InvalidInput("give either --args or --args-file")
    if args.args_file is None:
        return "--args", "{}" if args.args is None else args.args
    from engine.cli_output import read_input

    data = read_input("--args-file", args.args_file, MAX_ARGS_FILE_BYTES + 1)
    if len(data) > MAX_ARGS_FILE_BYTES:
        raise InvalidInput(f"--args-file is larger than {MAX_ARGS_FILE_BYTES} bytes")
    try:
        return "--args-file", data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("--args-file is not UTF-8 text") from None


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= 10_000:
        raise InvalidInput(f"--limit must be between 1 and 10000, got {limit}")


def _print(data: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2) if as_json else human(data))


def hoist_config(argv: Sequence[str]) -> list[str]:
    """``--config FILE`` (or ``--config=FILE``) moved to the front, wherever it was
    given: before or after the sub-command (not after ``--``)."""
    front: list[str] = []
    rest: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--":
            rest.append(word)
            rest.extend(words)
            break
        if word == "--config":
            front.append(word)
            value = next(words, None)
            if value is not None:
                front.append(value)
        elif word.startswith("--config="):
            front.append(word)
        else:
            rest.append(word)
    return [*front, *rest]


# Commands that may run before the state directory exists: they create it.
CREATES_STATE_DIR = {("init", None), ("stack", "up")}


def check_state_dir(args: argparse.Namespace, settings: Settings) -> None:
    """Refuse a state directory that does not exist (a typo in DEW_STATE_DIR would
    otherwise answer from a new, empty store) unless the command creates it."""
    state_dir = settings.state_dir
    if (args.command, getattr(args, "action", None)) in CREATES_STATE_DIR:
        return
    if not state_dir.is_dir():
        raise ConfigError(
            f"state directory {state_dir} does not exist (DEW_STATE_DIR or "
            "engine.state_dir): check its spelling, or create it with `dew init`",
            fix="Run `dew init` to create it, or correct DEW_STATE_DIR / engine.state_dir.")


# Processes that run for long and may print tracebacks on a terminal.
LONG_RUNNING = ("worker", "api")


def _prepare(args: argparse.Namespace, settings: Settings) -> None:
    """What a command may rely on: project ids turned into names, and logging."""
    worker = args.command == "worker"
    from engine.logs import configure_logging

    _project_names(args, settings)
    configure_logging(
        settings.log_file, settings.log.level,
        console=settings.log.console,
        # Commands other than the worker keep the terminal for their output.
        console_level=None if worker else "warning",
    )
    if not worker:
        import logging

        # arq's connection warnings name its RedisSettings' host and port
        # (localhost:6379 even for a unix socket); the engine's own warning names
        # the configured URL (engine.queue.unavailable, password hidden).
        logging.getLogger("arq.connections").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """The program (``argv`` None: ``sys.argv``, and the process ends after it), or
    one command line run in this process (tests)."""
    program = argv is None
    if program and chosen_command(hoist_config(sys.argv[1:])) not in LONG_RUNNING:
        # structlog renders a terminal's tracebacks with rich when it can import it
        # (installed here only as a development tool's dependency): ~40 ms of every
        # short command's start for a traceback it never prints (its terminal gets
        # warnings only). The long-running processes keep it.
        sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    try:
        return _main(argv)
    finally:
        if program:
            # The process ends next: its last garbage collection would walk every
            # object of every module loaded (the HSM library, asyncio, cryptography:
            # ~1/3 of a `dew kms` run) only to free memory the exit frees anyway.
            # Frozen objects are skipped; atexit handlers, logging's flush and module
            # teardown still run.
            import gc

            gc.freeze()


def _main(argv: Sequence[str] | None) -> int:
    global _json_errors
    argv = hoist_config(sys.argv[1:] if argv is None else argv)
    _json_errors = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    private_umask()
    try:
        for position, word in enumerate(argv, 1):
            try:
                word.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput(f"argument {position} is not valid UTF-8") from None
        specs = load_specs(configured_packages(config_option(argv), os.environ))
        command = chosen_command(argv)
        load = [s for s in (*specs, *ENGINE_GROUPS) if command in s.commands]
        args = build_parser(specs, load).parse_args(argv)
        from engine.settings import load_settings

        settings = load_settings(args.config)
        if args.command == "stack" and args.action in ("down", "status") and (
                not settings.state_dir.is_dir()):
            # `make down` / `make clean` on a fresh checkout: nothing ran, nothing to write.
            nothing = {name: {"running": False, "pid": None} for name in ("redis", "worker", "api")}
            _print(nothing, args.json,
                   lambda _: f"nothing is running (no state directory {settings.state_dir})")
            return 0
        # Before anything is written (the log file is in the state directory).
        check_state_dir(args, settings)
        handler = COMMANDS[args.command]
        # A lean command (one that may answer through the running API) is called
        # before logging is set up: structlog alone costs a start ~0.1 s. It returns
        # an int when it is done, else the coroutine of its local path.
        lean = getattr(handler, "lean_start", False)
        if not lean:
            _prepare(args, settings)
        outcome = handler(args, settings)
        if isinstance(outcome, int):
            return outcome
        try:
            if lean:
                _prepare(args, settings)
        except BaseException:
            close = getattr(outcome, "close", None)  # the coroutine never runs
            if close is not None:
                close()
            raise
        import asyncio

        return int(asyncio.run(outcome))  # type: ignore[arg-type]
    except DewError as exc:
        report_error(exc, _json_errors)
        return exit_code(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
