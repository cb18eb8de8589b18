"""The session pool's hand-over: every caller gets its own result or its own error.

Calls are queued as they are made and results come back through one outbox per
event loop, a burst of them on one wake-up (``engine/crypto/_pool.py``). These
tests check what that must never get wrong: a result or an error delivered to
the wrong caller, one lost, or a cancelled caller disturbing the others.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pkcs11
import pkcs11.exceptions
import pytest
from pkcs11 import Attribute

from engine.crypto import CryptoCore, HsmConfig, IntegrityCheckFailed, KeyNotFound, KeySpec, _pkcs11
from engine.crypto._pool import _Outbox
from engine.errors import BackendUnavailable


@pytest.mark.parametrize("threads", [1, 2])
async def test_each_caller_gets_its_own_result_and_error(
    hsm_config: HsmConfig, key_label: Callable[[str], str], threads: int
) -> None:
    async with CryptoCore(replace(hsm_config, pool_size=threads)) as core:
        assert core.threads == threads
        label = key_label("own")
        await core.generate_key(KeySpec.AES_256, label, b"own")
        plain = [os.urandom(i % 97) for i in range(300)]
        sealed = await asyncio.gather(*(core.seal(label, p, b"aad%d" % i)
                                        for i, p in enumerate(plain)))

        async def one(i: int) -> bytes | BaseException:
            # Calls come in over several turns of the loop, so batches queue up
            # behind each other and are taken together.
            for _ in range(i % 5):
                await asyncio.sleep(0)
            # Every third open is given another caller's AAD: only that one must fail.
            aad = b"aad%d" % (i + 1 if i % 3 == 0 else i)
            try:
                return await core.open(label, *sealed[i], aad)
            except IntegrityCheckFailed as exc:
                return exc

        results = await asyncio.gather(*(one(i) for i in range(300)))
        await core.destroy_key(label)
    for i, got in enumerate(results):
        if i % 3 == 0:
            assert isinstance(got, IntegrityCheckFailed), i
        else:
            assert got == plain[i], i


async def test_errors_of_different_kinds_reach_their_own_callers(
    crypto_core: CryptoCore, aes_key: str, key_label: Callable[[str], str]
) -> None:
    missing = key_label("missing")
    calls = [crypto_core.generate_data_key(aes_key, 32) if i % 2 else
             crypto_core.generate_data_key(missing, 32) for i in range(40)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    for i, got in enumerate(results):
        if i % 2:
            assert not isinstance(got, BaseException)
            assert await crypto_core.unwrap_data_key(aes_key, got.wrapped) == got.plaintext
        else:
            assert isinstance(got, KeyNotFound) and got.target == missing


async def test_a_cancelled_caller_does_not_disturb_the_others(
    crypto_core: CryptoCore, aes_key: str
) -> None:
    sealed = await crypto_core.seal(aes_key, b"kept", b"")
    tasks = [asyncio.create_task(crypto_core.open(aes_key, *sealed)) for _ in range(60)]
    await asyncio.sleep(0)  # queued, some of them running in the pool threads
    for task in tasks[::4]:
        task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    for i, got in enumerate(done):
        if i % 4 == 0:
            # Cancelled before its result came back, or finished first: both are fine.
            assert isinstance(got, asyncio.CancelledError) or got == b"kept"
        else:
            assert got == b"kept"
    assert await crypto_core.open(aes_key, *sealed) == b"kept"  # the pool still serves


async def test_data_key_and_its_iv_are_distinct_fresh_bytes(
    crypto_core: CryptoCore, aes_key: str
) -> None:
    # The DEK and the IV come from one RNG call: they must still be distinct bytes.
    keys = await asyncio.gather(*(crypto_core.generate_data_key(aes_key, 16, b"x")
                                  for _ in range(50)))
    ivs = {k.wrapped[1:13] for k in keys}
    deks = {k.plaintext for k in keys}
    assert len(ivs) == 50 and len(deks) == 50
    assert not ivs & {d[:12] for d in deks}
    for k in keys:
        assert await crypto_core.unwrap_data_key(aes_key, k.wrapped, b"x") == k.plaintext


async def test_a_key_destroyed_here_is_not_served_from_the_handle_cache(
    crypto_core: CryptoCore, key_label: Callable[[str], str]
) -> None:
    label = key_label("again")
    await crypto_core.generate_key(KeySpec.AES_256, label, b"first")
    # Both threads find the key and keep its handle.
    first = await asyncio.gather(*(crypto_core.seal(label, b"one") for _ in range(8)))
    await crypto_core.destroy_key(label)
    await crypto_core.generate_key(KeySpec.AES_256, label, b"second")
    # Same label, new object: a cached handle to the old one would open these.
    for sealed in first:
        with pytest.raises(IntegrityCheckFailed):
            await crypto_core.open(label, *sealed)
    again = await crypto_core.seal(label, b"two")
    assert await crypto_core.open(label, *again) == b"two"
    await crypto_core.destroy_key(label)


async def test_a_key_is_found_once_while_another_thread_copies_it(
    crypto_core: CryptoCore, key_label: Callable[[str], str]
) -> None:
    # A thread's first use of a key makes its session copy while another thread may
    # look the key up by label. SoftHSM's copy carries the source's label and
    # CKA_TOKEN until its own template is applied: before copies and searches took
    # turns, such lookups found two keys ("several HSM objects share the label") or
    # none, several times a second with both going on in a loop.
    label = key_label("copied")
    await crypto_core.generate_key(KeySpec.AES_256, label, b"x")
    pool = crypto_core._require()
    stop = threading.Event()
    found: list[Any] = []

    def copy_in_a_loop(worker: Any) -> int:
        token = _pkcs11.find_key(worker.session, label, "secret")
        copies = 0
        while not stop.is_set():
            _pkcs11.destroy_copy(_pkcs11.session_copy(token))
            copies += 1
        return copies

    def look_up_in_a_loop(worker: Any) -> None:
        deadline = time.monotonic() + 3.0
        try:
            while time.monotonic() < deadline:
                found.append(_pkcs11.find_key(worker.session, label, "secret"))
        finally:
            stop.set()

    copies, _ = await asyncio.gather(pool.run(copy_in_a_loop), pool.run(look_up_in_a_loop))
    assert copies > 100 and len(found) > 100
    await crypto_core.destroy_key(label)


_DESTROY_ELSEWHERE = """
import sys, pkcs11
from pkcs11 import Attribute
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
with token.open(rw=True, user_pin=sys.argv[3]) as session:
    for obj in session.get_objects({Attribute.LABEL: sys.argv[4]}):
        obj.destroy()
