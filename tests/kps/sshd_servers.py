"""Real OpenSSH ``sshd`` processes on loopback, sharing one local test user.

Used by the KPS test fixtures (tests/kps/conftest.py) and by
bench/fanout.py. Each sshd runs *as the test user* on its own loopback port,
with its own host key, config (``StrictModes yes``, PAM password login) and
``AuthorizedKeysFile .ssh/authorized_keys_<port>``, so many instances share one
user. Running sshd as that user lets a job edit the instance's sshd_config and
reload it with ``kill -HUP <pid>`` as the login user, as root would on a real
server. PAM checks the password through ``unix_chkpwd``.

**Ports.** A port found free (bind to port 0, close) is only a guess: until
sshd binds it, anything else may take it: another instance drawn the same
port (``bind(0)`` hands out the same port again ~1.4 % of the time in 20
draws), another test session's sshd, redis or postgres. The loser's sshd
exits ("Cannot bind any address") while the winner answers on the port, so a
"listening" check by banner alone passes and every connection then meets
*another* server's host key. So: the ports of one pool are drawn while all of
them are held (distinct), and an instance counts as started only when *its
own* log says it listens on its port and it is still running; else it is
started again on another port.
"""

from __future__ import annotations

import os
import pwd
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


class PortLost(RuntimeError):
    """The sshd could not bind its port (something else holds it)."""


@dataclass
class TestUser:
    __test__ = False  # not a pytest test class

    name: str
    password: str
    uid: int
    gid: int
    home: Path


def create_user(prefix: str = "dewkps") -> TestUser:
    """A new local user with a random password and ``~/.ssh`` (700). Needs root."""
    name = prefix + secrets.token_hex(3)
    password = "Pw-" + secrets.token_urlsafe(12)
    _account_tool(["useradd", "-m", "-s", "/bin/sh", name])
    try:
        _account_tool(["chpasswd"], f"{name}:{password}\n")
        entry = pwd.getpwnam(name)
        home = Path(entry.pw_dir)
        (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
        os.chown(home / ".ssh", entry.pw_uid, entry.pw_gid)
        Path("/run/sshd").mkdir(exist_ok=True)
    except BaseException:
        delete_user(name)
        raise
    return TestUser(name, password, entry.pw_uid, entry.pw_gid, home)


def delete_user(name: str, keep: bool = False) -> None:
    """Kill every process of the user (its sshd and sessions), then remove it."""
    subprocess.run(["pkill", "-KILL", "-u", name], check=False)  # only this user's
    if not keep:
        _account_tool(["userdel", "-r", "-f", name], check=False)


def _account_tool(cmd: list[str], stdin: str | None = None, check: bool = True) -> None:
    """useradd / chpasswd / userdel, tried again while another process (a second test
    process, pytest-xdist) holds the lock on /etc/passwd or /etc/shadow."""
    for _ in range(50):
        done = subprocess.run(cmd, input=stdin, text=True, capture_output=True)
        if done.returncode == 0 or "lock" not in done.stderr.lower():
            break
        time.sleep(0.1)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago (all held while
    drawing, so one draw never repeats another)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


@dataclass
class Sshd:
    """One sshd instance on 127.0.0.1:port, running as the test user."""

    user: TestUser
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def host_key_pub(self) -> Path:
        return self.dir / "host_key.pub"

    @property
    def authorized_keys(self) -> Path:
        return self.user.home / ".ssh" / f"authorized_keys_{self.port}"

    @property
    def authorized_keys_setting(self) -> str:
        return f".ssh/authorized_keys_{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def reload_command(self) -> str:
        return f"kill -HUP {self.pid}"

    @property
    def log_path(self) -> Path:
        return self.dir / "log"

    def base_config(self) -> str:
        return (
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir}/host_key\n"
            f"PidFile {self.dir}/sshd.pid\nAuthorizedKeysFile {self.authorized_keys_setting}\n"
            "StrictModes yes\nUsePAM yes\nPasswordAuthentication yes\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin no\nLogLevel VERBOSE\n"
            "MaxStartups 100:30:200\n"
        )

    def setup(self) -> None:
        """The directory and the host key (once: the key is the instance's identity)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "host_key").exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(self.dir / "host_key")], check=True)
        self.config.write_text(self.base_config())
        _chown_tree(self.dir, self.user)

    def start(self) -> None:
        self.config.write_text(self.base_config())
        os.chown(self.config, self.user.uid, self.user.gid)
        # What sshd says before its -E log is open (a fatal start-up error) goes to
        # stderr: kept beside the log, so that a failed start can name its cause.
        with (self.dir / "stderr").open("ab") as stderr:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-f", str(self.config), "-E", str(self.log_path)],
                user=self.user.uid, group=self.user.gid, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr)

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def wait_listening(self, since: int = 0, timeout: float = 10) -> None:
        """Wait until *this* sshd listens on its port: its own log (after byte
        ``since``) says so and it still runs. Raises :class:`PortLost` when it
        exited because the port was taken, RuntimeError on other failures.

        A banner on the port proves nothing: when two instances draw one port,
        the second exits and the first answers for both."""
        mark = f"Server listening on 127.0.0.1 port {self.port}.".encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            exited = self.proc.poll() is not None
            text = self._log_bytes(since)
            if exited:
                said = text + self.log().encode()  # stderr too: sshd may fail before -E
                if b"Address already in use" in said or b"Cannot bind any address" in said:
                    raise PortLost(f"port {self.port} is taken")
                raise RuntimeError(f"sshd on {self.port} exited: {self.log()[-1000:]}")
            if mark in text:
                return
            time.sleep(0.02)
        raise RuntimeError(f"sshd on {self.port} did not start: {self.log()[-1000:]}")

    def _log_bytes(self, since: int) -> bytes:
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                return f.read()
        except FileNotFoundError:  # not written yet
            return b""

    def start_verified(self, attempts: int = 5) -> None:
        """Start, and move to another port while the drawn one turns out taken."""
        for attempt in range(attempts):
            if attempt:
                self.port = free_ports(1)[0]
            since = self.log_size()
            self.start()
            try:
                self.wait_listening(since)
                return
            except PortLost:
                self.stop()
        raise RuntimeError(f"sshd in {self.dir}: no free port after {attempts} attempts")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        """sshd's log, after what it wrote to stderr (if anything)."""
        parts = [path.read_text(errors="replace") for path in (self.dir / "stderr", self.log_path)
                 if path.exists()]
        return "".join(parts)

    def reset(self) -> None:
        """Forget what earlier tests did: no key file, the original config (reloaded).
        An instance that died (its port taken while it re-executed on a reload) is
        started again, on another port if need be."""
        self.authorized_keys.unlink(missing_ok=True)
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            self.start_verified()
        elif self.config.read_text() != self.base_config():
            self.config.write_text(self.base_config())
            since = self.log_size()
            os.kill(self.pid, signal.SIGHUP)
            try:
                self.wait_listening(since)
            except PortLost:
                self.stop()
                self.start_verified()


