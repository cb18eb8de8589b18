"""KMS data-key operations per second: our API vs a bare PKCS#11 call vs no HSM at all.

Four ways to do create-datakey (32 random bytes from the token + AES-256-GCM
under the CMK, 64+ bytes of additional data) and decrypt-datakey (AES-256-GCM
decrypt), on one SoftHSM2 token created in a temporary directory:

- ``dew``: ``KmsService.create_datakey`` / ``decrypt_datakey`` from asyncio
  tasks (``--callers`` concurrent), through the crypto core's thread pool
  (``threads`` = pool size), with key lookup, ciphertext format and audit.
- ``dew-procs``: the same, with ``hsm.data_processes`` = threads: the token calls
  in child processes (engine/crypto/_lane.py), so the event loop works beside the
  token instead of taking turns with it under one GIL. Its CPU per op counts the
  children's too.
- ``core``: the crypto core alone (``CryptoCore.generate_data_key`` / ``open``),
  same callers and pool: shows how the overhead splits between the thread
  pool and the KMS layer above it.
- ``pkcs11``: the same token calls made directly with python-pkcs11, one
  session per thread, in a tight loop (no asyncio, no registry, no audit), on
  the token object; and once more on a session copy of the key, as the crypto
  core's threads use it (SoftHSM re-reads a token object's file on every use).
- ``cryptography``: in-process AESGCM and os.urandom (the no-HSM ceiling).

Each with 1 and 2 threads. Every measurement is cut into ``--rounds`` slices taken
in turn with the others', so a passing load on a shared machine weighs on all of
them alike and the ratios (measured in one run) stay comparable. Prints ops/s,
the 2-thread/1-thread ratio, our overhead over the direct call (extra time per op:
direct/ours - 1) and the HSM's cost against in-process crypto.

A second table: signing and MACs through ``KmsService`` (``sign`` RSA-2048
RSASSA_PSS_SHA_256 and P-256 ECDSA_SHA_256 over a 64-byte RAW message,
``generate_mac`` HMAC_SHA_256), against in-process ``cryptography`` / ``hmac``.

    .venv/bin/python bench/kms_ops.py [--seconds 1.5] [--rounds 6] [--callers 32]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pkcs11  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from pkcs11 import Attribute, GCMParams, Mechanism, ObjectClass  # noqa: E402

from engine.crypto import CryptoCore, HsmConfig, init_token  # noqa: E402
from handlers.kms.core import token_label  # noqa: E402
from handlers.kms.service import KmsService  # noqa: E402
from handlers.kms.store import SqliteKmsStore  # noqa: E402

THREADS = (1, 2)
OPERATIONS = ("create-datakey", "decrypt-datakey")
SIGN_OPS = ("sign RSA-2048 PSS", "sign P-256 ECDSA", "HMAC-SHA-256")
MESSAGE = bytes(64)
AAD = bytes(64) + b"{}"  # the size of our header's authenticated part


def measure_threads(seconds: float, ops: Sequence[Callable[[], Any]]) -> float:
    """ops/s of one thread per op in ``ops``, each calling its op in a loop."""
    counts = [0] * len(ops)
    start = threading.Barrier(len(ops) + 1)
    stop = threading.Event()

    def loop(i: int) -> None:
        op = ops[i]
        op()  # warm-up
        start.wait()
        n = 0
        while not stop.is_set():
            op()
            n += 1
        counts[i] = n

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(len(ops))]
    for w in workers:
        w.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - began)


class Tally:
    """Counts, seconds and the process's CPU seconds per measurement, summed over
    interleaved rounds."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str, int], list[float]] = {}

    def add(self, key: tuple[str, str, int], rate: float, seconds: float,
            cpu: float = 0.0) -> None:
        run = self.runs.setdefault(key, [0.0, 0.0, 0.0])
        run[0] += rate * seconds
        run[1] += seconds
        run[2] += cpu

    def rates(self) -> dict[tuple[str, str, int], float]:
        return {key: n / t for key, (n, t, _) in self.runs.items()}

    def cpu_per_op(self) -> dict[tuple[str, str, int], float]:
        """CPU seconds of every thread of this process per operation: on a loaded
        machine a steadier figure than ops/s (it leaves out the time others ran)."""
        return {key: cpu / n for key, (n, _, cpu) in self.runs.items() if n and cpu}


