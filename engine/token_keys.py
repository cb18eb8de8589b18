"""The engine's and the services' own HSM keys, made up front.

Each is made on first use by whichever process needs it (``CryptoCore.ensure_key``):
the job-signing key, the key that seals access keys, KMS's audit-seal and import
keys. Nodes that share one token (docs/nodes.md) and start together would each make
one, and a token keeps no label unique; so the node that holds the token makes them
all, alone, before it serves it: ``dew init`` and ``dew hsm serve`` call
:func:`make_token_keys`. A service declares its keys in its ``ServiceSpec``
(``token_keys``).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.crypto import KeySpec
from engine.settings import Settings


@dataclass(frozen=True)
class TokenKey:
    label: str
    spec: KeySpec
    key_id: bytes


def declared(settings: Settings) -> list[TokenKey]:
    """The engine's keys, then those of the configured services."""
    from engine.iam.service import SECRET_KEY_LABEL
    from engine.job_signing import SIGNING_KEY
    from engine.services import load_object, load_specs

    keys = [TokenKey(SIGNING_KEY, KeySpec.HMAC_256, SIGNING_KEY.encode()),
            TokenKey(SECRET_KEY_LABEL, KeySpec.AES_256, b"engine:iam")]
    for spec in load_specs(settings.engine.services):
        if spec.token_keys:
            keys.extend(load_object(spec, spec.token_keys))
    return keys


async def make_token_keys(settings: Settings) -> list[str]:
    """Make the declared keys the token lacks; the labels of all of them."""
    from engine.hsm import connect_crypto

    keys = declared(settings)
    core = await connect_crypto(settings)
    try:
        for key in keys:
            await core.ensure_key(key.spec, key.label, key.key_id)
    finally:
        await core.close()
    return [key.label for key in keys]
