"""The CSMS over HTTPS: the operations of ``huaweicloudsdkcsms.v1`` (HUAWEI_API.md §7.2).

Each handler reads the SDK's fields (naming the field in every 400), calls the
``SecretsService`` functions the CLI calls, and answers in the SDK's shapes:
``Secret``, ``VersionMetadata``, ``PageInfo`` (``limit``/``marker``; markers are
the last secret name or the last version id; 50 by default). CSMS times are epoch
seconds as ints. The caller's project is the account (``call.account``): another
project's secret answers 404 exactly as one that does not exist.

A secret value leaves only through ShowSecretVersion, whose action
(``csms:secret:getValue``) only ``CSMS FullAccess`` has. RotateSecret enqueues the
rotation job (its arguments are the secret's name and account: never a value) and
answers at once with the task id.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from engine.api import fields as f
from engine.api.operations import CRYPTO, MANAGE, Call, Operation, Reply
from engine.errors import InvalidInput, NotFound
from engine.models import TaskRecord
from engine.store import TaskStore
from handlers.csms import model as m
from handlers.csms.service import ROTATE_JOB, SecretInfo, SecretsService, VersionInfo

ERROR_PREFIX = "CSMS"
PREFIX = "/v1/{project_id}"
T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
MAX_STAGE_NAME = 64
STATES = {m.SecretState.ENABLED.value: "ENABLED",
          m.SecretState.PENDING_DELETION.value: "PENDING_DELETE"}
# The hosted service's database types: the engine comes from the value's "engine".
FG_TYPES = ("RDS-FG", "RDS", "GaussDB-FG")
OUR_TYPES = tuple(t.value for t in m.SecretType)
TASK_STATUSES = {"queued": "WAITING", "running": "RUNNING", "succeeded": "SUCCESS",
                 "failed": "FAILED"}


async def _csms(call: Call) -> SecretsService:
    """A service acting for this caller (the KMS audits its data key use as the caller)."""
    return SecretsService(await call.resources.get("csms_store"),
                          await call.resources.get("kms"),
                          actor=f"csms:{call.principal.actor} request={call.request_id}")


def _body(call: Call) -> Mapping[str, Any]:
    return f.body_object(call.body)


def _named(name: str, check: Callable[..., T], *args: Any) -> T:
    """A model check whose InvalidInput is re-raised naming the request field."""
    try:
        return check(*args)
    except InvalidInput as exc:
        raise InvalidInput(f"{name}: {exc.message}", code=exc.code, target=name,
                           fix=exc.fix) from None


def _bad(name: str, problem: str) -> InvalidInput:
    return InvalidInput(f"{name}: {problem}", code="invalid_parameter", target=name)


def _secret_name(call: Call) -> str:
    return _named("secret_name", m.check_name, call.params["secret_name"])


def _seconds(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp())


# --------------------------------------------------------------------------- views

def secret_json(info: SecretInfo) -> dict[str, Any]:
    """One ``Secret`` object."""
    r = info.record
    return {
        "id": r.secret_id, "name": r.name, "state": STATES.get(r.state, r.state.upper()),
        "kms_key_id": r.kms_key, "description": r.description,
        "create_time": _seconds(r.created_at), "update_time": _seconds(r.updated_at),
        "scheduled_delete_time": _seconds(r.deletion_date), "secret_type": r.secret_type,
        "auto_rotation": r.rotation_period is not None,
        "rotation_period": m.format_period(r.rotation_period),
        "rotation_config": r.rotation_config or None,
        "rotation_time": _seconds(r.last_rotated_at),
        "next_rotation_time": _seconds(r.next_rotation_at),
        "event_subscriptions": [], "enterprise_project_id": "0", "rotation_func_urn": None,
    }


def version_json(version: VersionInfo, secret_name: str) -> dict[str, Any]:
    """One ``VersionMetadata`` object."""
    return {"id": version.version_id, "create_time": _seconds(version.created_at),
            "expire_time": version.expire_time, "kms_key_id": version.kms_key_id,
            "secret_name": secret_name, "version_stages": version.stages}


def page_info(marker: str | None, items: list[str], more: bool) -> dict[str, Any]:
    return {"next_marker": items[-1] if more and items else None,
            "previous_marker": marker or None, "current_count": len(items)}


def _limit(call: Call) -> int:
    limit = f.integer(call.query, "limit", required=False, default=DEFAULT_LIMIT, low=1,
                      high=MAX_LIMIT)
    assert limit is not None
    return limit


# --------------------------------------------------------------------------- request parts

def secret_value(data: Mapping[str, Any]) -> bytes:
    """``secret_string`` (text) or ``secret_binary`` (Base64): exactly one, 1 byte to 32 KiB."""
    text = f.text(data, "secret_string", required=False)
    binary = f.text(data, "secret_binary", required=False)
    if text is not None and binary is not None:
        raise _bad("secret_string", "give secret_string or secret_binary, not both")
    if text is None and binary is None:
        raise _bad("secret_string", "secret_string or secret_binary is required")
    name = "secret_string" if text is not None else "secret_binary"
    if text is not None:
        value = text.encode("utf-8")
    else:
        try:
            value = base64.b64decode(binary or "", validate=True)
        except (binascii.Error, ValueError):
            raise _bad("secret_binary", "must be Base64") from None
    if not value:
        raise _bad(name, "the secret value is empty")
    if len(value) > m.MAX_VALUE_BYTES:
        # The size only: the value never goes into an error.
        raise InvalidInput(f"{name}: the secret value is over {m.MAX_VALUE_BYTES} bytes "
                           "(32 KiB)", code="secret_value_too_large", target=name)
    return value


def secret_kind(data: Mapping[str, Any], value: bytes) -> m.SecretType:
    """Our type: COMMON, RDS_POSTGRESQL, RDS_MYSQL, or the hosted service's RDS-FG /
    GaussDB-FG (RDS) with the engine taken from the value document's ``engine``."""
    given = f.text(data, "secret_type", required=False, default="COMMON",
                   choices=(*OUR_TYPES, *FG_TYPES))
    if given in OUR_TYPES:
        return m.SecretType(given)
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        doc = None
    engine = doc.get("engine") if isinstance(doc, dict) else None
    engine = engine.lower() if isinstance(engine, str) else ""
    for kind in (m.SecretType.RDS_POSTGRESQL, m.SecretType.RDS_MYSQL):
        if engine in m.ENGINES[kind] and (given != "GaussDB-FG"
                                          or kind is m.SecretType.RDS_MYSQL):
            return kind
    engines = sorted(m.ENGINES[m.SecretType.RDS_MYSQL] if given == "GaussDB-FG"
                     else m.ENGINES[m.SecretType.RDS_MYSQL] | m.ENGINES[
                         m.SecretType.RDS_POSTGRESQL])
    raise _bad("secret_string", f"a {given} secret is a JSON object whose engine is one of "
               f"{', '.join(engines)}")


