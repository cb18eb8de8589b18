"""KMS results: what the service's operations return, and their JSON shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, NamedTuple

from engine.models import iso
from handlers.kms.format import KeyUsage, b64
from handlers.kms.store import GrantRecord, KeyRecord, RotationRecord, UsageRecord


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


@dataclass(frozen=True)
class KeyPage:
    """One page of list-keys: ``next_marker`` is None on the last page; ``total`` counts
    every key the filters match."""

    keys: list[KeyMetadata]
    next_marker: str | None
    total: int

    @property
    def truncated(self) -> bool:
        return self.next_marker is not None

    def to_json(self) -> dict[str, Any]:
        return {"keys": [k.to_json() for k in self.keys], "next_marker": self.next_marker,
                "truncated": self.truncated, "total": self.total}


class TaggedKey(NamedTuple):
    """A key found by its tags, with all its tags (unpacks as ``(key, tags)``)."""

    key: KeyMetadata
    tags: list[tuple[str, str]]

    def to_json(self) -> dict[str, Any]:
        return {"resource_id": self.key.key_id, "resource_name": self.key.key_alias,
                "resource_detail": self.key.to_json(),
                "tags": [{"key": k, "value": v} for k, v in self.tags]}


class TaggedKeys(NamedTuple):
    """keys_by_tags: one page of matches and how many match in all (unpacks as
    ``(resources, total)``)."""

    resources: list[TaggedKey]
    total: int

    def to_json(self) -> dict[str, Any]:
        return {"resources": [r.to_json() for r in self.resources], "total_count": self.total}


@dataclass(frozen=True)
class QuotaUsage:
    type: str  # CMK | grant_per_CMK
    used: int
    quota: int

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "used": self.used, "quota": self.quota}


@dataclass(frozen=True)
class Grant:
    """A grant on a key (Huawei's ``Grants`` object; ``creation_date`` in ISO 8601)."""

    key_id: str
    grant_id: str
    name: str | None
    grantee_principal: str
    grantee_principal_type: str
    operations: tuple[str, ...]
    issuing_principal: str
    retiring_principal: str | None
    created_at: datetime

    @classmethod
    def of(cls, grant: GrantRecord) -> Grant:
        return cls(grant.key_id, grant.grant_id, grant.name, grant.grantee_principal,
                   grant.grantee_principal_type, grant.operations, grant.issuing_principal,
                   grant.retiring_principal, grant.created_at)

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "grant_id": self.grant_id, "name": self.name,
                "grantee_principal": self.grantee_principal,
                "grantee_principal_type": self.grantee_principal_type,
                "operations": list(self.operations),
                "issuing_principal": self.issuing_principal,
                "retiring_principal": self.retiring_principal,
                "creation_date": iso(self.created_at)}


@dataclass(frozen=True)
class GrantPage:
    grants: list[Grant]
    next_marker: str | None
    total: int

    @property
    def truncated(self) -> bool:
        return self.next_marker is not None

    def to_json(self) -> dict[str, Any]:
        return {"grants": [g.to_json() for g in self.grants], "next_marker": self.next_marker,
                "truncated": self.truncated, "total": self.total}


@dataclass(frozen=True)
class UsageRow:
    """Uses of one key on one UTC day (data keys, encrypt/decrypt, sign/verify, MACs)."""

    account: str
    key_id: str
    key_alias: str
    day: date
    count: int

    @classmethod
    def of(cls, record: UsageRecord) -> UsageRow:
        return cls(record.account, record.key_id, record.key_alias,
                   date.fromisoformat(record.day), record.count)

    def to_json(self) -> dict[str, Any]:
        return {"account": self.account, "key_id": self.key_id, "key_alias": self.key_alias,
                "day": self.day.isoformat(), "count": self.count}


def protection(spec: str) -> str:
    """``hsm``: the key lives in the token; ``hsm-wrapped``: the token cannot hold it
    (ML-DSA in SoftHSM), so it is stored wrapped under a token AES key (RFC 5649)
    and unwrapped in memory only for an operation."""
    return "hsm-wrapped" if spec.startswith("ML_DSA") else "hsm"
