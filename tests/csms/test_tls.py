"""Rotation over verified TLS on real servers (audit M5): the private PostgreSQL
cluster (TLS on, certificate for ``localhost`` from a throw-away CA) and a private
MariaDB server with TLS; the machine's MariaDB (no TLS) for the plaintext refusal.

Each case runs the service in this process (the worker runs the same code; the
end-to-end worker run over TLS is in test_rotation.py). A relay between the
engine and MariaDB records what the engine sends: with TLS the new password is
not in it, with the opt-out it is (the control)."""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
from collections.abc import AsyncIterator

import aiomysql
import pymysql.err
import pytest

from engine.errors import DewError
from handlers.csms import model as m
from handlers.csms.rotators import TlsNotVerified
from handlers.csms.service import SecretsService
from tests.csms.conftest import TLS_HOST, MariaServer, PgCluster, Pki, mysql_root, pg_login

pytestmark = pytest.mark.slow


async def _doc(csms: SecretsService, name: str, stage: str = m.CURRENT) -> dict[str, object]:
    doc: dict[str, object] = json.loads((await csms.get_value(name, stage=stage)).value)
    return doc


async def _refused(csms: SecretsService, name: str) -> DewError:
    """Rotate ``name`` expecting a TLS refusal; checks what every refusal must be."""
    with pytest.raises(TlsNotVerified) as caught:
        await csms.rotate(name)
    err = caught.value
    assert err.retryable is False and err.code == "db_tls" and err.fix
    info = (await csms.describe(name)).to_json()
    assert info["failed_rotations"] == 1 and info["last_failure"]["code"] == "db_tls"
    assert info["stages"][m.CURRENT] == "v1"  # SYSCURRENT untouched
    return err


# --------------------------------------------------------------------------- PostgreSQL


async def test_postgres_rotation_over_verified_tls(
    csms: SecretsService, pg_cluster: PgCluster,
) -> None:
    # A TLS-only user (pg_hba hostssl; hostnossl reject): the server itself proves
    # the engine's logins were encrypted.
    await pg_cluster.create_tls_only_user("tls_ok", "tls-pw-1")
    original = pg_cluster.tls_document("tls_ok", "tls-pw-1")
    await csms.create("pg-tls", json.dumps(original).encode(), secret_type="RDS_POSTGRESQL")
    done = await csms.rotate("pg-tls")
    assert done["steps"] == ["create", "set", "test", "finish"]
    current = await _doc(csms, "pg-tls")
    assert current["password"] != original["password"]
    assert current["tls_ca"] == original["tls_ca"]  # the new version keeps the TLS fields
    assert await pg_login(current) is True and await pg_login(original) is False

    # verify-ca: any host name, the chain is still checked (127.0.0.1 is not in the cert).
    await pg_cluster.create_tls_only_user("tls_ca_only", "tls-pw-2")
    by_ip = pg_cluster.tls_document("tls_ca_only", "tls-pw-2", host="127.0.0.1",
                                    tls="verify-ca")
    await csms.create("pg-tls-ip", json.dumps(by_ip).encode(), secret_type="RDS_POSTGRESQL")
    await csms.rotate("pg-tls-ip")
    assert await pg_login(await _doc(csms, "pg-tls-ip")) is True


async def test_postgres_wrong_ca_or_host_name_is_refused(
    csms: SecretsService, pg_cluster: PgCluster, pki: Pki,
) -> None:
    await pg_cluster.create_user("tls_wrong", "wrong-ca-pw")
    cases = {
        "pg-wrong-ca": (pg_cluster.tls_document("tls_wrong", "wrong-ca-pw",
                                                tls_ca=pki.other_ca.pem),
                        "certificate verify failed|unable to get local issuer"),
        "pg-system-store": ({k: v for k, v in pg_cluster.tls_document(
            "tls_wrong", "wrong-ca-pw").items() if k != "tls_ca"}, "not accepted"),
        "pg-wrong-name": (pg_cluster.tls_document("tls_wrong", "wrong-ca-pw",
                                                  host="127.0.0.1"), "mismatch"),
    }
    for name, (doc, reason) in cases.items():
        await csms.create(name, json.dumps(doc).encode(), secret_type="RDS_POSTGRESQL")
        err = await _refused(csms, name)
        assert f"{doc['host']}:{pg_cluster.port}" in err.message, err.message
        assert any(r in err.message.lower() for r in reason.split("|")), err.message
        assert "wrong-ca-pw" not in err.message + err.cause
    # The password was never changed: the stored one still logs in.
    assert await pg_login(pg_cluster.tls_document("tls_wrong", "wrong-ca-pw")) is True


async def test_postgres_without_tls_is_refused_unless_the_secret_opts_out(
    csms: SecretsService, pg_cluster: PgCluster,
) -> None:
    await pg_cluster.create_user("tls_off", "tls-off-pw")
    verified = pg_cluster.tls_document("tls_off", "tls-off-pw")
    await csms.create("pg-no-tls", json.dumps(verified).encode(), secret_type="RDS_POSTGRESQL")
    opted_out = {**pg_cluster.document("tls_off", "x"), "tls": "disable"}
    opted_out.pop("ssl")
    async with pg_cluster.without_tls():
        err = await _refused(csms, "pg-no-tls")
        assert "does not offer TLS" in err.message and TLS_HOST in err.message
        assert await pg_login({**verified, "tls_ca": None, "host": "127.0.0.1"}) is True
        # The explicit opt-out: plaintext, on this secret only.
        await csms.create("pg-opt-out", json.dumps({**opted_out, "password": "tls-off-pw"})
                          .encode(), secret_type="RDS_POSTGRESQL")
        await csms.rotate("pg-opt-out")
        assert await pg_login(await _doc(csms, "pg-opt-out")) is True