def rotation_config(data: Mapping[str, Any]) -> str:
    """``rotation_config``: a JSON object of at most 1024 characters, kept as given;
    ``SecretSubType`` SingleUser only (the secret's own user changes its password)."""
    text = f.text(data, "rotation_config", required=False, default="", max_len=1024) or ""
    if not text:
        return ""
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise _bad("rotation_config", "must be a JSON object")
    sub = doc.get("SecretSubType", "SingleUser")
    if sub != "SingleUser":
        raise _bad("rotation_config", f"SecretSubType {sub!r} is not supported: SingleUser "
                   "(the secret's own user changes its password) only")
    return text


def rotation_period(data: Mapping[str, Any]) -> int | None:
    text = f.text(data, "rotation_period", required=False, max_len=16)
    return None if not text else _named("rotation_period", m.parse_period, text)


def refuse_unsupported(data: Mapping[str, Any]) -> None:
    """Fields of features this service does not have: refused rather than dropped."""
    if f.text_list(data, "event_subscriptions", required=False):
        raise _bad("event_subscriptions", "event notifications are not supported here")
    if f.text(data, "rotation_func_urn", required=False):
        raise _bad("rotation_func_urn", "FunctionGraph rotation is not supported here: "
                   "database secrets rotate in the engine")
    project = f.text(data, "enterprise_project_id", required=False)
    if project not in (None, "", "0", "default"):
        raise _bad("enterprise_project_id", "only the default enterprise project (0) exists")


def _stage_name(text: object, name: str) -> str:
    if isinstance(text, str) and len(text) > MAX_STAGE_NAME:
        raise _bad(name, f"a stage name is at most {MAX_STAGE_NAME} characters")
    return _named(name, m.check_stage, text)


