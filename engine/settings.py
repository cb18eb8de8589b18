"""Settings: embedded defaults, then a ``--config`` file, then ``DEW_*`` variables.

The defaults live in ``config/default.toml``. Every key can be overridden by a
TOML file of the same shape and by ``DEW_<SECTION>_<KEY>`` environment
variables; ``DEW_STATE_DIR`` and ``DEW_REDIS_URL`` are shortcuts for
``engine.state_dir`` and ``redis.url``. Loading is a plain function of its
inputs (file text and an environment mapping) so it is tested without I/O.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import ConfigError
from engine.services import default_config_text
from engine.sql_db import StoreTarget, check_store_url

S = TypeVar("S")
SHORTCUTS = {"DEW_STATE_DIR": ("engine", "state_dir"), "DEW_REDIS_URL": ("redis", "url")}
# Secrets are never settings (settings get printed); the crypto core reads these itself.
SECRET_VARIABLES = frozenset({"DEW_HSM_PIN", "DEW_REDIS_PASSWORD", "DEW_CLI_SECRET_KEY"})
# DEW_* variables that are not settings but read where they are used: the CLI's
# default key-pair user (handlers/kps/cli.py), a test switch (tests/kps), the CLI's
# API identity (engine/api/client.py; its secret key is in SECRET_VARIABLES).
DIRECT_VARIABLES = frozenset({"DEW_USER", "DEW_KEEP_TEST_USER", "DEW_CLI_ACCESS_KEY",
                              "DEW_CLI_PROJECT_ID"})
# Test hooks (e.g. DEW_TEST_CSMS_PAUSE_AFTER_SET): never settings, never refused.
DIRECT_PREFIXES = ("DEW_TEST_",)


@dataclass(frozen=True)
class EngineSection:
    state_dir: Path = Path("var")
    # The service packages this engine runs (engine.services): their CLI verbs,
    # jobs, cron entries, demo steps and settings sections.
    services: tuple[str, ...] = ()


@dataclass(frozen=True)
class RedisSection:
    url: str = ""
    queue: str = "arq:queue"
    password_file: str = ""
    # Redis Sentinel: "host:port" of each Sentinel; they name the master of
    # ``sentinel_master`` (followed through failovers). Empty: ``url`` is used.
    sentinels: tuple[str, ...] = ()
    sentinel_master: str = "mymaster"


@dataclass(frozen=True)
class WorkerSection:
    max_jobs: int = 100
    poll_delay: float = 0.05
    job_timeout: int = 300
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0


@dataclass(frozen=True)
class RetrySection:
    max_tries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 300.0


@dataclass(frozen=True)
class SweeperSection:
    interval: int = 5
    grace: float = 5.0


@dataclass(frozen=True)
class LogSection:
    level: str = "info"
    file: str = "logs/dew.log"
    console: str = "auto"


@dataclass(frozen=True)
class HsmSection:
    module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = "dew"
    slot: int = -1
    pin_file: str = ""
    pool_size: int = 2
    # Child processes for the data plane's token calls (data keys, encrypt-data): the
    # event loop then works beside the token instead of in turns with it. 0: threads;
    # -1 (auto): one in `dew api`, none in other commands.
    data_processes: int = -1
    # p11-kit client module only: the socket `dew hsm serve` (p11-kit server) exports
    # the token on, "unix:path=/path/to/socket" ("": P11_KIT_SERVER_ADDRESS).
    server_address: str = ""


@dataclass(frozen=True)
class StoreSection:
    """Where the stores live (engine/sql_db.py): empty url = the SQLite file."""

    url: str = ""  # postgresql://USER@HOST:PORT/DATABASE: shared by several nodes
    pool_min: int = 1  # PostgreSQL connections per process, kept open
    pool_max: int = 10
    connect_timeout: float = 10.0  # seconds


@dataclass(frozen=True)
class ApiSection:
    """``dew api``: the HTTPS API (engine/api/, docs/api.md)."""

    listen: str = "127.0.0.1:8443"  # host:port, [v6]:port; port 0 = any free port
    tls: bool = True
    tls_names: tuple[str, ...] = ()  # extra DNS names / IPs of the generated certificate
    cert_file: str = ""  # both set: serve this certificate instead of the generated one
    key_file: str = ""
    max_body: int = 65536  # bytes
    job_wait: float = 30.0  # seconds an API call waits for its job before answering 202
    rate_manage: str = "50/second"  # per project, ``limits`` notation
    rate_crypto: str = "1000/second"
    clock_skew: int = 900  # seconds X-Sdk-Date may be away from the server clock


@dataclass(frozen=True)
class ConsoleSection:
    """The web console under ``/console`` on the API server (engine/console/)."""

    enabled: bool = True
    idle_minutes: int = 30  # a session unused this long is over
    lockout_after: int = 5  # wrong passwords in a row before a user name is slowed down
    lockout_seconds: float = 30.0  # the first wait; it doubles with each wrong one after
    lockout_max_seconds: float = 900.0


@dataclass(frozen=True)
class CliSection:
    """How ``dew`` reaches a running ``dew api`` (engine/api/client.py, docs/cli.md)."""

    api_url: str = ""  # empty: the CLI works on the local token and store
    credentials_file: str = ""  # empty: STATE_DIR/cli-credentials (mode 0600)
    ca_file: str = ""  # empty: STATE_DIR/tls/ca.pem when it exists, else the system's CAs
    timeout: float = 30.0  # seconds


@dataclass(frozen=True)
class Settings:
    """The engine's own sections, and those of the configured services."""

    engine: EngineSection = field(default_factory=EngineSection)
    redis: RedisSection = field(default_factory=RedisSection)
    worker: WorkerSection = field(default_factory=WorkerSection)
    retry: RetrySection = field(default_factory=RetrySection)
    sweeper: SweeperSection = field(default_factory=SweeperSection)
    log: LogSection = field(default_factory=LogSection)
    hsm: HsmSection = field(default_factory=HsmSection)
    store: StoreSection = field(default_factory=StoreSection)
    api: ApiSection = field(default_factory=ApiSection)
    console: ConsoleSection = field(default_factory=ConsoleSection)
    cli: CliSection = field(default_factory=CliSection)
    # The sections the services declare, by name (``section(KmsSettings)`` reads one).
    services: Mapping[str, Any] = field(default_factory=dict)

    def section(self, kind: type[S]) -> S:
        """The settings section of class ``kind`` (a service's, declared in its package)."""
        value = self.services.get(getattr(kind, "SECTION", ""))
        if not isinstance(value, kind):
            raise ConfigError(f"no settings section {kind.__name__} (is its service in "
                              "engine.services?)")
        return value

    def sections(self) -> dict[str, Any]:
        """Every section by name: the engine's, then the services'."""
        return {**{name: getattr(self, name) for name in ENGINE_SECTIONS}, **self.services}

    @property
    def state_dir(self) -> Path:
        return self.engine.state_dir

    @property
    def db_path(self) -> Path:
        return self.state_dir / "dew.sqlite3"

    @property
    def store_target(self) -> StoreTarget:
        """Where every store lives: the SQLite file, or ``[store] url``'s database."""
        return StoreTarget(self.db_path, self.store.url, self.store.pool_min,
                           self.store.pool_max, self.store.connect_timeout)

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def log_file(self) -> Path:
        return self.state_dir / self.log.file

    @property
    def redis_socket(self) -> Path:
        """The unix socket of the private Redis, used when ``redis.url`` is empty."""
        return self.run_dir / "redis.sock"

    @property
    def redis_url(self) -> str:
        # Absolute: in "unix://var/run/x.sock" a URL parser takes "var" for a host.
        return self.redis.url or f"unix://{self.redis_socket.absolute()}"

    @property
    def private_redis(self) -> bool:
        """True when this node runs its own Redis (no ``url``, no Sentinels)."""
        return not self.redis.url and not self.redis.sentinels

    def replace(self, **sections: Any) -> Settings:
        """A copy with some keys changed: ``replace(worker={"max_jobs": 5})``."""
        return _apply(self, {name: dict(values) for name, values in sections.items()}, "code")


