"""Fan-out: bind one key pair to N sshd on loopback, with the login check.

One run, as root: a throw-away local user, N real OpenSSH ``sshd`` (one user,
per-instance ``AuthorizedKeysFile``; tests/kps/sshd_servers.py, plus the sftp
subsystem of Debian's stock sshd_config), a private redis-server and SoftHSM
token under a temp state directory, and:

1. bare asyncssh (the floor): per host, at the engine's ``kps.concurrency``,
   connect with the password, append the key to the instance's authorized_keys
   unless present, then log in afresh with the new key;
2. dew-engine: ``kps.bind`` sealed and enqueued through the engine's client as
   ``dew keypairs bind`` does, run by a real ``dew worker`` subprocess; timed
   from the enqueue to the task's ``finished_at``;
3. Ansible: ``lineinfile`` with the password, then a fresh key login (``ping``),
   at ``--ansible-forks`` (50), as shipped (ssh with ControlPersist) and with
   pipelining. ``ansible-core`` comes from PyPI into a virtual environment of its
   own (~/.cache/dew-bench/ansible-venv, made on first use, reused after);
   ``sshpass`` (Debian) gives it the password.

Every contender starts from no authorized_keys files, and the order rotates
each round. Host keys are pinned everywhere (never accepted blindly).

    .venv/bin/python bench/fanout.py [--hosts 50] [--rounds 1] [--no-ansible]

Prints wall times (median over rounds), engine / bare (goal <= 1.3x), engine /
ansible (goal <= 0.25x: at least 4x faster), the ratios of each round, and
where the engine's time goes (queue pick-up, job, worker CPU).
Everything it started (sshd, redis, worker, the user, temp dirs, Ansible's ssh
masters) is removed at the end, on Ctrl-C and on SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
    PortLost,
    Sshd,
    TestUser,
    create_user,
    delete_user,
    free_ports,
    stop_pool,
)

KEYPAIR = "bench"


SFTP_SERVER = "/usr/lib/openssh/sftp-server"


class BenchSshd(Sshd):
    """The test sshd plus the sftp subsystem that Debian's stock sshd_config has:
    Ansible copies its modules over sftp by default (without it, it tries sftp,
    then scp, and gives up)."""

    def base_config(self) -> str:
        return super().base_config() + f"Subsystem sftp {SFTP_SERVER}\n"


def start_bench_pool(user: TestUser, count: int, base: Path) -> list[Sshd]:
    """tests.kps.sshd_servers.start_pool with :class:`BenchSshd`: ports drawn while
    all are held, each instance proven to own its port."""
    pool: list[Sshd] = [BenchSshd(user, 0, base / f"i{i}") for i in range(count)]
    try:
        for s in pool:
            s.setup()
        for s, port in zip(pool, free_ports(count), strict=True):
            s.port = port
            s.start()
        for s in pool:
            try:
                s.wait_listening()
            except PortLost:
                s.stop()
                s.start_verified()
    except BaseException:
        stop_pool(pool)
        raise
    return pool


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


def _cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of ``pid`` (and of its children it reaped, with ``children``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def sshd_cpu(pool: list[Sshd]) -> float:
    """CPU of the sshd side: each listener and every connection, session and command
    it forked (reaped by then)."""
    return sum(_cpu_seconds(s.pid, children=True) for s in pool)


def _sessions(pool: list[Sshd]) -> int:
    """Connections the sshd listeners are still serving (their child processes)."""
    listeners, count = {str(s.pid) for s in pool}, 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = stat.read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue  # gone meanwhile
        count += ppid in listeners
    return count


async def settle(pool: list[Sshd], timeout: float = 15) -> None:
    """Wait until no sshd serves a connection any more: the tail of one contender (an
    ssh master closing, a session tearing down) must not land in the next one's time."""
    deadline = time.monotonic() + timeout
    while _sessions(pool) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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


ANSIBLE_VENV = Path.home() / ".cache" / "dew-bench" / "ansible-venv"
# Pinned, so every machine compares with the same Ansible (2.19 runs on Python 3.11).
ANSIBLE_CORE = "ansible-core==2.19.*"


