"""Bring your own key (BYOK): wrapping algorithms, unwrapping import material, and the
client-side helpers (``dew kms wrap-key-material`` / ``ec-raw-to-pkcs8``).

Pure functions over ``cryptography``; the service does the token work (the RSA
private key of the wrapping pair never leaves the token).

Wrapped material, as the product documents it:

- ``RSAES_OAEP_SHA_256`` / ``_SHA_1``: symmetric material (AES_256: 32 bytes,
  HMAC_256/384/512: 32/48/64 bytes) encrypted with RSA-OAEP (MGF1 with the same
  hash, empty label) under the wrapping public key;
- ``RSA_AES_KEY_WRAP_SHA_256`` / ``_SHA_1``: an asymmetric private key as PKCS#8
  DER: a fresh AES-256 key encrypted with RSA-OAEP (the first k bytes, k = the
  wrapping modulus length), followed by the PKCS#8 key wrapped under that AES
  key with AES key wrap with padding (RFC 5649, OpenSSL's ``id-aes256-wrap-pad``).
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from engine.crypto import KeySpec
from engine.crypto.errors import DecryptionFailed
from engine.errors import InvalidInput

WRAPPING_ALGORITHMS = {
    "RSAES_OAEP_SHA_256": "sha256",
    "RSAES_OAEP_SHA_1": "sha1",
    "RSA_AES_KEY_WRAP_SHA_256": "sha256",
    "RSA_AES_KEY_WRAP_SHA_1": "sha1",
}
WRAPPING_KEY_BITS = 4096
CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(), "prime256v1": ec.SECP256R1(), "P-256": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(), "P-384": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(), "P-521": ec.SECP521R1(),
    "secp256k1": ec.SECP256K1(),
}
_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


def check_wrapping_algorithm(value: object) -> str:
    if not isinstance(value, str) or value not in WRAPPING_ALGORITHMS:
        raise InvalidInput(f"invalid wrapping algorithm {value!r}; choose one of "
                           f"{', '.join(WRAPPING_ALGORITHMS)}", code="invalid_wrapping_algorithm")
    return value


def wraps_private_keys(algorithm: str) -> bool:
    return algorithm.startswith("RSA_AES_KEY_WRAP")


def check_algorithm_fits(algorithm: str, spec: KeySpec) -> None:
    if wraps_private_keys(algorithm) != spec.is_asymmetric:
        need = ("RSA_AES_KEY_WRAP_SHA_256 (or _SHA_1)" if spec.is_asymmetric
                else "RSAES_OAEP_SHA_256 (or _SHA_1)")
        raise InvalidInput(f"{spec.value} material is wrapped with {need}, not {algorithm}",
                           code="invalid_wrapping_algorithm")


def secret_length(spec: KeySpec) -> int:
    return spec.bits // 8


def unwrap_private_key(aes_key: bytes, wrapped: bytes,
                       spec: KeySpec) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The PKCS#8 key under ``aes_key`` (RFC 5649), checked against ``spec``."""
    try:
        der = aes_key_unwrap_with_padding(aes_key, wrapped)
    except (InvalidUnwrap, ValueError):
        raise DecryptionFailed("decryption failed: the wrapped private key does not unwrap "
                               "with the wrapped AES key") from None
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError):
        raise InvalidInput("the unwrapped material is not a PKCS#8 DER private key",
                           code="invalid_key_material") from None
    if spec.family.value == "rsa":
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != spec.bits:
            raise InvalidInput(f"the private key is not an {spec.value} key",
                               code="invalid_key_material")
        return key
    curve = {KeySpec.EC_P256: "secp256r1", KeySpec.EC_P384: "secp384r1"}[spec]
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != curve:
        raise InvalidInput(f"the private key is not an {spec.value} key",
                           code="invalid_key_material")
    return key


def public_fingerprint_input(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    """What identifies an imported private key: its public key (DER SPKI)."""
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


# --------------------------------------------------------------------------- client side


def wrap_key_material(public_pem: bytes, material: bytes, algorithm: str) -> bytes:
    """What ``dew kms wrap-key-material`` writes: ``material`` wrapped for import.

    For the RSA_AES_KEY_WRAP algorithms ``material`` is a private key, PKCS#8 DER or
    PEM (any PEM private key is converted to PKCS#8 DER first).
    """
    algo = check_wrapping_algorithm(algorithm)
    try:
        public = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError):
        raise InvalidInput("the wrapping public key is not a PEM public key",
                           code="invalid_public_key") from None
    if not isinstance(public, rsa.RSAPublicKey):
        raise InvalidInput("the wrapping public key is not an RSA key", code="invalid_public_key")
    h = _HASHES[WRAPPING_ALGORITHMS[algo]]()
    oaep = padding.OAEP(padding.MGF1(h), h, None)
    if not wraps_private_keys(algo):
        if len(material) not in (32, 48, 64):
            raise InvalidInput("symmetric key material is 32, 48 or 64 bytes",
                               code="invalid_key_material")
        return public.encrypt(material, oaep)
    der = pkcs8_der(material)
    aes_key = os.urandom(32)
    return public.encrypt(aes_key, oaep) + aes_key_wrap_with_padding(aes_key, der)


def pkcs8_der(material: bytes) -> bytes:
    """A private key (PKCS#8 / traditional, DER or PEM) as unencrypted PKCS#8 DER."""
    loader = (serialization.load_pem_private_key if material.lstrip().startswith(b"-----")
              else serialization.load_der_private_key)
    try:
        key = loader(material, password=None)
    except (ValueError, TypeError):
        raise InvalidInput("the material is not an unencrypted private key (PKCS#8 DER/PEM)",
                           code="invalid_key_material") from None
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ec_raw_to_pkcs8(curve: str, private_hex: str, *, pem: bool = False) -> bytes:
    """A bare EC scalar (hex) as a PKCS#8 key with its public point included."""
    if curve not in CURVES:
        raise InvalidInput(f"unknown curve {curve!r}; choose one of {', '.join(CURVES)}",
                           code="invalid_curve")
    text = private_hex.strip().removeprefix("0x")
    try:
        value = int(text, 16)
    except ValueError:
        raise InvalidInput("--private-hex is not hexadecimal", code="invalid_hex") from None
    try:
        key = ec.derive_private_key(value, CURVES[curve])
    except ValueError:
        raise InvalidInput(f"the scalar is not a valid {curve} private key (0 < d < n)",
                           code="invalid_key_material") from None
    encoding = serialization.Encoding.PEM if pem else serialization.Encoding.DER
    # cryptography writes the public point into the PKCS#8 ECPrivateKey structure.
    return key.private_bytes(encoding, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