# --------------------------------------------------------------------------- MariaDB


async def _maria_login(doc: dict[str, object], ca: str | None = None) -> bool:
    context = None
    if ca is not None:
        context = ssl.create_default_context(cadata=ca)
        context.check_hostname = doc.get("tls") != "verify-ca"
    try:
        conn = await aiomysql.connect(host=str(doc["host"]), port=int(str(doc["port"])),
                                      user=str(doc["username"]), password=str(doc["password"]),
                                      ssl=context)
    except pymysql.err.OperationalError as exc:
        if exc.args[0] == 1045:
            return False
        raise
    conn.close()
    return True


class Relay:
    """A TCP relay on 127.0.0.1 that records every byte the client sends."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sent = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       record: bool) -> None:
            try:
                while chunk := await src.read(65536):
                    if record:
                        self.sent.extend(chunk)
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


@pytest.fixture
async def maria_user(mariadb_tls: MariaServer) -> AsyncIterator[tuple[str, str]]:
    user, password = f"dew_t_{secrets.token_hex(4)}", secrets.token_hex(12)
    mariadb_tls.create_user(user, password)
    yield user, password
    mariadb_tls.root(f"DROP USER IF EXISTS '{user}'@'127.0.0.1'")


async def test_mariadb_rotation_over_tls_keeps_the_password_off_the_wire(
    csms: SecretsService, mariadb_tls: MariaServer, maria_user: tuple[str, str],
) -> None:
    user, password = maria_user
    async with Relay(mariadb_tls.port) as relay:
        original = mariadb_tls.document(user, password, port=relay.port)
        await csms.create("maria-tls", json.dumps(original).encode(), secret_type="RDS_MYSQL")
        assert (await csms.rotate("maria-tls"))["steps"] == ["create", "set", "test", "finish"]
    current = await _doc(csms, "maria-tls")
    direct = {**current, "port": mariadb_tls.port}
    assert await _maria_login(direct, mariadb_tls.ca_pem) is True
    assert await _maria_login({**direct, "password": password}, mariadb_tls.ca_pem) is False
    new_password = str(current["password"]).encode()
    assert len(relay.sent) > 500  # the relay saw the sessions (TLS handshakes and all)
    assert new_password not in relay.sent
    assert password.encode() not in relay.sent and user.encode() not in relay.sent

    # The control: the same server and relay with the opt-out, and the new password
    # crosses the wire in clear (MariaDB's SET PASSWORD = PASSWORD('...')).
    async with Relay(mariadb_tls.port) as clear:
        opted = {**direct, "port": clear.port, "tls": "disable"}
        opted.pop("tls_ca")
        await csms.put_version("maria-tls", json.dumps(opted).encode())
        await csms.rotate("maria-tls")
    newest = str((await _doc(csms, "maria-tls"))["password"]).encode()
    assert newest in clear.sent


async def test_mariadb_wrong_ca_and_host_name_are_refused(
    csms: SecretsService, mariadb_tls: MariaServer, maria_user: tuple[str, str], pki: Pki,
) -> None:
    user, password = maria_user
    cases = {
        "maria-wrong-ca": (mariadb_tls.document(user, password, tls_ca=pki.other_ca.pem),
                           "certificate"),
        "maria-wrong-name": (mariadb_tls.document(user, password, host="127.0.0.1"),
                             "mismatch"),
    }
    for name, (doc, reason) in cases.items():
        await csms.create(name, json.dumps(doc).encode(), secret_type="RDS_MYSQL")
        err = await _refused(csms, name)
        assert f"{doc['host']}:{mariadb_tls.port}" in err.message and reason in err.message
    assert await _maria_login(mariadb_tls.document(user, password), mariadb_tls.ca_pem)
    # verify-ca takes the certificate whatever the host name.
    ip = mariadb_tls.document(user, password, host="127.0.0.1", tls="verify-ca")
    await csms.create("maria-ip", json.dumps(ip).encode(), secret_type="RDS_MYSQL")
    await csms.rotate("maria-ip")
    assert await _maria_login(await _doc(csms, "maria-ip"), mariadb_tls.ca_pem) is True


async def test_mariadb_without_tls_is_refused(
    csms: SecretsService, mariadb_user: tuple[str, str],
) -> None:
    """The machine's MariaDB offers no TLS: refused before the login packet is sent,
    whatever the CA (the opt-out case is test_rotation's MariaDB test)."""
    user, password = mariadb_user
    doc = {"engine": "mariadb", "host": "127.0.0.1", "port": 3306, "username": user,
           "password": password, "dbname": "", "tls": "verify-ca"}
    await csms.create("maria-plain", json.dumps(doc).encode(), secret_type="RDS_MYSQL")
    async with Relay(3306) as relay:
        await csms.put_version("maria-plain",
                               json.dumps({**doc, "port": relay.port}).encode())
        err = await _refused_after_put(csms, "maria-plain")
    assert "does not offer TLS" in err.message and "127.0.0.1" in err.message
    assert user.encode() not in relay.sent  # not even the login packet went out
    assert await _maria_login(doc) is True  # the password is unchanged
    mysql_root("SELECT 1")


async def _refused_after_put(csms: SecretsService, name: str) -> DewError:
    with pytest.raises(TlsNotVerified) as caught:
        await csms.rotate(name)
    assert caught.value.retryable is False
    assert (await csms.describe(name)).record.failed_rotations == 1
    return caught.value
