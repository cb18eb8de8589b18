"""The one error hierarchy of dew-engine.

Errors are data: every error carries a stable ``code``, a ``category``, the
user-facing ``message``, the ``cause`` and the ``fix`` to show, and whether a
retry can help (``retryable``). The worker decides retries from ``retryable``
alone, the CLI decides its exit code from the class alone (``exit_code``, the
table of docs/cli.md), and failure records are written from the same fields.

    DewError                        (code, category, message, cause, fix, retryable)
    ├── PermanentError              retryable=False: fails at once, never retried
    │   ├── InvalidInput            bad arguments; CLI exit 2; nothing was changed
    │   │   ├── UnknownJob          a job name no handler is registered for
    │   │   └── ConfigError         an unreadable or invalid configuration
    │   ├── NotFound                no such task / failure record / key; CLI exit 2
    │   ├── Conflict                the target's state forbids the operation (a name
    │   │                           taken, a key disabled); CLI exit 1
    │   ├── SchemaTooNew            the database's schema is newer than this engine; exit 1
    │   ├── TaskCancelled           a running task stopped at a safe point on request
    │   ├── SecurityError           an integrity or identity check failed
    │   │   ├── AuthenticationFailed  an API caller's signature, key, date or IP was refused
    │   │   └── PermissionDenied      an identity lacks the action (names the action)
    │   └── InternalError           a bug: an exception nobody mapped
    └── TransientError              retryable=True: retried with backoff, then recorded
        ├── BackendUnavailable      Redis, the task store or the HSM cannot be reached
        └── Throttled               a project sent more requests than its rate limit

Exceptions of the libraries underneath (redis, arq, aiosqlite, python-pkcs11,
asyncssh, database drivers) are mapped to these in exactly one place per
adapter; nothing else catches them.
"""

from __future__ import annotations

# typing costs every `dew` start ~8 ms; annotations are strings here, so only mypy needs it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar


class DewError(Exception):
    """Base of every error the engine raises on purpose."""

    code: ClassVar[str] = "error"
    category: ClassVar[str] = "engine"
    retryable: ClassVar[bool] = False
    default_fix: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        cause: str = "",
        fix: str = "",
        code: str | None = None,
        category: str | None = None,
        target: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause
        self.fix = fix or self.default_fix
        self.target = target
        # Instances may refine the class defaults (e.g. one PermanentError class
        # serves several rows of the product's error table).
        if code is not None:
            self.code = code  # type: ignore[misc]
        if category is not None:
            self.category = category  # type: ignore[misc]

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape stored on a failed task and shown by ``--json``."""
        return {
            "code": self.code,
            "category": self.category,
            "message": self.message,
            "cause": self.cause,
            "fix": self.fix,
            "retryable": self.retryable,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DewError:
        """Rebuild an error stored by :meth:`to_dict`: the class whose code it carries
        (of those imported), else the general class of its category."""
        base = _class_of(str(data.get("code", "")), str(data.get("category", "")),
                         bool(data.get("retryable")))
        return base(
            str(data.get("message", "")),
            cause=str(data.get("cause", "")),
            fix=str(data.get("fix", "")),
            code=str(data.get("code", base.code)),
            category=str(data.get("category", base.category)),
        )


class PermanentError(DewError):
    """Retrying cannot help: the job fails at once with a failure record."""

    code = "permanent_error"


class InvalidInput(PermanentError):
    """The caller sent something we cannot accept. Nothing was changed."""

    code = "invalid_parameter"
    category = "parameters"
    default_fix = "Check the call."


class UnknownJob(InvalidInput):
    code = "unknown_job"
    default_fix = "Run `dew jobs` to list the job names this engine knows."


class ConfigError(InvalidInput):
    code = "invalid_config"
    category = "config"
    default_fix = "Fix the configuration file or the DEW_* environment variable named."


class NotFound(PermanentError):
    code = "not_found"
    category = "parameters"
    default_fix = "Check the identifier."


class Conflict(PermanentError):
    code = "conflict"
    category = "state"


class SchemaTooNew(PermanentError):
    """The database was upgraded by a newer dew-engine; this one changes nothing in it."""

    code = "schema_too_new"
    category = "config"
    default_fix = "Upgrade dew-engine on this node."


class TaskCancelled(PermanentError):
    """A running task stopped at a safe point of its handler because someone asked
    (``dew tasks cancel``): the task ends ``cancelled``, never retried. ``result``
    says what it did before it stopped (a batch: which targets were done)."""

    code = "cancelled"
    category = "state"

    def __init__(self, message: str, *, result: Any = None, cause: str = "", fix: str = "",
                 code: str | None = None, category: str | None = None,
                 target: str | None = None) -> None:
        super().__init__(message, cause=cause, fix=fix, code=code, category=category,
                         target=target)
        self.result = result


class SecurityError(PermanentError):
    code = "security"
    category = "security"


class AuthenticationFailed(SecurityError):
    """An API request whose caller could not be authenticated (HTTP 401).

    The message says which check failed, never whether an access key exists."""

    code = "authentication_failed"
    default_fix = "Check the access key, secret key, clock and source address."


class PermissionDenied(SecurityError):
    """The caller is authenticated but none of its roles allows the action (HTTP 403)."""

    code = "permission_denied"
    default_fix = "Ask an administrator for a role with this action (dew iam set-roles)."


class InternalError(PermanentError):
    code = "internal_error"
    category = "internal"
    default_fix = "Report this with the task id; the worker log holds the traceback."


class TransientError(DewError):
    """Retrying may help: the worker retries with backoff, then records a failure."""

    code = "transient_error"
    retryable = True


class BackendUnavailable(TransientError):
    code = "backend_unavailable"
    category = "backend"
    default_fix = "Start the service named (for the local stack: `make up`) and retry."


class Throttled(TransientError):
    """A project's request rate is over its limit (HTTP 429); retry after a pause."""

    code = "throttled"
    category = "limits"
    default_fix = "Slow down and retry; the limits are [api] rate_* in the configuration."


# The exit codes of `dew` (docs/cli.md, "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1  # the operation failed or its target's state refused it; maybe it changed
EXIT_BAD_INPUT = 2  # bad input or an unknown object: nothing was changed
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


def exit_code(error: DewError) -> int:
    """The one mapping of errors to `dew` exit codes, by class alone: 2 for bad
    input (InvalidInput, so also ConfigError and UnknownJob) and unknown objects
    (NotFound); 1 for everything else (Conflict and its subclasses such as a name
    already taken, a security refusal, a failed task, a backend down). A subclass
    cannot choose otherwise: an ``exit_code`` attribute on it is not read."""
    return EXIT_BAD_INPUT if isinstance(error, InvalidInput | NotFound) else EXIT_FAILED


def _subclasses(kind: type[DewError]) -> list[type[DewError]]:
    found = []
    for sub in kind.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


_BY_CATEGORY: dict[str, type[DewError]] = {
    "parameters": InvalidInput, "config": ConfigError, "state": Conflict,
    "security": SecurityError, "internal": InternalError, "backend": BackendUnavailable,
    "limits": Throttled,
}


def _class_of(code: str, category: str, retryable: bool) -> type[DewError]:
    for kind in _subclasses(DewError):
        if kind.code == code and kind.retryable == retryable:
            return kind
    if code == NotFound.code or code.endswith("_" + NotFound.code):
        return NotFound
    general = _BY_CATEGORY.get(category)
    if general is not None and general.retryable == retryable:
        return general
    return TransientError if retryable else PermanentError
