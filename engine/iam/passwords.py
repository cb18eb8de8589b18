"""Console passwords: argon2id hashes, the rules of a new password, and the slow-down.

Pure code and CPU work (no I/O): the store keeps the hash (``iam_users.password_hash``)
and the count of wrong passwords per user name; what to do with them is decided here.
A hash is argon2-cffi's PHC string (``$argon2id$v=19$m=...``), so its parameters travel
with it and :func:`needs_rehash` tells when the defaults grew.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from engine.errors import InvalidInput

MIN_LENGTH = 8
MAX_LENGTH = 1024  # argon2 takes any length; a megabyte "password" is an attack on the CPU

_HASHER = PasswordHasher()  # argon2id, RFC 9106's second recommended parameters


@cache
def _dummy_hash() -> str:
    """Verified against when the user name is unknown, so that answer takes as long as
    a wrong password of a real user (the reply must not tell which it was). Made on
    first need: hashing costs a fifth of a second."""
    return _HASHER.hash("dew-console: no such user")


def check_new_password(password: str, what: str = "password") -> str:
    """A new password: 8 to 1024 characters, no control characters, not only spaces."""
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise InvalidInput(f"{what}: use {MIN_LENGTH} to {MAX_LENGTH} characters, got "
                           f"{len(password)}", code="invalid_password", target=what)
    if not password.isprintable() or not password.strip():
        raise InvalidInput(f"{what}: use printable characters (no control characters), not "
                           "only spaces", code="invalid_password", target=what)
    return password


def hash_password(password: str) -> str:
    """The argon2id hash to store (CPU-bound: ~50 ms; run it off the event loop)."""
    return _HASHER.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored``; with no hash (no such user, or no
    password set) a dummy hash is checked all the same and the answer is False."""
    try:
        return _HASHER.verify(stored or _dummy_hash(), password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    try:
        return _HASHER.check_needs_rehash(stored)
    except InvalidHashError:
        return True


def lockout_seconds(failures: int, after: int, first: float, most: float) -> float:
    """How long a user name waits after ``failures`` wrong passwords in a row: nothing
    before ``after`` of them, then ``first`` seconds, doubling with each further one,
    at most ``most``."""
    if failures < after:
        return 0.0
    return float(min(most, first * 2.0 ** min(failures - after, 32)))


def locked_until(failures: int, last_failure: datetime | None, after: int, first: float,
                 most: float) -> datetime | None:
    """When the next try of that user name is allowed again (None: now)."""
    wait = lockout_seconds(failures, after, first, most)
    if not wait or last_failure is None:
        return None
    return last_failure + timedelta(seconds=wait)
