"""``dew keypairs ...`` and ``dew servers ...``: KPS from the command line.

The grammar is docs/cli.md's: the object is positional (``KEYPAIR``, ``SERVER``;
``bind KEYPAIR SERVER...``), inputs are ``--<name>-file`` (``-`` reads stdin),
``--owner`` is a key pair's owner (default ``$DEW_USER`` or the login name: whose
``user``-scope key pairs you see), ``--login-user`` a server's SSH login,
``--format`` a private-key format, ``--project`` the project (default ``default``),
and every verb takes ``--json``. The older spellings (``--user``, ``--to``,
``--public-key``, ``--private-key``, ``--host-key``, ``--server``, ``convert IN``,
``--account``) work for one release with a deprecation line on stderr. Input is
checked before anything is written: bad input is one line on stderr and exit 2, and
stores nothing.
``bind``, ``replace``, ``reset`` and ``unbind`` run as jobs (handlers/kps/cli_jobs.py).
"""

from __future__ import annotations

import argparse
import getpass
import os
from collections.abc import Callable
from typing import Any

from engine.cli_output import (
    add_option,
    add_project_option,
    deprecated,
    lines,
    print_result,
    text,
)
from engine.errors import InvalidInput
from engine.settings import Settings
from handlers.kps.cli_io import NewFiles, one_stdin, read_bounded, read_secret_line, wrote
from handlers.kps.cli_jobs import DEFAULT_JOB_TIMEOUT, JOB_ACTIONS, missing_servers, run_job

ALGORITHMS = ("SSH_ED25519", "ECDSA_NISTP256", "ECDSA_NISTP384", "ECDSA_NISTP521",
              "SSH_RSA_2048", "SSH_RSA_3072", "SSH_RSA_4096")
# handlers.kps.keys.PRIVATE_FORMATS (a test keeps them equal): importing the key
# formats here would cost every `dew keypairs --help` the cryptography import.
FORMATS = ("openssh", "pem", "pkcs8", "ppk")
SCOPES = ("user", "account")
KEY_TYPES = ("ssh", "x509")
JOB_HELP = {
    "bind": "install the key pair on servers",
    "replace": "swap the servers' key for this one (--private-key-file: the old one)",
    "reset": "install the key pair when the old private key is lost (password)",
    "unbind": "remove the key pair from servers (--private-key-file: its own)",
}


def default_owner() -> str:
    try:
        return os.environ.get("DEW_USER") or getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


# --------------------------------------------------------------------------- parser


class _Intermixed(argparse.ArgumentParser):
    """Positionals may follow options (``bind KEYPAIR --password-file F SERVER``):
    argparse alone would take ``SERVER...`` as empty at ``KEYPAIR`` and refuse the rest."""

    _parsing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._parsing:  # parse_known_intermixed_args calls back in, twice
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def _verbs(group: argparse.ArgumentParser) -> Any:
    parser_class = type("KpsParser", (_Intermixed, type(group)), {})
    return group.add_subparsers(dest="action", metavar="ACTION", required=True,
                                parser_class=parser_class)


def _verb(sub: Any, name: str, help_text: str, owner: bool = True,
          project: bool = True) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    if project:
        add_project_option(p)
    if owner:
        add_option(p, "--owner", "--user", dest="owner", metavar="OWNER",
                   help="whose user-scope key pairs (default: $DEW_USER or your login name)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (errors too: one JSON line on stderr)")
    return p


def _keypair(p: argparse.ArgumentParser) -> None:
    p.add_argument("keypair", metavar="KEYPAIR", help="the key pair's name")


def _private_key_file(p: Any, help_text: str, **kwargs: Any) -> None:
    add_option(p, "--private-key-file", "--private-key", dest="private_key_file",
               metavar="FILE", help=f"{help_text} (- reads stdin)", **kwargs)


def register(subparsers: Any, commands: dict[str, Any]) -> None:
    kp = subparsers.add_parser("keypairs", help="KPS: SSH key pairs, bound to servers")
    ksub = _verbs(kp)
    _keypair_verbs(ksub)
    _convert_verb(ksub)
    for action in JOB_ACTIONS:
        _job_verb(ksub, action)
    sv = subparsers.add_parser("servers", help="KPS: servers key pairs are bound to")
    _server_verbs(_verbs(sv))
    commands["keypairs"] = cmd_keypairs
    commands["servers"] = cmd_servers


