"""``dew keypairs ...`` and ``dew servers ...``: KPS from the command line.

Every command takes ``--project`` (alias ``--account``; default ``default``),
``--user`` (default ``$DEW_USER`` or the login name: whose ``user``-scope key pairs you see) and
``--json``. Input is checked before anything is written: bad input is one line
on stderr and exit 2, and stores nothing. ``bind``, ``replace``, ``reset`` and
``unbind`` seal the credential under ``kps/default``, enqueue the job, wait
for a worker (a progress bar on a terminal) and print one line per server;
they exit 0 when every server succeeded and 1 otherwise (each failed server
has a failure record: ``dew failures list --operation kps.bind``). A batch whose
every server failed is a ``failed`` task; one where some failed ``succeeded`` with
``partially_failed: true``; both print one line per server (docs/kps.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.cli_output import add_project_option, print_result
from engine.errors import DewError, InvalidInput
from engine.settings import Settings

DEFAULT_JOB_TIMEOUT = 600.0
MAX_JOB_TIMEOUT = 86400.0
MAX_INPUT_BYTES = 64 * 1024  # keys, certificates, passwords: far below this
ALGORITHMS = ("SSH_ED25519", "ECDSA_NISTP256", "ECDSA_NISTP384", "ECDSA_NISTP521",
              "SSH_RSA_2048", "SSH_RSA_3072", "SSH_RSA_4096")
JOB_ACTIONS = ("bind", "replace", "reset", "unbind")


def _default_user() -> str:
    try:
        return os.environ.get("DEW_USER") or getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def register(subparsers: Any, commands: dict[str, Any]) -> None:
    kp = subparsers.add_parser("keypairs", help="KPS: SSH key pairs, bound to servers")
    ksub = kp.add_subparsers(dest="action", metavar="ACTION", required=True,
                             parser_class=type(kp))

    def command(sub: Any, name: str, help_text: str, identity: bool = True
                ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        add_project_option(p)
        if identity:
            p.add_argument("--user", default=None, help="whose user-scope key pairs "
                           "(default: $DEW_USER or your login name)")
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    p = command(ksub, "create", "create a key pair; the private key is handed out once")
    p.add_argument("name")
    p.add_argument("--algorithm", default="SSH_ED25519", help=", ".join(ALGORITHMS))
    p.add_argument("--managed", action="store_true",
                   help="also keep the private key (encrypted under kps/default)")
    p.add_argument("--scope", default="user", help="user (default) or account")
    p.add_argument("--out", metavar="FILE", help="private key file (0600; FILE.pub beside "
                   "it); default ./NAME")
    p = command(ksub, "import", "import a public key (OpenSSH, RFC 4716, PEM, x509)")
    p.add_argument("name")
    p.add_argument("--public-key", required=True, metavar="FILE")
    p.add_argument("--type", default="ssh", help="ssh (default) or x509")
    p.add_argument("--private-key", metavar="FILE", help="its private key, kept managed")
    p.add_argument("--passphrase-file", metavar="FILE")
    p.add_argument("--scope", default="user")
    command(ksub, "list", "list the key pairs you can see")
    for name, text in (("show", "show one key pair"), ("delete", "delete a key pair "
                       "(refused while bound)"), ("upgrade", "user scope -> account scope")):
        command(ksub, name, text).add_argument("name")
    p = command(ksub, "export-private", "write a managed private key again")
    p.add_argument("name")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--format", default="openssh", help="openssh, pem, pkcs8 or ppk")
    p = command(ksub, "convert", "convert a private key: OpenSSH, PEM, PKCS#8, PuTTY .ppk")
    p.add_argument("input", metavar="IN")
    p.add_argument("--to", required=True, help="openssh, pem, pkcs8 or ppk (v3)")
    p.add_argument("--out", metavar="FILE", help="default: stdout")
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of IN")
    p.add_argument("--new-passphrase-file", metavar="FILE", help="encrypt the output")
    for action in JOB_ACTIONS:
        p = command(ksub, action, {
            "bind": "install the key pair on servers",
            "replace": "swap the servers' key for this one (--private-key: the old one)",
            "reset": "install the key pair when the old private key is lost (password)",
            "unbind": "remove the key pair from servers (--private-key: its own)"}[action])
        p.add_argument("name")
        p.add_argument("--server", action="append", required=True, metavar="S")
        if action in ("bind", "reset"):
            p.add_argument("--password-file", metavar="FILE")
        if action in ("bind", "replace", "unbind"):
            p.add_argument("--private-key", metavar="FILE")
        if action in ("bind", "reset"):
            p.add_argument("--disable-password", action="store_true")
        if action == "unbind":
            p.add_argument("--enable-password", action="store_true")
        p.add_argument("--timeout", type=float, default=DEFAULT_JOB_TIMEOUT, metavar="S")
        p.add_argument("--no-wait", action="store_true", help="only enqueue")

    sv = subparsers.add_parser("servers", help="KPS: servers key pairs are bound to")
    ssub = sv.add_subparsers(dest="action", metavar="ACTION", required=True,
                             parser_class=type(sv))
    p = command(ssub, "add", "add a server (its host key is pinned)", identity=False)
    p.add_argument("name")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=22)
    p.add_argument("--user", dest="login", default="root", help="the login user (default root)")
    pin = p.add_mutually_exclusive_group(required=True)
    pin.add_argument("--host-key", metavar="FILE", help="the server's public host key")
    pin.add_argument("--trust-first-use", action="store_true",
                     help="pin the key the server shows on the first connection")
    p.add_argument("--sshd-config", metavar="PATH", help="default /etc/ssh/sshd_config")
    p.add_argument("--reload-command", metavar="CMD", help="default by OS")
    p.add_argument("--authorized-keys", metavar="PATH",
                   help="default ~/.ssh/authorized_keys of the login user")
    p.add_argument("--sudo", action="store_true",
                   help="the login user is not root: run the privileged steps (sshd_config, "
                   "the reload, sshd -T) through passwordless `sudo -n`")
    command(ssub, "list", "list servers", identity=False)
    command(ssub, "show", "show one server", identity=False).add_argument("name")
    command(ssub, "remove", "remove a server (refused while key pairs are bound)",
            identity=False).add_argument("name")
    commands["keypairs"] = cmd_keypairs
    commands["servers"] = cmd_servers


# --------------------------------------------------------------------------- helpers


def _read(path: str, what: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """A user-named file, at most ``limit`` bytes (``/dev/zero`` is refused, not read)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise InvalidInput("Invalid parameter.", cause=f"cannot read {what} {path}: "
                           f"{exc.strerror}") from None
    if len(data) > limit:
        raise InvalidInput("Invalid parameter.", cause=f"{what} {path} is over {limit} bytes")
    return data


