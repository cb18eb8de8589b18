"""Data processes (``hsm.data_processes``): the data plane's token calls in child
processes, on the real SoftHSM2 token. Each caller gets its own result or error,
keys changed in this process reach the child, a child that dies loses no call, and
the PIN never shows in the child's command line or environment."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from engine.crypto import CryptoCore, HsmConfig, KeySpec
from engine.crypto.errors import IntegrityCheckFailed, KeyNotFound
from engine.errors import ConfigError
from engine.settings import load_settings


@pytest.fixture
async def lane_core(hsm_config: HsmConfig) -> AsyncIterator[CryptoCore]:
    async with CryptoCore(replace(hsm_config, data_processes=1)) as core:
        yield core


async def _aes(core: CryptoCore, key_label: Callable[[str], str]) -> str:
    label = key_label("lane")
    await core.generate_key(KeySpec.AES_256, label, label.encode())
    return label


async def test_a_data_process_runs_the_data_planes_calls(
    lane_core: CryptoCore, crypto_core: CryptoCore, key_label: Callable[[str], str],
) -> None:
    """Sealed by the child, opened by the threads of another core, and back: the same
    token, the same AES-GCM."""
    (pid,) = lane_core.data_process_pids
    assert pid != os.getpid() and Path(f"/proc/{pid}").exists()
    label = await _aes(lane_core, key_label)  # made after the child started
    sealed = await lane_core.seal(label, b"through the child", b"aad")
    assert await crypto_core.open(label, sealed.iv, sealed.ciphertext, b"aad") == \
        b"through the child"
    back = await crypto_core.seal(label, b"through the threads", b"aad")
    assert await lane_core.open(label, back.iv, back.ciphertext, b"aad") == \
        b"through the threads"
    dek, wrapped = await lane_core.submit_data_key(label, 32, b"ctx")
    assert len(dek) == 32
    assert await crypto_core.open(label, wrapped.iv, wrapped.ciphertext, b"ctx") == dek
    await lane_core.destroy_key(label)


async def test_every_caller_of_a_batch_gets_its_own_result_or_error(
    lane_core: CryptoCore, key_label: Callable[[str], str],
) -> None:
    label = await _aes(lane_core, key_label)
    good = await lane_core.seal(label, b"x" * 16)
    calls = []
    for n in range(40):
        if n % 10 == 3:
            calls.append(lane_core.open(label, good.iv, good.ciphertext[:-1] + b"\0"))
        elif n % 10 == 7:
            calls.append(lane_core.seal("no-such-key-" + key_label("x"), b"y"))
        else:
            calls.append(lane_core.seal(label, n.to_bytes(2, "big")))
    results = await asyncio.gather(*calls, return_exceptions=True)
    for n, result in enumerate(results):
        if n % 10 == 3:
            assert isinstance(result, IntegrityCheckFailed), result
        elif n % 10 == 7:
            assert isinstance(result, KeyNotFound), result
        else:
            assert not isinstance(result, BaseException), result
            opened = await lane_core.open(label, result.iv, result.ciphertext)
            assert opened == n.to_bytes(2, "big")
    # A caller that gave up leaves the others their results.
    waiting = [asyncio.ensure_future(lane_core.seal(label, b"z")) for _ in range(8)]
    waiting[2].cancel()
    done = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    assert all(not isinstance(d, BaseException) for i, d in enumerate(done) if i != 2)
    await lane_core.destroy_key(label)


async def test_a_key_destroyed_here_is_gone_for_the_child_at_once(
    lane_core: CryptoCore, key_label: Callable[[str], str],
) -> None:
    """The child keeps a session copy of a key it used; destroying the key in this
    process drops that copy before the child's next call (as in the threads)."""
    label = await _aes(lane_core, key_label)
    await lane_core.seal(label, b"cached in the child now")
    assert await lane_core.destroy_key(label)
    with pytest.raises(KeyNotFound):
        await lane_core.seal(label, b"after the destroy")


async def test_a_data_process_that_dies_loses_no_call(
    lane_core: CryptoCore, key_label: Callable[[str], str],
) -> None:
    """SIGKILL of the child with calls in flight: those calls and all later ones are
    made by the threads, with one warning; every caller gets its right result."""
    label = await _aes(lane_core, key_label)
    (pid,) = lane_core.data_process_pids
    calls = [asyncio.ensure_future(lane_core.seal(label, n.to_bytes(2, "big")))
             for n in range(200)]
    await asyncio.sleep(0)
    os.kill(pid, signal.SIGKILL)
    with capture_logs() as logs:
        results = await asyncio.gather(*calls)
        later = await lane_core.seal(label, b"after")
    for n, sealed in enumerate(results):
        assert await lane_core.open(label, sealed.iv, sealed.ciphertext) == \
            n.to_bytes(2, "big")
    assert await lane_core.open(label, later.iv, later.ciphertext) == b"after"
    assert lane_core.data_process_pids == []
    warned = [e for e in logs if "HSM data process stopped" in e["event"]]
    assert len(warned) == 1 and warned[0]["reason"] == "exited with status -9", logs
    await lane_core.destroy_key(label)


async def test_the_child_keeps_the_pin_private_and_ends_with_the_core(
    hsm_config: HsmConfig,
) -> None:
    pin = hsm_config.user_pin()
    core = CryptoCore(replace(hsm_config, data_processes=2))
    await core.connect()
    pids = core.data_process_pids
    assert len(pids) == 2
    for pid in pids:
        assert pin.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert pin.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    await core.close()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


def test_data_processes_out_of_range_are_refused(
    hsm_config: HsmConfig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match=r"data_processes must be 0\.\.16"):
        replace(hsm_config, data_processes=17)
    monkeypatch.setenv("DEW_HSM_DATA_PROCESSES", "-2")
    with pytest.raises(ConfigError, match=r"data_processes must be -1 \(auto\) or between"):
        load_settings()


async def test_data_processes_that_cannot_start_leave_the_threads_serving(
    hsm_config: HsmConfig, key_label: Callable[[str], str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A way to go faster, never a reason to be down: a child that exits at once (here
    a Python that is not one) leaves the core connected, its threads making the calls."""
    from engine.crypto import _lane

    monkeypatch.setattr(_lane.sys, "executable", "/bin/false")
    with capture_logs() as logs:
        core = CryptoCore(replace(hsm_config, data_processes=1))
        await core.connect()
    async with core:
        assert core.data_process_pids == []
        label = await _aes(core, key_label)
        sealed = await core.seal(label, b"by the threads")
        assert await core.open(label, sealed.iv, sealed.ciphertext) == b"by the threads"
        await core.destroy_key(label)
    assert any("data processes did not start" in e["event"] for e in logs), logs

