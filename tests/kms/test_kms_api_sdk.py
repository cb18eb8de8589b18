"""The official ``huaweicloudsdkkms`` drives a real ``dew api`` over TLS, unchanged.

One API process and one worker serve the whole module (a process start costs
seconds); each test makes its own keys. Identities are made with the identity
store as ``dew iam`` makes them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from engine.crypto import HsmConfig
from engine.redis_server import RedisServer
from tests.api_process import ApiProcess, api_stack, kms_client
from tests.api_process import ApiStack as Stack
from tests.helpers import run_dew
from tests.pg_store import store_rows

pytestmark = pytest.mark.slow

kms_models = pytest.importorskip("huaweicloudsdkkms.v2")
sdk_exceptions = pytest.importorskip("huaweicloudsdkcore.exceptions.exceptions")
ClientRequestException = sdk_exceptions.ClientRequestException
m = kms_models


PLAN = {
    "admin": ("alpha", ["KMS Administrator"], ()),
    "reader": ("alpha", ["KMS CMKReadOnlyAccess"], ()),
    "fenced": ("alpha", ["KMS Administrator"], ("10.9.8.0/24",)),
    "doomed": ("alpha", ["KMS Administrator"], ()),
    "demoted": ("alpha", ["KMS Administrator"], ()),
    "other": ("beta", ["KMS Administrator"], ()),
    "grantee": ("beta", [], ()),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
          hsm_config: HsmConfig) -> Iterator[Stack]:
    with api_stack(tmp_path_factory.mktemp("api"), redis_server, hsm_config, PLAN,
                   kms_models.KmsClient) as made:
        yield made


def _alias() -> str:
    return f"api-{uuid.uuid4().hex[:10]}"


def _create(client: Any, spec: str = "AES_256", usage: str | None = None,
            origin: str | None = None) -> str:
    body = m.CreateKeyRequestBody(key_alias=_alias(), key_spec=spec, key_usage=usage,
                                  origin=origin)
    return str(client.create_key(m.CreateKeyRequest(body=body)).key_info.key_id)


def _refused(call: Any) -> Any:
    with pytest.raises(ClientRequestException) as info:
        call()
    return info.value


# --------------------------------------------------------------------------- data plane

def test_encrypt_and_decrypt_data_round_trip(stack: Stack) -> None:
    client = stack.client("admin")
    key_id = _create(client)
    enc = client.encrypt_data(m.EncryptDataRequest(body=m.EncryptDataRequestBody(
        key_id=key_id, plain_text="hello, 世界", additional_authenticated_data="ctx")))
    assert enc.key_id == key_id
    dec = client.decrypt_data(m.DecryptDataRequest(body=m.DecryptDataRequestBody(
        cipher_text=enc.cipher_text, additional_authenticated_data="ctx")))
    assert dec.plain_text == "hello, 世界"
    assert base64.b64decode(dec.plain_text_base64) == "hello, 世界".encode()
    # The wrong associated data does not decrypt, and says so in the error shape.
    error = _refused(lambda: client.decrypt_data(m.DecryptDataRequest(
        body=m.DecryptDataRequestBody(cipher_text=enc.cipher_text,
                                      additional_authenticated_data="other"))))
    assert error.status_code == 400 and error.error_code.startswith("KMS.")


def test_data_keys_in_both_hex_formats(stack: Stack) -> None:
    client = stack.client("admin")
    key_id = _create(client)
    made = client.create_datakey(m.CreateDatakeyRequest(body=m.CreateDatakeyRequestBody(
        key_id=key_id, datakey_length="256")))
    dek = bytes.fromhex(made.plain_text)
    assert len(dek) == 32
    opened = client.decrypt_datakey(m.DecryptDatakeyRequest(body=m.DecryptDatakeyRequestBody(
        key_id=key_id, cipher_text=made.cipher_text,
        datakey_cipher_length=str(len(made.cipher_text) // 2))))
    assert opened.data_key == made.plain_text
    assert opened.datakey_dgst == hashlib.sha256(dek).hexdigest()
    assert opened.datakey_length == "32"

    # EncryptDatakey takes DEK ‖ SHA-256(DEK).
    own = os.urandom(32)
    sealed = client.encrypt_datakey(m.EncryptDatakeyRequest(body=m.EncryptDatakeyRequestBody(
        key_id=key_id, plain_text=(own + hashlib.sha256(own).digest()).hex(),
        datakey_plain_length="32")))
    back = client.decrypt_datakey(m.DecryptDatakeyRequest(body=m.DecryptDatakeyRequestBody(
        key_id=key_id, cipher_text=sealed.cipher_text, datakey_cipher_length="64")))
    assert bytes.fromhex(back.data_key) == own
    bad = _refused(lambda: client.encrypt_datakey(m.EncryptDatakeyRequest(
        body=m.EncryptDatakeyRequestBody(key_id=key_id, plain_text=(own + own).hex(),
                                         datakey_plain_length="32"))))
    assert bad.status_code == 400 and "plain_text" in bad.error_msg

    without = client.create_datakey_without_plaintext(m.CreateDatakeyWithoutPlaintextRequest(
        body=m.CreateDatakeyRequestBody(key_id=key_id, key_spec="AES_128")))
    assert without.cipher_text and getattr(without, "plain_text", None) is None
    rnd = client.create_random(m.CreateRandomRequest(body=m.GenRandomRequestBody(
        random_data_length="512")))
    assert len(bytes.fromhex(rnd.random_data)) == 64


def _data_processes(pid: int) -> list[int]:
    """The API process's data processes (hsm.data_processes, auto: one in `dew api`)."""
    done = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid=,args="], capture_output=True,
                          text=True, check=False)
    return [int(line.split()[0]) for line in done.stdout.splitlines()
            if "engine.crypto._lane" in line]