def _check_timeout(timeout: float) -> None:
    if not 0 < timeout <= MAX_JOB_TIMEOUT:  # also false for nan
        raise InvalidInput("Invalid parameter.", cause=f"--timeout must be above 0 and at "
                           f"most {MAX_JOB_TIMEOUT:.0f} seconds, got {timeout}")


def _secret_line(path: str, what: str) -> str:
    text = _read(path, what).decode("utf-8", errors="replace")
    return text[:-1] if text.endswith("\n") else text


def _refuse_existing(path: str) -> None:
    if Path(path).exists():
        raise InvalidInput("Invalid parameter.", cause=f"{path} exists; it is not overwritten")


def _write_private(path: str, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the first byte (never overwrite)."""
    fd = _open_new(path)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _open_new(path: str) -> int:
    """``path`` created 0600 (O_EXCL); bad paths are bad input (exit 2)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise InvalidInput("Invalid parameter.",
                           cause=f"cannot create {path}: {exc.strerror}") from None


class _NewFiles:
    """Output files opened (O_EXCL, 0600) before anything is generated or stored, so a
    bad path costs nothing; removed again unless :meth:`keep` is called."""

    def __init__(self, *paths: str) -> None:
        self.paths = list(paths)
        self.fds: list[int] = []
        try:
            for path in self.paths:
                self.fds.append(_open_new(path))
        except BaseException:
            self.discard()
            raise

    def write(self, index: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fds[index], view):]

    def keep(self) -> None:
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []

    def discard(self) -> None:
        for fd, path in zip(self.fds, self.paths, strict=False):
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.fds = []


def _who(args: argparse.Namespace) -> dict[str, str]:
    return {"account": args.account, "user": args.user or _default_user()}


