"""``dew iam ...``: projects, users, access keys and roles of the HTTPS API.

Imported only when ``dew iam`` runs (``dew --help`` lists the command by name).
Every verb takes ``--json``. Input is checked before anything is written: bad
input (a bad name, network or action, an unknown user, project or role, a taken
name, a role still held, a third access key) is one line on stderr and exit 2.
``create-access-key`` prints the secret key this once; it is kept only sealed.
``set-password`` reads the console password from ``--password-file`` or standard
input (asked twice on a terminal) and stores only its argon2id hash.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import Any

from engine.cli_output import lines, print_result
from engine.settings import Settings

HELP = "identities of the HTTPS API: projects, users, access keys, roles"


def register(subparsers: Any, commands: dict[str, Any]) -> None:
    iam = subparsers.add_parser("iam", help=HELP, description=HELP)
    sub = iam.add_subparsers(dest="action", metavar="ACTION", required=True,
                             parser_class=type(iam))

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    def user_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("user", help="the user's name or 32-hex id")

    verb("create-project", "create a project (the services' account)").add_argument(
        "name", help="the project's name: 1-64 letters, digits, '_', '.', '@' or '-'")
    verb("list-projects", "list the projects")
    p = verb("create-user", "create a user of a project")
    p.add_argument("name", help="the user's name: 1-64 letters, digits, '_', '.', '@' or '-'")
    p.add_argument("--project", required=True, metavar="P", help="project name or id")
    p.add_argument("--role", action="append", default=[], metavar="ROLE",
                   help="a role to give (repeat for more)")
    p.add_argument("--allow-cidr", action="append", default=[], metavar="CIDR",
                   help="a network the user may call from (repeat; none: any)")
    p = verb("list-users", "list the users")
    p.add_argument("--project", metavar="P", help="only this project's (name or id)")
    p = verb("set-roles", "replace a user's roles (none: take them all)")
    user_arg(p)
    p.add_argument("roles", nargs="*", metavar="ROLE",
                   help="the roles it holds from now on (dew iam list-roles)")
    user_arg(verb("disable-user", "disable a user: its access keys and console sessions "
                  "stop working"))
    user_arg(verb("enable-user", "enable a user again"))
    p = verb("set-password", "set a user's web console password (stored as argon2id); "
             "its console sessions end")
    user_arg(p)
    p.add_argument("--password-file", metavar="FILE",
                   help="read the password from the first line of FILE (mode 0600) instead "
                   "of standard input")
    user_arg(verb("create-access-key", "create an access key (AK/SK); the SK is shown once"))
    user_arg(verb("list-access-keys", "list a user's access keys"))
    verb("delete-access-key", "delete an access key").add_argument(
        "access_key", metavar="AK", help="the access key (20 letters or digits)")
    p = verb("set-access-key-status", "make an access key active or inactive")
    p.add_argument("access_key", metavar="AK", help="the access key (20 letters or digits)")
    p.add_argument("status", choices=("active", "inactive"),
                   help="active (it authenticates) or inactive (it does not)")
    p = verb("create-role", "create a custom role from actions or wildcards (kms:*)")
    p.add_argument("name", help="the role's name (letters, digits, spaces, '_.@:/-')")
    p.add_argument("actions", nargs="+", metavar="ACTION",
                   help="an action or wildcard it allows (dew iam list-actions)")
    p.add_argument("--description", default="", help="one line saying what the role is for")
    verb("delete-role", "delete a custom role (refused while a user holds it)"
         ).add_argument("name", help="the custom role's name")
    verb("list-roles", "list the built-in and custom roles with their actions")
    verb("list-actions", "list the actions the configured services check")
    commands["iam"] = cmd_iam


def read_password(path: str | None) -> str:
    """The new password: the first line of ``--password-file`` (mode 0600), else
    standard input (on a terminal asked twice, unechoed, and the two must match)."""
    from engine.errors import InvalidInput

    if path is not None:
        return _password_file(path)
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass("New console password: ")
        if getpass.getpass("The same again: ") != first:
            raise InvalidInput("the two passwords differ; nothing was changed",
                               code="invalid_password", target="password")
        return first
    line = sys.stdin.readline()
    if not line:
        raise InvalidInput("no password on standard input (or give --password-file FILE)",
                           code="invalid_password", target="password")
    return line.rstrip("\r\n")


def _password_file(path: str) -> str:
    from engine.errors import InvalidInput

    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidInput(f"--password-file: cannot read {path}: {reason}",
                           code="invalid_password", target="--password-file") from None
    if mode & 0o077:
        raise InvalidInput(f"--password-file: {path} is readable by others (mode "
                           f"{stat.S_IMODE(mode):04o})", code="invalid_password",
                           target="--password-file", fix=f"chmod 600 {path}")
    return line.rstrip("\r\n")


async def cmd_iam(args: argparse.Namespace, settings: Settings) -> int:
    from engine.iam.service import Identities

    async with await Identities.open(settings) as ids:
        action = args.action
        if action == "create-project":
            _show((await ids.create_project(args.name)).to_json(), args)
        elif action == "list-projects":
            _table([p.to_json() for p in await ids.list_projects()], args,
                   ("name", "project_id", "created_at"), "no projects")
        elif action == "create-user":
            user = await ids.create_user(args.name, args.project, args.role, args.allow_cidr)
            _show(user.to_json(), args)
        elif action == "list-users":
            users = await ids.list_users(args.project)
            _table([u.to_json() for u in users], args,
                   ("name", "user_id", "project", "enabled", "roles", "cidrs"), "no users")
        elif action == "set-roles":
            _show((await ids.set_roles(args.user, args.roles)).to_json(), args)
        elif action == "disable-user":
            _show((await ids.disable_user(args.user)).to_json(), args)
        elif action == "enable-user":
            _show((await ids.enable_user(args.user)).to_json(), args)
        elif action == "set-password":
            user = await ids.set_password(args.user, read_password(args.password_file))
            print_result({"user": user.name, "user_id": user.user_id, "password": "set"},
                         args.json, lambda d: f"console password of {d['user']} set")
        elif action == "create-access-key":
            record, secret = await ids.create_access_key(args.user)
            shown = {"access_key": record.access_key, "secret_key": secret,
                     **record.to_json()}
            if args.json:
                print_result(shown, True, lines)
            else:
                print(lines(shown))
                print("the secret key is shown only this once: keep it now")
        elif action == "list-access-keys":
            _table([k.to_json() for k in await ids.list_access_keys(args.user)], args,
                   ("access_key", "status", "user", "project", "created_at"), "no access keys")
        elif action == "delete-access-key":
            await ids.delete_access_key(args.access_key)
            print_result({"deleted": args.access_key}, args.json,
                         lambda d: f"deleted access key {d['deleted']}")
        elif action == "set-access-key-status":
            _show((await ids.set_access_key_status(args.access_key, args.status)).to_json(),
                  args)
        elif action == "create-role":
            role = await ids.create_role(args.name, args.actions, args.description)
            _show(role.to_json(), args)
        elif action == "delete-role":
            await ids.delete_role(args.name)
            print_result({"deleted": args.name}, args.json,
                         lambda d: f"deleted role {d['deleted']}")
        elif action == "list-roles":
            _table([r.to_json() for r in await ids.list_roles()], args,
                   ("name", "builtin", "actions"), "no roles")
        else:  # list-actions
            _table([{"action": a, "meaning": m} for a, m in sorted(ids.actions().items())],
                   args, ("action", "meaning"), "no actions")
    return 0


def _show(data: dict[str, Any], args: argparse.Namespace) -> None:
    print_result(data, args.json, lines)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None or value == "" else str(value)


def _table(rows: list[dict[str, Any]], args: argparse.Namespace, columns: tuple[str, ...],
           empty: str) -> None:
    def human(items: list[dict[str, Any]]) -> str:
        if not items:
            return empty
        cells = [[_cell(item[c]) for c in columns] for item in items]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        header = [c.upper().replace("_", " ") for c in columns]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                         .rstrip() for row in [header, *cells])

    print_result(rows, args.json, human)