def test_the_apis_data_keys_go_through_its_data_process_which_may_die(stack: Stack) -> None:
    """By default `dew api` makes the data plane's token calls in a data process of its
    own; SIGKILLed, its calls and all later ones go to the API's threads: no call
    fails, no data key is wrong."""
    client = stack.client("admin")
    key_id = _create(client)

    def round_trip() -> None:
        made = client.create_datakey(m.CreateDatakeyRequest(body=m.CreateDatakeyRequestBody(
            key_id=key_id, datakey_length="256")))
        opened = client.decrypt_datakey(m.DecryptDatakeyRequest(
            body=m.DecryptDatakeyRequestBody(key_id=key_id, cipher_text=made.cipher_text,
                                             datakey_cipher_length=str(
                                                 len(made.cipher_text) // 2))))
        assert opened.data_key == made.plain_text

    round_trip()
    assert stack.api.proc is not None
    (child,) = _data_processes(stack.api.proc.pid)
    os.kill(child, signal.SIGKILL)
    for _ in range(5):
        round_trip()
    assert _data_processes(stack.api.proc.pid) == []


def test_sign_with_kms_verify_with_cryptography(stack: Stack) -> None:
    client = stack.client("admin")
    key_id = _create(client, "EC_P256", "SIGN_VERIFY")
    message = b"signed through the SDK"
    digest = hashlib.sha256(message).digest()
    signed = client.sign(m.SignRequest(body=m.SignRequestBody(
        key_id=key_id, message=base64.b64encode(digest).decode(),
        signing_algorithm="ECDSA_SHA_256", message_type="DIGEST")))
    public = client.show_public_key(m.ShowPublicKeyRequest(
        body=m.OperateKeyRequestBody(key_id=key_id)))
    loaded = serialization.load_pem_public_key(public.public_key.encode())
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    loaded.verify(base64.b64decode(signed.signature), message, ec.ECDSA(hashes.SHA256()))
    checked = client.validate_signature(m.ValidateSignatureRequest(body=m.VerifyRequestBody(
        key_id=key_id, message=base64.b64encode(digest).decode(),
        signature=signed.signature, signing_algorithm="ECDSA_SHA_256", message_type="DIGEST")))
    assert checked.signature_valid == "true"


def test_imported_hmac_key_macs_equal_python_hmac(stack: Stack) -> None:
    client = stack.client("admin")
    key_id = _create(client, "HMAC_256", "GENERATE_VERIFY_MAC", origin="external")
    params = client.create_parameters_for_import(m.CreateParametersForImportRequest(
        body=m.GetParametersForImportRequestBody(key_id=key_id,
                                                 wrapping_algorithm="RSAES_OAEP_SHA_256")))
    wrapping = serialization.load_der_public_key(base64.b64decode(params.public_key))
    material = os.urandom(32)
    wrapped = wrapping.encrypt(material, padding.OAEP(padding.MGF1(hashes.SHA256()),  # type: ignore[union-attr]
                                                      hashes.SHA256(), None))
    client.import_key_material(m.ImportKeyMaterialRequest(body=m.ImportKeyMaterialRequestBody(
        key_id=key_id, import_token=params.import_token,
        encrypted_key_material=base64.b64encode(wrapped).decode())))
    message = b"mac me"
    mac = client.generate_mac(m.GenerateMacRequest(body=m.GenerateMacRequestBody(
        key_id=key_id, mac_algorithm="HMAC_SHA_256",
        message=base64.b64encode(message).decode())))
    assert base64.b64decode(mac.mac) == hmac.new(material, message, hashlib.sha256).digest()
    ok = client.verify_mac(m.VerifyMacRequest(body=m.VerifyMacRequestBody(
        key_id=key_id, mac_algorithm="HMAC_SHA_256", message=base64.b64encode(message).decode(),
        mac=mac.mac)))
    assert ok.mac_valid is True


def test_imported_aes_key_wrapped_with_cryptography(stack: Stack) -> None:
    client = stack.client("admin")
    key_id = _create(client, origin="external")
    detail = client.list_key_detail(m.ListKeyDetailRequest(
        body=m.OperateKeyRequestBody(key_id=key_id)))
    assert detail.key_info.key_state == "5"
    params = client.create_parameters_for_import(m.CreateParametersForImportRequest(
        body=m.GetParametersForImportRequestBody(key_id=key_id,
                                                 wrapping_algorithm="RSAES_OAEP_SHA_256")))
    wrapping = serialization.load_der_public_key(base64.b64decode(params.public_key))
    wrapped = wrapping.encrypt(os.urandom(32), padding.OAEP(  # type: ignore[union-attr]
        padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    client.import_key_material(m.ImportKeyMaterialRequest(body=m.ImportKeyMaterialRequestBody(
        key_id=key_id, import_token=params.import_token,
        encrypted_key_material=base64.b64encode(wrapped).decode())))
    enc = client.encrypt_data(m.EncryptDataRequest(body=m.EncryptDataRequestBody(
        key_id=key_id, plain_text="imported")))
    dec = client.decrypt_data(m.DecryptDataRequest(body=m.DecryptDataRequestBody(
        cipher_text=enc.cipher_text)))
    assert dec.plain_text == "imported"
    assert keywrap  # the RSA-AES wrap for asymmetric keys is tested in test_kms_import


# --------------------------------------------------------------------------- key management

def test_key_lifecycle_with_jobs_and_rotation(stack: Stack) -> None:
    client = stack.client("admin")
    key_id = _create(client)
    old = client.encrypt_data(m.EncryptDataRequest(body=m.EncryptDataRequestBody(
        key_id=key_id, plain_text="before rotation")))
    client.enable_key_rotation(m.EnableKeyRotationRequest(
        body=m.OperateKeyRequestBody(key_id=key_id)))
    client.update_key_rotation_interval(m.UpdateKeyRotationIntervalRequest(
        body=m.UpdateKeyRotationIntervalRequestBody(key_id=key_id, rotation_interval=90)))
    client.rotate_on_demand(m.RotateOnDemandRequest(
        body=m.RotateOnDemandRequestBody(key_id=key_id)))
    status = client.show_key_rotation_status(m.ShowKeyRotationStatusRequest(
        body=m.OperateKeyRequestBody(key_id=key_id)))
    assert status.key_rotation_enabled is True
    assert status.rotation_interval == 90 and status.number_of_rotations == 1
    dec = client.decrypt_data(m.DecryptDataRequest(body=m.DecryptDataRequestBody(
        cipher_text=old.cipher_text)))
    assert dec.plain_text == "before rotation"

    alias = _alias()
    client.update_key_alias(m.UpdateKeyAliasRequest(body=m.UpdateKeyAliasRequestBody(
        key_id=key_id, key_alias=alias)))
    client.update_key_description(m.UpdateKeyDescriptionRequest(
        body=m.UpdateKeyDescriptionRequestBody(key_id=key_id, key_description="for the test")))
    disabled = client.disable_key(m.DisableKeyRequest(body=m.OperateKeyRequestBody(
        key_id=key_id)))
    assert disabled.key_info.key_state == "3"
    enabled = client.enable_key(m.EnableKeyRequest(body=m.OperateKeyRequestBody(
        key_id=key_id)))
    assert enabled.key_info.key_state == "2"
    detail = client.list_key_detail(m.ListKeyDetailRequest(
        body=m.OperateKeyRequestBody(key_id=key_id))).key_info
    assert (detail.key_alias, detail.key_description) == (alias, "for the test")
    assert detail.key_rotation_enabled == "true"

    # Scheduled deletion runs as a job (the reply's X-Dew-Task-Id names it).
    deleted = client.delete_key(m.DeleteKeyRequest(body=m.ScheduleKeyDeletionRequestBody(
        key_id=key_id, pending_days="7")))
    assert deleted.key_state == "4"
    assert _succeeded_tasks(stack, "kms.schedule_key_deletion", key_id) == 1
    cancelled = client.cancel_key_deletion(m.CancelKeyDeletionRequest(
        body=m.OperateKeyRequestBody(key_id=key_id)))
    assert cancelled.key_state == "3"


def _succeeded_tasks(stack: Stack, job: str, key_id: str) -> int:
    rows = store_rows(stack.settings.store_target,
                      "SELECT args FROM tasks WHERE name = ? AND status = 'succeeded'", job)
    return sum(key_id in str(row[0]) for row in rows)


def test_list_keys_pages_over_more_than_one_page(stack: Stack) -> None:
    client = stack.client("admin")
    made = {_create(client) for _ in range(5)}
    seen: list[str] = []
    marker = None
    pages = 0
    while True:
        page = client.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody(
            limit="2", marker=marker)))
        pages += 1
        seen.extend(page.keys)
        assert len(page.key_details) == len(page.keys)
        if page.truncated != "true":
            break
        marker = page.next_marker
    assert pages >= 3
    assert made <= set(seen) and len(seen) == len(set(seen))
    assert page.total == len(seen)


def test_tags_and_quotas(stack: Stack) -> None:
    client = stack.client("admin")
    key_id = _create(client)
    client.create_kms_tag(m.CreateKmsTagRequest(key_id=key_id, body=m.CreateKmsTagRequestBody(
        tag=m.TagItem(key="team", value="payments"))))
    client.batch_create_kms_tags(m.BatchCreateKmsTagsRequest(
        key_id=key_id, body=m.BatchCreateKmsTagsRequestBody(
            tags=[m.TagItem(key="env", value="prod")], action="create")))
    shown = client.show_kms_tags(m.ShowKmsTagsRequest(key_id=key_id))
    assert {(t.key, t.value) for t in shown.tags} == {("team", "payments"), ("env", "prod")}
    found = client.list_kms_by_tags(m.ListKmsByTagsRequest(
        resource_instances="resource_instances", body=m.ListKmsByTagsRequestBody(
            action="filter", limit="10", offset="0",
            tags=[m.Tag(key="team", values=["payments"])])))
    assert key_id in {r.resource_id for r in found.resources}
    client.delete_tag(m.DeleteTagRequest(key_id=key_id, key="env"))
    assert len(client.show_kms_tags(m.ShowKmsTagsRequest(key_id=key_id)).tags) == 1
    quotas = client.show_user_quotas(m.ShowUserQuotasRequest()).quotas.resources
    cmk = next(q for q in quotas if q.type == "CMK")
    assert cmk.used >= 1 and cmk.quota >= cmk.used


# --------------------------------------------------------------------------- grants

def test_grants_allow_exactly_their_operations(stack: Stack) -> None:
    owner = stack.client("admin")
    grantee = stack.client("grantee")  # another project, no KMS role at all
    key_id = _create(owner)
    theirs = stack.identities["grantee"]
    body = m.EncryptDataRequestBody(key_id=key_id, plain_text="granted")
    assert _refused(lambda: grantee.encrypt_data(m.EncryptDataRequest(body=body))
                    ).status_code == 403
    grant = owner.create_grant(m.CreateGrantRequest(body=m.CreateGrantRequestBody(
        key_id=key_id, grantee_principal=theirs.user_id, operations=["encrypt-data"])))
    enc = grantee.encrypt_data(m.EncryptDataRequest(body=body))
    # Decrypting was not granted.
    denied = _refused(lambda: grantee.decrypt_data(m.DecryptDataRequest(
        body=m.DecryptDataRequestBody(cipher_text=enc.cipher_text))))
    assert denied.status_code == 403
    listed = owner.list_grants(m.ListGrantsRequest(body=m.ListGrantsRequestBody(key_id=key_id)))
    assert [g.grant_id for g in listed.grants] == [grant.grant_id]
    owner.cancel_grant(m.CancelGrantRequest(body=m.RevokeGrantRequestBody(
        key_id=key_id, grant_id=grant.grant_id)))
    assert _refused(lambda: grantee.encrypt_data(m.EncryptDataRequest(body=body))
                    ).status_code == 403


# --------------------------------------------------------------------------- refusals

def test_wrong_secret_key_is_401(stack: Stack) -> None:
    error = _refused(lambda: stack.client("admin", sk="x" * 40).list_keys(
        m.ListKeysRequest(body=m.ListKeysRequestBody())))
    assert (error.status_code, error.error_code) == (401, "APIGW.0301")
    assert "signature" in error.error_msg


def test_a_date_16_minutes_off_is_401(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    import huaweicloudsdkcore.signer.signer as signer

    class Skewed(datetime):
        @classmethod
        def utcnow(cls) -> Skewed:  # type: ignore[override]
            return datetime.utcnow() - timedelta(minutes=16)  # type: ignore[return-value]

    monkeypatch.setattr(signer, "datetime", Skewed)
    error = _refused(lambda: stack.client("admin").list_keys(
        m.ListKeysRequest(body=m.ListKeysRequestBody())))
    assert (error.status_code, error.error_code) == (401, "APIGW.0301")
    assert "X-Sdk-Date" in error.error_msg


def test_no_authorization_header_is_401(stack: Stack) -> None:
    ident = stack.identities["admin"]
    reply = requests.post(f"{stack.api.url}/v1.0/{ident.project_id}/kms/list-keys", json={},
                          verify=str(stack.api.ca), timeout=10)
    assert reply.status_code == 401
    assert reply.json()["error_code"] == "APIGW.0301"
    assert reply.headers["X-Request-Id"]


def test_disabled_user_and_removed_role_apply_to_the_next_call(stack: Stack) -> None:
    doomed = stack.client("doomed")
    doomed.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody()))
    assert run_dew(stack.settings, "iam", "disable-user", "doomed").returncode == 0
    error = _refused(lambda: doomed.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody())))
    assert (error.status_code, error.error_code) == (401, "APIGW.0301")

    demoted = stack.client("demoted")
    demoted.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody()))
    assert run_dew(stack.settings, "iam", "set-roles", "demoted",
                   "KMS CMKReadOnlyAccess").returncode == 0
    demoted.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody()))
    error = _refused(lambda: _create(demoted))
    assert error.status_code == 403 and "kms:cmk:create" in error.error_msg


