"""What every ``dew`` command group shares: bounded reads of user-named files (or
stdin, so that secrets stay off the command line), JSON with ``--json``, aligned
``key  value`` lines otherwise, and the enqueue-wait-report of a job."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from engine.errors import DewError, InvalidInput
from engine.settings import Settings


def add_project_option(parser: Any) -> None:
    """``--project`` (a project's name or id, as the API names it; ``--account`` is
    the older spelling). A project id is turned into its name before the command runs."""
    parser.add_argument("--project", "--account", dest="account", default="default",
                        metavar="PROJECT",
                        help="the project: its name or 32-hex id (default: default)")


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
