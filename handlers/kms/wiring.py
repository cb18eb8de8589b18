"""KMS wiring: the resources kms_store, kms and sealer (on the engine's ``crypto``), and
``open_kms``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from engine.crypto import CryptoCore
from engine.hsm import connect_crypto
from engine.resources import Closer, Resources, resource
from engine.settings import Settings
from handlers.kms.config import KmsSettings
from handlers.kms.interface import KmsSealer, default_actor
from handlers.kms.service import KmsService
from handlers.kms.store import SqliteKmsStore


@resource("kms_store")
async def _kms_store_resource(resources: Resources) -> tuple[SqliteKmsStore, Closer]:
    store = await SqliteKmsStore.open(resources.settings.store_target)
    return store, store.close


@resource("kms")
async def _kms_resource(resources: Resources) -> tuple[KmsService, None]:
    store = await resources.get("kms_store")

    async def crypto() -> CryptoCore:
        # The HSM is opened on the first key use, not when a cron tick finds nothing due.
        core: CryptoCore = await resources.get("crypto")
        return core

    service = KmsService(store, crypto, quota=resources.settings.section(KmsSettings).quota,
                         actor=default_actor("worker"))
    # Its closing flush seals the audit batch with the HSM, opened after it: close it first.
    resources.close_first(service.close)
    return service, None


@resource("sealer")
async def _sealer_resource(resources: Resources) -> tuple[KmsSealer, None]:
    return KmsSealer(await resources.get("kms")), None


@asynccontextmanager
async def open_kms(
    settings: Settings, *, actor: str | None = None, **options: Any
) -> AsyncIterator[KmsService]:
    """A KMS service for one command or script; everything is closed on exit.

    The HSM is connected (and the token initialised if missing) only when an
    operation needs it, so ``describe-key`` or ``audit list`` do not touch it.
    """
    async with AsyncExitStack() as stack:
        store = await SqliteKmsStore.open(settings.store_target)
        stack.push_async_callback(store.close)
        cores: list[CryptoCore] = []

        async def crypto() -> CryptoCore:
            core = await connect_crypto(settings)
            cores.append(core)
            return core

        async def close_cores() -> None:
            for core in cores:
                await core.close()

        stack.push_async_callback(close_cores)
        service = KmsService(store, crypto, quota=settings.section(KmsSettings).quota,
                             actor=actor or default_actor("cli"), **options)
        stack.push_async_callback(service.close)
        yield service
