"""The crypto core: master keys in a PKCS#11 token, and a small safe API over them.

Use::

    config = hsm_config_from_settings(settings)  # [hsm] settings + DEW_HSM_PIN
    ensure_token(settings)                   # first run only; no-op when the token exists
    async with CryptoCore(config) as core:
        await core.generate_key(KeySpec.AES_256, "cmk-1:v1", b"cmk-1")
        sealed = await core.seal("cmk-1:v1", b"data", aad=b"context")
        data = await core.open("cmk-1:v1", sealed.iv, sealed.ciphertext, aad=b"context")

Raw PKCS#11 (templates, mechanisms, python-pkcs11 exceptions) stays in the
private ``_pkcs11`` module.
"""

from engine.crypto.config import (
    HsmConfig,
    ensure_token,
    hsm_config_from_settings,
    read_pin_file,
)
from engine.crypto.core import CryptoCore
from engine.crypto.errors import (
    DecryptionFailed,
    IntegrityCheckFailed,
    KeyExists,
    KeyNotFound,
    KeyUsageError,
)
from engine.crypto.model import (
    DataKey,
    KeyInfo,
    KeySpec,
    Sealed,
    SignAlgorithm,
    pack_sealed,
    unpack_sealed,
)
from engine.crypto.token import init_token, token_exists

__all__ = [
    "CryptoCore",
    "DataKey",
    "DecryptionFailed",
    "HsmConfig",
    "IntegrityCheckFailed",
    "KeyExists",
    "KeyInfo",
    "KeyNotFound",
    "KeySpec",
    "KeyUsageError",
    "Sealed",
    "SignAlgorithm",
    "ensure_token",
    "hsm_config_from_settings",
    "init_token",
    "pack_sealed",
    "read_pin_file",
    "token_exists",
    "unpack_sealed",
]
