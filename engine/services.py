"""Service discovery: which service packages this engine runs and what each declares.

The engine names no service. ``[engine] services`` in the configuration lists
the packages (``handlers.kms``, ...); each has a module-level ``SERVICE``, a
:class:`ServiceSpec` naming its parts by module path: CLI verbs, jobs, demo
step, cron entries and settings section. Parts are imported only when used, so
``dew --help`` imports no HSM, SSH or database driver, and a service whose
optional dependency is missing fails alone, with one line naming it.

This module stays cheap to import (no dataclasses, no asyncio): the CLI reads
it before anything else.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from types import ModuleType

from engine.errors import ConfigError

# typing costs every `dew` start ~8 ms; annotations are strings here, so only mypy needs it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class ServiceSpec:
    """What one service package declares. Every part is a module path (or
    ``module:attribute``), imported on first use.

    - ``commands``: top-level CLI commands and their one-line help; ``cli`` is the
      module whose ``register(subparsers, commands)`` adds them.
    - ``jobs``: importing it registers the service's jobs and resources.
    - ``demo``: a module with ``async def run(settings, say)``, a ``make demo`` step.
    - ``schedules``: a module with ``entries(settings) -> list[ScheduleEntry]``.
    - ``settings``: ``module:Class``, the frozen dataclass of its ``[section]``
      (the class has ``SECTION``, the section's name).
    - ``api``: a module with ``operations() -> list[engine.api.operations.Operation]``
      and ``ERROR_PREFIX`` (``"KMS"``), served by ``dew api``.
    - ``roles``: ``module:ATTRIBUTE``, a ``RoleCatalog`` (engine.api.principal):
      the built-in roles and the actions the service's operations check.
    - ``token_keys``: ``module:ATTRIBUTE``, the service's own HSM keys
      (``engine.token_keys.TokenKey``), made up front by ``dew init`` and ``dew hsm serve``.
    """

    __slots__ = ("api", "cli", "commands", "demo", "jobs", "name", "roles", "schedules",
                 "settings", "title", "token_keys")

    def __init__(
        self, name: str, *, title: str = "", commands: Mapping[str, str] | None = None,
        cli: str | None = None, jobs: str | None = None, demo: str | None = None,
        schedules: str | None = None, settings: str | None = None, api: str | None = None,
        roles: str | None = None, token_keys: str | None = None,
    ) -> None:
        self.name = name
        self.title = title or name
        self.commands = dict(commands or {})
        self.cli = cli
        self.jobs = jobs
        self.demo = demo
        self.schedules = schedules
        self.settings = settings
        self.api = api
        self.roles = roles
        self.token_keys = token_keys

    def __repr__(self) -> str:
        return f"ServiceSpec({self.name!r})"


class ServiceUnavailable(ConfigError):
    """A part of a service could not be imported (a missing optional dependency)."""

    code = "service_unavailable"


def load_spec(package: str) -> ServiceSpec:
    """The ``SERVICE`` of ``package``; ConfigError if it is not a service package."""
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name is not None and package.startswith(exc.name):
            raise ConfigError(
                f"engine.services names {package!r}, which is not an installed package",
                fix="Correct [engine] services (or DEW_ENGINE_SERVICES).",
            ) from None
        raise _unavailable(package, exc) from None
    spec = getattr(module, "SERVICE", None)
    if not isinstance(spec, ServiceSpec):
        raise ConfigError(f"engine.services names {package!r}, which declares no SERVICE")
    return spec


def load_specs(packages: Iterable[str]) -> list[ServiceSpec]:
    specs: list[ServiceSpec] = []
    for package in packages:
        spec = load_spec(package)
        if any(s.name == spec.name for s in specs):
            raise ConfigError(f"two packages in engine.services are the service {spec.name!r}")
        specs.append(spec)
    return specs


def load_part(spec: ServiceSpec, path: str) -> ModuleType:
    """Import one part of ``spec``; a missing dependency names the service and package."""
    try:
        return importlib.import_module(path)
    except ImportError as exc:
        raise _unavailable(spec.name, exc) from None


def load_object(spec: ServiceSpec, path: str) -> Any:
    module_path, _, attribute = path.partition(":")
    module = load_part(spec, module_path)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"service {spec.name!r}: {module_path} has no {attribute!r}") from None


def _unavailable(service: str, exc: ImportError) -> ServiceUnavailable:
    missing = exc.name or str(exc)
    return ServiceUnavailable(
        f"the {service} service is unavailable: the Python package {missing!r} is missing",
        fix=f"Install it (pip install {missing}) or remove {service} from [engine] services.",
    )


def default_config_text() -> str:
    """The text of ``config/default.toml``: from the source tree, or from the wheel."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(os.path.dirname(here), "config", "default.toml"),
                 os.path.join(here, "_config", "default.toml")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    raise ConfigError("config/default.toml is missing from this installation")


def configured_packages(config_file: str | None, environ: Mapping[str, str]) -> tuple[str, ...]:
    """``engine.services`` without loading all the settings (the CLI needs it to
    build its parser): ``DEW_ENGINE_SERVICES``, else the config file, else the
    defaults. An unreadable config file is reported by the full load later."""
    if environ.get("DEW_ENGINE_SERVICES"):
        return tuple(p.strip() for p in environ["DEW_ENGINE_SERVICES"].split(",") if p.strip())
    texts = [default_config_text()]
    if config_file is not None:
        try:
            with open(config_file, encoding="utf-8") as f:
                texts.insert(0, f.read())
        except (OSError, UnicodeDecodeError):
            pass
    for text in texts:
        found = _services_line(text)
        if found is None:
            found = _services_toml(text)
        if found is not None:
            return found
    return ()


_SERVICES_LINE = r'(?m)^services = \[((?:"[\w.]+"(?:, )?)*)\]$'


def _services_line(text: str) -> tuple[str, ...] | None:
    """The one-line form of ``services = [...]`` in an ``[engine]`` table that
    comes first, as config/default.toml writes it; None for anything else, which
    tomllib reads (importing tomllib costs `dew --help` a fifth of its time)."""
    import re

    head = text.split("\n[", 2)
    match = re.search(_SERVICES_LINE, head[1]) if len(head) > 1 and head[1].startswith(
        "engine]") else None
    if match is None:
        return None
    return tuple(re.findall(r'"([\w.]+)"', match.group(1)))


def _services_toml(text: str) -> tuple[str, ...] | None:
    import tomllib

    try:
        engine = tomllib.loads(text).get("engine", {})
    except tomllib.TOMLDecodeError:
        return None
    if isinstance(engine, dict) and isinstance(engine.get("services"), list):
        return tuple(str(p) for p in engine["services"])
    return None
