"""Fan-out: bind one key pair to N sshd on loopback, with the login check.

One run, as root: a throw-away local user, N real OpenSSH ``sshd`` (one user,
per-instance ``AuthorizedKeysFile``; tests/kps/sshd_servers.py), a private
redis-server and SoftHSM token under a temp state directory, and:

1. bare asyncssh (the floor): per host, at the engine's ``kps.concurrency``,
   connect with the password, append the key to the instance's authorized_keys
   unless present, then log in afresh with the new key;
2. dew-engine: ``kps.bind`` sealed and enqueued through the engine's client as
   ``dew keypairs bind`` does, run by a real ``dew worker`` subprocess; timed
   from the enqueue to the task's ``finished_at``;
3. Ansible ``lineinfile`` + a key login (``ping``), forks=5 and forks=50, only
   when ``ansible-playbook`` (and ``sshpass``, for the password) is on PATH.

Every round starts from no authorized_keys files. Host keys are pinned
everywhere (never accepted blindly).

    .venv/bin/python bench/fanout.py [--hosts 50] [--rounds 1]

Prints wall times (median over rounds), engine / bare, ansible / engine, and
where the engine's time goes (queue pick-up, job, worker CPU).
Everything it started (sshd, redis, worker, the user, temp dirs) is removed at
the end, on Ctrl-C and on SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncssh  # noqa: E402

from engine.client import Client  # noqa: E402
from engine.logs import configure_logging  # noqa: E402
from engine.models import utcnow  # noqa: E402
from engine.redis_server import RedisServer, free_port  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402
from handlers.kps.config import KpsSettings  # noqa: E402
from handlers.kps.service import open_kps  # noqa: E402
from tests.helpers import WorkerProcess  # noqa: E402
from tests.kps.sshd_servers import (  # noqa: E402
    SSHD,
    Sshd,
    TestUser,
    create_user,
    delete_user,
    start_pool,
    stop_pool,
)

KEYPAIR = "bench"


def pinned(sshd: Sshd) -> str:
    return " ".join(sshd.host_key_pub.read_text().split()[:2])


def reset_keys(pool: list[Sshd]) -> None:
    for s in pool:
        s.authorized_keys.unlink(missing_ok=True)


def check_bound(pool: list[Sshd], blob: str) -> None:
    bad = [s.port for s in pool
           if not s.authorized_keys.exists() or s.authorized_keys.read_text().count(blob) != 1]
    if bad:
        raise SystemExit(f"the key is not on {len(bad)} hosts (ports {bad[:5]}...)")


# --------------------------------------------------------------------------- bare asyncssh


async def bare(pool: list[Sshd], user: TestUser, key_line: str, private: str,
               concurrency: int) -> float:
    """The floor: what the job does, with nothing around it."""
    client_key = asyncssh.import_private_key(private)
    blob = key_line.split()[1]
    limit = asyncio.Semaphore(concurrency)

    async def one(s: Sshd) -> None:
        common: dict[str, Any] = {
            "port": s.port, "username": user.name,
            "known_hosts": ([asyncssh.import_public_key(pinned(s))], [], []),
            "agent_path": None, "config": None, "gss_auth": False,
            "host_based_auth": False}
        path = shlex.quote(s.authorized_keys_setting)
        script = (f'set -e; umask 077; cd; mkdir -p .ssh; touch {path}; '
                  f'grep -qF -- {shlex.quote(blob)} {path} || '
                  f'printf "%s\\n" {shlex.quote(key_line)} >> {path}')
        async with limit:
            async with asyncssh.connect("127.0.0.1", password=user.password,
                                        client_keys=None, **common) as conn:
                await conn.run(script, check=True)
            async with asyncssh.connect("127.0.0.1", client_keys=[client_key],
                                        password_auth=False, kbdint_auth=False, **common):
                pass

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in pool))
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- engine


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def engine(settings: Settings, pool: list[Sshd], user: TestUser, worker_pid: int
                 ) -> tuple[float, dict[str, float]]:
    """``kps.bind`` as the CLI enqueues it; enqueue -> finished_at of the task."""
    names = [f"h{i}" for i in range(len(pool))]
    sealed = {"keypair": KEYPAIR, "servers": names, "account": "default", "user": "local",
              "auth": {"password": user.password}}  # the client seals it
    async with await Client.open(settings) as client:
        cpu0 = _cpu_seconds(worker_pid)
        start = utcnow()
        task = await client.enqueue("kps.bind", sealed)
        task = await client.wait(task.task_id, timeout=300, poll=0.02)
        cpu = _cpu_seconds(worker_pid) - cpu0
    result = task.result or {}
    if task.status != "succeeded" or result.get("failed"):
        failed = [r for r in result.get("servers", []) if r["status"] != "succeeded"]
        raise SystemExit(f"kps.bind did not succeed everywhere: {task.status} "
                         f"{task.error or failed[:3]}")
    assert task.started_at is not None and task.finished_at is not None

    def secs(a: datetime, b: datetime) -> float:
        return (b - a).total_seconds()

    return secs(start, task.finished_at), {
        "pickup": secs(start, task.started_at), "job": secs(task.started_at, task.finished_at),
        "worker_cpu": cpu, "attempts": float(task.attempts)}


async def prepare_engine(settings: Settings, pool: list[Sshd], user: TestUser) -> str:
    """The key pair (managed: the engine proves the login) and the N servers."""
    async with open_kps(settings) as kps:
        created = await kps.create(KEYPAIR, "SSH_ED25519", managed=True)
        for i, s in enumerate(pool):
            await kps.add_server(f"h{i}", "127.0.0.1", port=s.port, user=user.name,
                                 host_key=pinned(s), authorized_keys=s.authorized_keys_setting,
                                 sshd_config=str(s.config), reload_command=s.reload_command)
    return created.private_key.decode()


# --------------------------------------------------------------------------- ansible


def ansible_missing() -> str | None:
    if shutil.which("ansible-playbook") is None:
        return "not installed"
    if shutil.which("sshpass") is None:
        return "sshpass (needed for password login) not installed"
    return None


def run_ansible(base: Path, pool: list[Sshd], user: TestUser, key_line: str,
                key_file: Path, forks: int) -> float:
    """``lineinfile`` with the password, then a fresh key login (``ping``) per host."""
    work = base / "ansible"
    work.mkdir(mode=0o700, exist_ok=True)
    known = work / "known_hosts"
    known.write_text("".join(f"[127.0.0.1]:{s.port} {pinned(s)}\n" for s in pool))
    ssh_args = f"-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes -F /dev/null"
    hosts = "".join(f"h{i} ansible_host=127.0.0.1 ansible_port={s.port} "
                    f"ak_path={s.authorized_keys}\n" for i, s in enumerate(pool))
    common = (f"ansible_user={user.name}\nansible_python_interpreter=/usr/bin/python3\n"
              f"ansible_ssh_common_args='{ssh_args}'\n")
    (work / "pw.ini").write_text(f"[bench]\n{hosts}[bench:vars]\n{common}"
                                 f"ansible_password={user.password}\n")
    (work / "key.ini").write_text(f"[bench]\n{hosts}[bench:vars]\n{common}"
                                  f"ansible_ssh_private_key_file={key_file}\n"
                                  "ansible_ssh_extra_args='-o PasswordAuthentication=no'\n")
    blob = key_line.split()[1]
    (work / "bind.yml").write_text(
        "- hosts: bench\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.lineinfile:\n"
        "        path: '{{ ak_path }}'\n"
        f"        regexp: '{re.escape(blob)}'\n"  # the key itself, not the comment
        f"        line: '{key_line}'\n"
        "        create: true\n        mode: '0600'\n")
    (work / "check.yml").write_text(
        "- hosts: bench\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n")
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_RETRY_FILES_ENABLED":
           "False", "ANSIBLE_LOCAL_TEMP": str(work / "tmp")}
    t0 = time.perf_counter()
    for inventory, playbook in (("pw.ini", "bind.yml"), ("key.ini", "check.yml")):
        done = subprocess.run(["ansible-playbook", "-i", str(work / inventory), "-f",
                               str(forks), str(work / playbook)], env=env, cwd=work,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"ansible-playbook {playbook} failed:\n{done.stdout[-3000:]}")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- main


def median(values: list[float]) -> float:
    return statistics.median(values)


async def measure(args: argparse.Namespace, base: Path, settings: Settings,
                  pool: list[Sshd], user: TestUser, workers: list[WorkerProcess]) -> None:
    private = await prepare_engine(settings, pool, user)
    key_file = base / "bench_key"
    key_file.write_text(private)
    key_file.chmod(0o600)
    async with open_kps(settings) as kps:
        key_line = (await kps.get(KEYPAIR)).public_key
    blob = key_line.split()[1]
    worker = WorkerProcess(settings, base / "worker.out")
    workers.append(worker)  # main() stops it whatever happens
    worker.start()
    try:
        times: dict[str, list[float]] = {"bare": [], "engine": []}
        parts: dict[str, list[float]] = {"pickup": [], "job": [], "worker_cpu": [],
                                         "attempts": []}

        async def run_bare() -> float:
            concurrency = settings.section(KpsSettings).concurrency
            return await bare(pool, user, key_line, private, concurrency)

        async def run_engine() -> float:
            took, split = await engine(settings, pool, user, worker.pid)
            for k, v in split.items():
                parts[k].append(v)
            return took

        runs: dict[str, Callable[[], Awaitable[float]]] = {"bare": run_bare,
                                                           "engine": run_engine}
        for r in range(args.rounds):
            order = ["bare", "engine"] if r % 2 == 0 else ["engine", "bare"]
            for label in order:
                reset_keys(pool)
                times[label].append(await runs[label]())
                check_bound(pool, blob)
            tries = int(parts["attempts"][-1])
            print(f"round {r + 1}: bare {times['bare'][-1]:.2f} s, "
                  f"engine {times['engine'][-1]:.2f} s"
                  + (f" ({tries} attempts: the job was retried)" if tries > 1 else ""),
                  flush=True)
    finally:
        worker.stop()

    ansible: dict[int, float] = {}
    missing = ansible_missing()
    if missing is None:
        for forks in (5, 50):
            reset_keys(pool)
            ansible[forks] = run_ansible(base, pool, user, key_line, key_file, forks)
            check_bound(pool, blob)

    n = len(pool)
    b, e = median(times["bare"]), median(times["engine"])
    print(f"\n{n} sshd on loopback, one user, password login + key login check, "
          f"concurrency {settings.section(KpsSettings).concurrency}, {os.cpu_count()} cores, "
          f"median of {args.rounds} round(s)")
    print(f"{'':32} {'seconds':>8} {'per host':>9}")
    for label, took in (("bare asyncssh (floor)", b), ("dew-engine kps.bind", e),
                        *((f"ansible lineinfile forks={f}", t) for f, t in ansible.items())):
        print(f"{label:32} {took:8.2f} {took / n * 1000:6.0f} ms")
    print(f"engine / bare: {e / b:.2f}x (goal <= 1.3x)")
    for forks, took in ansible.items():
        print(f"ansible forks={forks} / engine: {took / e:.1f}x")
    if missing is not None:
        print(f"ansible: {missing}, skipped")
    retried = [i for i, a in enumerate(parts["attempts"]) if a > 1]
    if retried:
        clean = [times["engine"][i] for i in range(args.rounds) if i not in retried]
        print(f"engine rounds retried by the engine: {len(retried)} of {args.rounds} (see "
              "the worker log: 'job will be retried')"
              + (f"; rounds without a retry: median {median(clean):.2f} s, "
                 f"{median(clean) / b:.2f}x bare" if clean else ""))
    print(f"engine split (median): enqueue -> last attempt started "
          f"{median(parts['pickup']):.2f} s, job {median(parts['job']):.2f} s, "
          f"worker CPU {median(parts['worker_cpu']):.2f} s "
          f"({median(parts['worker_cpu']) / n * 1000:.0f} ms/host)")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the same clean-up as Ctrl-C


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if not 1 <= args.hosts <= 100:  # kps.batch_limit
        parser.error("--hosts must be 1..100")
    if os.geteuid() != 0 or not Path(SSHD).exists() or shutil.which("useradd") is None:
        raise SystemExit("fanout needs root, useradd and openssh-server (sshd runs as a "
                         "throw-away user)")
    signal.signal(signal.SIGTERM, _terminate)
    base = Path(tempfile.mkdtemp(prefix="dew-bench-fanout-"))
    user: TestUser | None = None
    pool: list[Sshd] = []
    redis: RedisServer | None = None
    workers: list[WorkerProcess] = []
    try:
        user = create_user("dewbench")
        t0 = time.perf_counter()
        pool = start_pool(user, args.hosts, user.home / "sshd")
        print(f"{args.hosts} sshd started in {time.perf_counter() - t0:.1f} s", flush=True)
        redis = RedisServer(base / "redis", port=free_port())
        redis.start()
        env = {"DEW_STATE_DIR": str(base / "state"), "DEW_REDIS_URL": redis.url,
               "DEW_LOG_CONSOLE": "off"}
        for k in [k for k in os.environ if k.startswith("DEW_")]:
            del os.environ[k]
        os.environ.update(env)
        settings = load_settings()
        configure_logging(settings.log_file, "warning", console="off")
        asyncio.run(measure(args, base, settings, pool, user, workers))
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for worker in workers:
            worker.stop()
        stop_pool(pool)
        if redis is not None:
            redis.stop()
        if user is not None:
            delete_user(user.name)
        # No more log file under base: a late line would create its directory again.
        configure_logging(None, "warning", console="auto")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
