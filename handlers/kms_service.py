"""``KmsService``: key management, data keys and encrypt-data, over the service's parts."""

from __future__ import annotations

from datetime import datetime

from engine.crypto import KeySpec, unpack_sealed
from engine.crypto.model import KeyFamily
from engine.errors import DewError, InvalidInput
from engine.kms_store import AuditEntry, AuditEvent, AuditVerdict, KeyRecord
from engine.logs import get_logger
from engine.models import iso
from handlers.kms_base import _name, _not_found, token_label
from handlers.kms_errors import AliasExists
from handlers.kms_format import (
    DEFAULT_ACCOUNT,
    MAX_DATA_BYTES,
    CipherHeader,
    KeyState,
    Purpose,
    check_account,
    check_context,
    check_custom_alias,
    check_description,
    check_key_ref,
    check_length_bits,
    check_origin,
    check_plaintext,
    check_random_bytes,
    check_spec,
    check_usage,
    ciphertext_size,
    context_digest,
    decode_base64,
    is_key_id,
    pack_ciphertext,
    unpack_ciphertext,
)
from handlers.kms_import_ops import KmsImportMixin
from handlers.kms_results import (
    DataKeyResult,
    DecryptResult,
    DeletionReport,
    EncryptResult,
    KeyChange,
    KeyMetadata,
)
from handlers.kms_rotation import KmsRotationMixin
from handlers.kms_signing import KmsSigningMixin

log = get_logger("dew.kms")


DATA_KEY_BYTES = (16, 64)  # what encrypt-datakey accepts (128..512 bits)


