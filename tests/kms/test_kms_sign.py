"""Signatures, public keys, MACs and RSA decryption through the KMS service, proven
against `cryptography`, OpenSSL's command line and Python's hmac."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from engine.crypto import CryptoCore, HsmConfig, KeyUsageError
from engine.crypto.errors import DecryptionFailed
from engine.errors import InvalidInput
from handlers.kms.core import token_label
from handlers.kms.service import KmsService

MESSAGE = b"the quick brown fox jumps over the lazy dog\n"
HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


@pytest.fixture
async def keys(kms: KmsService) -> AsyncIterator[dict[str, str]]:
    """One RSA_2048 / EC_P256 / EC_P384 signing key and one RSA decryption key."""
    made = {
        "rsa": (await kms.create_key("sig/rsa", "RSA_2048")).key_id,
        "p256": (await kms.create_key("sig/p256", "EC_P256")).key_id,
        "p384": (await kms.create_key("sig/p384", "EC_P384")).key_id,
        "rsa-enc": (await kms.create_key("enc/rsa", "RSA_2048", "ENCRYPT_DECRYPT")).key_id,
    }
    yield made


def _public(pem: str) -> Any:
    return serialization.load_pem_public_key(pem.encode())


def _verify_with_cryptography(public: Any, algorithm: str, signature: bytes) -> None:
    h = HASH[algorithm[-3:]]()
    if algorithm.startswith("RSASSA_PSS"):
        public.verify(signature, MESSAGE, padding.PSS(padding.MGF1(h), h.digest_size), h)
    elif algorithm.startswith("RSASSA_PKCS1"):
        public.verify(signature, MESSAGE, padding.PKCS1v15(), h)
    else:
        public.verify(signature, MESSAGE, ec.ECDSA(h))


CASES = [("rsa", f"RSASSA_{p}_SHA_{b}") for p in ("PSS", "PKCS1_V1_5") for b in HASH] + [
    ("p256", "ECDSA_SHA_256"), ("p384", "ECDSA_SHA_384")]


async def test_signatures_verify_everywhere(kms: KmsService, keys: dict[str, str]) -> None:
    for name, algorithm in CASES:
        key = keys[name]
        public = _public((await kms.get_public_key(key)).public_key_pem)
        raw = await kms.sign(key, MESSAGE, algorithm)
        assert raw.signing_algorithm == algorithm and raw.to_json()["signature"]
        _verify_with_cryptography(public, algorithm, raw.signature)
        digest = hashlib.new(f"sha{algorithm[-3:]}", MESSAGE).digest()
        pre = await kms.sign(key, digest, algorithm, "DIGEST")
        _verify_with_cryptography(public, algorithm, pre.signature)
        for sig in (raw.signature, pre.signature):
            assert (await kms.verify(key, MESSAGE, sig, algorithm)).valid
            assert (await kms.verify(key, digest, sig, algorithm, "DIGEST")).valid
            assert not (await kms.verify(key, MESSAGE + b"!", sig, algorithm)).valid
            broken = bytearray(sig)
            broken[len(broken) // 2] ^= 1
            assert not (await kms.verify(key, MESSAGE, bytes(broken), algorithm)).valid
        assert not (await kms.verify(key, MESSAGE, b"\x30\x00", algorithm)).valid
        assert not (await kms.verify(key, MESSAGE, raw.signature + b"\x00", algorithm)).valid


async def test_a_signature_from_another_key_fails(kms: KmsService, keys: dict[str, str]) -> None:
    other_rsa = rsa.generate_private_key(65537, 2048)
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    forged = other_rsa.sign(MESSAGE, pss, hashes.SHA256())
    assert not (await kms.verify(keys["rsa"], MESSAGE, forged, "RSASSA_PSS_SHA_256")).valid
    other_ec = ec.generate_private_key(ec.SECP256R1())
    forged = other_ec.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
    assert not (await kms.verify(keys["p256"], MESSAGE, forged, "ECDSA_SHA_256")).valid


async def test_signing_refusals(kms: KmsService, keys: dict[str, str]) -> None:
    with pytest.raises(KeyUsageError, match="needs an EC_P384"):
        await kms.sign(keys["p256"], MESSAGE, "ECDSA_SHA_384")
    with pytest.raises(KeyUsageError):
        await kms.sign(keys["p256"], MESSAGE, "RSASSA_PSS_SHA_256")
    with pytest.raises(KeyUsageError):
        await kms.sign(keys["rsa-enc"], MESSAGE, "RSASSA_PSS_SHA_256")
    with pytest.raises(InvalidInput, match="at most 4096"):
        await kms.sign(keys["rsa"], bytes(4097), "RSASSA_PSS_SHA_256")
    await kms.sign(keys["rsa"], bytes(4096), "RSASSA_PSS_SHA_256")
    with pytest.raises(InvalidInput, match="32 bytes"):
        await kms.sign(keys["rsa"], bytes(31), "RSASSA_PSS_SHA_256", "DIGEST")
    with pytest.raises(InvalidInput, match="signing algorithm"):
        await kms.sign(keys["rsa"], MESSAGE, "RSA_PSS_SHA256")
    with pytest.raises(InvalidInput, match="message type"):
        await kms.sign(keys["rsa"], MESSAGE, "RSASSA_PSS_SHA_256", "HASHED")
    aes = await kms.create_key("sym")
    with pytest.raises(KeyUsageError, match="no public key"):
        await kms.get_public_key(aes.key_id)
    shown = (await kms.get_public_key(keys["rsa-enc"])).to_json()
    assert shown["encryption_algorithms"] == ["RSAES_OAEP_SHA_256", "RSAES_OAEP_SHA_1"]
    assert (await kms.get_public_key(keys["p384"])).algorithms == ["ECDSA_SHA_384"]
    entries = [(e.operation, e.outcome) for e in await kms.audit_list(keys["rsa"])]
    assert ("sign", "failure") in entries and ("sign", "success") in entries


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


async def test_openssl_verifies_our_signatures(
    kms: KmsService, keys: dict[str, str], tmp_path: Path
) -> None:
    msg, changed = tmp_path / "msg", tmp_path / "changed"
    msg.write_bytes(MESSAGE)
    changed.write_bytes(MESSAGE + b"x")
    for name, algorithm, opts in (
        ("rsa", "RSASSA_PSS_SHA_256", ["-sigopt", "rsa_padding_mode:pss",
                                       "-sigopt", "rsa_pss_saltlen:32"]),
        ("rsa", "RSASSA_PKCS1_V1_5_SHA_256", []),
        ("p256", "ECDSA_SHA_256", []),
    ):
        pub, sig = tmp_path / f"{name}.pem", tmp_path / f"{algorithm}.sig"
        pub.write_text((await kms.get_public_key(keys[name])).public_key_pem)
        sig.write_bytes((await kms.sign(keys[name], MESSAGE, algorithm)).signature)
        ok = _openssl("dgst", "-sha256", *opts, "-verify", str(pub), "-signature", str(sig),
                      str(msg))
        assert ok.returncode == 0 and "Verified OK" in ok.stdout, ok.stderr
        bad = _openssl("dgst", "-sha256", *opts, "-verify", str(pub), "-signature", str(sig),
                       str(changed))
        assert bad.returncode == 1
    # pkeyutl over a digest we signed as DIGEST (PSS with a 32-byte salt).
    digest = tmp_path / "digest"
    digest.write_bytes(hashlib.sha256(MESSAGE).digest())
    sig = tmp_path / "pss.sig"
    sig.write_bytes((await kms.sign(keys["rsa"], digest.read_bytes(), "RSASSA_PSS_SHA_256",
                                    "DIGEST")).signature)
    ok = _openssl("pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "rsa.pem"),
                  "-in", str(digest), "-sigfile", str(sig), "-pkeyopt", "digest:sha256",
                  "-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:32")
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok.stderr


# --------------------------------------------------------------------------- HMAC


def _replace_with_known_value(hsm_config: HsmConfig, label: str, key_id: str,
                              value: bytes) -> None:
    """Put a GENERIC_SECRET with a known value under ``label`` (tests only: KMS never
    takes key values). Same protection attributes as a generated key."""
    lib = pkcs11.lib(hsm_config.module_path)
    with lib.get_token(token_label=hsm_config.token_label).open(rw=True) as session:
        A = pkcs11.Attribute
        session.create_object({
            A.CLASS: pkcs11.ObjectClass.SECRET_KEY, A.KEY_TYPE: pkcs11.KeyType.GENERIC_SECRET,
            A.VALUE: value, A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True,
            A.EXTRACTABLE: False, A.SIGN: True, A.VERIFY: True, A.LABEL: label,
            A.ID: f"{key_id}:v1".encode(),
        })


@pytest.mark.parametrize(("spec", "algorithm", "name"), [
    ("HMAC_256", "HMAC_SHA_256", "sha256"), ("HMAC_384", "HMAC_SHA_384", "sha384"),
    ("HMAC_512", "HMAC_SHA_512", "sha512")])
async def test_hmac_equals_python_hmac(
    kms: KmsService, core: CryptoCore, hsm_config: HsmConfig, spec: str, algorithm: str,
    name: str,
) -> None:
    key = await kms.create_key(f"mac/{spec}", spec)
    label = token_label(key.key_id, 1)
    value = hashlib.sha512(spec.encode()).digest()[: int(spec[-3:]) // 8]
    await core.destroy_key(label)
    _replace_with_known_value(hsm_config, label, key.key_id, value)
    for message in (b"", MESSAGE, bytes(4096)):
        mac = await kms.generate_mac(key.key_id, message)
        assert mac.mac_algorithm == algorithm
        assert mac.mac == hmac.new(value, message, name).digest()
        assert (await kms.verify_mac(key.key_id, message, mac.mac, algorithm)).valid
        assert not (await kms.verify_mac(key.key_id, b"x" + message[1:], mac.mac)).valid
        assert not (await kms.verify_mac(key.key_id, message, mac.mac[:-1] + b"\x00")).valid


async def test_mac_refusals(kms: KmsService) -> None:
    key = await kms.create_key("mac/one", "HMAC_256")
    fresh = await kms.generate_mac(key.key_id, b"m")
    assert len(fresh.mac) == 32 and fresh.to_json()["mac_algorithm"] == "HMAC_SHA_256"
    with pytest.raises(KeyUsageError, match="needs HMAC_384"):
        await kms.generate_mac(key.key_id, b"m", "HMAC_SHA_384")
    with pytest.raises(InvalidInput, match="at most 4096"):
        await kms.generate_mac(key.key_id, bytes(4097))
    with pytest.raises(InvalidInput, match="MAC algorithm"):
        await kms.generate_mac(key.key_id, b"m", "HMAC_MD5")
    aes = await kms.create_key("mac/not")
    with pytest.raises(KeyUsageError, match="GENERATE_VERIFY_MAC"):
        await kms.generate_mac(aes.key_id, b"m")


# --------------------------------------------------------------------------- RSA decryption


async def test_rsa_oaep_decrypt_offline_ciphertexts(
    kms: KmsService, core: CryptoCore, keys: dict[str, str], tmp_path: Path
) -> None:
    key = keys["rsa-enc"]
    pem = (await kms.get_public_key(key)).public_key_pem
    public = _public(pem)
    for algorithm, h in (("RSAES_OAEP_SHA_256", hashes.SHA256()),
                         ("RSAES_OAEP_SHA_1", hashes.SHA1())):
        for secret in (b"", b"s3cret", bytes(range(190 if h.digest_size == 32 else 214))):
            ct = public.encrypt(secret, padding.OAEP(padding.MGF1(h), h, None))
            out = await kms.decrypt_data(ct, key=key, encryption_algorithm=algorithm)
            assert out.plain_text == secret and out.key_id == key
    # SoftHSM refused SHA-256 OAEP: decoded in our code; SHA-1 stayed in the token.
    assert core.oaep_hashes_decoded_here == {"sha256"}

    # OpenSSL's command line, exactly as the product documents it.
    (tmp_path / "pub.pem").write_text(pem)
    (tmp_path / "plain").write_bytes(b"from openssl")
    done = _openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", str(tmp_path / "pub.pem"),
                    "-in", str(tmp_path / "plain"), "-out", str(tmp_path / "ct"),
                    "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256",
                    "-pkeyopt", "rsa_mgf1_md:sha256")
    assert done.returncode == 0, done.stderr
    b64 = base64.b64encode((tmp_path / "ct").read_bytes()).decode()
    out = await kms.decrypt_data(b64, key=key, encryption_algorithm="RSAES_OAEP_SHA_256")
    assert out.plain_text == b"from openssl"


async def test_rsa_decrypt_failures_are_one_error(
    kms: KmsService, keys: dict[str, str]
) -> None:
    key = keys["rsa-enc"]
    public = _public((await kms.get_public_key(key)).public_key_pem)
    sha256 = hashes.SHA256()
    ct = public.encrypt(b"x", padding.OAEP(padding.MGF1(sha256), sha256, None))
    sha1_ct = public.encrypt(b"x", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    flipped = bytes([ct[0] ^ 1]) + ct[1:]
    n = public.public_numbers().n
    messages = set()
    for blob, algorithm in ((flipped, "RSAES_OAEP_SHA_256"), (sha1_ct, "RSAES_OAEP_SHA_256"),
                            (ct, "RSAES_OAEP_SHA_1"), (ct[:-1], "RSAES_OAEP_SHA_256"),
                            ((n + 1).to_bytes(256, "big"), "RSAES_OAEP_SHA_256"),
                            (b"\xff" * 256, "RSAES_OAEP_SHA_1")):
        with pytest.raises(DecryptionFailed) as caught:
            await kms.decrypt_data(blob, key=key, encryption_algorithm=algorithm)
        messages.add((caught.value.code, caught.value.message))
    assert len(messages) == 1
    with pytest.raises(KeyUsageError, match="RSA ENCRYPT_DECRYPT"):
        await kms.decrypt_data(ct, key=keys["rsa"], encryption_algorithm="RSAES_OAEP_SHA_256")
    with pytest.raises(InvalidInput, match="needs the key"):
        await kms.decrypt_data(ct, encryption_algorithm="RSAES_OAEP_SHA_256")
    with pytest.raises(InvalidInput, match="encryption algorithm"):
        await kms.decrypt_data(ct, key=key, encryption_algorithm="RSAES_PKCS1_V1_5")
