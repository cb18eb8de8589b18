"""The official ``huaweicloudsdkkps`` drives a real ``dew api`` over TLS, unchanged, and
the key pairs it binds are proven on real sshd with the real OpenSSH client.

One API process and one worker serve the whole module; each test makes its own key
pairs and servers. Identities are made with the identity store as ``dew iam`` does.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.crypto import HsmConfig
from engine.redis_server import RedisServer
from tests.api_process import ApiStack as Stack
from tests.api_process import api_stack
from tests.csms.store_helpers import stored_bytes
from tests.helpers import run_dew
from tests.kps.conftest import KPS_TEST_SETTINGS, Sshd, ssh_login, ssh_password_probe
from tests.kps.sshd_servers import free_ports

pytestmark = pytest.mark.slow

m = pytest.importorskip("huaweicloudsdkkps.v3")
sdk_exceptions = pytest.importorskip("huaweicloudsdkcore.exceptions.exceptions")
ClientRequestException = sdk_exceptions.ClientRequestException

PORT_FAILURE = "SSH connection failure. Check your port."


PLAN = {
    "admin": ("kalpha", ["DEW KeypairFullAccess"], ()),
    "reader": ("kalpha", ["DEW KeypairReadOnlyAccess"], ()),
    "other": ("kbeta", ["DEW KeypairFullAccess"], ()),
    "operator": ("kalpha", ["DEW KeypairFullAccess", "DEW TaskOperator"], ()),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
          hsm_config: HsmConfig) -> Iterator[Stack]:
    with api_stack(tmp_path_factory.mktemp("kpsapi"), redis_server, hsm_config, PLAN,
                   m.KpsClient, kps=KPS_TEST_SETTINGS) as made:
        yield made


def _name(prefix: str = "kp") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _refused(call: Callable[[], Any]) -> Any:
    with pytest.raises(ClientRequestException) as info:
        call()
    return info.value


def _create(client: Any, name: str, managed: bool = True) -> Any:
    protection = m.KeyProtection(encryption=m.Encryption(type="default")) if managed else None
    action = m.CreateKeypairAction(name=name, key_protection=protection)
    body = m.CreateKeypairRequestBody(keypair=action)
    return client.create_keypair(m.CreateKeypairRequest(body=body)).keypair


def _add_server(stack: Stack, sshd: Sshd, who: str = "admin", port: int | None = None
                ) -> dict[str, Any]:
    reply = stack.raw(who, "POST", "/dew/servers", {"server": {
        "name": _name("srv"), "host": "127.0.0.1", "port": port or sshd.port,
        "user": sshd.user.name, "host_key": sshd.host_key_pub.read_text(),
        "sshd_config": str(sshd.config), "reload_command": sshd.reload_command,
        "authorized_keys": sshd.authorized_keys_setting}})
    assert reply.status_code == 201, reply.body
    server: dict[str, Any] = reply.json()["server"]
    return server


def _server_info(server_id: str, password: str | None = None, private_key: str | None = None,
                 disable_password: bool | None = None) -> Any:
    auth = None
    if password is not None:
        auth = m.Auth(type="password", key=password)
    elif private_key is not None:
        auth = m.Auth(type="keypair", key=private_key)
    return m.EcsServerInfo(id=server_id, auth=auth, disable_password=disable_password)


def _wait_task(client: Any, task_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.list_keypair_task(m.ListKeypairTaskRequest(task_id=task_id))
                     .task_status)
        if status.startswith(("SUCCESS", "FAILED")) or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def _fingerprint(private_key: str) -> str:
    from handlers.kps.keys import load_private_key, public_key_of

    return public_key_of(load_private_key(private_key.encode()).key).fingerprint


def _private_file(tmp: Path, text: str) -> Path:
    path = tmp / _name("key")
    path.write_text(text)
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- key pairs


def test_keypair_lifecycle_through_the_sdk(stack: Stack) -> None:
    admin = stack.client("admin")
    name = _name()
    created = _create(admin, name)
    assert created.name == name and created.private_key.startswith("-----BEGIN OPENSSH")
    assert created.user_id == stack.identities["admin"].user_id
    assert created.public_key.startswith("ssh-rsa ") and created.fingerprint

    listed = admin.list_keypairs(m.ListKeypairsRequest(limit=1000)).keypairs
    mine = [k.keypair for k in listed if k.keypair.name == name]
    assert len(mine) == 1 and mine[0].is_key_protection is True and mine[0].scope == "user"

    body = m.UpdateKeypairDescriptionRequestBody(
        keypair=m.UpdateKeypairDescriptionReq(description="web servers"))
    admin.update_keypair_description(
        m.UpdateKeypairDescriptionRequest(keypair_name=name, body=body))
    detail = admin.list_keypair_detail(m.ListKeypairDetailRequest(keypair_name=name)).keypair
    assert detail.description == "web servers" and detail.algorithm == "SSH_RSA_2048"
    assert detail.is_key_protection is True and detail.key_id == "kps/default"
    assert detail.create_time > 1_700_000_000_000

    export = m.ExportPrivateKeyRequestBody(keypair=m.KeypairBean(name=name))
    exported = admin.export_private_key(m.ExportPrivateKeyRequest(body=export)).keypair
    assert exported.private_key.strip() == created.private_key.strip()
    batch = admin.batch_export_private_key(m.BatchExportPrivateKeyRequest(
        body=[m.Keypairs(keypair=m.Keypair(name=name))]))
    assert json.loads(batch.body)["keypairs"][0]["private_key"].strip() == \
        created.private_key.strip()

    admin.clear_private_key(m.ClearPrivateKeyRequest(keypair_name=name))
    error = _refused(lambda: admin.export_private_key(m.ExportPrivateKeyRequest(body=export)))
    assert error.status_code == 409 and error.error_code == "KPS.0409"

    protection = m.ImportPrivateKeyProtection(private_key=created.private_key,
                                              encryption=m.Encryption(type="default"))
    imported = admin.import_private_key(m.ImportPrivateKeyRequest(
        body=m.ImportPrivateKeyRequestBody(keypair=m.ImportPrivateKeyKeypairBean(
            name=name, key_protection=protection))))
    assert imported.keypair.name == name
    again = admin.export_private_key(m.ExportPrivateKeyRequest(body=export)).keypair
    assert _fingerprint(again.private_key) == created.fingerprint

    # Another pair's private key is refused with the product's message.
    other = _create(admin, _name(), managed=False)
    wrong = m.ImportPrivateKeyProtection(private_key=other.private_key,
                                         encryption=m.Encryption(type="default"))
    error = _refused(lambda: admin.import_private_key(m.ImportPrivateKeyRequest(
        body=m.ImportPrivateKeyRequestBody(keypair=m.ImportPrivateKeyKeypairBean(
            name=name, key_protection=wrong)))))
    assert error.status_code == 400
    assert error.error_msg.startswith("The imported private key does not match the public key.")

    # Import a public key, and a batch with one bad type.
    pub_name = _name()
    action = m.CreateKeypairAction(name=pub_name, public_key=other.public_key, scope="domain")
    imported_pub = admin.create_keypair(m.CreateKeypairRequest(
        body=m.CreateKeypairRequestBody(keypair=action))).keypair
    assert imported_pub.private_key is None and imported_pub.fingerprint == other.fingerprint
    good, bad = _name(), _name()
    result = admin.batch_import_keypair(m.BatchImportKeypairRequest(body=[
        m.CreateKeypairRequestBody(keypair=m.CreateKeypairAction(
            name=good, public_key=other.public_key)),
        m.CreateKeypairRequestBody(keypair=m.CreateKeypairAction(
            name=bad, type="pgp", public_key=other.public_key)),
    ]))
    assert [s.keypair.name for s in result.succeeded_keypairs] == [good]
    assert result.failed_keypairs[0].keypair_name == bad
    assert result.failed_keypairs[0].failed_reason.startswith("Invalid key pair type.")

    # Another project sees nothing; the read-only user reads but cannot change.
    error = _refused(lambda: stack.client("other").list_keypair_detail(
        m.ListKeypairDetailRequest(keypair_name=name)))
    assert error.status_code == 404 and error.error_code == "KPS.0404"
    reader = stack.client("reader")
    assert any(k.keypair.name == pub_name
               for k in reader.list_keypairs(m.ListKeypairsRequest()).keypairs)
    error = _refused(lambda: reader.delete_keypair(m.DeleteKeypairRequest(keypair_name=pub_name)))
    assert error.status_code == 403 and "kps:keypair:delete" in error.error_msg

    for each in (name, other.name, pub_name, good):
        admin.delete_keypair(m.DeleteKeypairRequest(keypair_name=each))
    error = _refused(lambda: admin.list_keypair_detail(
        m.ListKeypairDetailRequest(keypair_name=name)))
    assert error.status_code == 404


def test_servers_registry_extension(stack: Stack, sshd_pool: list[Sshd]) -> None:
    server = _add_server(stack, sshd_pool[0])
    listed = stack.raw("admin", "GET", "/dew/servers").json()["servers"]
    assert server["id"] in {s["id"] for s in listed}
    assert stack.raw("other", "GET", f"/dew/servers/{server['id']}").status_code == 404
    shown = stack.raw("reader", "GET", f"/dew/servers/{server['name']}").json()["server"]
    assert shown["host_key_pinned"] is True and shown["keypairs"] == []
    refused = stack.raw("reader", "DELETE", f"/dew/servers/{server['id']}")
    assert refused.status_code == 403
    assert stack.raw("admin", "DELETE", f"/dew/servers/{server['id']}").status_code == 204
    assert stack.raw("admin", "GET", f"/dew/servers/{server['id']}").status_code == 404


# --------------------------------------------------------------------------- bind / unbind


def test_associate_disables_password_then_disassociate(
    stack: Stack, sshd_pool: list[Sshd], tmp_path: Path
) -> None:
    sshd = sshd_pool[1]
    sshd.reset()
    admin = stack.client("admin")
    name = _name()
    created = _create(admin, name)
    key = _private_file(tmp_path, created.private_key)
    server = _add_server(stack, sshd)
    assert ssh_login(sshd, key, tmp_path).returncode != 0

    body = m.AssociateKeypairRequestBody(
        keypair_name=name,
        server=_server_info(server["id"], password=sshd.user.password, disable_password=True))
    reply = admin.associate_keypair(m.AssociateKeypairRequest(body=body))
    assert reply.server_id == server["id"] and reply.task_id
    assert reply.status in ("READY_RESET", "RUNNING_RESET", "SUCCESS_RESET")
    assert _wait_task(admin, reply.task_id) == "SUCCESS_RESET"

    assert ssh_login(sshd, key, tmp_path).returncode == 0
    probe = ssh_password_probe(sshd, tmp_path)
    assert "Permission denied (publickey)" in probe.stderr, probe.stderr
    # The password never reached the task store in clear.
    tasks = run_dew(stack.settings, "tasks", "show", reply.task_id, "--json")
    assert sshd.user.password not in tasks.stdout
    assert sshd.user.password.encode() not in stored_bytes(stack.settings.store_target)
    # A bound key pair cannot be deleted.
    error = _refused(lambda: admin.delete_keypair(m.DeleteKeypairRequest(keypair_name=name)))
    assert error.status_code == 409

    # Disassociate with auth type password: the managed key logs in, password login
    # comes back on before the key goes.
    reply = admin.disassociate_keypair(m.DisassociateKeypairRequest(
        body=m.DisassociateKeypairRequestBody(server=m.DisassociateEcsServerInfo(
            id=server["id"], auth=m.Auth(type="password", key=sshd.user.password)))))
    assert _wait_task(admin, reply.task_id) == "SUCCESS_UNBIND"
    assert ssh_login(sshd, key, tmp_path).returncode != 0
    probe = ssh_password_probe(sshd, tmp_path)
    assert "Permission denied (publickey,password)" in probe.stderr, probe.stderr
    admin.delete_keypair(m.DeleteKeypairRequest(keypair_name=name))


def test_failed_bind_is_listed_and_deleted(stack: Stack, sshd_pool: list[Sshd]) -> None:
    admin = stack.client("admin")
    name = _name()
    _create(admin, name)
    closed = free_ports(1)[0]  # nothing listens there
    server = _add_server(stack, sshd_pool[2], port=closed)
    body = m.AssociateKeypairRequestBody(
        keypair_name=name, server=_server_info(server["id"], password="whatever"))
    reply = admin.associate_keypair(m.AssociateKeypairRequest(body=body))
    assert _wait_task(admin, reply.task_id) == "FAILED_RESET"

    failed = admin.list_failed_task(m.ListFailedTaskRequest(limit=100))
    rows = [t for t in failed.tasks if t.task_id == reply.task_id]
    assert len(rows) == 1, failed
    row = rows[0]
    assert row.task_error_msg == PORT_FAILURE
    assert row.operate_type == "FAILED_RESET" and row.keypair_name == name
    assert row.server_id == server["id"] and row.server_name == server["name"]
    assert int(row.task_time) > 1_700_000_000_000
    # Another project does not see it; the read-only user does, but cannot delete it.
    other = stack.client("other").list_failed_task(m.ListFailedTaskRequest())
    assert reply.task_id not in {t.task_id for t in other.tasks or []}
    error = _refused(lambda: stack.client("reader").delete_failed_task(
        m.DeleteFailedTaskRequest(task_id=reply.task_id)))
    assert error.status_code == 403

    admin.delete_failed_task(m.DeleteFailedTaskRequest(task_id=reply.task_id))
    after = admin.list_failed_task(m.ListFailedTaskRequest())
    assert reply.task_id not in {t.task_id for t in after.tasks or []}
    error = _refused(lambda: admin.delete_failed_task(
        m.DeleteFailedTaskRequest(task_id=reply.task_id)))
    assert error.status_code == 404
    admin.delete_all_failed_task(m.DeleteAllFailedTaskRequest())
    assert admin.list_failed_task(m.ListFailedTaskRequest()).total == 0
    running = admin.list_running_task(m.ListRunningTaskRequest())
    assert running.total == 0 and running.tasks == []


def test_batch_associate_and_read_only_user(
    stack: Stack, sshd_pool: list[Sshd], tmp_path: Path
) -> None:
    sshds = sshd_pool[3:6]
    for sshd in sshds:
        sshd.reset()
    admin = stack.client("admin")
    name = _name()
    created = _create(admin, name)
    key = _private_file(tmp_path, created.private_key)
    servers = [_add_server(stack, sshd) for sshd in sshds]
    items = [m.AssociateKeypairRequestBody(
        keypair_name=name, server=_server_info(s["id"], password=sshd.user.password))
        for s, sshd in zip(servers, sshds, strict=True)]

    # The read-only user may not bind (403), nor register servers.
    reader = stack.client("reader")
    error = _refused(lambda: reader.associate_keypair(m.AssociateKeypairRequest(body=items[0])))
    assert error.status_code == 403 and "kps:keypair:associate" in error.error_msg
    refused = stack.raw("reader", "POST", "/dew/servers", {"server": {"name": "x"}})
    assert refused.status_code == 403

    # A batch naming two key pairs is refused with the product's message.
    mixed = [items[0], m.AssociateKeypairRequestBody(
        keypair_name=_name(), server=_server_info(servers[1]["id"], password="x"))]
    error = _refused(lambda: admin.batch_associate_keypair(m.BatchAssociateKeypairRequest(
        body=m.BatchAssociateKeypairRequestBody(batch_keypairs=mixed))))
    assert error.status_code == 400
    assert error.error_msg.startswith("Key pairs to be bound in batches are inconsistent.")

    reply = admin.batch_associate_keypair(m.BatchAssociateKeypairRequest(
        body=m.BatchAssociateKeypairRequestBody(batch_keypairs=items)))
    assert [t.server_id for t in reply.tasks] == [s["id"] for s in servers]
    assert len({t.task_id for t in reply.tasks}) == 3
    for task in reply.tasks:
        assert _wait_task(admin, task.task_id) == "SUCCESS_RESET"
    for sshd in sshds:
        assert ssh_login(sshd, key, tmp_path).returncode == 0
    shown = stack.raw("admin", "GET", f"/dew/servers/{servers[0]['id']}").json()["server"]
    assert shown["keypairs"] == [name]

    # Disassociate with the pair's private key given (auth type keypair).
    for server in servers:
        reply1 = admin.disassociate_keypair(m.DisassociateKeypairRequest(
            body=m.DisassociateKeypairRequestBody(server=m.DisassociateEcsServerInfo(
                id=server["id"], auth=m.Auth(type="keypair", key=created.private_key)))))
        assert _wait_task(admin, reply1.task_id) == "SUCCESS_UNBIND"
    for sshd in sshds:
        assert ssh_login(sshd, key, tmp_path).returncode != 0


def test_a_failed_bind_succeeds_when_retried_once_sshd_listens(
    stack: Stack, sshd_pool: list[Sshd], tmp_path: Path
) -> None:
    """The product's failed-task report, then the fix: the server's sshd was down; it
    is started on that port and the failed bind is retried (the engine's retry: a new
    task with the sealed password carried over)."""
    sshd = sshd_pool[6]
    sshd.reset()
    admin = stack.client("admin")
    name = _name()
    key = _private_file(tmp_path, _create(admin, name).private_key)
    server = _add_server(stack, sshd)
    sshd.stop()  # nothing listens on its port now
    body = m.AssociateKeypairRequestBody(
        keypair_name=name, server=_server_info(server["id"], password=sshd.user.password))
    failed = admin.associate_keypair(m.AssociateKeypairRequest(body=body)).task_id
    assert _wait_task(admin, failed) == "FAILED_RESET"

    since = sshd.log_size()
    sshd.start()
    sshd.wait_listening(since)
    engine = "/v1/{project_id}/dew"
    retried = stack.raw("operator", "POST", f"/tasks/{failed}/retry", prefix=engine)
    assert retried.status_code == 202, retried.body
    again = retried.json()["task_id"]
    assert _wait_task(admin, again) == "SUCCESS_RESET"
    assert ssh_login(sshd, key, tmp_path).returncode == 0
    report = stack.raw("operator", "GET", "/failures", prefix=engine).json()["failures"]
    # The server's record, and the task-level one of a bind whose every server failed
    # (the task is `failed`): both taken over by the retry.
    records = [f for f in report if f["task_id"] == failed]
    assert sorted(str(f["target"]) for f in records) == sorted(["None", server["name"]])
    assert {f["retried_by"].split()[0] for f in records} == {
        f"api:operator@{stack.identities['operator'].project}"}

    # A task that did not fail is not retried: the message says why.
    refused = stack.raw("operator", "POST", f"/tasks/{again}/retry", prefix=engine)
    assert refused.status_code == 409 and "not failed" in refused.body["error_msg"]
