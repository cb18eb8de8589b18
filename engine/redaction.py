"""Redaction of secrets in job arguments, task rows and log events.

A value is secret when its key names a secret (``password``, ``private_key``,
``pin``...) or when a job declares the field secret. Sealed values (secret
arguments encrypted by the client under a KMS key) are not clear text, but are
shown redacted too: nobody needs to read a ciphertext in a task listing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "***redacted***"
SEALED_MARKER = "$sealed"

SECRET_KEY = re.compile(
    r"(pass(word|wd|phrase)?|secret|private[_-]?key|(^|_)pin$|token|credential|api[_-]?key"
    r"|plain[_-]?text|authorization)",
    re.IGNORECASE,
)


def is_secret_key(key: str, extra: Iterable[str] = ()) -> bool:
    return key in set(extra) or bool(SECRET_KEY.search(key))


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {SEALED_MARKER}


def redact(value: Any, extra: Iterable[str] = ()) -> Any:
    """A copy of ``value`` with every secret field replaced by ``REDACTED``."""
    names = frozenset(extra)
    if isinstance(value, dict):
        return {
            k: (REDACTED if _secret(k, v, names) else redact(v, names)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, names) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v, names) for v in value)
    return value


def keep_sealed(value: Any, extra: Iterable[str] = ()) -> Any:
    """What the task store keeps: clear secrets redacted, sealed ones kept for re-delivery."""
    names = frozenset(extra)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if is_sealed(v):
                out[k] = v
            elif _secret(k, v, names):
                out[k] = REDACTED
            else:
                out[k] = keep_sealed(v, names)
        return out
    if isinstance(value, list):
        return [keep_sealed(v, names) for v in value]
    return value


def contains_redacted(value: Any) -> bool:
    """Whether a secret was lost to redaction (a re-delivered job cannot use it)."""
    if value == REDACTED:
        return True
    if isinstance(value, dict):
        return any(contains_redacted(v) for v in value.values())
    if isinstance(value, list):
        return any(contains_redacted(v) for v in value)
    return False


def _secret(key: Any, value: Any, names: frozenset[str]) -> bool:
    if not isinstance(key, str) or value is None:
        return False
    return is_sealed(value) or is_secret_key(key, names)
