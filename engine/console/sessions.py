"""Console sessions: server-side, in the identity store, so every API process sees
a sign-out and an idle expiry at once.

The browser holds only a random token (cookie ``dew_console``: ``HttpOnly``,
``Secure``, ``SameSite=Strict``, path ``/console``); the store keeps its SHA-256,
the user, the session's CSRF token and when it was last used. A session unused
for ``[console] idle_minutes`` is over: the next request finds it gone.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from engine.iam.service import SignedIn, SignInRefused
from engine.iam.store import SqliteIamStore
from engine.logs import get_logger
from engine.models import utcnow

log = get_logger("dew.console")

COOKIE = "dew_console"
COOKIE_PATH = "/console"
# last_seen is written at most this often per session: a page is a few requests.
TOUCH_EVERY = timedelta(seconds=30)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def idle_over(last_seen: datetime, now: datetime, idle_minutes: int) -> bool:
    return now - last_seen >= timedelta(minutes=idle_minutes)


def set_cookie(name: str, value: str, max_age: int | None = None) -> str:
    """A ``Set-Cookie`` value for the console: never readable by scripts, never sent
    over plain HTTP, never sent with a request another site starts."""
    age = "" if max_age is None else f"; Max-Age={max_age}"
    return f"{name}={value}; Path={COOKIE_PATH}; HttpOnly; Secure; SameSite=Strict{age}"


def clear_cookie(name: str) -> str:
    return set_cookie(name, "", max_age=0)


@dataclass(frozen=True)
class Session:
    token: str
    user_id: str
    csrf: str


class Sessions:
    """Open, find and end console sessions in the identity store."""

    def __init__(self, store: SqliteIamStore, idle_minutes: int,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.idle_minutes = idle_minutes
        self.clock = clock

    async def open(self, signed: SignedIn) -> Session:
        """A session for a sign-in that passed; refused like a wrong password when the
        password changed, or the user was disabled, while it was being checked."""
        now = self.clock()
        # Sessions nobody ended are dropped here, not by a sweeper of their own.
        await self.store.delete_idle_sessions(now - timedelta(minutes=self.idle_minutes))
        session = Session(new_token(), signed.user_id, new_token())
        if not await self.store.create_session(token_hash(session.token), signed.user_id,
                                               session.csrf, now, signed.password_hash):
            log.info("iam.sign_in_refused", user_id=signed.user_id,
                     reason="password changed or user disabled during sign-in")
            raise SignInRefused()
        return session

    async def find(self, token: str | None) -> Session | None:
        """The live session of the cookie's token; None (and it is ended) when idle."""
        if not token or len(token) > 256:
            return None
        hashed = token_hash(token)
        row = await self.store.get_session(hashed)
        if row is None:
            return None
        user_id, csrf, last_seen = row
        now = self.clock()
        if idle_over(last_seen, now, self.idle_minutes):
            await self.store.delete_session(hashed)
            return None
        if now - last_seen >= TOUCH_EVERY:
            await self.store.touch_session(hashed, now)
        return Session(token, user_id, csrf)

    async def end(self, token: str) -> bool:
        return await self.store.delete_session(token_hash(token))