def _keypair_verbs(ksub: Any) -> None:
    p = _verb(ksub, "create", "create a key pair; the private key is handed out once")
    _keypair(p)
    p.add_argument("--algorithm", default="SSH_ED25519", choices=ALGORITHMS,
                   metavar="ALGORITHM", help=f"one of {', '.join(ALGORITHMS)} "
                   "(default SSH_ED25519)")
    p.add_argument("--managed", action="store_true",
                   help="also keep the private key (encrypted under kps/default)")
    p.add_argument("--scope", default="user", choices=SCOPES,
                   help="user (default: the owner's only) or account (the project's)")
    p.add_argument("--out", metavar="FILE", help="the private key file, created 0600 "
                   "(FILE.pub beside it); default ./KEYPAIR")
    p = _verb(ksub, "import", "import a public key (OpenSSH, RFC 4716, PEM, x509)")
    _keypair(p)
    add_option(p, "--public-key-file", "--public-key", dest="public_key_file",
               required=True, metavar="FILE", help="the public key (- reads stdin)")
    p.add_argument("--type", default="ssh", choices=KEY_TYPES,
                   help="ssh (default) or x509 (a PEM certificate)")
    _private_key_file(p, "its private key, kept managed (encrypted under kps/default)")
    p.add_argument("--passphrase-file", metavar="FILE",
                   help="the passphrase of --private-key-file (- reads stdin)")
    p.add_argument("--scope", default="user", choices=SCOPES,
                   help="user (default: the owner's only) or account (the project's)")
    _verb(ksub, "list", "list the key pairs you can see")
    for name, help_text in (("show", "show one key pair"),
                            ("delete", "delete a key pair (refused while bound)"),
                            ("upgrade", "user scope -> account scope")):
        _keypair(_verb(ksub, name, help_text))
    p = _verb(ksub, "export-private", "write a managed private key to a file again")
    _keypair(p)
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the file to create (0600; never overwritten)")
    p.add_argument("--format", default="openssh", choices=FORMATS, metavar="FORMAT",
                   help="openssh (default), pem, pkcs8 or ppk (PuTTY v3)")


def _convert_verb(ksub: Any) -> None:
    p = _verb(ksub, "convert", "convert a private key: OpenSSH, PEM, PKCS#8, PuTTY .ppk",
              owner=False, project=False)
    p.add_argument("input", nargs="?", metavar="IN",
                   help="deprecated: use --private-key-file")
    _private_key_file(p, "the private key to convert")
    add_option(p, "--format", "--to", dest="format", required=True, choices=FORMATS,
               metavar="FORMAT",
               help="the output format: openssh, pem, pkcs8 or ppk (PuTTY v3)")
    p.add_argument("--out", metavar="FILE",
                   help="create FILE (0600; never overwritten) instead of printing the key")
    p.add_argument("--passphrase-file", metavar="FILE",
                   help="the passphrase of --private-key-file (- reads stdin)")
    p.add_argument("--new-passphrase-file", metavar="FILE",
                   help="encrypt the output with this passphrase (- reads stdin)")


def _job_verb(ksub: Any, action: str) -> None:
    p = _verb(ksub, action, JOB_HELP[action])
    _keypair(p)
    p.add_argument("servers", nargs="*", metavar="SERVER",
                   help="a registered server (dew servers list); one or more")
    p.add_argument("--server", dest="server_flag", action="append", metavar="SERVER",
                   help="deprecated: use the positional SERVER")
    password_help = "the login user's password (- reads stdin)"
    if action == "bind":
        auth = p.add_mutually_exclusive_group(required=True)
        auth.add_argument("--password-file", metavar="FILE", help=password_help)
        _private_key_file(auth, "a private key the server accepts now")
    elif action == "reset":
        p.add_argument("--password-file", required=True, metavar="FILE", help=password_help)
    else:
        _private_key_file(p, "the old key pair's private key" if action == "replace"
                          else "this key pair's private key", required=True)
    if action in ("bind", "reset"):
        p.add_argument("--disable-password", action="store_true",
                       help="turn password login off once a fresh key login proved the key")
    if action == "unbind":
        p.add_argument("--enable-password", action="store_true",
                       help="turn password login on (and prove it) before the key is removed")
    p.add_argument("--timeout", type=float, default=DEFAULT_JOB_TIMEOUT, metavar="S",
                   help=f"give up waiting after S seconds (default {DEFAULT_JOB_TIMEOUT:g}); "
                   "the task goes on")
    p.add_argument("--no-wait", action="store_true",
                   help="only enqueue: print the task id (follow it with dew tasks show)")


