"""The API application: Starlette around one dispatcher of the services' operations.

For every request the dispatcher, in this order:

1. gives it an ``X-Request-Id`` (uuid4 hex), on every reply and in the log line;
2. finds the operation from the method and the **raw** path (404 / 405);
3. refuses a body over ``[api] max_body`` from its Content-Length, or as soon as
   the streamed bytes pass it, before it is read whole (413);
4. authenticates: ``SDK-HMAC-SHA256`` signature, X-Sdk-Date within
   ``[api] clock_skew``, the access key active, the source address within the
   user's networks (401, ``APIGW.0301``);
5. checks that ``{project_id}`` (and X-Project-Id) is the caller's project (403);
6. checks the operation's action against the caller's roles (403);
7. counts the call against its project's rate (429);
8. parses the JSON body (400 naming ``body``) and runs the handler.

Steps 6-8 are :func:`invoke`, which the web console (``/console``, engine/console)
calls too for a signed-in user: one permission check, not two.

The dispatcher is a plain ASGI app (Starlette's router would route on the
decoded path, and the signature covers the raw one); Starlette runs the
lifespan (resources, the job client, the limiter) and any ``extra_routes``.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from engine.api import signing
from engine.api.errors import BodyTooLarge, MethodNotAllowed, UnknownPath, error_reply
from engine.api.jobs import TASK_HEADER, JobPending, ProcessJobs
from engine.api.operations import Call, Operation, Reply, authorize
from engine.api.principal import Principal
from engine.api.ratelimit import RateLimits
from engine.api.routing import Router
from engine.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    DewError,
    InvalidInput,
    NotFound,
    PermissionDenied,
)
from engine.logs import get_logger
from engine.resources import Resources
from engine.services import load_part, load_specs
from engine.settings import Settings

# The module that registers the ``identities`` resource (engine/iam); imported at start.
IDENTITIES_MODULE = "engine.iam.service"
JSON_TYPE = b"application/json;charset=UTF-8"

log = get_logger("dew.api")


@dataclass(frozen=True)
class ServiceApi:
    """One service's operations and its error-code prefix."""

    service: str
    prefix: str
    operations: Sequence[Operation]


def configured_apis(settings: Settings) -> list[ServiceApi]:
    """The ``api`` modules of the configured services. One that cannot be imported
    is left out with a warning; the others are served."""
    out = []
    for spec in load_specs(settings.engine.services):
        if spec.api is None:
            continue
        try:
            module = load_part(spec, spec.api)
            operations = list(module.operations())
        except DewError as exc:
            log.warning("service API not served", service=spec.name, error=exc.message)
            continue
        prefix = str(getattr(module, "ERROR_PREFIX", spec.name.upper()))
        out.append(ServiceApi(spec.name, prefix, operations))
    return out


def build_router(apis: Iterable[ServiceApi]) -> Router:
    router = Router()
    for api in apis:
        router.add_all(api.operations, api.prefix, api.service)
    return router


class ClientGone(Exception):
    """The client hung up before its body arrived: nothing to answer."""


@dataclass
class ApiState:
    """What one API process holds while it serves: opened by the lifespan."""

    settings: Settings
    router: Router
    resources: Resources | None = None
    limits: RateLimits | None = None
    jobs: ProcessJobs | None = None
    own_resources: bool = True
    own_limits: bool = True
    ready: bool = False
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def open(self) -> None:
        if self.resources is None:
            self.resources = Resources(self.settings)
            self.own_resources = True
        self.jobs = await ProcessJobs.open(self.settings, self.resources)
        self.ready = True
        log.info("api ready", operations=len(self.router),
                 services=sorted({r.service for r in self.router}))

    async def close(self) -> None:
        self.ready = False
        if self.jobs is not None:
            await self.jobs.close()
        if self.limits is not None and self.own_limits:
            await self.limits.close()
        if self.resources is not None and self.own_resources:
            await self.resources.close()  # the KMS seals its last audit batch here


