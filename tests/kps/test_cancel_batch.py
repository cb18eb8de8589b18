"""`dew tasks cancel` of a running KPS batch (issue 16, item 3): the batch stops
between servers, never inside one. Every server it finished is bound whole (the real
``ssh`` logs in with the new key), the rest are untouched and reported ``skipped``,
and no temporary file is left behind. Real sshd servers, one at a time
(``kps.concurrency`` 1), so the cancel lands mid-batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.client import Client
from engine.settings import Settings
from handlers.kps.service import open_kps
from tests.helpers import WorkerProcess, wait_for
from tests.kps.conftest import KPS_TEST_SETTINGS, Sshd, ssh_login

pytestmark = pytest.mark.slow

SERVERS = 4


@pytest.fixture
def one_at_a_time(kps_settings: Settings) -> Settings:
    return kps_settings.replace(kps={**KPS_TEST_SETTINGS, "concurrency": 1})


@pytest.fixture
def worker(one_at_a_time: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(one_at_a_time, tmp_path / "worker.out").start()
    yield proc
    proc.stop()


async def _setup(settings: Settings, sshds: list[Sshd], key: Path) -> None:
    async with open_kps(settings) as kps:
        created = await kps.create("k", "SSH_ED25519", managed=True)
        key.write_bytes(created.private_key)
        key.chmod(0o600)
        for n, sshd in enumerate(sshds):
            await kps.add_server(
                f"s{n}", "127.0.0.1", port=sshd.port, user=sshd.user.name,
                host_key=sshd.host_key_pub.read_text(), sshd_config=str(sshd.config),
                reload_command=sshd.reload_command,
                authorized_keys=sshd.authorized_keys_setting)


async def test_a_cancelled_bind_finishes_the_server_it_is_on_and_skips_the_rest(
    one_at_a_time: Settings, worker: WorkerProcess, sshds: list[Sshd], tmp_path: Path,
) -> None:
    s, used = one_at_a_time, sshds[:SERVERS]
    key = tmp_path / "k"
    await _setup(s, used, key)
    configs = [sshd.config.read_text() for sshd in used]
    names = [f"s{n}" for n in range(SERVERS)]
    async with await Client.open(s) as client, open_kps(s) as kps:
        task = await client.enqueue("kps.bind", {
            "keypair": "k", "servers": names, "auth": {"password": used[0].user.password}})

        async def first_done() -> bool:
            return (await kps.store.progress(task.task_id)).get("s0") == "succeeded"

        await wait_for(first_done, timeout=30, interval=0.02)
        requested = await client.cancel(task.task_id, "tester")
        assert requested.status == "running" and requested.cancel_requested_at is not None
        ended = await client.wait(task.task_id, timeout=60)
        progress = await kps.store.progress(task.task_id)

    assert ended.status == "cancelled" and ended.attempts == 1, ended
    assert ended.error is not None and ended.error["code"] == "cancelled"
    result = ended.result
    rows = {r["server"]: r for r in result["servers"]}
    done = [n for n in names if rows[n]["status"] == "succeeded"]
    skipped = [n for n in names if rows[n]["status"] == "skipped"]
    # s0 ended before the request; the batch stopped before the last server at least.
    assert done[0] == "s0" and skipped and skipped[-1] == names[-1], rows
    assert done + skipped == names  # in order: every server done or skipped, none failed
    assert all(rows[n]["reason"] == "cancelled" for n in skipped)
    assert (result["succeeded"], result["skipped"], result["failed"]) == (
        len(done), len(skipped), 0)
    assert all(progress[n] == "skipped" for n in skipped), progress

    for n, sshd in enumerate(used):
        login = ssh_login(sshd, key, tmp_path)
        if f"s{n}" in done:  # bound whole: the new key logs in
            assert login.returncode == 0 and "logged-in" in login.stdout, login.stderr
        else:  # untouched: no key file written, so no key login
            assert not sshd.authorized_keys.exists() and login.returncode != 0
        assert sshd.config.read_text() == configs[n]
    ssh_dir = used[0].user.home / ".ssh"
    assert not list(ssh_dir.glob(".dew.*")), "a temporary file was left behind"
    # Never retried (a cancelled task is final), and the cancel wrote no failure record.
    async with await Client.open(s) as client:
        again = await client.get(task.task_id)
        assert (again.status, again.attempts) == ("cancelled", 1)
        assert again.cancel_requested_by == "tester"
        assert await client.store.list_failures(task_id=task.task_id) == []