def _server_verbs(ssub: Any) -> None:
    p = _verb(ssub, "add", "add a server (its host key is pinned)", owner=False)
    p.add_argument("server", metavar="SERVER", help="a name for the server")
    p.add_argument("--host", required=True, help="its address or DNS name")
    p.add_argument("--port", type=int, default=22, help="its SSH port (default 22)")
    add_option(p, "--login-user", "--user", dest="login", default="root",
               metavar="LOGIN", help="the SSH login user (default root)")
    pin = p.add_mutually_exclusive_group(required=True)
    add_option(pin, "--host-key-file", "--host-key", dest="host_key_file", metavar="FILE",
               help="the server's public host key (- reads stdin)")
    pin.add_argument("--trust-first-use", action="store_true",
                     help="pin the key the server shows on the first connection")
    p.add_argument("--sshd-config", metavar="PATH",
                   help="sshd's config on the server (default by OS: /etc/ssh/sshd_config)")
    p.add_argument("--reload-command", metavar="CMD",
                   help="how to reload sshd on the server (default by OS)")
    p.add_argument("--authorized-keys", metavar="PATH",
                   help="on the server (default ~/.ssh/authorized_keys of the login user)")
    p.add_argument("--sudo", action="store_true",
                   help="the login user is not root: run the privileged steps (sshd_config, "
                   "the reload, sshd -T) through passwordless `sudo -n`")
    _verb(ssub, "list", "list servers", owner=False)
    _server(_verb(ssub, "show", "show one server and the key pairs bound to it", owner=False))
    _server(_verb(ssub, "remove", "remove a server (refused while key pairs are bound)",
                  owner=False))


def _server(p: argparse.ArgumentParser) -> None:
    p.add_argument("server", metavar="SERVER", help="the server's name")


# --------------------------------------------------------------------------- old spellings


def merge_old_spellings(args: argparse.Namespace) -> None:
    """The old spellings argparse cannot alias: ``--server S`` (now the positional
    SERVER) and ``convert IN`` (now ``--private-key-file``); one warning line each."""
    if getattr(args, "server_flag", None):
        deprecated("--server", "the positional SERVER")
        args.servers = [*args.servers, *args.server_flag]
    if args.action in JOB_ACTIONS and not args.servers:
        raise missing_servers(args.action)
    if args.action == "convert":
        if args.input is not None:
            deprecated("the positional IN", "--private-key-file")
            if args.private_key_file is not None:
                raise InvalidInput("give the private key once: --private-key-file, not "
                                   "also IN", code="usage")
            args.private_key_file = args.input
        if args.private_key_file is None:
            raise InvalidInput("the following arguments are required: --private-key-file "
                               "(see `dew keypairs convert --help`)", code="usage")


# --------------------------------------------------------------------------- rendering


def _pair_text(d: dict[str, Any]) -> str:
    rows = [("name", d["name"]), ("algorithm", d["algorithm"]), ("type", d["type"]),
            ("fingerprint", d["fingerprint"]), ("scope", d["scope"]), ("owner", d["owner"]),
            ("managed", text(d["managed"])), ("servers", ", ".join(d["servers"]) or "-"),
            ("created at", d["created_at"]), ("public key", d["public_key"])]
    if "out" in d:
        rows.append(("files", wrote("private key", d["bytes"], d["out"]) +
                     f", public key to {d['public_key_file']}"))
    return "\n".join(f"{k:12} {v}" for k, v in rows)


