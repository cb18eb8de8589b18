"""A service's own key (job signing, audit seals, sealed access keys) made on first use
by whichever process gets there first: processes on several nodes sharing one token,
started at the same moment, leave exactly one key under each label (the token keeps
no label unique, and no lock of ours spans nodes)."""

from __future__ import annotations

import os
import subprocess
import sys

from engine.crypto import CryptoCore, HsmConfig, KeySpec, SignAlgorithm, _pkcs11
from tests.helpers import ROOT

LABELS = [f"svc:race-{n}" for n in range(12)]

MAKER = """
import asyncio, sys
from pathlib import Path
from engine.crypto import CryptoCore, HsmConfig, KeySpec, SignAlgorithm

async def main():
    pin = sys.stdin.readline().strip()
    config = HsmConfig(module_path=sys.argv[1], token_label=sys.argv[2], pin=pin, pool_size=1)
    async with CryptoCore(config) as core:
        print("ready", flush=True)
        sys.stdin.readline()  # "go": every maker starts at once
        for label in sys.argv[3:]:
            await core.ensure_key(KeySpec.HMAC_256, label, label.encode())
            await core.sign(label, b"used at once", SignAlgorithm.HMAC_SHA256)

asyncio.run(main())
"""


async def test_makers_on_one_token_at_once_leave_one_key_per_label(
    hsm_config: HsmConfig,
) -> None:
    env = {**os.environ}
    if hsm_config.softhsm_conf is not None:
        env["SOFTHSM2_CONF"] = str(hsm_config.softhsm_conf)
    makers = [subprocess.Popen(
        [sys.executable, "-c", MAKER, hsm_config.module_path, hsm_config.token_label,
         *LABELS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=ROOT, env=env) for _ in range(4)]
    for maker in makers:
        assert maker.stdin is not None and maker.stdout is not None
        maker.stdin.write(f"{hsm_config.user_pin()}\n")
        maker.stdin.flush()
        assert maker.stdout.readline().strip() == "ready", maker.stderr
    for maker in makers:
        assert maker.stdin is not None
        maker.stdin.write("go\n")
        maker.stdin.flush()
    errors = [maker.communicate(timeout=120)[1] for maker in makers]
    assert [m.returncode for m in makers] == [0, 0, 0, 0], errors
    async with CryptoCore(hsm_config) as core:
        pool = core._require()  # noqa: SLF001 - counting the token's objects
        counts = await pool.run(lambda w: {
            label: len(_pkcs11.objects_with_label(w.session, label)) for label in LABELS})
        assert counts == dict.fromkeys(LABELS, 1)
        for label in LABELS:
            await core.destroy_key(label)


async def test_a_key_that_exists_is_used_not_made_again(hsm_config: HsmConfig) -> None:
    async with CryptoCore(hsm_config) as core:
        await core.ensure_key(KeySpec.HMAC_256, "svc:once", b"svc:once")
        tag = await core.sign("svc:once", b"m", SignAlgorithm.HMAC_SHA256)
        await core.ensure_key(KeySpec.HMAC_256, "svc:once", b"svc:once")
        assert await core.sign("svc:once", b"m", SignAlgorithm.HMAC_SHA256) == tag
        await core.destroy_key("svc:once")
