"""KMS algorithm names for signatures, MACs and RSA decryption, and their input checks.

Pure functions (no token, no registry): the service and the CLI both call them,
the CLI before anything is opened. KMS names (``RSASSA_PSS_SHA_256``...) map to
the crypto core's :class:`~engine.crypto.SignAlgorithm` values; which key spec
may use which algorithm is decided here too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from engine.crypto import KeySpec, SignAlgorithm
from engine.crypto.errors import KeyUsageError
from engine.errors import InvalidInput

MAX_MESSAGE_BYTES = 4096
MAX_SIGNATURE_BYTES = 8192  # ML-DSA-87 signatures are 4627 bytes


class MessageType(StrEnum):
    RAW = "RAW"  # we hash the message (at most 4096 bytes)
    DIGEST = "DIGEST"  # the caller hashed it


SIGNING: dict[str, SignAlgorithm] = {
    "RSASSA_PSS_SHA_256": SignAlgorithm.RSA_PSS_SHA256,
    "RSASSA_PSS_SHA_384": SignAlgorithm.RSA_PSS_SHA384,
    "RSASSA_PSS_SHA_512": SignAlgorithm.RSA_PSS_SHA512,
    "RSASSA_PKCS1_V1_5_SHA_256": SignAlgorithm.RSA_PKCS1_SHA256,
    "RSASSA_PKCS1_V1_5_SHA_384": SignAlgorithm.RSA_PKCS1_SHA384,
    "RSASSA_PKCS1_V1_5_SHA_512": SignAlgorithm.RSA_PKCS1_SHA512,
    "ECDSA_SHA_256": SignAlgorithm.ECDSA_SHA256,
    "ECDSA_SHA_384": SignAlgorithm.ECDSA_SHA384,
}
# ML-DSA (FIPS 204) signs the message itself (no pre-hash), so RAW only.
ML_DSA: dict[str, KeySpec] = {"ML_DSA_44": KeySpec.ML_DSA_44, "ML_DSA_65": KeySpec.ML_DSA_65,
                              "ML_DSA_87": KeySpec.ML_DSA_87}
# The curve fixes the hash (as the hosted service does): P-256 with SHA-256, P-384 with SHA-384.
ECDSA_CURVE = {"ECDSA_SHA_256": KeySpec.EC_P256, "ECDSA_SHA_384": KeySpec.EC_P384}

MAC: dict[str, tuple[KeySpec, SignAlgorithm]] = {
    "HMAC_SHA_256": (KeySpec.HMAC_256, SignAlgorithm.HMAC_SHA256),
    "HMAC_SHA_384": (KeySpec.HMAC_384, SignAlgorithm.HMAC_SHA384),
    "HMAC_SHA_512": (KeySpec.HMAC_512, SignAlgorithm.HMAC_SHA512),
}
MAC_OF_SPEC = {spec.value: name for name, (spec, _) in MAC.items()}

ENCRYPTION: dict[str, str] = {"RSAES_OAEP_SHA_256": "sha256", "RSAES_OAEP_SHA_1": "sha1"}


@dataclass(frozen=True)
class SignRequest:
    """A checked sign/verify request: the algorithm and the digest to sign (for
    ML-DSA, which the token cannot do, the message itself and no core algorithm)."""

    algorithm: str
    core_algorithm: SignAlgorithm | None
    digest: bytes
    message_type: MessageType
    ml_dsa: KeySpec | None = None


def _choose(kind: str, value: object, names: list[str], code: str) -> str:
    if not isinstance(value, str) or value not in names:
        raise InvalidInput(f"invalid {kind} {value!r}; choose one of {', '.join(names)}",
                           code=code)
    return value


def check_signing_algorithm(value: object) -> str:
    return _choose("signing algorithm", value, [*SIGNING, *ML_DSA],
                   "invalid_signing_algorithm")


def check_message_type(value: object) -> MessageType:
    name = _choose("message type", value, [m.value for m in MessageType], "invalid_message_type")
    return MessageType(name)


def sign_request(algorithm: object, message: object, message_type: object = "RAW") -> SignRequest:
    """Check a sign/verify request; a RAW message is hashed here."""
    name = check_signing_algorithm(algorithm)
    kind = check_message_type(message_type)
    if not isinstance(message, bytes | bytearray):
        raise InvalidInput("the message must be bytes", code="invalid_message")
    if name in ML_DSA:
        if kind is not MessageType.RAW:
            raise InvalidInput("ML-DSA signs the message itself: send it with --message-type RAW",
                               code="invalid_message_type")
        if len(message) > MAX_MESSAGE_BYTES:
            raise InvalidInput(f"a RAW message is at most {MAX_MESSAGE_BYTES} bytes, got "
                               f"{len(message)}", code="message_too_large")
        return SignRequest(name, None, bytes(message), kind, ML_DSA[name])
    core = SIGNING[name]
    if kind is MessageType.RAW:
        if len(message) > MAX_MESSAGE_BYTES:
            raise InvalidInput(
                f"a RAW message is at most {MAX_MESSAGE_BYTES} bytes, got {len(message)}",
                code="message_too_large",
                fix=f"Hash it yourself ({core.hash_name.upper()}) and send --message-type "
                "DIGEST.",
            )
        return SignRequest(name, core, hashlib.new(core.hash_name, message).digest(), kind)
    size = hashlib.new(core.hash_name).digest_size
    if len(message) != size:
        raise InvalidInput(
            f"a {core.hash_name.upper()} DIGEST is {size} bytes, got {len(message)}",
            code="invalid_digest",
            fix="Send the binary digest (not hex), or send the message itself as RAW.",
        )
    return SignRequest(name, core, bytes(message), kind)


def check_sign_key(spec: str, usage: str, algorithm: str, key_name: str) -> None:
    """The key must be a SIGN_VERIFY RSA / EC key that fits the algorithm."""
    if algorithm in ML_DSA:
        if usage != "SIGN_VERIFY" or spec != ML_DSA[algorithm].value:
            raise KeyUsageError(f"key {key_name} is a {spec} key for {usage}; {algorithm} "
                                f"needs an {ML_DSA[algorithm].value} key for SIGN_VERIFY")
        return
    family = spec.split("_", 1)[0]
    wanted = "EC" if algorithm.startswith("ECDSA") else "RSA"
    if usage != "SIGN_VERIFY" or family != wanted or (
        wanted == "EC" and ECDSA_CURVE[algorithm].value != spec
    ):
        need = (f"an {ECDSA_CURVE[algorithm].value}" if wanted == "EC"
                else "an RSA_2048/3072/4096")
        raise KeyUsageError(
            f"key {key_name} is a {spec} key for {usage}; {algorithm} needs {need} key "
            "for SIGN_VERIFY", target=None,
        )


def check_mac_algorithm(value: object, spec: str, key_name: str) -> SignAlgorithm:
    """The MAC algorithm (default: the key's own), which must match the HMAC key's size."""
    if spec not in MAC_OF_SPEC:
        raise KeyUsageError(f"key {key_name} is a {spec} key; MACs need an HMAC_256/384/512 key")
    name = MAC_OF_SPEC[spec] if value is None else _choose(
        "MAC algorithm", value, list(MAC), "invalid_mac_algorithm")
    if MAC[name][0].value != spec:
        raise KeyUsageError(f"key {key_name} is a {spec} key; {name} needs "
                            f"{MAC[name][0].value}, use {MAC_OF_SPEC[spec]}")
    return MAC[name][1]


def check_mac_message(message: object) -> bytes:
    if not isinstance(message, bytes | bytearray):
        raise InvalidInput("the message must be bytes", code="invalid_message")
    if len(message) > MAX_MESSAGE_BYTES:
        raise InvalidInput(f"a MAC message is at most {MAX_MESSAGE_BYTES} bytes, got "
                           f"{len(message)}", code="message_too_large")
    return bytes(message)


def check_encryption_algorithm(value: object) -> str:
    """The OAEP hash name of an RSAES algorithm."""
    return ENCRYPTION[_choose("encryption algorithm", value, list(ENCRYPTION),
                              "invalid_encryption_algorithm")]
