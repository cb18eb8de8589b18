"""A token reached over the network through p11-kit's client module.

``p11-kit server`` (``dew hsm serve``) exports a token on a unix socket and
``p11-kit-client.so``, loaded as the ``[hsm] module`` with
``P11_KIT_SERVER_ADDRESS=unix:path=SOCKET`` (or ``[hsm] server_address``),
forwards every PKCS#11 call to it. What is different from a local module,
measured with Debian's p11-kit 0.24.1:

* Every ``C_GetFunctionList`` of the client returns a new virtual module with
  its own socket, which it connects in ``C_Initialize``. So the ctypes
  pre-initialisation of :mod:`engine.crypto._cinit` would initialise a list
  python-pkcs11 never uses (its attach then fails with
  CKR_CRYPTOKI_NOT_INITIALIZED): here python-pkcs11 initialises its own list.
  Its ``C_Initialize(NULL)`` is fine: the RPC client serialises its socket with
  its own mutexes whatever the arguments say, and ``p11-kit server`` initialises
  the real module with CKF_OS_LOCKING_OK; so each pool thread keeps its own
  session, as with a local SoftHSM.
* The server address is read in ``C_GetFunctionList``, from the environment
  only: it is set for the duration of that call.
* ``C_Initialize`` without a server answering succeeds; the module then shows
  no slot and ``C_GetInfo`` says "p11-kit (no connection)".
* When the server (and the ``p11-kit-remote`` it forked for this connection)
  goes away, every call answers CKR_DEVICE_ERROR, and keeps doing so after the
  server is back: the client never reconnects by itself. A new function list
  connects afresh. Reusing the old one (C_Finalize + C_Initialize) would hand
  out session handles that old python-pkcs11 Session objects still carry, so a
  stale session could act on a new one: we never do that.

:class:`RemoteToken` therefore stands in for python-pkcs11's Token in the
session pool. Its ``open`` gives a session on the current connection; when
that connection is lost it makes a new one (a new function list, login again
with the PIN, at most one attempt a second while the socket does not answer),
and finalises the old list, so that sessions still pointing at it fail at once
with CKR_CRYPTOKI_NOT_INITIALIZED instead of reaching the new connection.

p11-kit 0.24 forwards only mechanisms whose parameters its RPC can encode:
CKM_AES_GCM is not among them, CKM_AES_ECB is. Tokens reached that way are
recorded here, and :mod:`engine.crypto.gcm_ecb` runs GCM (and AES key wrap
with padding, also not carried) around the token's AES block function for them
(same bytes as the token's own mechanisms); RSA-PSS over a message, whose
hashing mechanisms do not cross either, is hashed here and signed as a digest.

Like :mod:`engine.crypto._pkcs11`, this module calls python-pkcs11 directly;
its PKCS#11 exceptions are translated by the callers in ``_pkcs11``.
"""

from __future__ import annotations

import glob
import hmac
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pkcs11.exceptions as p11e
from pkcs11 import Mechanism, TokenFlag
from pkcs11 import _pkcs11 as _native

from engine.crypto import _cinit
from engine.crypto.errors import HsmUnreachable
from engine.errors import ConfigError

CLIENT_NAME = "p11-kit-client"
CLIENT_GLOB = "/usr/lib/*/pkcs11/p11-kit-client.so"
ADDRESS_VARIABLE = "P11_KIT_SERVER_ADDRESS"
NO_CONNECTION = "p11-kit (no connection)"
UNIX_PREFIX = "unix:path="
# A socket that answers but whose server does not serve the token is tried again at
# most this often (each try is a new function list, which p11-kit keeps until exit);
# a socket that does not answer is probed at every call (a failed connect() is cheap).
RECONNECT_INTERVAL = 1.0
SERVE_FIX = ("Check that `dew hsm serve` (p11-kit server) runs on the HSM node and that "
             "hsm.server_address (or P11_KIT_SERVER_ADDRESS) names its socket.")


def is_client(module_path: str) -> bool:
    """p11-kit's client module (``p11-kit-client.so``, or the ``p11-kit-client`` shorthand)."""
    return Path(module_path).name.startswith(CLIENT_NAME)


def client_module_path() -> str | None:
    """Where Debian's p11-kit-modules installed the client module, if it did."""
    found = sorted(glob.glob(CLIENT_GLOB))
    return found[0] if found else None


def resolve_client(module_path: str) -> str:
    """``p11-kit-client`` (a name, not a path) becomes the installed module's path."""
    if "/" in module_path:
        return module_path
    found = client_module_path()
    if found is None:
        raise ConfigError(
            "p11-kit's client module (p11-kit-client.so) is not installed",
            fix="Install it: `apt-get install p11-kit-modules`, or set hsm.module to its path.",
            code="hsm_module_missing",
        )
    return found


