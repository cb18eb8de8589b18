"""Proof of who enqueued a job: an HMAC, with a key in the HSM, over the job.

The client signs every job it enqueues: HMAC-SHA256 (key ``engine:job-signing``,
generated in the token on first use, never extractable) over the job name, the
task id, the account and the arguments as the task store keeps them. The
signature travels with the job (arq keyword ``dew_sig``) and in the task row
(so the sweeper can deliver it again). The worker checks it before anything
else: an unsigned or altered job is refused and recorded, never run. Only
holders of the HSM PIN (the engine's own processes) can sign; a plain arq
client signs with :func:`arq_signature` (``docs/engine.md``).

Signatures made or checked together go to the token together
(``engine.batching``): the hundred jobs a worker claims in one poll are checked as
one wave, and resume together, so their task-store writes after it are one
group-committed batch instead of a trickle of one-row writes. Every job is still
checked on its own, and each caller gets its own answer or error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, TypeVar

from engine.batching import Batcher
from engine.crypto import CryptoCore, KeySpec, SignAlgorithm
from engine.resources import Resources, resource
from engine.settings import Settings

SIGNING_KEY = "engine:job-signing"
SIGNATURE_ARG = "dew_sig"
_DOMAIN = b"dew-job-v1\0"
T = TypeVar("T")


def job_digest(name: str, task_id: str, args: Any) -> bytes:
    """What is signed: SHA-256 of the job's canonical JSON (name, task, account, args)."""
    account = args.get("account", "default") if isinstance(args, dict) else None
    data = json.dumps([name, task_id, account, args], sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(_DOMAIN + data.encode("utf-8", "surrogatepass")).digest()


class JobSigner:
    """Signs jobs and checks their signatures with the token key ``engine:job-signing``."""

    def __init__(self, core: CryptoCore, lock_dir: str) -> None:
        self.core = core
        self.lock_dir = lock_dir
        self._ready = False
        self._lock = asyncio.Lock()
        self._signs: Batcher[bytes, bytes | BaseException] = Batcher(self._sign_wave)
        self._verifies: Batcher[tuple[bytes, bytes], bool | BaseException] = Batcher(
            self._verify_wave)

    async def ready(self) -> None:
        """Open the token and make the key if needed (a worker does it at start-up, so
        that checking a job costs one HMAC call)."""
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            # Processes sharing the token make the key once: check and create under a lock.
            fd = await asyncio.to_thread(self._locked_file)
            try:
                await self.core.ensure_key(KeySpec.HMAC_256, SIGNING_KEY, SIGNING_KEY.encode())
            finally:
                os.close(fd)  # releases the lock
            self._ready = True

    def _locked_file(self) -> int:
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.lock_dir, ".job-signing.lock"),
                     os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    async def sign(self, name: str, task_id: str, args: Any) -> str:
        await self.ready()
        tag = _own(await self._signs.submit(job_digest(name, task_id, args)))
        return base64.b64encode(tag).decode()

    async def verify(self, name: str, task_id: str, args: Any, signature: Any) -> bool:
        if not isinstance(signature, str) or not signature:
            return False
        try:
            tag = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            return False
        await self.ready()
        return _own(await self._verifies.submit((job_digest(name, task_id, args), tag)))

    async def _sign_wave(self, digests: Sequence[bytes]) -> list[bytes | BaseException]:
        return await asyncio.gather(
            *(self.core.sign(SIGNING_KEY, d, SignAlgorithm.HMAC_SHA256) for d in digests),
            return_exceptions=True)

    async def _verify_wave(
        self, items: Sequence[tuple[bytes, bytes]],
    ) -> list[bool | BaseException]:
        return await asyncio.gather(
            *(self.core.verify(SIGNING_KEY, d, tag, SignAlgorithm.HMAC_SHA256)
              for d, tag in items),
            return_exceptions=True)


def _own(outcome: T | BaseException) -> T:
    """One caller's answer out of a wave: its result, or its own error raised."""
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


@resource("job_signer")
async def _job_signer(resources: Resources) -> tuple[JobSigner, None]:
    import engine.hsm  # noqa: F401  registers the crypto resource

    core: CryptoCore = await resources.get("crypto")
    return JobSigner(core, str(resources.settings.state_dir / "hsm")), None


async def arq_signature(settings: Settings, name: str, task_id: str,
                        args: dict[str, Any]) -> dict[str, str]:
    """The keyword a plain arq client adds to ``enqueue_job`` (with ``_job_id=task_id``)
    so that a worker runs its job: ``await pool.enqueue_job(name, args,
    _job_id=task_id, **await arq_signature(settings, name, task_id, args))``."""
    from engine.registry import default_registry
    from engine.runner import stored_form

    spec = default_registry(settings).check_args(name, args)
    resources = Resources(settings)
    try:
        signer: JobSigner = await resources.get("job_signer")
        return {SIGNATURE_ARG: await signer.sign(name, task_id, stored_form(spec, args))}
    finally:
        await resources.close()
