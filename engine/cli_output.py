"""What every ``dew`` command group shares: bounded reads of user-named files (or
stdin, so that secrets stay off the command line), JSON with ``--json``, aligned
``key  value`` lines otherwise, and the enqueue-wait-report of a job."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import DewError, InvalidInput
from engine.settings import Settings


def add_project_option(parser: Any) -> None:
    """``--project`` (a project's name or id, as the API names it; ``--account`` is
    the older spelling). A project id is turned into its name before the command runs."""
    add_option(parser, "--project", "--account", dest="account", default="default",
               metavar="PROJECT", help="the project: its name or 32-hex id (default: default)")


def deprecated(old: str, new: str) -> None:
    """One line on stderr for an old spelling; a JSON line when ``--json`` is on the
    command line, so that stderr stays machine-readable there."""
    message = f"{old} is deprecated and will be removed in the next release; use {new}"
    if "--json" in sys.argv[1:]:
        sys.stderr.write(json.dumps({"warning": {"code": "deprecated", "message": message}})
                         + "\n")
    else:
        sys.stderr.write(f"dew: warning: {message}\n")


def _warning(parser: Any, action: Any, olds: frozenset[str], new: str) -> type[argparse.Action]:
    """``action`` (an argparse action name or class) that first prints the deprecation
    line when given under one of ``olds``."""
    base: type[argparse.Action] = parser._registry_get("action", action, action)

    def warn_then_act(self: argparse.Action, parser: argparse.ArgumentParser,
                      namespace: argparse.Namespace, values: Any,
                      option_string: str | None = None) -> None:
        if option_string in olds:
            deprecated(option_string, new)
        base.__call__(self, parser, namespace, values, option_string)

    return type(f"Deprecated{base.__name__}", (base,), {"__call__": warn_then_act})


def add_option(parser: Any, name: str, *old: str, **kwargs: Any) -> argparse.Action:
    """Add option ``name`` (the spelling docs/cli.md's grammar wants), also accepted
    under its ``old`` spellings, which work for one release and print a deprecation
    line on stderr. ``kwargs`` are ``add_argument``'s (``action=`` included)."""
    if old:
        kwargs["action"] = _warning(parser, kwargs.get("action"), frozenset(old), name)
    added: argparse.Action = parser.add_argument(name, *old, **kwargs)
    return added


def add_deprecated(parser: Any, old: str, instead: str, **kwargs: Any) -> argparse.Action:
    """An old option replaced by something other than a renamed option (a positional,
    or another option with a value, e.g. ``--der`` by ``--format der``: pass
    ``action="store_const", const="der", dest="format"``); it works for one release
    and prints the deprecation line naming ``instead``."""
    kwargs["action"] = _warning(parser, kwargs.get("action"), frozenset({old}), instead)
    added: argparse.Action = parser.add_argument(old, **kwargs)
    return added


def write_out(path: str, payload: bytes, what: str) -> str:
    """Write ``payload`` to ``--out`` PATH; return the one-line summary to print
    instead of the payload (docs/cli.md: ``--out`` prints no payload)."""
    try:
        Path(path).write_bytes(payload)
    except OSError as exc:
        raise InvalidInput(f"cannot write --out {path}: {exc.strerror}") from None
    return f"wrote {what} ({len(payload)} bytes) to {path}"


def read_file(option: str, name: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a file (reading one more than allowed refuses a large one)."""
    try:
        with open(name, "rb") as fh:
            return fh.read(limit)
    except OSError as exc:
        raise InvalidInput(f"cannot read {option} {name}: {exc.strerror}") from None


def read_input(option: str, name: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a file, or of stdin for ``-`` (secrets stay off argv)."""
    if name != "-":
        return read_file(option, name, limit)
    try:
        return sys.stdin.buffer.read(limit)
    except (OSError, ValueError, AttributeError):
        raise InvalidInput(f"cannot read {option} from stdin") from None


def print_result(data: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    sys.stdout.write((json.dumps(data, indent=2) if as_json else human(data)) + "\n")


def text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value if isinstance(value, str) else json.dumps(value)


def lines(data: dict[str, Any]) -> str:
    width = max((len(k) for k in data), default=0)
    return "\n".join(f"{k:{width}}  {text(v)}" for k, v in data.items())


async def run_job(
    settings: Settings, name: str, job_args: dict[str, Any], *, wait: bool = True,
    timeout: float | None = None, as_json: bool = False,
    human: Callable[[Any], str] = lines,
) -> int:
    """Enqueue a job; without ``wait`` print its task id, else wait and print its
    result (a failed task raises its error, so the CLI prints it and exits 1)."""
    from engine.client import Client

    async with await Client.open(settings) as client:
        task = await client.enqueue(name, job_args)
        if not wait:
            print_result({"task_id": task.task_id}, as_json, lambda d: str(d["task_id"]))
            return 0
        task = await client.wait(task.task_id, timeout=timeout, require_worker=True)
    if task.status != "succeeded":
        raise DewError.from_dict(task.error or {"message": f"task {task.task_id} failed"})
    result = dict(task.result or {})
    result["task_id"] = task.task_id
    print_result(result, as_json, human)
    return 0