def check_address(address: str) -> str:
    """A p11-kit server address this engine connects to: a unix socket only."""
    if not address.startswith(UNIX_PREFIX) or len(address) == len(UNIX_PREFIX):
        raise ConfigError(
            f"hsm.server_address must be unix:path=SOCKET, got {address[:80]!r}",
            fix="Reach a remote HSM node's socket through a local one (e.g. forwarded "
            "with `ssh -L /run/dew/hsm.sock:/srv/dew/hsm.sock`).",
        )
    return address


def address_of(configured: str | None) -> str:
    """The address the client will use: the setting, else P11_KIT_SERVER_ADDRESS, else
    p11-kit's own default."""
    return (configured or os.environ.get(ADDRESS_VARIABLE)
            or "p11-kit's default ($XDG_RUNTIME_DIR/p11-kit/pkcs11)")


def socket_path(address: str) -> str | None:
    if not address.startswith(UNIX_PREFIX):
        return None
    return unquote(address[len(UNIX_PREFIX):])


def unreachable(address: str, what: str = "does not answer") -> HsmUnreachable:
    return HsmUnreachable(
        f"the HSM is unreachable: the p11-kit socket {address} {what}",
        fix=SERVE_FIX,
    )


def socket_answers(address: str, timeout: float = 1.0) -> bool:
    """Whether the unix socket accepts a connection (other kinds: assumed to)."""
    path = socket_path(address)
    if path is None:
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


_ENV_LOCK = threading.Lock()
# The addresses this process has connected to, named in errors of a lost connection.
_ADDRESSES: set[str] = set()


def known_addresses() -> str:
    return ", ".join(sorted(_ADDRESSES))
# The client library stays loaded for the process: python-pkcs11 dlcloses it
# with a lib object, and session objects of a lost connection still point into it.
_HANDLES: dict[str, _cinit.RawModule] = {}


def open_lib(module_path: str, server_address: str | None) -> Any:
    """A new connection: a fresh function list of the client module, initialised by
    python-pkcs11. HsmUnreachable when no server answers at the address."""
    with _ENV_LOCK:
        if module_path not in _HANDLES:
            _HANDLES[module_path] = _cinit.load(module_path)  # clear error if missing
        previous = os.environ.get(ADDRESS_VARIABLE)
        if server_address:
            os.environ[ADDRESS_VARIABLE] = server_address
        try:
            lib = _native.lib(module_path)
        finally:
            if server_address:
                if previous is None:
                    os.environ.pop(ADDRESS_VARIABLE, None)
                else:
                    os.environ[ADDRESS_VARIABLE] = previous
    _ADDRESSES.add(address_of(server_address))
    if lib.library_description.strip() == NO_CONNECTION:
        _finalize(lib)
        raise unreachable(address_of(server_address))
    return lib


def _finalize(lib: Any) -> None:
    with suppress(p11e.PKCS11Error):
        lib.finalize()


def connection_lost(exc: p11e.PKCS11Error) -> bool:
    """Errors of the client whose socket is gone (measured: CKR_DEVICE_ERROR after the
    server died; CKR_CRYPTOKI_NOT_INITIALIZED on a finalised list; without a
    server behind it, CKR_DEVICE_REMOVED, or CKR_SLOT_ID_INVALID from C_OpenSession)."""
    if isinstance(exc, p11e.DeviceError | p11e.DeviceRemoved | p11e.TokenNotPresent
                  | p11e.SlotIDInvalid | p11e.SessionHandleInvalid):
        return True
    return not_initialised(exc)


def not_initialised(exc: p11e.PKCS11Error) -> bool:
    # python-pkcs11 has no class for CKR_CRYPTOKI_NOT_INITIALIZED: a bare PKCS11Error.
    return type(exc) is p11e.PKCS11Error and "not initialized" in str(exc)


_HOOKED = False


def quiet_lost_operations() -> None:
    """python-pkcs11 ends an operation whose ``C_*Init`` failed in the object's
    ``__del__``; on a lost connection that ``C_*Final`` fails too, and Python would
    print its traceback ("Exception ignored in ...") to the terminal or worker log.
    Those, and only those, are dropped: the error itself was already raised."""
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if (isinstance(exc, p11e.PKCS11Error) and connection_lost(exc)
                and "pkcs11._pkcs11" in repr(unraisable.object)):
            return
        previous(unraisable)

    sys.unraisablehook = hook


