"""The official ``huaweicloudsdkcsms`` drives a real ``dew api`` over TLS, unchanged.

One API process and one worker serve the whole module; each test makes its own
secrets. Identities are made with the identity store as ``dew iam`` makes them.
A PostgreSQL secret rotated through RotateSecret changes the real user's password
on the private cluster of ``tests/csms/conftest.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from engine.crypto import HsmConfig
from engine.redis_server import RedisServer
from tests.api_process import ApiStack as Stack
from tests.api_process import api_stack
from tests.csms.conftest import PgCluster, pg_login
from tests.helpers import run_dew

pytestmark = pytest.mark.slow

csms_models = pytest.importorskip("huaweicloudsdkcsms.v1")
sdk_exceptions = pytest.importorskip("huaweicloudsdkcore.exceptions.exceptions")
ClientRequestException = sdk_exceptions.ClientRequestException
m = csms_models


PLAN = {
    "admin": ("alpha", ["CSMS FullAccess"], ()),
    "reader": ("alpha", ["CSMS ReadOnlyAccess"], ()),
    "other": ("beta", ["CSMS FullAccess"], ()),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
          hsm_config: HsmConfig) -> Iterator[Stack]:
    with api_stack(tmp_path_factory.mktemp("csms-api"), redis_server, hsm_config, PLAN,
                   csms_models.CsmsClient, csms={"db_timeout": 5.0}) as made:
        yield made


def _name(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _create(client: Any, name: str, value: str = "hunter2-value", **fields: Any) -> Any:
    body = m.CreateSecretRequestBody(name=name, secret_string=value, **fields)
    return client.create_secret(m.CreateSecretRequest(body=body)).secret


def _value(client: Any, name: str, version_id: str = "latest") -> Any:
    return client.show_secret_version(
        m.ShowSecretVersionRequest(secret_name=name, version_id=version_id)).version


def _refused(call: Any) -> Any:
    with pytest.raises(ClientRequestException) as info:
        call()
    return info.value


# --------------------------------------------------------------------------- secrets

def test_secret_lifecycle_through_the_sdk(stack: Stack) -> None:
    c = stack.client("admin")
    name = _name()
    secret = _create(c, name, description="db of the shop")
    assert (secret.name, secret.state, secret.secret_type) == (name, "ENABLED", "COMMON")
    assert secret.kms_key_id == "csms/default" and secret.auto_rotation is False
    assert abs(secret.create_time - time.time()) < 60  # epoch seconds

    shown = c.show_secret(m.ShowSecretRequest(secret_name=name)).secret
    assert shown.id == secret.id and shown.description == "db of the shop"

    updated = c.update_secret(m.UpdateSecretRequest(
        secret_name=name, body=m.UpdateSecretRequestBody(
            description="changed", auto_rotation=True, rotation_period="30d"))).secret
    assert (updated.description, updated.auto_rotation, updated.rotation_period) == (
        "changed", True, "30d")
    assert updated.next_rotation_time > time.time() + 29 * 86400

    v1 = _value(c, name)
    assert v1.secret_string == "hunter2-value"
    assert base64.b64decode(v1.secret_binary) == b"hunter2-value"
    assert v1.version_metadata.version_stages == ["SYSCURRENT"]

    made = c.create_secret_version(m.CreateSecretVersionRequest(
        secret_name=name, body=m.CreateSecretVersionRequestBody(
            secret_binary=base64.b64encode(b"\x00\xffbinary").decode(),
            expire_time=2_000_000_000))).version_metadata
    assert (made.id, made.version_stages, made.expire_time) == ("v2", ["SYSCURRENT"],
                                                                2_000_000_000)
    latest = _value(c, name)
    assert latest.version_metadata.id == "v2" and latest.secret_string is None
    assert base64.b64decode(latest.secret_binary) == b"\x00\xffbinary"
    assert _value(c, name, "v1").version_metadata.version_stages == ["SYSPREVIOUS"]

    # A version with its own stage leaves SYSCURRENT where it is.
    blue = c.create_secret_version(m.CreateSecretVersionRequest(
        secret_name=name, body=m.CreateSecretVersionRequestBody(
            secret_string="blue", version_stages=["BLUE"]))).version_metadata
    assert blue.version_stages == ["BLUE"]
    assert _value(c, name).version_metadata.id == "v2"

    page = c.list_secret_versions(m.ListSecretVersionsRequest(secret_name=name, limit=2))
    assert [v.id for v in page.version_metadatas] == ["v1", "v2"]
    assert page.page_info.next_marker == "v2" and page.page_info.current_count == 2
    rest = c.list_secret_versions(m.ListSecretVersionsRequest(secret_name=name, limit=2,
                                                              marker="v2"))
    assert [v.id for v in rest.version_metadatas] == ["v3"]
    assert rest.page_info.next_marker is None

    expiry = c.update_version(m.UpdateVersionRequest(
        secret_name=name, version_id="v1",
        body=m.UpdateVersionRequestBody(expire_time=1_900_000_000))).version_metadata
    assert expiry.expire_time == 1_900_000_000

    # Stages: show, move, delete.
    stage = c.update_secret_stage(m.UpdateSecretStageRequest(
        secret_name=name, stage_name="GREEN",
        body=m.UpdateSecretStageRequestBody(version_id="v1"))).stage
    assert (stage.name, stage.version_id, stage.secret_name) == ("GREEN", "v1", name)
    assert c.show_secret_stage(m.ShowSecretStageRequest(
        secret_name=name, stage_name="SYSCURRENT")).stage.version_id == "v2"
    c.delete_secret_stage(m.DeleteSecretStageRequest(secret_name=name, stage_name="GREEN"))
    gone = _refused(lambda: c.show_secret_stage(m.ShowSecretStageRequest(
        secret_name=name, stage_name="GREEN")))
    assert gone.status_code == 404 and gone.error_code == "CSMS.0404"
    protected = _refused(lambda: c.delete_secret_stage(m.DeleteSecretStageRequest(
        secret_name=name, stage_name="SYSCURRENT")))
    assert protected.status_code == 400

    # Scheduled deletion: the value cannot be read meanwhile; restore brings it back.
    doomed = c.delete_secret_for_schedule(m.DeleteSecretForScheduleRequest(
        secret_name=name, body=m.DeleteSecretForScheduleRequestBody(
            recovery_window_in_days=7))).secret
    assert doomed.state == "PENDING_DELETE"
    assert 6 * 86400 < doomed.scheduled_delete_time - time.time() <= 7 * 86400
    assert _refused(lambda: _value(c, name)).status_code == 409
    restored = c.restore_secret(m.RestoreSecretRequest(secret_name=name)).secret
    assert restored.state == "ENABLED" and restored.scheduled_delete_time is None

    reply = c.delete_secret(m.DeleteSecretRequest(secret_name=name))
    assert reply.status_code == 204
    assert _refused(lambda: c.show_secret(m.ShowSecretRequest(secret_name=name))
                    ).status_code == 404


def test_list_secrets_pages_by_name(stack: Stack) -> None:
    c = stack.client("other")  # project beta: only this test's secrets
    names = sorted(_name("page") for _ in range(3))
    for name in names:
        _create(c, name)
    first = c.list_secrets(m.ListSecretsRequest(limit=2))
    assert [s.name for s in first.secrets] == names[:2]
    assert first.page_info.next_marker == names[1] and first.page_info.current_count == 2
    second = c.list_secrets(m.ListSecretsRequest(limit=2, marker=first.page_info.next_marker))
    assert [s.name for s in second.secrets] == names[2:]
    assert second.page_info.next_marker is None
    # Another project's secrets are invisible, and answer as missing ones do.
    admin = stack.client("admin")
    assert names[0] not in [s.name for s in admin.list_secrets(m.ListSecretsRequest()).secrets]
    theirs = _refused(lambda: admin.show_secret(m.ShowSecretRequest(secret_name=names[0])))
    missing = _refused(lambda: admin.show_secret(m.ShowSecretRequest(secret_name=_name())))
    assert theirs.status_code == missing.status_code == 404


def test_tags_and_resource_instances(stack: Stack) -> None:
    c = stack.client("admin")
    name = _name("tagged")
    secret = _create(c, name)
    c.create_secret_tag(m.CreateSecretTagRequest(
        secret_id=secret.id, body=m.CreateSecretTagRequestBody(
            tag=m.TagItem(key="team", value="shop"))))
    c.batch_create_or_delete_tags(m.BatchCreateOrDeleteTagsRequest(
        secret_id=secret.id, body=m.BatchCreateOrDeleteTagsRequestBody(
            action="create", tags=[m.TagItem(key="env", value="prod"),
                                   m.TagItem(key="tmp", value="x")])))
    c.delete_secret_tag(m.DeleteSecretTagRequest(secret_id=secret.id, key="tmp"))
    tags = c.list_secret_tags(m.ListSecretTagsRequest(secret_id=secret.id)).tags
    assert {(t.key, t.value) for t in tags} == {("team", "shop"), ("env", "prod")}

    def query(action: str, **fields: Any) -> Any:
        return c.list_resource_instances(m.ListResourceInstancesRequest(
            resource_instances="resource_instances",
            body=m.ListResourceInstancesRequestBody(action=action, **fields)))

    found = query("filter", tags=[m.Tag(key="env", values=["prod"]),
                                  m.Tag(key="team", values=[])],
                  matches=[m.TagMatches(key="resource_name", value=name)])
    assert found.total_count == 1
    hit = found.resources[0]
    assert (hit.resource_id, hit.resource_name, hit.resource_detail.name) == (
        secret.id, name, name)
    assert query("count", tags=[m.Tag(key="env", values=["dev"])]).total_count == 0
    c.batch_create_or_delete_tags(m.BatchCreateOrDeleteTagsRequest(
        secret_id=secret.id, body=m.BatchCreateOrDeleteTagsRequestBody(
            action="delete", tags=[m.TagItem(key="env")])))
    assert [t.key for t in c.list_secret_tags(
        m.ListSecretTagsRequest(secret_id=secret.id)).tags] == ["team"]


def test_generate_random_password(stack: Stack) -> None:
    c = stack.client("admin")
    password = c.generate_random_password(m.GenerateRandomPasswordRequest(
        body=m.CreatePasswordRequestBody(length=40, exclude_punctuation=True,
                                         require_each_included_type=True))).password
    assert len(password) == 40 and password.isalnum()
    assert any(ch.isdigit() for ch in password) and any(ch.isupper() for ch in password)


# --------------------------------------------------------------------------- rotation

def test_postgres_secret_rotated_through_the_sdk(stack: Stack, pg_cluster: PgCluster) -> None:
    user, old = f"api_{uuid.uuid4().hex[:8]}", "initial-pw-Z9q"
    asyncio.run(pg_cluster.create_tls_only_user(user, old))
    document = pg_cluster.tls_document(user, old)
    c = stack.client("admin")
    name = _name("pg")
    secret = _create(c, name, value=json.dumps(document), secret_type="RDS-FG",
                     rotation_config=json.dumps({"InstanceId": "pg-test",
                                                 "SecretSubType": "SingleUser"}))
    assert secret.secret_type == "RDS_POSTGRESQL"
    assert json.loads(secret.rotation_config)["InstanceId"] == "pg-test"

    rotated = c.rotate_secret(m.RotateSecretRequest(secret_name=name))
    assert rotated.secret_name == name and rotated.rotation_task_id

    deadline = time.monotonic() + 45
    while True:
        tasks = c.list_secret_task(m.ListSecretTaskRequest(secret_name=name)).tasks
        assert [t.task_id for t in tasks] == [rotated.rotation_task_id]
        if tasks[0].task_status in ("SUCCESS", "FAILED"):
            break
        assert time.monotonic() < deadline, "the rotation did not end"
        time.sleep(0.2)
    assert tasks[0].task_status == "SUCCESS", tasks[0].task_error_msg

    current = _value(c, name)
    assert current.version_metadata.id == "v2"
    new_doc = json.loads(current.secret_string)
    assert new_doc["password"] != old and new_doc["tls_ca"] == document["tls_ca"]
    assert asyncio.run(pg_login(new_doc)) is True
    assert asyncio.run(pg_login(document)) is False
    assert _value(c, name, "v1").version_metadata.version_stages == ["SYSPREVIOUS"]
    assert c.show_secret(m.ShowSecretRequest(secret_name=name)).secret.rotation_time

    # No value in clear in the task row, the API's log or the engine's log.
    task_row = json.dumps([t.to_dict() for t in tasks])
    logs = [stack.tmp / "api.out", stack.tmp / "worker.out",
            *stack.settings.log_file.parent.glob("*")]
    for secret_text in (old, new_doc["password"]):
        assert secret_text not in task_row
        for path in logs:
            assert secret_text.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- refusals

def test_read_only_user_sees_metadata_but_no_value(stack: Stack) -> None:
    admin, reader = stack.client("admin"), stack.client("reader")
    name = _name("ro")
    _create(admin, name)
    assert reader.show_secret(m.ShowSecretRequest(secret_name=name)).secret.name == name
    assert [v.id for v in reader.list_secret_versions(
        m.ListSecretVersionsRequest(secret_name=name)).version_metadatas] == ["v1"]
    refused = {
        "csms:secret:getValue": lambda: _value(reader, name),
        "csms:secret:rotate": lambda: reader.rotate_secret(
            m.RotateSecretRequest(secret_name=name)),
        "csms:secret:delete": lambda: reader.delete_secret(
            m.DeleteSecretRequest(secret_name=name)),
        "csms:secret:create": lambda: _create(reader, _name()),
    }
    for action, call in refused.items():
        error = _refused(call)
        assert (error.status_code, error.error_code) == (403, "CSMS.0403")
        assert action in error.error_msg
    # Nothing happened: the secret is there, with one version, and no task.
    assert _value(admin, name).version_metadata.id == "v1"
    assert admin.list_secret_task(m.ListSecretTaskRequest(secret_name=name)).total == 0


def test_bad_input_is_400_naming_the_field_and_writes_nothing(stack: Stack) -> None:
    c = stack.client("admin")
    name = _name("bad")

    def refused(call: Any, field: str) -> None:
        error = _refused(call)
        assert (error.status_code, error.error_code) == (400, "CSMS.0400"), error.error_msg
        assert error.error_msg.startswith(field), error.error_msg

    refused(lambda: _create(c, name, value="x" * (32 * 1024 + 1)), "secret_string")
    refused(lambda: _create(c, name, value=json.dumps({"engine": "postgresql"}),
                            secret_type="RDS_POSTGRESQL"), "secret_string")
    refused(lambda: _create(c, name, secret_type="VAULT"), "secret_type")
    refused(lambda: _create(c, name, auto_rotation=True, rotation_period="2h"),
            "rotation_period")
    assert _refused(lambda: c.show_secret(m.ShowSecretRequest(secret_name=name))
                    ).status_code == 404

    _create(c, name)

    def version(**fields: Any) -> Any:
        return c.create_secret_version(m.CreateSecretVersionRequest(
            secret_name=name, body=m.CreateSecretVersionRequestBody(**fields)))

    refused(lambda: version(secret_string="v", version_stages=["S" * 65]), "version_stages")
    refused(lambda: version(secret_string="v", version_stages=[f"S{i}" for i in range(13)]),
            "version_stages")
    refused(lambda: version(secret_string="v", secret_binary="dg=="), "secret_string")
    refused(lambda: c.update_secret_stage(m.UpdateSecretStageRequest(
        secret_name=name, stage_name="S" * 65,
        body=m.UpdateSecretStageRequestBody(version_id="v1"))), "stage_name")
    for days in (6, 31):
        refused(lambda days=days: c.delete_secret_for_schedule(
            m.DeleteSecretForScheduleRequest(secret_name=name,
                                             body=m.DeleteSecretForScheduleRequestBody(
                                                 recovery_window_in_days=days))),
                "recovery_window_in_days")
    refused(lambda: c.list_secrets(m.ListSecretsRequest(limit="lots")), "limit")
    shown = c.show_secret(m.ShowSecretRequest(secret_name=name)).secret
    assert shown.state == "ENABLED"
    versions = c.list_secret_versions(m.ListSecretVersionsRequest(secret_name=name))
    assert [v.id for v in versions.version_metadatas] == ["v1"]
    # A taken name is a conflict.
    assert _refused(lambda: _create(c, name)).status_code == 409


def test_a_value_read_through_the_api_is_audited_with_the_caller(stack: Stack) -> None:
    """ShowSecretVersion with a value: `dew audit list --secret NAME` names the API
    caller (user, project, access key, request id) and the version; a refused read
    (the read-only user: 403 before any value is touched) is not a read."""
    admin = stack.client("admin")
    name = _name("audited")
    _create(admin, name)
    assert _value(admin, name).secret_string == "hunter2-value"
    assert _refused(lambda: _value(admin, name, "v7")).status_code == 404
    _refused(lambda: _value(stack.client("reader"), name))
    done = run_dew(stack.settings, "audit", "list", "--secret", name, "--json")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)
    ident = stack.identities["admin"]
    assert [(e["operation"], e["outcome"], e["detail"].get("version")) for e in entries] == [
        ("csms.get_value", "success", "v1"), ("csms.get_value", "failure", "v7")]
    for entry in entries:
        assert entry["actor"].startswith(f"api:{ident.user}@{ident.project} ak={ident.ak}")
        assert " request=" in entry["actor"], entry
        assert entry["detail"]["secret"] == name and entry["account"] == ident.project
    mine = run_dew(stack.settings, "audit", "list", "--secret", name, "--actor",
                   f"api:{ident.user}@", "--outcome", "success", "--json")
    assert [e["detail"]["version"] for e in json.loads(mine.stdout)] == ["v1"]
