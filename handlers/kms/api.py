"""The KMS over HTTPS: the operations of ``huaweicloudsdkkms.v2`` (HUAWEI_API.md §7.1).

Each handler reads the SDK's fields, calls the same ``KmsService`` method the
CLI calls, and answers in the SDK's shapes (``api_views``); nothing else.
Grants are authorization: an operation a grant may allow (``GRANTABLE``) runs
for a caller whose roles lack the action when an active grant on that key names
the caller (its user or its project) and includes the operation; the key's own
project is then the account.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from engine.api import fields as f
from engine.api.jobs import task_result
from engine.api.operations import CRYPTO, MANAGE, Call, Operation, Reply
from engine.errors import DewError, InvalidInput, PermissionDenied
from handlers.kms.api_views import (
    aad_context,
    b64,
    from_base64,
    from_hex,
    key_details,
    millis,
    pem_body,
    seconds,
    split_datakey,
    state_code,
    state_of_code,
)
from handlers.kms.errors import UnknownKey
from handlers.kms.format import CipherHeader, Purpose, is_key_id, unpack_ciphertext
from handlers.kms.service import KmsService
from handlers.kms.store import AuditFilter

ERROR_PREFIX = "KMS"
PREFIX = "/v1.0/{project_id}/kms"
T = TypeVar("T")

# Data key lengths by CreateDatakey's key_spec (datakey_length, in bits, wins).
DATAKEY_SPECS = {"AES_256": 256, "AES_128": 128}
GRANT_OPERATIONS = ("create-datakey", "create-datakey-without-plaintext", "encrypt-datakey",
                    "decrypt-datakey", "describe-key", "create-grant", "retire-grant",
                    "encrypt-data", "decrypt-data")


async def _kms(call: Call) -> KmsService:
    kms: KmsService = await call.resources.get("kms")
    return kms


def _actor(call: Call) -> str:
    return f"{call.principal.actor} request={call.request_id}"


def _body(call: Call) -> Mapping[str, Any]:
    return f.body_object(call.body)


def _key_id(data: Mapping[str, Any]) -> str:
    return f.required_text(data, "key_id", max_len=255)


async def _as_caller_or_grantee(
    call: Call, action: str, grant_op: str, key_ref: str | None,
    run: Callable[[str], Awaitable[T]],
) -> T:
    """``run(account)`` for the caller's project when a role allows ``action``; else,
    or when the key is not the project's, for the key's project if a grant allows it."""
    allowed = call.principal.allows(action)
    if allowed:
        try:
            return await run(call.account)
        except UnknownKey:
            if key_ref is None or not is_key_id(key_ref):
                raise
            granted = await _granted_account(call, key_ref, grant_op)
            if granted is None or granted == call.account:
                raise
            return await run(granted)
    granted = None
    if key_ref is not None and is_key_id(key_ref):
        granted = await _granted_account(call, key_ref, grant_op)
    if granted is None:
        raise PermissionDenied(f"user {call.principal.user} is not allowed to do {action}",
                               target=action)
    return await run(granted)


async def _granted_account(call: Call, key_id: str, grant_op: str) -> str | None:
    kms = await _kms(call)
    account: str | None = await kms.grant_account(
        key_id, grant_op, user_id=call.principal.user_id, project_id=call.principal.project_id)
    return account


def _ciphertext_key(blob: bytes, purpose: Purpose) -> str | None:
    try:
        header: CipherHeader = unpack_ciphertext(blob, purpose)[0]
    except DewError:
        return None  # the service reports the damage with the right words
    return header.key_id


# --------------------------------------------------------------------------- keys

async def create_key(call: Call) -> Any:
    data = _body(call)
    alias = f.required_text(data, "key_alias", max_len=255)
    spec = f.text(data, "key_spec", required=False, default="AES_256")
    usage = f.text(data, "key_usage", required=False)
    description = f.text(data, "key_description", required=False, default="")
    origin = f.text(data, "origin", required=False, default="kms", choices=("kms", "external"))
    keystore = f.text(data, "keystore_id", required=False)
    if keystore not in (None, "", "0"):
        raise InvalidInput("keystore_id: only the default key store (0) exists here",
                           target="keystore_id")
    kms = await _kms(call)
    key = await kms.create_key(alias, spec or "AES_256", usage, description or "",
                               account=call.account, actor=_actor(call), origin=origin or "kms")
    return {"key_info": {"key_id": key.key_id, "domain_id": call.principal.project_id,
                         "region_id": "local"}}


async def describe_key(call: Call) -> Any:
    key_ref = _key_id(_body(call))
    kms = await _kms(call)

    async def run(account: str) -> Any:
        key = await kms.describe_key(key_ref, account=account, actor=_actor(call))
        rotation = await kms.get_key_rotation_status(key.key_id, account=account,
                                                     actor=_actor(call))
        return {"key_info": key_details(key, call.principal.project_id,
                                        rotation_enabled=rotation.enabled)}

    return await _as_caller_or_grantee(call, "kms:cmk:get", "describe-key", key_ref, run)


async def list_keys(call: Call) -> Any:
    data = _body(call)
    limit = f.integer(data, "limit", required=False, default=1000, low=1, high=1000)
    marker = f.text(data, "marker", required=False, max_len=64)
    state_filter = f.text(data, "key_state", required=False)
    spec = f.text(data, "key_spec", required=False)
    state = state_of_code(state_filter) if state_filter else None
    kms = await _kms(call)
    if state_filter == "1":
        keys, next_marker, total = [], None, 0
    else:
        page = await kms.list_keys_page(account=call.account, actor=_actor(call), state=state,
                                        key_spec=None if spec in (None, "ALL") else spec,
                                        limit=limit or 1000, marker=marker or None)
        keys, next_marker, total = page.keys, page.next_marker, page.total
    return {
        "keys": [k.key_id for k in keys],
        "key_details": [key_details(k, call.principal.project_id) for k in keys],
        "next_marker": next_marker or "",
        "truncated": "true" if next_marker else "false",
        "total": total,
    }


def _key_info_state(change: Any) -> Any:
    return {"key_info": {"key_id": change.key.key_id,
                         "key_state": state_code(change.key.key_state)}}


async def enable_key(call: Call) -> Any:
    kms = await _kms(call)
    change = await kms.enable_key(_key_id(_body(call)), account=call.account, actor=_actor(call))
    return _key_info_state(change)


async def disable_key(call: Call) -> Any:
    kms = await _kms(call)
    change = await kms.disable_key(_key_id(_body(call)), account=call.account,
                                   actor=_actor(call))
    return _key_info_state(change)


async def _run_job(call: Call, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run a KMS job for the caller's project and wait for it (``[api] job_wait``; the
    runner sends its task id in ``X-Dew-Task-Id``); its error is this request's."""
    kms = await _kms(call)
    # Unknown keys answer at once; bad input is refused at enqueue; state conflicts
    # come from the job.
    await kms.describe_key(args["key"], account=call.account, actor=_actor(call))
    task = await call.jobs.run(name, {**args, "account": call.account})
    return dict(task_result(task) or {})