def ensure_ansible(venv: Path) -> Path:
    """``ansible-playbook`` from ``ansible-core`` (PyPI) in a virtual environment of
    its own, made on first use and reused after; Ansible's dependencies never touch
    the project's .venv."""
    playbook = venv / "bin" / "ansible-playbook"
    if playbook.exists():
        return playbook
    if shutil.which("sshpass") is None:
        raise SystemExit("fanout needs sshpass for Ansible's password login: "
                         "apt-get install sshpass")
    print(f"installing {ANSIBLE_CORE} into {venv} (once)", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", ANSIBLE_CORE],
                          capture_output=True, text=True)
    if done.returncode != 0 or not playbook.exists():
        shutil.rmtree(venv, ignore_errors=True)  # no half-made venv to reuse next time
        raise SystemExit(f"pip install {ANSIBLE_CORE} failed:\n{done.stderr[-2000:]}")
    return playbook


def ansible_version(playbook: Path) -> str:
    out = subprocess.run([str(playbook), "--version"], capture_output=True, text=True,
                         check=True).stdout
    return out.splitlines()[0] if out else "?"


def run_ansible(playbook_bin: Path, work: Path, pool: list[Sshd], user: TestUser,
                key_line: str, key_file: Path, forks: int, pipelining: bool) -> float:
    """``lineinfile`` with the password, then a fresh key login (``ping``) per host.

    Ansible as shipped (ssh with ControlPersist, no pipelining), except that each
    playbook gets control sockets of its own: the key check must open new logins,
    not ride on the password run's master connections."""
    work.mkdir(mode=0o700)
    known = work / "known_hosts"
    known.write_text("".join(f"[127.0.0.1]:{s.port} {pinned(s)}\n" for s in pool))
    ssh_args = f"-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes -F /dev/null"
    hosts = "".join(f"h{i} ansible_host=127.0.0.1 ansible_port={s.port} "
                    f"ak_path={s.authorized_keys}\n" for i, s in enumerate(pool))
    # No pty (-tt): an sshd that runs as a plain user cannot allocate one.
    common = (f"ansible_user={user.name}\nansible_python_interpreter=/usr/bin/python3\n"
              f"ansible_ssh_common_args='{ssh_args}'\nansible_ssh_use_tty=false\n"
              f"ansible_ssh_pipelining={pipelining}\n")
    (work / "pw.ini").write_text(f"[bench]\n{hosts}[bench:vars]\n{common}"
                                 f"ansible_password={user.password}\n"
                                 "ansible_ssh_extra_args='-o PubkeyAuthentication=no'\n")
    (work / "key.ini").write_text(f"[bench]\n{hosts}[bench:vars]\n{common}"
                                  f"ansible_ssh_private_key_file={key_file}\n"
                                  "ansible_ssh_extra_args='-o PasswordAuthentication=no "
                                  "-o KbdInteractiveAuthentication=no'\n")
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
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "True",
           "ANSIBLE_RETRY_FILES_ENABLED": "False", "ANSIBLE_HOME": str(work / "home"),
           "ANSIBLE_LOCAL_TEMP": str(work / "tmp"), "ANSIBLE_CONFIG": str(work / "none.cfg")}
    t0 = time.perf_counter()
    for inventory, playbook in (("pw.ini", "bind.yml"), ("key.ini", "check.yml")):
        env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = str(work / f"cp-{playbook}")
        done = subprocess.run([str(playbook_bin), "-i", str(work / inventory), "-f",
                               str(forks), str(work / playbook)], env=env, cwd=work,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            why = [line for line in done.stdout.splitlines()
                   if "UNREACHABLE" in line or "FAILED" in line]
            raise SystemExit(f"ansible-playbook {playbook} failed ({len(why)} hosts):\n"
                             + "\n".join(why[:3]) + f"\n{done.stderr[-1000:]}")
    took = time.perf_counter() - t0
    _close_masters(work)
    return took


def _close_masters(work: Path) -> None:
    """End the ControlPersist masters this run left (ssh -O exit on each socket)."""
    for sock in work.glob("cp-*/*"):
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                       capture_output=True, timeout=10, check=False)


