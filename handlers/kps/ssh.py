"""The SSH transport: a thin asyncssh adapter (ARCHITECTURE principle 6).

- **Pinned host keys.** A server's host key is given or taken on first use
  (then the caller pins it); every later connection trusts that key only. A
  different key raises :class:`HostKeyChanged` (a security error), never a
  silent accept. ``known_hosts`` is never None and ``~/.ssh`` of the engine's
  own user (keys, agent, config) is never read.
- **Atomic remote writes.** :meth:`Session.write_file` writes a temp file in the
  target's directory, fsyncs it, keeps the old file's owner and mode (or sets
  the mode asked for), and renames it over the target, so a killed job never
  leaves a half-written file. It is a compare-and-swap on the content the
  caller read: a concurrent change makes it raise :class:`RemoteChanged`.
- **Errors mapped in one place**: :func:`map_error` turns asyncssh and socket
  exceptions into the product's table (``Invalid server login credential.``,
  ``SSH connection failure. Check your port.``, ``Timeout: socket is not
  established. Check your security group rules.``).
- **Per-server serialization** within a process: :func:`server_lock`.
- **Privileged steps** (``sshd_config``, the reload, ``sshd -T``, a file the login
  user cannot replace) run through ``sudo -n`` when the server was added with
  ``--sudo`` (``Session.sudo``); paths are absolute by then (``$HOME`` differs
  under sudo). Symlinked files are edited in place of their target
  (``readlink -f``), and ``restorecon`` runs on SELinux systems.
- **What the server really does**: :func:`offered_methods` asks sshd which
  authentication methods it offers this user (``Match`` blocks applied), and
  :meth:`Session.effective_config` runs ``sshd -T -C ...``.

Decisions (what to write) are pure functions elsewhere; this module only
moves bytes.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import secrets
import shlex
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import asyncssh

from engine.errors import DewError, PermanentError, SecurityError, TransientError

CATEGORY = "SSH connection"
BAD_CREDENTIAL = "Invalid server login credential."
PORT_FAILURE = "SSH connection failure. Check your port."
TIMEOUT = "Timeout: socket is not established. Check your security group rules."
STATUS_ERROR = "Server status error."
CAS_EXIT = 75  # the remote file changed since it was read


class InvalidCredential(PermanentError):
    code = "ssh_invalid_credential"
    category = CATEGORY
    default_fix = "Log in with the password or private key and check it."


class ConnectionFailure(TransientError):
    code = "ssh_connection_failure"
    category = CATEGORY
    default_fix = "Check the listening port of sshd."


class ConnectTimeout(TransientError):
    code = "ssh_timeout"
    category = CATEGORY
    default_fix = "Open the port to the engine's address in the security group or firewall."


class HostKeyChanged(SecurityError):
    code = "ssh_host_key_changed"
    category = "security"
    default_fix = ("If the server was rebuilt on purpose, check its new host key out of band "
                   "and pin it again (`dew servers remove` and `add --host-key`); otherwise "
                   "treat the server as compromised.")


class ServerStatusError(PermanentError):
    code = "server_status_error"
    category = "server check"
    default_fix = "Check that the server is running and that its sshd works."


class PermissionProblem(PermanentError):
    """The login user lacks a permission a step needs (and no sudo was allowed)."""

    code = "server_permission_denied"
    category = "server check"
    default_fix = ("Add the server with --sudo (passwordless sudo for the login user), or "
                   "log in as root.")


class RemoteChanged(TransientError):
    code = "remote_file_changed"
    category = "server check"
    default_fix = "Retry: another change landed on the same file at the same time."


@dataclass(frozen=True)
class Target:
    """Where to connect: the server's address, login user and pinned host key."""

    name: str
    host: str
    port: int
    user: str
    host_key: str | None = None  # an OpenSSH public key line; None: trust on first use


@dataclass(frozen=True, repr=False)
class Credential:
    """A password or an OpenSSH/PEM private key (text). Never printed."""

    password: str | None = None
    private_key: str | None = None

    def __repr__(self) -> str:
        kind = "password" if self.password is not None else "private_key"
        return f"Credential({kind}=<hidden>)"


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0
    login: float = 15.0
    command: float = 30.0