async def _deletion_job(call: Call, name: str, args: dict[str, Any]) -> Any:
    result = await _run_job(call, name, args)
    return {"key_id": result.get("key_id", args["key"]),
            "key_state": state_code(str(result.get("key_state", "")))}


async def schedule_key_deletion(call: Call) -> Any:
    data = _body(call)
    key = _key_id(data)
    days = f.required_integer(data, "pending_days", low=7, high=1096)
    return await _deletion_job(call, "kms.schedule_key_deletion",
                               {"key": key, "pending_days": days})


async def cancel_key_deletion(call: Call) -> Any:
    return await _deletion_job(call, "kms.cancel_key_deletion", {"key": _key_id(_body(call))})


async def update_key_alias(call: Call) -> Any:
    data = _body(call)
    kms = await _kms(call)
    key = await kms.update_key_alias(_key_id(data), f.required_text(data, "key_alias"),
                                     account=call.account, actor=_actor(call))
    return {"key_info": {"key_id": key.key_id, "key_alias": key.key_alias}}


async def update_key_description(call: Call) -> Any:
    data = _body(call)
    kms = await _kms(call)
    key = await kms.update_key_description(
        _key_id(data), f.required_text(data, "key_description"), account=call.account,
        actor=_actor(call))
    return {"key_info": {"key_id": key.key_id, "key_description": key.description}}


