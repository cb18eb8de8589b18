"""The console's routes, mounted at ``/console`` by :func:`engine.api.app.build_app`.

Reading is plain GET pages (no JavaScript anywhere); every change is a POST form
carrying the session's CSRF token, answered with a redirect (303) to the page
that shows the outcome. An address under ``/console`` that is no page gets the
console's 404 page.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.types import Receive, Scope, Send

from engine.api.app import ApiState
from engine.console import auth
from engine.console.pages import audit, dashboard, failures, keypairs, keys, schedules, secrets
from engine.console.pages import tasks as task_pages
from engine.console.render import stylesheet
from engine.console.web import ROOT, SECURITY_HEADERS, Console, Handler, _not_found

GET, POST = ["GET"], ["POST"]


def page_routes(console: Console) -> list[tuple[str, Handler, list[str]]]:
    """Every signed-in page: (path under /console, handler, methods)."""
    return [
        ("/", dashboard.page, GET),
        ("/failures", failures.list_page, GET),
        ("/failures/delete-all", failures.confirm_delete_all, GET),
        ("/failures/delete-all", failures.delete_all, POST),
        ("/failures/{id}", failures.show_page, GET),
        ("/failures/{id}/delete", failures.delete, POST),
        ("/failures/{id}/retry", failures.retry, POST),
        ("/tasks", task_pages.list_page, GET),
        ("/tasks/{id}", task_pages.show_page, GET),
        ("/tasks/{id}/retry", task_pages.retry, POST),
        ("/keys", keys.list_page, GET),
        ("/keys/{id}", keys.show_page, GET),
        ("/keys/{id}/{action:action}", keys.change, POST),
        ("/secrets", secrets.list_page, GET),
        ("/secrets/{name}", secrets.show_page, GET),
        ("/secrets/{name}/reveal", secrets.reveal, POST),
        ("/keypairs", keypairs.list_page, GET),
        ("/keypairs/{name}", keypairs.show_page, GET),
        ("/keypairs/{name}/unbind", keypairs.unbind, POST),
        ("/schedules", schedules.list_page, GET),
        ("/schedules/{name}", schedules.show_page, GET),
        ("/schedules/{name}/{action:schedule_action}", schedules.change, POST),
        ("/audit", audit.list_page, GET),
        ("/audit/verify", audit.verify, POST),
    ]


def _register_convertors() -> None:
    """Path convertors that match only the actions a page has (anything else: 404)."""
    from starlette.convertors import Convertor, register_url_convertor

    def of(name: str, words: tuple[str, ...]) -> None:
        class Words(Convertor[str]):
            regex = "|".join(words)

            def convert(self, value: str) -> str:
                return value

            def to_string(self, value: str) -> str:
                return value

        register_url_convertor(name, Words())

    of("action", keys.ACTIONS)
    of("schedule_action", tuple(schedules.ACTIONS))


def console_mount(state: ApiState) -> Mount:
    _register_convertors()
    console = Console(state)
    routes: list[BaseRoute] = [Route("/static/console.css", _css(), methods=GET)]
    for path, endpoint, methods in auth.routes_of(console):
        routes.append(Route(path, endpoint, methods=methods))  # type: ignore[arg-type]
    for path, handler, methods in page_routes(console):
        routes.append(Route(path, console.page(handler), methods=methods))
    router = Router(routes=routes, default=_not_found_app(console))
    router.redirect_slashes = False
    return Mount(ROOT, app=router)


def root_redirect() -> Route:
    """``/console`` itself: to the dashboard (``/console/``)."""

    async def to_root(request: Request) -> Response:
        return RedirectResponse(ROOT + "/", status_code=307, headers=SECURITY_HEADERS)

    return Route(ROOT, to_root, methods=["GET", "POST"])


def _css() -> Callable[[Request], Awaitable[Response]]:
    body = stylesheet()

    async def css(request: Request) -> Response:
        return Response(body, media_type="text/css", headers={
            **SECURITY_HEADERS, "Cache-Control": "public, max-age=3600"})

    return css


def _not_found_app(console: Console) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = console.error_page(request, _not_found(request.url.path), uuid.uuid4().hex)
        await response(scope, receive, send)

    return not_found
