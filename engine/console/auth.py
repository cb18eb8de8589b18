"""Signing in and out of the console.

``GET /console/sign-in`` shows the form with a fresh CSRF token (also set in a
cookie of its own: before a session exists, the form and the cookie must agree).
``POST /console/sign-in`` checks that token, then the user name and password
with :meth:`engine.iam.service.Identities.sign_in`: one message, "Wrong user
name or password.", whatever was wrong; a name that had ``[console]
lockout_after`` wrong passwords in a row waits before it may try again. A right
one opens a server-side session (:mod:`engine.console.sessions`) and goes to the
page asked for. ``POST /console/sign-out`` (CSRF-checked like every form) ends
the session in the store: the cookie no longer opens anything, in any process.
"""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from engine.console import csrf
from engine.console.sessions import COOKIE, clear_cookie, new_token, set_cookie
from engine.console.web import NOTES, ROOT, SECURITY_HEADERS, Console, Page, read_form
from engine.errors import DewError, InvalidInput, Throttled
from engine.logs import get_logger

MAX_NAME = 64
MAX_PASSWORD = 1024

log = get_logger("dew.console")


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if not target or not target.startswith(ROOT + "/") or target.startswith("//") \
            or "\\" in target or any(ord(c) < 32 for c in target):
        return ROOT + "/"
    if target.startswith(f"{ROOT}/sign-"):
        return ROOT + "/"
    return target


def sign_in_form(console: Console, request: Request, status: int = 200,
                 message: str | None = None, name: str = "") -> Response:
    token = new_token()
    note = NOTES.get(request.query_params.get("note", ""))
    response = console.html("sign_in.html", status, request, page=None, title="Sign in",
                            csrf_token=token,
                            message=message, note=note, name=name,
                            next=safe_next(request.query_params.get("next")))
    response.headers["Set-Cookie"] = set_cookie(csrf.SIGN_IN_COOKIE, token,
                                                csrf.SIGN_IN_COOKIE_AGE)
    return response


def routes_of(console: Console) -> list[tuple[str, object, list[str]]]:
    async def show(request: Request) -> Response:
        return sign_in_form(console, request)

    async def sign_in(request: Request) -> Response:
        request_id = uuid.uuid4().hex
        try:
            form = await read_form(request, console.settings.api.max_body)
            csrf.check(request.cookies.get(csrf.SIGN_IN_COOKIE), form.get(csrf.FIELD))
            name = form.get("user", "").strip()[:MAX_NAME]
            password = form.get("password", "")
            if not name or not password or len(password) > MAX_PASSWORD:
                raise InvalidInput("Give your user name and password.")
            identities = await console.identities()
            try:
                signed = await identities.sign_in(name, password)
                session = await (await console.sessions()).open(signed)
            except Throttled as exc:
                return sign_in_form(console, request, 429, exc.message, name)
            except DewError as exc:
                if exc.code != "sign_in_refused":
                    raise
                return sign_in_form(console, request, 401, exc.message, name)
        except InvalidInput as exc:
            return sign_in_form(console, request, 400, exc.message)
        except Exception as exc:  # noqa: BLE001 - a page in the console's style, logged there
            return console.error_page(request, exc, request_id)
        response = RedirectResponse(safe_next(form.get("next")), status_code=303,
                                    headers=SECURITY_HEADERS)
        response.headers.append("Set-Cookie", set_cookie(COOKIE, session.token))
        response.headers.append("Set-Cookie", clear_cookie(csrf.SIGN_IN_COOKIE))
        return response

    async def sign_out(page: Page) -> Response:
        await (await page.console.sessions()).end(page.session.token)
        log.info("console signed out", user=page.caller.principal.user)
        response = RedirectResponse(f"{ROOT}/sign-in?note=signed-out", status_code=303,
                                    headers=SECURITY_HEADERS)
        response.headers["Set-Cookie"] = clear_cookie(COOKIE)
        return response

    return [
        ("/sign-in", show, ["GET"]),
        ("/sign-in", sign_in, ["POST"]),
        ("/sign-out", console.page(sign_out), ["POST"]),
    ]
