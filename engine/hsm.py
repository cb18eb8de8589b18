"""The process's crypto core as a resource (``crypto``): the HSM is opened on first use."""

from __future__ import annotations

import asyncio

from engine.crypto import CryptoCore, ensure_token, hsm_config_from_settings
from engine.resources import Closer, Resources, resource
from engine.settings import Settings


async def connect_crypto(settings: Settings) -> CryptoCore:
    """A connected crypto core for ``settings``, initialising the token if there is none."""
    await asyncio.to_thread(ensure_token, settings)
    core = CryptoCore(hsm_config_from_settings(settings))
    await core.connect()
    return core


@resource("crypto")
async def _crypto_resource(resources: Resources) -> tuple[CryptoCore, Closer]:
    core = await connect_crypto(resources.settings)
    return core, core.close