def parse_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin} is not valid TOML: {exc}") from None


def env_overrides(
    environ: Mapping[str, str], sections: Iterable[str]
) -> dict[str, dict[str, str]]:
    """``DEW_<SECTION>_<KEY>`` variables (of the known ``sections``) as a nested mapping."""
    known = set(sections)
    out: dict[str, dict[str, str]] = {}
    for var, value in environ.items():
        if var in SECRET_VARIABLES or var in DIRECT_VARIABLES:
            continue
        if var in SHORTCUTS:
            section, key = SHORTCUTS[var]
        elif var.startswith("DEW_"):
            rest = var[4:].lower()
            section, _, key = rest.partition("_")
            if section not in known or not key:
                continue  # e.g. DEW_HSM_PIN belongs to the crypto core, not to settings
        else:
            continue
        out.setdefault(section, {})[key] = value
    return out


def build_settings(
    default_text: str,
    config_text: str | None = None,
    config_origin: str = "config file",
    environ: Mapping[str, str] | None = None,
) -> Settings:
    environ = environ or {}
    layers = [("defaults", parse_toml(default_text, "config/default.toml"))]
    if config_text is not None:
        layers.append((config_origin, parse_toml(config_text, config_origin)))
    # First the engine section alone: it says which services (and so which
    # further sections) there are.
    engine_only = Settings()
    for origin, data in [*layers, ("environment", env_overrides(environ, ENGINE_SECTIONS))]:
        if "engine" in data:
            engine_only = _apply(engine_only, {"engine": data["engine"]}, origin)
    settings = Settings(engine=engine_only.engine,
                        services=service_sections(engine_only.engine.services))
    known = [*ENGINE_SECTIONS, *settings.services]
    for origin, data in layers:
        if origin == "defaults":
            # The defaults file also holds the sections of services not configured here.
            data = {k: v for k, v in data.items() if k in known}
        settings = _apply(settings, data, origin)
    check_environment(environ, settings, layers[0][1])
    return _apply(settings, env_overrides(environ, known), "environment")