def _import_identities() -> None:
    try:
        importlib.import_module(IDENTITIES_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name is None or not IDENTITIES_MODULE.startswith(exc.name):
            raise
        log.warning("no identity store: every call will be refused",
                    module=IDENTITIES_MODULE)


async def invoke(state: ApiState, operation: Operation, principal: Principal, *, body: bytes,
                 params: Mapping[str, str], query: Mapping[str, str], request_id: str,
                 headers: dict[str, str]) -> Any:
    """One operation for an authenticated ``principal``, as the API runs it: the
    permission check (:func:`~engine.api.operations.authorize`), the project's rate,
    the JSON body parsed, then the handler with its :class:`Call`. The dispatcher
    calls it for a signed request and the console for a signed-in user, so both do
    exactly the same thing. ``headers`` collects what the reply adds (the task id)."""
    authorize(principal, operation)
    assert state.limits is not None and state.jobs is not None and state.resources is not None
    await state.limits.check(principal.project_id, operation.limit)
    call = Call(
        principal=principal, body=_json_body(body), params=params, query=query,
        request_id=request_id, settings=state.settings, resources=state.resources,
        jobs=state.jobs.for_call(principal, headers), headers=headers,
    )
    return await operation.handler(call)


# --- one request ----------------------------------------------------------------------


@dataclass
class Outcome:
    """What the log line of one request tells."""

    status: int = 500
    operation: str = ""
    project: str = ""
    user: str = ""
    access_key: str = ""


class Dispatcher:
    """The ASGI app that serves every operation (see the module's docstring)."""

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self.settings = state.settings
        self.max_body = state.settings.api.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        outcome = Outcome()
        raw_path = _raw_path(scope)
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self._serve(scope, receive, send, request_id, raw_path, outcome)
            except ClientGone:
                outcome.status = 499
            log.info("api request", method=scope["method"], path=raw_path,
                     status=outcome.status, op=outcome.operation or None,
                     project=outcome.project or None, user=outcome.user or None,
                     access_key=outcome.access_key or None,
                     duration_ms=round((time.perf_counter() - started) * 1000, 2))

    async def _serve(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                     raw_path: str, outcome: Outcome) -> None:
        method = scope["method"]
        prefix: str | None = None
        extra: dict[str, str] = {}
        try:
            route, found = self.state.router.resolve(method, raw_path)
            if route is None:
                assert isinstance(found, tuple)
                if found:
                    raise MethodNotAllowed(
                        f"{method} is not allowed on {raw_path[:200]}; allowed: "
                        f"{', '.join(found)}", found)
                raise UnknownPath(f"no API operation at {raw_path[:200]}")
            assert isinstance(found, dict)
            params = found
            prefix = route.prefix
            outcome.operation = route.operation.name
            if not self.state.ready or self.state.resources is None:
                raise BackendUnavailable("the API is starting or stopping")
            headers, repeated = _headers(scope)
            body = await self._body(headers, receive)
            raw_query = scope.get("query_string", b"").decode("latin-1")
            principal = await self._authenticate(
                signing.SignedRequest(method, raw_path, raw_query, headers, body),
                repeated, _source_ip(scope), outcome)
            self._check_project(principal, params, headers)
            result = await invoke(self.state, route.operation, principal, body=body,
                                  params=params, query=dict(signing.query_pairs(raw_query)),
                                  request_id=request_id, headers=extra)
            await self._reply(send, result, extra, request_id, outcome)
        except ClientGone:
            raise
        except JobPending as pending:
            extra[TASK_HEADER] = pending.task.task_id
            await self._reply(send, Reply({"task_id": pending.task.task_id,
                                           "task_status": pending.task.status}, 202),
                              extra, request_id, outcome)
        except Exception as exc:  # every error becomes the error shape (logged below)
            reply = error_reply(exc, prefix, request_id)
            if reply.status == 500:
                log.exception("api call failed", op=outcome.operation or None)
            elif reply.status >= 500:
                log.warning("api call failed", op=outcome.operation or None,
                            error=str(exc), code=getattr(exc, "code", None))
            if TASK_HEADER in extra:
                reply.headers[TASK_HEADER] = extra[TASK_HEADER]
            await _send(send, reply.status, _dumps(reply.body), reply.headers, request_id)
            outcome.status = reply.status

    async def _body(self, headers: dict[str, str], receive: Receive) -> bytes:
        """The whole body, refused (413) once it passes ``max_body``: from its
        Content-Length before a byte is read, else while it streams in."""
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise InvalidInput("Content-Length is not a number")
            if int(declared) > self.max_body:
                raise BodyTooLarge(f"the request body ({int(declared)} bytes) is over the "
                                   f"{self.max_body}-byte limit")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLarge(f"the request body is over the {self.max_body}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _authenticate(self, request: signing.SignedRequest, repeated: set[str],
                            source_ip: str, outcome: Outcome) -> Principal:
        auth = signing.parse_authorization(request.headers.get("authorization"))
        outcome.access_key = auth.access_key[:64]
        signing.check_date(request.headers.get(signing.DATE_HEADER), datetime.now(UTC),
                           self.settings.api.clock_skew)
        for name in auth.signed_headers:
            if name in repeated:
                raise signing.refused(f"the signed header {name} is sent more than once")
        caller = await self._caller(auth.access_key)
        signing.verify(request, auth, caller.secret_key)
        principal: Principal = caller.principal(source_ip)  # 401 "current ip:X refused"
        outcome.project, outcome.user = principal.project, principal.user
        return principal

    async def _caller(self, access_key: str) -> Any:
        """The identity store's Caller for ``access_key``: one message for an
        unknown key and an inactive one (or a disabled user)."""
        assert self.state.resources is not None
        try:
            identities = await self.state.resources.get("identities")
        except LookupError:
            raise BackendUnavailable("no identity store is configured (engine.iam)") from None
        try:
            caller = await identities.caller(access_key)
        except (NotFound, AuthenticationFailed) as exc:
            # e.g. an SK that no longer opens: the operator hears why, the caller does not.
            log.warning("access key refused by the identity store", access_key=access_key[:64],
                        error=exc.message)
            caller = None
        if caller is None or not caller.active:
            raise signing.refused("unknown or inactive access key")
        return caller

    def _check_project(self, principal: Principal, params: dict[str, str],
                       headers: dict[str, str]) -> None:
        for sent in (params.get("project_id"), headers.get("x-project-id")):
            if sent is None or sent == principal.project_id:
                continue
            if sent in ("{project_id}", ""):
                raise PermissionDenied(
                    "the request names no project: give the SDK's BasicCredentials the "
                    "project_id", code="project_mismatch")
            raise PermissionDenied(f"project {sent[:64]} is not the caller's project",
                                   code="project_mismatch", target=sent[:64])

    async def _reply(self, send: Send, result: Any, headers: dict[str, str], request_id: str,
                     outcome: Outcome) -> None:
        status, body = 200, result
        if isinstance(result, Reply):
            status, body = result.status, result.body
            headers = {**headers, **result.headers}
        data = b"" if status == 204 else _dumps({} if body is None else body)
        await _send(send, status, data, headers, request_id)
        outcome.status = status


def _raw_path(scope: Scope) -> str:
    raw = scope.get("raw_path")
    if raw:
        text: str = raw.decode("latin-1")
        return text.partition("?")[0]
    path: str = scope["path"]
    return path


def _headers(scope: Scope) -> tuple[dict[str, str], set[str]]:
    """Header values as UTF-8 text (the SDK sends UTF-8 bytes); names seen twice."""
    headers: dict[str, str] = {}
    repeated: set[str] = set()
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("utf-8", errors="replace")
        if name in headers:
            repeated.add(name)
            continue
        headers[name] = value
    return headers, repeated


def _source_ip(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "unknown"
    host = str(client[0])
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _json_body(body: bytes) -> Any:
    if not body.strip():
        return None
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidInput("body: is not UTF-8 text", code="invalid_parameter",
                           target="body") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"body: is not valid JSON ({exc.msg} at line {exc.lineno} column "
                           f"{exc.colno})", code="invalid_parameter", target="body") from None
    except RecursionError:
        raise InvalidInput("body: nests too deeply", code="invalid_parameter",
                           target="body") from None


def _dumps(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def _send(send: Send, status: int, body: bytes, headers: dict[str, str],
                request_id: str) -> None:
    raw: list[tuple[bytes, bytes]] = [(b"x-request-id", request_id.encode())]
    given = [(name.lower().encode("latin-1"), value.encode("latin-1", errors="replace"))
             for name, value in headers.items()
             if name.lower() not in ("x-request-id", "content-length")]
    if status != 204:
        if not any(name == b"content-type" for name, _ in given):
            raw.append((b"content-type", JSON_TYPE))
        raw.append((b"content-length", str(len(body)).encode()))
    raw.extend(given)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body if status != 204 else b""})


