"""Database rotators: log in, change the user's own password (asyncpg, aiomysql).

Single-user rotation, as the hosted service does it: the secret's user logs in
with its current password and changes its own password; a user may always do
that for itself, so no admin credential is stored anywhere. PostgreSQL gets a
SCRAM-SHA-256 verifier computed here (``ALTER ROLE ... PASSWORD
'SCRAM-SHA-256$...'``), so the new password never reaches the server, its logs
or ``pg_stat_activity`` in clear. MySQL and TaurusDB take ``ALTER USER
CURRENT_USER() IDENTIFIED BY %s``, MariaDB ``SET PASSWORD = PASSWORD(%s)``
(see :func:`mysql_password_statement`; the server hashes it).

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
from collections.abc import Iterable
from typing import Any, Protocol

import aiomysql
import asyncpg
import pymysql.err

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


class DatabaseFailure(PermanentError):
    code = "db_error"
    category = CATEGORY
    default_fix = "Read the cause; fix the database or the secret's value, then rotate again."


class Rotator(Protocol):
    async def login(self, doc: DbDocument) -> None:
        """Log in with ``doc`` and run a trivial query; raise a mapped error otherwise."""

    async def change_password(self, doc: DbDocument, new_password: str) -> None:
        """Log in with ``doc`` and set the user's own password to ``new_password``."""


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
        try:
            return await asyncpg.connect(
                host=doc.host, port=doc.port, user=doc.username, password=doc.password,
                database=doc.dbname or None, timeout=self.timeout,
                command_timeout=self.timeout, ssl=doc.extra.get("ssl", "prefer"),
            )
        except BaseException as exc:  # noqa: BLE001 - mapped, or re-raised if not ours
            raise map_db_error(exc, doc, secrets) from None

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
        try:
            return await asyncio.wait_for(aiomysql.connect(
                host=doc.host, port=doc.port, user=doc.username, password=doc.password,
                db=doc.dbname or None, connect_timeout=self.timeout, autocommit=True,
            ), self.timeout + 1)
        except BaseException as exc:  # noqa: BLE001
            raise map_db_error(exc, doc, secrets) from None

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
    exc: BaseException, doc: DbDocument, secrets: Iterable[str], action: str = "log in"
) -> BaseException:
    """The engine error for a driver exception (anything else is returned as it is)."""
    if isinstance(exc, DewError | asyncio.CancelledError | KeyboardInterrupt | SystemExit):
        return exc
    where = f"{doc.engine} {doc.endpoint} as {doc.username!r}"
    cause = _scrub(f"{type(exc).__name__}: {exc}", secrets)
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
