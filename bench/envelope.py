"""Streaming envelope encryption of a file: ``dew kms encrypt-file`` / ``decrypt-file``
against the ceilings, on the same bytes, in one run.

- ``dew``: the CLI as users run it (a subprocess each way, its own SoftHSM token
  in a temporary state directory), wall time; also the same minus the fixed
  cost (start-up, KMS data key) measured on an empty file;
- ``in-memory``: one-shot ``AESGCM`` of the whole file already in memory (the
  issue's ceiling; no file I/O at all);
- ``openssl``: ``openssl enc -aes-256-ctr`` file to file (no authentication);
- ``stream core``: our segment loop alone in this process (same files, temp
  file, fsync and rename; no process start, no KMS call), and the same writing
  to /dev/null: where the time goes.

Each measurement runs ``--repeat`` times (default 2; the first warms the page
cache) after an ``os.sync()`` (so no earlier run's writeback competes), and the
best is shown. Prints MB/s (1 MB = 10^6 bytes), the ratios, and the peak RSS of our
subprocesses (``ru_maxrss`` of each child, from ``wait4``). Goal: >= 0.8x the in-memory
ceiling, peak RSS < 100 MB whatever the size.

    .venv/bin/python bench/envelope.py [--size-mib 256] [--repeat 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from handlers.kms import stream as kms_stream  # noqa: E402

CHUNK = 1 << 24


def dew(env: dict[str, str], *args: str) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one ``dew`` subprocess (its own rusage)."""
    os.sync()  # earlier runs' dirty pages must not be flushed during this one
    before = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    errors = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - before
    if proc.returncode != 0:
        raise SystemExit(f"dew {' '.join(args)} failed: {errors.decode()}")
    return wall, usage.ru_maxrss * 1024  # KiB on Linux


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(CHUNK, left)
            fh.write(os.urandom(n))
            left -= n


def timed(fn: Callable[..., object], *args: object) -> float:
    os.sync()
    before = time.perf_counter()
    fn(*args)
    return time.perf_counter() - before


def in_memory(data: bytes, key: bytes, nonce: bytes) -> tuple[float, float]:
    """Seconds for one-shot AESGCM encrypt and decrypt of ``data`` (already in memory)."""
    aead = AESGCM(key)
    before = time.perf_counter()
    sealed = aead.encrypt(nonce, data, None)
    middle = time.perf_counter()
    aead.decrypt(nonce, sealed, None)
    return middle - before, time.perf_counter() - middle