"""


async def test_a_key_destroyed_by_another_process_is_dropped_within_the_recheck_bound(
    hsm_config: HsmConfig, key_label: Callable[[str], str]
) -> None:
    label = key_label("elsewhere")
    async with CryptoCore(replace(hsm_config, key_recheck_seconds=0.3)) as core:
        await core.generate_key(KeySpec.AES_256, label, b"elsewhere")
        sealed = await asyncio.gather(*(core.seal(label, b"x") for _ in range(8)))
        env = {**os.environ, "SOFTHSM2_CONF": str(hsm_config.softhsm_conf)}
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _DESTROY_ELSEWHERE, hsm_config.module_path,
            hsm_config.token_label, hsm_config.user_pin(), label, env=env)
        assert await done.wait() == 0
        await asyncio.sleep(0.4)
        # Past the bound each thread checks the token object, finds it gone, drops
        # its copy and looks the key up again: it is not there.
        for item in sealed:
            with pytest.raises(KeyNotFound):
                await core.open(label, *item)


async def test_a_session_copy_keeps_the_key_sensitive_and_out_of_label_lookups(
    crypto_core: CryptoCore, hsm_config: HsmConfig, aes_key: str
) -> None:
    # The connected core has logged the process in: this session sees private keys.
    token = pkcs11.lib(hsm_config.module_path).get_token(token_label=hsm_config.token_label)
    with token.open(rw=True) as session:
        key = _pkcs11.find_key(session, aes_key, "secret")
        copy = _pkcs11.session_copy(key)
        assert copy is not key
        assert copy[Attribute.SENSITIVE] and not copy[Attribute.EXTRACTABLE]
        assert not copy[Attribute.TOKEN]
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            copy[Attribute.VALUE]
        # Found by label: the token object alone (get_key would refuse two).
        assert _pkcs11.find_key(session, aes_key, "secret").handle == key.handle
        assert await crypto_core.key_exists(aes_key)
        _pkcs11.destroy_copy(copy)


async def test_calls_after_close_are_refused(hsm_config: HsmConfig,
                                             key_label: Callable[[str], str]) -> None:
    core = CryptoCore(hsm_config)
    await core.connect()
    label = key_label("closing")
    await core.generate_key(KeySpec.AES_256, label, b"closing")
    await core.destroy_key(label)
    await core.close()
    with pytest.raises(BackendUnavailable) as refused:
        await core.random_bytes(8)
    assert refused.value.code == "hsm_closed"


async def test_outbox_loses_no_result_when_threads_race_the_loop() -> None:
    # Four threads hand back 4 x 2,000 results while the loop drains: the
    # "signalled" flag is cleared before each drain, so none may be left behind
    # (a lost wake-up would leave futures unresolved: the wait_for times out).
    loop = asyncio.get_running_loop()
    outbox = _Outbox(loop)
    futures = [loop.create_future() for _ in range(8_000)]

    def hand_back(start: int) -> None:
        mine = list(range(start, len(futures), 4))
        while mine:  # in batches of 1..3 results, as a thread finishes them
            batch, mine = mine[: 1 + len(mine) % 3], mine[1 + len(mine) % 3 :]
            outbox.put_all([(futures[j], None, ValueError(j)) if j % 7 == 0 else
                            (futures[j], j, None) for j in batch])

    threads = [threading.Thread(target=hand_back, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
    for thread in threads:
        thread.join()
    for i, got in enumerate(results):
        if i % 7 == 0:
            assert isinstance(got, ValueError) and got.args == (i,)
        else:
            assert got == i
