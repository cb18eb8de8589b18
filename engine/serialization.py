"""The wire format of jobs and results in Redis: JSON, never pickle.

arq's default serializer is pickle, which lets anyone who can write to Redis run
code on the workers. Both the client and the worker use these functions
instead; a payload that is not JSON (a pickle above all) is refused before
anything looks inside it.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any

PICKLE_PROTOCOL_MARK = 0x80


class NotJson(ValueError):
    """A payload in Redis that is not a JSON document."""


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=_default, separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    if data[:1] and data[0] == PICKLE_PROTOCOL_MARK:
        raise NotJson("refused a pickled payload: jobs must be JSON")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotJson(f"refused a payload that is not JSON: {exc}") from None


def _default(obj: Any) -> Any:
    # arq puts the exception of a job that failed outside our runner (e.g. a
    # payload it could not read) into the result: keep its name and text.
    if isinstance(obj, BaseException):
        return {"error": type(obj).__name__, "message": str(obj)}
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
