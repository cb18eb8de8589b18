"""CLI start-up: whole `dew` processes beside a bare interpreter from the same venv.

Times, as separate processes (median of N runs each, interleaved so that
machine noise hits all alike):

- ``python -c pass``                      the baseline: an interpreter start
- ``dew --help``                          goal: within 3x of the baseline
- ``dew tasks list --limit 1``            the task store, no HSM
- ``dew kms gen-random --bytes 16``       the HSM opened for one call

on a throw-away state directory (the HSM token is made before timing).

    .venv/bin/python bench/cli_startup.py [--runs 10]

Python writes no bytecode cache when PYTHONDONTWRITEBYTECODE is set (it is on
some machines, CI's included); `make setup` compiles the project's modules
once so that `dew` does not compile them at every start. The benchmark reports
whether the caches are there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEW = str(BIN / "dew")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dew-bench-cli-") as state:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEW_")}
        env.update(DEW_STATE_DIR=state, DEW_LOG_CONSOLE="off")
        timed([DEW, "init"], env)
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "dew --help": [DEW, "--help"],
            "dew tasks list --limit 1": [DEW, "tasks", "list", "--limit", "1"],
            "dew kms gen-random --bytes 16": [DEW, "kms", "gen-random", "--bytes", "16"],
        }
        for cmd in cases.values():  # warm the page cache
            timed(cmd, env)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(opts.runs):
            for name, cmd in cases.items():
                samples[name].append(timed(cmd, env))

    cached = any((ROOT / "engine" / "__pycache__").glob("cli.*.pyc"))
    no_write = "set" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "unset"
    base = statistics.median(samples["python -c pass"])
    print(f"CLI start-up, median of {opts.runs} runs, {os.cpu_count()} cores "
          f"(project bytecode cached: {'yes' if cached else 'no'}; "
          f"PYTHONDONTWRITEBYTECODE={no_write})")
    print(f"{'command':34} {'median ms':>10} {'x bare':>8}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:34} {median * 1000:10.1f} {median / base:8.2f}")
    help_ratio = statistics.median(samples["dew --help"]) / base
    print(f"goal: dew --help within 3x of a bare interpreter: "
          f"{'met' if help_ratio <= 3 else 'not met'} ({help_ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
