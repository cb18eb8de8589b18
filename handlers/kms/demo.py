"""The KMS part of ``make demo``: a CMK, envelope encryption, encrypt-data, a
scheduled and cancelled deletion run as jobs by the worker, the audit check, and
the official SDK calling ``dew api`` (``demo_sdk``).

Needs a running worker on the same settings (``make demo`` starts one) for the
two deletion jobs. Re-running reuses the demo key (alias ``demo/cmk``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.client import Client
from engine.errors import DewError
from engine.settings import Settings

ALIAS = "demo/cmk"
JOB_TIMEOUT = 60.0


async def run(settings: Settings, say: Callable[[str], None]) -> None:
    from handlers.kms.errors import UnknownKey
    from handlers.kms.wiring import open_kms

    async with open_kms(settings, actor="demo") as kms:
        try:
            key = await kms.describe_key(ALIAS)
            if key.key_state == "disabled":
                key = (await kms.enable_key(ALIAS)).key
        except UnknownKey:
            key = await kms.create_key(ALIAS, description="made by make demo")
        say(f"KMS: CMK {ALIAS} ({key.key_id}) {key.key_spec}, in the HSM, never extractable")

        message = b"a file too large for KMS itself"
        dek = await kms.create_datakey(ALIAS)
        assert dek.plain_text is not None
        nonce = os.urandom(12)
        encrypted = AESGCM(dek.plain_text).encrypt(nonce, message, None)
        stored_key = dek.cipher_text  # kept beside the data; the plaintext DEK is dropped
        del dek
        back = await kms.decrypt_datakey(ALIAS, stored_key)
        assert back.plain_text is not None
        ok = AESGCM(back.plain_text).decrypt(nonce, encrypted, None) == message
        say(f"KMS: envelope encryption with a 256-bit data key: round trip "
            f"{'ok' if ok else 'FAILED'} (encrypted data key {len(stored_key)} bytes)")

        sealed = await kms.encrypt_data(ALIAS, b"4 B!")
        opened = await kms.decrypt_data(sealed.cipher_text_base64)
        say(f"KMS: encrypt-data of 4 bytes -> {len(sealed.cipher_text)} bytes, "
            f"{len(sealed.cipher_text_base64)} Base64 characters; decrypt-data "
            f"{'ok' if opened.plain_text == b'4 B!' else 'FAILED'} (no key id needed)")

        async with await Client.open(settings) as client:
            scheduled = await _job(client, "kms.schedule_key_deletion",
                                   {"key": key.key_id, "pending_days": 7})
            say(f"KMS: deletion scheduled by the worker: {scheduled['key_state']} until "
                f"{str(scheduled['scheduled_deletion_date'])[:19]}")
            cancelled = await _job(client, "kms.cancel_key_deletion", {"key": key.key_id})
            say(f"KMS: deletion cancelled by the worker: key back to {cancelled['key_state']}")
        await kms.enable_key(ALIAS)

        verdict = await kms.audit_verify()
        say(f"KMS: audit chain {'intact' if verdict.intact else 'BROKEN'} "
            f"({verdict.entries} entries)")

    from handlers.kms import demo_sdk

    await demo_sdk.run(settings, say)


async def _job(client: Client, name: str, args: dict[str, Any]) -> dict[str, Any]:
    task = await client.enqueue(name, args)
    done = await client.wait(task.task_id, timeout=JOB_TIMEOUT)
    if done.status != "succeeded":
        raise DewError.from_dict(done.error or {"message": f"{name} failed"})
    result: dict[str, Any] = done.result
    return result
