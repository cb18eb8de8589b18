"""``dew secrets ...``: CSMS secrets from the command line (docs/csms.md).

The secret is the positional SECRET of every verb; every verb takes ``--project``
(default ``default``) and ``--json``. Input (names, stages, version ids, values and
their size, periods, ``--out``) is checked before the store or the HSM is opened,
so bad input is one line on stderr, exit 2, and nothing changed. A value comes
from ``--value-file FILE`` (``-``: stdin) or ``--generate``, never from argv;
``get`` writes it to stdout, or to ``--out FILE`` with a one-line summary.
``rotate`` enqueues the job ``csms.rotate_secret`` and waits for a worker to run
it (``--timeout``, default 60 s; ``--no-wait`` only enqueues). Text output prints
times as ISO 8601 UTC, booleans as yes/no, a secret's stages as
``SYSCURRENT=v2 SYSPREVIOUS=v1`` and one version's as ``SYSCURRENT,BLUE``.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cli_output import (
    add_deprecated,
    add_project_option,
    print_result,
    read_input,
    run_job,
    write_out,
)
from engine.cli_output import lines as key_values
from engine.errors import InvalidInput
from engine.settings import Settings

if TYPE_CHECKING:
    from handlers.csms.service import SecretValue

DEFAULT_ROTATE_TIMEOUT = 60.0
JSON_HELP = "print JSON (errors too: one JSON line on stderr)"
# Old spelling -> (the option it now is, the value it stands for): docs/csms.md
# "Renamed in this release".


def register(subparsers: Any, commands: dict[str, Any]) -> None:
    top = subparsers.add_parser("secrets", help="CSMS: secrets, versions, stages, rotation")
    sub = top.add_subparsers(dest="action", metavar="ACTION", required=True,
                             parser_class=type(top))

    def command(name: str, help_text: str, named: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        if named:
            p.add_argument("name", metavar="SECRET", help="the secret's name")
        add_project_option(p)
        p.add_argument("--json", action="store_true", help=JSON_HELP)
        return p

    p = command("create", "create a secret (its value becomes version v1, SYSCURRENT)")
    _value_options(p)
    p.add_argument("--kms-key", default="csms/default",
                   help="the CMK (id or alias) encrypting the versions (default csms/default)")
    p.add_argument("--description", default="", help="free text shown with the secret")
    p.add_argument("--type", default="COMMON", dest="secret_type",
                   help="COMMON (default), RDS_POSTGRESQL or RDS_MYSQL (value: a JSON document)")
    p = command("get", "print a version's value to stdout (SYSCURRENT by default)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--stage", help="the version that has this stage (default SYSCURRENT)")
    which.add_argument("--version-id", help="this version (e.g. v2)")
    p.add_argument("--out", metavar="FILE",
                   help="write the value to FILE (a new file is 0600) and print only a summary")
    p = command("put-version", "add a version; it takes SYSCURRENT, the old one SYSPREVIOUS")
    _value_options(p)
    command("versions", "list the versions with their stages")
    p = command("set-stage", "put a stage on a version (moving it off the one that had it)")
    p.add_argument("--stage", required=True, help="the stage, e.g. SYSCURRENT or BLUE")
    p.add_argument("--version-id", required=True, help="the version to put it on (e.g. v1)")
    p = command("remove-stage", "remove a stage (SYSCURRENT and SYSPREVIOUS cannot be removed)")
    p.add_argument("--stage", required=True, help="the stage to remove")
    p.add_argument("--version-id", help="only if the stage is on this version")
    p = command("delete", "schedule the deletion (a recovery window of 7..30 days)")
    p.add_argument("--recovery-days", type=int, required=True, metavar="N",
                   help="days (7..30) before the secret is deleted; restore cancels")
    command("restore", "cancel a scheduled deletion")
    command("show", "show a secret: stages, rotation, failed rotations, last failure")
    command("list", "list the project's secrets", named=False)
    p = command("rotate", "rotate now (a job: needs a worker)")
    p.add_argument("--timeout", type=float, default=DEFAULT_ROTATE_TIMEOUT, metavar="S",
                   help=f"give up waiting after S seconds (default {DEFAULT_ROTATE_TIMEOUT:g})")
    p.add_argument("--no-wait", action="store_true", help="enqueue and print the task id")
    p = command("set-rotation", "rotate on a period (6h..8760h), or --disable")
    period = p.add_mutually_exclusive_group(required=True)
    period.add_argument("--period", help="e.g. 24h, 720h or 30d")
    period.add_argument("--disable", action="store_true", help="stop rotating on a period")

    commands["secrets"] = cmd_secrets


def _value_options(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--value-file", metavar="FILE",
                        help="read the value from FILE (- reads standard input)")
    add_deprecated(source, "--value-stdin", "--value-file -", dest="value_file",
                   action="store_const", const="-", help="deprecated: use --value-file -")
    source.add_argument("--generate", action="store_true", help="a random value")
    p.add_argument("--length", type=int, help="with --generate: 8..4096 (default 32)")
    p.add_argument("--charset", help="with --generate: alphanumeric, alphanumeric-symbols "
                   "(default), hex, digits or printable")


# --------------------------------------------------------------------------- checks


def _checked(args: argparse.Namespace) -> dict[str, Any]:
    """Every check that needs no store or HSM, done before either is opened."""
    from handlers.csms import model as m
    from handlers.kms.interface import check_account, check_key_ref

    check_account(args.account)
    if getattr(args, "name", None) is not None:
        m.check_name(args.name)
    out: dict[str, Any] = {}
    action = args.action
    if getattr(args, "stage", None) is not None:
        m.check_stage(args.stage)
    if getattr(args, "version_id", None) is not None:
        m.check_version_id(args.version_id)
    if action == "create":
        kind = m.check_type(args.secret_type)
        check_key_ref(args.kms_key)
        m.check_description(args.description)
        out["value"] = m.check_value(_value(args), kind)
        out["type"] = kind
    elif action == "put-version":
        out["value"] = _value(args)  # checked against the secret's type once it is known
    elif action == "remove-stage" and args.stage in m.PROTECTED_STAGES:
        m.remove_stage({}, args.stage)
    elif action == "delete":
        m.check_recovery_days(args.recovery_days)
    elif action == "set-rotation":
        out["period"] = None if args.disable else m.parse_period(args.period)
    elif action == "rotate" and not 0 < args.timeout <= 24 * 3600:
        raise InvalidInput("--timeout must be between 0 and 86400 seconds")
    elif action == "get" and args.out is not None:
        check_out(args.out)
    return out


def check_out(path: str) -> None:
    """Refuse an ``--out`` that cannot be written before the value is read (a read is
    audited: bad input must not leave a read behind)."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise InvalidInput(f"--out {path} is a directory")
    if not folder.is_dir():
        raise InvalidInput(f"--out {path}: the directory {folder} does not exist")
    if not os.access(target if target.exists() else folder, os.W_OK):
        raise InvalidInput(f"--out {path} is not writable")


