"""``dew secrets ...``: CSMS secrets from the command line.

Every command takes ``--project`` (alias ``--account``; default ``default``) and ``--json``. Input
(names, stages, version ids, values and their size, periods) is checked before
the store or the HSM is opened, so bad input is one line on stderr, exit 2,
and nothing changed. ``get`` writes the value, and only the value, to stdout.
``rotate`` enqueues the job ``csms.rotate_secret`` and waits for a worker to
run it (``--timeout``, default 60 s; ``--no-wait`` only enqueues).
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.cli_output import add_project_option, print_result, run_job
from engine.cli_output import lines as key_values
from engine.errors import InvalidInput
from engine.settings import Settings

DEFAULT_ROTATE_TIMEOUT = 60.0


def register(subparsers: Any, commands: dict[str, Any]) -> None:
    top = subparsers.add_parser("secrets", help="CSMS: secrets, versions, stages, rotation")
    sub = top.add_subparsers(dest="action", metavar="ACTION", required=True,
                             parser_class=type(top))

    def command(name: str, help_text: str, named: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        if named:
            p.add_argument("name", help="the secret's name")
        add_project_option(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    p = command("create", "create a secret (its value becomes version v1, SYSCURRENT)")
    _value_options(p)
    p.add_argument("--kms-key", default="csms/default",
                   help="the CMK (id or alias) encrypting the versions (default csms/default)")
    p.add_argument("--description", default="")
    p.add_argument("--type", default="COMMON", dest="secret_type",
                   help="COMMON (default), RDS_POSTGRESQL or RDS_MYSQL (value: a JSON document)")
    p = command("get", "print a version's value to stdout (SYSCURRENT by default)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--stage")
    which.add_argument("--version-id")
    p = command("put-version", "add a version; it takes SYSCURRENT, the old one SYSPREVIOUS")
    _value_options(p)
    command("versions", "list the versions with their stages")
    p = command("set-stage", "put a stage on a version (moving it off the one that had it)")
    p.add_argument("--stage", required=True)
    p.add_argument("--version-id", required=True)
    p = command("remove-stage", "remove a stage (SYSCURRENT and SYSPREVIOUS cannot be removed)")
    p.add_argument("--stage", required=True)
    p.add_argument("--version-id", help="only if the stage is on this version")
    p = command("delete", "schedule the deletion (a recovery window of 7..30 days)")
    p.add_argument("--recovery-days", type=int, required=True, metavar="N")
    command("restore", "cancel a scheduled deletion")
    command("show", "show a secret: stages, rotation, failed rotations, last failure")
    command("list", "list the account's secrets", named=False)
    p = command("rotate", "rotate now (a job: needs a worker)")
    p.add_argument("--timeout", type=float, default=DEFAULT_ROTATE_TIMEOUT, metavar="S",
                   help=f"give up waiting after S seconds (default {DEFAULT_ROTATE_TIMEOUT:g})")
    p.add_argument("--no-wait", action="store_true", help="enqueue and print the task id")
    p = command("set-rotation", "rotate on a period (6h..8760h), or --disable")
    period = p.add_mutually_exclusive_group(required=True)
    period.add_argument("--period", help="e.g. 24h, 720h or 30d")
    period.add_argument("--disable", action="store_true")

    commands["secrets"] = cmd_secrets


def _value_options(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--value-file", metavar="FILE", help="read the value from FILE")
    source.add_argument("--value-stdin", action="store_true", help="read the value from stdin")
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
    return out


def _value(args: argparse.Namespace) -> bytes:
    from handlers.csms import model as m

    if not args.generate and (args.length is not None or args.charset is not None):
        raise InvalidInput("--length and --charset go with --generate")
    if args.generate:
        length = m.check_length(args.length if args.length is not None
                                else m.DEFAULT_GENERATE_LENGTH)
        charset = m.check_charset(args.charset or m.DEFAULT_CHARSET)
        return m.generate_value(length, charset).encode()
    limit = m.MAX_VALUE_BYTES + 1  # one byte more than allowed: enough to refuse
    if args.value_stdin:
        return sys.stdin.buffer.read(limit)
    path = Path(args.value_file)
    try:
        with path.open("rb") as fh:
            return fh.read(limit)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


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
            if not args.json:
                sys.stdout.buffer.write(found.value)
                if sys.stdout.isatty():
                    sys.stdout.buffer.write(b"\n")
                sys.stdout.flush()
                return 0
            data = {"name": found.name, "version_id": found.version_id,
                    "stages": found.stages, **_encoded(found.value)}
        elif action == "put-version":
            data = (await csms.put_version(args.name, checked["value"], **acct)).to_json()
        elif action == "versions":
            data = [v.to_json() for v in await csms.list_versions(args.name, **acct)]
            human = _version_table
        elif action == "set-stage":
            data = {"name": args.name, "stages": await csms.set_stage(
                args.name, args.stage, args.version_id, **acct)}
        elif action == "remove-stage":
            data = {"name": args.name, "stages": await csms.remove_stage(
                args.name, args.stage, args.version_id, **acct)}
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


async def _rotate(args: argparse.Namespace, settings: Settings) -> int:
    from handlers.csms.service import ROTATE_JOB, open_secrets

    # A secret that is not there (or pending deletion) is bad input (exit 2), not a
    # task that fails later.
    async with open_secrets(settings) as csms:
        await csms.check_usable(args.name, account=args.account)
    return await run_job(settings, ROTATE_JOB, {"name": args.name, "account": args.account},
                         wait=not args.no_wait, timeout=args.timeout, as_json=args.json)


# --------------------------------------------------------------------------- output


def _encoded(value: bytes) -> dict[str, str]:
    try:
        return {"value": value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"value_base64": base64.b64encode(value).decode()}


def _secret(s: dict[str, Any]) -> str:
    rot = s["rotation"]
    lines = {
        "name": s["name"], "account": s["account"], "type": s["secret_type"],
        "kms key": s["kms_key"], "description": s["description"] or "-",
        "state": s["state"] + (f" (deletion on {s['deletion_date']})"
                               if s["deletion_date"] else ""),
        "created": s["created_at"], "versions": str(s["versions"]),
        "stages": ", ".join(f"{k}={v}" for k, v in s["stages"].items()) or "-",
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


def _version_table(versions: list[dict[str, Any]]) -> str:
    lines = [f"{'VERSION':10} {'CREATED (UTC)':19}  STAGES"]
    for v in versions:
        lines.append(f"{v['version_id']:10} {v['created_at'][:19].replace('T', ' '):19}  "
                     f"{', '.join(v['stages']) or '-'}")
    return "\n".join(lines)


def _secret_table(secrets: list[dict[str, Any]]) -> str:
    if not secrets:
        return "no secrets"
    lines = [f"{'NAME':32} {'TYPE':15} {'STATE':16} {'ROTATION':10} {'FAILED':>6}  CURRENT"]
    for s in secrets:
        rot = s["rotation"]
        lines.append(
            f"{s['name']:32} {s['secret_type']:15} {s['state']:16} "
            f"{(str(rot['period_hours']) + 'h') if rot['enabled'] else 'off':10} "
            f"{s['failed_rotations']:>6}  {s['stages'].get('SYSCURRENT', '-')}")
    return "\n".join(lines)
