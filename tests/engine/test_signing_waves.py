"""Job signatures made and checked in waves (engine.job_signing): the jobs that
arrive together go to the token together, and each caller still gets its own
signature, its own verdict, or its own error."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Sequence

import pytest

import engine.hsm  # noqa: F401  registers the crypto resource
from engine.crypto import CryptoCore
from engine.errors import InvalidInput
from engine.job_signing import JobSigner
from engine.resources import Resources
from engine.settings import Settings


class CountingSigner(JobSigner):
    """Records the size of each wave it sends to the token."""

    waves: list[int]

    async def _verify_wave(
        self, items: Sequence[tuple[bytes, bytes]],
    ) -> list[bool | BaseException]:
        self.waves.append(len(items))
        return await super()._verify_wave(items)


@pytest.fixture
async def signer(settings: Settings) -> AsyncIterator[CountingSigner]:
    resources = Resources(settings)
    try:
        core: CryptoCore = await resources.get("crypto")
        s = CountingSigner(core, str(settings.state_dir / "hsm"))
        s.waves = []
        await s.ready()
        yield s
    finally:
        await resources.close()


async def test_a_wave_gives_each_caller_its_own_verdict_and_error(
    signer: CountingSigner,
) -> None:
    jobs = [("engine.echo", f"t{i}", {"value": i}) for i in range(6)]
    sigs = await asyncio.gather(*(signer.sign(*job) for job in jobs))
    assert len(set(sigs)) == 6  # each job its own signature
    oversized = base64.b64encode(b"x" * 5000).decode()
    results = await asyncio.gather(
        *(signer.verify(*job, sig) for job, sig in zip(jobs, sigs, strict=True)),
        signer.verify("engine.echo", "t0", {"value": 0}, sigs[1]),  # another job's
        signer.verify("engine.echo", "t2", {"value": 99}, sigs[2]),  # altered on the way
        signer.verify("engine.echo", "t3", {"value": 3}, oversized),  # refused by the core
        signer.verify("engine.echo", "t4", {"value": 4}, None),  # unsigned: never sent
        return_exceptions=True,
    )
    assert results[:8] == [True] * 6 + [False, False]
    assert isinstance(results[8], InvalidInput) and results[9] is False
    assert signer.waves == [9]  # one wave: the unsigned job never reached the token