def map_error(exc: BaseException, target: Target) -> DewError:
    """The one place asyncssh and socket exceptions become engine errors."""
    where = f"{target.user}@{target.host}:{target.port}"
    if isinstance(exc, DewError):
        return exc
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return HostKeyChanged(
            "The server's host key does not match the pinned key.",
            cause=f"{where} presented a host key other than the one pinned for "
            f"{target.name}: the server was rebuilt, or someone is in the middle",
            target=target.name)
    if isinstance(exc, asyncssh.PermissionDenied):
        return InvalidCredential(
            BAD_CREDENTIAL, target=target.name,
            cause=f"{where} refused the password or key: wrong credential, sshd config "
            "changed, or account locked")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionFailure(PORT_FAILURE, target=target.name,
                                 cause=f"nothing listens on {where}, or sshd is down")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ConnectTimeout(TIMEOUT, target=target.name,
                              cause=f"{where} did not answer in time: a firewall or security "
                              "group drops the port, or the host is down")
    if isinstance(exc, asyncssh.ConnectionLost) and "timeout" in str(exc).lower():
        return ConnectTimeout(TIMEOUT, target=target.name,
                              cause=f"{where} did not complete the SSH login in time")
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH,
                                                  errno.ETIMEDOUT):
        return ConnectTimeout(TIMEOUT, target=target.name,
                              cause=f"{where}: {exc.strerror or exc}")
    if isinstance(exc, (asyncssh.Error, OSError, EOFError)):
        reason = getattr(exc, "reason", "") or getattr(exc, "strerror", "") or str(exc)
        return ConnectionFailure(PORT_FAILURE, target=target.name,
                                 cause=f"{where}: {type(exc).__name__}: {str(reason)[:200]}")
    return ServerStatusError(STATUS_ERROR, target=target.name,
                             cause=f"{where}: {type(exc).__name__}")


class _Client(asyncssh.SSHClient):
    """Accepts an unknown host key only on first use (nothing pinned yet)."""

    def __init__(self, trust_first_use: bool) -> None:
        self._tofu = trust_first_use

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        return self._tofu


def quiet_asyncssh_log() -> None:
    """asyncssh logs every connection, auth step and channel at INFO: some 17 lines a
    server, each formatted, redacted and written by the worker: some 30 % of its CPU
    in a 50-server bind. The adapter's errors and the jobs' per-server results say
    what happened; asyncssh's own lines are kept when the engine logs at debug."""
    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    wanted = logging.NOTSET if debug else logging.WARNING
    log = logging.getLogger("asyncssh")
    if log.level != wanted:  # setLevel clears every logger's cache: only on a change
        log.setLevel(wanted)


def _options(target: Target, credential: Credential, timeouts: Timeouts,
             password_only: bool = False) -> dict[str, Any]:
    quiet_asyncssh_log()  # here: the engine's log level is set by then, whatever imports ssh
    pinned = [asyncssh.import_public_key(target.host_key)] if target.host_key else []
    options: dict[str, Any] = {
        "port": target.port, "username": target.user,
        # Non-empty tuple: trust exactly these keys (an empty one means ~/.ssh/known_hosts).
        "known_hosts": (pinned, [], []),
        "connect_timeout": timeouts.connect, "login_timeout": timeouts.login,
        "agent_path": None, "config": None, "client_keys": None, "password": None,
        "gss_auth": False, "host_based_auth": False, "ignore_encrypted": True,
        "keepalive_interval": 0,
    }
    if credential.private_key is not None:
        options["client_keys"] = [asyncssh.import_private_key(credential.private_key)]
        options["kbdint_auth"] = False
        options["password_auth"] = False
    else:
        options["password"] = credential.password
        if password_only:
            options["kbdint_auth"] = False
    return options


async def connect(target: Target, credential: Credential, timeouts: Timeouts,
                  password_only: bool = False) -> Session:
    """A logged-in session (DewError on any failure, mapped by :func:`map_error`)."""
    try:
        options = _options(target, credential, timeouts, password_only)
        conn, _ = await asyncssh.create_connection(
            lambda: _Client(target.host_key is None), target.host, **options)
    except (TimeoutError, asyncssh.Error, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, asyncssh.KeyImportError):
            raise InvalidCredential(BAD_CREDENTIAL, target=target.name,
                                    cause="the private key given cannot be read") from None
        raise map_error(exc, target) from None
    host_key = conn.get_server_host_key()
    seen = host_key.export_public_key().decode().split()[:2] if host_key else []
    return Session(target, conn, timeouts, " ".join(seen))