def test_read_only_user_cannot_create_a_key(stack: Stack) -> None:
    reader = stack.client("reader")
    reader.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody()))
    before = _key_count(stack)
    error = _refused(lambda: _create(reader))
    assert error.status_code == 403 and "kms:cmk:create" in error.error_msg
    assert _key_count(stack) == before


def _key_count(stack: Stack) -> int:
    return int(str(store_rows(stack.settings.store_target,
                              "SELECT count(*) FROM kms_keys")[0][0]))


def test_another_projects_key_is_not_found_like_a_missing_one(stack: Stack) -> None:
    mine = _create(stack.client("admin"))
    other = stack.client("other")

    def describe(key_id: str) -> Any:
        return _refused(lambda: other.list_key_detail(m.ListKeyDetailRequest(
            body=m.OperateKeyRequestBody(key_id=key_id))))

    absent = str(uuid.uuid4())
    theirs, missing = describe(mine), describe(absent)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.error_code == missing.error_code
    assert theirs.error_msg.replace(mine, "KEY") == missing.error_msg.replace(absent, "KEY")


def test_source_ip_outside_the_cidrs_is_401_naming_it(stack: Stack) -> None:
    error = _refused(lambda: stack.client("fenced").list_keys(
        m.ListKeysRequest(body=m.ListKeysRequestBody())))
    assert (error.status_code, error.error_code) == (401, "APIGW.0301")
    assert "current ip:127.0.0.1 refused" in error.error_msg


