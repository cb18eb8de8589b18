"""Queue throughput: N trivial jobs through dew-engine versus bare arq, in one run.

The job is ``engine.sleep {"seconds": 0}`` (no secret argument, so nothing is
sealed); ours includes what the trust boundary costs on every job: the client's
HMAC over the job in the HSM and the worker's check of it, and the claim.

Both sides use one private redis-server, one worker process with the same
concurrency (max_jobs) and poll delay, JSON serialization, and enqueue with the
same client concurrency. "Done" means: for bare arq, the queue is empty (arq
removes a job when it finishes); for dew-engine, every task row is finished in
the task store (outbox row written, job run, row marked succeeded).

    .venv/bin/python bench/queue_throughput.py [--jobs 5000] [--max-jobs 100]
        [--poll-delay 0.05] [--concurrency 50] [--rounds 1]

Prints jobs/s for both, the ratio ours/bare, and worker CPU per job.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arq.connections import RedisSettings, create_pool  # noqa: E402
from arq.worker import Worker, func  # noqa: E402

from engine import serialization  # noqa: E402
from engine.client import Client  # noqa: E402
from engine.redis_server import RedisServer, free_port  # noqa: E402
from engine.settings import load_settings  # noqa: E402

BARE_QUEUE = "bench:bare"


async def noop(ctx: dict[str, Any], args: Any = None) -> Any:
    return args.get("seconds") if isinstance(args, dict) else None


def run_bare_worker(url: str, max_jobs: int, poll_delay: float) -> None:
    Worker(
        functions=[func(noop, name="engine.sleep")],
        redis_settings=RedisSettings.from_dsn(url),
        queue_name=BARE_QUEUE,
        max_jobs=max_jobs,
        poll_delay=poll_delay,
        job_serializer=serialization.dumps,
        job_deserializer=serialization.loads,
        keep_result=3600,
    ).run()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def gather_bounded(n: int, concurrency: int, make: Any) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await make(i)

    await asyncio.gather(*(one(i) for i in range(n)))


async def bench_bare(url: str, args: argparse.Namespace) -> tuple[float, float, float]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--bare-worker", url, str(args.max_jobs), str(args.poll_delay)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pool = await create_pool(RedisSettings.from_dsn(url), job_serializer=serialization.dumps,
                             job_deserializer=serialization.loads,
                             default_queue_name=BARE_QUEUE)
    try:
        await asyncio.sleep(1.0)  # let the worker connect
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        await gather_bounded(
            args.jobs, args.concurrency,
            lambda i: pool.enqueue_job("engine.sleep", {"seconds": 0}, _queue_name=BARE_QUEUE),
        )
        enqueued = time.perf_counter() - t0
        while await pool.zcard(BARE_QUEUE):
            await asyncio.sleep(0.01)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
    finally:
        await pool.aclose()
        proc.terminate()
        proc.wait(60)
    return elapsed, cpu, enqueued


async def bench_ours(url: str, state: Path, args: argparse.Namespace) -> tuple[float, float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEW_")}
    env.update({
        "DEW_STATE_DIR": str(state), "DEW_REDIS_URL": url,
        "DEW_WORKER_MAX_JOBS": str(args.max_jobs), "DEW_WORKER_POLL_DELAY": str(args.poll_delay),
        "DEW_LOG_CONSOLE": "off", "DEW_LOG_LEVEL": "warning",
    })
    os.environ.update(env)
    settings = load_settings()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "worker"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with await Client.open(settings) as client:
            await client.queue()
            await asyncio.sleep(1.0)
            cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            await gather_bounded(
                args.jobs, args.concurrency,
                lambda i: client.enqueue("engine.sleep", {"seconds": 0}),
            )
            enqueued = time.perf_counter() - t0
            db = sqlite3.connect(settings.db_path, timeout=30)
            while db.execute(
                "SELECT COUNT(*) FROM tasks WHERE status = 'succeeded'"
            ).fetchone()[0] < args.jobs:
                time.sleep(0.01)
            elapsed, cpu = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
            db.close()
    finally:
        proc.terminate()
        proc.wait(60)
    return elapsed, cpu, enqueued


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="dew-bench-") as tmp:
        redis = RedisServer(Path(tmp) / "redis", port=free_port())
        redis.start()
        try:
            print(f"{args.jobs} jobs, worker max_jobs={args.max_jobs}, "
                  f"poll_delay={args.poll_delay}s, enqueue concurrency={args.concurrency}, "
                  f"{os.cpu_count()} cores")
            rows = []
            for r in range(args.rounds):
                bare = await bench_bare(redis.url, args)
                ours = await bench_ours(redis.url, Path(tmp) / f"state{r}", args)
                rows.append((bare, ours))
                print(f"round {r + 1}: bare arq {args.jobs / bare[0]:8.0f} jobs/s "
                      f"({bare[1] / args.jobs * 1000:.2f} ms worker CPU/job) | dew-engine "
                      f"{args.jobs / ours[0]:8.0f} jobs/s ({ours[1] / args.jobs * 1000:.2f} ms "
                      f"worker CPU/job) | ratio {bare[0] / ours[0]:.2f}")
                print(f"         enqueue phase: bare {bare[2]:.2f}s, ours {ours[2]:.2f}s; "
                      f"drain after enqueue: bare {bare[0] - bare[2]:.2f}s, "
                      f"ours {ours[0] - ours[2]:.2f}s")
            bare_best = min(b[0] for b, _ in rows)
            ours_best = min(o[0] for _, o in rows)
            print(f"\nbest of {args.rounds}: bare arq {args.jobs / bare_best:.0f} jobs/s, "
                  f"dew-engine {args.jobs / ours_best:.0f} jobs/s, "
                  f"ours/bare = {bare_best / ours_best:.2f} (goal >= 0.7)")
        finally:
            redis.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--bare-worker":
        run_bare_worker(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--max-jobs", type=int, default=100)
    parser.add_argument("--poll-delay", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
