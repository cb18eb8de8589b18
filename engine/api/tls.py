"""The API's transport: a local CA and server certificate, or the operator's own.

On first start ``STATE_DIR/tls/`` gets a local CA (EC P-256, 10 years, CN
"dew-engine local CA") and a server certificate it signs for 127.0.0.1, ::1,
localhost and ``[api] tls_names``: ``ca.pem``, ``ca-key.pem``, ``server.pem``,
``server-key.pem`` (every file 0600, the directory 0700). Later starts reuse
them; the server certificate (never the CA) is made again when its names
changed, when it is within 30 days of its end, or when the CA no longer signs
it. With ``[api] cert_file`` / ``key_file`` those files are served instead.

Plain HTTP (``tls = false``) is allowed only on a loopback address.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine.errors import ConfigError
from engine.private import private_dir, private_files
from engine.settings import Settings

CA_NAME = "dew-engine local CA"
CA_DAYS = 3650
SERVER_DAYS = 397
RENEW_BEFORE = timedelta(days=30)
DEFAULT_NAMES = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Transport:
    """How ``dew api`` serves: the address, and the TLS files (None for plain HTTP)."""

    host: str
    port: int
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None  # the local CA clients trust; None for the operator's cert

    @property
    def scheme(self) -> str:
        return "https" if self.cert_file is not None else "http"

    def url(self, port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port if port is None else port}"


def tls_dir(settings: Settings) -> Path:
    return settings.state_dir / "tls"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare(settings: Settings, host: str, port: int, now: datetime | None = None) -> Transport:
    """The transport for ``host:port``, its TLS files made or renewed as needed.
    ConfigError (one line) for plain HTTP on a non-loopback address or unusable files."""
    if not settings.api.tls:
        if not is_loopback(host):
            raise ConfigError(
                f"api.tls = false (plain HTTP) is allowed only on a loopback address, "
                f"not {host}",
                fix="Keep api.tls = true, or listen on 127.0.0.1 / ::1.",
            )
        return Transport(host, port)
    if settings.api.cert_file:
        cert, key = Path(settings.api.cert_file), Path(settings.api.key_file)
        _check_own_files(cert, key)
        return Transport(host, port, cert, key, None)
    files = ensure_local_ca(settings, now)
    return Transport(host, port, files.server_cert, files.server_key, files.ca_cert)


@dataclass(frozen=True)
class LocalTls:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    created_ca: bool
    created_server: bool


def server_names(settings: Settings) -> list[str]:
    names: list[str] = []
    for name in (*DEFAULT_NAMES, *settings.api.tls_names):
        name = name.strip()
        if name and name not in names:
            names.append(name)
    return names


def ensure_local_ca(settings: Settings, now: datetime | None = None) -> LocalTls:
    """Make or renew the files as needed; several API processes starting at once on
    one state directory take turns (a lock file), so they end up with one CA."""
    directory = private_dir(tls_dir(settings))
    with (directory / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _ensure_local_ca(settings, directory, now or datetime.now(UTC))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ensure_local_ca(settings: Settings, directory: Path, now: datetime) -> LocalTls:
    ca_cert_path, ca_key_path = directory / "ca.pem", directory / "ca-key.pem"
    cert_path, key_path = directory / "server.pem", directory / "server-key.pem"
    names = server_names(settings)

    created_ca = False
    ca = _load_pair(ca_cert_path, ca_key_path)
    if ca is None or ca[0].not_valid_after_utc <= now + RENEW_BEFORE:
        ca = _make_ca(now)
        _write(ca_key_path, _key_pem(ca[1]))
        _write(ca_cert_path, ca[0].public_bytes(serialization.Encoding.PEM))
        created_ca = True
    ca_cert, ca_key = ca

    created_server = False
    server = _load_pair(cert_path, key_path)
    if created_ca or server is None or not _server_ok(server[0], ca_cert, names, now):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _make_server(key, ca_cert, ca_key, names, now)
        _write(key_path, _key_pem(key))
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        created_server = True
    private_files(ca_cert_path, ca_key_path, cert_path, key_path, directory / ".lock")
    return LocalTls(ca_cert_path, ca_key_path, cert_path, key_path, created_ca, created_server)


Pair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _load_pair(cert_path: Path, key_path: Path) -> Pair | None:
    """A certificate and its private key, or None if either is missing or unusable."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    public = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            public, ec.EllipticCurvePublicKey) or (
            public.public_numbers() != key.public_key().public_numbers()):
        return None
    return cert, key


def _server_ok(cert: x509.Certificate, ca: x509.Certificate, names: list[str],
               now: datetime) -> bool:
    if cert.not_valid_after_utc <= now + RENEW_BEFORE or cert.not_valid_before_utc > now:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(san) == set(_general_names(names))


def _general_names(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name.lower()))
    return out


def _make_ca(now: datetime) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, socket.gethostname()[:64] or "dew"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_server(key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                 ca_key: ec.EllipticCurvePrivateKey, names: list[str],
                 now: datetime) -> x509.Certificate:
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + timedelta(days=SERVER_DAYS), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` 0600 beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_own_files(cert: Path, key: Path) -> None:
    for path in (cert, key):
        if not path.is_file():
            raise ConfigError(f"api.cert_file / api.key_file: {path} is not a readable file")
    if key.stat().st_mode & 0o077:
        raise ConfigError(f"the API's private key {key} is readable by others",
                          fix=f"chmod 600 {key}")
    try:
        x509.load_pem_x509_certificate(cert.read_bytes())
        serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"api.cert_file / api.key_file cannot be loaded: {exc}") from None
