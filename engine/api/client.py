"""A lean signed client of a running ``dew api``, for the CLI (docs/cli.md).

Only the standard library's ``http.client`` and ``ssl``: no asyncio, no HTTP
library, no service, HSM or database module, so a ``dew`` command that talks to
the API starts in a fraction of the time the local path needs. Requests are
signed with SDK-HMAC-SHA256 by :mod:`engine.api.signing`, the server's own
canonical request, so the two cannot drift. An error reply becomes the engine
error of its error code (:data:`ERRORS`, the server's table of
``engine.api.errors`` read backwards), so the CLI prints it and chooses its exit
code as for a local error.

Credentials (:func:`load_credentials`): ``DEW_CLI_ACCESS_KEY``,
``DEW_CLI_SECRET_KEY`` and ``DEW_CLI_PROJECT_ID`` when set, else ``[cli]
credentials_file`` (default ``STATE_DIR/cli-credentials``): the JSON that ``dew iam
create-access-key USER --json`` prints, refused when other users may read it.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from engine.api import signing
from engine.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    ConfigError,
    Conflict,
    DewError,
    InternalError,
    InvalidInput,
    NotFound,
    PermanentError,
    PermissionDenied,
    SecurityError,
    Throttled,
    TransientError,
)

# typing costs every `dew` start ~8 ms; annotations are strings here, so only mypy needs it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import http.client
    from typing import Any

    from engine.settings import Settings

CREDENTIALS_FILE = "cli-credentials"
SIGNED_HEADERS = ("content-type", "host", "x-project-id", "x-sdk-date")
ENV_KEYS = ("DEW_CLI_ACCESS_KEY", "DEW_CLI_SECRET_KEY", "DEW_CLI_PROJECT_ID")
START_HINT = "start it with make up (or dew api)"
MAX_REPLY = 4 << 20  # bytes: more than any reply of the API

# An error reply's code (``<PREFIX>.<4 digits>``) by its digits: the class the server
# mapped to them (engine.api.errors.TABLE), or the nearest one a client can rebuild.
ERRORS: dict[str, type[DewError]] = {
    "0301": AuthenticationFailed,
    "0403": PermissionDenied,
    "0404": NotFound,
    "0405": InvalidInput,
    "0409": Conflict,
    "0400": InvalidInput,
    "0413": InvalidInput,
    "0410": SecurityError,
    "0420": PermanentError,
    "0429": Throttled,
    "0503": BackendUnavailable,
    "0530": TransientError,
    "0500": InternalError,
}


@dataclass(frozen=True)
class Credentials:
    """The access key the CLI signs with, and where it came from."""

    access_key: str
    secret_key: str = field(repr=False)
    project_id: str
    project: str = ""  # the project's name, when the source names it
    origin: str = "environment"  # or the credentials file's path


@dataclass(frozen=True)
class Endpoint:
    """Where the API is: scheme, host and port of ``[cli] api_url``, and its path prefix."""

    url: str
    scheme: str
    host: str
    port: int
    prefix: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def one_line(error: DewError) -> DewError:
    """``error`` with no ``fix:`` line (its message already says what to do)."""
    error.fix = ""
    return error


# --------------------------------------------------------------------------- configuration


def parse_endpoint(url: str) -> Endpoint:
    """``[cli] api_url`` checked: https, or http on a loopback address only."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"cli.api_url is not a URL ({exc}): {url[:80]!r}") from None
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigError(f"cli.api_url must be https://HOST:PORT, got {url[:80]!r}")
    if parts.scheme == "http" and not _loopback(host):
        raise ConfigError(f"cli.api_url: plain http is allowed only to a loopback address, "
                          f"not {host}: use https")
    if parts.query or parts.fragment:
        raise ConfigError(f"cli.api_url takes no query or fragment, got {url[:80]!r}")
    default = 443 if parts.scheme == "https" else 80
    return Endpoint(url.rstrip("/"), parts.scheme, host, port or default,
                    parts.path.rstrip("/"))


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def credentials_path(settings: Settings) -> Path:
    configured = settings.cli.credentials_file
    return Path(configured) if configured else settings.state_dir / CREDENTIALS_FILE


def load_credentials(settings: Settings, environ: Mapping[str, str]) -> Credentials:
    """The environment's credentials when any of ``ENV_KEYS`` is set (all three must
    be), else the credentials file's. ConfigError (exit 2) when neither is usable."""
    given = [name for name in ENV_KEYS if environ.get(name)]
    if given:
        missing = [name for name in ENV_KEYS if name not in given]
        if missing:
            raise ConfigError(f"environment: {', '.join(given)} set without "
                              f"{', '.join(missing)} (the CLI's API credentials need all "
                              "three)", fix=f"Set {', '.join(missing)} too, or unset "
                              f"{', '.join(given)} to use the credentials file.")
        return Credentials(environ[ENV_KEYS[0]], environ[ENV_KEYS[1]], environ[ENV_KEYS[2]])
    return read_credentials(credentials_path(settings))


