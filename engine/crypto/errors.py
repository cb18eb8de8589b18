"""Crypto-specific refinements of the engine's one error hierarchy.

Each class subclasses a class of :mod:`engine.errors`, so the worker, the CLI
and failure records treat them like their parents; they only fix a stable code
and a default fix. python-pkcs11 exceptions become these (or their parents) in
exactly one place: :func:`engine.crypto._pkcs11.translate`.

    SecurityError
    ├── IntegrityCheckFailed    GCM tag / AAD mismatch: wrong key, AAD or tampered data
    └── DecryptionFailed        RSA decryption or OAEP decoding failed (one error for all)
    NotFound
    └── KeyNotFound             no key object with that label in the token
    Conflict
    └── KeyExists               a key object with that label already exists
    InvalidInput
    └── KeyUsageError           the key's type cannot do the operation asked
    BackendUnavailable
    └── HsmUnreachable          the HSM (e.g. a p11-kit socket) does not answer: retried
"""

from __future__ import annotations

from engine.errors import BackendUnavailable, Conflict, InvalidInput, NotFound, SecurityError


class IntegrityCheckFailed(SecurityError):
    code = "integrity_check_failed"
    default_fix = (
        "Use the same key and additional authenticated data as at encryption; "
        "if they match, the ciphertext was altered or truncated."
    )


class KeyNotFound(NotFound):
    code = "key_not_found"
    default_fix = "Check the key label; the key may have been deleted."


class KeyExists(Conflict):
    code = "key_exists"
    default_fix = "Choose another label, or use the existing key."


class KeyUsageError(InvalidInput):
    code = "key_usage_mismatch"
    default_fix = "Use a key whose spec supports this operation."


class DecryptionFailed(SecurityError):
    """The one error of asymmetric decryption, whatever failed (no padding oracle)."""

    code = "decryption_failed"
    default_fix = (
        "Check the key and the encryption algorithm used at encryption (e.g. "
        "RSAES_OAEP_SHA_256 with MGF1-SHA-256); if they match, the ciphertext was altered."
    )


class HsmUnreachable(BackendUnavailable):
    """The HSM cannot be reached (a network module's server is down, its connection
    was lost). Retryable: the crypto core reconnects by itself once it answers."""

    code = "hsm_unreachable"
    default_fix = ("Check that the HSM is up (for p11-kit: `dew hsm serve` on the HSM node "
                   "and the socket in hsm.server_address); the engine reconnects by itself.")