class _MethodProbe(_Client):
    """Logs in with nothing; records the password methods the server offers."""

    def __init__(self) -> None:
        super().__init__(False)
        self.offered: set[str] = set()

    def password_auth_requested(self) -> None:
        self.offered.add("password")
        return None

    def kbdint_auth_requested(self) -> None:
        self.offered.add("keyboard-interactive")
        return None


async def offered_methods(target: Target, timeouts: Timeouts, attempts: int = 3) -> set[str]:
    """The password methods (``password``, ``keyboard-interactive``) sshd offers the
    login user now, from an unauthenticated connection to the pinned host key (so
    ``Match`` blocks and the running config count, not what a file says)."""
    probe = _MethodProbe()
    options = _options(target, Credential(), timeouts)
    options.update(password_auth=True, kbdint_auth=True, password=None)
    for attempt in range(attempts):
        probe.offered.clear()
        try:
            conn, _ = await asyncssh.create_connection(lambda: probe, target.host, **options)
        except asyncssh.PermissionDenied:
            return set(probe.offered)
        except (TimeoutError, asyncssh.Error, OSError, EOFError) as exc:
            error = map_error(exc, target)
            if not isinstance(error, ConnectionFailure) or attempt == attempts - 1:
                raise error from None
            await asyncio.sleep(0.2 * (attempt + 1))
            continue
        conn.close()  # logged in with no credential at all: "none" authentication
        await conn.wait_closed()
        return {"none"}
    raise AssertionError("unreachable")


async def check_login(target: Target, credential: Credential, timeouts: Timeouts,
                      password_only: bool = False, attempts: int = 3) -> None:
    """A fresh login works (DewError if not). Refused connections are retried
    briefly: sshd re-executing itself after a reload does not listen for a moment."""
    for attempt in range(attempts):
        try:
            session = await connect(target, credential, timeouts, password_only)
        except ConnectionFailure:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
            continue
        await session.close()
        return


_LOCKS: dict[str, asyncio.Lock] = {}


def server_lock(key: str) -> asyncio.Lock:
    """The lock serializing operations on one server in this process."""
    lock = _LOCKS.get(key)
    if lock is None:
        lock = _LOCKS[key] = asyncio.Lock()
    return lock


def shell_path(path: str) -> str:
    """A shell word for ``path``: ``~/x`` and relative paths are under ``$HOME``."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    if not path.startswith("/"):
        return '"$HOME"/' + shlex.quote(path)
    return shlex.quote(path)


def content_hash(content: bytes | None) -> str:
    """What the remote CAS check compares: SHA-256 hex, or ``absent``."""
    return "absent" if content is None else hashlib.sha256(content).hexdigest()


@dataclass(frozen=True)
class RemoteFile:
    """One file as read: its real path (symlinks resolved), content or None when it
    does not exist, and whether the reader could read it and replace it."""

    path: str  # as configured (absolute)
    real: str  # readlink -f
    content: bytes | None
    readable: bool
    writable: bool  # its directory (or the nearest existing ancestor) is writable


@dataclass(frozen=True)
class Snapshot:
    """What the first read round trip brings back."""

    os_release: str
    home: str
    systemd: bool
    connection: str  # $SSH_CONNECTION: "client_ip client_port server_ip server_port"
    login: str  # the user the session runs as (id -un)
    files: tuple[RemoteFile, ...] = ()  # read in the same round trip (``snapshot(read=)``)


def absolute(path: str, home: str) -> str:
    """``path`` with ``~/`` and relative paths under the login user's home."""
    if path.startswith("~/"):
        return home.rstrip("/") + "/" + path[2:]
    if not path.startswith("/"):
        return home.rstrip("/") + "/" + path
    return path


def _read_script(words: list[str], mark: str) -> str:
    """Read the files named by the shell ``words`` (quoted paths, or ``shell_path``)."""
    parts = []
    for word in words:
        parts.append(
            f"f={word}; r=$(readlink -f -- \"$f\" 2>/dev/null) || r=$f; "
            '[ -n "$r" ] || r=$f; a=$(dirname -- "$r"); '
            'while [ ! -d "$a" ]; do a=$(dirname -- "$a"); done; w=0; [ -w "$a" ] && w=1; '
            'if [ ! -e "$r" ]; then printf \'%s 0 %s\\n\' "$w" "$r"; '
            'elif [ -r "$r" ]; then printf \'%s 1 %s\\n\' "$w" "$r"; cat -- "$r" || exit 3; '
            'else printf \'%s R %s\\n\' "$w" "$r"; fi; '
            f"printf '\\n%s\\n' {mark}")
    return "\n".join(parts)


