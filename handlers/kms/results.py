"""KMS results: what the service's operations return, and their JSON shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.models import iso
from handlers.kms.format import KeyUsage, b64
from handlers.kms.store import KeyRecord, RotationRecord


@dataclass(frozen=True)
class KeyMetadata:
    """What describe-key / list-keys show (the JSON contract of ``dew kms``)."""

    key_id: str
    key_alias: str
    key_spec: str
    key_usage: str
    key_state: str
    origin: str
    default_key: bool
    scheduled_deletion_date: datetime | None
    account: str
    created_at: datetime
    description: str
    key_version: int

    @classmethod
    def of(cls, key: KeyRecord) -> KeyMetadata:
        return cls(key.key_id, key.alias, key.spec, key.usage, key.state, key.origin,
                   key.default_key, key.scheduled_deletion_date, key.account, key.created_at,
                   key.description, key.current_version)

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id, "key_alias": self.key_alias, "key_spec": self.key_spec,
            "key_usage": self.key_usage, "key_state": self.key_state, "origin": self.origin,
            "default_key": self.default_key,
            "scheduled_deletion_date": iso(self.scheduled_deletion_date),
            "account": self.account, "created_at": iso(self.created_at),
            "description": self.description, "key_version": self.key_version,
            "protection": protection(self.key_spec),
        }


@dataclass(frozen=True)
class KeyChange:
    key: KeyMetadata
    changed: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.key.to_json(), "changed": self.changed}


@dataclass(frozen=True, repr=False)
class DataKeyResult:
    key_id: str
    plain_text: bytes | None
    cipher_text: bytes

    def __repr__(self) -> str:  # the plaintext DEK must never reach a log line
        shown = "None" if self.plain_text is None else f"<{len(self.plain_text)} bytes hidden>"
        return f"DataKeyResult(key_id={self.key_id!r}, plain_text={shown}, ...)"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key_id": self.key_id}
        if self.plain_text is not None:
            out["plain_text"] = self.plain_text.hex()
        out["cipher_text"] = self.cipher_text.hex()
        return out


@dataclass(frozen=True)
class EncryptResult:
    key_id: str
    cipher_text: bytes

    @property
    def cipher_text_base64(self) -> str:
        return b64(self.cipher_text)

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "cipher_text": self.cipher_text_base64}


@dataclass(frozen=True, repr=False)
class DecryptResult:
    key_id: str
    plain_text: bytes

    def __repr__(self) -> str:
        return f"DecryptResult(key_id={self.key_id!r}, plain_text=<{len(self.plain_text)} bytes>)"

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "plain_text_base64": b64(self.plain_text)}


@dataclass(frozen=True)
class SignResult:
    key_id: str
    signature: bytes
    signing_algorithm: str

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "signature": b64(self.signature),
                "signing_algorithm": self.signing_algorithm}


@dataclass(frozen=True)
class VerifyResult:
    key_id: str
    valid: bool
    algorithm: str
    what: str = "signature"  # or "mac"

    def to_json(self) -> dict[str, Any]:
        name = "signing_algorithm" if self.what == "signature" else "mac_algorithm"
        return {"key_id": self.key_id, f"{self.what}_valid": self.valid, name: self.algorithm}


@dataclass(frozen=True)
class MacResult:
    key_id: str
    mac: bytes
    mac_algorithm: str

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "mac": b64(self.mac), "mac_algorithm": self.mac_algorithm}


@dataclass(frozen=True)
class PublicKeyResult:
    key_id: str
    key_spec: str
    key_usage: str
    public_key_pem: str
    algorithms: list[str]

    def to_json(self) -> dict[str, Any]:
        name = ("encryption_algorithms" if self.key_usage == KeyUsage.ENCRYPT_DECRYPT
                else "signing_algorithms")
        return {"key_id": self.key_id, "key_spec": self.key_spec, "key_usage": self.key_usage,
                "public_key": self.public_key_pem, name: self.algorithms}


@dataclass(frozen=True)
class RotationStatus:
    """What get-key-rotation-status shows."""

    key_id: str
    enabled: bool
    interval_days: int | None
    last_rotation: datetime | None
    next_rotation: datetime | None
    rotations: int
    key_version: int

    @classmethod
    def of(cls, key: KeyRecord, rotation: RotationRecord | None) -> RotationStatus:
        if rotation is None:
            return cls(key.key_id, False, None, None, None, 0, key.current_version)
        return cls(key.key_id, rotation.enabled,
                   rotation.interval_days if rotation.enabled else None,
                   rotation.last_rotated_at, rotation.next_rotation_at if rotation.enabled
                   else None, rotation.rotations, key.current_version)

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "rotation_enabled": self.enabled,
                "rotation_interval_days": self.interval_days,
                "last_rotation": iso(self.last_rotation),
                "next_rotation": iso(self.next_rotation),
                "number_of_rotations": self.rotations, "key_version": self.key_version}


@dataclass(frozen=True)
class RotationChange:
    status: RotationStatus
    changed: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.status.to_json(), "changed": self.changed}


@dataclass(frozen=True)
class DeletionReport:
    deleted: list[str]
    versions_destroyed: int
    expired_material: list[str] = field(default_factory=list)  # imported, now pending import

    def to_json(self) -> dict[str, Any]:
        return {"deleted": self.deleted, "versions_destroyed": self.versions_destroyed,
                "expired_material": self.expired_material}


@dataclass(frozen=True)
class ImportParameters:
    key_id: str
    public_key_pem: str
    import_token: str
    expiration_time: datetime
    wrapping_algorithm: str

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "public_key": self.public_key_pem,
                "import_token": self.import_token,
                "expiration_time": iso(self.expiration_time),
                "wrapping_algorithm": self.wrapping_algorithm}


def protection(spec: str) -> str:
    """``hsm``: the key lives in the token; ``hsm-wrapped``: the token cannot hold it
    (ML-DSA in SoftHSM), so it is stored wrapped under a token AES key (RFC 5649)
    and unwrapped in memory only for an operation."""
    return "hsm-wrapped" if spec.startswith("ML_DSA") else "hsm"
