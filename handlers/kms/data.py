"""The data plane: data keys, encrypt-data / decrypt-data and random bytes."""

from __future__ import annotations

from typing import Any

from engine.errors import DewError, InvalidInput
from engine.logs import get_logger
from handlers.kms.core import KmsCore, key_name
from handlers.kms.format import (
    AAD_HEADER_BYTES,
    DEFAULT_ACCOUNT,
    MAX_DATA_BYTES,
    Purpose,
    check_account,
    check_context,
    check_length_bits,
    check_plaintext,
    check_random_bytes,
    ciphertext_size,
    decode_base64,
    unpack_ciphertext,
)
from handlers.kms.results import (
    DataKeyResult,
    DecryptResult,
    EncryptResult,
)
from handlers.kms.signing import Signing

log = get_logger("dew.kms")


DATA_KEY_BYTES = (16, 64)  # what encrypt-datakey accepts (128..512 bits)


class DataPlane:
    """Using enabled AES keys: the hot path, close to a bare PKCS#11 call."""

    def __init__(self, core: KmsCore, signing: Signing) -> None:
        self.core = core
        self.signing = signing

    async def create_datakey(
        self, key: str, length_bits: int = 256, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> DataKeyResult:
        """A fresh data key: plaintext (use it, forget it) and cipher text (store it)."""
        return await self._new_datakey("create_datakey", key, length_bits, account, actor,
                                       encryption_context, keep_plaintext=True)

    async def create_datakey_without_plaintext(
        self, key: str, length_bits: int = 256, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> DataKeyResult:
        return await self._new_datakey("create_datakey_without_plaintext", key, length_bits,
                                       account, actor, encryption_context, keep_plaintext=False)

    async def _new_datakey(
        self, operation: str, key: str, length_bits: int, account: str, actor: str | None,
        context: dict[str, str] | None, *, keep_plaintext: bool,
    ) -> DataKeyResult:
        # The hot path, audited as `core.audit` would (one entry, success or failure),
        # without its context object and coroutines: each costs as much as a check.
        core = self.core
        key_id: str | None = key
        detail: dict[str, Any] = {}
        try:
            check_account(account)
            bits = check_length_bits(length_bits)
            ctx = check_context(context)
            use = core.usable_now(key, account) or await core.key_use(key, account)
            key_id, detail = use.key_id, {"length_bits": bits}
            plain, blob = await core.new_datakey(use, bits // 8, ctx)
        except DewError as exc:
            await core.failed(operation, account, actor, key_id, detail, exc)
            raise
        if core.used(operation, account, actor, use.key_id, detail):
            await core.flush_audit()
        return DataKeyResult(use.key_id, plain if keep_plaintext else None, blob)

    async def encrypt_datakey(
        self, key: str, plain_text: bytes, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> DataKeyResult:
        """Encrypt a caller's data key (16..64 bytes) under ``key``."""
        core = self.core
        key_id: str | None = key
        detail: dict[str, Any] = {}
        try:
            check_account(account)
            low, high = DATA_KEY_BYTES
            if not isinstance(plain_text, bytes | bytearray) or not low <= len(plain_text) <= high:
                raise InvalidInput(f"a data key must be {low}..{high} bytes "
                                   f"({low * 8}..{high * 8} bits)", code="invalid_datakey")
            ctx = check_context(encryption_context)
            use = core.usable_now(key, account) or await core.key_use(key, account)
            key_id, detail = use.key_id, {"length_bits": len(plain_text) * 8}
            blob = await core.encrypt(use, bytes(plain_text), Purpose.DATA_KEY, ctx)
        except DewError as exc:
            await core.failed("encrypt_datakey", account, actor, key_id, detail, exc)
            raise
        if core.used("encrypt_datakey", account, actor, use.key_id, detail):
            await core.flush_audit()
        return DataKeyResult(use.key_id, None, blob)

    async def decrypt_datakey(
        self, key: str, cipher_text: bytes, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> DataKeyResult:
        """The plaintext of a data key made by create-datakey / encrypt-datakey under ``key``."""
        core = self.core
        key_id: str | None = key
        try:
            check_account(account)
            ctx = check_context(encryption_context)
            blob = bytes(cipher_text)
            header, iv, body = unpack_ciphertext(blob, Purpose.DATA_KEY)
            use = core.usable_now(key, account) or await core.key_use(key, account)
            key_id = use.key_id
            if header.key_id != key_id:
                raise InvalidInput(
                    f"this data key was not encrypted under {key_name(use.record)}",
                    code="key_mismatch",
                    fix="Pass the key the data key was created with (decrypt-data needs none).",
                )
            plain = await core.decrypt(use, header, iv, body, ctx, blob[:AAD_HEADER_BYTES])
        except DewError as exc:
            await core.failed("decrypt_datakey", account, actor, key_id, {}, exc)
            raise
        if core.used("decrypt_datakey", account, actor, key_id, {}):
            await core.flush_audit()
        return DataKeyResult(key_id, plain, blob)

    # ------------------------------------------------------------------ encrypt-data

    async def encrypt_data(
        self, key: str, plain_text: bytes, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> EncryptResult:
        """Encrypt up to 4096 bytes directly under a CMK (self-describing ciphertext)."""
        core = self.core
        key_id: str | None = key
        detail: dict[str, Any] = {}
        try:
            check_account(account)
            data = check_plaintext(plain_text)
            ctx = check_context(encryption_context)
            use = core.usable_now(key, account) or await core.key_use(key, account)
            key_id, detail = use.key_id, {"bytes": len(data)}
            blob = await core.encrypt(use, data, Purpose.DATA, ctx)
        except DewError as exc:
            await core.failed("encrypt_data", account, actor, key_id, detail, exc)
            raise
        if core.used("encrypt_data", account, actor, use.key_id, detail):
            await core.flush_audit()
        return EncryptResult(use.key_id, blob)

    async def decrypt_data(
        self, cipher_text: bytes | str, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
        key: str | None = None, encryption_algorithm: str | None = None,
    ) -> DecryptResult:
        """Decrypt encrypt-data output (bytes, or its Base64); the key comes from inside it.

        With an ``encryption_algorithm`` (``RSAES_OAEP_SHA_256`` / ``_SHA_1``) the
        ciphertext is a raw RSA-OAEP ciphertext made offline with the public key of
        ``key``, an RSA ENCRYPT_DECRYPT key; it is decrypted in the token.
        """
        if encryption_algorithm not in (None, "SYMMETRIC_DEFAULT"):
            return await self.signing.rsa_decrypt(cipher_text, key, encryption_algorithm, account,
                                           actor, encryption_context)
        async with self.core.audit("decrypt_data", account, actor, None) as op:
            account = check_account(account)
            ctx = check_context(encryption_context)
            blob = (decode_base64("cipher_text", cipher_text) if isinstance(cipher_text, str)
                    else bytes(cipher_text))
            if len(blob) > ciphertext_size(MAX_DATA_BYTES):
                raise InvalidInput("the ciphertext is longer than any encrypt-data output",
                                   code="invalid_ciphertext")
            header, iv, body = unpack_ciphertext(blob, Purpose.DATA)
            op.key_id = header.key_id
            core = self.core
            use = (core.usable_now(header.key_id, account)
                   or await core.key_use(header.key_id, account))
            plain = await core.decrypt(use, header, iv, body, ctx, blob[:AAD_HEADER_BYTES])
            op.detail = {"bytes": len(plain)}
            return DecryptResult(use.key_id, plain)

    async def gen_random(
        self, n: int, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> bytes:
        """``n`` (1..1024) random bytes from the token's RNG."""
        async with self.core.audit("gen_random", account, actor, None) as op:
            check_account(account)
            n = check_random_bytes(n)
            op.detail = {"bytes": n}
            core = await self.core.crypto()
            return await core.random_bytes(n)
