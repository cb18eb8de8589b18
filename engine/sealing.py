"""Secret job arguments, sealed before they are enqueued, bound to their one use.

What is sealed is declared, never guessed from names: each job lists its secret
fields (``JOBS.job(..., secret_fields=(...))``) and ``seal_args`` replaces each
of those present by ``{"$sealed": "<what the Sealer made>"}``, the whole value
(anything nested under a secret field is sealed with it; a free-form payload,
such as ``engine.echo``'s ``value``, is declared whole). Only that form reaches
Redis and the task store (``engine.redaction`` keeps sealed values in unfinished
task rows and hides them in listings; the runner drops them once the task is
final). ``unseal_args`` opens them inside the worker. The value is JSON-encoded
first, so any JSON value can be sealed, up to 4096 bytes.

A seal is bound to its use: the encryption context holds the field, the task
id, the job name and the account (:class:`SealBinding`), so a sealed value
copied into another job, another task or another account does not open. The
:class:`Sealer` is a resource (``sealer``) a service provides (the KMS:
encrypt-data under its ``kps/default`` key); the engine names no service.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple, Protocol

from engine.errors import DewError, InvalidInput, SecurityError
from engine.redaction import SEALED_MARKER, is_sealed

MAX_SEALED_BYTES = 4096


class Sealer(Protocol):
    """Seals bytes under a key the engine does not hold, bound to ``context``."""

    async def seal(self, data: bytes, context: dict[str, str], account: str) -> str: ...

    async def open(self, sealed: str, context: dict[str, str], account: str) -> bytes: ...


class SealBinding(NamedTuple):
    """The one use a seal opens for: this task of this job, in this account."""

    task_id: str
    job: str
    account: str

    def context(self, field: str) -> dict[str, str]:
        return {"dew:argument": field, "dew:task": self.task_id, "dew:job": self.job,
                "dew:account": self.account}


def job_account(args: dict[str, Any]) -> str:
    """The account a job acts for (its ``account`` argument; ``default`` when absent)."""
    account = args.get("account", "default")
    if not isinstance(account, str) or not account:
        raise InvalidInput("'account' must be a non-empty string", code="invalid_account")
    return account


def _secret_paths(args: dict[str, Any], names: frozenset[str]) -> list[str]:
    """The declared secret fields present in ``args`` and not sealed yet."""
    return [key for key, value in args.items()
            if key in names and value is not None and not is_sealed(value)]


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
    args: dict[str, Any], secret_fields: Iterable[str], sealer: Sealer, binding: SealBinding,
) -> dict[str, Any]:
    """A copy of ``args`` with every declared secret field sealed for ``binding``."""

    async def seal(path: str, value: Any) -> Any:
        data = json.dumps(value, separators=(",", ":")).encode("utf-8")
        if len(data) > MAX_SEALED_BYTES:
            # The size only: the value itself must not reach an error message.
            raise InvalidInput(
                f"the secret argument {path!r} is {len(data)} bytes as JSON; at most "
                f"{MAX_SEALED_BYTES} can be sealed",
                code="secret_too_large", target=path,
            )
        return {SEALED_MARKER: await sealer.seal(data, binding.context(path), binding.account)}

    paths = set(_secret_paths(args, frozenset(secret_fields)))
    result: dict[str, Any] = await _rewrite(args, "", lambda p, v: p in paths, seal)
    return result


async def unseal_args(
    args: dict[str, Any], sealer: Sealer, binding: SealBinding
) -> dict[str, Any]:
    """A copy of ``args`` with every sealed value opened; a seal made for another
    task, job, account or field does not open (the sealer refuses its context)."""

    async def unseal(path: str, value: Any) -> Any:
        try:
            opened = await sealer.open(value[SEALED_MARKER], binding.context(path),
                                       binding.account)
        except DewError as exc:
            if exc.retryable:
                exc.target = path
                raise
            raise SecurityError(
                f"the sealed argument {path!r} was not sealed for this use",
                cause=f"task {binding.task_id}, job {binding.job}, account {binding.account}: "
                f"{exc.message}",
                fix="Enqueue the job again through the client, which seals its secrets for "
                "that one task; a seal copied from another task does not open.",
                code="seal_not_for_this_use", target=path,
            ) from None
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