# --------------------------------------------------------------------------- main


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass(frozen=True)
class AnsibleVariant:
    forks: int
    pipelining: bool

    @property
    def label(self) -> str:
        return f"ansible forks={self.forks}" + (" pipelined" if self.pipelining else "")


def ansible_variants(args: argparse.Namespace) -> list[AnsibleVariant]:
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.ansible_pipelining]
    return [AnsibleVariant(f, p) for f in args.ansible_forks for p in modes]


async def measure(args: argparse.Namespace, base: Path, settings: Settings,
                  pool: list[Sshd], user: TestUser, workers: list[WorkerProcess],
                  playbook: Path | None) -> None:
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
    variants = ansible_variants(args) if playbook is not None else []
    times: dict[str, list[float]] = {"bare": [], "engine": [],
                                     **{v.label: [] for v in variants}}
    # CPU seconds of each run: the contender's own processes, and the sshd side.
    client: dict[str, list[float]] = {k: [] for k in times}
    server: dict[str, list[float]] = {k: [] for k in times}
    parts: dict[str, list[float]] = {"pickup": [], "job": [], "worker_cpu": [],
                                     "attempts": []}
    try:
        async def run_bare() -> float:
            concurrency = settings.section(KpsSettings).concurrency
            cpu0 = time.process_time()
            took = await bare(pool, user, key_line, private, concurrency)
            client["bare"].append(time.process_time() - cpu0)
            return took

        async def run_engine() -> float:
            took, split = await engine(settings, pool, user, worker.pid)
            for k, v in split.items():
                parts[k].append(v)
            client["engine"].append(split["worker_cpu"])
            return took

        def run_playbooks(v: AnsibleVariant) -> Callable[[], Awaitable[float]]:
            assert playbook is not None

            async def run() -> float:
                work = base / f"ansible-{len(times[v.label])}-{v.forks}-{int(v.pipelining)}"
                cpu0 = children_cpu()  # ansible-playbook and its forks, ssh, sshpass
                took = await asyncio.to_thread(run_ansible, playbook, work, pool, user,
                                               key_line, key_file, v.forks, v.pipelining)
                client[v.label].append(children_cpu() - cpu0)
                return took
            return run

        runs: dict[str, Callable[[], Awaitable[float]]] = {
            "bare": run_bare, "engine": run_engine,
            **{v.label: run_playbooks(v) for v in variants}}
        labels = list(runs)
        for r in range(args.rounds):
            # Rotate the order, so no contender always runs first (or last).
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            for label in order:
                reset_keys(pool)
                await settle(pool)
                cpu0 = sshd_cpu(pool)
                times[label].append(await runs[label]())
                await settle(pool)  # every session reaped: its CPU is in the listener's
                server[label].append(sshd_cpu(pool) - cpu0)
                check_bound(pool, blob)
            tries = int(parts["attempts"][-1])
            print(f"round {r + 1}: " + ", ".join(f"{label} {times[label][-1]:.2f} s"
                                                 for label in labels)
                  + (f" ({tries} attempts: the job was retried)" if tries > 1 else ""),
                  flush=True)
    finally:
        worker.stop()
    report(args, settings, pool, times, parts, playbook)
    report_cpu(times, client, server)


def report_cpu(times: dict[str, list[float]], client: dict[str, list[float]],
               server: dict[str, list[float]]) -> None:
    """The work each contender costs, whatever else the machine does meanwhile: on a
    shared machine wall times move with the load, CPU seconds much less."""
    print(f"\nCPU seconds (median): {'client':>8} {'sshd':>8} {'total':>8}  "
          "(client: bench process / dew worker / ansible-playbook and its children)")
    for label in times:
        c, srv = median(client[label]), median(server[label])
        print(f"{label:32} {c:8.2f} {srv:8.2f} {c + srv:8.2f}")


