"""Matching a raw request path to an operation.

Paths are matched segment by segment on the **raw** request target, and each
parameter is percent-decoded on its own: a ``%2F`` inside a key id stays part
of that parameter (a router on the decoded path would see two segments). A
literal segment wins over a parameter (``/kms/tags`` before ``/kms/{key_id}``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote

from engine.api.operations import CRYPTO, MANAGE, Operation
from engine.errors import ConfigError

METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"})
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Route:
    operation: Operation
    prefix: str  # the service's error-code prefix ("KMS")
    service: str
    segments: tuple[tuple[bool, str], ...]  # (is_param, literal text or parameter name)

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for (is_param, text), part in zip(self.segments, parts, strict=True):
            if is_param:
                params[text] = unquote(part)
            elif unquote(part) != text:
                return None
        return params

    @property
    def shape(self) -> tuple[str | None, ...]:
        """The segments with parameter names left out: two routes of one shape clash."""
        return tuple(None if is_param else text for is_param, text in self.segments)

    @property
    def rank(self) -> tuple[int, ...]:
        """Sorts literal segments before parameters, position by position."""
        return tuple(1 if is_param else 0 for is_param, _ in self.segments)


def split_path(raw_path: str) -> list[str]:
    parts = raw_path[1:].split("/") if raw_path.startswith("/") else raw_path.split("/")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # one trailing slash is ignored
    return parts


def _segments(path: str) -> tuple[tuple[bool, str], ...]:
    if not path.startswith("/"):
        raise ConfigError(f"API path {path!r} must start with '/'")
    out = []
    for part in split_path(path):
        match = _PARAM.fullmatch(part)
        if match is not None:
            out.append((True, match.group(1)))
        elif "{" in part or "}" in part:
            raise ConfigError(f"API path {path!r}: a parameter must be a whole segment")
        else:
            out.append((False, part))
    return tuple(out)


class Router:
    def __init__(self) -> None:
        # Routes by segment count, then by method; each list sorted literal-first.
        self._routes: dict[int, dict[str, list[Route]]] = {}

    def add(self, operation: Operation, prefix: str, service: str) -> None:
        method = operation.method.upper()
        if method not in METHODS:
            raise ConfigError(f"operation {operation.name}: unknown method {operation.method!r}")
        if operation.limit not in (MANAGE, CRYPTO):
            raise ConfigError(f"operation {operation.name}: limit must be {MANAGE!r} or "
                              f"{CRYPTO!r}, not {operation.limit!r}")
        route = Route(operation, prefix, service, _segments(operation.path))
        by_method = self._routes.setdefault(len(route.segments), {})
        same = by_method.setdefault(method, [])
        for other in same:
            if other.shape == route.shape:
                raise ConfigError(f"operations {other.operation.name} ({other.service}) and "
                                  f"{operation.name} ({service}) are both {method} "
                                  f"{operation.path}")
        same.append(route)
        same.sort(key=lambda r: r.rank)

    def add_all(self, operations: Iterable[Operation], prefix: str, service: str) -> None:
        for operation in operations:
            self.add(operation, prefix, service)

    def __iter__(self) -> Iterator[Route]:
        for by_method in self._routes.values():
            for routes in by_method.values():
                yield from routes

    def __len__(self) -> int:
        return sum(len(r) for m in self._routes.values() for r in m.values())

    def resolve(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]] | tuple[
            None, tuple[str, ...]]:
        """(route, path parameters), or (None, the methods this path allows: empty
        for an unknown path)."""
        parts = split_path(raw_path)
        by_method = self._routes.get(len(parts))
        if not by_method:
            return None, ()
        for route in by_method.get(method, ()):
            params = route.match(parts)
            if params is not None:
                return route, params
        allowed = tuple(sorted(m for m, routes in by_method.items() if m != method and any(
            r.match(parts) is not None for r in routes)))
        return None, allowed