async def measure_async(seconds: float, callers: int, op: Callable[[], Awaitable[Any]]) -> float:
    await op()  # warm-up
    deadline = time.perf_counter() + seconds
    count = 0

    async def caller() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await op()
            count += 1

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return count / (time.perf_counter() - began)


def direct_ops(config: HsmConfig, label: str, kind: str, *, copy: bool = False
               ) -> Callable[[], Any]:
    """The token calls of ``kind`` made directly, on a session of their own; with
    ``copy`` through a session copy of the key, as the crypto core's threads do."""
    # pkcs11.lib() hands back the module our core initialised (with OS locking),
    # so one session per thread is safe here too.
    token = pkcs11.lib(config.module_path).get_token(token_label=config.token_label)
    session = token.open(rw=True)
    key: Any = session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
    if copy:
        key = key.copy({Attribute.TOKEN: False, Attribute.LABEL: ""})
    iv = session.generate_random(96)
    sample = key.encrypt(bytes(32), mechanism=Mechanism.AES_GCM,
                         mechanism_param=GCMParams(iv, AAD))

    def create() -> Any:
        # The calls the crypto core makes: one RNG call for the key and its IV.
        both = session.generate_random(8 * (32 + 12))
        return key.encrypt(both[:32], mechanism=Mechanism.AES_GCM,
                           mechanism_param=GCMParams(both[32:], AAD))

    def decrypt() -> Any:
        return key.decrypt(sample, mechanism=Mechanism.AES_GCM,
                           mechanism_param=GCMParams(iv, AAD))

    return create if kind == "create" else decrypt


def software_sign_op(op: str) -> Callable[[], Any]:
    if op == SIGN_OPS[0]:
        key = rsa.generate_private_key(65537, 2048)
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
        return lambda: key.sign(MESSAGE, pss, hashes.SHA256())
    if op == SIGN_OPS[1]:
        eck = ec.generate_private_key(ec.SECP256R1())
        return lambda: eck.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
    secret = os.urandom(32)
    return lambda: hmac.new(secret, MESSAGE, hashlib.sha256).digest()


async def run_signing(
    store: SqliteKmsStore, cores: dict[int, CryptoCore], seconds: float, callers: int,
    rounds: int,
) -> dict[tuple[str, str, int], float]:
    tally = Tally()
    setup = KmsService(store, cores[1])
    keys = [(await setup.create_key(f"bench/{spec}", spec)).key_id
            for spec in ("RSA_2048", "EC_P256", "HMAC_256")]
    await setup.close()
    piece = seconds / rounds
    for threads in THREADS:
        kms = KmsService(store, cores[threads])
        calls: list[Callable[[], Awaitable[Any]]] = [
            partial(kms.sign, keys[0], MESSAGE, "RSASSA_PSS_SHA_256"),
            partial(kms.sign, keys[1], MESSAGE, "ECDSA_SHA_256"),
            partial(kms.generate_mac, keys[2], MESSAGE),
        ]
        software = {op: [software_sign_op(op) for _ in range(threads)] for op in SIGN_OPS}
        for _ in range(rounds):
            for op, call in zip(SIGN_OPS, calls, strict=True):
                tally.add((op, "dew", threads), await measure_async(piece, callers, call), piece)
                tally.add((op, "software", threads), await asyncio.to_thread(
                    measure_threads, piece, software[op]), piece)
        await kms.close()
    return tally.rates()


def report_signing(results: dict[tuple[str, str, int], float]) -> str:
    names = {"dew": "dew KmsService (token)", "software": "in-process cryptography / hmac"}
    lines = [f"{'operation':19} {'implementation':32} {'1 thread':>10} {'2 threads':>10} "
             f"{'2t/1t':>6}"]
    for op in SIGN_OPS:
        for impl in ("dew", "software"):
            one, two = results[(op, impl, 1)], results[(op, impl, 2)]
            lines.append(f"{op:19} {names[impl]:32} {one:>10,.0f} {two:>10,.0f} "
                         f"{two / one:>6.2f}")
        ratio = [results[(op, "dew", t)] / results[(op, "software", t)] for t in THREADS]
        lines.append(f"{op:19} {'dew / in-process':32} "
                     + "".join(f"{r:>10.3f}" for r in ratio))
    return "\n".join(lines)


