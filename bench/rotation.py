"""Rotation: N RDS_POSTGRESQL secrets (N database users) due at the same moment.

One run, one private redis-server, one private PostgreSQL cluster
(scram-sha-256), one SoftHSM token under a temp state directory:

1. naive baseline: a sequential loop in this process doing the same four steps
   directly (create an encrypted pending version, ALTER ROLE, log in, move
   SYSCURRENT) for every secret, one after the other;
2. dew-engine: every secret gets a rotation due at the same moment T; one
   worker (its scheduler queues them deferred to T, at most
   ``csms.max_concurrent_rotations`` run at once). Measured from T until the
   last rotation finished, and the worst lateness (start - T, finish - T).

    .venv/bin/python bench/rotation.py [--secrets 200] [--bound 50]

Prints both times, their ratio and the worst lateness (the hosted service
triggers due rotations once an hour: up to an hour late).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from engine.logs import configure_logging  # noqa: E402
from engine.models import parse_iso, utcnow  # noqa: E402
from engine.redis_server import RedisServer, free_port  # noqa: E402
from engine.settings import load_settings  # noqa: E402
from engine.store import open_store  # noqa: E402
from handlers.csms.service import open_secrets  # noqa: E402
from tests.pg_store import PG_BIN, as_postgres, initdb  # noqa: E402


def start_pg(port: int) -> tuple[Path, str]:
    """A private cluster (tests/pg_store.py's initdb) on ``port``: its data directory
    and the superuser's password."""
    base, superpass = initdb("dew-bench-pg-")
    data = base / "data"
    subprocess.run(as_postgres([
        str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "pg.log"), "-w",
        "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off "
              "-c max_connections=400", "start"]), check=True, capture_output=True)
    return data, superpass


def stop_pg(data: Path) -> None:
    subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
                   capture_output=True)


async def main(args: argparse.Namespace) -> None:
    n = args.secrets
    base = Path(tempfile.mkdtemp(prefix="dew-bench-rot-"))
    redis = RedisServer(base / "redis", port=free_port())
    redis.start()
    port = free_port()
    data, superpass = start_pg(port)  # its own temp dir: the postgres user reaches it
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEW_")}
    env.update({"DEW_STATE_DIR": str(base / "state"), "DEW_REDIS_URL": redis.url,
                "DEW_LOG_CONSOLE": "off", "DEW_LOG_LEVEL": "warning",
                "DEW_CSMS_MAX_CONCURRENT_ROTATIONS": str(args.bound),
                "DEW_CSMS_SCHEDULER_INTERVAL": "5"})
    os.environ.update(env)
    settings = load_settings()
    configure_logging(settings.log_file, "warning", console="off")
    worker: subprocess.Popen[bytes] | None = None
    try:
        admin = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres",
                                      password=superpass, database="postgres", ssl=False)
        for i in range(n):
            await admin.execute(f"CREATE ROLE bench_{i} LOGIN PASSWORD 'start-{i}'")
        await admin.close()
        names = [f"bench-{i}" for i in range(n)]
        async with open_secrets(settings, actor="bench") as csms:
            for i, name in enumerate(names):
                doc = {"engine": "postgresql", "host": "127.0.0.1", "port": port,
                       "username": f"bench_{i}", "password": f"start-{i}",
                       "dbname": "postgres", "ssl": False}
                await csms.create(name, json.dumps(doc).encode(),
                                  secret_type="RDS_POSTGRESQL")
            print(f"{n} RDS_POSTGRESQL secrets on a private PostgreSQL (scram-sha-256), "
                  f"{os.cpu_count()} cores, rotation bound {args.bound}")

            # 1. naive baseline: the same four steps, one secret after the other.
            t0 = time.perf_counter()
            for name in names:
                await csms.rotate(name)
            baseline = time.perf_counter() - t0

            # 2. through the engine: all due at the same moment T.
            due = utcnow() + timedelta(seconds=args.lead)
            for name in names:
                info = await csms.set_rotation(name, 24 * 3600)
                await csms.store.set_rotation(info.record.secret_id, 24 * 3600, due,
                                              utcnow())
        # The task store's tables, before the worker makes them: read below at once.
        await (await open_store(settings)).close()
        worker_out = (base / "worker.out").open("wb")
        worker = subprocess.Popen([sys.executable, "-m", "engine.cli", "worker"], env=env,
                                  cwd=ROOT, stdout=worker_out, stderr=subprocess.STDOUT)
        db = sqlite3.connect(settings.db_path, timeout=30)
        deadline = time.monotonic() + args.lead + 600
        while True:
            done, failed = db.execute(
                "SELECT SUM(status = 'succeeded'), SUM(status = 'failed') FROM tasks "
                "WHERE name = 'csms.rotate_secret'").fetchone()
            if (done or 0) + (failed or 0) >= n or time.monotonic() > deadline:
                break
            if worker.poll() is not None:
                raise SystemExit("the worker exited:\n"
                                 + (base / "worker.out").read_text()[-3000:])
            await asyncio.sleep(0.05)
        rows = db.execute("SELECT result FROM tasks WHERE name = 'csms.rotate_secret' "
                          "AND status = 'succeeded'").fetchall()
        db.close()
        results = [json.loads(r[0]) for r in rows]
        starts = [parse_iso(r["started_at"]) for r in results]
        ends = [parse_iso(r["finished_at"]) for r in results]
        late_start = max((s - due).total_seconds() for s in starts if s)
        engine = max((e - due).total_seconds() for e in ends if e)
        peak = max(int(r["concurrent"]) for r in results)
        print(f"\n{'':34} {'seconds':>8} {'per secret':>11}")
        for label, took in (("sequential loop (naive baseline)", baseline),
                            ("dew-engine (due -> all rotated)", engine)):
            print(f"{label:34} {took:8.2f} {took / n * 1000:8.1f} ms")
        print(f"ratio baseline / engine: {baseline / engine:.1f}x "
              f"({len(results)}/{n} rotated, {failed or 0} failed, peak concurrency {peak})")
        print(f"worst lateness: start {late_start:+.2f} s, finish {engine:+.2f} s after due "
              "(hosted service: up to 3600 s)")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(20)
        stop_pg(data)
        redis.stop()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(data.parent, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secrets", type=int, default=200)
    parser.add_argument("--bound", type=int, default=50,
                        help="csms.max_concurrent_rotations of the worker")
    parser.add_argument("--lead", type=float, default=8.0,
                        help="seconds from now to the due time (the worker starts meanwhile)")
    asyncio.run(main(parser.parse_args()))
