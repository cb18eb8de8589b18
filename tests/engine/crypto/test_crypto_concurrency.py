"""Load proof of the threading design: 2 pool threads, each with its own session.

The workload runs in a subprocess (this file run as a script) because the
failure it guards against is a crash of the whole process: with python-pkcs11's
own ``C_Initialize(NULL)`` SoftHSM takes no locks and two sessions used from two
threads crashed the process (FACTS.md). A fresh process also means a fresh
module initialisation, done the way production does it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pkcs11.exceptions

from engine.crypto import HsmConfig

ROOT = Path(__file__).resolve().parents[3]
TASKS = 1_000  # each task makes 2 core calls: 2,000 calls over 2 threads


async def workload(tasks: int, pool_size: int) -> dict[str, object]:
    from engine.crypto import CryptoCore, IntegrityCheckFailed, KeySpec
    from engine.crypto.testing import shared_softhsm_config

    config = shared_softhsm_config(pool_size=pool_size)
    async with CryptoCore(config) as core:
        label = "concurrency-cmk"
        await core.generate_key(KeySpec.AES_256, label, b"concurrency")
        wrong: list[str] = []
        refused = 0

        async def one(i: int) -> None:
            nonlocal refused
            aad = f"task={i}".encode()
            kind = i % 5
            if kind == 0:
                dek = await core.generate_data_key(label, (16, 32, 64)[i % 3], aad)
                if await core.unwrap_data_key(label, dek.wrapped, aad) != dek.plaintext:
                    wrong.append(f"datakey {i}")
            elif kind == 1:
                message = os.urandom(i % 200)
                sealed = await core.seal(label, message, aad)
                if await core.open(label, *sealed, aad) != message:
                    wrong.append(f"seal/open {i}")
            elif kind == 2:
                dek_bytes = os.urandom(32)
                blob = await core.wrap_data_key(label, dek_bytes, aad)
                if await core.unwrap_data_key(label, blob, aad) != dek_bytes:
                    wrong.append(f"wrap/unwrap {i}")
            elif kind == 3:
                sealed = await core.seal(label, b"bound to its aad", aad)
                try:
                    await core.open(label, *sealed, aad + b"!")
                    wrong.append(f"wrong aad accepted {i}")
                except IntegrityCheckFailed:
                    refused += 1
            else:
                data = await core.random_bytes(1 + i % 64)
                sealed = await core.seal(label, data)
                if len(data) != 1 + i % 64 or await core.open(label, *sealed) != data:
                    wrong.append(f"random {i}")

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(tasks)))
        elapsed = time.perf_counter() - started
        result = {
            "mode": core.session_mode,
            "threads": core.threads,
            "sessions": core.sessions_opened,
            "calls": tasks * 2,
            "wrong": wrong,
            "refused": refused,
            "calls_per_second": round(tasks * 2 / elapsed),
        }
        await core.destroy_key(label)
        return result


def test_two_threads_thousand_calls_each_no_crash_no_wrong_result() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SOFTHSM2_CONF", None)
    done = subprocess.run(
        [sys.executable, __file__, str(TASKS), "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, f"rc={done.returncode}\n{done.stdout}\n{done.stderr}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["mode"] == "session-per-thread"
    assert result["threads"] == 2 and result["sessions"] == 2  # both threads did work
    assert result["calls"] == 2_000
    assert result["wrong"] == []
    assert result["refused"] == TASKS // 5


if __name__ == "__main__":
    print(json.dumps(asyncio.run(workload(int(sys.argv[1]), int(sys.argv[2])))))


def test_a_login_refused_by_a_concurrent_login_is_tried_again(hsm_config: HsmConfig) -> None:
    """SoftHSM logins of several processes at once now and then fail with
    CKR_GENERAL_ERROR (each rewrites the token file): a process starting beside
    another (a worker and an API) logs in on the next try instead of failing."""
    from engine.crypto import _pkcs11

    module = _pkcs11.load_module(hsm_config)
    real = _pkcs11.require_token(module, hsm_config.token_label, hsm_config.slot)

    class RefusedOnce:
        slot = real.slot
        label = real.label
        tries = 0

        def open(self, **kwargs: object) -> object:
            RefusedOnce.tries += 1
            if RefusedOnce.tries == 1:
                raise pkcs11.exceptions.GeneralError()
            return real.open(**kwargs)

    # The login itself (login() shares one per process: another core of this test
    # process may hold it already).
    session = _pkcs11._open_logged_in(RefusedOnce(), hsm_config.user_pin())
    try:
        assert RefusedOnce.tries >= 2
        assert len(session.generate_random(64)) == 8
    finally:
        session.close()