def software_op(kind: str) -> Callable[[], Any]:
    aead = AESGCM(AESGCM.generate_key(256))
    iv = os.urandom(12)
    sample = aead.encrypt(iv, bytes(32), AAD)

    def create() -> Any:
        return aead.encrypt(os.urandom(12), os.urandom(32), AAD)

    def decrypt() -> Any:
        return aead.decrypt(iv, sample, AAD)

    return create if kind == "create" else decrypt


async def run(seconds: float, callers: int, rounds: int) -> dict[tuple[str, str, int], float]:
    tally = Tally()
    piece = seconds / rounds
    with tempfile.TemporaryDirectory(prefix="dew-bench-") as tmp:
        base = HsmConfig.for_softhsm(tmp, token_label="dew-bench")
        init_token(base)
        store = await SqliteKmsStore.open(Path(tmp) / "dew.sqlite3")
        cores = {n: CryptoCore(replace(base, pool_size=n)) for n in THREADS}
        # The same, with the data plane's token calls in as many child processes.
        lanes = {n: CryptoCore(replace(base, pool_size=n, data_processes=n)) for n in THREADS}
        for core in (*cores.values(), *lanes.values()):
            await core.connect()
        try:
            setup = KmsService(store, cores[1])
            key = await setup.create_key("bench/cmk")
            sample = await setup.create_datakey(key.key_id)
            await setup.close()
            label = token_label(key.key_id, 1)
            for threads in THREADS:
                kms = KmsService(store, cores[threads])
                kms_procs = KmsService(store, lanes[threads])
                core = cores[threads]
                children = lanes[threads].data_process_pids
                blob = (await core.generate_data_key(label, 32, AAD)).wrapped
                calls: dict[tuple[str, str], Callable[[], Awaitable[Any]]] = {
                    ("create-datakey", "dew"): partial(kms.create_datakey, key.key_id),
                    ("decrypt-datakey", "dew"): partial(kms.decrypt_datakey, key.key_id,
                                                        sample.cipher_text),
                    ("create-datakey", "dew-procs"): partial(kms_procs.create_datakey,
                                                             key.key_id),
                    ("decrypt-datakey", "dew-procs"): partial(kms_procs.decrypt_datakey,
                                                              key.key_id, sample.cipher_text),
                    ("create-datakey", "core"): partial(core.generate_data_key, label, 32,
                                                        AAD),
                    ("decrypt-datakey", "core"): partial(core.unwrap_data_key, label, blob,
                                                         AAD),
                }
                loops = {(op, impl): [make(kind) for _ in range(threads)]
                         for op, kind in (("create-datakey", "create"),
                                          ("decrypt-datakey", "decrypt"))
                         for impl, make in (
                             ("pkcs11", partial(direct_ops, base, label)),
                             ("pkcs11-copy", partial(direct_ops, base, label, copy=True)),
                             ("cryptography", software_op))}
                # Short slices in turn, so a load that comes and goes on a shared
                # machine weighs on every implementation alike.
                for _ in range(rounds):
                    for op in OPERATIONS:
                        for impl in ("dew", "dew-procs", "core"):
                            cpu = cpu_seconds(children)
                            rate = await measure_async(piece, callers, calls[(op, impl)])
                            tally.add((op, impl, threads), rate, piece,
                                      cpu_seconds(children) - cpu)
                        for impl in ("pkcs11", "pkcs11-copy", "cryptography"):
                            cpu = time.process_time()
                            rate = await asyncio.to_thread(
                                measure_threads, piece, loops[(op, impl)])
                            tally.add((op, impl, threads), rate, piece,
                                      time.process_time() - cpu)
                await kms.close()
                await kms_procs.close()
            CPU_PER_OP.update(tally.cpu_per_op())
            results = tally.rates() | await run_signing(store, cores, seconds, callers, rounds)
        finally:
            for core in (*cores.values(), *lanes.values()):
                await core.close()
            await store.close()
    return results


