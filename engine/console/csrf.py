"""CSRF tokens: every console form carries one, every POST is checked first.

A signed-in user's forms carry the session's token (kept server-side with the
session). The sign-in form, before any session, carries a token that is also in
a short-lived cookie of its own (double submit). A POST whose token is missing
or wrong is refused with a 403 page before anything else happens.
"""

from __future__ import annotations

import hmac

from engine.errors import PermissionDenied

FIELD = "csrf"
SIGN_IN_COOKIE = "dew_console_sign_in"
SIGN_IN_COOKIE_AGE = 3600  # seconds a sign-in page stays usable


class CsrfRefused(PermissionDenied):
    code = "csrf_refused"

    def __init__(self) -> None:
        super().__init__(
            "This form was refused: it did not carry this session's security token.",
            fix="Go back, reload the page and send the form again.")


def matches(expected: str | None, given: str | None) -> bool:
    """Whether ``given`` is ``expected`` (in constant time); never for an empty one."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def check(expected: str | None, given: str | None) -> None:
    if not matches(expected, given):
        raise CsrfRefused()
