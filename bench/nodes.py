"""Nodes: jobs and data keys on one and two PostgreSQL + p11-kit nodes vs one SQLite node.

Three configurations, measured in the same run on the same machine:

- ``1 node, SQLite, local token`` (the baseline): one state directory with the
  SQLite store and a SoftHSM token of its own, one ``dew worker``.
- ``1 node, PostgreSQL, p11-kit HSM``: the stores in a PostgreSQL database and the
  token of an HSM node served by ``dew hsm serve`` (p11-kit server on a unix socket),
  reached through p11-kit's client module; one ``dew worker``.
- ``2 nodes, PostgreSQL, p11-kit HSM``: two such nodes (separate state directories,
  the same database, Redis queue and served token), each with its ``dew worker``.

Everything is private to the run: a redis-server, a PostgreSQL cluster
(tests/pg_store.py's StoreCluster: fsync off, as in the tests), the HSM node and the
state directories in a temporary directory (tests/nodes.py builds the nodes).

**Jobs**: ``--jobs`` trivial jobs (``engine.sleep {"seconds": 0}``) enqueued through
``Client.enqueue`` by one enqueuer process per node (``--concurrency`` enqueues in
flight in each; the jobs are split evenly), while the nodes' workers run them.
Timed from the moment the enqueuers (connected, with their HSM session open) are let
go until every task row is ``succeeded`` in the store: enqueue (task row, HSM
signature, Redis) and run (claim, HSM signature check, finish) overlap.

**Data keys**: ``--calls`` ``KmsService.create_datakey`` calls (the KMS service
called directly, not the worker path: one driver process per node, each its own
``KmsService`` on its node's settings with ``--callers`` concurrent asyncio callers;
calls split evenly), each a 32-byte key from the token and AES-256-GCM under the
CMK, with its audit entry; timed from the release of the drivers to the last one's
audit flush. The workers are stopped meanwhile.

Prints, per configuration, jobs/s and data keys/s with the ratio to the baseline,
and where the CPU went (ms of CPU per job or call: workers, enqueuers or drivers,
PostgreSQL, the p11-kit server, Redis), with the load average before and after.
``--rounds`` repeats everything, configurations in turn; the best round counts.

    .venv/bin/python bench/nodes.py [--jobs 5000] [--calls 2000] [--rounds 1]
        [--concurrency 50] [--callers 32] [--max-jobs 100] [--poll-delay 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import redis  # noqa: E402

from engine.redis_server import RedisServer, free_port  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402
from engine.sql_db import StoreTarget  # noqa: E402
from tests.nodes import (  # noqa: E402
    Cluster,
    Node,
    base_settings,
    enqueuer_result,
    init_nodes,
    release,
    start_enqueuer,
    start_workers,
    wait_ready,
)
from tests.pg_store import StoreCluster  # noqa: E402

KEY_ALIAS = "bench/cmk"
BASELINE = "1 node, SQLite, local token"
CPU_PARTS = ("workers", "clients", "PostgreSQL", "p11-kit server", "Redis")


# --------------------------------------------------------------------------- CPU


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of itself and its reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        # utime, stime, cutime, cstime are fields 14-17 of stat (1-based).
        stats[int(entry.name)] = (int(fields[1]),
                                  sum(int(f) for f in fields[11:15]) / tick)
    return stats


def cpu_tree(pids: Sequence[int], stats: dict[int, tuple[int, float]]) -> float:
    """CPU seconds of ``pids`` and every descendant, living or reaped."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0.0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def postmaster_pid(pg: StoreCluster) -> int:
    return int((pg.data / "postmaster.pid").read_text().split()[0])


# --------------------------------------------------------------------------- configurations


@dataclass
class Config:
    name: str
    nodes: list[Node]
    cluster: Cluster | None = None
    jobs: list[Figures] = field(default_factory=list)
    datakeys: list[Figures] = field(default_factory=list)

    @property
    def target(self) -> StoreTarget:
        return self.nodes[0].settings.store_target

    def service_pids(self) -> dict[str, list[int]]:
        pids: dict[str, list[int]] = {"workers": [n.worker.pid for n in self.nodes
                                                  if n.worker.proc is not None]}
        if self.cluster is not None and self.cluster.export.proc is not None:
            pids["p11-kit server"] = [self.cluster.export.proc.pid]
        return pids

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        for node in self.nodes:
            node.worker.stop()


@dataclass
class Figures:
    count: int
    seconds: float
    cpu: dict[str, float]  # CPU seconds by part
    enqueue_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.count / self.seconds