# --- the application ------------------------------------------------------------------


def build_app(
    settings: Settings,
    *,
    apis: Sequence[ServiceApi] | None = None,
    resources: Resources | None = None,
    close_resources: bool | None = None,
    limits: RateLimits | None = None,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The API as an ASGI app, for uvicorn (``dew api``) or a test server.

    - ``apis``: the operations to serve (default: the configured services' ``api``
      modules, loaded now, so a bad declaration fails before the server starts);
    - ``resources``: this process's resources (default: new ones, closed at
      shutdown; given ones, e.g. a test's with ``identities`` put in, are closed at
      shutdown only with ``close_resources=True``);
    - ``limits``: the rate limiter (default: on the engine's Redis);
    - ``extra_routes``: plain Starlette routes served first, beside the operations,
      without authentication (e.g. :func:`bare_echo_route` for benchmarks).

    The web console is mounted at ``/console`` unless ``[console] enabled`` is false.
    """
    from engine.registry import default_registry

    router = build_router(configured_apis(settings) if apis is None else apis)
    _import_identities()
    # The services' jobs modules register their jobs and resources (kms, csms...).
    default_registry(settings)
    state = ApiState(settings, router, resources=resources,
                     limits=RateLimits(settings) if limits is None else limits,
                     own_resources=resources is None if close_resources is None
                     else close_resources, own_limits=limits is None)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.open()
        try:
            yield
        finally:
            await state.close()

    routes = list(extra_routes)
    if settings.console.enabled:
        from engine.console.app import console_mount, root_redirect

        routes += [root_redirect(), console_mount(state)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False
    app.router.default = Dispatcher(state)
    app.state.api = state
    return app


def bare_echo_route(path: str = "/bench/echo") -> Route:
    """POST ``path``: the JSON body back, with none of the API's checks: a baseline
    for measuring what authentication, limits and the dispatcher cost."""

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(await request.json())

    return Route(path, echo, methods=["POST"])

