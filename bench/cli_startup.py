"""CLI start-up: whole `dew` processes beside a bare interpreter from the same venv.

Times, as separate processes (median of N runs each, interleaved so that
machine noise hits all alike), wall clock and CPU (user + system):

- ``python -c pass``                        the baseline: an interpreter start
- ``dew --help``                            goal: within 3x of the baseline
- ``dew tasks list --limit 1``              the task store, no HSM
- ``dew kms gen-random --bytes 16 --local`` the HSM opened for one call (standalone)
- ``dew kms encrypt-data KEY`` (4 bytes, local)   goal: under 0.6 s standalone
- the same two through a running ``dew api`` ([cli] api_url and the CLI's access
  key, as docs/cli.md sets them up)          goal: under 0.3 s

on a throw-away state directory (the HSM token, a key, an IAM user with an access
key and the local stack are made before timing; `dew stack down` at the end).
``--profile`` also prints, for one standalone and one API gen-random, where the
time goes: the start-up imports (``python -X importtime``, grouped by package)
and the wall-clock phases of the local path (imports, store opening, token
connection and login, the call, closing).

    .venv/bin/python bench/cli_startup.py [--runs 10] [--profile]

Python writes no bytecode cache when PYTHONDONTWRITEBYTECODE is set (it is on
some machines, CI's included); `make setup` compiles the project's modules
once so that `dew` does not compile them at every start. The benchmark reports
whether the caches are there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEW = str(BIN / "dew")
FOUR_BYTES = "ZGV3IQ=="  # "dew!"


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run(cmd, env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(env: dict[str, str], state: Path) -> str:
    """Token, a key, the CLI's identity and access key; the key's alias."""
    run([DEW, "init"], env)
    run([DEW, "kms", "create-key", "--alias", "bench"], env)
    run([DEW, "iam", "create-user", "bench-cli", "--project", "default",
         "--role", "KMS CMKFullAccess"], env)
    key = run([DEW, "iam", "create-access-key", "bench-cli", "--json"], env).stdout
    path = state / "cli-credentials"
    path.write_text(key)
    path.chmod(0o600)
    json.loads(key)
    return "bench"


def cases(alias: str) -> dict[str, tuple[list[str], bool]]:
    """name -> (command, through the API)."""
    gen = [DEW, "kms", "gen-random", "--bytes", "16"]
    enc = [DEW, "kms", "encrypt-data", alias, "--plain-text-base64", FOUR_BYTES]
    return {
        "python -c pass": ([sys.executable, "-c", "pass"], False),
        "dew --help": ([DEW, "--help"], False),
        "dew tasks list --limit 1": ([DEW, "tasks", "list", "--limit", "1"], False),
        "kms gen-random 16 (local)": ([*gen, "--local"], True),
        "kms encrypt-data 4 B (local)": ([*enc, "--local"], True),
        "kms gen-random 16 (API)": (gen, True),
        "kms encrypt-data 4 B (API)": (enc, True),
    }


def profile(env: dict[str, str], api_env: dict[str, str]) -> None:
    """Where a gen-random's time goes, standalone and through the API."""
    for label, extra, environ in (("standalone", ["--local"], api_env), ("API", [], api_env)):
        cmd = [sys.executable, "-X", "importtime", "-m", "engine.cli", "kms", "gen-random",
               "--bytes", "16", *extra]
        done = subprocess.run(cmd, env=environ, cwd=ROOT, capture_output=True, text=True)
        groups: dict[str, int] = {}
        for line in done.stderr.splitlines():
            if not line.startswith("import time:") or "|" not in line:
                continue
            parts = line.split("|")
            name = parts[2].rstrip()
            if name.startswith("  ") or not parts[1].strip().isdigit():
                continue  # only top-level imports: their cumulative time counts once
            group = name.strip().split(".")[0]
            if group in ("engine", "handlers"):
                group = ".".join(name.strip().split(".")[:2])
            groups[group] = groups.get(group, 0) + int(parts[1])
        total = sum(groups.values())
        top = sorted(groups.items(), key=lambda kv: -kv[1])[:12]
        print(f"\nimports of `dew kms gen-random` ({label}): {total / 1000:.0f} ms in all")
        for name, micros in top:
            print(f"  {name:34} {micros / 1000:7.1f} ms")
    phases = subprocess.run([sys.executable, __file__, "--phases"], env=env,
                            cwd=ROOT, capture_output=True, text=True)
    print("\nphases of the standalone path (one process, wall clock):")
    print(phases.stdout.rstrip() or phases.stderr.strip())