# --------------------------------------------------------------------------- secrets

async def create_secret(call: Call) -> Any:
    data = _body(call)
    name = _named("name", m.check_name, f.required_text(data, "name"))
    value = secret_value(data)
    kind = secret_kind(data, value)
    field = "secret_string" if data.get("secret_string") is not None else "secret_binary"
    _named(field, m.check_value, value, kind)
    config = rotation_config(data)
    description = f.text(data, "description", required=False, default="",
                         max_len=m.MAX_DESCRIPTION) or ""
    kms_key = f.text(data, "kms_key_id", required=False, max_len=255) or m.DEFAULT_KMS_KEY
    auto = f.boolean(data, "auto_rotation")
    period = rotation_period(data)
    if auto and period is None:
        raise _bad("rotation_period", "is required when auto_rotation is true")
    refuse_unsupported(data)
    csms = await _csms(call)
    info = await csms.create(name, value, account=call.account, kms_key=kms_key,
                             description=description, secret_type=kind,
                             rotation_config=config)
    if auto:
        info = await csms.set_rotation(name, period, account=call.account)
    return {"secret": secret_json(info)}


async def show_secret(call: Call) -> Any:
    csms = await _csms(call)
    return {"secret": secret_json(await csms.describe(_secret_name(call),
                                                      account=call.account))}


async def list_secrets(call: Call) -> Any:
    limit = _limit(call)
    marker = f.text(call.query, "marker", required=False, max_len=64)
    csms = await _csms(call)
    if f.text(call.query, "event_name", required=False):
        return {"secrets": [], "page_info": page_info(marker, [], False)}  # no subscriptions
    found = [s for s in await csms.list_secrets(account=call.account)
             if not marker or s.record.name > marker]
    page = found[:limit]
    return {"secrets": [secret_json(s) for s in page],
            "page_info": page_info(marker, [s.record.name for s in page], len(found) > limit)}


async def update_secret(call: Call) -> Any:
    name = _secret_name(call)
    data = _body(call)
    description = f.text(data, "description", required=False, max_len=m.MAX_DESCRIPTION)
    kms_key = f.text(data, "kms_key_id", required=False, max_len=255) or None
    auto = f.boolean(data, "auto_rotation")
    period = rotation_period(data)
    refuse_unsupported(data)
    csms = await _csms(call)
    info = await csms.describe(name, account=call.account)
    if description is not None or kms_key is not None:
        info = await csms.update(name, account=call.account, description=description,
                                 kms_key=kms_key)
    current = info.record.rotation_period
    if auto is False:
        new = None
    elif auto is True:
        new = period or current
        if new is None:
            raise _bad("rotation_period", "is required when auto_rotation is true")
    else:
        new = period or current
    if new != current or (new is not None and period is not None):
        info = await csms.set_rotation(name, new, account=call.account)
    return {"secret": secret_json(info)}


async def delete_secret(call: Call) -> Any:
    csms = await _csms(call)
    await csms.delete_now(_secret_name(call), account=call.account)
    return Reply(status=204)


async def delete_secret_for_schedule(call: Call) -> Any:
    name = _secret_name(call)
    days = f.integer(_body(call), "recovery_window_in_days", required=False, default=30,
                     low=m.RECOVERY_DAYS[0], high=m.RECOVERY_DAYS[1])
    csms = await _csms(call)
    return {"secret": secret_json(await csms.schedule_deletion(name, days or 30,
                                                               account=call.account))}


async def restore_secret(call: Call) -> Any:
    csms = await _csms(call)
    return {"secret": secret_json(await csms.restore(_secret_name(call),
                                                     account=call.account))}


# --------------------------------------------------------------------------- versions

async def create_secret_version(call: Call) -> Any:
    name = _secret_name(call)
    data = _body(call)
    value = secret_value(data)
    stages = f.text_list(data, "version_stages", required=False,
                         max_items=m.MAX_VERSION_STAGES)
    if stages is not None:
        if not stages:
            raise _bad("version_stages", f"give 1 to {m.MAX_VERSION_STAGES} stages")
        stages = [_stage_name(s, "version_stages") for s in stages]
    expire = f.integer(data, "expire_time", required=False, low=0)
    csms = await _csms(call)
    secret = await csms.describe(name, account=call.account)
    field = "secret_string" if data.get("secret_string") is not None else "secret_binary"
    _named(field, m.check_value, value, m.SecretType(secret.record.secret_type))
    version = await csms.put_version(name, value, account=call.account, stages=stages,
                                     expire_time=expire)
    return {"version_metadata": version_json(version, name)}


