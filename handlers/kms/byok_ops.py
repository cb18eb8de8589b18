"""The KMS service's BYOK part: import parameters, importing and deleting key material."""

from __future__ import annotations

import contextlib
import hmac
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization

from engine.crypto import KeySpec
from engine.errors import Conflict, InvalidInput
from engine.logs import get_logger
from engine.models import iso
from handlers.kms.byok import (
    WRAPPING_ALGORITHMS,
    WRAPPING_KEY_BITS,
    check_algorithm_fits,
    check_wrapping_algorithm,
    public_fingerprint_input,
    secret_length,
    unwrap_private_key,
)
from handlers.kms.core import AuditOp, KmsCore, key_name, token_label
from handlers.kms.errors import ImportInProgress, KeyStateError
from handlers.kms.format import DEFAULT_ACCOUNT, KeyState, check_account, decode_base64
from handlers.kms.results import ImportParameters, KeyChange, KeyMetadata
from handlers.kms.store import AuditEvent, ImportToken, KeyRecord

log = get_logger("dew.kms")


IMPORT_TOKEN_TTL = timedelta(hours=24)
# The per-key lease held while a key's token object is replaced (import) or destroyed
# (removal of material): two imports of one key never touch its label together.
MATERIAL_LEASE = "material"
MATERIAL_LEASE_TIME = timedelta(minutes=5)
# The HMAC key behind imported material's fingerprints (one per token, made on first use).
FINGERPRINT_LABEL = "kms:import-fingerprint"


