"""Envelope encryption of one secret version: AES-256-GCM under a fresh data key.

The data key (DEK) comes from KMS ``create-datakey`` under the secret's CMK;
only its encrypted form is stored, beside the ciphertext. The additional
authenticated data binds a ciphertext to its account, secret and version, so a
row copied onto another secret or version fails to open instead of showing
the wrong value.
"""

from __future__ import annotations

import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.errors import SecurityError

NONCE_BYTES = 12


def aad(account: str, secret_id: str, version_id: str) -> bytes:
    return json.dumps(["dew-csms-v1", account, secret_id, version_id],
                      separators=(",", ":")).encode("utf-8")


def kms_context(account: str, secret_id: str, version_id: str) -> dict[str, str]:
    """The encryption context of a version's data key (KMS checks it on decrypt)."""
    return {"csms:secret": f"{account}/{secret_id}", "csms:version": version_id}


def seal(dek: bytes, plaintext: bytes, associated: bytes) -> tuple[bytes, bytes]:
    """(nonce, ciphertext||tag)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(dek).encrypt(nonce, plaintext, associated)


def open_sealed(dek: bytes, nonce: bytes, ciphertext: bytes, associated: bytes,
                where: str) -> bytes:
    try:
        return AESGCM(dek).decrypt(nonce, ciphertext, associated)
    except InvalidTag:
        raise SecurityError(
            f"integrity check failed for {where}: the stored ciphertext was changed or moved",
            code="secret_integrity", target=where,
            fix="Restore the task store from a backup; do not edit csms_versions by hand.",
        ) from None
