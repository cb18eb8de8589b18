"""Reading request fields: one plain function per JSON type, each naming the field.

The SDKs validate nothing and send values as their callers set them
(``pending_days`` may come as ``7`` or ``"7"``), so readers accept both forms
where HUAWEI_API.md says the SDK may send either. Every refusal is an
``InvalidInput`` (400) whose message names the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from engine.errors import InvalidInput

_MISSING: Any = object()


def _bad(name: str, problem: str) -> InvalidInput:
    return InvalidInput(f"{name}: {problem}", code="invalid_parameter", target=name)


def _given(data: Mapping[str, Any], name: str, required: bool) -> Any:
    """The field's value; ``_MISSING`` when absent or null and not required."""
    value = data.get(name)
    if value is None:
        if required:
            raise _bad(name, "is required")
        return _MISSING
    return value


def body_object(body: Any) -> Mapping[str, Any]:
    """The body as a JSON object (an absent body reads as ``{}``)."""
    if body is None:
        return {}
    if not isinstance(body, Mapping):
        raise _bad("body", "must be a JSON object")
    return body


def text(
    data: Mapping[str, Any], name: str, *, required: bool = True, default: str | None = None,
    max_len: int | None = None, choices: Iterable[str] | None = None,
) -> str | None:
    value = _given(data, name, required)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _bad(name, f"must be a string, got {type(value).__name__}")
    value = str(value)
    if max_len is not None and len(value) > max_len:
        raise _bad(name, f"must be at most {max_len} characters")
    if choices is not None:
        allowed = tuple(choices)
        if value not in allowed:
            raise _bad(name, f"must be one of {', '.join(allowed)}, got {value!r}")
    return value


def required_text(data: Mapping[str, Any], name: str, **options: Any) -> str:
    value = text(data, name, required=True, **options)
    assert value is not None
    return value


def integer(
    data: Mapping[str, Any], name: str, *, required: bool = True, default: int | None = None,
    low: int | None = None, high: int | None = None,
) -> int | None:
    """An integer sent as a JSON number or as a string of digits."""
    value = _given(data, name, required)
    if value is _MISSING:
        return default
    if isinstance(value, bool):
        raise _bad(name, "must be an integer, got a boolean")
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped.lstrip("-").isdigit() or len(stripped) > 20:
            raise _bad(name, f"must be an integer, got {value!r}")
        value = int(stripped)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    elif not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _bad(name, f"must be between {low} and {high}, got {value}")
    return value


def required_integer(data: Mapping[str, Any], name: str, **options: Any) -> int:
    value = integer(data, name, required=True, **options)
    assert value is not None
    return value


def boolean(
    data: Mapping[str, Any], name: str, *, required: bool = False, default: bool | None = None,
) -> bool | None:
    """A JSON boolean, or the strings "true"/"false"."""
    value = _given(data, name, required)
    if value is _MISSING:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _bad(name, f"must be true or false, got {value!r}")


def text_list(
    data: Mapping[str, Any], name: str, *, required: bool = True, max_items: int | None = None,
) -> list[str] | None:
    value = _given(data, name, required)
    if value is _MISSING:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(name, "must be a list of strings")
    if max_items is not None and len(value) > max_items:
        raise _bad(name, f"must hold at most {max_items} items")
    return list(value)


def obj(data: Mapping[str, Any], name: str, *, required: bool = True) -> Mapping[str, Any] | None:
    value = _given(data, name, required)
    if value is _MISSING:
        return None
    if not isinstance(value, Mapping):
        raise _bad(name, "must be a JSON object")
    return value


def objects(data: Mapping[str, Any], name: str, *, required: bool = True,
            max_items: int | None = None) -> list[Mapping[str, Any]] | None:
    value = _given(data, name, required)
    if value is _MISSING:
        return None
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise _bad(name, "must be a list of JSON objects")
    if max_items is not None and len(value) > max_items:
        raise _bad(name, f"must hold at most {max_items} items")
    return list(value)