# --------------------------------------------------------------------------- data keys

def _datakey_bits(data: Mapping[str, Any]) -> int:
    length = f.integer(data, "datakey_length", required=False, low=8, high=8192)
    if length is not None:
        return length
    spec = f.text(data, "key_spec", required=False, default="AES_256",
                  choices=tuple(DATAKEY_SPECS))
    return DATAKEY_SPECS[spec or "AES_256"]


def _refuse_pin(data: Mapping[str, Any]) -> None:
    if data.get("pin") not in (None, ""):
        raise InvalidInput("pin: PIN-protected data keys are not supported here", target="pin")


async def create_datakey(call: Call, *, plaintext: bool = True) -> Any:
    data = _body(call)
    key_ref = _key_id(data)
    bits = _datakey_bits(data)
    _refuse_pin(data)
    context = aad_context(f.text(data, "additional_authenticated_data", required=False))
    kms = await _kms(call)
    make = kms.create_datakey if plaintext else kms.create_datakey_without_plaintext
    operation = "create-datakey" if plaintext else "create-datakey-without-plaintext"

    async def run(account: str) -> Any:
        return await make(key_ref, bits, account=account, actor=_actor(call),
                          encryption_context=context)

    result = await _as_caller_or_grantee(call, "kms:dek:crypto", operation, key_ref, run)
    out = {"key_id": result.key_id, "cipher_text": result.cipher_text.hex()}
    if plaintext:
        out["plain_text"] = result.plain_text.hex()
    return out


async def create_datakey_without_plaintext(call: Call) -> Any:
    return await create_datakey(call, plaintext=False)


async def encrypt_datakey(call: Call) -> Any:
    data = _body(call)
    key_ref = _key_id(data)
    length = f.required_integer(data, "datakey_plain_length", low=1, high=1024)
    dek = split_datakey(f.required_text(data, "plain_text"), length)
    _refuse_pin(data)
    context = aad_context(f.text(data, "additional_authenticated_data", required=False))
    kms = await _kms(call)

    async def run(account: str) -> Any:
        return await kms.encrypt_datakey(key_ref, dek, account=account, actor=_actor(call),
                                         encryption_context=context)

    result = await _as_caller_or_grantee(call, "kms:dek:crypto", "encrypt-datakey", key_ref, run)
    return {"key_id": result.key_id, "cipher_text": result.cipher_text.hex(),
            "datakey_length": str(len(dek))}


async def decrypt_datakey(call: Call) -> Any:
    data = _body(call)
    key_ref = _key_id(data)
    blob = from_hex("cipher_text", f.required_text(data, "cipher_text"))
    # The SDK requires it; our ciphertexts carry their own length, so any value is taken.
    f.required_integer(data, "datakey_cipher_length", low=1, high=65536)
    context = aad_context(f.text(data, "additional_authenticated_data", required=False))
    kms = await _kms(call)

    async def run(account: str) -> Any:
        return await kms.decrypt_datakey(key_ref, blob, account=account, actor=_actor(call),
                                         encryption_context=context)

    result = await _as_caller_or_grantee(call, "kms:dek:crypto", "decrypt-datakey", key_ref, run)
    dek: bytes = result.plain_text
    return {"data_key": dek.hex(), "datakey_length": str(len(dek)),
            "datakey_dgst": hashlib.sha256(dek).hexdigest()}


# --------------------------------------------------------------------------- encrypt-data