def report(args: argparse.Namespace, settings: Settings, pool: list[Sshd],
           times: dict[str, list[float]], parts: dict[str, list[float]],
           playbook: Path | None) -> None:
    n = len(pool)
    b, e = median(times["bare"]), median(times["engine"])
    bb, be = min(times["bare"]), min(times["engine"])
    ansible = {k: v for k, v in times.items() if k.startswith("ansible")}
    print(f"\n{n} sshd on loopback, one user, password login + key login check, "
          f"concurrency {settings.section(KpsSettings).concurrency}, {os.cpu_count()} cores, "
          f"{args.rounds} round(s)")
    # Best of the rounds too: on a shared machine the fastest round is the one least
    # disturbed by the rest, the steadier estimate of what each contender costs.
    print(f"{'':32} {'median s':>9} {'best s':>8} {'per host':>9}")
    for label, took in (("bare asyncssh (floor)", times["bare"]),
                        ("dew-engine kps.bind", times["engine"]), *ansible.items()):
        print(f"{label:32} {median(took):9.2f} {min(took):8.2f} "
              f"{median(took) / n * 1000:6.0f} ms")
    print(f"engine / bare: median {e / b:.2f}x, best {be / bb:.2f}x (goal <= 1.3x)")
    for label, took in ansible.items():
        print(f"engine / {label}: median {e / median(took):.3f}x, best {be / min(took):.3f}x "
              f"(goal <= 0.25x, i.e. at least 4x faster)")
    if playbook is None:
        print("ansible: skipped (--no-ansible)")
    else:
        print(f"ansible: {ansible_version(playbook)} ({playbook}); lineinfile with the "
              "password, then ping with the key; ssh with ControlPersist, no pty")
    # Per round too: with other work on the machine, a ratio within one round is
    # steadier than a ratio of medians taken minutes apart.
    for r in range(args.rounds):
        ratios = [f"engine/bare {times['engine'][r] / times['bare'][r]:.2f}x"]
        ratios += [f"engine/{k} {times['engine'][r] / v[r]:.3f}x" for k, v in times.items()
                   if k.startswith("ansible")]
        print(f"round {r + 1} ratios: " + ", ".join(ratios))
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


def forks_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of numbers") from None
    if not values or not all(1 <= v <= 200 for v in values):
        raise argparse.ArgumentTypeError("each value must be 1..200")
    return values


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the same clean-up as Ctrl-C


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ansible-forks", type=forks_list, default=[50],
                        help="Ansible's forks, comma-separated (default 50)")
    parser.add_argument("--ansible-pipelining", choices=("off", "on", "both"),
                        default="both", help="Ansible's ssh pipelining (default both: "
                        "as shipped, and tuned)")
    parser.add_argument("--no-ansible", action="store_true",
                        help="bare asyncssh and the engine only")
    parser.add_argument("--ansible-venv", type=Path, default=ANSIBLE_VENV,
                        help=f"where ansible-core is installed (default {ANSIBLE_VENV})")
    args = parser.parse_args()
    if not 1 <= args.hosts <= 100:  # kps.batch_limit
        parser.error("--hosts must be 1..100")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if os.geteuid() != 0 or not Path(SSHD).exists() or shutil.which("useradd") is None:
        raise SystemExit("fanout needs root, useradd and openssh-server (sshd runs as a "
                         "throw-away user)")
    playbook = None if args.no_ansible else ensure_ansible(args.ansible_venv)
    signal.signal(signal.SIGTERM, _terminate)
    base = Path(tempfile.mkdtemp(prefix="dew-bench-fanout-"))
    user: TestUser | None = None
    pool: list[Sshd] = []
    redis: RedisServer | None = None
    workers: list[WorkerProcess] = []
    try:
        user = create_user("dewbench")
        t0 = time.perf_counter()
        pool = start_bench_pool(user, args.hosts, user.home / "sshd")
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
        asyncio.run(measure(args, base, settings, pool, user, workers, playbook))
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