def _pair_text(d: dict[str, Any]) -> str:
    rows = [("name", d["name"]), ("algorithm", d["algorithm"]), ("type", d["type"]),
            ("fingerprint", d["fingerprint"]), ("scope", d["scope"]),
            ("managed", "yes" if d["managed"] else "no"),
            ("servers", ", ".join(d["servers"]) or "-"), ("public key", d["public_key"])]
    return "\n".join(f"{k:12} {v}" for k, v in rows)


def _pair_table(pairs: list[dict[str, Any]]) -> str:
    if not pairs:
        return "no key pairs"
    lines = [f"{'NAME':24} {'ALGORITHM':15} {'SCOPE':8} {'MANAGED':8} FINGERPRINT"]
    lines += [f"{p['name']:24} {p['algorithm']:15} {p['scope']:8} "
              f"{'yes' if p['managed'] else 'no':8} {p['fingerprint']}" for p in pairs]
    return "\n".join(lines)


def _lines(d: dict[str, Any]) -> str:
    return "\n".join(f"{k:16} {v}" for k, v in d.items())


# --------------------------------------------------------------------------- keypairs


def _explained(error: InvalidInput) -> InvalidInput:
    """The product's message, then why (the CLI's one line must say what to change)."""
    if not error.cause or error.cause in error.message:
        return error
    return InvalidInput(f"{error.message} {error.cause}", code=error.code, fix=error.fix)