@dataclass
class RootSshd(Sshd):
    """An sshd run by root, as on a real server: its config root-owned 0644 in a
    root-owned directory, so the login user can neither replace the config nor
    signal sshd (the privileged steps need sudo)."""

    def setup(self) -> None:
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        if not (self.dir / "host_key").exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(self.dir / "host_key")], check=True)
        (self.dir / "host_key.pub").chmod(0o644)
        self.config.write_text(self.base_config())
        self.config.chmod(0o644)

    def start(self) -> None:
        self.config.write_text(self.base_config())
        self.config.chmod(0o644)
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-f", str(self.config), "-E", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_pool(user: TestUser, count: int, base: Path) -> list[Sshd]:
    """``count`` sshd instances under ``base``, each proven to own its port.
    On failure the ones started are stopped before the error is raised."""
    pool = [Sshd(user, 0, base / f"i{i}") for i in range(count)]
    try:
        for s in pool:
            s.setup()  # host keys first: the slow part, before any port is drawn
        for s, port in zip(pool, free_ports(count), strict=True):
            s.port = port
            s.start()
        for s in pool:
            try:
                s.wait_listening()
            except PortLost:
                s.stop()
                s.start_verified()
    except BaseException:
        stop_pool(pool)
        raise
    ports = [s.port for s in pool]
    assert len(set(ports)) == len(ports), ports
    return pool


def stop_pool(pool: list[Sshd]) -> None:
    for s in pool:
        s.stop()


def _chown_tree(path: Path, user: TestUser) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, user.uid, user.gid)
