"""The API's TLS: the local CA and server certificate under STATE_DIR/tls, their
reuse and renewal, the operator's own files, and plain HTTP on loopback only."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from engine.api import tls
from engine.errors import ConfigError
from engine.settings import Settings, load_settings
from tests.helpers import ROOT, dew_env


@pytest.fixture
def plain(tmp_path: Path) -> Settings:
    """Settings in a temp state dir (no Redis, no HSM needed)."""
    (tmp_path / "var").mkdir()  # `dew` refuses a state directory that does not exist
    return load_settings().replace(engine={"state_dir": tmp_path / "var"},
                                   log={"console": "off"})


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(path: Path) -> set[str]:
    ext = cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(
        ext.get_values_for_type(x509.DNSName))


def test_first_start_makes_a_private_ca_and_server_certificate(plain: Settings) -> None:
    settings = plain.replace(api={"tls_names": ["api.example.test", "10.1.2.3", "fd00::7"]})
    files = tls.ensure_local_ca(settings)
    assert files.created_ca and files.created_server
    directory = settings.state_dir / "tls"
    assert directory.stat().st_mode & 0o777 == 0o700
    names = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir() if p.name != ".lock"}
    assert names == {"ca.pem": 0o600, "ca-key.pem": 0o600, "server.pem": 0o600,
                     "server-key.pem": 0o600}
    ca = cert(files.ca_cert)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == tls.CA_NAME
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= timedelta(days=3650)
    assert sans(files.server_cert) == {"127.0.0.1", "::1", "localhost", "api.example.test",
                                       "10.1.2.3", "fd00::7"}
    ext = cert(files.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in ext.get_values_for_type(x509.IPAddress)
    cert(files.server_cert).verify_directly_issued_by(ca)
    # Another tool agrees: OpenSSL verifies the chain for a TLS server.
    done = subprocess.run(["openssl", "verify", "-purpose", "sslserver", "-CAfile",
                           str(files.ca_cert), str(files.server_cert)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(["openssl", "verify", "-CAfile", str(files.ca_cert), "-verify_ip",
                           "10.1.2.3", str(files.server_cert)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_later_starts_reuse_the_files_and_renew_only_the_server_certificate(
    plain: Settings,
) -> None:
    first = tls.ensure_local_ca(plain)
    ca_pem, server_pem = first.ca_cert.read_bytes(), first.server_cert.read_bytes()
    again = tls.ensure_local_ca(plain)
    assert not again.created_ca and not again.created_server
    assert first.server_cert.read_bytes() == server_pem

    renamed = tls.ensure_local_ca(plain.replace(api={"tls_names": ["dew.internal"]}))
    assert renamed.created_server and not renamed.created_ca
    assert first.ca_cert.read_bytes() == ca_pem
    assert "dew.internal" in sans(first.server_cert)

    # Within 30 days of the end: a new server certificate, the same CA.
    end = cert(first.server_cert).not_valid_after_utc
    later = tls.ensure_local_ca(plain.replace(api={"tls_names": ["dew.internal"]}),
                                now=end - timedelta(days=29))
    assert later.created_server and not later.created_ca
    assert cert(first.server_cert).not_valid_after_utc > end
    assert first.ca_cert.read_bytes() == ca_pem
    # A server key replaced by another one is not used with the old certificate.
    key = first.server_key.read_bytes()
    first.server_key.write_bytes(first.ca_key.read_bytes())
    assert tls.ensure_local_ca(plain.replace(api={"tls_names": ["dew.internal"]})).created_server
    assert first.server_key.read_bytes() != key


def test_a_lost_ca_key_makes_a_new_ca_and_server_certificate(plain: Settings) -> None:
    first = tls.ensure_local_ca(plain)
    ca_pem = first.ca_cert.read_bytes()
    first.ca_key.unlink()
    again = tls.ensure_local_ca(plain)
    assert again.created_ca and again.created_server
    assert first.ca_cert.read_bytes() != ca_pem
    cert(first.server_cert).verify_directly_issued_by(cert(first.ca_cert))


def test_the_operators_own_files(plain: Settings, tmp_path: Path) -> None:
    made = tls.ensure_local_ca(plain)
    own_cert, own_key = tmp_path / "own.pem", tmp_path / "own-key.pem"
    own_cert.write_bytes(made.server_cert.read_bytes())
    own_key.write_bytes(made.server_key.read_bytes())
    own_key.chmod(0o600)
    settings = plain.replace(api={"cert_file": str(own_cert), "key_file": str(own_key)})
    transport = tls.prepare(settings, "127.0.0.1", 8443)
    assert (transport.cert_file, transport.key_file, transport.ca_file) == (
        own_cert, own_key, None)
    own_key.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        tls.prepare(settings, "127.0.0.1", 8443)
    own_key.chmod(0o600)
    own_key.write_text("not a key")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        tls.prepare(settings, "127.0.0.1", 8443)
    with pytest.raises(ConfigError, match="set both or neither"):
        plain.replace(api={"cert_file": str(own_cert)})


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_plain_http_is_allowed_on_loopback(plain: Settings, host: str) -> None:
    transport = tls.prepare(plain.replace(api={"tls": False}), host, 8080)
    assert transport.scheme == "http" and transport.cert_file is None
    assert not (plain.state_dir / "tls").exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "api.example.test"])
def test_plain_http_is_refused_elsewhere(plain: Settings, host: str) -> None:
    with pytest.raises(ConfigError, match=r"plain HTTP.* only on a loopback address"):
        tls.prepare(plain.replace(api={"tls": False}), host, 8080)


def test_dew_api_refuses_plain_http_on_a_public_address_in_one_line(plain: Settings) -> None:
    env = dew_env(plain, DEW_API_TLS="false")
    done = subprocess.run([sys.executable, "-m", "engine.cli", "api", "--listen", "0.0.0.0:0"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dew: error: api.tls = false (plain HTTP) is allowed only on a loopback address, "
        "not 0.0.0.0"]
    assert done.stdout == ""


@pytest.mark.parametrize(("listen", "message"), [
    ("8443", "api.listen must be host:port"),
    ("::1:8443", "api.listen must be host:port"),
    ("127.0.0.1:99999", "port 99999 is above 65535"),
])
def test_a_bad_listen_address_is_one_line(plain: Settings, listen: str, message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "engine.cli", "api", "--listen", listen],
                          env=dew_env(plain), cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr


def test_key_files_hold_private_keys_in_pkcs8(plain: Settings) -> None:
    files = tls.ensure_local_ca(plain)
    for path in (files.ca_key, files.server_key):
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert datetime.now(UTC) < cert(files.server_cert).not_valid_after_utc
