"""The KMS service's asymmetric part: sign/verify, public keys, HMACs, RSA-OAEP decrypt."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_der_public_key

from engine.crypto import KeySpec, KeyUsageError
from engine.crypto.model import KeyFamily
from engine.errors import ConfigError, InvalidInput
from handlers.kms.asym import (
    ECDSA_CURVE,
    ENCRYPTION,
    MAC,
    MAX_SIGNATURE_BYTES,
    SIGNING,
    SignRequest,
    check_encryption_algorithm,
    check_mac_algorithm,
    check_mac_message,
    check_sign_key,
    sign_request,
)
from handlers.kms.core import AuditOp, KmsCore, key_name, token_label
from handlers.kms.format import DEFAULT_ACCOUNT, KeyUsage, check_account, decode_base64
from handlers.kms.mldsa import ml_dsa_sign, ml_dsa_verify
from handlers.kms.results import DecryptResult, MacResult, PublicKeyResult, SignResult, VerifyResult
from handlers.kms.store import KeyRecord, WrappedKey


class Signing:
    """Sign and verify, public keys, HMAC, RSA-OAEP decryption."""

    def __init__(self, core: KmsCore) -> None:
        self.core = core

    async def sign(
        self, key: str, message: bytes, algorithm: str, message_type: str = "RAW", *,
        account: str = DEFAULT_ACCOUNT, actor: str | None = None,
    ) -> SignResult:
        """Sign ``message`` (RAW: at most 4096 bytes, hashed here; DIGEST: its digest)."""
        async with self.core.audit("sign", account, actor, key) as op:
            account = check_account(account)
            request = sign_request(algorithm, message, message_type)
            op.detail = {"algorithm": request.algorithm, "message_type": request.message_type}
            record = await self._signing_key(key, account, request, op)
            core = await self.core.crypto()
            label = token_label(record.key_id, record.current_version)
            if request.ml_dsa is not None:
                signature = await self._ml_dsa_sign(record, request.digest)
            else:
                assert request.core_algorithm is not None
                signature = await self.core.in_token(record, core.sign_digest(
                    label, request.digest, request.core_algorithm))
            return SignResult(record.key_id, signature, request.algorithm)

    async def verify(
        self, key: str, message: bytes, signature: bytes, algorithm: str,
        message_type: str = "RAW", *, account: str = DEFAULT_ACCOUNT, actor: str | None = None,
    ) -> VerifyResult:
        """Whether ``signature`` is valid for ``message`` (checked in the token)."""
        async with self.core.audit("verify", account, actor, key) as op:
            account = check_account(account)
            request = sign_request(algorithm, message, message_type)
            if not isinstance(signature, bytes | bytearray) or not (
                0 < len(signature) <= MAX_SIGNATURE_BYTES
            ):
                raise InvalidInput(f"the signature must be 1..{MAX_SIGNATURE_BYTES} bytes",
                                   code="invalid_signature")
            op.detail = {"algorithm": request.algorithm, "message_type": request.message_type}
            record = await self._signing_key(key, account, request, op)
            if request.ml_dsa is not None:
                public = load_der_public_key((await self._wrapped(record)).public_key)
                valid = ml_dsa_verify(public, bytes(signature), request.digest)
            else:
                assert request.core_algorithm is not None
                core = await self.core.crypto()
                valid = await self.core.in_token(record, core.verify_digest(
                    token_label(record.key_id, record.current_version), request.digest,
                    bytes(signature), request.core_algorithm))
            op.detail["valid"] = valid
            return VerifyResult(record.key_id, valid, request.algorithm)

    async def get_public_key(
        self, key: str, *, account: str = DEFAULT_ACCOUNT, actor: str | None = None
    ) -> PublicKeyResult:
        """The public half of an RSA / EC key as SubjectPublicKeyInfo PEM."""
        async with self.core.audit("get_public_key", account, actor, key) as op:
            record = await self.core.enabled(key, check_account(account))
            op.key_id = record.key_id
            if not KeySpec(record.spec).is_asymmetric:
                raise KeyUsageError(f"key {key_name(record)} is a {record.spec} key: it has no "
                                    "public key", target=record.key_id)
            if KeySpec(record.spec).family is KeyFamily.MLDSA:
                der = (await self._wrapped(record)).public_key
            else:
                core = await self.core.crypto()
                der = await self.core.in_token(record, core.public_key_spki_der(
                    token_label(record.key_id, record.current_version)))
            pem = serialization.load_der_public_key(der).public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            return PublicKeyResult(record.key_id, record.spec, record.usage,
                                   pem.decode("ascii"), _algorithms_of(record))

    async def generate_mac(
        self, key: str, message: bytes, algorithm: str | None = None, *,
        account: str = DEFAULT_ACCOUNT, actor: str | None = None,
    ) -> MacResult:
        """HMAC of ``message`` (at most 4096 bytes) in the token with an HMAC key."""
        async with self.core.audit("generate_mac", account, actor, key) as op:
            account = check_account(account)
            data = check_mac_message(message)
            record, algo = await self._mac_key(key, account, algorithm, op)
            core = await self.core.crypto()
            mac = await self.core.in_token(record, core.sign(
                token_label(record.key_id, record.current_version), data, algo))
            return MacResult(record.key_id, mac, op.detail["algorithm"])

    async def verify_mac(
        self, key: str, message: bytes, mac: bytes, algorithm: str | None = None, *,
        account: str = DEFAULT_ACCOUNT, actor: str | None = None,
    ) -> VerifyResult:
        """Whether ``mac`` is the HMAC of ``message`` (compared in the token)."""
        async with self.core.audit("verify_mac", account, actor, key) as op:
            account = check_account(account)
            data = check_mac_message(message)
            if not isinstance(mac, bytes | bytearray) or not 0 < len(mac) <= 64:
                raise InvalidInput("the MAC must be 1..64 bytes", code="invalid_mac")
            record, algo = await self._mac_key(key, account, algorithm, op)
            core = await self.core.crypto()
            valid = await self.core.in_token(record, core.verify(
                token_label(record.key_id, record.current_version), data, bytes(mac), algo))
            op.detail["valid"] = valid
            return VerifyResult(record.key_id, valid, op.detail["algorithm"], "mac")

    async def rsa_decrypt(
        self, cipher_text: bytes | str, key: str | None, algorithm: str, account: str,
        actor: str | None, encryption_context: dict[str, str] | None,
    ) -> DecryptResult:
        async with self.core.audit("decrypt_data", account, actor, key) as op:
            account = check_account(account)
            hash_name = check_encryption_algorithm(algorithm)
            op.detail = {"algorithm": algorithm}
            if key is None:
                raise InvalidInput(f"{algorithm} needs the key (--key): an RSA ciphertext "
                                   "does not name it", code="key_required")
            if encryption_context:
                raise InvalidInput("RSA ciphertexts take no encryption context",
                                   code="invalid_encryption_context")
            blob = (decode_base64("cipher_text", cipher_text) if isinstance(cipher_text, str)
                    else bytes(cipher_text))
            record = await self.core.enabled(key, account)
            op.key_id = record.key_id
            if record.spec.split("_", 1)[0] != "RSA" or record.usage != KeyUsage.ENCRYPT_DECRYPT:
                raise KeyUsageError(
                    f"key {key_name(record)} is a {record.spec} key for {record.usage}; {algorithm}"
                    " needs an RSA ENCRYPT_DECRYPT key", target=record.key_id)
            core = await self.core.crypto()
            plain = await self.core.in_token(record, core.rsa_oaep_decrypt(
                token_label(record.key_id, record.current_version), blob, hash_name))
            op.detail["bytes"] = len(plain)
            return DecryptResult(record.key_id, plain)

    async def _wrapped(self, record: KeyRecord) -> WrappedKey:
        wrapped = await self.core.store.get_wrapped(record.key_id, record.current_version)
        if wrapped is None:
            raise ConfigError(f"the registry has no wrapped private key for {key_name(record)}",
                              code="hsm_key_material_missing",
                              cause="the key registry is incomplete")
        return wrapped

    async def _ml_dsa_sign(self, record: KeyRecord, message: bytes) -> bytes:
        """Unwrap the private key in the token, sign in memory, forget it."""
        wrapped = await self._wrapped(record)
        core = await self.core.crypto()
        seed = await self.core.in_token(record, core.unwrap_secret(
            token_label(record.key_id, record.current_version), wrapped.wrapped))
        return ml_dsa_sign(KeySpec(record.spec), seed, message)

    async def _signing_key(
        self, ref: str, account: str, request: SignRequest, op: AuditOp
    ) -> KeyRecord:
        record = await self.core.enabled(ref, account)
        op.key_id = record.key_id
        try:
            check_sign_key(record.spec, record.usage, request.algorithm, key_name(record))
        except KeyUsageError as exc:
            exc.target = record.key_id
            raise
        return record

    async def _mac_key(
        self, ref: str, account: str, algorithm: str | None, op: AuditOp
    ) -> tuple[KeyRecord, Any]:
        record = await self.core.enabled(ref, account)
        op.key_id = record.key_id
        if record.usage != KeyUsage.GENERATE_VERIFY_MAC:
            raise KeyUsageError(f"key {key_name(record)} is a {record.spec} key for "
                                f"{record.usage}; MACs need a GENERATE_VERIFY_MAC key",
                                target=record.key_id)
        try:
            algo = check_mac_algorithm(algorithm, record.spec, key_name(record))
        except KeyUsageError as exc:
            exc.target = record.key_id
            raise
        op.detail = {"algorithm": next(n for n, (_, a) in MAC.items() if a is algo)}
        return record, algo


def _algorithms_of(key: KeyRecord) -> list[str]:
    """What get-public-key lists as usable with the key."""
    if key.spec.startswith("ML_DSA"):
        return [key.spec]
    if key.usage == KeyUsage.ENCRYPT_DECRYPT:
        return list(ENCRYPTION)
    if key.spec.startswith("EC"):
        return [name for name, spec in ECDSA_CURVE.items() if spec.value == key.spec]
    return [name for name in SIGNING if name.startswith("RSASSA")]