def check_environment(environ: Mapping[str, str], settings: Settings,
                      defaults: Mapping[str, Any]) -> None:
    """Refuse a ``DEW_*`` variable that names no setting (a typo would otherwise be
    ignored), like an unknown key of a TOML file. Not refused: the secrets and the
    variables read where they are used (``DIRECT_VARIABLES``), and the variables of
    a service section the defaults know but this engine does not run."""
    sections = settings.sections()
    for var in sorted(environ):
        if (not var.startswith("DEW_") or var in SECRET_VARIABLES or var in SHORTCUTS
                or var in DIRECT_VARIABLES or var.startswith(DIRECT_PREFIXES)):
            continue
        section, _, key = var[4:].lower().partition("_")
        if section in sections:
            if key in {f.name for f in dataclasses.fields(sections[section])}:
                continue
            raise ConfigError(f"environment: unknown variable {var} (no setting "
                              f"{section}.{key or '?'})",
                              fix=f"Correct or unset {var}.")
        if section in defaults and key:
            continue  # a section of a service not configured here
        raise ConfigError(f"environment: unknown variable {var} (no settings section "
                          f"[{section}])", fix=f"Correct or unset {var}.")


def service_sections(packages: Iterable[str]) -> dict[str, Any]:
    """Default instances of the settings sections the services declare, by name."""
    from engine.services import load_object, load_specs

    out: dict[str, Any] = {}
    for spec in load_specs(packages):
        if spec.settings is None:
            continue
        kind: Any = load_object(spec, spec.settings)
        name = getattr(kind, "SECTION", "")
        if name in ENGINE_SECTIONS or name in out or not isinstance(kind, type) or (
                not dataclasses.is_dataclass(kind)):
            raise ConfigError(f"service {spec.name!r} declares a bad settings section {name!r}")
        out[name] = kind()
    return out


def load_settings(config_file: str | os.PathLike[str] | None = None) -> Settings:
    """Settings for this process: defaults, ``config_file``, then ``os.environ``."""
    text = None
    origin = "config file"
    if config_file is not None:
        origin = str(config_file)
        try:
            text = Path(config_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"cannot read config file {origin}: {reason}") from None
    return build_settings(default_config_text(), text, origin, os.environ)