def _value(args: argparse.Namespace) -> bytes:
    from handlers.csms import model as m

    if not args.generate and (args.length is not None or args.charset is not None):
        raise InvalidInput("--length and --charset go with --generate")
    if args.generate:
        length = m.check_length(args.length if args.length is not None
                                else m.DEFAULT_GENERATE_LENGTH)
        charset = m.check_charset(args.charset or m.DEFAULT_CHARSET)
        return m.generate_value(length, charset).encode()
    # One byte more than allowed: enough for the value check to refuse it.
    return read_input("--value-file", args.value_file, m.MAX_VALUE_BYTES + 1)


# --------------------------------------------------------------------------- commands


async def cmd_secrets(args: argparse.Namespace, settings: Settings) -> int:
    from handlers.csms.service import open_secrets

    checked = _checked(args)
    if args.action == "rotate":
        return await _rotate(args, settings)
    acct = {"account": args.account}
    action = args.action
    human: Callable[[Any], str] = key_values
    async with open_secrets(settings) as csms:
        data: Any
        if action == "create":
            data = (await csms.create(args.name, checked["value"], kms_key=args.kms_key,
                                      description=args.description,
                                      secret_type=checked["type"], **acct)).to_json()
            human = _secret
        elif action == "get":
            found = await csms.get_value(args.name, stage=args.stage,
                                         version_id=args.version_id, **acct)
            return _print_value(args, found)
        elif action == "put-version":
            data = (await csms.put_version(args.name, checked["value"], **acct)).to_json()
            human = _version
        elif action == "versions":
            data = [v.to_json() for v in await csms.list_versions(args.name, **acct)]
            human = _version_table
        elif action == "set-stage":
            data = {"name": args.name, "stages": await csms.set_stage(
                args.name, args.stage, args.version_id, **acct)}
            human = _stages
        elif action == "remove-stage":
            data = {"name": args.name, "stages": await csms.remove_stage(
                args.name, args.stage, args.version_id, **acct)}
            human = _stages
        elif action == "delete":
            data = (await csms.schedule_deletion(args.name, args.recovery_days,
                                                 **acct)).to_json()
            human = _secret
        elif action == "restore":
            data = (await csms.restore(args.name, **acct)).to_json()
            human = _secret
        elif action == "show":
            data = (await csms.describe(args.name, **acct)).to_json()
            human = _secret
        elif action == "list":
            data = [s.to_json() for s in await csms.list_secrets(**acct)]
            human = _secret_table
        else:  # set-rotation
            data = (await csms.set_rotation(args.name, checked["period"], **acct)).to_json()
            human = _secret
    print_result(data, args.json, human)
    return 0