# --------------------------------------------------------------------------- GCM via ECB

# Tokens (python-pkcs11 Token objects, by id; kept alive here so ids stay unique)
# reached through a module that does not carry CKM_AES_GCM but does carry CKM_AES_ECB,
# and those that carry CKM_RSA_PKCS_PSS but not CKM_SHA256_RSA_PKCS_PSS (p11-kit 0.24
# both: RSA-PSS over a message is then hashed here and signed as a digest).
_ECB_GCM: dict[int, Any] = {}
_DIGEST_PSS: dict[int, Any] = {}
_ECB_KWP: dict[int, Any] = {}


def note_mechanisms(token: Any) -> None:
    mechanisms = {int(m) for m in token.slot.get_mechanisms()}
    if int(Mechanism.AES_GCM) not in mechanisms and int(Mechanism.AES_ECB) in mechanisms:
        _ECB_GCM[id(token)] = token
    if (int(Mechanism.SHA256_RSA_PKCS_PSS) not in mechanisms
            and int(Mechanism.RSA_PKCS_PSS) in mechanisms):
        _DIGEST_PSS[id(token)] = token
    if (int(Mechanism.AES_KEY_WRAP_PAD) not in mechanisms
            and int(Mechanism.AES_ECB) in mechanisms):
        _ECB_KWP[id(token)] = token


def forget_token(token: Any) -> None:
    _ECB_GCM.pop(id(token), None)
    _DIGEST_PSS.pop(id(token), None)
    _ECB_KWP.pop(id(token), None)


def composes_gcm(key: Any) -> bool:
    """Whether GCM with ``key`` is built from the token's AES-ECB (see module doc)."""
    return bool(_ECB_GCM) and id(key.session.token) in _ECB_GCM


def composes_kwp(key: Any) -> bool:
    """Whether AES key wrap with padding under ``key`` is built from its AES-ECB."""
    return bool(_ECB_KWP) and id(key.session.token) in _ECB_KWP


def pss_over_digest(key: Any) -> bool:
    """Whether RSA-PSS over a message is hashed here and signed as a digest."""
    return bool(_DIGEST_PSS) and id(key.session.token) in _DIGEST_PSS


# --------------------------------------------------------------------------- the token


class _Connection:
    __slots__ = ("anchor", "lib", "token")

    def __init__(self, lib: Any, token: Any) -> None:
        self.lib = lib
        self.token = token
        self.anchor: Any = None  # the session that logged in (login is per connection)


def tokens_in(lib: Any, label: str, slot: int | None) -> Iterator[Any]:
    """The initialised tokens labelled ``label`` in ``lib`` (in ``slot`` when given)."""
    for candidate in lib.get_slots(token_present=True):
        if slot is not None and candidate.slot_id != slot:
            continue
        try:
            token = candidate.get_token()
        except (p11e.TokenNotPresent, p11e.TokenNotRecognised):
            continue
        if token.label == label and token.flags & TokenFlag.TOKEN_INITIALIZED:
            yield token


def find_in(lib: Any, label: str, slot: int | None) -> Any:
    """The first initialised token labelled ``label`` in ``lib``, or None."""
    return next(tokens_in(lib, label, slot), None)


