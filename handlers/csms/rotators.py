"""Database rotators: log in, change the user's own password (asyncpg, aiomysql).

Single-user rotation, as the hosted service does it: the secret's user logs in
with its current password and changes its own password; a user may always do
that for itself, so no admin credential is stored anywhere. PostgreSQL gets a
SCRAM-SHA-256 verifier computed here (``ALTER ROLE ... PASSWORD
'SCRAM-SHA-256$...'``), so the new password never reaches the server, its logs
or ``pg_stat_activity`` in clear. MySQL and TaurusDB take ``ALTER USER
CURRENT_USER() IDENTIFIED BY %s``, MariaDB ``SET PASSWORD = PASSWORD(%s)``
(see :func:`mysql_password_statement`; the server hashes it).

Every connection is verified TLS unless the secret opts out (``"tls": "disable"``):
:func:`tls_context` builds the ``ssl.SSLContext`` from the secret's policy
(:class:`handlers.csms.model.TlsPolicy`): certificate required, chained to the
secret's CA (``tls_ca`` / ``tls_ca_file``) or the system store, host name checked
for ``verify-full``. There is no plaintext fallback: asyncpg given a context
refuses a server that declines TLS, and for MySQL :class:`_TlsOnlyConnection`
stops before the login packet when the server does not offer TLS (PyMySQL and
aiomysql would otherwise go on in clear). Such failures are :class:`TlsNotVerified`,
permanent: retrying cannot make a certificate valid.

:func:`map_db_error` is the one place where driver exceptions (asyncpg,
PyMySQL under aiomysql, OSError, timeouts) become engine errors, with every
password the rotation knows scrubbed from the text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import ssl
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import aiomysql
import asyncpg
import pymysql.err
from pymysql.constants import CLIENT

from engine.errors import DewError, PermanentError, TransientError
from handlers.csms.model import DbDocument, SecretType

SCRAM_ITERATIONS = 4096
CATEGORY = "database"


class TargetUnreachable(TransientError):
    code = "db_unreachable"
    category = CATEGORY
    default_fix = "Check the host and port in the secret's value, and that the database runs."


class CredentialsRejected(PermanentError):
    code = "db_credentials"
    category = CATEGORY
    default_fix = ("Check the username and password stored in the secret (dew secrets get); "
                   "put a version with working credentials, then rotate again.")


class PermissionDenied(PermanentError):
    code = "db_permission_denied"
    category = CATEGORY
    default_fix = "Grant the user the right to change its own password, then rotate again."


class TlsNotVerified(PermanentError):
    code = "db_tls"
    category = CATEGORY
    default_fix = ("Enable TLS on the database server with a certificate for this host name, "
                   "or give the secret the CA that signed it (tls_ca: PEM text, or "
                   "tls_ca_file); \"tls\": \"verify-ca\" skips the host name check, "
                   "\"tls\": \"disable\" sends everything in clear (an explicit opt-out).")


class DatabaseFailure(PermanentError):
    code = "db_error"
    category = CATEGORY
    default_fix = "Read the cause; fix the database or the secret's value, then rotate again."


class Rotator(Protocol):
    async def login(self, doc: DbDocument) -> None:
        """Log in with ``doc`` and run a trivial query; raise a mapped error otherwise."""

    async def change_password(self, doc: DbDocument, new_password: str) -> None:
        """Log in with ``doc`` and set the user's own password to ``new_password``."""


# --------------------------------------------------------------------------- TLS


def tls_context(doc: DbDocument) -> ssl.SSLContext | None:
    """The client context for ``doc``'s TLS policy (None: the secret opted out)."""
    policy = doc.tls
    if not policy.enabled:
        return None
    try:
        if policy.ca_pem is not None:
            context = ssl.create_default_context(cadata=policy.ca_pem)
        elif policy.ca_file is not None:
            context = ssl.create_default_context(cafile=policy.ca_file)
        else:
            context = ssl.create_default_context()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise TlsNotVerified(
            f"no verified TLS to {_where(doc)}: cannot load {policy.trust}",
            cause=f"{type(exc).__name__}: {exc}"[:500]) from None
    context.check_hostname = policy.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _NoTlsOffered(Exception):
    """The server did not offer TLS although the secret demands it (nothing was sent)."""


class _TlsOnlyConnection(aiomysql.Connection):  # type: ignore[misc]
    """aiomysql's connection, refusing to log in without TLS when a context is given.

    aiomysql (like PyMySQL) starts TLS only ``if ssl and server_capabilities &
    CLIENT.SSL`` and otherwise sends the login packet in clear; a server without
    TLS, or a man in the middle clearing that bit, would get the password (in
    clear with ``mysql_clear_password``). Checked here, before anything is sent."""

    async def _request_authentication(self) -> None:
        if self._ssl_context is not None and not self.server_capabilities & CLIENT.SSL:
            raise _NoTlsOffered("the server does not offer TLS")
        await super()._request_authentication()


