"""Several dew-engine nodes on this machine, as docs/nodes.md lays them out.

An *HSM node* (a state directory of its own with a fresh SoftHSM token, made by
``dew init``) exports its token with ``dew hsm serve --socket PATH``. Each *node*
is another state directory (``DEW_STATE_DIR``) whose settings name the one Redis
(same URL and queue), the one PostgreSQL database (``[store] url``) and the
served token (``[hsm] module`` = p11-kit's client module, ``server_address`` =
the socket, ``pin_file`` = a 0600 copy of the HSM node's user PIN), and that runs
``dew worker`` in a subprocess. Only unix sockets and loopback addresses.

Used by tests/engine/test_nodes.py and bench/nodes.py. Run as a module it is a
node's enqueuer (``python -m tests.nodes enqueue N``, settings from the ``DEW_*``
environment): it connects, prints ``{"ready": true}``, waits for a line on stdin
(so enqueuers on several nodes begin at once), enqueues N ``engine.sleep`` jobs
through the node's ``Client`` and prints one JSON line with the task ids and its
start and end times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.crypto.config import SOFTHSM_MODULE, read_pin_file, write_pin_file
from engine.settings import Settings, load_settings
from tests.helpers import ROOT, WorkerProcess, dew_env, run_dew, stop_process

CLIENT_GLOB = "/usr/lib/*/pkcs11/p11-kit-client.so"
TOKEN_LABEL = "dew-nodes"
START_TIMEOUT = 60.0


def client_module() -> str:
    """p11-kit's client module (Debian p11-kit-modules); a clear error when missing."""
    found = sorted(Path("/").glob(CLIENT_GLOB.lstrip("/")))
    if not found:
        raise RuntimeError("p11-kit-client.so is not installed (Debian p11-kit-modules): "
                           "run `make setup`")
    return str(found[0])


def short_dir(prefix: str) -> Path:
    """A private directory under /tmp: a unix socket path holds at most 107 bytes,
    and pytest's temporary paths can be longer."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def base_settings(redis_url: str, queue: str, **sections: Any) -> Settings:
    """The settings every node shares: one Redis and one queue, plus ``sections``."""
    return load_settings().replace(redis={"url": redis_url, "queue": queue}, **sections)


def _checked(done: subprocess.CompletedProcess[str], what: str) -> str:
    if done.returncode != 0:
        raise RuntimeError(f"{what} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


@dataclass
class HsmExport:
    """``dew hsm serve`` of an HSM node: its own token, served on ``socket``."""

    settings: Settings
    socket: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, shared: Settings, state_dir: Path, socket: Path,
               label: str = TOKEN_LABEL) -> HsmExport:
        """``dew init`` of the HSM node (a fresh SoftHSM token labelled ``label``); not
        started yet."""
        settings = shared.replace(
            engine={"state_dir": state_dir}, store={"url": ""},
            hsm={"module": SOFTHSM_MODULE, "token_label": label, "server_address": "",
                 "pin_file": ""})
        _checked(run_dew(settings, "init", "--json"), "dew init (HSM node)")
        return cls(settings, socket, state_dir / "hsm-serve.out")

    @property
    def label(self) -> str:
        return self.settings.hsm.token_label

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    @property
    def pin_file(self) -> Path:
        """The token's user PIN, as ``dew init`` wrote it on the HSM node."""
        return self.settings.state_dir / "hsm" / "user.pin"

    def start(self) -> HsmExport:
        """Run ``dew hsm serve --json`` until it printed its settings (it checks the
        export through the client module before it does)."""
        self.log_path.unlink(missing_ok=True)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "hsm", "serve", "--socket",
                 str(self.socket), "--json"],
                env=dew_env(self.settings), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if text.endswith("\n"):
                line = text.splitlines()[0]
                try:
                    self.info = json.loads(line)
                except json.JSONDecodeError:
                    raise RuntimeError(f"dew hsm serve: {text.strip()[-2000:]}") from None
                if "error" in self.info:
                    raise RuntimeError(f"dew hsm serve: {line}")
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"dew hsm serve exited {self.proc.returncode}: "
                                   f"{text.strip()[-2000:]}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("dew hsm serve did not start")

    def stop(self) -> None:
        """SIGTERM: ``dew hsm serve`` stops p11-kit server and its per-connection children."""
        stop_process(self.proc)
        self.proc = None