def phases() -> None:
    """The local path of ``dew kms gen-random --bytes 16`` step by step, in this
    process (a fresh one: every import is a first import), as engine.cli runs it."""
    marks: list[tuple[str, float]] = [("", time.perf_counter())]

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter()))

    sys.path.insert(0, str(ROOT))
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]  # as engine.cli.main does
    import engine.cli as cli
    from engine.services import configured_packages, load_specs

    mark("import engine.cli")
    specs = load_specs(configured_packages(None, os.environ))
    load = [s for s in (*specs, *cli.ENGINE_GROUPS) if "kms" in s.commands]
    args = cli.build_parser(specs, load).parse_args(
        ["kms", "gen-random", "--bytes", "16", "--local"])
    args.account = "default"
    mark("parser (the kms CLI imported)")
    from engine.settings import load_settings

    settings = load_settings(None)
    mark("settings")
    cli._prepare(args, settings)
    mark("logging (structlog imported)")
    import asyncio

    from handlers.kms.cli_checks import checked
    from handlers.kms.wiring import open_kms

    mark("asyncio, KMS service, HSM library")

    async def steps() -> None:
        checked(args)
        async with open_kms(settings) as kms:
            mark("input checks, store opened")
            await kms.core.crypto()
            mark("HSM: token found, session, login")
            await kms.gen_random(16, account="default")
            mark("gen-random (audited)")
        mark("close (audit flushed and sealed)")

    asyncio.run(steps())
    mark("event loop closed")
    for (_, before), (name, at) in itertools.pairwise(marks):
        print(f"  {name:34} {(at - before) * 1000:7.1f} ms")
    print(f"  {'in all':34} {(marks[-1][1] - marks[0][1]) * 1000:7.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--profile", action="store_true",
                        help="also show where a gen-random's time goes")
    parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.phases:
        phases()
        return 0

    with tempfile.TemporaryDirectory(prefix="dew-bench-cli-") as tmp:
        state = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEW_")}
        env.update(DEW_STATE_DIR=str(state), DEW_LOG_CONSOLE="off",
                   DEW_API_LISTEN=f"127.0.0.1:{free_port()}")
        alias = prepare(env, state)
        api_env = {**env, "DEW_CLI_API_URL": f"https://{env['DEW_API_LISTEN']}"}
        run([DEW, "stack", "up"], env)
        try:
            table = cases(alias)
            for cmd, api in table.values():  # warm the page cache
                timed(cmd, api_env if api else env)
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in table}
            for _ in range(opts.runs):
                for name, (cmd, api) in table.items():
                    samples[name].append(timed(cmd, api_env if api else env))
            if opts.profile:
                profile(env, api_env)
        finally:
            run([DEW, "stack", "down"], env)

    report(samples, opts.runs)
    return 0


def report(samples: dict[str, list[tuple[float, float]]], runs: int) -> None:
    cached = any((ROOT / "engine" / "__pycache__").glob("cli.*.pyc"))
    no_write = "set" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "unset"
    wall = {name: statistics.median(w for w, _ in values) for name, values in samples.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in samples.items()}
    base = wall["python -c pass"]
    print(f"\nCLI start-up, median of {runs} runs, {os.cpu_count()} cores "
          f"(project bytecode cached: {'yes' if cached else 'no'}; "
          f"PYTHONDONTWRITEBYTECODE={no_write}; load average {os.getloadavg()[0]:.1f})")
    print(f"{'command':34} {'wall ms':>9} {'x bare':>7} {'CPU ms':>8}")
    for name in samples:
        print(f"{name:34} {wall[name] * 1000:9.1f} {wall[name] / base:7.2f} "
              f"{cpu[name] * 1000:8.1f}")
    goals = [
        ("dew --help within 3x of a bare interpreter", wall["dew --help"] / base, 3.0, "x"),
        ("gen-random through the API under 0.3 s", wall["kms gen-random 16 (API)"], 0.3, "s"),
        ("encrypt-data through the API under 0.3 s", wall["kms encrypt-data 4 B (API)"],
         0.3, "s"),
        ("gen-random standalone under 0.6 s", wall["kms gen-random 16 (local)"], 0.6, "s"),
        ("encrypt-data standalone under 0.6 s", wall["kms encrypt-data 4 B (local)"], 0.6, "s"),
    ]
    for text, value, limit, unit in goals:
        print(f"goal: {text}: {'met' if value <= limit else 'not met'} ({value:.2f}{unit})")


if __name__ == "__main__":
    sys.exit(main())
