"""Pure values of the crypto core: key specs, results, the sealed-blob format.

Nothing here touches the token, so all of it is tested without SoftHSM. The
sealed blob is the one serialised format this package defines::

    blob = version (1 byte, 0x01) || iv (12 bytes) || ciphertext || tag (16 bytes)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from engine.crypto.errors import IntegrityCheckFailed
from engine.errors import InvalidInput

GCM_IV_BYTES = 12
GCM_TAG_BYTES = 16
BLOB_VERSION = 0x01

RANDOM_MIN_BYTES = 1
RANDOM_MAX_BYTES = 1024
DATA_KEY_MIN_BYTES = 16
DATA_KEY_MAX_BYTES = 64
# Bounds keep one token call short; larger payloads belong in envelope encryption.
MAX_PLAINTEXT_BYTES = 1 << 20
MAX_AAD_BYTES = 1 << 16
MAX_LABEL_CHARS = 128
MAX_KEY_ID_BYTES = 128


class KeyFamily(StrEnum):
    AES = "aes"
    HMAC = "hmac"
    RSA = "rsa"
    EC = "ec"
    MLDSA = "mldsa"  # no PKCS#11 mechanism in SoftHSM: kept wrapped by a token AES key


class KeySpec(StrEnum):
    """What a master key is; chosen at generation, never changed."""

    AES_256 = "AES_256"
    HMAC_256 = "HMAC_256"
    HMAC_384 = "HMAC_384"
    HMAC_512 = "HMAC_512"
    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    EC_P256 = "EC_P256"
    EC_P384 = "EC_P384"
    ML_DSA_44 = "ML_DSA_44"
    ML_DSA_65 = "ML_DSA_65"
    ML_DSA_87 = "ML_DSA_87"

    @property
    def family(self) -> KeyFamily:
        if self.value.startswith("ML_DSA"):
            return KeyFamily.MLDSA
        return KeyFamily[self.value.split("_", 1)[0]]

    @property
    def bits(self) -> int:
        """Key length in bits (secret keys, RSA), the curve's field size (EC), or the
        ML-DSA parameter set's name (44 / 65 / 87)."""
        return int(self.value.rsplit("_", 1)[1].lstrip("P"))

    @property
    def is_asymmetric(self) -> bool:
        return self.family in (KeyFamily.RSA, KeyFamily.EC, KeyFamily.MLDSA)


class SignAlgorithm(StrEnum):
    """Signing / MAC algorithms; each belongs to one key family."""

    HMAC_SHA256 = "HMAC_SHA256"
    HMAC_SHA384 = "HMAC_SHA384"
    HMAC_SHA512 = "HMAC_SHA512"
    RSA_PSS_SHA256 = "RSA_PSS_SHA256"
    RSA_PSS_SHA384 = "RSA_PSS_SHA384"
    RSA_PSS_SHA512 = "RSA_PSS_SHA512"
    RSA_PKCS1_SHA256 = "RSA_PKCS1_SHA256"
    RSA_PKCS1_SHA384 = "RSA_PKCS1_SHA384"
    RSA_PKCS1_SHA512 = "RSA_PKCS1_SHA512"
    ECDSA_SHA256 = "ECDSA_SHA256"
    ECDSA_SHA384 = "ECDSA_SHA384"
    ECDSA_SHA512 = "ECDSA_SHA512"

    @property
    def family(self) -> KeyFamily:
        head = self.value.split("_", 1)[0]
        return KeyFamily.EC if head == "ECDSA" else KeyFamily[head]

    @property
    def hash_name(self) -> str:
        """``sha256`` / ``sha384`` / ``sha512`` (hashlib names)."""
        return self.value.rsplit("_", 1)[1].lower()


@dataclass(frozen=True)
class KeyInfo:
    """What the token holds under a label. ``spec`` is None for foreign objects."""

    label: str
    key_id: bytes
    spec: KeySpec | None


class Sealed(NamedTuple):
    """AES-256-GCM output: ``iv`` and ``ciphertext`` (which ends with the 16-byte tag)."""

    iv: bytes
    ciphertext: bytes

    def to_blob(self) -> bytes:
        return pack_sealed(self)

    @classmethod
    def from_blob(cls, blob: bytes) -> Sealed:
        return unpack_sealed(blob)


class DataKey(NamedTuple):
    """A fresh data key: use ``plaintext``, store ``wrapped``, forget ``plaintext``."""

    plaintext: bytes
    wrapped: bytes

    def __repr__(self) -> str:
        # The plaintext DEK must never reach a log line through a repr.
        return f"DataKey(plaintext=<{len(self.plaintext)} bytes hidden>, wrapped={self.wrapped!r})"


_VERSION_BYTE = bytes([BLOB_VERSION])


def pack_sealed(sealed: Sealed) -> bytes:
    check_iv(sealed.iv)
    return b"".join((_VERSION_BYTE, sealed.iv, sealed.ciphertext))


def unpack_sealed(blob: bytes) -> Sealed:
    if not isinstance(blob, bytes | bytearray) or not blob:
        raise InvalidInput("the wrapped blob is empty or not bytes", code="invalid_ciphertext")
    if blob[0] != BLOB_VERSION:
        raise InvalidInput(
            f"unknown wrapped-blob version {blob[0]}",
            code="invalid_ciphertext",
            fix="Pass the blob exactly as returned by generate_data_key / wrap_data_key.",
        )
    if len(blob) < 1 + GCM_IV_BYTES + GCM_TAG_BYTES:
        raise IntegrityCheckFailed(
            "integrity check failed: the wrapped blob is truncated",
            cause=f"{len(blob)} bytes, less than version + IV + tag",
        )
    # Two slices, no copy of the whole blob first (bytes() of a bytes slice is itself).
    return Sealed(bytes(blob[1 : 1 + GCM_IV_BYTES]), bytes(blob[1 + GCM_IV_BYTES :]))


def check_iv(iv: bytes) -> None:
    if not isinstance(iv, bytes) or len(iv) != GCM_IV_BYTES:
        raise InvalidInput(f"the IV must be {GCM_IV_BYTES} bytes", code="invalid_ciphertext")


def check_bytes(name: str, value: object, max_len: int, *, min_len: int = 0) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise InvalidInput(f"{name} must be bytes, not {type(value).__name__}")
    if not min_len <= len(value) <= max_len:
        raise InvalidInput(f"{name} must be {min_len}..{max_len} bytes long, got {len(value)}")
    return bytes(value)


def check_label(label: object) -> str:
    if not isinstance(label, str) or not label or len(label) > MAX_LABEL_CHARS:
        raise InvalidInput(f"a key label must be a non-empty string of at most {MAX_LABEL_CHARS}")
    if not label.isprintable():
        raise InvalidInput("a key label must be printable text")
    return label


def check_length(name: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInput(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value