async def list_secret_versions(call: Call) -> Any:
    name = _secret_name(call)
    limit = _limit(call)
    marker = f.text(call.query, "marker", required=False, max_len=16) or None
    after = 0 if marker is None else int(_named("marker", m.check_version_id, marker)[1:])
    csms = await _csms(call)
    found = [v for v in await csms.list_versions(name, account=call.account)
             if int(v.version_id[1:]) > after]
    page = found[:limit]
    return {"version_metadatas": [version_json(v, name) for v in page],
            "page_info": page_info(marker, [v.version_id for v in page], len(found) > limit)}


async def show_secret_version(call: Call) -> Any:
    """The value: ``secret_string`` when it is UTF-8 text, and ``secret_binary``
    (Base64) always. ``version_id`` ``latest`` is the SYSCURRENT version."""
    name = _secret_name(call)
    version_id = call.params["version_id"]
    csms = await _csms(call)
    if version_id == "latest":
        found = await csms.get_value(name, account=call.account, stage=m.CURRENT)
    else:
        version_id = _named("version_id", m.check_version_id, version_id)
        found = await csms.get_value(name, account=call.account, version_id=version_id)
    meta = await csms.version_info(name, found.version_id, account=call.account)
    version: dict[str, Any] = {"version_metadata": version_json(meta, name),
                               "secret_binary": base64.b64encode(found.value).decode()}
    with contextlib.suppress(UnicodeDecodeError):
        version["secret_string"] = found.value.decode("utf-8")
    return {"version": version}


async def update_version(call: Call) -> Any:
    name = _secret_name(call)
    version_id = _named("version_id", m.check_version_id, call.params["version_id"])
    expire = f.required_integer(_body(call), "expire_time", low=0)
    csms = await _csms(call)
    version = await csms.set_version_expiry(name, version_id, expire, account=call.account)
    return {"version_metadata": version_json(version, name)}


# --------------------------------------------------------------------------- stages

async def _stage(csms: SecretsService, call: Call, name: str, stage: str) -> Any:
    version_id, when = await csms.stage_info(name, stage, account=call.account)
    return {"stage": {"name": stage, "update_time": _seconds(when), "secret_name": name,
                      "version_id": version_id}}


async def show_secret_stage(call: Call) -> Any:
    name = _secret_name(call)
    stage = _stage_name(call.params["stage_name"], "stage_name")
    return await _stage(await _csms(call), call, name, stage)


async def update_secret_stage(call: Call) -> Any:
    name = _secret_name(call)
    stage = _stage_name(call.params["stage_name"], "stage_name")
    version_id = _named("version_id", m.check_version_id,
                        f.required_text(_body(call), "version_id", max_len=16))
    csms = await _csms(call)
    await csms.set_stage(name, stage, version_id, account=call.account)
    return await _stage(csms, call, name, stage)


async def delete_secret_stage(call: Call) -> Any:
    name = _secret_name(call)
    stage = _stage_name(call.params["stage_name"], "stage_name")
    csms = await _csms(call)
    await csms.remove_stage(name, stage, account=call.account)
    return Reply(status=204)


# --------------------------------------------------------------------------- rotation

async def rotate_secret(call: Call) -> Any:
    """Enqueue the rotation (``csms.rotate_secret {name, account}``) and answer at once:
    ``rotation_task_id`` is the task (ListSecretTask, ``dew tasks show``)."""
    name = _secret_name(call)
    csms = await _csms(call)
    await csms.check_usable(name, account=call.account)
    task = await call.jobs.enqueue(ROTATE_JOB, {"name": name, "account": call.account})
    return {"rotation_task_id": task.task_id, "secret_name": name}


def _task_json(task: TaskRecord) -> dict[str, Any]:
    error = task.error or {}
    return {"task_id": task.task_id, "secret_name": task.args.get("name"),
            "rotation_func_urn": None, "task_status": TASK_STATUSES.get(task.status),
            "operate_type": "SCHEDULED_ROTATION" if task.args.get("due") else "ROTATION",
            "task_time": _seconds(task.enqueued_at), "attempt_nums": task.attempts,
            "task_error_code": error.get("code"), "task_error_msg": error.get("message")}


