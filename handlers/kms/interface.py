"""What other services may use of the KMS, and nothing more.

CSMS and KPS need "encrypt under a KMS key" (data keys, random bytes) and
"seal/open" job arguments, and CSMS "record an audit entry" (who read a secret
value); they reach the KMS only through this module (an
import contract in ``pyproject.toml`` checks it). In a worker the KMS is the
resource ``kms`` (a :class:`KeyCipher`) and the sealer the resource ``sealer``.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

from handlers.kms.format import DEFAULT_ACCOUNT, check_account, check_key_ref

if TYPE_CHECKING:
    from engine.settings import Settings

__all__ = [
    "DEFAULT_ACCOUNT",
    "SEAL_KEY",
    "AuditRecorder",
    "KeyCipher",
    "KmsSealer",
    "check_account",
    "check_key_ref",
    "default_actor",
    "open_key_cipher",
]

# The key job arguments are sealed under (the KPS's default key, made on first use).
SEAL_KEY = "kps/default"
SEALING_ACTOR = "engine.sealing"


class AuditRecorder(Protocol):
    """An entry in the KMS's hash-chained audit log for another service's operation.

    ``operation`` is ``SERVICE.NAME`` (``csms.get_value``); ``actor`` the principal
    (``cli:alice@host``, or the API's ``api:...`` actor string); ``outcome`` ``success``
    or ``failure``; ``detail`` what ``dew audit list`` shows and filters on (``secret``
    is matched by ``--secret``); ``key_id`` the KMS key involved, if any. Written before
    it returns (it raises if the entry cannot be written)."""

    async def record_audit(
        self, operation: str, *, account: str, actor: str, outcome: str,
        detail: dict[str, Any], key_id: str | None = ...,
    ) -> None: ...


class KeyCipher(AuditRecorder, Protocol):
    """Data keys, encrypt-data and random bytes under a KMS key (``KmsService`` is one),
    and :class:`AuditRecorder`."""

    async def create_datakey(
        self, key: str, length_bits: int = ..., *, account: str = ..., actor: str | None = ...,
        encryption_context: dict[str, str] | None = ...,
    ) -> Any: ...

    async def decrypt_datakey(
        self, key: str, cipher_text: bytes, *, account: str = ..., actor: str | None = ...,
        encryption_context: dict[str, str] | None = ...,
    ) -> Any: ...

    async def encrypt_data(
        self, key: str, plain_text: bytes, *, account: str = ..., actor: str | None = ...,
        encryption_context: dict[str, str] | None = ...,
    ) -> Any: ...

    async def decrypt_data(
        self, cipher_text: bytes | str, *, account: str = ..., actor: str | None = ...,
        encryption_context: dict[str, str] | None = ...,
    ) -> Any: ...

    async def gen_random(
        self, n: int, *, account: str = ..., actor: str | None = ...
    ) -> bytes: ...


class KmsSealer:
    """``engine.sealing.Sealer`` on the KMS: values sealed by encrypt-data under SEAL_KEY."""

    def __init__(self, kms: KeyCipher) -> None:
        self.kms = kms

    async def seal(self, data: bytes, context: dict[str, str], account: str) -> str:
        sealed = await self.kms.encrypt_data(SEAL_KEY, data, account=account,
                                             actor=SEALING_ACTOR, encryption_context=context)
        return str(sealed.cipher_text_base64)

    async def open(self, sealed: str, context: dict[str, str], account: str) -> bytes:
        opened = await self.kms.decrypt_data(sealed, account=account, actor=SEALING_ACTOR,
                                             encryption_context=context)
        return bytes(opened.plain_text)


def default_actor(kind: str) -> str:
    """Who did it, for the audit log: ``cli:alice@host`` or ``worker:host:pid``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    if kind == "worker":
        return f"worker:{socket.gethostname()}:{os.getpid()}"
    return f"{kind}:{user}@{socket.gethostname()}"


@asynccontextmanager
async def open_key_cipher(settings: Settings, **options: Any) -> AsyncIterator[KeyCipher]:
    """The KMS for one command or script (the HSM opened on first use); closed on exit."""
    from handlers.kms.wiring import open_kms

    async with open_kms(settings, **options) as kms:
        yield kms
