"""ML-DSA (FIPS 204) with `cryptography`, for tokens without it (SoftHSM 2.6.1).

The private key is its 32-byte seed; the KMS keeps that seed only wrapped under
a token AES key (``protection: hsm-wrapped``) and calls these with the seed
unwrapped for one operation. When a token offers ``CKM_ML_DSA`` (PKCS#11 3.2)
the key could live in the token instead; that path is not implemented yet.
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from engine.crypto import KeySpec
from engine.errors import InvalidInput

CKM_ML_DSA = 0x1D  # PKCS#11 3.2, to ask a token whether it signs with ML-DSA itself
_PRIVATE: dict[KeySpec, Any] = {
    KeySpec.ML_DSA_44: mldsa.MLDSA44PrivateKey,
    KeySpec.ML_DSA_65: mldsa.MLDSA65PrivateKey,
    KeySpec.ML_DSA_87: mldsa.MLDSA87PrivateKey,
}
_PUBLIC = (mldsa.MLDSA44PublicKey, mldsa.MLDSA65PublicKey, mldsa.MLDSA87PublicKey)


def ml_dsa_generate(spec: KeySpec) -> tuple[bytes, bytes]:
    """(seed, DER SubjectPublicKeyInfo) of a new key."""
    key = _PRIVATE[spec].generate()
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return bytes(key.private_bytes_raw()), bytes(public)


def ml_dsa_sign(spec: KeySpec, seed: bytes, message: bytes) -> bytes:
    return bytes(_PRIVATE[spec].from_seed_bytes(seed).sign(message))


def ml_dsa_verify(public: object, signature: bytes, message: bytes) -> bool:
    if not isinstance(public, _PUBLIC):
        raise InvalidInput("the stored public key is not an ML-DSA key")
    try:
        public.verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
