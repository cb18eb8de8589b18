"""Master keys: generated in the token, private, sensitive, never extractable.

The token's refusals are proven with other people's tools: OpenSC's
``pkcs11-tool`` (another process) and python-pkcs11 used directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from engine.crypto import (
    CryptoCore,
    HsmConfig,
    IntegrityCheckFailed,
    KeyExists,
    KeyNotFound,
    KeySpec,
    KeyUsageError,
)
from engine.errors import BackendUnavailable, ConfigError, InvalidInput

NEVER_READABLE = {"sensitive", "always sensitive", "never extractable", "local"}


def _python_pkcs11_session(config: HsmConfig) -> pkcs11.Session:
    # pkcs11.lib() hands back the module the crypto core initialised (and logged in).
    lib = pkcs11.lib(config.module_path)
    return lib.get_token(token_label=config.token_label).open(rw=True)


async def test_cmks_are_private_sensitive_never_extractable(
    crypto_core: CryptoCore,
    key_label: Callable[[str], str],
    pkcs11_tool: Callable[..., list[Any]],
) -> None:
    aes, hmac_label, ec_label = key_label("aes"), key_label("hmac"), key_label("ec")
    await crypto_core.generate_key(KeySpec.AES_256, aes, b"\x01aes")
    await crypto_core.generate_key(KeySpec.HMAC_384, hmac_label, b"\x01hmac")
    await crypto_core.generate_key(KeySpec.EC_P256, ec_label, b"\x01ec")
    try:
        listed = {(o.fields.get("label"), o.header.split(";")[0]): o
                  for o in pkcs11_tool(login=True)}
        secret = listed[(aes, "Secret Key Object")]
        assert secret.header.startswith("Secret Key Object; AES length 32")
        assert secret.fields["ID"] == b"\x01aes".hex()
        assert secret.access >= NEVER_READABLE
        assert "encrypt" in secret.fields["Usage"] and "decrypt" in secret.fields["Usage"]
        generic = listed[(hmac_label, "Secret Key Object")]
        assert generic.header.startswith("Secret Key Object; Generic secret length 48")
        assert generic.access >= NEVER_READABLE
        private = listed[(ec_label, "Private Key Object")]
        assert private.access >= NEVER_READABLE
        assert "local" in listed[(ec_label, "Public Key Object")].access

        # CKA_PRIVATE: without a login the token shows none of the secret halves.
        anonymous = {o.fields.get("label") for o in pkcs11_tool(login=False)
                     if not o.header.startswith("Public Key Object")}
        assert not {aes, hmac_label, ec_label} & anonymous
    finally:
        for label in (aes, hmac_label, ec_label):
            await crypto_core.destroy_key(label)


async def test_token_refuses_to_reveal_or_wrap_out_a_cmk(
    crypto_core: CryptoCore, hsm_config: HsmConfig, aes_key: str
) -> None:
    session = _python_pkcs11_session(hsm_config)
    try:
        cmk = session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, label=aes_key)
        assert cmk[pkcs11.Attribute.NEVER_EXTRACTABLE] is True
        assert cmk[pkcs11.Attribute.ALWAYS_SENSITIVE] is True
        assert cmk[pkcs11.Attribute.PRIVATE] is True
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            cmk[pkcs11.Attribute.VALUE]
        wrapper: Any = session.generate_key(
            pkcs11.KeyType.AES, 256, store=False,
            template={pkcs11.Attribute.WRAP: True, pkcs11.Attribute.EXTRACTABLE: False},
        )
        with pytest.raises(pkcs11.exceptions.KeyUnextractable):
            wrapper.wrap_key(cmk, mechanism=pkcs11.Mechanism.AES_KEY_WRAP_PAD)
        with pytest.raises(pkcs11.exceptions.AttributeReadOnly):
            cmk[pkcs11.Attribute.EXTRACTABLE] = True
        wrapper.destroy()
    finally:
        session.close()


async def test_aes_and_hmac_specs(crypto_core: CryptoCore, key_label: Callable[[str], str]) -> None:
    for spec in (KeySpec.AES_256, KeySpec.HMAC_256, KeySpec.HMAC_384, KeySpec.HMAC_512):
        label = key_label(spec.value.lower())
        info = await crypto_core.generate_key(spec, label, b"id-" + spec.value.encode())
        assert (info.label, info.spec) == (label, spec)
        assert await crypto_core.key_info(label) == info
        assert await crypto_core.key_exists(label)
        assert await crypto_core.destroy_key(label) is True
        assert not await crypto_core.key_exists(label)
        assert await crypto_core.destroy_key(label) is False


async def test_hmac_sign_verify(
    crypto_core: CryptoCore, key_label: Callable[[str], str]
) -> None:
    label = key_label("hmac")
    await crypto_core.generate_key(KeySpec.HMAC_256, label, b"h")
    tag = await crypto_core.sign(label, b"message", "HMAC_SHA256")
    assert len(tag) == 32
    assert await crypto_core.verify(label, b"message", tag, "HMAC_SHA256")
    assert not await crypto_core.verify(label, b"massage", tag, "HMAC_SHA256")
    with pytest.raises(KeyUsageError):
        await crypto_core.seal(label, b"x")
    await crypto_core.destroy_key(label)


@pytest.mark.parametrize(
    ("spec", "algorithms"),
    [
        (KeySpec.RSA_2048, ["RSA_PSS_SHA256", "RSA_PKCS1_SHA256"]),
        (KeySpec.EC_P256, ["ECDSA_SHA256"]),
        (KeySpec.EC_P384, ["ECDSA_SHA384"]),
    ],
)
async def test_key_pair_spki_and_signatures_interoperate(
    crypto_core: CryptoCore, key_label: Callable[[str], str], spec: KeySpec,
    algorithms: list[str],
) -> None:
    label = key_label(spec.value.lower())
    info = await crypto_core.generate_key(spec, label, b"pair")
    try:
        assert info.spec is spec and (await crypto_core.key_info(label)).spec is spec
        der = await crypto_core.public_key_spki_der(label)
        public = serialization.load_der_public_key(der)
        for algorithm in algorithms:
            signature = await crypto_core.sign(label, b"payload", algorithm)
            assert await crypto_core.verify(label, b"payload", signature, algorithm)
            assert not await crypto_core.verify(label, b"payl0ad", signature, algorithm)
            # Verified by cryptography too: the signature formats are the standard ones.
            if isinstance(public, rsa.RSAPublicKey):
                assert public.key_size == spec.bits
                pad: padding.AsymmetricPadding = (
                    padding.PSS(padding.MGF1(hashes.SHA256()), 32)
                    if "PSS" in algorithm else padding.PKCS1v15()
                )
                public.verify(signature, b"payload", pad, hashes.SHA256())
            else:
                assert isinstance(public, ec.EllipticCurvePublicKey)
                assert public.curve.key_size == spec.bits
                digest = hashes.SHA256() if spec is KeySpec.EC_P256 else hashes.SHA384()
                public.verify(signature, b"payload", ec.ECDSA(digest))
        with pytest.raises(KeyUsageError):
            await crypto_core.seal(label, b"x")
    finally:
        await crypto_core.destroy_key(label)


@pytest.mark.slow
async def test_rsa_4096_generation(
    crypto_core: CryptoCore, key_label: Callable[[str], str]
) -> None:
    label = key_label("rsa4096")
    await crypto_core.generate_key("RSA_4096", label, b"big")
    public = serialization.load_der_public_key(await crypto_core.public_key_spki_der(label))
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 4096
    await crypto_core.destroy_key(label)


async def test_generate_refuses_a_taken_label(crypto_core: CryptoCore, aes_key: str) -> None:
    with pytest.raises(KeyExists) as info:
        await crypto_core.generate_key(KeySpec.AES_256, aes_key, b"other")
    assert info.value.code == "key_exists"


async def test_bad_arguments_change_nothing(
    crypto_core: CryptoCore, key_label: Callable[[str], str]
) -> None:
    label = key_label("bad")
    with pytest.raises(InvalidInput, match="unknown key spec"):
        await crypto_core.generate_key("DES_56", label, b"x")
    with pytest.raises(InvalidInput):
        await crypto_core.generate_key(KeySpec.AES_256, label, b"")
    with pytest.raises(InvalidInput):
        await crypto_core.sign(label, b"x", "MD5_RSA")
    assert not await crypto_core.key_exists(label)


async def test_missing_keys_are_not_found(crypto_core: CryptoCore) -> None:
    with pytest.raises(KeyNotFound):
        await crypto_core.key_info("no-such-key")
    with pytest.raises(KeyNotFound):
        await crypto_core.public_key_spki_der("no-such-key")
    with pytest.raises(KeyNotFound):
        await crypto_core.seal("no-such-key", b"x")


async def test_public_key_of_a_secret_key_is_a_usage_error(
    crypto_core: CryptoCore, aes_key: str
) -> None:
    with pytest.raises(KeyUsageError):
        await crypto_core.public_key_spki_der(aes_key)


@pytest.mark.parametrize("recheck", [0.0, 0.2])
async def test_key_destroyed_behind_the_cores_back(
    hsm_config: HsmConfig, key_label: Callable[[str], str], recheck: float
) -> None:
    # Another process (here: a python-pkcs11 session) destroys and re-creates a
    # key the pool has cached. With key_recheck_seconds 0 the pool uses the token
    # object and the module notices at once; otherwise the pool's session copy is
    # dropped within that bound. Either way the stale one is then never used.
    label = key_label("stale")
    async with CryptoCore(replace(hsm_config, key_recheck_seconds=recheck)) as core:
        await core.generate_key(KeySpec.AES_256, label, b"s1")
        first = await asyncio.gather(*(core.seal(label, b"one") for _ in range(8)))
        session = _python_pkcs11_session(hsm_config)
        try:
            for obj in session.get_objects({pkcs11.Attribute.LABEL: label}):
                obj.destroy()
            await asyncio.sleep(recheck * 1.25)
            for _ in range(4):  # each pool thread
                with pytest.raises(KeyNotFound):
                    await core.seal(label, b"two")
            session.generate_key(pkcs11.KeyType.AES, 256, label=label, store=True)
        finally:
            session.close()
        sealed = await core.seal(label, b"three")
        assert await core.open(label, *sealed) == b"three"
        for item in first:
            with pytest.raises(IntegrityCheckFailed):
                await core.open(label, *item)  # the old key's data: a different key now
        await core.destroy_key(label)


async def test_slot_and_pool_size_are_configuration(hsm_config: HsmConfig) -> None:
    token = pkcs11.lib(hsm_config.module_path).get_token(token_label=hsm_config.token_label)
    config = replace(hsm_config, slot=token.slot.slot_id, pool_size=1)
    async with CryptoCore(config) as core:
        assert core.threads == 1
        assert len(await core.random_bytes(4)) == 4
    with pytest.raises(ConfigError) as info:
        await CryptoCore(replace(hsm_config, slot=token.slot.slot_id + 12345)).connect()
    assert info.value.code == "hsm_token_missing"


async def test_closed_core_refuses_calls(hsm_config: HsmConfig) -> None:
    core = CryptoCore(hsm_config)
    with pytest.raises(BackendUnavailable):
        await core.random_bytes(4)
    await core.connect()
    await core.connect()  # idempotent
    await core.close()
    await core.close()
    with pytest.raises(BackendUnavailable):
        await core.random_bytes(4)