def rotator_for(kind: SecretType, timeout: float) -> Rotator:
    if kind is SecretType.RDS_POSTGRESQL:
        return PostgresRotator(timeout)
    if kind is SecretType.RDS_MYSQL:
        return MysqlRotator(timeout)
    raise ValueError(f"no rotator for {kind}")


# --------------------------------------------------------------------------- PostgreSQL


def scram_verifier(password: str, salt: bytes | None = None,
                   iterations: int = SCRAM_ITERATIONS) -> str:
    """A PostgreSQL SCRAM-SHA-256 password verifier (what ``pg_authid`` stores)."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b = base64.b64encode
    return (f"SCRAM-SHA-256${iterations}:{b(salt).decode()}"
            f"${b(stored_key).decode()}:{b(server_key).decode()}")


def pg_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresRotator:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    async def _connect(self, doc: DbDocument, secrets: Iterable[str]) -> Any:
        # A context means sslmode=require in asyncpg: TLS or no connection (no
        # fallback); the context itself verifies the chain and, for verify-full,
        # the host name.
        context = tls_context(doc)
        try:
            return await asyncpg.connect(
                host=doc.host, port=doc.port, user=doc.username, password=doc.password,
                database=doc.dbname or None, timeout=self.timeout,
                command_timeout=self.timeout, ssl=context if context is not None else False,
            )
        except BaseException as exc:  # noqa: BLE001 - mapped, or re-raised if not ours
            raise map_db_error(exc, doc, secrets, connecting=True) from None

    async def login(self, doc: DbDocument) -> None:
        conn = await self._connect(doc, [doc.password])
        try:
            await conn.fetchval("SELECT 1")
        except BaseException as exc:  # noqa: BLE001
            raise map_db_error(exc, doc, [doc.password]) from None
        finally:
            await _close_quietly(conn.close(timeout=self.timeout))

    async def change_password(self, doc: DbDocument, new_password: str) -> None:
        known = [doc.password, new_password]
        conn = await self._connect(doc, known)
        try:
            # DDL takes no bind parameters: the verifier is base64 and '$', ':' only.
            await conn.execute(
                f"ALTER ROLE {pg_ident(doc.username)} PASSWORD '{scram_verifier(new_password)}'")
        except BaseException as exc:  # noqa: BLE001
            raise map_db_error(exc, doc, known, action="ALTER USER") from None
        finally:
            await _close_quietly(conn.close(timeout=self.timeout))


# --------------------------------------------------------------------------- MySQL family


class MysqlRotator:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    async def _connect(self, doc: DbDocument, secrets: Iterable[str]) -> Any:
        context = tls_context(doc)
        conn = _TlsOnlyConnection(
            host=doc.host, port=doc.port, user=doc.username, password=doc.password,
            db=doc.dbname or None, connect_timeout=self.timeout, autocommit=True,
            ssl=context)
        try:
            await asyncio.wait_for(conn._connect(), self.timeout + 1)
        except BaseException as exc:  # noqa: BLE001
            conn.close()
            raise map_db_error(exc, doc, secrets, connecting=True) from None
        if context is not None and conn._writer.get_extra_info("ssl_object") is None:
            conn.close()  # cannot happen after the check above; never send a password then
            raise _tls_refused(doc, "the connection is not encrypted")
        return conn

    async def login(self, doc: DbDocument) -> None:
        conn = await self._connect(doc, [doc.password])
        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT 1")
        except BaseException as exc:  # noqa: BLE001
            raise map_db_error(exc, doc, [doc.password]) from None
        finally:
            conn.close()

    async def change_password(self, doc: DbDocument, new_password: str) -> None:
        known = [doc.password, new_password]
        conn = await self._connect(doc, known)
        try:
            async with conn.cursor() as cur:
                await cur.execute(mysql_password_statement(conn.get_server_info()),
                                  (new_password,))
        except BaseException as exc:  # noqa: BLE001
            raise map_db_error(exc, doc, known, action="ALTER USER") from None
        finally:
            conn.close()


def mysql_password_statement(server_version: str) -> str:
    """How a user changes its own password. MariaDB wants the CREATE USER privilege
    for ``ALTER USER`` even on oneself, but lets anyone ``SET PASSWORD`` for
    themselves; MySQL 8 (and TaurusDB) dropped ``PASSWORD()`` and allow
    ``ALTER USER CURRENT_USER()``."""
    if "mariadb" in server_version.lower():
        return "SET PASSWORD = PASSWORD(%s)"
    return "ALTER USER CURRENT_USER() IDENTIFIED BY %s"


async def _close_quietly(closing: Any) -> None:
    # The work is done or already failed: an error while closing adds nothing.
    with contextlib.suppress(TimeoutError, OSError, asyncpg.PostgresError,
                             asyncpg.InterfaceError):
        await closing


# --------------------------------------------------------------------------- errors

# MySQL error numbers (server and client).
MY_ACCESS_DENIED = {1045, 1698}
MY_DB_DENIED = {1044, 1049}
MY_PRIVILEGE = {1227, 1142, 1370, 1396}
MY_UNREACHABLE = {2002, 2003, 2005, 2006, 2013, 2055, 1040, 1053}


def map_db_error(
    exc: BaseException, doc: DbDocument, secrets: Iterable[str], action: str = "log in",
    *, connecting: bool = False,
) -> BaseException:
    """The engine error for a driver exception (anything else is returned as it is).
    While ``connecting``, TLS failures (refused, unverifiable) are :class:`TlsNotVerified`;
    later a TLS error is a broken connection like any other."""
    if isinstance(exc, DewError | asyncio.CancelledError | KeyboardInterrupt | SystemExit):
        return exc
    where = _where(doc)
    cause = _scrub(f"{type(exc).__name__}: {exc}", secrets)
    tls = _tls_failure(exc) if connecting and doc.tls.enabled else None
    if tls is not None:
        reason, link = tls
        return _tls_refused(doc, _scrub(reason, secrets),
                            _scrub(f"{type(link).__name__}: {link}", secrets))
    if isinstance(exc, pymysql.err.MySQLError) and exc.args and isinstance(exc.args[0], int):
        number = exc.args[0]
        if number in MY_UNREACHABLE:
            return _unreachable(where, cause)
        if number in MY_ACCESS_DENIED:
            return _rejected(where, cause)
        if number in MY_PRIVILEGE:
            return _denied(where, cause, action)
        if number in MY_DB_DENIED:
            return DatabaseFailure(f"the database {doc.dbname!r} cannot be used on {where}",
                                   cause=cause)
        return DatabaseFailure(f"{action} failed on {where}", cause=cause)
    if isinstance(exc, asyncpg.InvalidPasswordError
                  | asyncpg.InvalidAuthorizationSpecificationError):
        return _rejected(where, cause)
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return _denied(where, cause, action)
    if isinstance(exc, asyncpg.CannotConnectNowError | asyncpg.TooManyConnectionsError
                  | asyncpg.ConnectionDoesNotExistError | asyncpg.PostgresConnectionError):
        return _unreachable(where, cause)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return DatabaseFailure(f"the database {doc.dbname!r} does not exist on {where}",
                               cause=cause, fix="Fix dbname in the secret's value.")
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return DatabaseFailure(f"{action} failed on {where}", cause=cause)
    if isinstance(exc, OSError | asyncio.TimeoutError | EOFError):
        return _unreachable(where, cause)
    return exc


def _where(doc: DbDocument) -> str:
    return f"{doc.engine} {doc.endpoint} as {doc.username!r}"


def _tls_refused(doc: DbDocument, reason: str, cause: str = "") -> DewError:
    # Raised while connecting, before any login or statement: nothing was sent.
    return TlsNotVerified(
        f"no verified TLS to {doc.host}:{doc.port} ({doc.engine}, tls "
        f"{doc.tls.mode.value}, trusting {doc.tls.trust}): {reason}; nothing was sent, "
        "there is no plaintext fallback", cause=cause or reason)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# asyncpg's words when the server answers "N" to the SSLRequest (no TLS there).
_PG_NO_TLS = "rejected SSL upgrade"


def _tls_failure(exc: BaseException) -> tuple[str, BaseException] | None:
    """Why TLS could not be established, if that is what ``exc`` (or a cause of it)
    says, with the exception that says it."""
    for link in _chain(exc):
        if isinstance(link, _NoTlsOffered):
            return "the server does not offer TLS", link
        if isinstance(link, ssl.SSLCertVerificationError):
            return f"the server certificate was not accepted: {link.verify_message}", link
        if isinstance(link, ssl.SSLError):
            return f"the TLS handshake failed: {link.reason or link}", link
        if isinstance(link, ConnectionError) and _PG_NO_TLS in str(link):
            return "the server does not offer TLS", link
    return None


def _unreachable(where: str, cause: str) -> DewError:
    return TargetUnreachable(f"the target cannot be reached, check host and port ({where})",
                             cause=cause)


def _rejected(where: str, cause: str) -> DewError:
    return CredentialsRejected(f"wrong credentials: {where} rejected the login", cause=cause)


def _denied(where: str, cause: str, action: str) -> DewError:
    return PermissionDenied(f"permission denied for {action} on {where}", cause=cause)


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:500]
