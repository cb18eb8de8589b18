"""``dew hsm serve``: export this node's HSM token to other nodes with p11-kit.

Runs ``p11-kit server -f --provider MODULE -n SOCKET "pkcs11:token=LABEL"``
(Debian ``p11-kit``) in the foreground with this state directory's
``SOFTHSM2_CONF``, after making sure the token exists (``dew init``'s token).
Nodes load ``p11-kit-client.so`` (Debian ``p11-kit-modules``) as their
``[hsm] module`` with ``[hsm] server_address = "unix:path=SOCKET"``; the
command prints exactly those settings. The socket is reachable by this user
only (p11-kit binds it with umask 066; we make it 0600 in a 0700 directory),
unless ``--user`` and ``--group`` name who may connect instead.

SIGINT / SIGTERM stop the server *and* the ``p11-kit-remote`` process it forked
for each connection (they share a process group): stopping the export stops
it for every node at once, which then fail retryably until it is back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError, InvalidInput, PermanentError

if TYPE_CHECKING:
    from engine.settings import Settings

HELP = "share this node's HSM token with other nodes (p11-kit server)"
P11KIT_PACKAGE = "p11-kit"
SOCKET_NAME = "hsm.sock"
# A sockaddr_un path holds 107 bytes and a NUL.
MAX_SOCKET_PATH = 107
START_TIMEOUT = 10.0
TOKEN_CHECK_TIMEOUT = 5.0
TOKEN_CHECK_PAUSE = 0.2


def register(subparsers: Any, commands: dict[str, Any]) -> None:
    hsm = subparsers.add_parser("hsm", help=HELP, description=HELP)
    sub = hsm.add_subparsers(dest="action", metavar="ACTION", required=True,
                             parser_class=type(hsm))
    p = sub.add_parser("serve", help="export the token on a unix socket for other nodes "
                       "(stays in the foreground; Ctrl-C stops it)")
    p.add_argument("--socket", metavar="PATH",
                   help=f"the socket to create (default: STATE_DIR/run/{SOCKET_NAME})")
    p.add_argument("--provider", metavar="MODULE",
                   help="the PKCS#11 module to export (default: hsm.module, or SoftHSM2 "
                   "when that is p11-kit's client)")
    p.add_argument("--user", metavar="USER", help="with --group: only this user may connect "
                   "(the socket is given to USER:GROUP; put it where they can reach it)")
    p.add_argument("--group", metavar="GROUP", help="with --user: the socket's group")
    p.add_argument("--json", action="store_true",
                   help="print the settings as JSON (errors too: one JSON line on stderr)")
    commands["hsm"] = cmd_hsm


def cmd_hsm(args: argparse.Namespace, settings: Settings) -> int:
    return serve(settings, socket_path=args.socket, provider=args.provider, user=args.user,
                 group=args.group, as_json=args.json)


def p11kit_binary() -> str:
    found = shutil.which("p11-kit")
    if found is None:
        raise PermanentError(
            f"p11-kit is not installed (Debian package {P11KIT_PACKAGE}): "
            f"run `apt-get install {P11KIT_PACKAGE}`",
            fix=f"apt-get install {P11KIT_PACKAGE}",
            code="p11kit_missing",
            category="config",
        )
    return found


def provider_module(settings: Settings, provider: str | None) -> str:
    from engine.crypto.config import SOFTHSM_MODULE, is_p11kit_client

    if provider:
        return provider
    module = settings.hsm.module
    return SOFTHSM_MODULE if is_p11kit_client(module) else module


def socket_file(settings: Settings, given: str | None) -> Path:
    from engine.private import private_dir

    if given:
        path = Path(given).absolute()
        if not path.parent.is_dir():
            raise InvalidInput(f"--socket: the directory {path.parent} does not exist")
    else:
        path = private_dir(settings.run_dir).absolute() / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise InvalidInput(f"--socket: {path} is longer than a unix socket path may be "
                           f"({MAX_SOCKET_PATH} bytes); choose a shorter path")
    if path.exists() and not path.is_socket():
        raise InvalidInput(f"--socket: {path} exists and is not a socket")
    return path


def node_settings(settings: Settings, address: str, pin_file: Path | None) -> dict[str, Any]:
    """What a node sets to use the served token."""
    from engine.crypto._remote import CLIENT_GLOB, client_module_path

    return {
        "module": client_module_path() or CLIENT_GLOB,
        "server_address": address,
        "token_label": settings.hsm.token_label,
        "pin_file": f"a 0600 copy of {pin_file}" if pin_file else "(DEW_HSM_PIN)",
    }


def serve(settings: Settings, *, socket_path: str | None = None, provider: str | None = None,
          user: str | None = None, group: str | None = None, as_json: bool = False) -> int:
    """Ensure the token, run ``p11-kit server`` until SIGINT/SIGTERM; 0 when stopped."""
    from engine.crypto import ensure_token, hsm_config_from_settings
    from engine.token_keys import make_token_keys

    if bool(user) != bool(group):
        raise InvalidInput("--user and --group go together (p11-kit gives the socket to "
                           "USER:GROUP only when both are named)")
    binary = p11kit_binary()
    module = provider_module(settings, provider)
    if not Path(module).exists():
        raise ConfigError(f"the PKCS#11 module to export, {module}, does not exist",
                          fix="Install SoftHSM2 (`apt-get install softhsm2`) or pass "
                          "--provider with your HSM's module.")
    own = settings.replace(hsm={"module": module, "server_address": ""})
    created = ensure_token(own)
    # Alone, before any node connects: nodes starting together never make these.
    asyncio.run(make_token_keys(own))
    config = hsm_config_from_settings(own)
    path = socket_file(settings, socket_path)
    address = f"unix:path={path}"
    env = dict(os.environ)
    env.pop("P11_KIT_SERVER_ADDRESS", None)
    if config.softhsm_conf is not None:
        env["SOFTHSM2_CONF"] = str(config.softhsm_conf)
    command = [binary, "server", "-f", "--provider", module, "-n", str(path)]
    if user and group:
        command += ["-u", user, "-g", group]
    command.append(f"pkcs11:token={settings.hsm.token_label}")
    path.unlink(missing_ok=True)  # a socket left by a server that was killed
    # Its own process group: the per-connection p11-kit-remote children are stopped
    # with it (p11-kit server leaves them running when it exits).
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _wait_started(proc, path, stop)
        if not user:
            path.chmod(0o600)
        _check_serving(settings, module, address)
        info = {"serving": settings.hsm.token_label, "token_created": created,
                "socket": str(path), "pid": proc.pid, "provider": module,
                "environment": {"P11_KIT_SERVER_ADDRESS": address},
                "node_settings": {"hsm": node_settings(settings, address, config.pin_file)}}
        _announce(info, as_json)
        while not stop.is_set() and proc.poll() is None:
            stop.wait(0.5)
        if proc.poll() is not None and not stop.is_set():
            raise _server_failed(proc, "stopped")
        return 0
    finally:
        _stop(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_started(proc: subprocess.Popen[bytes], path: Path, stop: threading.Event) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.is_socket():
        if proc.poll() is not None:
            raise _server_failed(proc, "did not start")
        if stop.is_set() or time.monotonic() > deadline:
            raise _server_failed(proc, f"did not create {path} within {START_TIMEOUT:.0f} s")
        time.sleep(0.02)


def _check_serving(settings: Settings, module: str, address: str) -> None:
    """Connect through the client module, as a node would, when it is installed here.

    Each try is a new connection. A SoftHSM token rewrites its token file at every
    login, and a module initialised meanwhile in another process (here, the server's
    p11-kit-remote) does not list that token (measured): nodes logging in again
    while the export restarts make that happen, so a missing token is looked for
    again for a few seconds before it is an error."""
    from engine.crypto import _remote

    client = _remote.client_module_path()
    if client is None:
        return
    deadline = time.monotonic() + TOKEN_CHECK_TIMEOUT
    while True:
        lib = _remote.open_lib(client, address)
        try:
            token = _remote.find_in(lib, settings.hsm.token_label, None)
        finally:
            _remote._finalize(lib)
        if token is not None:
            return
        if time.monotonic() > deadline:
            raise ConfigError(f"p11-kit server runs but serves no token labelled "
                              f"{settings.hsm.token_label!r} from {module}",
                              fix="Check hsm.token_label and --provider.")
        time.sleep(TOKEN_CHECK_PAUSE)


def _server_failed(proc: subprocess.Popen[bytes], what: str) -> PermanentError:
    _stop(proc)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    last = next((line.strip() for line in reversed(err.splitlines()) if line.strip()), "")
    return PermanentError(f"p11-kit server {what}" + (f": {last}" if last else ""),
                          fix="Check the socket path, --user/--group and the module.",
                          code="hsm_serve_failed", category="config")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None or _group_alive(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _announce(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info), flush=True)
        return
    hsm = info["node_settings"]["hsm"]
    print(f"serving HSM token {info['serving']!r} on {hsm['server_address']} "
          f"(p11-kit server, pid {info['pid']}); Ctrl-C stops it\n"
          "on each node that uses it, in [hsm] (or DEW_HSM_* variables):\n"
          f"  module = \"{hsm['module']}\"\n"
          f"  server_address = \"{hsm['server_address']}\"\n"
          f"  token_label = \"{hsm['token_label']}\"\n"
          f"  pin_file = {hsm['pin_file']} (or DEW_HSM_PIN)\n"
          "other programs using p11-kit-client.so: "
          f"P11_KIT_SERVER_ADDRESS={hsm['server_address']}", flush=True)
    sys.stdout.flush()
