"""The console's request plumbing: the signed-in session, forms, CSRF, error pages.

Every console page is an ``async def page(p: Page) -> Response`` wrapped by
:meth:`Console.page`, which, in this order: finds the session from its cookie
(none: to the sign-in page), builds the user's Principal anew from the identity
store (a disabled user or a changed role applies now), and for a POST parses the
form and checks its CSRF token (403 page before anything else). Errors become
pages in the console's style: 403 for a refused action, 404, 400 naming the bad
value, 409, 429 and 503; an unexpected one is logged and shows only the request
id. Every reply carries a strict Content-Security-Policy (no script at all) and
``Cache-Control: no-store``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from engine.api.app import ApiState
from engine.api.errors import mapping_of
from engine.api.operations import Operation
from engine.console import csrf
from engine.console.ops import VIA, Caller, NotServed, operations_by_name
from engine.console.render import environment
from engine.console.sessions import COOKIE, Session, Sessions, clear_cookie
from engine.errors import (
    BackendUnavailable,
    Conflict,
    DewError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Throttled,
)
from engine.logs import get_logger

ROOT = "/console"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# The areas of the navigation bar: (path, title, the operation that lists them).
AREAS = (
    ("/failures", "Failed tasks", "ListFailures"),
    ("/tasks", "Tasks", "ListTasks"),
    ("/keys", "Keys", "ListKeys"),
    ("/secrets", "Secrets", "ListSecrets"),
    ("/keypairs", "Key pairs", "ListKeypairs"),
    ("/schedules", "Schedules", "ListSchedules"),
    ("/audit", "Audit", "DewListAudit"),
)
# What a POST that redirects may say on the next page (a code, never free text).
NOTES = {
    "deleted": "Deleted.",
    "deleted-all": "The failure records were deleted.",
    "retried": "Retried: a new task runs the job again.",
    "enabled": "The key is enabled.",
    "disabled": "The key is disabled.",
    "deletion-scheduled": "The key's deletion is scheduled.",
    "deletion-cancelled": "The key's deletion is cancelled.",
    "paused": "The schedule is paused.",
    "resumed": "The schedule is resumed.",
    "ran": "The schedule's job was enqueued now.",
    "unbinding": "The unbind runs as a task.",
    "signed-out": "You are signed out.",
    "expired": "Your session is over: sign in again.",
}

log = get_logger("dew.console")

Handler = Callable[["Page"], Awaitable[Response]]


class ConsoleUnavailable(BackendUnavailable):
    code = "console_unavailable"


def _not_found(what: str) -> NotFound:
    return NotFound(f"There is no console page at {what[:200]}.", code="no_such_page")


@dataclass
class Page:
    """One signed-in request, as a page handler sees it."""

    request: Request
    console: Console
    session: Session
    caller: Caller
    form: Mapping[str, str] = field(default_factory=dict)

    @property
    def query(self) -> Mapping[str, str]:
        return self.request.query_params

    def param(self, name: str) -> str:
        return str(self.request.path_params[name])

    def render(self, template: str, status: int = 200, **context: Any) -> Response:
        return self.console.html(template, status, self.request, page=self, **context)

    def redirect(self, path: str, note: str | None = None, **query: str) -> Response:
        if note is not None:
            query["note"] = note
        target = ROOT + path + (f"?{urlencode(query)}" if query else "")
        return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)

    @property
    def note(self) -> str | None:
        return NOTES.get(self.query.get("note", ""))

    @property
    def areas(self) -> list[tuple[str, str]]:
        return [(ROOT + path, title) for path, title, op in AREAS if self.caller.may(op)]


class Console:
    """What every console request shares: the API's state, the templates."""

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self.settings = state.settings
        self.env = environment()
        self._operations: dict[str, Operation] | None = None

    @property
    def operations(self) -> dict[str, Operation]:
        if self._operations is None:
            self._operations = operations_by_name(self.state)
        return self._operations

    async def identities(self) -> Any:
        """The identity store (engine.iam's Identities): the console needs its users'
        passwords and sessions, which a stand-in identity resource does not have."""
        if not self.state.ready or self.state.resources is None:
            raise ConsoleUnavailable("the API is starting or stopping")
        try:
            identities = await self.state.resources.get("identities")
        except LookupError:
            raise ConsoleUnavailable("no identity store is configured (engine.iam)") from None
        if not hasattr(identities, "sign_in"):
            raise ConsoleUnavailable("this identity store has no console users")
        return identities

    async def sessions(self) -> Sessions:
        return Sessions((await self.identities()).store, self.settings.console.idle_minutes)

    def html(self, template: str, status: int, request: Request, **context: Any) -> Response:
        body = self.env.get_template(template).render(root=ROOT, request=request, **context)
        return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)

    def error_page(self, request: Request, exc: BaseException, request_id: str,
                   page: Page | None = None) -> Response:
        status = _status_of(exc)
        if status == 500:
            log.error("console page failed", path=request.url.path, request_id=request_id,
                      error=repr(exc))
        if status == 500 or not isinstance(exc, DewError):
            message, fix = f"Something went wrong (request id {request_id}).", ""
        else:
            message, fix = exc.message, exc.fix
        response = self.html("error.html", status, request, page=page,
                             title=f"{status} · {TITLES.get(status, 'Error')}", message=message,
                             fix=fix)
        if isinstance(exc, Throttled):
            response.headers["Retry-After"] = str(getattr(exc, "retry_after", 1))
        return response

    def page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """The endpoint of a signed-in page (see the module's docstring)."""

        async def endpoint(request: Request) -> Response:
            request_id = uuid.uuid4().hex
            started = time.perf_counter()
            user, calls = "", list[str]()
            page: Page | None = None
            with structlog.contextvars.bound_contextvars(request_id=request_id):
                try:
                    found = await self._page(request, request_id)
                    if isinstance(found, Response):
                        response = found
                    else:
                        page = found
                        user, calls = page.caller.principal.user, page.caller.calls
                        response = await handler(page)
                except Exception as exc:  # every error is a page in the console's style
                    if _status_of(exc) == 500:
                        log.exception("console page failed", path=request.url.path)
                    response = self.error_page(request, exc, request_id, page)
                status = response.status_code
                response.headers["X-Request-Id"] = request_id
                log.info("console request", method=request.method, path=request.url.path,
                         status=status, user=user or None, ops=calls or None,
                         duration_ms=round((time.perf_counter() - started) * 1000, 2))
            return response

        return endpoint

    async def _page(self, request: Request, request_id: str) -> Page | Response:
        sessions = await self.sessions()
        token = request.cookies.get(COOKIE)
        session = await sessions.find(token)
        if session is None:
            return self.to_sign_in(request, expired=token is not None)
        identities = await self.identities()
        principal = await identities.principal_for(session.user_id, source_ip(request), VIA)
        if principal is None:  # disabled, gone, or calling from outside its networks
            await sessions.end(session.token)
            return self.to_sign_in(request, expired=True)
        form: dict[str, str] = {}
        if request.method == "POST":
            form = await read_form(request, self.settings.api.max_body)
            csrf.check(session.csrf, form.get(csrf.FIELD))
        caller = Caller(self.state, self.operations, principal, request_id)
        return Page(request, self, session, caller, form)

    def to_sign_in(self, request: Request, expired: bool) -> Response:
        query = {"next": request.url.path} if request.method == "GET" else {}
        if expired:
            query["note"] = "expired"
        target = f"{ROOT}/sign-in" + (f"?{urlencode(query)}" if query else "")
        response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
        if expired:
            response.headers["Set-Cookie"] = clear_cookie(COOKIE)
        return response


TITLES = {400: "Bad input", 403: "Not allowed", 404: "Not found", 409: "Not now",
          429: "Slow down", 500: "Error", 503: "Unavailable"}


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, NotServed):
        return 404
    if isinstance(exc, PermissionDenied | csrf.CsrfRefused):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, InvalidInput):
        return 400
    return mapping_of(exc).status


async def read_form(request: Request, limit: int) -> dict[str, str]:
    """A url-encoded form body (at most ``limit`` bytes); the last of a repeated field."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidInput(f"the form is over {limit} bytes", code="form_too_large")
        chunks.append(chunk)
    text = b"".join(chunks).decode("utf-8", "replace")
    return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=100))


def source_ip(request: Request) -> str:
    client = request.client
    host = client.host if client is not None else "unknown"
    return host.removeprefix("::ffff:")