def _apply(settings: Settings, data: Mapping[str, Any], origin: str) -> Settings:
    changes: dict[str, Any] = {}
    services = dict(settings.services)
    for name, values in data.items():
        if name in ENGINE_SECTIONS:
            current = getattr(settings, name)
        elif name in services:
            current = services[name]
        else:
            raise ConfigError(f"{origin}: unknown section [{name}]")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: [{name}] must be a table")
        keys = {f.name: f for f in dataclasses.fields(current)}
        updates = {}
        for key, raw in values.items():
            if key not in keys:
                raise ConfigError(f"{origin}: unknown setting {name}.{key}")
            default = getattr(current, key)
            updates[key] = _coerce(raw, type(default), f"{origin}: {name}.{key}")
        if name in ENGINE_SECTIONS:
            changes[name] = dataclasses.replace(current, **updates)
        else:
            services[name] = dataclasses.replace(current, **updates)
    result = dataclasses.replace(settings, **changes, services=services)
    _validate(result, origin)
    return result


def _coerce(raw: Any, kind: type, where: str) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        if issubclass(kind, Path):
            return Path(str(raw))
        if kind is tuple:
            # A list in TOML; a comma-separated string in an environment variable.
            items = raw.split(",") if isinstance(raw, str) else raw
            if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
                raise ValueError(raw)
            return tuple(i.strip() for i in items if i.strip())
        if isinstance(raw, (dict, list)):
            raise ValueError(raw)
        return str(raw)
    except ValueError:
        raise ConfigError(f"{where} must be a {_type_name(kind)}, got {raw!r}") from None


def _type_name(kind: type) -> str:
    names = {int: "whole number", float: "number", bool: "boolean", tuple: "list of strings"}
    return names.get(kind, "string")


# ``limits``' rate notation ("50/second", "10 per 5 minutes", "5/s; 100/minute"),
# checked here without importing that library (it costs every `dew` start ~0.1 s).
_UNITS = "|".join(f"{g}s?" for g in ("second", "minute", "hour", "day", "month", "year"))
_RATE_ONE = rf"\s*[0-9]+\s*(?:/|\s*per\s*)\s*(?:[0-9]+)?\s*(?:{_UNITS})\s*"
RATE = re.compile(rf"^{_RATE_ONE}(?:[,;|]{_RATE_ONE})*$", re.IGNORECASE)