@dataclass
class Node:
    """One node: its own state directory and ``dew worker``; the shared Redis,
    PostgreSQL database and served token."""

    name: str
    settings: Settings
    worker: WorkerProcess

    @classmethod
    def create(cls, name: str, shared: Settings, state_dir: Path, store_url: str,
               export: HsmExport) -> Node:
        """The node's settings and its copy of the token's PIN (mode 0600, beside the
        state directory, as /etc/dew/hsm.pin in docs/nodes.md); the state directory is
        made by ``dew init`` (:func:`init_nodes`)."""
        pin_file = state_dir.with_name(f"{state_dir.name}.pin")
        write_pin_file(pin_file, read_pin_file(export.pin_file))
        settings = shared.replace(
            engine={"state_dir": state_dir}, store={"url": store_url},
            hsm={"module": client_module(), "server_address": export.address,
                 "token_label": export.label, "pin_file": str(pin_file)})
        return cls(name, settings, WorkerProcess(settings, state_dir / "worker.out"))

    @classmethod
    def local(cls, name: str, shared: Settings, state_dir: Path,
              label: str = TOKEN_LABEL) -> Node:
        """A one-machine node: the SQLite store and a SoftHSM token in its state
        directory (both made by ``dew init``)."""
        settings = shared.replace(
            engine={"state_dir": state_dir}, store={"url": ""},
            hsm={"module": SOFTHSM_MODULE, "token_label": label, "server_address": "",
                 "pin_file": ""})
        return cls(name, settings, WorkerProcess(settings, state_dir / "worker.out"))

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    def env(self, **extra: str) -> dict[str, str]:
        return dew_env(self.settings, **extra)

    def dew(self, *args: str, input: str | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        """``dew ARGS`` run on this node (its environment)."""
        return run_dew(self.settings, *args, input=input, timeout=timeout)

    def dew_json(self, *args: str, input: str | None = None) -> Any:
        """``dew ARGS --json`` on this node; its output, parsed (exit 0 asserted)."""
        done = self.dew(*args, "--json", input=input)
        return json.loads(_checked(done, f"dew {' '.join(args)} on node {self.name}"))

    def owns(self, worker_id: object) -> bool:
        """Whether ``worker_id`` (host:pid:suffix) is this node's running worker."""
        return self.worker.proc is not None and f":{self.worker.pid}:" in str(worker_id)

    def log_records(self) -> list[dict[str, Any]]:
        """This node's log (STATE_DIR/logs/dew.log, JSON lines): its worker's and its
        CLI's records."""
        path = self.settings.log_file
        if not path.exists():
            return []
        records = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line the worker was writing when it was killed
        return records


def init_nodes(nodes: Iterable[Node]) -> None:
    """``dew init`` on every node at once (each checks the served token)."""
    procs = [(node, subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "init", "--json"], env=node.env(), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for node in nodes]
    for node, proc in procs:
        out, err = proc.communicate(timeout=120)
        _checked(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                 f"dew init on node {node.name}")


def start_workers(nodes: Iterable[Node], timeout: float = START_TIMEOUT) -> None:
    """Start the nodes' workers at once; return when each has had a heartbeat."""
    started = list(nodes)
    for node in started:
        if node.worker.proc is None:
            node.worker.start(wait=False)
    for node in started:
        node.worker.wait_beating(timeout)


@dataclass
class Cluster:
    """An HSM export and nodes that share one Redis, one PostgreSQL database and it."""

    export: HsmExport
    nodes: list[Node]
    socket_dir: Path

    @classmethod
    def start(cls, shared: Settings, root: Path, store_url: str, names: Iterable[str] = "ab",
              label: str = TOKEN_LABEL, workers: bool = True) -> Cluster:
        socket_dir = short_dir("dew-hsm-sock-")
        export = HsmExport.create(shared, root / "hsm-node", socket_dir / "hsm.sock", label)
        cluster = cls(export, [], socket_dir)
        try:
            export.start()
            cluster.nodes = [Node.create(name, shared, root / f"node-{name}", store_url, export)
                             for name in names]
            init_nodes(cluster.nodes)
            if workers:
                # At once, on a fresh served token: each worker makes the token's
                # job-signing key on first use, and one key must come out of it.
                start_workers(cluster.nodes)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def stop(self) -> None:
        for node in self.nodes:
            node.worker.stop()
        self.export.stop()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


# --------------------------------------------------------------------------- enqueuers

def start_enqueuer(node_env: dict[str, str], count: int, seconds: float = 0,
                   concurrency: int = 50) -> subprocess.Popen[str]:
    """``python -m tests.nodes enqueue``: ``count`` engine.sleep jobs through this
    node's Client, once :func:`release` lets it go (after :func:`wait_ready`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.nodes", "enqueue", str(count), "--seconds",
         repr(seconds), "--concurrency", str(concurrency)],
        env=node_env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen[str]) -> None:
    """Until the enqueuer has opened its store, Redis and HSM session."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if json.loads(line or "{}").get("ready") is not True:
        _, err = proc.communicate(timeout=30)
        raise RuntimeError(f"enqueuer did not start: {line.strip()} {err.strip()[-2000:]}")


def release(procs: Iterable[subprocess.Popen[str]]) -> None:
    """Let ready enqueuers go, as close together as two pipe writes."""
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def enqueuer_result(proc: subprocess.Popen[str], timeout: float = 300) -> dict[str, Any]:
    """The enqueuer's JSON line: ``task_ids``, ``started``, ``finished`` (epoch seconds),
    ``cpu`` (its CPU seconds while enqueueing)."""
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"enqueuer exited {proc.returncode}: {err.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def enqueue_many(settings: Settings, count: int, seconds: float,
                       concurrency: int) -> dict[str, Any]:
    from engine.client import Client

    async with await Client.open(settings) as client:
        # Start-up (the store, Redis, the HSM session that signs jobs) comes first.
        await client.queue()
        await (await client.resources.get("job_signer")).ready()
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        started, cpu0 = time.time(), _own_cpu()
        gate = asyncio.Semaphore(concurrency)

        async def one() -> str:
            async with gate:
                task = await client.enqueue("engine.sleep", {"seconds": seconds})
                return task.task_id

        task_ids = await asyncio.gather(*(one() for _ in range(count)))
        return {"task_ids": list(task_ids), "started": started, "finished": time.time(),
                "cpu": _own_cpu() - cpu0}


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.nodes")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("enqueue", help="enqueue N engine.sleep jobs through this node")
    p.add_argument("count", type=int)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args(argv)
    result = asyncio.run(enqueue_many(load_settings(), args.count, args.seconds,
                                      args.concurrency))
    print(json.dumps(result), flush=True)


def started_task_ids(nodes: Iterable[Node]) -> Iterator[str]:
    """Every ``job started`` record's task id in the nodes' logs (one per run)."""
    for node in nodes:
        for record in node.log_records():
            if record.get("event") == "job started" and "task_id" in record:
                yield str(record["task_id"])


if __name__ == "__main__":
    _main(sys.argv[1:])