def read_credentials(path: Path) -> Credentials:
    """The credentials in ``path``, refused (as ssh refuses a private key) when a
    group or other users may read or write it, or when another user owns it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ConfigError(
            f"the CLI's API credentials file {path} does not exist ([cli] api_url is set)",
            fix=f"Make it: (umask 077; dew iam create-access-key USER --json > {path}); "
            "or add --local to use the local token.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the CLI's API credentials file {path}: "
                          f"{exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno())
        check_private(path, mode.st_mode, mode.st_uid)
        data = fh.read(65536)
    return parse_credentials(data, str(path))


def check_private(path: Path, mode: int, owner: int) -> None:
    if owner != os.geteuid():
        raise ConfigError(f"the CLI's API credentials file {path} belongs to another user "
                          f"(uid {owner}): it must be yours",
                          fix=f"Make your own credentials file, or chown it: chown "
                          f"{os.geteuid()} {path}")
    if mode & 0o077:
        raise ConfigError(f"the CLI's API credentials file {path} is open to other users "
                          f"(mode {stat.S_IMODE(mode):04o}): chmod 600 {path}",
                          fix=f"chmod 600 {path}")


def parse_credentials(data: bytes, origin: str) -> Credentials:
    """``dew iam create-access-key USER --json``'s output (access_key, secret_key,
    project_id and, optionally, project)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise ConfigError(f"the CLI's API credentials file {origin} is not a JSON object "
                          "(write what `dew iam create-access-key USER --json` prints)")
    values = {}
    for name in ("access_key", "secret_key", "project_id"):
        value = doc.get(name)
        if not isinstance(value, str) or not value or not value.isascii():
            raise ConfigError(f"the CLI's API credentials file {origin} has no {name}")
        values[name] = value
    project = doc.get("project")
    return Credentials(values["access_key"], values["secret_key"], values["project_id"],
                       project if isinstance(project, str) else "", origin)


def ca_path(settings: Settings) -> Path | None:
    """``[cli] ca_file``; else the API's local CA when this state directory has one."""
    if settings.cli.ca_file:
        return Path(settings.cli.ca_file)
    local = settings.state_dir / "tls" / "ca.pem"
    return local if local.is_file() else None


# --------------------------------------------------------------------------- requests


def sign_headers(method: str, target: str, body: bytes, host: str, creds: Credentials,
                 now: float | None = None) -> dict[str, str]:
    """The headers of a request to ``target`` (path and query, percent-encoded as
    sent), with its SDK-HMAC-SHA256 ``Authorization``."""
    headers = {
        "content-type": "application/json;charset=UTF-8",
        "host": host,
        "x-project-id": creds.project_id,
        signing.DATE_HEADER: time.strftime(signing.DATE_FORMAT,
                                           time.gmtime(time.time() if now is None else now)),
    }
    path, _, query = target.partition("?")
    request = signing.SignedRequest(method, path, query, headers, body)
    headers["authorization"] = signing.sign(request, creds.access_key,
                                            creds.secret_key.encode("ascii"), SIGNED_HEADERS)
    return headers


def error_of_reply(status: int, body: bytes) -> DewError:
    """The engine error of an API error reply (``{"error_code", "error_msg"}``)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("error_msg"), str):
        kind: type[DewError] = BackendUnavailable if status >= 500 else PermanentError
        return kind(f"the API answered HTTP {status} without an error body")
    code = str(doc.get("error_code", ""))
    kind = ERRORS.get(code.rpartition(".")[2], BackendUnavailable if status >= 500
                      else PermanentError)
    return kind(doc["error_msg"])


class ApiClient:
    """Signed JSON calls to one API endpoint; one connection per call (a CLI makes one
    or two)."""

    def __init__(self, endpoint: Endpoint, creds: Credentials, *, ca_file: Path | None,
                 timeout: float) -> None:
        self.endpoint = endpoint
        self.creds = creds
        self.ca_file = ca_file
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON reply of ``path`` (``{project_id}`` filled in); an engine error for
        an error reply; BackendUnavailable (one line naming the URL) when the API
        cannot be reached."""
        data = b"" if body is None else json.dumps(body).encode("utf-8")
        target = self.endpoint.prefix + path.replace("{project_id}", self.creds.project_id)
        headers = sign_headers(method, target, data, self.endpoint.host_header, self.creds)
        status, reply = self._send(method, target, data, headers)
        if status >= 300:
            error = error_of_reply(status, reply)
            if isinstance(error, AuthenticationFailed):
                error.message += (f" (access key {self.creds.access_key[:32]} from "
                                  f"{self.creds.origin})")
                one_line(error)
            raise error
        return json.loads(reply) if reply else None

    def _send(self, method: str, target: str, data: bytes,
              headers: dict[str, str]) -> tuple[int, bytes]:
        import ssl

        try:
            conn = self._connection()
            try:
                conn.request(method, target, body=data, headers=headers)
                response = conn.getresponse()
                return response.status, response.read(MAX_REPLY)
            finally:
                conn.close()
        except ssl.SSLCertVerificationError as exc:
            raise one_line(SecurityError(
                f"the API at {self.endpoint.url} failed TLS verification against "
                f"{self.ca_file or 'the system CAs'}: {exc.verify_message or exc.reason} "
                "(set [cli] ca_file to the CA that signs its certificate)")) from None
        except (OSError, EOFError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise one_line(BackendUnavailable(
                f"the API at {self.endpoint.url} is not answering ({reason}): "
                f"{START_HINT}")) from None

    def _connection(self) -> http.client.HTTPConnection:
        import http.client

        end = self.endpoint
        if end.scheme == "http":
            return http.client.HTTPConnection(end.host, end.port, timeout=self.timeout)
        import ssl

        try:
            context = ssl.create_default_context(
                cafile=None if self.ca_file is None else str(self.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load cli.ca_file {self.ca_file}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        return http.client.HTTPSConnection(end.host, end.port, timeout=self.timeout,
                                           context=context)


def open_client(settings: Settings, environ: Mapping[str, str]) -> ApiClient:
    """The client ``[cli]`` describes (``api_url`` must be set)."""
    endpoint = parse_endpoint(settings.cli.api_url)
    return ApiClient(endpoint, load_credentials(settings, environ),
                     ca_file=ca_path(settings), timeout=settings.cli.timeout)