class Sampler:
    """CPU seconds of the configuration's processes, PostgreSQL and Redis."""

    def __init__(self, config: Config, pg: StoreCluster, redis_pid: int) -> None:
        self.config, self.pg, self.redis_pid = config, pg, redis_pid

    def sample(self) -> dict[str, float]:
        stats = _proc_stats()
        parts = {name: cpu_tree(pids, stats)
                 for name, pids in self.config.service_pids().items()}
        parts["Redis"] = cpu_tree([self.redis_pid], stats)
        if self.config.cluster is not None:
            parts["PostgreSQL"] = cpu_tree([postmaster_pid(self.pg)], stats)
        return parts


def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# --------------------------------------------------------------------------- jobs


async def succeeded(target: StoreTarget) -> Any:
    """A function counting the succeeded tasks, on one kept connection."""
    if target.url:
        conn = await asyncpg.connect(target.url)

        async def count_pg() -> int:
            return int(await conn.fetchval(
                "SELECT COUNT(*) FROM tasks WHERE status = 'succeeded'"))

        return count_pg, conn.close
    db = sqlite3.connect(target.path, timeout=30)

    async def count_sqlite() -> int:
        return int(db.execute(
            "SELECT COUNT(*) FROM tasks WHERE status = 'succeeded'").fetchone()[0])

    async def close() -> None:
        db.close()

    return count_sqlite, close


def ready_per_node(config: Config, total: int,
                   start: Callable[[Node, int], subprocess.Popen[str]],
                   ) -> list[subprocess.Popen[str]]:
    """One process per node, ``total`` split between them, each ready and waiting for
    the release that starts them all at once."""
    procs = [start(node, n) for node, n in zip(config.nodes, split(total, len(config.nodes)),
                                                strict=True)]
    for proc in procs:
        wait_ready(proc)
    return procs


async def run_jobs(config: Config, sampler: Sampler, args: argparse.Namespace) -> Figures:
    start_workers(config.nodes)
    count, close = await succeeded(config.target)
    try:
        before = await count()
        procs = ready_per_node(config, args.jobs, lambda node, n: start_enqueuer(
            node.env(), n, concurrency=args.concurrency))
        cpu0 = sampler.sample()
        t0 = time.time()
        release(procs)
        deadline = time.monotonic() + max(120.0, args.jobs / 10)
        while await count() < before + args.jobs:
            if time.monotonic() > deadline:
                raise SystemExit(f"{config.name}: the jobs did not finish in time")
            dead = [n.name for n in config.nodes
                    if n.worker.proc is not None and n.worker.proc.poll() is not None]
            if dead:
                raise SystemExit(f"{config.name}: worker of node {dead} exited")
            await asyncio.sleep(0.05)
        elapsed = time.time() - t0
        cpu = used(cpu0, sampler.sample())
        results = [enqueuer_result(proc) for proc in procs]
    finally:
        await close()
        for node in config.nodes:
            node.worker.stop()
    cpu["clients"] = sum(r["cpu"] for r in results)
    return Figures(args.jobs, elapsed, cpu, max(r["finished"] for r in results) - t0)


# --------------------------------------------------------------------------- data keys


