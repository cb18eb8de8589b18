"""Secret job arguments, sealed under a KMS key before they are enqueued.

``seal_args`` replaces each secret argument (a name the job declares secret,
or one that names a secret, e.g. ``password``) by
``{"$sealed": "<Base64 encrypt-data ciphertext under kps/default>"}``; only
that form reaches Redis and the task store (``engine.redaction`` keeps sealed
values in task rows and hides them in listings). ``unseal_args`` turns them
back into values inside the worker. The value is JSON-encoded first, so any
JSON value can be sealed, up to encrypt-data's 4096 bytes; the field name is
the encryption context, so a sealed value only opens under the field it was
sealed for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

from engine.errors import DewError, InvalidInput
from engine.redaction import SEALED_MARKER, is_sealed, is_secret_key

SEAL_KEY = "kps/default"
SEALING_ACTOR = "engine.sealing"
MAX_SEALED_BYTES = 4096


class _Encrypted(Protocol):
    @property
    def cipher_text_base64(self) -> str: ...


class _Decrypted(Protocol):
    @property
    def plain_text(self) -> bytes: ...


class DataCipher(Protocol):
    """The part of the KMS service sealing needs (``handlers.kms.KmsService``)."""

    async def encrypt_data(
        self, key: str, plain_text: bytes, *, account: str = ..., actor: str | None = ...,
        encryption_context: dict[str, str] | None = ...,
    ) -> _Encrypted: ...

    async def decrypt_data(
        self, cipher_text: bytes | str, *, account: str = ..., actor: str | None = ...,
        encryption_context: dict[str, str] | None = ...,
    ) -> _Decrypted: ...


async def seal_args(
    args: dict[str, Any], secret_fields: Iterable[str], kms: DataCipher,
    account: str = "default",
) -> dict[str, Any]:
    """A copy of ``args`` with every secret top-level value sealed (sealed ones kept)."""
    names = frozenset(secret_fields)
    out = dict(args)
    for name, value in args.items():
        if value is None or is_sealed(value) or not is_secret_key(name, names):
            continue
        data = json.dumps(value, separators=(",", ":")).encode("utf-8")
        if len(data) > MAX_SEALED_BYTES:
            # The size only: the value itself must not reach an error message.
            raise InvalidInput(
                f"the secret argument {name!r} is {len(data)} bytes as JSON; at most "
                f"{MAX_SEALED_BYTES} can be sealed",
                code="secret_too_large", target=name,
            )
        sealed = await kms.encrypt_data(SEAL_KEY, data, account=account, actor=SEALING_ACTOR,
                                        encryption_context=_context(name))
        out[name] = {SEALED_MARKER: sealed.cipher_text_base64}
    return out


async def unseal_args(
    args: dict[str, Any], kms: DataCipher, account: str = "default"
) -> dict[str, Any]:
    """A copy of ``args`` with every sealed top-level value opened."""
    out = dict(args)
    for name, value in args.items():
        if not is_sealed(value):
            continue
        try:
            opened = await kms.decrypt_data(value[SEALED_MARKER], account=account,
                                            actor=SEALING_ACTOR,
                                            encryption_context=_context(name))
        except DewError as exc:
            exc.target = name
            raise
        try:
            out[name] = json.loads(opened.plain_text)
        except ValueError:
            raise InvalidInput(f"the sealed argument {name!r} does not hold JSON",
                               code="invalid_sealed_value", target=name) from None
    return out


def _context(name: str) -> dict[str, str]:
    return {"dew:argument": name}