class KmsService(KmsImportMixin, KmsRotationMixin, KmsSigningMixin):
    """Customer master keys of every account, on one token and one registry."""

    # ------------------------------------------------------------------ key management

    async def create_key(
        self, alias: str, spec: KeySpec | str = KeySpec.AES_256, usage: str | None = None,
        description: str = "", *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        origin: str = "kms",
    ) -> KeyMetadata:
        """A new custom key, generated in the token (never extractable); with
        ``origin="external"`` a key without material, pending import (BYOK)."""
        async with self._audit("create_key", account, actor, None) as op:
            account = check_account(account)
            alias = check_custom_alias(alias)
            key_spec = check_spec(spec)
            key_usage = check_usage(key_spec, usage)
            description = check_description(description)
            origin = check_origin(origin)
            if origin == "external" and key_spec.family is KeyFamily.MLDSA:
                raise InvalidInput("ML-DSA key material cannot be imported",
                                   code="invalid_origin")
            op.detail = {"alias": alias, "spec": key_spec.value, "usage": key_usage.value,
                         **({"origin": origin} if origin != "kms" else {})}
            # Checked before the (possibly slow) generation, and again atomically
            # with the insert, so that nothing is generated for a refused request.
            if await self.store.find_alias(account, alias) is not None:
                raise AliasExists(f"the alias {alias!r} is already used in account {account!r}")
            if await self.store.count_custom_keys(account) >= self.quota:
                raise self._quota_error(account)
            key = await self._generate(account, alias, key_spec, key_usage, description,
                                       default=False, op=op, actor=actor, origin=origin)
            return KeyMetadata.of(key)

    async def describe_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> KeyMetadata:
        async with self._audit("describe_key", account, actor, key) as op:
            record = await self._lookup(key, check_account(account), create_default=True)
            op.key_id = record.key_id
            return KeyMetadata.of(record)

    async def list_keys(
        self, *, state: str | None = None, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None,
    ) -> list[KeyMetadata]:
        async with self._audit("list_keys", account, actor, None) as op:
            account = check_account(account)
            if state is not None and (state not in KeyState.__members__.values()
                                      or state == KeyState.DELETED):
                choices = ", ".join(s.value for s in KeyState if s is not KeyState.DELETED)
                raise InvalidInput(f"invalid key state {state!r}; choose one of {choices}",
                                   code="invalid_key_state")
            keys = await self.store.list_keys(account, state)
            op.detail = {"count": len(keys)}
            return [KeyMetadata.of(k) for k in keys]

    async def enable_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> KeyChange:
        return await self._transition(
            "enable_key", key, account, actor,
            allowed={KeyState.DISABLED}, done={KeyState.ENABLED}, target=KeyState.ENABLED,
            protect_default=False,
        )

    async def disable_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> KeyChange:
        return await self._transition(
            "disable_key", key, account, actor,
            allowed={KeyState.ENABLED}, done={KeyState.DISABLED}, target=KeyState.DISABLED,
            protect_default=True,
        )

    async def schedule_key_deletion(
        self, key: str, pending_days: int, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, now: datetime | None = None,
    ) -> KeyChange:
        """Pending deletion for 7..1096 days; a key already pending is left as it is."""
        return await self._transition(
            "schedule_key_deletion", key, account, actor,
            allowed={KeyState.ENABLED, KeyState.DISABLED, KeyState.PENDING_IMPORT},
            done={KeyState.PENDING_DELETION}, target=KeyState.PENDING_DELETION,
            protect_default=True, pending_days=pending_days, now=now,
        )

    async def cancel_key_deletion(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        now: datetime | None = None,
    ) -> KeyChange:
        """Back to *disabled* (the hosted service's rule); other states are left alone."""
        return await self._transition(
            "cancel_key_deletion", key, account, actor,
            allowed={KeyState.PENDING_DELETION},
            done={KeyState.ENABLED, KeyState.DISABLED, KeyState.PENDING_IMPORT},
            target=KeyState.DISABLED, protect_default=True, now=now,
        )

    async def delete_due_keys(
        self, now: datetime | None = None, *, actor: str | None = None
    ) -> DeletionReport:
        """Delete every key whose pending period is over; safe to run any number of times.

        Marking the key deleted comes first (guarded: a cancellation that wins
        the race keeps the key), destroying its token objects second; a run
        that stopped in between is finished by the next one.
        """
        now = now or self.clock()
        who = actor or self.actor
        deleted: list[str] = []
        await self.flush_audit()
        for key in await self.store.due_for_deletion(now):
            event = AuditEvent(now, key.account, who, "delete_key", key.key_id, "success",
                               {"scheduled_deletion_date": iso(key.scheduled_deletion_date)})
            marked = await self.store.change_state(
                key.key_id, [KeyState.PENDING_DELETION.value], KeyState.DELETED.value, now, event,
                scheduled_deletion_date=key.scheduled_deletion_date, deleted_at=now,
                due_by=now,
            )
            if marked is not None:
                deleted.append(key.key_id)
                log.info("key deleted", key_id=key.key_id, account=key.account)
        self._cache.clear()
        destroyed = 0
        for key in await self.store.deleted_with_material():
            destroyed += await self._destroy_material(key, now, who)
        expired = [key.key_id for key in await self.store.expired_material(now)
                   if await self._remove_imported(key, now, who, "material_expired")]
        for label in await self.store.expired_wrapping_labels(now):
            core = await self._core()
            await core.destroy_key(label)  # every import token using it has expired
        return DeletionReport(deleted, destroyed, expired)

    async def _destroy_material(self, key: KeyRecord, now: datetime, actor: str) -> int:
        count = 0
        for version in await self.store.versions(key.key_id):
            if version.destroyed_at is not None:
                continue
            try:
                core = await self._core()
                await core.destroy_key(version.token_label)
            except DewError as exc:
                await self._record(AuditEvent(
                    now, key.account, actor, "destroy_key_material", key.key_id, "failure",
                    {"version": version.version, "code": exc.code}))
                raise
            # Two runs at once (cron and a job) both get here; one records it.
            if await self.store.mark_version_destroyed(key.key_id, version.version, now):
                await self._record(AuditEvent(
                    now, key.account, actor, "destroy_key_material", key.key_id, "success",
                    {"version": version.version}))
                count += 1
        return count

    # ------------------------------------------------------------------ data keys

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
        async with self._audit(operation, account, actor, key) as op:
            account = check_account(account)
            bits = check_length_bits(length_bits)
            ctx = check_context(context)
            record = await self._usable(key, account)
            op.key_id, op.detail = record.key_id, {"length_bits": bits}
            header = CipherHeader(record.key_id, record.current_version, bits // 8,
                                  Purpose.DATA_KEY, context_digest(ctx))
            core = await self._core()
            label = token_label(record.key_id, record.current_version)
            dek = await self._in_token(record, core.generate_data_key(
                label, bits // 8, header.aad(ctx)))
            iv, body = unpack_sealed(dek.wrapped)
            blob = pack_ciphertext(header, iv, body)
            return DataKeyResult(record.key_id, dek.plaintext if keep_plaintext else None, blob)

    async def encrypt_datakey(
        self, key: str, plain_text: bytes, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> DataKeyResult:
        """Encrypt a caller's data key (16..64 bytes) under ``key``."""
        async with self._audit("encrypt_datakey", account, actor, key) as op:
            account = check_account(account)
            low, high = DATA_KEY_BYTES
            if not isinstance(plain_text, bytes | bytearray) or not low <= len(plain_text) <= high:
                raise InvalidInput(f"a data key must be {low}..{high} bytes "
                                   f"({low * 8}..{high * 8} bits)", code="invalid_datakey")
            ctx = check_context(encryption_context)
            record = await self._usable(key, account)
            op.key_id, op.detail = record.key_id, {"length_bits": len(plain_text) * 8}
            blob = await self._encrypt(record, bytes(plain_text), Purpose.DATA_KEY, ctx)
            return DataKeyResult(record.key_id, None, blob)

    async def decrypt_datakey(
        self, key: str, cipher_text: bytes, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> DataKeyResult:
        """The plaintext of a data key made by create-datakey / encrypt-datakey under ``key``."""
        async with self._audit("decrypt_datakey", account, actor, key) as op:
            account = check_account(account)
            ctx = check_context(encryption_context)
            header, iv, body = unpack_ciphertext(bytes(cipher_text), Purpose.DATA_KEY)
            record = await self._usable(key, account)
            op.key_id = record.key_id
            if header.key_id != record.key_id:
                raise InvalidInput(
                    f"this data key was not encrypted under {_name(record)}",
                    code="key_mismatch",
                    fix="Pass the key the data key was created with (decrypt-data needs none).",
                )
            plain = await self._decrypt(record, header, iv, body, ctx)
            return DataKeyResult(record.key_id, plain, bytes(cipher_text))

    # ------------------------------------------------------------------ encrypt-data

    async def encrypt_data(
        self, key: str, plain_text: bytes, *, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, encryption_context: dict[str, str] | None = None,
    ) -> EncryptResult:
        """Encrypt up to 4096 bytes directly under a CMK (self-describing ciphertext)."""
        async with self._audit("encrypt_data", account, actor, key) as op:
            account = check_account(account)
            data = check_plaintext(plain_text)
            ctx = check_context(encryption_context)
            record = await self._usable(key, account)
            op.key_id, op.detail = record.key_id, {"bytes": len(data)}
            blob = await self._encrypt(record, data, Purpose.DATA, ctx)
            return EncryptResult(record.key_id, blob)

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
            return await self._rsa_decrypt(cipher_text, key, encryption_algorithm, account,
                                           actor, encryption_context)
        async with self._audit("decrypt_data", account, actor, None) as op:
            account = check_account(account)
            ctx = check_context(encryption_context)
            blob = (decode_base64("cipher_text", cipher_text) if isinstance(cipher_text, str)
                    else bytes(cipher_text))
            if len(blob) > ciphertext_size(MAX_DATA_BYTES):
                raise InvalidInput("the ciphertext is longer than any encrypt-data output",
                                   code="invalid_ciphertext")
            header, iv, body = unpack_ciphertext(blob, Purpose.DATA)
            op.key_id = header.key_id
            record = await self._usable(header.key_id, account)
            plain = await self._decrypt(record, header, iv, body, ctx)
            op.detail = {"bytes": len(plain)}
            return DecryptResult(record.key_id, plain)

    async def gen_random(
        self, n: int, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> bytes:
        """``n`` (1..1024) random bytes from the token's RNG."""
        async with self._audit("gen_random", account, actor, None) as op:
            check_account(account)
            n = check_random_bytes(n)
            op.detail = {"bytes": n}
            core = await self._core()
            return await core.random_bytes(n)

    # ------------------------------------------------------------------ audit

    async def audit_list(
        self, key: str | None = None, *, account: str | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        """Audit entries, oldest first (the newest ``limit``); ``key`` is an id or an alias."""
        if not 1 <= limit <= 100_000:
            raise InvalidInput(f"limit must be between 1 and 100000, got {limit}")
        if account is not None:
            check_account(account)
        key_id = None
        if key is not None:
            ref = check_key_ref(key)
            if is_key_id(ref):
                key_id = ref
            else:
                found = await self.store.find_alias(account or DEFAULT_ACCOUNT, ref)
                found = found or await self.store.find_deleted_alias(
                    account or DEFAULT_ACCOUNT, ref)
                if found is None:
                    raise _not_found(ref, account or DEFAULT_ACCOUNT)
                key_id = found.key_id
        await self.flush_audit()
        return await self.store.list_audit(key_id=key_id, account=account, limit=limit)

    async def audit_verify(self) -> AuditVerdict:
        await self.flush_audit()
        return await self.store.verify_audit()