async def cmd_keypairs(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return await _keypairs(args, settings)
    except InvalidInput as exc:
        raise _explained(exc) from None


async def cmd_servers(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return await _servers(args, settings)
    except InvalidInput as exc:
        raise _explained(exc) from None


async def _keypairs(args: argparse.Namespace, settings: Settings) -> int:
    from handlers.kps.service import check_name, convert_private_key

    if args.action == "convert":
        return _convert(args, convert_private_key)
    who = _who(args)
    if args.action != "list":
        check_name(args.name)
    if args.action in JOB_ACTIONS:
        return await _run_job(args, settings, who)
    if args.action == "create":
        return await _create(args, settings, who)
    return await _other(args, settings, who)


async def _create(args: argparse.Namespace, settings: Settings, who: dict[str, str]) -> int:
    from handlers.kps.service import open_kps

    if args.algorithm not in ALGORITHMS:
        raise InvalidInput("Invalid parameter.", cause=f"unknown algorithm "
                           f"{args.algorithm[:40]!r}; use one of {', '.join(ALGORITHMS)}")
    out = args.out or args.name
    # Opened before the key pair is generated and stored (audit L1): a missing folder
    # or an unwritable path leaves nothing behind.
    outputs = _NewFiles(out, out + ".pub")
    try:
        async with open_kps(settings) as kps:
            created = await kps.create(args.name, args.algorithm, managed=args.managed,
                                       scope=args.scope, **who)
    except BaseException:
        outputs.discard()
        raise
    outputs.write(0, created.private_key)
    outputs.write(1, (created.view.record.public_key + "\n").encode())
    outputs.keep()
    data = {**created.view.to_json(), "private_key_file": out, "public_key_file": out + ".pub"}
    print_result(data, args.json, _pair_text)
    return 0


async def _other(args: argparse.Namespace, settings: Settings, who: dict[str, str]) -> int:
    from handlers.kps.service import open_kps

    public_text = private = passphrase = None
    if args.action == "import":
        public_text = _read(args.public_key, "the public key").decode("utf-8", "replace")
        private = _read(args.private_key, "the private key") if args.private_key else None
        if args.passphrase_file:
            passphrase = _secret_line(args.passphrase_file, "the passphrase").encode()
    if args.action == "export-private":
        _refuse_existing(args.out)
    async with open_kps(settings) as kps:
        data: Any
        human: Callable[[Any], str] = _pair_text
        if args.action == "import":
            assert public_text is not None
            data = (await kps.import_(args.name, public_text, args.type, private_key=private,
                                      passphrase=passphrase, scope=args.scope, **who)).to_json()
        elif args.action == "list":
            data = [v.to_json() for v in await kps.list(**who)]
            human = _pair_table
        elif args.action == "show":
            data = (await kps.show(args.name, **who)).to_json()
        elif args.action == "delete":
            await kps.delete(args.name, **who)
            data, human = {"deleted": args.name}, _lines
        elif args.action == "upgrade":
            data = (await kps.upgrade(args.name, **who)).to_json()
        else:  # export-private
            from handlers.kps.keys import dump_private_key, load_private_key

            record = await kps.get(args.name, **who)
            pem = await kps.private_key(record)
            if args.format != "openssh":
                pem = dump_private_key(load_private_key(pem).key, args.format, record.name)
            _write_private(args.out, pem)
            data, human = {"name": record.name, "private_key_file": args.out}, _lines
    print_result(data, args.json, human)
    return 0


def _convert(args: argparse.Namespace, convert: Callable[..., bytes]) -> int:
    data = _read(args.input, "the private key")
    old = _secret_line(args.passphrase_file, "the passphrase").encode() \
        if args.passphrase_file else None
    new = _secret_line(args.new_passphrase_file, "the passphrase").encode() \
        if args.new_passphrase_file else None
    if args.out:
        _refuse_existing(args.out)
    out = convert(data, args.to, passphrase=old, new_passphrase=new)
    if args.out:
        _write_private(args.out, out)
        print_result({"private_key_file": args.out, "format": args.to}, args.json, _lines)
    else:
        sys.stdout.write(out.decode())
    return 0


async def _run_job(args: argparse.Namespace, settings: Settings, who: dict[str, str]) -> int:
    from engine.client import Client
    from engine.registry import default_registry
    from handlers.kps.service import ALL_FAILED, check_name, open_kps

    for server in args.server:
        check_name(server, "server")
    _check_timeout(args.timeout)
    password = getattr(args, "password_file", None)
    key = getattr(args, "private_key", None)
    if (password is None) == (key is None):
        raise InvalidInput("Invalid parameter.", cause="give exactly one of --password-file "
                           "and --private-key" if args.action == "bind" else
                           "the credential option is required")
    if password is not None:
        auth = {"password": _secret_line(password, "the password")}
    else:
        assert key is not None
        auth = {"private_key": _read(key, "the private key").decode("utf-8", "replace")}
    name = f"kps.{args.action}"
    job_args: dict[str, Any] = {"keypair": args.name, "servers": list(args.server), **who}
    if getattr(args, "disable_password", False):
        job_args["disable_pw_login"] = True
    if getattr(args, "enable_password", False):
        job_args["enable_pw_login"] = True
    async with open_kps(settings) as kps:
        # Unknown names are bad input (exit 2, nothing enqueued), not failed tasks.
        await kps.get(args.name, **who)
        for server in dict.fromkeys(args.server):
            await kps.server(server, who["account"])
        job_args["auth"] = auth  # the client seals it (the job declares it secret)
        default_registry(settings).check_args(name, job_args)
        async with await Client.open(settings) as client:
            task = await client.enqueue(name, job_args)
            if args.no_wait:
                print_result({"task_id": task.task_id}, args.json, lambda d: str(d["task_id"]))
                return 0
            task = await _wait(client, kps, task.task_id, len(set(args.server)), args)
        failures = await client_failures(settings, task.task_id)
        record = await kps.get(args.name, **who)
    servers = {name: row for name, row in failures.items() if name}
    if task.status != "succeeded":
        if task.status == "failed" and (task.error or {}).get("code") == ALL_FAILED:
            # Every server failed: the task failed; each server has its failure record.
            result = {"operation": args.action, "keypair": record.name,
                      "fingerprint": record.fingerprint, "task_id": task.task_id,
                      "status": "failed", "error": task.error,
                      "servers": [{"server": name, "status": "failed", **row}
                                  for name, row in servers.items()],
                      "succeeded": 0, "failed": len(servers), "partially_failed": False}
            print_result(result, args.json, _result_text)
            return 1
        error = DewError.from_dict(task.error or {"message": f"task {task.task_id} failed"})
        if args.json:
            print_result({"task_id": task.task_id, "status": task.status, "error": task.error},
                   True, str)
            return 1
        raise error
    result = {**(task.result or {}), "task_id": task.task_id, "status": task.status}
    for row in result.get("servers", []):
        if row["status"] == "failed" and row["server"] in servers:
            row["failure_id"] = servers[row["server"]]["failure_id"]
    print_result(result, args.json, _result_text)
    return 0 if result.get("failed", 0) == 0 else 1


async def client_failures(settings: Settings, task_id: str) -> dict[str, dict[str, str]]:
    """The task's failure records by target ("" for the task-level one)."""
    from engine.store import open_store

    store = await open_store(settings)
    try:
        return {f.target or "": {"failure_id": f.failure_id, "code": f.code, "error": f.error}
                for f in await store.list_failures(task_id=task_id)}
    finally:
        await store.close()


async def _wait(client: Any, kps: Any, task_id: str, total: int,
                args: argparse.Namespace) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout
    bar = sys.stderr.isatty() and not args.json
    while True:
        task = await client.get(task_id)
        if bar:
            progress = await kps.store.progress(task_id)
            done = sum(1 for s in progress.values() if s != "running")
            width = 30
            filled = width * done // max(total, 1)
            sys.stderr.write(f"\r{args.action} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{done}/{total} servers")
            sys.stderr.flush()
        if task.final:
            if bar:
                sys.stderr.write("\n")
            return task
        if loop.time() >= deadline:
            from engine.errors import TransientError

            raise TransientError(f"task {task_id} is still {task.status} after "
                                 f"{args.timeout} s", code="wait_timeout",
                                 fix=f"Look later with `dew tasks show {task_id}`.")
        await asyncio.sleep(0.2)


def _result_text(d: dict[str, Any]) -> str:
    lines = [f"{d['operation']} {d['keypair']} ({d['fingerprint']}), task {d['task_id']}"]
    for row in d.get("servers", []):
        if row["status"] == "succeeded":
            notes = ["changed" if row.get("changed") else "already in place"]
            if row.get("verified"):
                notes.append("login checked")
            if row.get("pw_login_state"):
                notes.append(f"password login {row['pw_login_state']}")
            lines.append(f"  {row['server']:24} ok      {', '.join(notes)}")
        else:
            lines.append(f"  {row['server']:24} FAILED  {row['error']} "
                         f"(dew failures show {row.get('failure_id', '?')})")
    lines.append(f"{d['succeeded']} succeeded, {d['failed']} failed")
    if d.get("status") == "failed":
        lines.append(f"task {d['task_id']} FAILED: every server failed "
                     f"(dew failures list --task-id {d['task_id']})")
    elif d.get("partially_failed"):
        lines.append(f"task {d['task_id']} PARTIALLY FAILED: {d['failed']} of "
                     f"{d['succeeded'] + d['failed']} servers failed "
                     f"(retry them: dew tasks retry {d['task_id']})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- servers


def _server_text(d: dict[str, Any]) -> str:
    return "\n".join(f"{k:16} {'-' if v is None else v}" for k, v in d.items())


def _server_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no servers"
    lines = [f"{'NAME':24} {'ADDRESS':30} {'USER':12} HOST KEY"]
    lines += [f"{r['name']:24} {r['host'] + ':' + str(r['port']):30} {r['user']:12} "
              f"{'pinned' if r['host_key_pinned'] else 'trust on first use'}" for r in rows]
    return "\n".join(lines)


async def _servers(args: argparse.Namespace, settings: Settings) -> int:
    from handlers.kps.service import check_name, open_kps

    if args.action != "list":
        check_name(args.name, "server")
    host_key = None
    if args.action == "add" and args.host_key:
        host_key = _read(args.host_key, "the host key").decode("utf-8", "replace")
    async with open_kps(settings) as kps:
        data: Any
        human: Callable[[Any], str] = _server_text
        if args.action == "add":
            data = (await kps.add_server(
                args.name, args.host, port=args.port, user=args.login, host_key=host_key,
                trust_first_use=args.trust_first_use, sshd_config=args.sshd_config,
                reload_command=args.reload_command, authorized_keys=args.authorized_keys,
                sudo=args.sudo, account=args.account)).to_json()
        elif args.action == "list":
            data = [s.to_json() for s in await kps.store.list_servers(args.account)]
            human = _server_table
        elif args.action == "show":
            server = await kps.server(args.name, args.account)
            data = {**server.to_json(),
                    "keypairs": await kps.store.keypairs_on(server.server_id)}
        else:
            await kps.remove_server(args.name, args.account)
            data, human = {"removed": args.name}, _lines
    print_result(data, args.json, human)
    return 0