class RemoteToken:
    """A p11-kit client's token, in place of python-pkcs11's Token in the session pool.

    The pool only calls ``open(rw=True)`` and reads ``label``. One per process
    and (module, address, label, slot), shared by the crypto cores of the process
    (see :func:`adopt`); ``login`` / ``release`` count them.
    """

    def __init__(self, path: str, address: str | None, label: str, slot: int | None,
                 lib: Any, token: Any) -> None:
        self.path = path
        self.address = address
        self.shown_address = address_of(address)
        self.label = label
        self.slot = slot
        self.users = 0
        self.reconnects = 0
        self._pin: str | None = None
        self._lock = threading.Lock()
        self._conn: _Connection | None = _Connection(lib, token)
        self._retired: list[Any] = []  # lost connections' libs (see _retire)
        self._next_try = 0.0
        note_mechanisms(token)
        quiet_lost_operations()

    def __repr__(self) -> str:
        return f"<RemoteToken {self.label!r} at {self.shown_address}>"

    @property
    def flags(self) -> int:
        conn = self._conn
        return int(conn.token.flags) if conn is not None else 0

    # -- login --------------------------------------------------------------------

    def login(self, pin: str) -> None:
        """Log this process in (counted); the PIN is kept to log in again after a
        reconnection (as the HsmConfig holding DEW_HSM_PIN keeps it)."""
        with self._lock:
            if self.users:
                assert self._pin is not None
                if not hmac.compare_digest(self._pin.encode(), pin.encode()):
                    raise ConfigError(
                        "this process is logged in to the token with a different user PIN",
                        fix="Use the same HSM PIN for every crypto core of a process.",
                        code="hsm_pin_incorrect",
                    )
                self.users += 1
                return
            conn = self._conn or self._connect_locked()
            self._log_in(conn, pin)
            self._pin = pin
            self.users = 1

    def _log_in(self, conn: _Connection, pin: str) -> None:
        try:
            conn.anchor = conn.token.open(rw=True, user_pin=pin)
        except p11e.UserAlreadyLoggedIn:
            conn.anchor = conn.token.open(rw=True)

    def release(self) -> bool:
        """One user less; the last closes the connection. True when it was the last."""
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return False
            conn, self._conn = self._conn, None
            self._pin = None
            if conn is not None:
                if conn.anchor is not None:
                    with suppress(p11e.PKCS11Error):
                        conn.anchor.close()
                self._retire(conn)
            return True

    # -- sessions -----------------------------------------------------------------

    def open(self, rw: bool = True) -> Any:
        """A read-write session on the current connection, reconnecting if it was lost.

        PKCS#11 errors propagate (the caller translates them); a server that does
        not answer is HsmUnreachable (retryable)."""
        conn = self._conn
        if conn is not None:
            try:
                return conn.token.open(rw=True)
            except p11e.PKCS11Error as exc:
                if not connection_lost(exc):
                    raise
                self._lose(conn)
        return self._reconnect().token.open(rw=True)

    def lost(self) -> None:
        """The caller saw the current connection fail: the next ``open`` reconnects."""
        conn = self._conn
        if conn is not None:
            self._lose(conn)

    def _lose(self, conn: _Connection) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
                self._retire(conn)

    def _retire(self, conn: _Connection) -> None:
        # Finalised, the old list answers CKR_CRYPTOKI_NOT_INITIALIZED to the sessions
        # other pool threads still hold: they fail at once and are reopened. Kept
        # referenced: python-pkcs11 objects of that connection point into it.
        _finalize(conn.lib)
        self._retired.append(conn.lib)
        forget_token(conn.token)

    def _reconnect(self) -> _Connection:
        with self._lock:
            if self._conn is not None:
                return self._conn  # another thread reconnected meanwhile
            if not socket_answers(self.shown_address):
                raise unreachable(self.shown_address)
            now = time.monotonic()
            if now < self._next_try:
                raise unreachable(self.shown_address, "answers, but did not serve the token "
                                  "at the last try")
            self._next_try = now + RECONNECT_INTERVAL
            conn = self._connect_locked()
            if self._pin is not None:
                try:
                    self._log_in(conn, self._pin)
                except BaseException as exc:
                    self._conn = None
                    self._retire(conn)
                    if isinstance(exc, p11e.GeneralError):
                        # SoftHSM rewrites the token file at each login; logins from
                        # several processes at once can fail so (measured): try again.
                        raise unreachable(self.shown_address, "did not take the login "
                                          "again (a general error)") from None
                    raise
            self.reconnects += 1
            return conn

    def _connect_locked(self) -> _Connection:
        if not socket_answers(self.shown_address):
            raise unreachable(self.shown_address)
        _ADDRESSES.add(self.shown_address)
        lib = open_lib(self.path, self.address)
        try:
            token = find_in(lib, self.label, self.slot)
        except p11e.PKCS11Error as exc:
            _finalize(lib)
            if connection_lost(exc):
                raise unreachable(self.shown_address) from None
            raise
        if token is None:
            _finalize(lib)
            # Mid-run, a server restarted with another token may be put right: retryable.
            raise unreachable(self.shown_address,
                              f"serves no initialised token labelled {self.label!r}")
        conn = _Connection(lib, token)
        note_mechanisms(token)
        self._conn = conn
        return conn


_TOKENS: dict[tuple[str, str | None, str, int | None], RemoteToken] = {}
_TOKENS_LOCK = threading.Lock()


def adopt(path: str, address: str | None, label: str, slot: int | None, lib: Any,
          token: Any) -> RemoteToken:
    """The process's RemoteToken for this token, made from ``lib`` / ``token`` (a
    connection just opened) unless one is in use, in which case ``lib`` is closed."""
    key = (path, address, label, slot)
    with _TOKENS_LOCK:
        current = _TOKENS.get(key)
        if current is not None and current.users > 0:
            _finalize(lib)
            return current
        remote = RemoteToken(path, address, label, slot, lib, token)
        _TOKENS[key] = remote
        return remote