def _pair_table(pairs: list[dict[str, Any]]) -> str:
    if not pairs:
        return "no key pairs"
    out = [f"{'NAME':24} {'ALGORITHM':15} {'SCOPE':8} {'MANAGED':8} FINGERPRINT"]
    out += [f"{p['name']:24} {p['algorithm']:15} {p['scope']:8} "
            f"{text(p['managed']):8} {p['fingerprint']}" for p in pairs]
    return "\n".join(out)


def _server_text(d: dict[str, Any]) -> str:
    # The JSON's "user" is the SSH login (the API's field name); the text says which.
    shown = {("login_user" if k == "user" else k): v for k, v in d.items()}
    if "keypairs" in shown:
        shown["keypairs"] = ", ".join(shown["keypairs"]) or None
    return lines(shown)


def _server_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no servers"
    out = [f"{'NAME':24} {'ADDRESS':30} {'LOGIN USER':12} HOST KEY"]
    out += [f"{r['name']:24} {r['host'] + ':' + str(r['port']):30} {r['user']:12} "
            f"{'pinned' if r['host_key_pinned'] else 'trust on first use'}" for r in rows]
    return "\n".join(out)


def _summary(d: dict[str, Any]) -> str:
    return wrote("private key", d["bytes"], d["out"])


# --------------------------------------------------------------------------- commands


def _explained(error: InvalidInput) -> InvalidInput:
    """The product's message, then why (the CLI's one line must say what to change)."""
    if not error.cause or error.cause in error.message:
        return error
    return InvalidInput(f"{error.message} {error.cause}", code=error.code, fix=error.fix)


async def cmd_keypairs(args: argparse.Namespace, settings: Settings) -> int:
    try:
        merge_old_spellings(args)
        return await _keypairs(args, settings)
    except InvalidInput as exc:
        raise _explained(exc) from None


