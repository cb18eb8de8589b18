"""CSMS rules as pure functions: names, values, stages, periods, generated values.

Everything here decides without I/O, so the CLI checks input before it opens
anything (bad input changes nothing) and the service applies the same checks.
Stage moves are computed here too: :func:`move_stage` takes the stage map of a
secret and returns the new one, keeping the invariant that a stage names one
version at a time.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cached_property
from typing import Any

from cryptography import x509

from engine.errors import InvalidInput

NAME = re.compile(r"^[a-zA-Z0-9._-]{1,64}$")
STAGE = re.compile(r"^[a-zA-Z0-9._-]{1,64}$")
VERSION_ID = re.compile(r"^v[1-9][0-9]{0,9}$")
MAX_VALUE_BYTES = 32 * 1024
MAX_DESCRIPTION = 2048
RECOVERY_DAYS = (7, 30)
PERIOD_HOURS = (6, 8760)
GENERATE_LENGTH = (8, 4096)
DEFAULT_GENERATE_LENGTH = 32
MAX_STAGES_PER_SECRET = 20
MAX_VERSIONS = 100  # older versions without a stage are pruned past this
DEFAULT_KMS_KEY = "csms/default"
# A rotation that failed is tried again at most this long after (or one period, if shorter).
RETRY_FAILED_AFTER = timedelta(hours=1)

CURRENT = "SYSCURRENT"
PREVIOUS = "SYSPREVIOUS"
PENDING = "SYSPENDING"
PROTECTED_STAGES = frozenset({CURRENT, PREVIOUS})


class SecretType(StrEnum):
    COMMON = "COMMON"
    RDS_POSTGRESQL = "RDS_POSTGRESQL"
    RDS_MYSQL = "RDS_MYSQL"


# The database engines a value document may name, per secret type.
ENGINES = {
    SecretType.RDS_POSTGRESQL: frozenset({"postgresql", "postgres"}),
    SecretType.RDS_MYSQL: frozenset({"mysql", "mariadb", "taurusdb"}),
}

# Symbols that need no quoting in SQL literals, URLs or shells' double quotes.
SAFE_SYMBOLS = "!#%+,-.:=?^_~"
CHARSETS: dict[str, str] = {
    "alphanumeric": string.ascii_letters + string.digits,
    "alphanumeric-symbols": string.ascii_letters + string.digits + SAFE_SYMBOLS,
    "hex": "0123456789abcdef",
    "digits": string.digits,
    "printable": "".join(c for c in string.printable if c.isprintable() and c != " "),
}
DEFAULT_CHARSET = "alphanumeric-symbols"


class SecretState(StrEnum):
    ENABLED = "enabled"
    PENDING_DELETION = "pending_deletion"


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidInput(
            f"invalid secret name {_show(name)}: use 1-64 letters, digits, '.', '_' or '-'",
            code="invalid_secret_name",
        )
    return name


def check_stage(stage: object) -> str:
    if not isinstance(stage, str) or not STAGE.match(stage):
        raise InvalidInput(
            f"invalid stage {_show(stage)}: use 1-64 letters, digits, '.', '_' or '-'",
            code="invalid_stage",
        )
    return stage


def check_version_id(version_id: object) -> str:
    if not isinstance(version_id, str) or not VERSION_ID.match(version_id):
        raise InvalidInput(
            f"invalid version id {_show(version_id)}: version ids look like v1, v2, ...",
            code="invalid_version_id",
        )
    return version_id


def check_type(kind: object) -> SecretType:
    try:
        return SecretType(str(kind))
    except ValueError:
        raise InvalidInput(
            f"invalid secret type {_show(kind)}: use COMMON, RDS_POSTGRESQL or RDS_MYSQL",
            code="invalid_secret_type",
        ) from None


def check_description(text: object) -> str:
    if not isinstance(text, str) or len(text) > MAX_DESCRIPTION:
        raise InvalidInput(f"the description must be text of at most {MAX_DESCRIPTION} "
                           "characters", code="invalid_description")
    return text


def check_recovery_days(days: object) -> int:
    low, high = RECOVERY_DAYS
    if isinstance(days, bool) or not isinstance(days, int) or not low <= days <= high:
        raise InvalidInput(f"--recovery-days must be between {low} and {high}, got {days}",
                           code="invalid_recovery_days")
    return days


def parse_period(text: object) -> int:
    """A rotation period (``6h``..``8760h``, or ``1d``..``365d``) in seconds."""
    low, high = PERIOD_HOURS
    if isinstance(text, str):
        m = re.fullmatch(r"\s*([0-9]{1,6})\s*([hd])\s*", text)
        if m:
            hours = int(m.group(1)) * (24 if m.group(2) == "d" else 1)
            if low <= hours <= high:
                return hours * 3600
    raise InvalidInput(f"--period must be between {low}h and {high}h (e.g. 24h or 30d), "
                       f"got {_show(text)}", code="invalid_rotation_period")


def check_value(value: object, kind: SecretType) -> bytes:
    """A secret value: 1 byte to 32 KiB; for RDS types a connection document."""
    if not isinstance(value, bytes | bytearray):
        raise InvalidInput("a secret value must be bytes", code="invalid_secret_value")
    if not value:
        raise InvalidInput("the secret value is empty", code="invalid_secret_value")
    if len(value) > MAX_VALUE_BYTES:
        # The size only: the value itself never goes into an error.
        raise InvalidInput(f"the secret value is over {MAX_VALUE_BYTES} bytes (32 KiB)",
                           code="secret_value_too_large")
    if kind is not SecretType.COMMON:
        parse_db_document(bytes(value), kind)
    return bytes(value)


# --------------------------------------------------------------------------- TLS

class TlsMode(StrEnum):
    """How a rotation protects its database connection (the value field ``tls``)."""

    VERIFY_FULL = "verify-full"  # TLS, the certificate chains to a trusted CA, host name checked
    VERIFY_CA = "verify-ca"  # TLS, the certificate chains to a trusted CA, any host name
    DISABLE = "disable"  # plaintext: the explicit, per-secret opt-out


DEFAULT_TLS = TlsMode.VERIFY_FULL
# Fields of the value document that say how to reach the database safely.
TLS_FIELD, CA_FIELD, CA_FILE_FIELD, LEGACY_SSL_FIELD = "tls", "tls_ca", "tls_ca_file", "ssl"
# The field ``ssl`` (passed to the driver as it was before ``tls`` existed): what each
# value means now. The modes that allowed a silent plaintext fallback or an unchecked
# certificate (allow, prefer, require) now verify; only ``false``/``"disable"``, which
# asked for plaintext on purpose, keep it.
LEGACY_SSL: dict[str, TlsMode] = {
    "disable": TlsMode.DISABLE, "allow": TlsMode.VERIFY_FULL, "prefer": TlsMode.VERIFY_FULL,
    "require": TlsMode.VERIFY_FULL, "verify-ca": TlsMode.VERIFY_CA,
    "verify-full": TlsMode.VERIFY_FULL,
}


@dataclass(frozen=True)
class TlsPolicy:
    """The TLS a rotation demands. Trust: ``ca_pem`` (PEM text in the secret) or
    ``ca_file`` (a path on the worker's machine), else the system's CA store."""

    mode: TlsMode = DEFAULT_TLS
    ca_pem: str | None = None
    ca_file: str | None = None

    @property
    def enabled(self) -> bool:
        return self.mode is not TlsMode.DISABLE

    @property
    def check_hostname(self) -> bool:
        return self.mode is TlsMode.VERIFY_FULL

    @property
    def trust(self) -> str:
        if self.ca_pem is not None:
            return "the CA in the secret (tls_ca)"
        if self.ca_file is not None:
            return f"the CA file {self.ca_file}"
        return "the system CA store"


def parse_tls(doc: Mapping[str, Any]) -> TlsPolicy:
    """The TLS policy of a value document (``tls``, ``tls_ca``, ``tls_ca_file``, or the
    older ``ssl``). Errors name the field; a CA is checked to be PEM certificates."""
    mode = _tls_mode(doc)
    ca_pem, ca_file = doc.get(CA_FIELD), doc.get(CA_FILE_FIELD)
    if ca_pem is not None and ca_file is not None:
        raise InvalidInput(f"give {CA_FIELD} or {CA_FILE_FIELD}, not both",
                           code="invalid_db_document")
    if ca_pem is not None:
        if not isinstance(ca_pem, str) or not ca_pem.strip():
            raise InvalidInput(f"{CA_FIELD} must be PEM text of one or more CA certificates",
                               code="invalid_db_document")
        try:
            x509.load_pem_x509_certificates(ca_pem.encode("utf-8"))
        except (ValueError, UnicodeEncodeError):
            raise InvalidInput(f"{CA_FIELD} is not PEM text of CA certificates (expected "
                               "-----BEGIN CERTIFICATE----- blocks)",
                               code="invalid_db_document") from None
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file.startswith("/")
                                or "\0" in ca_file):
        raise InvalidInput(f"{CA_FILE_FIELD} must be an absolute path on the worker's machine",
                           code="invalid_db_document")
    if mode is TlsMode.DISABLE and (ca_pem is not None or ca_file is not None):
        raise InvalidInput(f"{CA_FIELD}/{CA_FILE_FIELD} need TLS, but {TLS_FIELD} is "
                           f"{TlsMode.DISABLE.value!r}", code="invalid_db_document")
    return TlsPolicy(mode, ca_pem, ca_file)


def _tls_mode(doc: Mapping[str, Any]) -> TlsMode:
    choices = ", ".join(repr(t.value) for t in TlsMode)
    mode: TlsMode | None = None
    if TLS_FIELD in doc:
        text = doc[TLS_FIELD]
        try:
            mode = TlsMode(text) if isinstance(text, str) else None
        except ValueError:
            mode = None
        if mode is None:
            raise InvalidInput(f"{TLS_FIELD} must be one of {choices} (default "
                               f"{DEFAULT_TLS.value!r}), got {_show(text)}",
                               code="invalid_db_document")
    if LEGACY_SSL_FIELD in doc:
        old = doc[LEGACY_SSL_FIELD]
        legacy = ((TlsMode.VERIFY_FULL if old else TlsMode.DISABLE) if isinstance(old, bool)
                  else LEGACY_SSL.get(old) if isinstance(old, str) else None)
        if legacy is None:
            raise InvalidInput(f"{LEGACY_SSL_FIELD} must be true, false or a PostgreSQL "
                               f"sslmode; better, use {TLS_FIELD}: {choices}",
                               code="invalid_db_document")
        if mode is not None and mode is not legacy:
            raise InvalidInput(f"{TLS_FIELD} ({mode.value!r}) and {LEGACY_SSL_FIELD} "
                               f"({_show(old)}) disagree: keep only {TLS_FIELD}",
                               code="invalid_db_document")
        mode = legacy
    return mode or DEFAULT_TLS


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True, repr=False)
class DbDocument:
    """The value of an RDS secret: where to log in, as whom, and over what TLS.

    ``tls`` is derived from ``extra`` (the fields stay there, as the user wrote them,
    so a rotated version keeps them)."""

    engine: str
    host: str
    port: int
    username: str
    password: str
    dbname: str
    extra: Mapping[str, Any]

    def __repr__(self) -> str:  # the password must never reach a log line
        return (f"DbDocument(engine={self.engine!r}, host={self.host!r}, port={self.port}, "
                f"username={self.username!r}, dbname={self.dbname!r}, "
                f"tls={self.tls.mode.value!r})")

    @cached_property
    def tls(self) -> TlsPolicy:
        return parse_tls(self.extra)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def with_password(self, password: str) -> DbDocument:
        return DbDocument(self.engine, self.host, self.port, self.username, password,
                          self.dbname, self.extra)

    def to_bytes(self) -> bytes:
        doc = {**self.extra, "engine": self.engine, "host": self.host, "port": self.port,
               "username": self.username, "password": self.password, "dbname": self.dbname}
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def parse_db_document(value: bytes, kind: SecretType) -> DbDocument:
    """Check an RDS secret value; errors name the field, never its content."""
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise InvalidInput(
            f"a {kind} secret value must be a JSON object with engine, host, port, username, "
            "password and dbname", code="invalid_db_document")
    for field in ("engine", "host", "username", "password"):
        if not isinstance(doc.get(field), str) or not doc[field]:
            raise InvalidInput(f"the {kind} secret value needs a non-empty text field "
                               f"{field!r}", code="invalid_db_document")
    engines = ENGINES[kind]
    if doc["engine"].lower() not in engines:
        raise InvalidInput(f"engine must be one of {', '.join(sorted(engines))} for {kind}",
                           code="invalid_db_document")
    port = doc.get("port")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidInput("port must be a number between 1 and 65535",
                           code="invalid_db_document")
    dbname = doc.get("dbname", "")
    if not isinstance(dbname, str):
        raise InvalidInput("dbname must be text", code="invalid_db_document")
    extra = {k: v for k, v in doc.items()
             if k not in {"engine", "host", "port", "username", "password", "dbname"}}
    tls = parse_tls(extra)
    if doc["host"].startswith("/") and tls.enabled:
        # asyncpg reaches a unix socket directory without TLS, whatever it is told.
        raise InvalidInput(f"host {doc['host']!r} is a unix socket, which has no TLS: set "
                           f'"{TLS_FIELD}": "{TlsMode.DISABLE.value}" to use it',
                           code="invalid_db_document")
    return DbDocument(doc["engine"].lower(), doc["host"], port, doc["username"],
                      doc["password"], dbname, extra)


def check_charset(name: object) -> str:
    if not isinstance(name, str) or name not in CHARSETS:
        raise InvalidInput(f"--charset must be one of {', '.join(CHARSETS)}, got {_show(name)}",
                           code="invalid_charset")
    return CHARSETS[name]


def check_length(length: object) -> int:
    low, high = GENERATE_LENGTH
    if isinstance(length, bool) or not isinstance(length, int) or not low <= length <= high:
        raise InvalidInput(f"--length must be between {low} and {high}, got {length}",
                           code="invalid_length")
    return length


def generate_value(length: int = DEFAULT_GENERATE_LENGTH,
                   charset: str = CHARSETS[DEFAULT_CHARSET]) -> str:
    """A random value from the OS CSPRNG; with letters and digits in it when the set has them."""
    while True:
        value = "".join(secrets.choice(charset) for _ in range(length))
        # Databases with password policies want mixed classes; retry the rare miss.
        classes = [c for c in (string.ascii_lowercase, string.ascii_uppercase, string.digits)
                   if set(c) & set(charset)]
        if length < len(classes) * 2 or all(set(value) & set(c) for c in classes):
            return value


def version_id(seq: int) -> str:
    return f"v{seq}"


# --------------------------------------------------------------------------- stages

StageMap = dict[str, str]  # stage -> version id


def move_stage(stages: Mapping[str, str], stage: str, version: str) -> StageMap:
    """Put ``stage`` on ``version``. Moving SYSCURRENT hands SYSPREVIOUS to the old current."""
    out = dict(stages)
    old = out.get(stage)
    if old == version:
        return out
    out[stage] = version
    if stage == CURRENT and old is not None:
        out[PREVIOUS] = old
    return out


def remove_stage(stages: Mapping[str, str], stage: str, version: str | None = None) -> StageMap:
    if stage in PROTECTED_STAGES:
        raise InvalidInput(
            f"{stage} cannot be removed: a secret always has a current version and keeps "
            "the one before",
            code="stage_protected",
            fix=f"Move {stage} to another version with set-stage instead.",
        )
    if stage not in stages:
        raise InvalidInput(f"no version has the stage {stage}", code="stage_not_found")
    if version is not None and stages[stage] != version:
        raise InvalidInput(f"the stage {stage} is on {stages[stage]}, not on {version}",
                           code="stage_not_on_version")
    return {s: v for s, v in stages.items() if s != stage}


def check_stage_count(stages: Mapping[str, str]) -> None:
    if len(stages) > MAX_STAGES_PER_SECRET:
        raise InvalidInput(f"a secret has at most {MAX_STAGES_PER_SECRET} stages",
                           code="too_many_stages")


def stages_of(stages: Mapping[str, str], version: str) -> list[str]:
    order = {CURRENT: 0, PREVIOUS: 1, PENDING: 2}
    return sorted((s for s, v in stages.items() if v == version),
                  key=lambda s: (order.get(s, 3), s))


# --------------------------------------------------------------------------- schedules


def next_after_failure(now: datetime, period_s: int | None) -> datetime | None:
    """When a failed scheduled rotation is tried again (None: rotation is off)."""
    if period_s is None:
        return None
    return now + min(RETRY_FAILED_AFTER, timedelta(seconds=period_s))


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- the API's rules

# Tags (as the hosted service): a key of 1-128 characters, a value of at most 255.
TAG_KEY = re.compile(r"^(?!_sys_)[\w\s.:=+\-@]{1,128}$")
TAG_VALUE = re.compile(r"^[\w\s.:/=+\-@]{0,255}$")
MAX_VERSION_STAGES = 12  # stages named by one CreateSecretVersion
PASSWORD_LENGTH = (8, 4096)
PUNCTUATION = string.punctuation


def check_tag(key: object, value: object) -> tuple[str, str]:
    if not isinstance(key, str) or not TAG_KEY.match(key) or key != key.strip():
        raise InvalidInput(f"invalid tag key {_show(key)}: 1-128 letters, digits, spaces or "
                           "_.:=+-@, not starting with _sys_", code="invalid_tag")
    if value is None:
        value = ""
    if not isinstance(value, str) or not TAG_VALUE.match(value):
        raise InvalidInput(f"invalid tag value for {key!r}: at most 255 letters, digits, "
                           "spaces or _.:/=+-@", code="invalid_tag")
    return key, value


def format_period(seconds: int | None) -> str | None:
    """A rotation period as the API shows it: ``30d`` when whole days, else ``36h``."""
    if seconds is None:
        return None
    hours = seconds // 3600
    return f"{hours // 24}d" if hours % 24 == 0 else f"{hours}h"


def generate_password(
    length: int = 32, *, exclude_characters: str = "", exclude_lowercase: bool = False,
    exclude_uppercase: bool = False, exclude_numbers: bool = False,
    exclude_punctuation: bool = False, include_space: bool = False,
    require_each_included_type: bool = False,
) -> str:
    """GenerateRandomPassword: from the OS CSPRNG, over the classes not excluded."""
    low, high = PASSWORD_LENGTH
    if isinstance(length, bool) or not isinstance(length, int) or not low <= length <= high:
        raise InvalidInput(f"length must be between {low} and {high}, got {length}",
                           code="invalid_length")
    classes = [c for c, off in ((string.ascii_lowercase, exclude_lowercase),
                                (string.ascii_uppercase, exclude_uppercase),
                                (string.digits, exclude_numbers),
                                (PUNCTUATION, exclude_punctuation),
                                (" ", not include_space)) if not off]
    classes = ["".join(ch for ch in c if ch not in exclude_characters) for c in classes]
    classes = [c for c in classes if c]
    if not classes:
        raise InvalidInput("every character is excluded: nothing to make a password of",
                           code="invalid_password_policy")
    if require_each_included_type and len(classes) > length:
        raise InvalidInput(f"length {length} is too short to hold each of the "
                           f"{len(classes)} included types", code="invalid_password_policy")
    charset = "".join(classes)
    while True:
        value = "".join(secrets.choice(charset) for _ in range(length))
        if not require_each_included_type or all(set(value) & set(c) for c in classes):
            return value