def valid_rate(text: str) -> bool:
    """A rate in ``limits``' notation whose amounts are all at least 1."""
    return bool(RATE.match(text)) and all(
        int(m) >= 1 for m in re.findall(r"(?:^|[,;|])\s*([0-9]+)", text))


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6 address]:port`` -> (host, port); ConfigError if malformed."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([^\s:\[\]]+):([0-9]{1,5})", text)
    if match is None:
        raise ConfigError(f"api.listen must be host:port or [ipv6]:port, got {text!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ConfigError(f"api.listen: port {port} is above 65535")
    return host, port


def parse_sentinel(text: str) -> tuple[str, int]:
    """One ``[redis] sentinels`` entry, ``host:port`` or ``[v6 address]:port`` ->
    (host, port); ConfigError naming the setting if malformed."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([^\s:\[\],/@]+):([0-9]{1,5})",
                         text)
    port = int(match.group(2) or match.group(4)) if match else 0
    if match is None or not 1 <= port <= 65535:
        raise ConfigError(
            f"redis.sentinels: each entry must be host:port (port 1-65535) of a Redis "
            f"Sentinel, got {text!r}",
            fix="e.g. sentinels = [\"10.0.0.1:26379\", \"10.0.0.2:26379\"], or "
                "DEW_REDIS_SENTINELS=10.0.0.1:26379,10.0.0.2:26379")
    return match.group(1) or match.group(3), port


def _validate(s: Settings, origin: str) -> None:
    try:
        parse_listen(s.api.listen)
        check_store_url(s.store.url)
        for entry in s.redis.sentinels:
            parse_sentinel(entry)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc.message}", fix=exc.fix) from None
    checks = [
        (s.worker.max_jobs >= 1, "worker.max_jobs must be at least 1"),
        (s.worker.poll_delay > 0, "worker.poll_delay must be above 0"),
        (s.worker.job_timeout >= 1, "worker.job_timeout must be at least 1"),
        (s.worker.heartbeat_interval > 0, "worker.heartbeat_interval must be above 0"),
        (
            s.worker.heartbeat_timeout > s.worker.heartbeat_interval,
            "worker.heartbeat_timeout must exceed worker.heartbeat_interval",
        ),
        (s.retry.max_tries >= 1, "retry.max_tries must be at least 1"),
        (s.retry.backoff_base >= 0, "retry.backoff_base must not be negative"),
        (s.retry.backoff_max >= s.retry.backoff_base, "retry.backoff_max must be >= backoff_base"),
        (
            1 <= s.sweeper.interval <= 60 and 60 % s.sweeper.interval == 0,
            "sweeper.interval must divide 60 (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 or 60)",
        ),
        (s.sweeper.grace >= 0, "sweeper.grace must not be negative"),
        (
            s.log.level.lower() in {"debug", "info", "warning", "error"},
            "log.level must be debug, info, warning or error",
        ),
        (
            s.log.console in {"auto", "pretty", "json", "off"},
            "log.console must be auto, pretty, json or off",
        ),
        (bool(s.redis.queue), "redis.queue must not be empty"),
        (1 <= s.hsm.pool_size <= 64, "hsm.pool_size must be between 1 and 64"),
        (-1 <= s.hsm.data_processes <= 16,
         "hsm.data_processes must be -1 (auto) or between 0 and 16"),
        (s.hsm.slot >= -1, "hsm.slot must be -1 (find the token by label) or a slot number"),
        (
            not s.hsm.server_address or (s.hsm.server_address.startswith("unix:path=")
                                         and len(s.hsm.server_address) > 10),
            "hsm.server_address must be unix:path=SOCKET (a local unix socket; reach "
            "another machine's through a forwarded socket)",
        ),
        (
            not s.redis.url or s.redis.url.startswith(("redis://", "rediss://", "unix://")),
            "redis.url must start with redis://, rediss:// or unix://",
        ),
        (
            # The Sentinels name the master: a URL beside them would be a second truth.
            not (s.redis.url and s.redis.sentinels),
            "redis.url and redis.sentinels exclude each other: the Sentinels name the "
            "master (set url = \"\", and the password in DEW_REDIS_PASSWORD or "
            "redis.password_file)",
        ),
        (
            bool(re.fullmatch(r"[A-Za-z0-9._-]+", s.redis.sentinel_master)),
            "redis.sentinel_master must be a Sentinel master name (letters, digits, . _ -), "
            f"got {s.redis.sentinel_master[:80]!r}",
        ),
        (1 <= s.store.pool_max <= 1000, "store.pool_max must be between 1 and 1000"),
        (0 <= s.store.pool_min <= s.store.pool_max,
         "store.pool_min must be between 0 and store.pool_max"),
        (s.store.connect_timeout > 0, "store.connect_timeout must be above 0"),
        (s.api.max_body >= 1, "api.max_body must be at least 1 (bytes)"),
        (s.api.job_wait > 0, "api.job_wait must be above 0"),
        (1 <= s.api.clock_skew <= 86400, "api.clock_skew must be between 1 and 86400 seconds"),
        (
            bool(s.api.cert_file) == bool(s.api.key_file),
            "api.cert_file and api.key_file go together: set both or neither",
        ),
        (
            valid_rate(s.api.rate_manage),
            f"api.rate_manage must be a rate like \"50/second\", got {s.api.rate_manage!r}",
        ),
        (
            valid_rate(s.api.rate_crypto),
            f"api.rate_crypto must be a rate like \"1000/second\", got {s.api.rate_crypto!r}",
        ),
        (1 <= s.console.idle_minutes <= 10080,
         "console.idle_minutes must be between 1 and 10080 (a week)"),
        (s.console.lockout_after >= 1, "console.lockout_after must be at least 1"),
        (s.console.lockout_seconds > 0, "console.lockout_seconds must be above 0"),
        (s.console.lockout_max_seconds >= s.console.lockout_seconds,
         "console.lockout_max_seconds must be >= console.lockout_seconds"),
        (not s.cli.api_url or s.cli.api_url.startswith(("https://", "http://")),
         f"cli.api_url must start with https:// (or http:// on loopback), got "
         f"{s.cli.api_url[:80]!r}"),
        (0 < s.cli.timeout <= 3600, "cli.timeout must be above 0 and at most 3600 seconds"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{origin}: {message}")


ENGINE_SECTIONS = tuple(f.name for f in dataclasses.fields(Settings) if f.name != "services")