class KeyImport:
    """Bring your own key: import parameters, import and removal of key material."""

    def __init__(self, core: KmsCore) -> None:
        self.core = core

    async def get_parameters_for_import(
        self, key: str, wrapping_algorithm: str = "RSAES_OAEP_SHA_256", *,
        account: str = DEFAULT_ACCOUNT, actor: str | None = None, now: datetime | None = None,
    ) -> ImportParameters:
        """A wrapping public key (RSA 4096, in the token) and an import token, both
        valid 24 hours. The account's wrapping key is reused for a day (generating
        one takes seconds); each call gets its own token."""
        async with self.core.audit("get_parameters_for_import", account, actor, key) as op:
            account = check_account(account)
            algorithm = check_wrapping_algorithm(wrapping_algorithm)
            record = await self._importable(key, account, op)
            check_algorithm_fits(algorithm, KeySpec(record.spec))
            when = now or self.core.clock()
            core = await self.core.crypto()
            label = await self.core.store.current_wrapping_label(account, when - IMPORT_TOKEN_TTL)
            if label is None or not await core.key_exists(label):
                label = f"kms-import:{account}:{uuid.uuid4()}"
                await core.generate_wrapping_key(label, WRAPPING_KEY_BITS)
            der = await core.public_key_spki_der(label)
            pem = serialization.load_der_public_key(der).public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            token = ImportToken(_import_token(), record.key_id, account, algorithm,
                                label, when, when + IMPORT_TOKEN_TTL)
            op.detail = {"wrapping_algorithm": algorithm, "expiration_time": iso(token.expires_at)}
            await self.core.flush_audit()
            await self.core.store.add_import_token(token, AuditEvent(
                when, account, actor or self.core.actor, "get_parameters_for_import",
                record.key_id, "success", op.detail))
            op.recorded = True
            return ImportParameters(record.key_id, pem.decode("ascii"), token.token,
                                    token.expires_at, algorithm)

    async def import_key_material(
        self, key: str, import_token: str, encrypted_key_material: bytes | str, *,
        expiration_time: datetime | None = None, account: str = DEFAULT_ACCOUNT,
        actor: str | None = None, now: datetime | None = None,
    ) -> KeyMetadata:
        """Unwrap material made with :func:`handlers.kms.byok.wrap_key_material` into
        the token (sensitive, not extractable); the key becomes enabled."""
        async with self.core.audit("import_key_material", account, actor, key) as op:
            account = check_account(account)
            blob = (decode_base64("encrypted_key_material", encrypted_key_material)
                    if isinstance(encrypted_key_material, str) else bytes(encrypted_key_material))
            record = await self._importable(key, account, op)
            when = now or self.core.clock()
            token = await self.core.store.get_import_token(str(import_token))
            if token is None or token.key_id != record.key_id or token.account != account:
                raise InvalidInput(f"the import token is not one issued for {key_name(record)}",
                                   code="invalid_import_token",
                                   fix="Use the token from get-parameters-for-import of this key.")
            if when >= token.expires_at:
                raise InvalidInput(
                    f"the import token expired on {iso(token.expires_at)}",
                    code="import_token_expired",
                    fix="Get new import parameters and wrap the material again.")
            if expiration_time is not None and expiration_time.tzinfo is None:
                raise InvalidInput("the expiration time needs a time zone",
                                   code="invalid_expiration_time")
            if expiration_time is not None and expiration_time <= when:
                raise InvalidInput("the expiration time is in the past",
                                   code="invalid_expiration_time")
            spec = KeySpec(record.spec)
            check_algorithm_fits(token.algorithm, spec)
            op.detail = {"wrapping_algorithm": token.algorithm,
                         "expiration_time": iso(expiration_time)}
            core = await self.core.crypto()
            hash_name = WRAPPING_ALGORITHMS[token.algorithm]
            label = token_label(record.key_id, 1)
            key_id_attr = f"{record.key_id}:v1".encode()
            if spec.is_asymmetric:
                k = WRAPPING_KEY_BITS // 8
                aes_key = await core.rsa_oaep_decrypt(token.wrapping_label, blob[:k], hash_name)
                private = unwrap_private_key(aes_key, blob[k:], spec)
                fingerprint = await self._fingerprint(spec, public_fingerprint_input(private))
                await self._check_same_material(record, fingerprint)
                def create() -> Awaitable[Any]:
                    return core.import_key_pair(spec, label, key_id_attr, private)
            else:
                material = await core.rsa_oaep_decrypt(token.wrapping_label, blob, hash_name)
                if len(material) != secret_length(spec):
                    raise InvalidInput(f"{spec.value} material is {secret_length(spec)} bytes, "
                                       f"got {len(material)}", code="invalid_key_material")
                fingerprint = await self._fingerprint(spec, material)
                await self._check_same_material(record, fingerprint)
                def create() -> Awaitable[Any]:
                    return core.import_secret_key(spec, label, key_id_attr, material)
            event = AuditEvent(when, account, actor or self.core.actor, "import_key_material",
                               record.key_id, "success", op.detail)
            async with self._material_lease(record, when) as lease:
                # Under the lease, and still pending import: no registered material, so an
                # object under the label is an orphan of an earlier attempt or of a removal
                # that did not finish. Replace it.
                await self._still_pending(record)
                await core.destroy_key(label)
                await create()
                await self.core.flush_audit()
                done = await self.core.store.finish_import(
                    record.key_id, fingerprint, expiration_time, when, event, lease=lease)
                if done is None:
                    # Ours and unregistered while we hold the lease; otherwise the label
                    # may hold what another import registered: leave it.
                    if await self.core.store.renew_lease(record.key_id, MATERIAL_LEASE, lease,
                                                         lease):
                        await self.core.discard(core, label)
                    raise KeyStateError(f"key {key_name(record)} changed during the import; "
                                        "check its state", target=record.key_id)
            op.recorded = True
            self.core.forget_keys()
            return KeyMetadata.of(done)

    async def delete_imported_key_material(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
        now: datetime | None = None,
    ) -> KeyChange:
        """Destroy imported material; the key waits for the same material again."""
        async with self.core.audit("delete_imported_key_material", account, actor, key) as op:
            record = await self.core.lookup(key, check_account(account), create_default=False)
            op.key_id = record.key_id
            if record.origin != "external":
                raise KeyStateError(f"key {key_name(record)} was generated by KMS: it has no "
                                    "imported material", target=record.key_id,
                                    fix="Schedule its deletion instead.")
            if record.state == KeyState.PENDING_IMPORT:
                op.outcome = "unchanged"
                return KeyChange(KeyMetadata.of(record), False)
            changed = await self.remove_imported(record, now or self.core.clock(),
                                                  actor or self.core.actor,
                                                  "delete_imported_key_material")
            if not changed:
                raise self.core.state_refusal(record, "delete_imported_key_material")
            op.recorded = True
            fresh = await self.core.store.get_key(record.key_id)
            return KeyChange(KeyMetadata.of(fresh or record), True)

    async def remove_imported(
        self, key: KeyRecord, now: datetime, actor: str, operation: str
    ) -> bool:
        """enabled/disabled -> pending_import (audited), then destroy the token objects;
        under the key's material lease, so no import replaces the object meanwhile."""
        event = AuditEvent(now, key.account, actor, operation, key.key_id, "success",
                           {"from": key.state, "to": KeyState.PENDING_IMPORT.value})
        async with self._material_lease(key, now) as lease:
            await self.core.flush_audit()
            changed = await self.core.store.change_state(
                key.key_id, [KeyState.ENABLED.value, KeyState.DISABLED.value],
                KeyState.PENDING_IMPORT.value, now, event)
            if changed is None:
                return False
            self.core.forget_keys()
            core = await self.core.crypto()
            if not await self.core.store.renew_lease(key.key_id, MATERIAL_LEASE, lease, lease):
                # Held too long: an import may own the label now. The key is pending
                # import; that import (or the next) replaces what is there.
                log.warning("material lease lost; token object left to the next import",
                            key_id=key.key_id)
                return True
            # If this fails, the orphan object is replaced by the next import.
            await core.destroy_key(token_label(key.key_id, 1))
        log.info("imported key material removed", key_id=key.key_id, reason=operation)
        return True

    @contextlib.asynccontextmanager
    async def _material_lease(self, key: KeyRecord, now: datetime) -> AsyncIterator[datetime]:
        """Hold the key's material lease (ImportInProgress if another holder has it);
        yields the lease's end, which identifies it in guarded updates."""
        until = now + MATERIAL_LEASE_TIME
        if not await self.core.store.claim_lease(key.key_id, MATERIAL_LEASE, now, until):
            raise ImportInProgress(
                f"an import or removal of the material of {key_name(key)} is already running",
                target=key.key_id)
        try:
            yield until
        finally:
            await self.core.store.release_lease(key.key_id, MATERIAL_LEASE, until)

    async def _still_pending(self, key: KeyRecord) -> None:
        """Re-read under the lease: another import may have finished since the check."""
        fresh = await self.core.store.get_key(key.key_id)
        if fresh is None or fresh.state != KeyState.PENDING_IMPORT:
            state = fresh.state.replace("_", " ") if fresh else "gone"
            raise KeyStateError(
                f"key {key_name(key)} is {state} now, not pending import: another request "
                "imported or changed it meanwhile", target=key.key_id,
                fix="Check the key with dew kms describe-key; it may already have the material.")

    async def _importable(self, ref: str, account: str, op: AuditOp) -> KeyRecord:
        record = await self.core.lookup(ref, account, create_default=False)
        op.key_id = record.key_id
        if record.origin != "external":
            raise KeyStateError(
                f"key {key_name(record)} was generated by KMS; only keys created with "
                "--origin external take imported material", target=record.key_id,
                fix="Create a key with create-key --origin external.")
        if record.state != KeyState.PENDING_IMPORT:
            raise KeyStateError(
                f"key {key_name(record)} is {record.state.replace('_', ' ')}, not pending import",
                target=record.key_id,
                fix="Delete its imported material first (delete-imported-key-material).")
        return record

    async def _fingerprint(self, spec: KeySpec, material: bytes) -> str:
        """A keyed fingerprint (HMAC in the token): identifies material without revealing
        it to whoever reads the registry."""
        core = await self.core.crypto()
        await core.ensure_key(KeySpec.HMAC_256, FINGERPRINT_LABEL, b"kms:fingerprint")
        tag = await core.sign(FINGERPRINT_LABEL, spec.value.encode() + b"\0" + material,
                              "HMAC_SHA256")
        return tag.hex()

    async def _check_same_material(self, key: KeyRecord, fingerprint: str) -> None:
        previous = await self.core.store.get_import(key.key_id)
        if previous is not None and not hmac.compare_digest(previous.fingerprint, fingerprint):
            raise Conflict(
                f"key {key_name(key)} had other key material: only the identical material can "
                "be imported again", code="import_material_mismatch", target=key.key_id,
                fix="Import the material imported first, or create a new key for new material.")


def _import_token() -> str:
    """A random import token that does not start with '-': a command line (``dew kms
    import-key-material --import-token T``) would read such a token as an option."""
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token