def cpu_seconds(children: Sequence[int] = ()) -> float:
    """CPU seconds of this process and of the running ``children`` (from /proc)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in children:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


# CPU seconds per data-key operation, by (operation, implementation, threads).
CPU_PER_OP: dict[tuple[str, str, int], float] = {}


def report(results: dict[tuple[str, str, int], float], callers: int) -> str:
    names = {"dew": f"dew KmsService ({callers} asyncio callers)",
             "dew-procs": "dew KmsService, data processes (same)",
             "core": "dew crypto core alone (same callers)",
             "pkcs11": "direct python-pkcs11 call",
             "pkcs11-copy": "direct, on a session copy of the key",
             "cryptography": "in-process cryptography AESGCM"}
    lines = [f"{'operation':17} {'implementation':40} {'1 thread':>10} {'2 threads':>10} "
             f"{'2t/1t':>6}"]
    for op in ("create-datakey", "decrypt-datakey"):
        for impl in ("dew", "dew-procs", "core", "pkcs11", "pkcs11-copy", "cryptography"):
            one, two = results[(op, impl, 1)], results[(op, impl, 2)]
            lines.append(f"{op:17} {names[impl]:40} {one:>10,.0f} {two:>10,.0f} "
                         f"{two / one:>6.2f}")
    lines.append("")
    lines.append("ratios (ops/s)                                   1 thread  2 threads")
    for op in ("create-datakey", "decrypt-datakey"):
        ours = [results[(op, "dew", t)] for t in THREADS]
        direct = [results[(op, "pkcs11", t)] for t in THREADS]
        soft = [results[(op, "cryptography", t)] for t in THREADS]
        lines.append(f"{op:17} dew / direct PKCS#11            "
                     + "".join(f"{o / d:>10.2f}" for o, d in zip(ours, direct, strict=True)))
        lines.append(f"{op:17} our overhead (direct/dew - 1)   "
                     + "".join(f"{d / o - 1:>+10.0%}" for o, d in zip(ours, direct, strict=True)))
        procs = [results[(op, "dew-procs", t)] for t in THREADS]
        lines.append(f"{op:17} dew, data processes / direct    "
                     + "".join(f"{o / d:>10.2f}" for o, d in zip(procs, direct, strict=True)))
        core = [results[(op, "core", t)] for t in THREADS]
        lines.append(f"{op:17} core overhead (direct/core - 1) "
                     + "".join(f"{d / c - 1:>+10.0%}" for c, d in zip(core, direct, strict=True)))
        copied = [results[(op, "pkcs11-copy", t)] for t in THREADS]
        lines.append(f"{op:17} dew / direct on a session copy  "
                     + "".join(f"{o / d:>10.2f}" for o, d in zip(ours, copied, strict=True)))
        lines.append(f"{op:17} direct PKCS#11 / cryptography  "
                     + "".join(f"{d / s:>10.3f}" for d, s in zip(direct, soft, strict=True)))
    if CPU_PER_OP:
        # The same comparison in CPU time (all threads of the process) per operation.
        lines.append("")
        lines.append("CPU per op (µs, all threads)                     1 thread  2 threads")
        for op in ("create-datakey", "decrypt-datakey"):
            for impl in ("dew", "dew-procs", "core", "pkcs11"):
                lines.append(f"{op:17} {impl:31}"
                             + "".join(f"{1e6 * CPU_PER_OP.get((op, impl, t), 0):>10.1f}"
                                       for t in THREADS))
            dew_cpu = [CPU_PER_OP.get((op, "dew", t)) for t in THREADS]
            direct_cpu = [CPU_PER_OP.get((op, "pkcs11", t)) for t in THREADS]
            lines.append(f"{op:17} {'direct / dew (CPU per op)':31}"
                         + "".join(f"{d / o:>10.2f}" if o and d else f"{'-':>10}"
                                   for o, d in zip(dew_cpu, direct_cpu, strict=True)))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    parser.add_argument("--rounds", type=int, default=6,
                        help="slices each measurement is cut into, taken in turn")
    parser.add_argument("--callers", type=int, default=32, help="concurrent asyncio callers")
    args = parser.parse_args()
    results = asyncio.run(run(args.seconds, args.callers, args.rounds))
    print(report(results, args.callers))
    print()
    print(report_signing(results))


if __name__ == "__main__":
    main()
