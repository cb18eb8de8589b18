"""The KMS's results in the official SDK's shapes, and its request formats: plain
functions the API module and its tests call without a server.

HUAWEI_API.md §4-§6: key states are the codes "1".."5", KMS times are epoch
milliseconds sent as strings, ``truncated`` and ``key_rotation_enabled`` in
KeyDetails are the strings "true"/"false", and data keys travel in hex
(EncryptDatakey takes DEK ‖ SHA-256(DEK)).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from typing import Any

from engine.errors import InvalidInput
from handlers.kms.format import KeyState
from handlers.kms.results import KeyMetadata

STATE_CODES = {
    KeyState.ENABLED.value: "2",
    KeyState.DISABLED.value: "3",
    KeyState.PENDING_DELETION.value: "4",
    KeyState.PENDING_IMPORT.value: "5",
}
# "1" (pending activation) is a state this KMS never has: filtering by it lists nothing.
STATES_OF_CODE = {"1": None, **{code: state for state, code in STATE_CODES.items()}}
DIGEST_BYTES = 32  # SHA-256 after the DEK in EncryptDatakey's plain_text


def state_code(state: str) -> str:
    return STATE_CODES.get(state, "3")


def state_of_code(code: str) -> str | None:
    """The store's state of a ``key_state`` filter code; InvalidInput for another value."""
    if code not in STATES_OF_CODE:
        raise InvalidInput(f"key_state: must be one of 1, 2, 3, 4, 5, got {code!r}",
                           target="key_state")
    return STATES_OF_CODE[code]


def millis(when: datetime | None) -> str:
    """Epoch milliseconds as a string; "" when there is no such time."""
    return "" if when is None else str(int(when.timestamp() * 1000))


def seconds(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp())


def key_details(key: KeyMetadata, project_id: str, *,
                rotation_enabled: bool | None = None) -> dict[str, Any]:
    """One KeyDetails object."""
    details: dict[str, Any] = {
        "key_id": key.key_id,
        "domain_id": project_id,
        "key_alias": key.key_alias,
        "key_spec": key.key_spec,
        "key_usage": key.key_usage,
        "key_description": key.description,
        "creation_date": millis(key.created_at),
        "scheduled_deletion_date": millis(key.scheduled_deletion_date),
        "key_state": state_code(key.key_state),
        "default_key_flag": "1" if key.default_key else "0",
        "origin": key.origin,
        "sys_enterprise_project_id": "0",
        "keystore_id": "0",
    }
    if rotation_enabled is not None:
        details["key_rotation_enabled"] = "true" if rotation_enabled else "false"
    return details


def from_hex(name: str, value: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise InvalidInput(f"{name}: must be hexadecimal", target=name) from None


def from_base64(name: str, value: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise InvalidInput(f"{name}: must be Base64", target=name) from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def datakey_with_digest(data_key: bytes) -> str:
    """DEK ‖ SHA-256(DEK) in hex, as EncryptDatakey takes it."""
    return (data_key + hashlib.sha256(data_key).digest()).hex()


def split_datakey(plain_hex: str, plain_length: int) -> bytes:
    """The DEK of EncryptDatakey's ``plain_text`` (DEK ‖ SHA-256(DEK)), its digest checked."""
    blob = from_hex("plain_text", plain_hex)
    if len(blob) != plain_length + DIGEST_BYTES:
        raise InvalidInput(
            f"plain_text: must be the {plain_length}-byte data key followed by its 32-byte "
            f"SHA-256 ({(plain_length + DIGEST_BYTES) * 2} hex digits), got {len(blob)} bytes",
            target="plain_text")
    dek, digest = blob[:plain_length], blob[plain_length:]
    if not hmac.compare_digest(hashlib.sha256(dek).digest(), digest):
        raise InvalidInput("plain_text: the SHA-256 after the data key does not match it",
                           target="plain_text")
    return dek


def pem_body(pem: str) -> str:
    """The Base64 DER inside a PEM block (what import parameters' ``public_key`` carries)."""
    return "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))


def aad_context(aad: str | None) -> dict[str, str] | None:
    """``additional_authenticated_data`` as this KMS's encryption context."""
    return None if aad is None else {"aad": aad}