def start_driver(node: Node, count: int, callers: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--datakey-driver", str(count), "--callers", str(callers)],
        env=node.env(), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


async def run_datakeys(config: Config, sampler: Sampler, args: argparse.Namespace
                       ) -> Figures:
    procs = ready_per_node(config, args.calls,
                           lambda node, n: start_driver(node, n, args.callers))
    cpu0 = sampler.sample()
    t0 = time.time()
    release(procs)
    results = [enqueuer_result(proc) for proc in procs]
    cpu = used(cpu0, sampler.sample())
    cpu.pop("workers", None)
    cpu["clients"] = sum(r["cpu"] for r in results)
    return Figures(args.calls, max(r["finished"] for r in results) - t0, cpu)


async def datakey_driver(count: int, callers: int) -> dict[str, Any]:
    """One node's driver: ``count`` create_datakey calls through its KmsService."""
    from handlers.kms.wiring import open_kms

    settings = load_settings()
    async with open_kms(settings, actor="bench") as kms:
        await kms.create_datakey(KEY_ALIAS)  # opens the HSM session, reads the key
        await kms.core.flush_audit()
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        started, cpu0 = time.time(), _own_cpu()
        left = count

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await kms.create_datakey(KEY_ALIAS)

        await asyncio.gather(*(caller() for _ in range(callers)))
        await kms.core.flush_audit()  # the last batch of audit entries is written
        return {"started": started, "finished": time.time(), "cpu": _own_cpu() - cpu0}


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- set-up


def make_configs(shared: Settings, root: Path, pg: StoreCluster) -> list[Config]:
    configs: list[Config] = []
    try:
        local = Node.local("local", shared.replace(redis={"queue": "bench:local"}),
                           root / "local", label="dew-bench")
        init_nodes([local])
        configs.append(Config(BASELINE, [local]))
        for count in (1, 2):
            queue = f"bench:pg{count}:{uuid.uuid4().hex[:6]}"
            cluster = Cluster.start(shared.replace(redis={"queue": queue}), root / f"pg{count}",
                                    pg.new_database(), names="ab"[:count], label="dew-bench",
                                    workers=False)
            configs.append(Config(
                f"{count} node{'s' if count > 1 else ''}, PostgreSQL, p11-kit HSM",
                cluster.nodes, cluster))
        for config in configs:
            # One node makes the CMK (and the token's audit key) before nodes run at once.
            config.nodes[0].dew_json("kms", "create-key", "--alias", KEY_ALIAS)
            # The token's job-signing key is made before the timed runs, not during them.
            start_workers(config.nodes[:1])
            config.nodes[0].worker.stop()
    except BaseException:
        for config in configs:
            config.stop()
        raise
    return configs


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- report


def cpu_line(figures: Figures, unit: str) -> str:
    parts = [f"{name} {figures.cpu[name] / figures.count * 1000:.2f}"
             for name in CPU_PARTS if name in figures.cpu]
    total = sum(figures.cpu.values())
    return (f"    CPU ms/{unit}: " + ", ".join(parts)
            + f"; total {total / figures.count * 1000:.2f} ms/{unit}, "
            f"{total / figures.seconds:.2f} of {os.cpu_count()} cores busy")


def report(configs: list[Config], args: argparse.Namespace) -> str:
    def best(runs: list[Figures]) -> Figures:
        return max(runs, key=lambda f: f.rate)

    base_jobs, base_keys = best(configs[0].jobs), best(configs[0].datakeys)
    lines = [f"{'configuration':34} {'jobs/s':>8} {'ratio':>6} {'datakeys/s':>11} {'ratio':>6}"]
    for config in configs:
        jobs, keys = best(config.jobs), best(config.datakeys)
        lines.append(f"{config.name:34} {jobs.rate:>8.0f} {jobs.rate / base_jobs.rate:>6.2f} "
                     f"{keys.rate:>11.0f} {keys.rate / base_keys.rate:>6.2f}")
    lines.append("")
    for config in configs:
        jobs, keys = best(config.jobs), best(config.datakeys)
        lines.append(f"{config.name}:")
        lines.append(f"  jobs: {jobs.count} in {jobs.seconds:.2f} s (enqueued in "
                     f"{jobs.enqueue_seconds:.2f} s)")
        lines.append(cpu_line(jobs, "job"))
        lines.append(f"  datakeys: {keys.count} in {keys.seconds:.2f} s")
        lines.append(cpu_line(keys, "call"))
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    print(f"{args.jobs} jobs (enqueue concurrency {args.concurrency} per node, worker "
          f"max_jobs={args.max_jobs}, poll_delay={args.poll_delay}s), {args.calls} "
          f"create-datakey calls ({args.callers} callers per node), {args.rounds} round(s), "
          f"{os.cpu_count()} cores", flush=True)
    print(f"before: {uptime()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dew-bench-nodes-") as tmp:
        root = Path(tmp)
        server = RedisServer(root / "redis", port=free_port())
        server.start()
        pg: StoreCluster | None = None
        configs: list[Config] = []
        try:
            pg = StoreCluster.create(free_port())
            info = redis.Redis.from_url(server.url).info()
            assert isinstance(info, dict)
            redis_pid = int(info["process_id"])
            shared = base_settings(
                server.url, "bench", worker={"max_jobs": args.max_jobs,
                                             "poll_delay": args.poll_delay},
                log={"console": "off", "level": "warning"})
            configs = make_configs(shared, root, pg)
            for r in range(args.rounds):
                for config in configs:
                    sampler = Sampler(config, pg, redis_pid)
                    config.jobs.append(await run_jobs(config, sampler, args))
                    config.datakeys.append(await run_datakeys(config, sampler, args))
                    print(f"round {r + 1}, {config.name}: {config.jobs[-1].rate:.0f} jobs/s, "
                          f"{config.datakeys[-1].rate:.0f} datakeys/s", flush=True)
        finally:
            for config in configs:
                config.stop()
            if pg is not None:
                pg.remove()
            server.stop()
    print(f"after: {uptime()}\n")
    print(report(configs, args))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--datakey-driver":
        driver = argparse.ArgumentParser()
        driver.add_argument("--datakey-driver", type=int, required=True)
        driver.add_argument("--callers", type=int, default=32)
        opts = driver.parse_args()
        print(json.dumps(asyncio.run(datakey_driver(opts.datakey_driver, opts.callers))),
              flush=True)
        sys.exit(0)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--calls", type=int, default=2000, help="create-datakey calls")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=50,
                        help="enqueues in flight in each node's enqueuer")
    parser.add_argument("--callers", type=int, default=32,
                        help="concurrent create-datakey callers in each node's driver")
    parser.add_argument("--max-jobs", type=int, default=100)
    parser.add_argument("--poll-delay", type=float, default=0.05)
    asyncio.run(main(parser.parse_args()))
