"""The one mapping from engine errors to HTTP replies (status, error code, message).

Every error reply has the shape the official SDKs read (HUAWEI_API.md §4):
``{"error_code": "KMS.0404", "error_msg": "...", "request_id": "..."}`` and an
``X-Request-Id`` header. ``error_code`` is ``<PREFIX>.<4 digits>``, PREFIX the
operation's service (``ERROR_PREFIX`` of its ``api`` module), or ``APIGW`` before
an operation is known (unknown path, wrong method) and for every authentication
failure (``APIGW.0301``, as the hosted service answers). A 500 never carries the
exception's text: only "internal error, request id <id>"; the traceback goes to
the server log. The table is in docs/api.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import (
    AuthenticationFailed,
    BackendUnavailable,
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

GATEWAY = "APIGW"


class BodyTooLarge(InvalidInput):
    """A request body over ``[api] max_body`` (HTTP 413); refused before it is read whole."""

    code = "body_too_large"


class UnknownPath(NotFound):
    """No operation has this path (HTTP 404, ``APIGW.0404``)."""

    code = "unknown_path"


class MethodNotAllowed(InvalidInput):
    """The path exists, not with this method (HTTP 405, ``APIGW.0405``)."""

    code = "method_not_allowed"

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed


@dataclass(frozen=True)
class Mapping:
    status: int
    suffix: str  # the four digits after "<PREFIX>."
    prefix: str | None = None  # a fixed prefix (APIGW) instead of the service's


INTERNAL = Mapping(500, "0500")  # InternalError and every unexpected exception
# First match wins: subclasses before their bases.
TABLE: tuple[tuple[type[DewError], Mapping], ...] = (
    (AuthenticationFailed, Mapping(401, "0301", GATEWAY)),
    (UnknownPath, Mapping(404, "0404", GATEWAY)),
    (MethodNotAllowed, Mapping(405, "0405", GATEWAY)),
    (BodyTooLarge, Mapping(413, "0413")),
    (PermissionDenied, Mapping(403, "0403")),
    (NotFound, Mapping(404, "0404")),
    (Conflict, Mapping(409, "0409")),
    (InvalidInput, Mapping(400, "0400")),  # ConfigError, UnknownJob too
    (InternalError, INTERNAL),
    (SecurityError, Mapping(400, "0410")),  # integrity / decryption checks on the input
    (PermanentError, Mapping(400, "0420")),  # any other refusal retrying cannot fix
    (Throttled, Mapping(429, "0429")),
    (BackendUnavailable, Mapping(503, "0503")),
    (TransientError, Mapping(503, "0530")),  # retry later (a lease held, a busy key)
)


def mapping_of(error: BaseException) -> Mapping:
    if isinstance(error, DewError):
        for kind, mapping in TABLE:
            if isinstance(error, kind):
                return mapping
    return INTERNAL


@dataclass(frozen=True)
class ErrorReply:
    status: int
    body: dict[str, str]
    headers: dict[str, str]


def error_reply(error: BaseException, prefix: str | None, request_id: str) -> ErrorReply:
    """The reply for ``error`` raised while serving an operation of service ``prefix``
    (None before the operation is known)."""
    mapping = mapping_of(error)
    code = f"{mapping.prefix or prefix or GATEWAY}.{mapping.suffix}"
    if mapping is INTERNAL or not isinstance(error, DewError):
        message = f"internal error, request id {request_id}"
    else:
        message = error.message
    headers: dict[str, str] = {}
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = ", ".join(error.allowed)
    if isinstance(error, BodyTooLarge):
        headers["Connection"] = "close"  # the rest of the body is never read
    if mapping.status in (429, 503):
        headers["Retry-After"] = str(getattr(error, "retry_after", 1))
    return ErrorReply(mapping.status,
                      {"error_code": code, "error_msg": message, "request_id": request_id},
                      headers)
