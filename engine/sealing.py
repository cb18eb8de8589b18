"""Secret job arguments, sealed before they are enqueued.

``seal_args`` replaces each secret argument, at any depth (a name the job
declares secret, or one that names a secret, e.g. ``password`` or
``auth.private_key``) by ``{"$sealed": "<what the Sealer made>"}``; only
that form reaches Redis and the task store (``engine.redaction`` keeps sealed
values in task rows and hides them in listings). ``unseal_args`` turns them
back into values inside the worker. The value is JSON-encoded first, so any
JSON value can be sealed, up to encrypt-data's 4096 bytes; the field's dotted
path is the encryption context, so a sealed value only opens where it was
sealed.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from engine.errors import DewError, InvalidInput
from engine.redaction import SEALED_MARKER, is_sealed, is_secret_key

MAX_SEALED_BYTES = 4096


class Sealer(Protocol):
    """Seals bytes under a key the engine does not hold, bound to ``context``."""

    async def seal(self, data: bytes, context: dict[str, str], account: str) -> str: ...

    async def open(self, sealed: str, context: dict[str, str], account: str) -> bytes: ...


def _secret_paths(value: Any, names: frozenset[str], path: str = "") -> list[str]:
    """Dotted paths of the values to seal: secret-named keys at any depth (list
    items are ``path.N``); below a secret key nothing more is looked at."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if item is None or is_sealed(item):
                continue
            if is_secret_key(str(key), names):
                found.append(where)
            else:
                found.extend(_secret_paths(item, names, where))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(_secret_paths(item, names, f"{path}.{i}"))
    return found


def needs_sealing(args: dict[str, Any], secret_fields: Iterable[str]) -> bool:
    """Whether ``seal_args`` would seal anything (so the HSM is opened only then)."""
    return bool(_secret_paths(args, frozenset(secret_fields)))


def has_sealed(value: Any) -> bool:
    if is_sealed(value):
        return True
    if isinstance(value, dict):
        return any(has_sealed(v) for v in value.values())
    if isinstance(value, list):
        return any(has_sealed(v) for v in value)
    return False


async def seal_args(
    args: dict[str, Any], secret_fields: Iterable[str], sealer: Sealer,
    account: str = "default",
) -> dict[str, Any]:
    """A copy of ``args`` with every secret value sealed, at any depth (sealed ones kept)."""

    async def seal(path: str, value: Any) -> Any:
        data = json.dumps(value, separators=(",", ":")).encode("utf-8")
        if len(data) > MAX_SEALED_BYTES:
            # The size only: the value itself must not reach an error message.
            raise InvalidInput(
                f"the secret argument {path!r} is {len(data)} bytes as JSON; at most "
                f"{MAX_SEALED_BYTES} can be sealed",
                code="secret_too_large", target=path,
            )
        return {SEALED_MARKER: await sealer.seal(data, _context(path), account)}

    paths = set(_secret_paths(args, frozenset(secret_fields)))
    result: dict[str, Any] = await _rewrite(args, "", lambda p, v: p in paths, seal)
    return result


async def unseal_args(
    args: dict[str, Any], sealer: Sealer, account: str = "default"
) -> dict[str, Any]:
    """A copy of ``args`` with every sealed value opened, at any depth."""

    async def unseal(path: str, value: Any) -> Any:
        try:
            opened = await sealer.open(value[SEALED_MARKER], _context(path), account)
        except DewError as exc:
            exc.target = path
            raise
        try:
            return json.loads(opened)
        except ValueError:
            raise InvalidInput(f"the sealed argument {path!r} does not hold JSON",
                               code="invalid_sealed_value", target=path) from None

    result: dict[str, Any] = await _rewrite(args, "", lambda p, v: is_sealed(v), unseal)
    return result


async def _rewrite(
    value: Any, path: str, pick: Callable[[str, Any], bool],
    change: Callable[[str, Any], Awaitable[Any]],
) -> Any:
    """A copy of ``value`` with each picked item (by dotted path) replaced by ``change``."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            out[key] = (await change(where, item) if pick(where, item)
                        else await _rewrite(item, where, pick, change))
        return out
    if isinstance(value, list):
        return [
            await change(f"{path}.{i}", item) if pick(f"{path}.{i}", item)
            else await _rewrite(item, f"{path}.{i}", pick, change)
            for i, item in enumerate(value)
        ]
    return value


def _context(name: str) -> dict[str, str]:
    return {"dew:argument": name}