def _parse_files(paths: list[str], out: bytes, mark: str) -> list[RemoteFile] | None:
    chunks = out.split(f"\n{mark}\n".encode())
    if len(chunks) != len(paths) + 1:
        return None
    files = []
    for path, chunk in zip(paths, chunks, strict=False):
        head, _, body = chunk.partition(b"\n")
        fields = head.decode(errors="surrogateescape").split(" ", 2)
        if len(fields) != 3 or fields[1] not in ("0", "1", "R"):
            return None
        writable, state, real = fields
        files.append(RemoteFile(path, real, body if state == "1" else None,
                                state != "R", writable == "1"))
    return files


@dataclass
class Session:
    target: Target
    conn: asyncssh.SSHClientConnection
    timeouts: Timeouts
    host_key: str  # "type base64" of the key the server presented
    sudo: bool = False  # privileged steps through `sudo -n`

    async def close(self) -> None:
        self.conn.close()
        await self.conn.wait_closed()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def run(self, command: str, stdin: bytes | None = None, *,
                  privileged: bool = False) -> tuple[int, bytes, bytes]:
        """(exit status, stdout, stderr) of a remote command (``privileged``: through
        ``sudo -n`` when the server allows it; as the login user otherwise)."""
        if privileged and self.sudo:
            command = f"sudo -n -- sh -c {shlex.quote(command)}"
        try:
            # asyncssh sends no EOF for an empty ``input``: such commands must not read stdin.
            done = await self.conn.run(command, input=stdin or None, encoding=None,
                                       check=False, timeout=self.timeouts.command)
        except TimeoutError:
            raise ServerStatusError(STATUS_ERROR, target=self.target.name,
                                    cause=f"a command on {self.target.name} did not finish in "
                                    f"{self.timeouts.command} s") from None
        except (asyncssh.Error, OSError) as exc:
            raise map_error(exc, self.target) from None
        out = done.stdout if isinstance(done.stdout, bytes) else b""
        err = done.stderr if isinstance(done.stderr, bytes) else b""
        status = int(done.exit_status if done.exit_status is not None else 255)
        if privileged and self.sudo and status != 0 and err.startswith(b"sudo:"):
            raise PermissionProblem(
                STATUS_ERROR, target=self.target.name,
                cause=f"sudo -n refused on {self.target.name} for user {self.target.user}: "
                f"{err.decode(errors='replace').strip()[:200]}",
                fix="Allow the login user passwordless sudo (NOPASSWD) on the server.")
        return status, out, err

    async def snapshot(self, read: Sequence[str] = ()) -> Snapshot:
        """``/etc/os-release``, ``$HOME``, systemd or not, ``$SSH_CONNECTION``, login;
        and the files ``read`` (as the login user; ``~/`` and relative paths under its
        home), as :meth:`read_files` reads them, in the same round trip: every command
        run on the server is a channel and a shell there, the cost a fan-out pays most."""
        mark, files_mark = secrets.token_hex(12), secrets.token_hex(12)
        sep = f"printf '\\n%s\\n' {mark}"
        parts = ["cat /etc/os-release 2>/dev/null", sep, "printf %s \"$HOME\"", sep,
                 "[ -d /run/systemd/system ] && printf yes", sep,
                 "printf %s \"$SSH_CONNECTION\"", sep, "id -un", sep]
        script = "; ".join(parts)
        if read:
            script += "\n" + _read_script([shell_path(p) for p in read], files_mark)
        status, out, err = await self.run(script)
        # The state's five sections first: a file's bytes never split them.
        chunks = out.split(f"\n{mark}\n".encode(), 5)
        ok = len(chunks) == 6 and (status == 0 if read else status in (0, 1))
        text = [c.decode(errors="replace") for c in chunks] if ok else []
        files = (_parse_files([absolute(p, text[1]) for p in read], chunks[5], files_mark)
                 if ok and read else [])
        if not ok or files is None:
            raise ServerStatusError(STATUS_ERROR, target=self.target.name,
                                    cause=f"reading the server's state"
                                    f"{' and ' + ', '.join(read) if read else ''} failed "
                                    f"(exit {status}): {err.decode(errors='replace')[:200]}")
        return Snapshot(text[0], text[1], text[2] == "yes", text[3].strip(),
                        text[4].strip() or self.target.user, tuple(files))

    async def read_files(self, paths: list[str], *, privileged: bool = False
                         ) -> list[RemoteFile]:
        """Absolute ``paths`` as they are now (symlinks resolved; see :class:`RemoteFile`)."""
        if not paths:
            return []
        mark = secrets.token_hex(12)
        status, out, err = await self.run(_read_script([shlex.quote(p) for p in paths], mark),
                                          privileged=privileged)
        files = _parse_files(paths, out, mark) if status == 0 else None
        if files is None:
            raise ServerStatusError(STATUS_ERROR, target=self.target.name,
                                    cause=f"reading {', '.join(paths)} failed (exit {status}): "
                                    f"{err.decode(errors='replace')[:200]}")
        return files

    async def write_file(self, path: str, content: bytes | None, expected: bytes | None, *,
                         mode: str | None = None, private_under: str | None = None,
                         privileged: bool = False) -> None:
        """Atomically replace ``path`` with ``content`` (None: remove it) if it still
        holds ``expected``.

        ``path`` is absolute; a symlink is followed (``readlink -f``) and its target
        edited, the link kept. Temp file in the same directory, fsync, owner and
        mode of the old file kept (a new file takes the directory's owner; ``mode``
        forces one), rename, fsync of the directory, ``restorecon`` when SELinux is
        on. A directory under ``private_under`` (the login user's home) is made 700.
        """
        script = [
            "set -e", "umask 077", f"f={shlex.quote(path)}",
            'r=$(readlink -f -- "$f" 2>/dev/null) && [ -n "$r" ] && f=$r',
            'd=$(dirname -- "$f")', 'new_dir=0',
            '[ -d "$d" ] || { mkdir -p -- "$d"; new_dir=1; }',
        ]
        if private_under is not None:
            home = shlex.quote(private_under.rstrip("/") + "/")
            script.append(f'case "$d/" in {home}?*) chmod 700 -- "$d";; esac')
        script += [
            'if [ -e "$f" ]; then cur=$(sha256sum < "$f" | cut -c1-64); else cur=absent; fi',
            f'[ "$cur" = {content_hash(expected)} ] || exit {CAS_EXIT}',
            'selinux() { command -v selinuxenabled >/dev/null 2>&1 && selinuxenabled && '
            'command -v restorecon >/dev/null 2>&1; }',
        ]
        if content is None:
            script += ['rm -f -- "$f"', 'sync -- "$d" 2>/dev/null || true']
        else:
            script += [
                't=$(mktemp -- "$d/.dew.XXXXXXXX")', "trap 'rm -f -- \"$t\"' EXIT",
                'cat > "$t"' if content else ': > "$t"',
                'if [ -e "$f" ]; then ref=$f; else ref=$d; fi',
                'chown --reference="$ref" -- "$t" 2>/dev/null || true',
                '[ "$ref" = "$d" ] || chmod --reference="$f" -- "$t"',
            ]
            if mode is not None:
                script.append(f'chmod {mode} -- "$t"')
            script += [
                'sync -- "$t" 2>/dev/null || sync', 'mv -f -- "$t" "$f"', "trap - EXIT",
                'sync -- "$d" 2>/dev/null || true',
                'if selinux; then restorecon -F -- "$f" 2>/dev/null || true; '
                '[ "$new_dir" = 0 ] || restorecon -F -- "$d" 2>/dev/null || true; fi',
            ]
        status, _, err = await self.run("\n".join(script), stdin=content or None,
                                        privileged=privileged)
        if status == CAS_EXIT:
            raise RemoteChanged(f"{path} changed on {self.target.name} while we edited it",
                                target=self.target.name)
        if status != 0:
            raise ServerStatusError(STATUS_ERROR, target=self.target.name,
                                    cause=f"writing {path} failed (exit {status}): "
                                    f"{err.decode(errors='replace')[:200]}")

    async def effective_config(self, config: str, spec: str) -> tuple[int, str, str]:
        """``sshd -T -f CONFIG -C SPEC``: (exit status, output, error text)."""
        command = (f"s=$(command -v sshd || echo /usr/sbin/sshd); "
                   f'"$s" -T -f {shlex.quote(config)} -C {shlex.quote(spec)}')
        status, out, err = await self.run(command, privileged=True)
        return status, out.decode(errors="replace"), err.decode(errors="replace").strip()


@asynccontextmanager
async def session(target: Target, credential: Credential, timeouts: Timeouts
                  ) -> AsyncIterator[Session]:
    s = await connect(target, credential, timeouts)
    try:
        yield s
    finally:
        await s.close()