async def list_secret_task(call: Call) -> Any:
    """The caller's project's rotation tasks, newest first; ``marker`` is a task id."""
    q = call.query
    secret_name = f.text(q, "secret_name", required=False, max_len=64)
    status = f.text(q, "status", required=False, choices=tuple(TASK_STATUSES.values()))
    task_id = f.text(q, "task_id", required=False, max_len=128)
    limit = _limit(call)
    marker = f.text(q, "marker", required=False, max_len=128)
    store: TaskStore = await call.resources.get("task_store")
    if task_id:
        one = await store.get_task(task_id, project=call.account)
        tasks = [] if one is None or one.name != ROTATE_JOB else [one]
    else:
        tasks = await store.list_tasks(name=ROTATE_JOB, limit=10_000, project=call.account)
    tasks = [t for t in tasks if (not secret_name or t.args.get("name") == secret_name)
             and (not status or TASK_STATUSES.get(t.status) == status)]
    total = len(tasks)
    if marker:
        ids = [t.task_id for t in tasks]
        tasks = tasks[ids.index(marker) + 1:] if marker in ids else []
    page = tasks[:limit]
    return {"total": total, "tasks": [_task_json(t) for t in page],
            "next_marker": page[-1].task_id if len(tasks) > limit else None}


async def generate_random_password(call: Call) -> Any:
    data = _body(call)
    f.text(data, "password_policy_name", required=False, max_len=64)
    length = f.integer(data, "length", required=False, default=32,
                       low=m.PASSWORD_LENGTH[0], high=m.PASSWORD_LENGTH[1])
    options = {name: bool(f.boolean(data, name, default=False)) for name in (
        "exclude_lowercase", "exclude_uppercase", "exclude_numbers", "exclude_punctuation",
        "include_space", "require_each_included_type")}
    exclude = f.text(data, "exclude_characters", required=False, default="", max_len=256)
    password = _named("exclude_characters", lambda: m.generate_password(
        length or 32, exclude_characters=exclude or "", **options))
    return {"password": password}


# --------------------------------------------------------------------------- tags

def _tag_item(item: Mapping[str, Any], name: str) -> tuple[str, str]:
    key = f.required_text(item, "key", max_len=128)
    value = f.text(item, "value", required=False, default="", max_len=255) or ""
    return _named(name, m.check_tag, key, value)


async def list_secret_tags(call: Call) -> Any:
    csms = await _csms(call)
    tags = await csms.tags(call.params["secret_id"], account=call.account)
    return {"tags": [{"key": k, "value": v} for k, v in tags.items()], "sys_tags": []}


async def create_secret_tag(call: Call) -> Any:
    tag = f.obj(_body(call), "tag")
    assert tag is not None
    key, value = _tag_item(tag, "tag")
    csms = await _csms(call)
    await csms.change_tags(call.params["secret_id"], account=call.account, put={key: value})
    return Reply(status=204)


async def delete_secret_tag(call: Call) -> Any:
    key = call.params["key"]
    csms = await _csms(call)
    if key not in await csms.tags(call.params["secret_id"], account=call.account):
        raise NotFound(f"the secret has no tag {key[:128]!r}", code="tag_not_found")
    await csms.change_tags(call.params["secret_id"], account=call.account, remove=[key])
    return Reply(status=204)


async def batch_tags(call: Call) -> Any:
    data = _body(call)
    action = f.required_text(data, "action", choices=("create", "delete"))
    call.principal.require("csms:tag:create" if action == "create" else "csms:tag:delete")
    items = [_tag_item(t, "tags") for t in f.objects(data, "tags", max_items=20) or []]
    csms = await _csms(call)
    if action == "create":
        await csms.change_tags(call.params["secret_id"], account=call.account,
                               put=dict(items))
    else:
        await csms.change_tags(call.params["secret_id"], account=call.account,
                               remove=[k for k, _ in items])
    return Reply(status=204)