def test_bad_input_is_400_naming_the_field_and_writes_nothing(stack: Stack) -> None:
    client = stack.client("admin")
    key_id = _create(client)
    error = _refused(lambda: client.delete_key(m.DeleteKeyRequest(
        body=m.ScheduleKeyDeletionRequestBody(key_id=key_id, pending_days="6"))))
    assert error.status_code == 400 and "pending_days" in error.error_msg
    detail = client.list_key_detail(m.ListKeyDetailRequest(
        body=m.OperateKeyRequestBody(key_id=key_id))).key_info
    assert detail.key_state == "2"
    error = _refused(lambda: client.create_key(m.CreateKeyRequest(
        body=m.CreateKeyRequestBody(key_alias=None))))
    assert error.status_code == 400 and "key_alias" in error.error_msg


def test_throttled_after_the_burst(stack: Stack, tmp_path: Path) -> None:
    api = ApiProcess(stack.settings, tmp_path / "api-throttled.out",
                     DEW_API_RATE_MANAGE="3/minute").start()
    try:
        ident = stack.identities["other"]
        client = kms_client(api, ident.ak, ident.sk, ident.project_id)
        codes = []
        for _ in range(6):
            try:
                client.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody()))
                codes.append(200)
            except ClientRequestException as exc:
                codes.append(exc.status_code)
                last = exc
        assert codes[:3] == [200, 200, 200] and 429 in codes
        assert last.error_code.startswith("KMS.")
    finally:
        api.stop()


