"""Pure parts of the crypto core: specs, the sealed-blob format, input checks."""

from __future__ import annotations

import pytest

from engine.crypto import DataKey, IntegrityCheckFailed, KeySpec, Sealed, SignAlgorithm
from engine.crypto.model import KeyFamily, check_label, check_length, pack_sealed, unpack_sealed
from engine.errors import InvalidInput


@pytest.mark.parametrize(
    ("spec", "family", "bits"),
    [
        (KeySpec.AES_256, KeyFamily.AES, 256),
        (KeySpec.HMAC_384, KeyFamily.HMAC, 384),
        (KeySpec.RSA_3072, KeyFamily.RSA, 3072),
        (KeySpec.EC_P256, KeyFamily.EC, 256),
        (KeySpec.EC_P384, KeyFamily.EC, 384),
    ],
)
def test_key_spec_properties(spec: KeySpec, family: KeyFamily, bits: int) -> None:
    assert spec.family is family
    assert spec.bits == bits
    assert spec.is_asymmetric == (family in (KeyFamily.RSA, KeyFamily.EC))


def test_sign_algorithm_properties() -> None:
    assert SignAlgorithm.ECDSA_SHA384.family is KeyFamily.EC
    assert SignAlgorithm.RSA_PSS_SHA512.hash_name == "sha512"
    assert SignAlgorithm.HMAC_SHA256.family is KeyFamily.HMAC


def test_sealed_blob_round_trip() -> None:
    sealed = Sealed(b"i" * 12, b"c" * 40)
    blob = pack_sealed(sealed)
    assert blob[0] == 1 and len(blob) == 1 + 12 + 40
    assert unpack_sealed(blob) == sealed
    assert Sealed.from_blob(sealed.to_blob()) == sealed


def test_sealed_blob_rejects_garbage() -> None:
    with pytest.raises(InvalidInput):
        unpack_sealed(b"")
    with pytest.raises(InvalidInput, match="version"):
        unpack_sealed(b"\x02" + b"x" * 40)
    with pytest.raises(IntegrityCheckFailed):
        unpack_sealed(b"\x01" + b"x" * 20)
    with pytest.raises(InvalidInput):
        pack_sealed(Sealed(b"short", b"c" * 16))


def test_data_key_repr_hides_plaintext() -> None:
    dek = DataKey(b"\xaa" * 32, b"\x01wrapped")
    plaintext, wrapped = dek  # still a tuple for callers that unpack
    assert plaintext == b"\xaa" * 32 and wrapped == b"\x01wrapped"
    assert "aa" not in repr(dek) and "\\xaa" not in repr(dek)
    assert "32 bytes hidden" in repr(dek)


def test_input_checks() -> None:
    assert check_label("cmk-1:v1") == "cmk-1:v1"
    for bad in ("", "x" * 129, "tab\there", 7):
        with pytest.raises(InvalidInput):
            check_label(bad)
    assert check_length("n", 5, 1, 10) == 5
    for bad_n in (0, 11, True, "3"):
        with pytest.raises(InvalidInput):
            check_length("n", bad_n, 1, 10)