async def encrypt_data(call: Call) -> Any:
    data = _body(call)
    key_ref = _key_id(data)
    plain = f.required_text(data, "plain_text").encode("utf-8")
    algorithm = f.text(data, "encryption_algorithm", required=False,
                       default="SYMMETRIC_DEFAULT",
                       choices=("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_256", "RSAES_OAEP_SHA_1"))
    context = aad_context(f.text(data, "additional_authenticated_data", required=False))
    kms = await _kms(call)

    async def run(account: str) -> Any:
        if algorithm == "SYMMETRIC_DEFAULT":
            result = await kms.encrypt_data(key_ref, plain, account=account,
                                            actor=_actor(call), encryption_context=context)
            return {"key_id": result.key_id, "cipher_text": result.cipher_text_base64}
        # Public-key encryption needs no secret: done here with the key's public half.
        public = await kms.get_public_key(key_ref, account=account, actor=_actor(call))
        loaded = serialization.load_pem_public_key(public.public_key_pem.encode("ascii"))
        if not isinstance(loaded, rsa.RSAPublicKey) or public.key_usage != "ENCRYPT_DECRYPT":
            raise InvalidInput(f"encryption_algorithm: {algorithm} needs an RSA key for "
                               "ENCRYPT_DECRYPT", target="encryption_algorithm")
        digest = hashes.SHA256() if algorithm == "RSAES_OAEP_SHA_256" else hashes.SHA1()
        sealed = loaded.encrypt(plain, padding.OAEP(padding.MGF1(digest), digest, None))
        return {"key_id": public.key_id, "cipher_text": b64(sealed)}

    return await _as_caller_or_grantee(call, "kms:cmk:crypto", "encrypt-data", key_ref, run)


async def decrypt_data(call: Call) -> Any:
    data = _body(call)
    cipher = f.required_text(data, "cipher_text")
    key_ref = f.text(data, "key_id", required=False, max_len=255)
    algorithm = f.text(data, "encryption_algorithm", required=False,
                       default="SYMMETRIC_DEFAULT",
                       choices=("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_256", "RSAES_OAEP_SHA_1"))
    context = aad_context(f.text(data, "additional_authenticated_data", required=False))
    blob = from_base64("cipher_text", cipher)
    if key_ref is None and algorithm == "SYMMETRIC_DEFAULT":
        key_ref = _ciphertext_key(blob, Purpose.DATA)
    kms = await _kms(call)

    async def run(account: str) -> Any:
        return await kms.decrypt_data(
            blob, account=account, actor=_actor(call), encryption_context=context,
            key=key_ref if algorithm != "SYMMETRIC_DEFAULT" else None,
            encryption_algorithm=None if algorithm == "SYMMETRIC_DEFAULT" else algorithm)

    result = await _as_caller_or_grantee(call, "kms:cmk:crypto", "decrypt-data", key_ref, run)
    plain: bytes = result.plain_text
    return {"key_id": result.key_id, "plain_text": plain.decode("utf-8", errors="replace"),
            "plain_text_base64": b64(plain)}


