"""Store test helpers on either backend (shared with tests/kps): what the stores hold
as stored, and check-then-writes raced by several processes.

(Candidates for tests/pg_store.py, beside ``store_rows`` and ``admin_sql``.)"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

from engine.sql_db import StoreTarget
from tests.helpers import ROOT
from tests.pg_store import store_rows


def stored_bytes(target: StoreTarget) -> bytes:
    """Everything the stores hold, as stored, to search for a value in clear: the
    SQLite files (database, WAL), or every value of every table in PostgreSQL."""
    if not target.url:
        with sqlite3.connect(target.path, timeout=10) as db:
            db.execute("PRAGMA wal_checkpoint(FULL)")
            dump = "\n".join(db.iterdump()).encode()
        files = target.path.parent.glob(target.path.name + "*")
        return dump + b"".join(path.read_bytes() for path in files if path.is_file())
    tables = store_rows(target, "SELECT table_name FROM information_schema.tables "
                                "WHERE table_schema = 'public'")
    return b"\n".join(
        value if isinstance(value, bytes) else str(value).encode()
        for (table,) in tables for row in store_rows(target, f"SELECT * FROM {table}")
        for value in row)


def race(script: str, target: StoreTarget, processes: int = 4) -> list[str]:
    """Run ``script`` (argv: its number, the SQLite path, the PostgreSQL URL) in
    several processes, as on several nodes. Each prints ``ready`` once its store is
    open and then waits for a line on stdin: all are let go at once. Their outputs."""
    procs = [subprocess.Popen(
        [sys.executable, "-c", script, str(n), str(target.path), target.url], cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(processes)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == "ready\n", line + (proc.stderr.read() if proc.stderr else "")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0] * processes, [err for _, err in outs]
    return [out for out, _ in outs]