def _print_value(args: argparse.Namespace, found: SecretValue) -> int:
    """``get``: the value alone to stdout; with ``--out`` to the file and a summary;
    with ``--json`` the version and the value (without it when ``--out``)."""
    meta = {"name": found.name, "version_id": found.version_id, "stages": found.stages}
    if args.out is not None:
        summary = write_out(args.out, found.value,
                            f"the value of {found.name} {found.version_id}")
        print_result({**meta, "out": args.out, "bytes": len(found.value)}, args.json,
                     lambda _: summary)
        return 0
    if args.json:
        print_result({**meta, **_encoded(found.value)}, True, str)
        return 0
    sys.stdout.buffer.write(found.value)
    if sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return 0


async def _rotate(args: argparse.Namespace, settings: Settings) -> int:
    from handlers.csms.service import ROTATE_JOB, open_secrets

    # A secret that is not there (or pending deletion) is bad input (exit 2), not a
    # task that fails later.
    async with open_secrets(settings) as csms:
        await csms.check_usable(args.name, account=args.account)
    return await run_job(settings, ROTATE_JOB, {"name": args.name, "account": args.account},
                         wait=not args.no_wait, timeout=args.timeout, as_json=args.json,
                         human=_rotation)


# --------------------------------------------------------------------------- output
# Stages are printed one way: a secret's map as ``SYSCURRENT=v2 SYSPREVIOUS=v1``, one
# version's as ``SYSCURRENT,BLUE`` (JSON: a {stage: version} object and a list).


def stage_map(stages: dict[str, str]) -> str:
    """A secret's stages in text: ``SYSCURRENT=v2 SYSPREVIOUS=v1 BLUE=v2`` (``-``: none),
    in the order of a version's stages (the system stages first)."""
    from handlers.csms.model import CURRENT, PENDING, PREVIOUS

    order = {CURRENT: 0, PREVIOUS: 1, PENDING: 2}
    ordered = sorted(stages.items(), key=lambda item: (order.get(item[0], 3), item[0]))
    return " ".join(f"{stage}={version}" for stage, version in ordered) or "-"


def version_stages(stages: list[str]) -> str:
    """One version's stages in text: ``SYSCURRENT,BLUE`` (``-``: none)."""
    return ",".join(stages) or "-"


def _encoded(value: bytes) -> dict[str, str]:
    try:
        return {"value": value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"value_base64": base64.b64encode(value).decode()}


def _secret(s: dict[str, Any]) -> str:
    rot = s["rotation"]
    lines = {
        "name": s["name"], "project": s["account"], "type": s["secret_type"],
        "kms key": s["kms_key"], "description": s["description"] or "-",
        "state": s["state"] + (f" (deletion at {s['deletion_date']})"
                               if s["deletion_date"] else ""),
        "created": s["created_at"], "versions": str(s["versions"]),
        "stages": stage_map(s["stages"]),
        "rotation": (f"every {rot['period_hours']}h, next {rot['next_rotation_at']}"
                     if rot["enabled"] else "off"),
        "last rotated": rot["last_rotated_at"] or "never",
        "failed rotations": str(s["failed_rotations"]),
    }
    if rot["in_progress"]:
        p = rot["in_progress"]
        lines["in progress"] = (f"{p['pending_version']} after step {p['last_step_done']} "
                                f"(task {p['task_id']})")
    failure = s["last_failure"]
    if failure:
        lines["last failure"] = f"{failure['at']} at step {failure['step']}: {failure['error']}"
        lines["  cause"] = failure["cause"] or "-"
        lines["  fix"] = failure["fix"] or "-"
    return key_values(lines)


def _version(v: dict[str, Any]) -> str:
    return key_values({**v, "stages": version_stages(v["stages"])})


def _stages(data: dict[str, Any]) -> str:
    return key_values({"name": data["name"], "stages": stage_map(data["stages"])})


def _rotation(result: dict[str, Any]) -> str:
    steps = result.get("steps")
    return key_values({**result, **({"steps": ",".join(steps)} if steps is not None else {})})


def _version_table(versions: list[dict[str, Any]]) -> str:
    width = max((len(v["created_at"]) for v in versions), default=7)
    lines = [f"{'VERSION':10} {'CREATED (UTC)':{width}}  STAGES"]
    lines += [f"{v['version_id']:10} {v['created_at']:{width}}  {version_stages(v['stages'])}"
              for v in versions]
    return "\n".join(lines)


def _secret_table(secrets: list[dict[str, Any]]) -> str:
    if not secrets:
        return "no secrets"
    lines = [f"{'NAME':32} {'TYPE':15} {'STATE':16} {'ROTATION':10} {'FAILED':>6}  STAGES"]
    for s in secrets:
        rot = s["rotation"]
        lines.append(
            f"{s['name']:32} {s['secret_type']:15} {s['state']:16} "
            f"{(str(rot['period_hours']) + 'h') if rot['enabled'] else 'off':10} "
            f"{s['failed_rotations']:>6}  {stage_map(s['stages'])}")
    return "\n".join(lines)