async def list_resource_instances(call: Call) -> Any:
    if call.params.get("resource_instances") != "resource_instances":
        raise _bad("resource_instances", "must be the literal resource_instances")
    data = _body(call)
    action = f.required_text(data, "action", choices=("filter", "count"))
    limit = f.integer(data, "limit", required=False, default=10, low=1, high=1000) or 10
    offset = f.integer(data, "offset", required=False, default=0, low=0) or 0
    tags: dict[str, list[str]] = {}
    for tag in f.objects(data, "tags", required=False, max_items=10) or []:
        tags[f.required_text(tag, "key", max_len=128)] = f.text_list(
            tag, "values", required=False) or []
    contains: str | None = None
    for match in f.objects(data, "matches", required=False) or []:
        f.required_text(match, "key", choices=("resource_name",))
        contains = f.text(match, "value", required=False, default="", max_len=255)
    csms = await _csms(call)
    found = [] if contains == "" else await csms.search(account=call.account, tags=tags,
                                                         name_contains=contains)
    if action == "count":
        return {"total_count": len(found)}
    return {"resources": [
        {"resource_id": info.record.secret_id, "resource_name": info.record.name,
         "resource_detail": secret_json(info),
         "tags": [{"key": k, "value": v} for k, v in secret_tags.items()], "sys_tags": []}
        for info, secret_tags in found[offset:offset + limit]], "total_count": len(found)}


# --------------------------------------------------------------------------- the table

def _op(name: str, method: str, path: str, handler: Any, action: str | None,
        limit: str = MANAGE) -> Operation:
    return Operation(name, method, PREFIX + path, handler, action, limit)


def operations() -> list[Operation]:
    """Every operation of HUAWEI_API.md §7.2's main table, plus ListSecretTask and
    GenerateRandomPassword."""
    s = "/secrets/{secret_name}"
    return [
        _op("CreateSecret", "POST", "/secrets", create_secret, "csms:secret:create"),
        _op("ListSecrets", "GET", "/secrets", list_secrets, "csms:secret:list"),
        _op("ShowSecret", "GET", s, show_secret, "csms:secret:get"),
        _op("UpdateSecret", "PUT", s, update_secret, "csms:secret:update"),
        _op("DeleteSecret", "DELETE", s, delete_secret, "csms:secret:delete"),
        _op("DeleteSecretForSchedule", "POST", s + "/scheduled-deleted-tasks/create",
            delete_secret_for_schedule, "csms:secret:delete"),
        _op("RestoreSecret", "POST", s + "/scheduled-deleted-tasks/cancel", restore_secret,
            "csms:secret:delete"),
        _op("CreateSecretVersion", "POST", s + "/versions", create_secret_version,
            "csms:secret:update"),
        _op("ListSecretVersions", "GET", s + "/versions", list_secret_versions,
            "csms:secret:get"),
        _op("ShowSecretVersion", "GET", s + "/versions/{version_id}", show_secret_version,
            "csms:secret:getValue", CRYPTO),
        _op("UpdateVersion", "PUT", s + "/versions/{version_id}", update_version,
            "csms:secret:update"),
        _op("ShowSecretStage", "GET", s + "/stages/{stage_name}", show_secret_stage,
            "csms:secret:get"),
        _op("UpdateSecretStage", "PUT", s + "/stages/{stage_name}", update_secret_stage,
            "csms:secret:update"),
        _op("DeleteSecretStage", "DELETE", s + "/stages/{stage_name}", delete_secret_stage,
            "csms:secret:update"),
        _op("RotateSecret", "POST", s + "/rotate", rotate_secret, "csms:secret:rotate"),
        _op("ListSecretTask", "GET", "/csms/tasks", list_secret_task, "csms:task:list"),
        _op("GenerateRandomPassword", "POST", "/csms/generate-password",
            generate_random_password, "csms:password:generate", CRYPTO),
        _op("ListSecretTags", "GET", "/csms/{secret_id}/tags", list_secret_tags,
            "csms:tag:list"),
        _op("CreateSecretTag", "POST", "/csms/{secret_id}/tags", create_secret_tag,
            "csms:tag:create"),
        _op("DeleteSecretTag", "DELETE", "/csms/{secret_id}/tags/{key}", delete_secret_tag,
            "csms:tag:delete"),
        # create or delete, by the body's action: checked by the handler.
        _op("BatchCreateOrDeleteTags", "POST", "/csms/{secret_id}/tags/action", batch_tags,
            None),
        _op("ListResourceInstances", "POST", "/csms/{resource_instances}/action",
            list_resource_instances, "csms:secret:list"),
    ]
