"""Queue throughput: N trivial jobs through dew-engine versus bare arq, in one run.

The job is ``engine.sleep {"seconds": 0}`` (no secret argument, so nothing is
sealed); ours includes what the trust boundary costs on every job: the client's
HMAC over the job in the HSM and the worker's check of it, and the claim.

Both sides use one private redis-server, one worker process with the same
concurrency (max_jobs) and poll delay, JSON serialization, and enqueue with the
same client concurrency. "Done" means: for bare arq, the queue is empty (arq
removes a job when it finishes); for dew-engine, every task row is finished in
the task store (outbox row written, job run, row marked succeeded).

Each round runs bare arq, then dew-engine, each from an empty Redis (and, for
ours, an empty task table in one state directory: the HSM token is made once),
timed from the moment the worker polls the queue (its arq health-check key) to the
last job done. The verdict is the best round of each side.

    .venv/bin/python bench/queue_throughput.py [--jobs 5000] [--max-jobs 100]
        [--poll-delay 0.05] [--concurrency 50] [--rounds 3]

Prints, per round, jobs/s for both, the ratio ours/bare, and CPU per job of the
worker and of the enqueueing client; then the best of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arq.connections import ArqRedis, RedisSettings, create_pool  # noqa: E402
from arq.constants import health_check_key_suffix  # noqa: E402
from arq.worker import Worker, func  # noqa: E402

from engine import serialization  # noqa: E402
from engine.client import Client  # noqa: E402
from engine.redis_server import RedisServer, free_port  # noqa: E402
from engine.settings import load_settings  # noqa: E402

BARE_QUEUE = "bench:bare"
GOAL = 0.85
# One round's figures of one side: wall seconds, worker CPU seconds, seconds to
# enqueue, client CPU seconds while enqueueing.
Figures = tuple[float, float, float, float]


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


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def gather_bounded(n: int, concurrency: int, make: Any) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await make(i)

    await asyncio.gather(*(one(i) for i in range(n)))


async def wait_polling(pool: ArqRedis, queue: str, proc: subprocess.Popen[bytes]) -> None:
    """Until the worker has polled its queue once (arq writes its health-check key
    then): start-up (imports, the HSM, the task store) is not what is measured."""
    deadline = time.monotonic() + 60
    while not await pool.exists(queue + health_check_key_suffix):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker for {queue} did not start")
        await asyncio.sleep(0.02)


async def bench_bare(url: str, args: argparse.Namespace) -> Figures:
    pool = await create_pool(RedisSettings.from_dsn(url), job_serializer=serialization.dumps,
                             job_deserializer=serialization.loads,
                             default_queue_name=BARE_QUEUE)
    await pool.flushall()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--bare-worker", url, str(args.max_jobs), str(args.poll_delay)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await wait_polling(pool, BARE_QUEUE, proc)
        cpu0, client0, t0 = cpu_seconds(proc.pid), own_cpu_seconds(), time.perf_counter()
        await gather_bounded(
            args.jobs, args.concurrency,
            lambda i: pool.enqueue_job("engine.sleep", {"seconds": 0}, _queue_name=BARE_QUEUE),
        )
        enqueued, client = time.perf_counter() - t0, own_cpu_seconds() - client0
        while await pool.zcard(BARE_QUEUE):
            await asyncio.sleep(0.01)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
    finally:
        await pool.aclose()
        proc.terminate()
        proc.wait(60)
    return elapsed, cpu, enqueued, client


async def bench_ours(url: str, state: Path, args: argparse.Namespace) -> Figures:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEW_")}
    env.update({
        "DEW_STATE_DIR": str(state), "DEW_REDIS_URL": url,
        "DEW_WORKER_MAX_JOBS": str(args.max_jobs), "DEW_WORKER_POLL_DELAY": str(args.poll_delay),
        "DEW_LOG_CONSOLE": "off", "DEW_LOG_LEVEL": "warning",
    })
    os.environ.update(env)
    settings = load_settings()
    if settings.db_path.exists():  # an earlier round's tasks: every round starts empty
        with sqlite3.connect(settings.db_path, timeout=30) as db:
            db.execute("DELETE FROM tasks")
            db.execute("DELETE FROM failures")
    async with await Client.open(settings) as client:
        queue = await client.queue()
        await queue.pool.flushall()
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "worker"], env=env,
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await wait_polling(queue.pool, settings.redis.queue, proc)
            # The client's start-up too (the HSM session and login) is not measured.
            await (await client.resources.get("job_signer")).ready()
            cpu0, client0, t0 = cpu_seconds(proc.pid), own_cpu_seconds(), time.perf_counter()
            await gather_bounded(
                args.jobs, args.concurrency,
                lambda i: client.enqueue("engine.sleep", {"seconds": 0}),
            )
            enqueued, client_cpu = time.perf_counter() - t0, own_cpu_seconds() - client0
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
    return elapsed, cpu, enqueued, client_cpu


def round_line(r: int, jobs: int, bare: Figures, ours: Figures) -> str:
    def side(name: str, f: Figures) -> str:
        return (f"{name} {jobs / f[0]:6.0f} jobs/s (CPU/job: worker {f[1] / jobs * 1000:.2f} ms,"
                f" client {f[3] / jobs * 1000:.2f} ms; enqueue {f[2]:.2f}s, drain "
                f"{f[0] - f[2]:.2f}s)")
    return (f"round {r}: ours/bare = {bare[0] / ours[0]:.2f}\n  {side('bare arq  ', bare)}\n"
            f"  {side('dew-engine', ours)}")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="dew-bench-") as tmp:
        redis = RedisServer(Path(tmp) / "redis", port=free_port())
        redis.start()
        try:
            print(f"{args.jobs} jobs, worker max_jobs={args.max_jobs}, "
                  f"poll_delay={args.poll_delay}s, enqueue concurrency={args.concurrency}, "
                  f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
            rows = []
            for r in range(args.rounds):
                bare = await bench_bare(redis.url, args)
                ours = await bench_ours(redis.url, Path(tmp) / "state", args)
                rows.append((bare, ours))
                print(round_line(r + 1, args.jobs, bare, ours), flush=True)
            bare_best = min(b[0] for b, _ in rows)
            ours_best = min(o[0] for _, o in rows)
            ratio = bare_best / ours_best
            print(f"\nbest of {args.rounds}: bare arq {args.jobs / bare_best:.0f} jobs/s, "
                  f"dew-engine {args.jobs / ours_best:.0f} jobs/s, ours/bare = {ratio:.2f} "
                  f"(goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})")
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
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