def test_no_secret_key_in_clear_in_store_redis_or_logs(stack: Stack) -> None:
    stack.client("admin").list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody()))
    secrets = [i.sk.encode() for i in stack.identities.values()]
    files = [p for p in stack.settings.state_dir.rglob("*") if p.is_file()]
    files += [p for p in stack.api.log_path.parent.glob("*.out")]
    for path in files:
        data = path.read_bytes()
        for sk in secrets:
            assert sk not in data, f"a secret key in clear in {path}"
    r = redis.Redis.from_url(stack.settings.redis.url)
    for key in r.scan_iter():
        dumped = r.dump(key) or b""
        for sk in secrets:
            assert sk not in dumped and sk not in key


def test_calls_are_audited_with_the_principal(stack: Stack) -> None:
    client = stack.client("admin")
    key_id = _create(client)
    client.encrypt_data(m.EncryptDataRequest(body=m.EncryptDataRequestBody(
        key_id=key_id, plain_text="audited")))
    ident = stack.identities["admin"]
    deadline = time.monotonic() + 10
    while True:  # use entries are appended in batches
        listed = run_dew(stack.settings, "audit", "list", "--key", key_id, "--project",
                         ident.project_id, "--json")
        assert listed.returncode == 0, listed.stderr
        entries = {e["operation"]: e for e in json.loads(listed.stdout)}
        if "encrypt_data" in entries or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    actor = entries["encrypt_data"]["actor"]
    assert actor.startswith(f"api:admin@{ident.project} ak={ident.ak} ip=127.0.0.1 request=")
    assert entries["create_key"]["actor"].startswith("api:admin@")