def stream_core(source: Path, target: Path | None, key: bytes, decrypt: bool) -> float:
    """Seconds for our segment loop on files, as encrypt-file / decrypt-file run it
    (``target`` None: to /dev/null, i.e. without the cost of writing a file)."""
    aead, prefix = AESGCM(key), bytes(7)
    header = kms_stream.pack_header(kms_stream.DEFAULT_SEGMENT, bytes(156), prefix)
    step = kms_stream.decrypt_segments if decrypt else kms_stream.encrypt_segments
    os.sync()
    before = time.perf_counter()
    with source.open("rb") as src:
        if target is None:
            with open(os.devnull, "wb") as dst:
                step(aead, prefix, header, kms_stream.DEFAULT_SEGMENT, src, dst)
        else:
            with kms_stream.atomic_output(str(target)) as dst:
                step(aead, prefix, header, kms_stream.DEFAULT_SEGMENT, src, dst)
    return time.perf_counter() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="file size (default 256)")
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of each measurement; the best is shown (default 2)")
    args = parser.parse_args()
    size = args.size_mib << 20

    with tempfile.TemporaryDirectory(prefix="dew-envelope-", dir=args.dir) as tmp:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEW_")}
        env["DEW_STATE_DIR"] = str(work / "state")
        dew(env, "kms", "create-key", "--alias", "bench/file")  # also makes the token
        plain, enc, out = work / "plain", work / "plain.dew", work / "plain.out"
        empty = work / "empty"
        empty.write_bytes(b"")
        write_random(plain, size)

        runs = range(args.repeat)
        fixed_enc, baseline_rss = min(dew(env, "kms", "encrypt-file", "bench/file",
                                          str(empty), str(enc)) for _ in runs)
        fixed_dec = min(dew(env, "kms", "decrypt-file", str(enc), str(out))[0] for _ in runs)
        enc_s, enc_rss = min(dew(env, "kms", "encrypt-file", "bench/file", str(plain),
                                 str(enc)) for _ in runs)
        dec_s, dec_rss = min(dew(env, "kms", "decrypt-file", str(enc), str(out))
                             for _ in runs)
        if out.stat().st_size != size:
            raise SystemExit("round trip lost bytes")

        key, nonce = os.urandom(32), os.urandom(12)
        ctr = work / "plain.ctr"
        openssl_enc = min(timed(subprocess.run, [
            "openssl", "enc", "-aes-256-ctr", "-K", key.hex(), "-iv", os.urandom(16).hex(),
            "-in", str(plain), "-out", str(ctr)]) for _ in runs)
        core_enc = min(stream_core(plain, work / "core.enc", key, False) for _ in runs)
        core_dec = min(stream_core(work / "core.enc", work / "core.dec", key, True)
                       for _ in runs)
        null_enc = min(stream_core(plain, None, key, False) for _ in runs)
        null_dec = min(stream_core(work / "core.enc", None, key, True) for _ in runs)
        data = plain.read_bytes()
        mem = [in_memory(data, key, nonce) for _ in runs]
        mem_enc, mem_dec = min(m[0] for m in mem), min(m[1] for m in mem)
        del data

    mb = size / 1e6
    rows = [
        ("dew encrypt-file (wall, CLI)", mb / enc_s),
        ("dew encrypt-file (minus fixed cost)", mb / max(enc_s - fixed_enc, 1e-9)),
        ("dew decrypt-file (wall, CLI)", mb / dec_s),
        ("dew decrypt-file (minus fixed cost)", mb / max(dec_s - fixed_dec, 1e-9)),
        ("in-memory AESGCM encrypt (one shot)", mb / mem_enc),
        ("in-memory AESGCM decrypt (one shot)", mb / mem_dec),
        ("openssl enc -aes-256-ctr (file to file)", mb / openssl_enc),
        ("stream core encrypt (in-process, files)", mb / core_enc),
        ("stream core decrypt (in-process, files)", mb / core_dec),
        ("stream core encrypt (in-process, to /dev/null)", mb / null_enc),
        ("stream core decrypt (in-process, to /dev/null)", mb / null_dec),
    ]
    speeds = dict(rows)
    print(f"file: {args.size_mib} MiB; fixed cost (empty file): encrypt {fixed_enc:.2f} s, "
          f"decrypt {fixed_dec:.2f} s")
    for name, speed in rows:
        print(f"  {name:46} {speed:>9,.0f} MB/s")
    print("ratios")
    for what, ours, ceiling in (
        ("encrypt / in-memory", rows[0][1], speeds["in-memory AESGCM encrypt (one shot)"]),
        ("decrypt / in-memory", rows[2][1], speeds["in-memory AESGCM decrypt (one shot)"]),
        ("encrypt / openssl ctr", rows[0][1], speeds["openssl enc -aes-256-ctr (file to file)"]),
        ("decrypt / openssl ctr", rows[2][1], speeds["openssl enc -aes-256-ctr (file to file)"]),
        ("stream core encrypt / in-memory", mb / core_enc,
         speeds["in-memory AESGCM encrypt (one shot)"]),
        ("stream core decrypt / in-memory", mb / core_dec,
         speeds["in-memory AESGCM decrypt (one shot)"]),
    ):
        print(f"  {what:46} {ours / ceiling:>9.2f}x")
    print(f"peak RSS of dew: encrypt {enc_rss / 1e6:.0f} MB, decrypt {dec_rss / 1e6:.0f} MB "
          f"(empty file: {baseline_rss / 1e6:.0f} MB)")
    print(json.dumps({"size_mib": args.size_mib, "mb_per_s": speeds,
                      "peak_rss_mb": max(enc_rss, dec_rss) / 1e6}))


if __name__ == "__main__":
    main()