async def cmd_servers(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return await _servers(args, settings)
    except InvalidInput as exc:
        raise _explained(exc) from None


async def _keypairs(args: argparse.Namespace, settings: Settings) -> int:
    from handlers.kps.service import check_name

    if args.action == "convert":
        return _convert(args)
    who = {"account": args.account, "user": args.owner or default_owner()}
    if args.action != "list":
        check_name(args.keypair)
    if args.action in JOB_ACTIONS:
        return await run_job(args, settings, who)
    if args.action == "create":
        return await _create(args, settings, who)
    if args.action == "import":
        return await _import(args, settings, who)
    if args.action == "export-private":
        return await _export(args, settings, who)
    return await _other(args, settings, who)


async def _create(args: argparse.Namespace, settings: Settings, who: dict[str, str]) -> int:
    from handlers.kps.service import open_kps

    out = args.out or args.keypair
    # Opened before the key pair is generated and stored (audit L1): a missing folder
    # or an unwritable path leaves nothing behind.
    outputs = NewFiles("--out", out, out + ".pub")
    try:
        async with open_kps(settings) as kps:
            created = await kps.create(args.keypair, args.algorithm, managed=args.managed,
                                       scope=args.scope, **who)
    except BaseException:
        outputs.discard()
        raise
    outputs.write(0, created.private_key)
    outputs.write(1, (created.view.record.public_key + "\n").encode())
    outputs.keep()
    data = {**created.view.to_json(), "out": out, "bytes": len(created.private_key),
            "private_key_file": out, "public_key_file": out + ".pub"}
    print_result(data, args.json, _pair_text)
    return 0


async def _import(args: argparse.Namespace, settings: Settings, who: dict[str, str]) -> int:
    from handlers.kps.service import open_kps

    one_stdin({"--public-key-file": args.public_key_file,
               "--private-key-file": args.private_key_file,
               "--passphrase-file": args.passphrase_file})
    public = read_bounded("--public-key-file", args.public_key_file)
    private = read_bounded("--private-key-file", args.private_key_file) \
        if args.private_key_file else None
    passphrase = read_secret_line("--passphrase-file", args.passphrase_file).encode() \
        if args.passphrase_file else None
    async with open_kps(settings) as kps:
        view = await kps.import_(args.keypair, public.decode("utf-8", "replace"), args.type,
                                 private_key=private, passphrase=passphrase,
                                 scope=args.scope, **who)
    print_result(view.to_json(), args.json, _pair_text)
    return 0


async def _export(args: argparse.Namespace, settings: Settings, who: dict[str, str]) -> int:
    from handlers.kps.keys import dump_private_key, load_private_key
    from handlers.kps.service import open_kps

    output = NewFiles("--out", args.out)
    try:
        async with open_kps(settings) as kps:
            record = await kps.get(args.keypair, **who)
            pem = await kps.private_key(record)
        if args.format != "openssh":
            pem = dump_private_key(load_private_key(pem).key, args.format, record.name)
        output.write(0, pem)
    except BaseException:
        output.discard()
        raise
    output.keep()
    data = {"name": record.name, "format": args.format, "out": args.out, "bytes": len(pem),
            "private_key_file": args.out}
    print_result(data, args.json, _summary)
    return 0


async def _other(args: argparse.Namespace, settings: Settings, who: dict[str, str]) -> int:
    from handlers.kps.service import open_kps

    async with open_kps(settings) as kps:
        data: Any
        human: Callable[[Any], str] = _pair_text
        if args.action == "list":
            data = [v.to_json() for v in await kps.list(**who)]
            human = _pair_table
        elif args.action == "show":
            data = (await kps.show(args.keypair, **who)).to_json()
        elif args.action == "delete":
            await kps.delete(args.keypair, **who)
            data, human = {"deleted": args.keypair}, lines
        else:  # upgrade
            data = (await kps.upgrade(args.keypair, **who)).to_json()
    print_result(data, args.json, human)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from handlers.kps.service import convert_private_key

    one_stdin({"--private-key-file": args.private_key_file,
               "--passphrase-file": args.passphrase_file,
               "--new-passphrase-file": args.new_passphrase_file})
    data = read_bounded("--private-key-file", args.private_key_file)
    old = read_secret_line("--passphrase-file", args.passphrase_file).encode() \
        if args.passphrase_file else None
    new = read_secret_line("--new-passphrase-file", args.new_passphrase_file).encode() \
        if args.new_passphrase_file else None
    if not args.out:
        key = convert_private_key(data, args.format, passphrase=old, new_passphrase=new)
        print_result({"format": args.format, "private_key": key.decode()}, args.json,
                     lambda d: str(d["private_key"]).rstrip("\n"))
        return 0
    output = NewFiles("--out", args.out)
    try:
        out = convert_private_key(data, args.format, passphrase=old, new_passphrase=new)
        output.write(0, out)
    except BaseException:
        output.discard()
        raise
    output.keep()
    print_result({"format": args.format, "out": args.out, "bytes": len(out),
                  "private_key_file": args.out}, args.json, _summary)
    return 0


# --------------------------------------------------------------------------- servers


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise InvalidInput(f"--port must be 1..65535, got {port}")


async def _servers(args: argparse.Namespace, settings: Settings) -> int:
    from handlers.kps.service import check_name, open_kps

    if args.action != "list":
        check_name(args.server, "server")
    host_key = None
    if args.action == "add":
        _check_port(args.port)
        if args.host_key_file:
            host_key = read_bounded("--host-key-file", args.host_key_file).decode(
                "utf-8", "replace")
    async with open_kps(settings) as kps:
        data: Any
        human: Callable[[Any], str] = _server_text
        if args.action == "add":
            data = (await kps.add_server(
                args.server, args.host, port=args.port, user=args.login, host_key=host_key,
                trust_first_use=args.trust_first_use, sshd_config=args.sshd_config,
                reload_command=args.reload_command, authorized_keys=args.authorized_keys,
                sudo=args.sudo, account=args.account)).to_json()
        elif args.action == "list":
            data = [s.to_json() for s in await kps.store.list_servers(args.account)]
            human = _server_table
        elif args.action == "show":
            server = await kps.server(args.server, args.account)
            data = {**server.to_json(),
                    "keypairs": await kps.store.keypairs_on(server.server_id)}
        else:
            await kps.remove_server(args.server, args.account)
            data, human = {"removed": args.server}, lines
    print_result(data, args.json, human)
    return 0

