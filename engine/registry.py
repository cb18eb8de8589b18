"""The job registry: job names, their handlers, argument checks and secret fields.

Handlers register themselves by name (``engine.echo``, ``kms.schedule_key_deletion``,
``kps.bind`` ...). The client looks names up here to refuse an unknown job or bad
arguments before anything is written; the worker builds its arq functions from it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.errors import DewError, InvalidInput, UnknownJob
from engine.services import load_part, load_specs

if TYPE_CHECKING:
    from engine.context import JobContext
    from engine.settings import Settings

Handler = Callable[["JobContext", dict[str, Any]], Awaitable[Any]]
Validator = Callable[[dict[str, Any]], None]

JOB_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


@dataclass(frozen=True)
class JobSpec:
    name: str
    handler: Handler
    validate: Validator | None = None
    secret_fields: frozenset[str] = frozenset()
    description: str = ""
    # The result may carry what the secret fields held: the task row keeps it redacted.
    secret_result: bool = False
    # The arguments it takes: name -> "type: meaning" (optional ones say so); shown by
    # `dew jobs` and the API's ListJobs.
    fields: Mapping[str, str] = field(default_factory=dict)
    # Its handler calls ``ctx.check_cancelled()`` at safe points, so ``dew tasks cancel``
    # may stop it while it runs; a job without safe points is left to end by itself.
    cancellable: bool = False


class Registry:
    def __init__(self) -> None:
        self._jobs: dict[str, JobSpec] = {}
        # Services whose jobs could not be loaded, and why (the others still run).
        self.unavailable: dict[str, DewError] = {}

    def job(
        self,
        name: str,
        *,
        validate: Validator | None = None,
        secret_fields: tuple[str, ...] = (),
        description: str = "",
        secret_result: bool = False,
        fields: Mapping[str, str] | None = None,
        cancellable: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Decorator registering ``handler`` as the job ``name``. ``secret_fields``: the
        arguments sealed whole (whatever they hold, at any depth); ``fields``: every
        argument it takes, name -> "type: meaning"; ``cancellable``: the handler has
        safe points (``ctx.check_cancelled()``), so a running task may be cancelled."""
        if not JOB_NAME.match(name):
            raise ValueError(f"job name {name!r} must look like 'domain.operation'")

        def register(handler: Handler) -> Handler:
            if name in self._jobs:
                raise ValueError(f"job {name!r} is registered twice")
            doc = (handler.__doc__ or "").strip().splitlines()
            self._jobs[name] = JobSpec(
                name, handler, validate, frozenset(secret_fields), description or
                (doc[0] if doc else ""), secret_result, dict(fields or {}), cancellable,
            )
            return handler

        return register

    def get(self, name: str) -> JobSpec:
        try:
            return self._jobs[name]
        except KeyError:
            missing = "".join(f"; {e.message}" for e in self.unavailable.values())
            raise UnknownJob(f"unknown job name {name!r}{missing} (`dew jobs` lists the job "
                             "names)") from None

    def check_args(self, name: str, args: Any) -> JobSpec:
        """The spec of job ``name`` after checking ``args`` (InvalidInput if bad)."""
        spec = self.get(name)
        if not isinstance(args, dict):
            raise InvalidInput(f"the arguments of {name} must be a JSON object")
        if spec.validate is not None:
            spec.validate(args)
        return spec

    def cancellable(self) -> frozenset[str]:
        """The names of the jobs whose running tasks may be cancelled."""
        return frozenset(spec.name for spec in self._jobs.values() if spec.cancellable)

    def __iter__(self) -> Iterator[JobSpec]:
        return iter(sorted(self._jobs.values(), key=lambda s: s.name))

    def __contains__(self, name: object) -> bool:
        return name in self._jobs


JOBS = Registry()


def default_registry(settings: Settings) -> Registry:
    """The registry with the jobs of every configured service loaded. A service
    whose jobs cannot be imported is noted in ``unavailable``; the others work."""
    for spec in load_specs(settings.engine.services):
        if spec.jobs is None or spec.name in JOBS.unavailable:
            continue
        try:
            load_part(spec, spec.jobs)
        except DewError as exc:
            JOBS.unavailable[spec.name] = exc
    return JOBS
