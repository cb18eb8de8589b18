"""Streaming envelope encryption of a file: ``dew kms encrypt-file`` / ``decrypt-file``
against ``age``, on the same file, in one run.

- ``dew`` and ``age`` as users run them: a whole process each way, file to file,
  wall time and peak RSS (``ru_maxrss`` of the child, from ``wait4``). ``dew`` has
  its own SoftHSM token in a temporary state directory and makes a KMS data key
  per file; ``age`` encrypts to an X25519 recipient made by ``age-keygen``. Both
  run on an empty file too: the fixed cost of a process. (``age`` neither fsyncs
  its output nor writes it through a temporary file; ``dew`` does both. So age's
  time is also shown with the fsync of its output added: the same durability.)
- in-process: our segment loop (``stream.encrypt_segments`` / ``decrypt_segments``,
  no process start, no KMS) file to file with the temporary file, fsync and
  rename, and to /dev/null; beside one-shot ``AESGCM`` of the whole file already
  in memory (the ceiling of the issue; it pays for one allocation of the file's
  size).

The runs of ``dew`` and ``age`` alternate; each of ``--repeat`` rounds (default 3)
starts with no output file, its input read into the page cache (``dew`` leaves
its own output out of the cache, ``age`` leaves it in: the next step must not
inherit that difference), and after an ``os.sync()`` (no earlier run's writeback
competes); the best of each is shown, and the ratio of each round. Ratios are
speeds, ``age time / dew time``: 1.00x or more means ``dew`` is at least as fast.
Goal (issue 15): at least as fast as age both ways, peak RSS under 100 MB, the
in-process loop at 0.9x of AES-GCM in memory. The files go to a temporary
directory under ``--dir`` (default /tmp); free space is checked first.

    .venv/bin/python bench/envelope.py [--size 1G] [--repeat 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from handlers.kms import stream as kms_stream  # noqa: E402

CHUNK = 1 << 24
AGE = shutil.which("age") or "/usr/bin/age"
AGE_KEYGEN = shutil.which("age-keygen") or "/usr/bin/age-keygen"
# Files alive at once on disk, in units of the file's size: plain, and dew's and age's
# ciphertext and plaintext (removed before the in-process loop writes its two).
FILES_ON_DISK = 5
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss: int  # bytes
    cpu: float = 0.0  # user + system seconds, all threads


def parse_size(text: str) -> int:
    """``1G``, ``256M``, ``512MiB``, ``4096`` (bytes)."""
    found = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not found or int(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M, 512MiB)")
    return int(found.group(1)) * UNITS[found.group(2).lower()]


# A child's ru_maxrss counts the memory of the process that forked it, up to its exec
# (Linux keeps the old address space's high-water mark): so a small launcher, started
# once, forks every measured process, never this one (~60 MB with its imports).
LAUNCHER = """
import json, os, sys, time
for line in sys.stdin:
    cmd, env, cwd, errors = json.loads(line)
    before = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.chdir(cwd)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(os.open(errors, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
        os.execve(cmd[0], cmd, env if env is not None else os.environ)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - before
    print(json.dumps([os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss * 1024,
                      usage.ru_utime + usage.ru_stime]), flush=True)
"""


class Launcher:
    """The small process that runs the measured ones (see LAUNCHER)."""

    def __init__(self, errors: Path) -> None:
        self._errors = errors
        self._proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> Run:
        """Wall time and peak RSS of one process; its output file must not exist yet."""
        os.sync()  # earlier runs' dirty pages must not be flushed during this one
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps([list(cmd), env, str(ROOT), str(self._errors)]) + "\n")
        self._proc.stdin.flush()
        code, wall, rss, cpu = json.loads(self._proc.stdout.readline())
        if code != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {code}): "
                             f"{self._errors.read_text(errors='replace')}")
        return Run(wall, rss, cpu)

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait()


def warm(path: Path) -> None:
    """Read ``path`` into the page cache: every tool starts from the same state of its
    input (dew leaves its own output out of the cache, age leaves it in)."""
    buf = bytearray(CHUNK)
    with path.open("rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def fresh(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(CHUNK, left)
            fh.write(os.urandom(n))
            left -= n


def check_room(where: Path, size: int) -> None:
    free = shutil.disk_usage(where).free
    if free < FILES_ON_DISK * size + (1 << 30):
        raise SystemExit(f"{where} has {free >> 20} MiB free; a {size >> 20} MiB run needs "
                         f"{(FILES_ON_DISK * size >> 20) + 1024} MiB (or use --dir, --size)")


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
    if target is not None:
        fresh(target)
    warm(source)
    os.sync()
    before = time.perf_counter()
    with kms_stream.open_input(str(source)) as src:
        if target is None:
            with open(os.devnull, "wb") as dst:
                step(aead, prefix, header, kms_stream.DEFAULT_SEGMENT, src, dst)
        else:
            with kms_stream.atomic_output(str(target)) as dst:
                step(aead, prefix, header, kms_stream.DEFAULT_SEGMENT, src, dst)
    return time.perf_counter() - before


def fsync_seconds(path: Path) -> float:
    """How long making ``path`` durable takes (its pages still dirty)."""
    began = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - began


def best(runs: list[Run]) -> Run:
    return Run(min(r.seconds for r in runs), max(r.peak_rss for r in runs),
               min(r.cpu for r in runs))


def whole_processes(run: Callable[[Sequence[str], dict[str, str] | None], Run], work: Path,
                    plain: Path, repeat: int) -> dict[str, list[Run]]:
    """Every run of each tool, each way, on the file and on an empty file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEW_")}
    env["DEW_STATE_DIR"] = str(work / "state")
    (work / "state").mkdir(mode=0o700)
    dew = [sys.executable, "-m", "engine.cli", "kms"]
    run([*dew, "create-key", "--alias", "bench/file"], env)  # also makes the token
    key = work / "age.key"
    subprocess.run([AGE_KEYGEN, "-o", str(key)], check=True, capture_output=True)
    recipient = subprocess.run([AGE_KEYGEN, "-y", str(key)], check=True, capture_output=True,
                               text=True).stdout.strip()
    empty = work / "empty"
    empty.write_bytes(b"")
    tools: dict[str, Callable[[Path, Path], list[str]]] = {
        "dew encrypt": lambda i, o: [*dew, "encrypt-file", "bench/file", str(i), str(o)],
        "age encrypt": lambda i, o: [AGE, "-r", recipient, "-o", str(o), str(i)],
        "dew decrypt": lambda i, o: [*dew, "decrypt-file", str(i), str(o)],
        "age decrypt": lambda i, o: [AGE, "-d", "-i", str(key), "-o", str(o), str(i)],
    }
    times: dict[str, list[Run]] = {}
    for source, tag in ((empty, "empty"), (plain, "file")):
        for _ in range(repeat):
            for name, cmd in tools.items():
                tool, way = name.split()
                sealed = work / f"{tag}.{tool}"
                src, out = ((source, sealed) if way == "encrypt"
                            else (sealed, work / f"{tag}.{tool}.out"))
                fresh(out)
                warm(src)
                env_of = env if tool == "dew" else None
                done = run(cmd(src, out), env_of)
                times.setdefault(f"{name} {tag}", []).append(done)
                if tool == "age" and tag == "file":
                    # age as durable as dew leaves its output: the same run, plus the
                    # fsync of what it wrote (dew's time includes its own).
                    times.setdefault(f"age+fsync {way} {tag}", []).append(
                        replace(done, seconds=done.seconds + fsync_seconds(out)))
                # age makes no OUT at all for an empty plaintext.
                made = out.stat().st_size if out.exists() else 0
                if way == "decrypt" and made != source.stat().st_size:
                    raise SystemExit(f"{name}: the round trip lost bytes")
    for tool in ("dew", "age"):
        if not filecmp.cmp(plain, work / f"file.{tool}.out", shallow=False):
            raise SystemExit(f"{tool}: the decrypted file differs from the original")
        fresh(work / f"file.{tool}", work / f"file.{tool}.out")
    return times


def in_process(work: Path, plain: Path, repeat: int) -> dict[str, float]:
    key, nonce = os.urandom(32), os.urandom(12)
    enc, dec = work / "core.enc", work / "core.dec"
    found = {
        "loop encrypt, files": min(stream_core(plain, enc, key, False) for _ in range(repeat)),
        "loop decrypt, files": min(stream_core(enc, dec, key, True) for _ in range(repeat)),
        "loop encrypt, /dev/null": min(stream_core(plain, None, key, False)
                                       for _ in range(repeat)),
        "loop decrypt, /dev/null": min(stream_core(enc, None, key, True)
                                       for _ in range(repeat)),
    }
    fresh(enc, dec)
    data = plain.read_bytes()
    memory = [in_memory(data, key, nonce) for _ in range(repeat)]
    found["AES-GCM in memory, encrypt"] = min(m[0] for m in memory)
    found["AES-GCM in memory, decrypt"] = min(m[1] for m in memory)
    return found


def report(size: int, repeat: int, runs: dict[str, list[Run]], core: dict[str, float]) -> None:
    mb = size / 1e6
    procs = {name: best(each) for name, each in runs.items()}
    print(f"file: {size / (1 << 20):g} MiB; best of {repeat} (CPU: user + system, all "
          "threads); ratio = age time / dew time (>= 1.00x: dew at least as fast)")
    print(f"  {'':26} {'dew s':>6} {'age s':>6} {'dew MB/s':>8} {'age MB/s':>8} {'ratio':>6}"
          f"  {'per round':>17}  {'dew CPU':>7} {'age CPU':>7} {'dew RSS':>7} {'age RSS':>7}")
    for way in ("encrypt", "decrypt"):
        for tag, label in (("file", f"{way} (whole process)"), ("empty", f"{way} (empty file)")):
            ours, theirs = procs[f"dew {way} {tag}"], procs[f"age {way} {tag}"]
            speeds = (f"{mb / ours.seconds:>8,.0f} {mb / theirs.seconds:>8,.0f}" if tag == "file"
                      else f"{'':>8} {'':>8}")
            rounds = " ".join(f"{a.seconds / d.seconds:.2f}" for d, a in
                              zip(runs[f"dew {way} {tag}"], runs[f"age {way} {tag}"],
                                  strict=True))
            print(f"  {label:26} {ours.seconds:>6.2f} {theirs.seconds:>6.2f} {speeds}"
                  f" {theirs.seconds / ours.seconds:>5.2f}x  {rounds:>17}"
                  f"  {ours.cpu:>6.2f}s {theirs.cpu:>6.2f}s"
                  f" {ours.peak_rss / 1e6:>5.0f}MB {theirs.peak_rss / 1e6:>5.0f}MB")
    for way in ("encrypt", "decrypt"):
        ours, durable = procs[f"dew {way} file"], procs[f"age+fsync {way} file"]
        rounds = " ".join(f"{a.seconds / d.seconds:.2f}" for d, a in
                          zip(runs[f"dew {way} file"], runs[f"age+fsync {way} file"],
                              strict=True))
        print(f"  {way} vs age + fsync of its output (dew's durability): age "
              f"{durable.seconds:.2f} s, {mb / durable.seconds:,.0f} MB/s, ratio "
              f"{durable.seconds / ours.seconds:.2f}x (rounds {rounds})")
    for way in ("encrypt", "decrypt"):
        net = procs[f"dew {way} file"].seconds - procs[f"dew {way} empty"].seconds
        shown = f"{mb / net:,.0f} MB/s" if net > 0 else "n/a (noise above the data path)"
        print(f"  dew {way} minus its fixed cost: {shown}")
    print("in-process (no process start, no KMS)")
    for name, seconds in core.items():
        print(f"  {name:32} {mb / seconds:>9,.0f} MB/s")
    for way in ("encrypt", "decrypt"):
        ceiling = core[f"AES-GCM in memory, {way}"]
        for where in ("files", "/dev/null"):
            print(f"  loop {way}, {where:9} / AES-GCM in memory: "
                  f"{ceiling / core[f'loop {way}, {where}']:>5.2f}x")
    peak = max(run.peak_rss for name, run in procs.items() if name.startswith("dew"))
    print(json.dumps({
        "size_bytes": size, "repeat": repeat,
        "seconds": {name: round(run.seconds, 3) for name, run in procs.items()},
        "cpu_seconds": {name: round(run.cpu, 3) for name, run in procs.items()},
        "speed_ratio_age_over_dew": {
            way: round(procs[f"age {way} file"].seconds / procs[f"dew {way} file"].seconds, 3)
            for way in ("encrypt", "decrypt")},
        "speed_ratio_age_fsynced_over_dew": {
            way: round(procs[f"age+fsync {way} file"].seconds
                       / procs[f"dew {way} file"].seconds, 3)
            for way in ("encrypt", "decrypt")},
        "dew_peak_rss_mb": round(peak / 1e6, 1),
        "in_process_mb_per_s": {name: round(mb / s) for name, s in core.items()},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30,
                        help="file size: 1G (default), 256M, 512MiB, or bytes")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the temporary directory goes (default /tmp)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each measurement; the best is shown (default 3)")
    args = parser.parse_args()
    if not Path(AGE).exists():
        raise SystemExit("age is not installed (Debian package age)")
    check_room(args.dir, args.size)
    with tempfile.TemporaryDirectory(prefix="dew-envelope-", dir=args.dir) as tmp:
        work = Path(tmp)
        plain = work / "plain"
        write_random(plain, args.size)
        launcher = Launcher(work / "stderr")
        try:
            procs = whole_processes(launcher.run, work, plain, args.repeat)
        finally:
            launcher.close()
        core = in_process(work, plain, args.repeat)
    report(args.size, args.repeat, procs, core)


if __name__ == "__main__":
    main()