async def create_random(call: Call) -> Any:
    bits = f.required_integer(_body(call), "random_data_length", low=8, high=8192)
    if bits % 8:
        raise InvalidInput("random_data_length: must be a multiple of 8 bits",
                           target="random_data_length")
    kms = await _kms(call)
    data = await kms.gen_random(bits // 8, account=call.account, actor=_actor(call))
    return {"random_data": data.hex()}


# --------------------------------------------------------------------------- signing, MACs

async def sign(call: Call) -> Any:
    data = _body(call)
    kms = await _kms(call)
    result = await kms.sign(
        _key_id(data), from_base64("message", f.required_text(data, "message")),
        f.required_text(data, "signing_algorithm"),
        f.text(data, "message_type", required=False, default="DIGEST") or "DIGEST",
        account=call.account, actor=_actor(call))
    return {"key_id": result.key_id, "signature": b64(result.signature)}


async def verify(call: Call) -> Any:
    data = _body(call)
    kms = await _kms(call)
    result = await kms.verify(
        _key_id(data), from_base64("message", f.required_text(data, "message")),
        from_base64("signature", f.required_text(data, "signature")),
        f.required_text(data, "signing_algorithm"),
        f.text(data, "message_type", required=False, default="DIGEST") or "DIGEST",
        account=call.account, actor=_actor(call))
    return {"key_id": result.key_id, "signature_valid": "true" if result.valid else "false"}


async def show_public_key(call: Call) -> Any:
    kms = await _kms(call)
    result = await kms.get_public_key(_key_id(_body(call)), account=call.account,
                                      actor=_actor(call))
    return {"key_id": result.key_id, "public_key": result.public_key_pem}


async def generate_mac(call: Call) -> Any:
    data = _body(call)
    kms = await _kms(call)
    algorithm = f.required_text(data, "mac_algorithm")
    result = await kms.generate_mac(
        _key_id(data), from_base64("message", f.required_text(data, "message")), algorithm,
        account=call.account, actor=_actor(call))
    return {"key_id": result.key_id, "mac_algorithm": algorithm, "mac": b64(result.mac)}


async def verify_mac(call: Call) -> Any:
    data = _body(call)
    kms = await _kms(call)
    algorithm = f.required_text(data, "mac_algorithm")
    result = await kms.verify_mac(
        _key_id(data), from_base64("message", f.required_text(data, "message")),
        from_base64("mac", f.required_text(data, "mac")), algorithm,
        account=call.account, actor=_actor(call))
    return {"key_id": result.key_id, "mac_algorithm": algorithm, "mac_valid": result.valid}


# --------------------------------------------------------------------------- import

async def get_parameters_for_import(call: Call) -> Any:
    data = _body(call)
    kms = await _kms(call)
    params = await kms.get_parameters_for_import(
        _key_id(data), f.required_text(data, "wrapping_algorithm"), account=call.account,
        actor=_actor(call))
    return {"key_id": params.key_id, "import_token": params.import_token,
            "expiration_time": seconds(params.expiration_time),
            "public_key": pem_body(params.public_key_pem)}


async def import_key_material(call: Call) -> Any:
    data = _body(call)
    material = from_base64("encrypted_key_material",
                           f.required_text(data, "encrypted_key_material"))
    private = f.text(data, "encrypted_privatekey", required=False)
    if private:
        # An asymmetric key: the wrapped AES key, then the private key it wraps.
        material += from_base64("encrypted_privatekey", private)
    expires = f.integer(data, "expiration_time", required=False, low=0)
    kms = await _kms(call)
    await kms.import_key_material(
        _key_id(data), f.required_text(data, "import_token"), material,
        expiration_time=None if not expires else datetime.fromtimestamp(expires, UTC),
        account=call.account, actor=_actor(call))
    return {}


async def delete_imported_key_material(call: Call) -> Any:
    kms = await _kms(call)
    await kms.delete_imported_key_material(_key_id(_body(call)), account=call.account,
                                           actor=_actor(call))
    return {}


# --------------------------------------------------------------------------- rotation

async def enable_key_rotation(call: Call) -> Any:
    kms = await _kms(call)
    await kms.enable_key_rotation(_key_id(_body(call)), account=call.account,
                                  actor=_actor(call))
    return {}


async def disable_key_rotation(call: Call) -> Any:
    kms = await _kms(call)
    await kms.disable_key_rotation(_key_id(_body(call)), account=call.account,
                                   actor=_actor(call))
    return {}


async def update_key_rotation_interval(call: Call) -> Any:
    data = _body(call)
    kms = await _kms(call)
    await kms.update_key_rotation_interval(
        _key_id(data), f.required_integer(data, "rotation_interval", low=30, high=365),
        account=call.account, actor=_actor(call))
    return {}


async def rotate_on_demand(call: Call) -> Any:
    """A new key version now, through the rotation job (one rotation at a time)."""
    key = _key_id(_body(call))
    result = await _run_job(call, "kms.rotate_key", {"key": key})
    return {"key_id": result.get("key_id", key)}


async def show_key_rotation_status(call: Call) -> Any:
    kms = await _kms(call)
    status = await kms.get_key_rotation_status(_key_id(_body(call)), account=call.account,
                                               actor=_actor(call))
    return {"key_rotation_enabled": status.enabled,
            "rotation_interval": status.interval_days or 0,
            "last_rotation_time": millis(status.last_rotation),
            "number_of_rotations": status.rotations}


# --------------------------------------------------------------------------- tags

def _tag_items(items: list[Mapping[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        out.append((f.required_text(item, "key", max_len=128),
                    f.text(item, "value", required=False, default="", max_len=255) or ""))
    return out


async def create_tag(call: Call) -> Any:
    data = _body(call)
    tag = f.obj(data, "tag")
    assert tag is not None
    [(key, value)] = _tag_items([tag])
    kms = await _kms(call)
    await kms.create_tag(call.params["key_id"], key, value, account=call.account,
                         actor=_actor(call))
    return Reply(None, 204)


async def delete_tag(call: Call) -> Any:
    kms = await _kms(call)
    await kms.delete_tag(call.params["key_id"], call.params["key"], account=call.account,
                         actor=_actor(call))
    return Reply(None, 204)


async def batch_tags(call: Call) -> Any:
    data = _body(call)
    items = f.objects(data, "tags", max_items=20)
    assert items is not None
    action = f.required_text(data, "action", choices=("create", "delete"))
    kms = await _kms(call)
    await kms.batch_tags(call.params["key_id"], _tag_items(items), action,
                         account=call.account, actor=_actor(call))
    return Reply(None, 204)


async def show_key_tags(call: Call) -> Any:
    kms = await _kms(call)
    tags = await kms.key_tags(call.params["key_id"], account=call.account, actor=_actor(call))
    return {"tags": [{"key": k, "value": v} for k, v in tags], "existTagsNum": len(tags)}


async def list_project_tags(call: Call) -> Any:
    kms = await _kms(call)
    tags = await kms.project_tags(account=call.account, actor=_actor(call))
    return {"tags": [{"key": k, "values": values} for k, values in sorted(tags.items())]}


async def list_keys_by_tags(call: Call) -> Any:
    if call.params.get("resource_instances") != "resource_instances":
        raise InvalidInput("resource_instances: must be the literal resource_instances",
                           target="resource_instances")
    data = _body(call)
    action = f.required_text(data, "action", choices=("filter", "count"))
    limit = f.integer(data, "limit", required=False, default=10, low=1, high=1000)
    offset = f.integer(data, "offset", required=False, default=0, low=0)
    tags: dict[str, list[str]] = {}
    for tag in f.objects(data, "tags", required=False) or []:
        tags[f.required_text(tag, "key", max_len=128)] = f.text_list(tag, "values") or []
    matches = _tag_items(f.objects(data, "matches", required=False) or [])
    kms = await _kms(call)
    found, total = await kms.keys_by_tags(account=call.account, actor=_actor(call), tags=tags,
                                          matches=matches, limit=limit, offset=offset)
    if action == "count":
        return {"total_count": total}
    return {"resources": [
        {"resource_id": key.key_id, "resource_name": key.key_alias,
         "resource_detail": key_details(key, call.principal.project_id),
         "tags": [{"key": k, "value": v} for k, v in key_tags]}
        for key, key_tags in found], "total_count": total}


# --------------------------------------------------------------------------- quotas, grants

async def show_user_quotas(call: Call) -> Any:
    kms = await _kms(call)
    quotas = await kms.user_quotas(account=call.account, actor=_actor(call))
    return {"quotas": {"resources": [{"type": q.type, "used": q.used, "quota": q.quota}
                                     for q in quotas]}}


async def create_grant(call: Call) -> Any:
    data = _body(call)
    key_ref = _key_id(data)
    grantee = f.required_text(data, "grantee_principal", max_len=64)
    operations = f.text_list(data, "operations", max_items=len(GRANT_OPERATIONS))
    assert operations is not None
    for operation in operations:
        if operation not in GRANT_OPERATIONS:
            raise InvalidInput(f"operations: {operation!r} is not one of "
                               f"{', '.join(GRANT_OPERATIONS)}", target="operations")
    name = f.text(data, "name", required=False, max_len=255)
    retiring = f.text(data, "retiring_principal", required=False, max_len=64)
    kind = f.text(data, "grantee_principal_type", required=False, default="user",
                  choices=("user", "domain"))
    kms = await _kms(call)

    async def run(account: str) -> Any:
        return await kms.create_grant(key_ref, grantee, operations, name=name,
                                      retiring_principal=retiring,
                                      grantee_principal_type=kind or "user",
                                      account=account, actor=_actor(call))

    grant = await _as_caller_or_grantee(call, "kms:grant:create", "create-grant", key_ref, run)
    return {"grant_id": grant.grant_id}


def _grant_json(grant: Any) -> dict[str, Any]:
    return {"key_id": grant.key_id, "grant_id": grant.grant_id,
            "grantee_principal": grant.grantee_principal,
            "grantee_principal_type": grant.grantee_principal_type,
            "operations": list(grant.operations), "issuing_principal": grant.issuing_principal,
            "creation_date": millis(grant.created_at), "name": grant.name or "",
            "retiring_principal": grant.retiring_principal or ""}


async def list_grants(call: Call) -> Any:
    data = _body(call)
    kms = await _kms(call)
    page = await kms.list_grants(
        _key_id(data), limit=f.integer(data, "limit", required=False, low=1, high=100),
        marker=f.text(data, "marker", required=False), account=call.account,
        actor=_actor(call))
    return {"grants": [_grant_json(g) for g in page.grants],
            "next_marker": page.next_marker or "",
            "truncated": "true" if page.next_marker else "false", "total": page.total}


async def revoke_grant(call: Call) -> Any:
    data = _body(call)
    kms = await _kms(call)
    await kms.revoke_grant(_key_id(data), f.required_text(data, "grant_id", max_len=64),
                           account=call.account, actor=_actor(call))
    return {}


async def retire_grant(call: Call) -> Any:
    data = _body(call)
    kms = await _kms(call)
    await kms.retire_grant(_key_id(data), f.required_text(data, "grant_id", max_len=64),
                           user_id=call.principal.user_id, project_id=call.principal.project_id,
                           actor=_actor(call))
    return {}


# --------------------------------------------------------------------------- audit (dew's own)

def _query_time(query: Mapping[str, str], name: str) -> datetime | None:
    value = f.text(query, name, required=False, max_len=64)
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{name}: must be an ISO 8601 time such as 2026-12-01T00:00:00Z, "
                           f"got {value!r}", code="invalid_parameter", target=name) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def list_audit(call: Call) -> Any:
    """The caller's project's audit entries, newest ``limit`` (``dew audit list``'s filters)."""
    q = {name: value for name, value in call.query.items() if value}  # empty: not given
    where = AuditFilter(
        secret=f.text(q, "secret", required=False, max_len=255) or None,
        operation=f.text(q, "operation", required=False, max_len=64) or None,
        actor=f.text(q, "actor", required=False, max_len=255) or None,
        outcome=f.text(q, "outcome", required=False, choices=("success", "failure")) or None,
        since=_query_time(q, "since"), until=_query_time(q, "until"))
    limit = f.integer(q, "limit", required=False, default=100, low=1, high=10_000)
    entries = await (await _kms(call)).audit_list(
        f.text(q, "key", required=False, max_len=255) or None, account=call.account,
        limit=limit or 100, where=where)
    return {"entries": [entry.to_json() for entry in entries], "total": len(entries)}


async def verify_audit(call: Call) -> Any:
    """The whole hash chain checked (its verdict names the first broken entry, if any)."""
    return (await (await _kms(call)).audit_verify()).to_json()


# --------------------------------------------------------------------------- the table

def _op(name: str, method: str, path: str, handler: Any, action: str | None,
        limit: str = MANAGE) -> Operation:
    return Operation(name, method, PREFIX + path, handler, action, limit)


def operations() -> list[Operation]:
    """Every operation of HUAWEI_API.md §7.1's main table (plus CancelSelfGrant)."""
    return [
        _op("CreateKey", "POST", "/create-key", create_key, "kms:cmk:create"),
        _op("ListKeyDetail", "POST", "/describe-key", describe_key, None),
        _op("ListKeys", "POST", "/list-keys", list_keys, "kms:cmk:list"),
        _op("EnableKey", "POST", "/enable-key", enable_key, "kms:cmk:enable"),
        _op("DisableKey", "POST", "/disable-key", disable_key, "kms:cmk:disable"),
        _op("DeleteKey", "POST", "/schedule-key-deletion", schedule_key_deletion,
            "kms:cmk:delete"),
        _op("CancelKeyDeletion", "POST", "/cancel-key-deletion", cancel_key_deletion,
            "kms:cmk:delete"),
        _op("UpdateKeyAlias", "POST", "/update-key-alias", update_key_alias, "kms:cmk:update"),
        _op("UpdateKeyDescription", "POST", "/update-key-description", update_key_description,
            "kms:cmk:update"),
        _op("CreateDatakey", "POST", "/create-datakey", create_datakey, None, CRYPTO),
        _op("CreateDatakeyWithoutPlaintext", "POST", "/create-datakey-without-plaintext",
            create_datakey_without_plaintext, None, CRYPTO),
        _op("EncryptDatakey", "POST", "/encrypt-datakey", encrypt_datakey, None, CRYPTO),
        _op("DecryptDatakey", "POST", "/decrypt-datakey", decrypt_datakey, None, CRYPTO),
        _op("EncryptData", "POST", "/encrypt-data", encrypt_data, None, CRYPTO),
        _op("DecryptData", "POST", "/decrypt-data", decrypt_data, None, CRYPTO),
        _op("CreateRandom", "POST", "/gen-random", create_random, "kms:random:generate", CRYPTO),
        _op("Sign", "POST", "/sign", sign, "kms:cmk:crypto", CRYPTO),
        _op("ValidateSignature", "POST", "/verify", verify, "kms:cmk:crypto", CRYPTO),
        _op("ShowPublicKey", "POST", "/get-publickey", show_public_key, "kms:cmk:get"),
        _op("GenerateMac", "POST", "/generate-mac", generate_mac, "kms:cmk:crypto", CRYPTO),
        _op("VerifyMac", "POST", "/verify-mac", verify_mac, "kms:cmk:crypto", CRYPTO),
        _op("CreateParametersForImport", "POST", "/get-parameters-for-import",
            get_parameters_for_import, "kms:cmk:import"),
        _op("ImportKeyMaterial", "POST", "/import-key-material", import_key_material,
            "kms:cmk:import"),
        _op("DeleteImportedKeyMaterial", "POST", "/delete-imported-key-material",
            delete_imported_key_material, "kms:cmk:import"),
        _op("EnableKeyRotation", "POST", "/enable-key-rotation", enable_key_rotation,
            "kms:cmk:update"),
        _op("DisableKeyRotation", "POST", "/disable-key-rotation", disable_key_rotation,
            "kms:cmk:update"),
        _op("UpdateKeyRotationInterval", "POST", "/update-key-rotation-interval",
            update_key_rotation_interval, "kms:cmk:update"),
        _op("RotateOnDemand", "POST", "/rotate-on-demand", rotate_on_demand, "kms:cmk:update"),
        _op("ShowKeyRotationStatus", "POST", "/get-key-rotation-status",
            show_key_rotation_status, "kms:cmk:get"),
        _op("ShowUserQuotas", "GET", "/user-quotas", show_user_quotas, "kms:quota:get"),
        _op("ListKmsTags", "GET", "/tags", list_project_tags, "kms:cmk:list"),
        _op("ShowKmsTags", "GET", "/{key_id}/tags", show_key_tags, "kms:cmk:get"),
        _op("CreateKmsTag", "POST", "/{key_id}/tags", create_tag, "kms:cmk:update"),
        _op("BatchCreateKmsTags", "POST", "/{key_id}/tags/action", batch_tags,
            "kms:cmk:update"),
        _op("DeleteTag", "DELETE", "/{key_id}/tags/{key}", delete_tag, "kms:cmk:update"),
        _op("ListKmsByTags", "POST", "/{resource_instances}/action", list_keys_by_tags,
            "kms:cmk:list"),
        _op("CreateGrant", "POST", "/create-grant", create_grant, None),
        _op("ListGrants", "POST", "/list-grants", list_grants, "kms:grant:list"),
        _op("CancelGrant", "POST", "/revoke-grant", revoke_grant, "kms:grant:revoke"),
        # Retiring is the grantee's or the retiring principal's right, checked on the grant.
        _op("CancelSelfGrant", "POST", "/retire-grant", retire_grant, None),
        # dew's own (no SDK operation): the audit log, as `dew audit list/verify` show it.
        _op("DewListAudit", "GET", "/dew/audit", list_audit, "kms:audit:list"),
        _op("DewVerifyAudit", "POST", "/dew/audit/verify", verify_audit, "kms:audit:verify"),
    ]
