"""What a service declares for the API: its operations, and what a handler gets.

A service's ``api`` module lists :class:`Operation` values (the SDK's name, the
method and path, the action a role must allow, the rate-limit bucket and an
async handler). The server authenticates, checks ``action``, rate-limits and
parses the body before the handler runs; the handler gets a :class:`Call`,
calls the same service functions the CLI calls, and returns the JSON body (or a
:class:`Reply` for another status or extra headers). Errors are raised as
``engine.errors`` classes; the server maps them to status and error code in one
place (``engine.api.errors``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from engine.api.principal import Principal

if TYPE_CHECKING:
    from engine.models import TaskRecord
    from engine.resources import Resources
    from engine.settings import Settings

# Rate-limit buckets: key management calls and cryptographic calls are limited apart.
MANAGE = "manage"
CRYPTO = "crypto"


class JobRunner(Protocol):
    async def enqueue(self, name: str, args: dict[str, Any],
                      task_id: str | None = None) -> TaskRecord:
        """Enqueue ``name`` through the signed, sealed path; the task at once."""
        ...

    async def run(self, name: str, args: dict[str, Any]) -> TaskRecord:
        """Enqueue ``name`` through the signed, sealed path and wait for it (at most
        ``[api] job_wait`` seconds); the final task, or TransientError on timeout."""
        ...


@dataclass
class Call:
    """One authenticated request, as a handler sees it."""

    principal: Principal
    body: Any  # the parsed JSON body (dict or list), None when there is none
    params: Mapping[str, str]  # path parameters, percent-decoded
    query: Mapping[str, str]
    request_id: str
    settings: Settings
    resources: Resources  # this process's resources: "kms", "crypto", ...
    jobs: JobRunner
    # Response headers a handler adds (``X-Dew-Task-Id``); merged into the reply.
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def account(self) -> str:
        """The services' account of this call: the caller's project name."""
        return self.principal.project


@dataclass
class Reply:
    """A handler's answer when it is not a plain 200 with a JSON body."""

    body: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class Operation:
    """One API operation.

    ``path`` is the full template as the SDK sends it, with Starlette-style
    parameters (``/v1.0/{project_id}/kms/{key_id}/tags``); ``{project_id}`` must
    be the caller's project. ``action`` is checked against the caller's roles
    before the handler runs; None means the handler checks itself (KMS grants).
    """

    name: str
    method: str
    path: str
    handler: Handler
    action: str | None
    limit: str = MANAGE


def authorize(principal: Principal, operation: Operation) -> None:
    """The permission check of an operation, before its handler runs: the one check
    the API's dispatcher and the console both make. PermissionDenied (403) naming the
    action unless one of the caller's roles allows it; an operation whose ``action``
    is None checks inside its handler (KMS grants, the job-named enqueue action)."""
    if operation.action is not None:
        principal.require(operation.action)


def permitted(principal: Principal, operation: Operation) -> bool:
    """Whether :func:`authorize` lets ``principal`` call ``operation`` (what the
    console asks before it shows a button; the handler may still refuse)."""
    return operation.action is None or principal.allows(operation.action)
