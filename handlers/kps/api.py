"""The KPS over HTTPS: the operations of ``huaweicloudsdkkps.v3`` (HUAWEI_API.md §7.3).

Each handler reads the SDK's fields, calls the ``KpsService`` method the CLI
calls (``dew keypairs``, ``dew servers``), and answers in the SDK's shapes. The
account is the caller's project; the owner of a user-scope key pair is the
caller's user. Associate / BatchAssociate / Disassociate enqueue the
``kps.bind`` / ``kps.unbind`` jobs (one per server, so that each server has its
task id as in the hosted service) and answer at once; the server credential in
``server.auth`` goes into the job's ``auth`` argument, which the job declares
secret, so the engine's client seals it before anything is written. The task
operations read the engine's task store and failure records (as ``dew tasks`` /
``dew failures`` do), limited to KPS tasks whose ``account`` is the caller's.

``/v3/{project_id}/dew/servers`` is ours (not the hosted service's): the servers
registry that a server ``id`` of Associate / Disassociate names.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from functools import wraps
from typing import Any

from engine.api import fields as f
from engine.api.operations import MANAGE, Call, Operation, Reply
from engine.errors import Conflict, DewError, InvalidInput, NotFound
from engine.models import FailureRecord, TaskRecord
from engine.store import TaskStore
from handlers.kms.interface import SEAL_KEY
from handlers.kps import keys as ssh_keys
from handlers.kps.service import (
    ALL_FAILED,
    INCONSISTENT,
    TOO_MANY,
    BatchError,
    KpsService,
    ServerNotFound,
    invalid,
)
from handlers.kps.store import KeyPairRecord, ServerRecord

ERROR_PREFIX = "KPS"
PREFIX = "/v3/{project_id}"
DEFAULT_ALGORITHM = "SSH_RSA_2048"  # what the hosted service generates
SCOPES = {"user": "user", "domain": "account"}
SCOPE_NAMES = {"user": "user", "account": "domain"}
# Job -> the hosted service's operation word in task statuses (bind is its "reset").
OPERATE = {"kps.bind": "RESET", "kps.reset": "RESET", "kps.replace": "REPLACE",
           "kps.unbind": "UNBIND"}
STATUS_WORD = {"queued": "READY", "running": "RUNNING", "failed": "FAILED",
               "succeeded": "SUCCESS"}
SCAN_LIMIT = 10_000  # tasks / failure records read per job name (see docs/kps.md)


Handler = Callable[[Call], Awaitable[Any]]


def _explained(handler: Handler) -> Handler:
    """An InvalidInput's message is the product's ("Invalid parameter."); the reply
    adds why on the same line, as the CLI does."""

    @wraps(handler)
    async def run(call: Call) -> Any:
        try:
            return await handler(call)
        except InvalidInput as exc:
            if not exc.cause or exc.cause in exc.message:
                raise
            raise InvalidInput(f"{exc.message} {exc.cause}", code=exc.code, fix=exc.fix,
                               target=exc.target) from None

    return run


async def _kps(call: Call) -> KpsService:
    kps: KpsService = await call.resources.get("kps")
    return kps


async def _tasks(call: Call) -> TaskStore:
    store: TaskStore = await call.resources.get("task_store")
    return store


def _who(call: Call) -> dict[str, str]:
    return {"account": call.account, "user": call.principal.user}


def _body(call: Call) -> Mapping[str, Any]:
    return f.body_object(call.body)


def _millis(when: datetime | None) -> int:
    return 0 if when is None else int(when.timestamp() * 1000)


def _user_id(call: Call, record: KeyPairRecord) -> str | None:
    return call.principal.user_id if record.owner == call.principal.user else None


def _check_user_id(call: Call, data: Mapping[str, Any]) -> None:
    user_id = f.text(data, "user_id", required=False)
    if user_id not in (None, "", call.principal.user_id):
        raise invalid("user_id must be the caller's user id (a key pair belongs to its "
                      "creator)")


def _check_encryption(protection: Mapping[str, Any]) -> dict[str, Any]:
    """key_protection.encryption: the private key is kept under ``kps/default``."""
    enc = f.obj(protection, "encryption")
    assert enc is not None
    kind = f.required_text(enc, "type", choices=("default", "kms"))
    if kind == "kms":
        name = f.text(enc, "kms_key_name", required=False)
        key_id = f.text(enc, "kms_key_id", required=False)
        if name != SEAL_KEY or key_id:
            raise invalid(f"private keys are kept under the KMS key {SEAL_KEY} only",
                          f"Use encryption type default (or kms with kms_key_name "
                          f"{SEAL_KEY}).")
    return {"type": kind, **({"kms_key_name": SEAL_KEY} if kind == "kms" else {})}


# --------------------------------------------------------------------------- key pairs


def _keypair(record: KeyPairRecord) -> dict[str, Any]:
    return {"name": record.name, "type": record.key_type,
            "scope": SCOPE_NAMES[record.scope], "public_key": record.public_key,
            "fingerprint": record.fingerprint, "is_key_protection": record.managed,
            "frozen_state": "0"}


def _keypair_detail(call: Call, record: KeyPairRecord) -> dict[str, Any]:
    return {
        "name": record.name, "id": int(record.keypair_id[:13], 16), "type": record.key_type,
        "scope": SCOPE_NAMES[record.scope], "public_key": record.public_key,
        "fingerprint": record.fingerprint, "is_key_protection": record.managed,
        "deleted": False, "description": record.description,
        "user_id": _user_id(call, record), "create_time": _millis(record.created_at),
        "delete_time": 0, "update_time": _millis(record.updated_at), "frozen_state": 0,
        "key_id": SEAL_KEY if record.managed else "", "algorithm": record.algorithm,
    }


async def _create_one(call: Call, kps: KpsService, data: Mapping[str, Any]) -> dict[str, Any]:
    """One CreateKeypairAction: generate, or import (``public_key``, and a private key to
    keep in ``key_protection``)."""
    pair = f.obj(data, "keypair")
    assert pair is not None
    name = f.required_text(pair, "name", max_len=64)
    kind = f.text(pair, "type", required=False, default="ssh") or "ssh"
    if kind not in ("ssh", "x509"):
        raise InvalidInput(ssh_keys.INVALID_TYPE, code="invalid_keypair_type",
                           cause=f"type {kind[:20]!r} is neither ssh nor x509")
    scope_name = f.text(pair, "scope", required=False, default="user") or "user"
    if scope_name not in SCOPES:
        raise invalid(f"scope must be domain or user, got {scope_name[:20]!r}")
    _check_user_id(call, pair)
    public = f.text(pair, "public_key", required=False, max_len=16384)
    protection = f.obj(pair, "key_protection", required=False)
    private = None
    if protection is not None:
        _check_encryption(protection)
        private = f.text(protection, "private_key", required=False, max_len=16384)
    scope = SCOPES[scope_name]
    account, user = call.account, call.principal.user
    if public or private:
        if not public:
            assert private is not None
            loaded = ssh_keys.load_private_key(private.encode())
            public = ssh_keys.public_key_of(loaded.key, name).openssh()
        view = await kps.import_(name, public, kind,
                                 private_key=private.encode() if private else None,
                                 scope=scope, account=account, user=user)
        record, private_out = view.record, None
    else:
        if kind != "ssh":
            raise invalid("an x509 key pair is imported: give its certificate as public_key")
        created = await kps.create(name, DEFAULT_ALGORITHM, managed=protection is not None,
                                   scope=scope, account=account, user=user)
        record, private_out = created.view.record, created.private_key.decode()
    return {"name": record.name, "type": record.key_type, "public_key": record.public_key,
            "private_key": private_out, "fingerprint": record.fingerprint,
            "user_id": call.principal.user_id}


@_explained
async def create_keypair(call: Call) -> Any:
    return {"keypair": await _create_one(call, await _kps(call), _body(call))}


@_explained
async def batch_import_keypair(call: Call) -> Any:
    body = call.body
    if not isinstance(body, list) or not all(isinstance(i, Mapping) for i in body):
        raise invalid("the body must be a list of {\"keypair\": {...}}")
    kps = await _kps(call)
    if len(body) > kps.config.batch_limit:
        raise invalid(f"at most {kps.config.batch_limit} key pairs per call")
    failed: list[dict[str, str]] = []
    succeeded: list[dict[str, Any]] = []
    for item in body:
        pair = item.get("keypair")
        name = str(pair.get("name", "")) if isinstance(pair, Mapping) else ""
        try:
            succeeded.append({"keypair": await _create_one(call, kps, item)})
        except DewError as exc:
            reason = exc.message if not exc.cause or exc.cause in exc.message \
                else f"{exc.message} {exc.cause}"
            failed.append({"keypair_name": name, "failed_reason": reason})
    return {"failed_keypairs": failed, "succeeded_keypairs": succeeded}


@_explained
async def list_keypairs(call: Call) -> Any:
    limit = f.integer(call.query, "limit", required=False, default=50, low=1, high=1000) or 50
    marker = f.text(call.query, "marker", required=False, max_len=64) or None
    records = [v.record for v in await (await _kps(call)).list(**_who(call))]
    names = sorted({r.name for r in records})
    start = 0 if marker is None else next((i for i, n in enumerate(names) if n > marker),
                                          len(names))
    page = names[start:start + limit]
    by_name: dict[str, KeyPairRecord] = {}
    for r in records:  # a user's own pair wins over an account pair of that name
        if r.name not in by_name or r.scope == "user":
            by_name[r.name] = r
    more = start + limit < len(names)
    return {"keypairs": [{"keypair": _keypair(by_name[n])} for n in page],
            "page_info": {"next_marker": page[-1] if more and page else None,
                          "previous_marker": marker, "current_count": len(page)}}


@_explained
async def show_keypair(call: Call) -> Any:
    record = await (await _kps(call)).get(call.params["keypair_name"], **_who(call))
    return {"keypair": _keypair_detail(call, record)}


@_explained
async def update_keypair_description(call: Call) -> Any:
    pair = f.obj(_body(call), "keypair")
    assert pair is not None
    description = f.text(pair, "description", max_len=255)
    await (await _kps(call)).describe(call.params["keypair_name"], description or "",
                                      **_who(call))
    return Reply(status=204)


@_explained
async def delete_keypair(call: Call) -> Any:
    await (await _kps(call)).delete(call.params["keypair_name"], **_who(call))
    return Reply(status=204)


@_explained
async def import_private_key(call: Call) -> Any:
    pair = f.obj(_body(call), "keypair")
    assert pair is not None
    name = f.required_text(pair, "name", max_len=64)
    _check_user_id(call, pair)
    protection = f.obj(pair, "key_protection")
    assert protection is not None
    encryption = _check_encryption(protection)
    private = f.required_text(protection, "private_key", max_len=16384)
    record = await (await _kps(call)).keep_private_key(
        name, private.encode(), account=call.account, user=call.principal.user)
    return {"keypair": {"name": record.name, "user_id": _user_id(call, record),
                        "key_protection": {"encryption": encryption}}}


@_explained
async def export_private_key(call: Call) -> Any:
    pair = f.obj(_body(call), "keypair")
    assert pair is not None
    kps = await _kps(call)
    record = await kps.get(f.required_text(pair, "name", max_len=64), **_who(call))
    private = await kps.private_key(record)
    return {"keypair": {"name": record.name, "private_key": private.decode()}}


@_explained
async def batch_export_private_key(call: Call) -> Any:
    """The SDK reads this reply as text (``body: str``): a JSON string holding
    ``{"keypairs": [{"name", "private_key"}]}``."""
    body = call.body
    if not isinstance(body, list) or not body:
        raise invalid("the body must be a non-empty list of {\"keypair\": {\"name\": ...}}")
    kps = await _kps(call)
    if len(body) > kps.config.batch_limit:
        raise invalid(f"at most {kps.config.batch_limit} key pairs per call")
    out = []
    for item in body:
        pair = f.obj(f.body_object(item), "keypair")
        assert pair is not None
        record = await kps.get(f.required_text(pair, "name", max_len=64), **_who(call))
        out.append({"name": record.name,
                    "private_key": (await kps.private_key(record)).decode()})
    return json.dumps({"keypairs": out})


@_explained
async def clear_private_key(call: Call) -> Any:
    await (await _kps(call)).forget_private_key(call.params["keypair_name"], **_who(call))
    return Reply(status=204)


# --------------------------------------------------------------------------- servers


async def _server(kps: KpsService, account: str, ref: str) -> ServerRecord:
    """A server of the registry by its id or its name, in the caller's account."""
    if not isinstance(ref, str) or not ref or len(ref) > 64:
        raise invalid("server id: give the id or the name of a registered server")
    record = await kps.store.get_server(ref)
    if record is not None and record.account == account:
        return record
    try:
        return await kps.server(ref, account)
    except InvalidInput:
        raise ServerNotFound(f"no server {ref!r}") from None


def _server_json(server: ServerRecord) -> dict[str, Any]:
    data = server.to_json()
    data.pop("account", None)
    return {"id": server.server_id, **data}


@_explained
async def add_server(call: Call) -> Any:
    data = f.obj(_body(call), "server")
    assert data is not None
    record = await (await _kps(call)).add_server(
        f.required_text(data, "name", max_len=64), f.required_text(data, "host", max_len=253),
        port=f.integer(data, "port", required=False, default=22, low=1, high=65535) or 22,
        user=f.text(data, "user", required=False, default="root", max_len=32) or "root",
        host_key=f.text(data, "host_key", required=False, max_len=16384),
        trust_first_use=bool(f.boolean(data, "trust_first_use", default=False)),
        sshd_config=f.text(data, "sshd_config", required=False, max_len=4096),
        reload_command=f.text(data, "reload_command", required=False, max_len=4096),
        authorized_keys=f.text(data, "authorized_keys", required=False, max_len=4096),
        sudo=bool(f.boolean(data, "sudo", default=False)), account=call.account)
    return Reply({"server": _server_json(record)}, status=201)


@_explained
async def list_servers(call: Call) -> Any:
    kps = await _kps(call)
    return {"servers": [_server_json(s) for s in await kps.store.list_servers(call.account)]}


@_explained
async def show_server(call: Call) -> Any:
    kps = await _kps(call)
    server = await _server(kps, call.account, call.params["server_id"])
    return {"server": {**_server_json(server),
                       "keypairs": await kps.store.keypairs_on(server.server_id)}}


@_explained
async def delete_server(call: Call) -> Any:
    kps = await _kps(call)
    server = await _server(kps, call.account, call.params["server_id"])
    await kps.remove_server(server.name, call.account)
    return Reply(status=204)


# --------------------------------------------------------------------------- bind / unbind


def _credential(auth: Mapping[str, Any] | None, *, required: bool) -> dict[str, str] | None:
    """The hosted service's ``Auth {type, key}`` as the job's ``auth`` argument."""
    if auth is None:
        if required:
            raise invalid("server.auth is required: the password or private key the "
                          "engine logs in with")
        return None
    kind = f.required_text(auth, "type", choices=("password", "keypair"))
    key = f.required_text(auth, "key", max_len=16384)
    return {"password": key} if kind == "password" else {"private_key": key}


def _task_reply(task: TaskRecord, server: ServerRecord) -> dict[str, Any]:
    return {"task_id": task.task_id, "server_id": server.server_id,
            "status": _task_status(task), "error_code": None, "error_msg": None}


async def _bind_plan(call: Call, kps: KpsService, item: Mapping[str, Any]
                     ) -> tuple[dict[str, Any], ServerRecord]:
    """One AssociateKeypairRequestBody, checked (404 for unknown names), as job args."""
    name = f.required_text(item, "keypair_name", max_len=64)
    server_data = f.obj(item, "server")
    assert server_data is not None
    server = await _server(kps, call.account, f.required_text(server_data, "id"))
    port = f.integer(server_data, "port", required=False, low=1, high=65535)
    if port is not None and port != server.port:
        raise invalid(f"server {server.name!r} is registered on port {server.port}, not "
                      f"{port}", "Re-register the server with its SSH port.")
    auth = _credential(f.obj(server_data, "auth", required=False), required=True)
    await kps.get(name, **_who(call))
    args: dict[str, Any] = {"keypair": name, "servers": [server.name], **_who(call),
                            "auth": auth}  # sealed by the client: the job declares it secret
    if f.boolean(server_data, "disable_password", default=False):
        args["disable_pw_login"] = True
    return args, server


@_explained
async def associate_keypair(call: Call) -> Any:
    kps = await _kps(call)
    args, server = await _bind_plan(call, kps, _body(call))
    task = await call.jobs.enqueue("kps.bind", args)
    return _task_reply(task, server)


@_explained
async def batch_associate_keypair(call: Call) -> Any:
    kps = await _kps(call)
    items = f.objects(_body(call), "batch_keypairs")
    assert items is not None
    if not items:
        raise invalid("batch_keypairs is empty")
    limit = kps.config.batch_limit
    if len(items) > limit:
        raise BatchError(TOO_MANY, code="kps_batch_too_large",
                         cause=f"{len(items)} servers in one batch; the limit is {limit}",
                         fix="Bind fewer at once.")
    names = {str(i.get("keypair_name")) for i in items}
    if len(names) > 1:
        raise BatchError(INCONSISTENT, code="kps_batch_inconsistent",
                         cause=f"the batch names {', '.join(sorted(names))[:200]}",
                         fix="One key pair per batch.")
    # Everything is checked before the first job is enqueued.
    plans = [await _bind_plan(call, kps, item) for item in items]
    tasks = []
    for args, server in plans:
        tasks.append(_task_reply(await call.jobs.enqueue("kps.bind", args), server))
    return {"tasks": tasks}


async def _bound_pair(call: Call, kps: KpsService, server: ServerRecord,
                      private: str | None) -> KeyPairRecord:
    """The key pair to unbind: the caller's pair bound to ``server`` (the one whose
    private key was given, or the only one)."""
    pairs = []
    for keypair_id, _ in await kps.store.bound_keys(server.server_id):
        record = await kps.store.get_keypair(keypair_id)
        if record is not None and record.account == call.account and (
                record.scope == "account" or record.owner == call.principal.user):
            pairs.append(record)
    if not pairs:
        raise Conflict(f"no key pair of yours is bound to server {server.name!r}",
                       code="keypair_not_bound", fix="Nothing to disassociate.")
    if private is not None:
        own = ssh_keys.public_key_of(ssh_keys.load_private_key(private.encode()).key)
        for record in pairs:
            if ssh_keys.parse_public_key(record.public_key).blob == own.blob:
                return record
        raise InvalidInput(ssh_keys.MISMATCH, code="private_key_mismatch",
                           cause=f"the private key given is not that of a key pair bound to "
                           f"{server.name!r}", fix="Check both keys.")
    if len(pairs) > 1:
        raise invalid(f"several key pairs are bound to {server.name!r}: "
                      f"{', '.join(p.name for p in pairs)}",
                      "Give server.auth {type: keypair, key: PRIVATE KEY} to name one.")
    return pairs[0]


@_explained
async def disassociate_keypair(call: Call) -> Any:
    """Unbind: the engine logs in with the pair's private key (``auth`` type keypair, or
    the managed copy). ``auth`` type password: log in with the managed key and turn
    password login back on before the key goes."""
    kps = await _kps(call)
    server_data = f.obj(_body(call), "server")
    assert server_data is not None
    server = await _server(kps, call.account, f.required_text(server_data, "id"))
    auth = _credential(f.obj(server_data, "auth", required=False), required=False)
    given = auth.get("private_key") if auth else None
    record = await _bound_pair(call, kps, server, given)
    if given is None:
        if not record.managed:
            raise invalid(f"the private key of {record.name!r} is not managed",
                          "Give server.auth {type: keypair, key: PRIVATE KEY}.")
        given = (await kps.private_key(record)).decode()
    args: dict[str, Any] = {"keypair": record.name, "servers": [server.name], **_who(call),
                            "auth": {"private_key": given}}  # sealed by the client
    if auth is not None and "password" in auth:
        args["enable_pw_login"] = True
    task = await call.jobs.enqueue("kps.unbind", args)
    return _task_reply(task, server)


# --------------------------------------------------------------------------- tasks


def _task_status(task: TaskRecord) -> str:
    """FAILED_* when the task failed (every server failed, or the batch was refused)
    and when some of its servers failed (``partially_failed``); SUCCESS_* otherwise."""
    word = STATUS_WORD[task.status]
    if task.status == "succeeded" and isinstance(task.result, Mapping) \
            and task.result.get("failed"):
        word = "FAILED"
    return f"{word}_{OPERATE.get(task.name, 'RESET')}"


def _ours(task: TaskRecord | None) -> bool:
    return task is not None and task.name in OPERATE


def _servers_of(task: TaskRecord) -> list[str]:
    out = []
    for item in task.args.get("servers") or []:
        name = item.get("server") if isinstance(item, Mapping) else item
        out.append(str(name))
    return out


async def _server_id(kps: KpsService, account: str, name: str | None) -> str | None:
    if not name:
        return None
    record = await kps.store.find_server(account, name)
    return None if record is None else record.server_id


def _page(call: Call) -> tuple[int, int]:
    limit = f.integer(call.query, "limit", required=False, default=50, low=1, high=1000)
    offset = f.integer(call.query, "offset", required=False, default=0, low=0)
    return limit or 50, offset or 0


@_explained
async def show_task(call: Call) -> Any:
    store = await _tasks(call)
    task = await store.get_task(call.params["task_id"], project=call.account)
    if task is None or not _ours(task):
        raise NotFound(f"no key pair task {call.params['task_id'][:64]!r}",
                       code="task_not_found")
    servers = _servers_of(task)
    server_id = await _server_id(await _kps(call), call.account,
                                 servers[0] if servers else None)
    return {"server_id": server_id, "task_id": task.task_id, "task_status": _task_status(task)}


@_explained
async def list_running_tasks(call: Call) -> Any:
    limit, offset = _page(call)
    store = await _tasks(call)
    kps = await _kps(call)
    tasks: list[TaskRecord] = []
    for name in OPERATE:
        for status in ("queued", "running"):
            tasks += await store.list_tasks(status=status, name=name, limit=SCAN_LIMIT,
                                            project=call.account)
    tasks.sort(key=lambda t: t.enqueued_at, reverse=True)
    rows = []
    for task in tasks:
        for server in _servers_of(task):
            rows.append({"task_id": task.task_id, "operate_type": _task_status(task),
                         "task_time": str(_millis(task.enqueued_at)), "server_name": server,
                         "server_id": await _server_id(kps, call.account, server),
                         "keypair_name": task.args.get("keypair")})
    return {"total": len(rows), "tasks": rows[offset:offset + limit]}


async def _failures(call: Call) -> list[tuple[FailureRecord, TaskRecord]]:
    """The KPS failure records of the caller's project, newest first."""
    store = await _tasks(call)
    tasks: dict[str, TaskRecord | None] = {}
    out = []
    for name in OPERATE:
        for failure in await store.list_failures(operation=name, limit=SCAN_LIMIT,
                                                 project=call.account):
            if failure.task_id not in tasks:
                tasks[failure.task_id] = await store.get_task(failure.task_id)
            task = tasks[failure.task_id]
            if task is not None:
                out.append((failure, task))
    out.sort(key=lambda pair: pair[0].created_at, reverse=True)
    return out


@_explained
async def list_failed_tasks(call: Call) -> Any:
    limit, offset = _page(call)
    kps = await _kps(call)
    # One row per failed server: the task-level summary of a batch whose every server
    # failed (code kps_all_servers_failed, no target) repeats them, so it is left out
    # (DeleteFailedTask by task id still deletes it with the others).
    failures = [(failure, task) for failure, task in await _failures(call)
                if failure.code != ALL_FAILED]
    rows = []
    for failure, task in failures[offset:offset + limit]:
        servers = _servers_of(task)
        server = failure.target or (servers[0] if servers else None)
        rows.append({
            "task_id": task.task_id, "operate_type": f"FAILED_{OPERATE[task.name]}",
            "task_time": str(_millis(failure.created_at)), "task_error_code": failure.code,
            "task_error_msg": failure.error, "server_name": server,
            "server_id": await _server_id(kps, call.account, server),
            "keypair_name": task.args.get("keypair"),
        })
    return {"total": len(failures), "tasks": rows}


@_explained
async def delete_failed_task(call: Call) -> Any:
    """Every failure record of the task (or the one record with that failure id)."""
    ref = call.params["task_id"]
    store = await _tasks(call)
    gone = 0
    for failure, _ in await _failures(call):
        if ref in (failure.task_id, failure.failure_id):
            gone += await store.delete_failure(failure.failure_id)
    if not gone:
        raise NotFound(f"no failed key pair task {ref[:64]!r}", code="task_not_found")
    return Reply(status=204)


@_explained
async def delete_all_failed_tasks(call: Call) -> Any:
    store = await _tasks(call)
    for failure, _ in await _failures(call):
        await store.delete_failure(failure.failure_id)
    return Reply(status=204)


# --------------------------------------------------------------------------- the table


def _op(name: str, method: str, path: str, handler: Any, action: str | None,
        limit: str = MANAGE) -> Operation:
    return Operation(name, method, PREFIX + path, handler, action, limit)


def operations() -> list[Operation]:
    """The 18 operations of HUAWEI_API.md §7.3, and our servers registry."""
    return [
        _op("CreateKeypair", "POST", "/keypairs", create_keypair, "kps:keypair:create"),
        _op("ListKeypairs", "GET", "/keypairs", list_keypairs, "kps:keypair:list"),
        _op("ListKeypairDetail", "GET", "/keypairs/{keypair_name}", show_keypair,
            "kps:keypair:get"),
        _op("UpdateKeypairDescription", "PUT", "/keypairs/{keypair_name}",
            update_keypair_description, "kps:keypair:update"),
        _op("DeleteKeypair", "DELETE", "/keypairs/{keypair_name}", delete_keypair,
            "kps:keypair:delete"),
        _op("ImportPrivateKey", "POST", "/keypairs/private-key/import", import_private_key,
            "kps:keypair:import"),
        _op("ExportPrivateKey", "POST", "/keypairs/private-key/export", export_private_key,
            "kps:keypair:export"),
        _op("BatchExportPrivateKey", "POST", "/keypairs/private-key/batch-export",
            batch_export_private_key, "kps:keypair:export"),
        _op("BatchImportKeypair", "POST", "/keypairs/batch-import", batch_import_keypair,
            "kps:keypair:create"),
        _op("ClearPrivateKey", "DELETE", "/keypairs/{keypair_name}/private-key",
            clear_private_key, "kps:keypair:update"),
        _op("AssociateKeypair", "POST", "/keypairs/associate", associate_keypair,
            "kps:keypair:associate"),
        _op("BatchAssociateKeypair", "POST", "/keypairs/batch-associate",
            batch_associate_keypair, "kps:keypair:associate"),
        _op("DisassociateKeypair", "POST", "/keypairs/disassociate", disassociate_keypair,
            "kps:keypair:disassociate"),
        _op("ListKeypairTask", "GET", "/tasks/{task_id}", show_task, "kps:task:list"),
        _op("ListRunningTask", "GET", "/running-tasks", list_running_tasks, "kps:task:list"),
        _op("ListFailedTask", "GET", "/failed-tasks", list_failed_tasks, "kps:task:list"),
        _op("DeleteFailedTask", "DELETE", "/failed-tasks/{task_id}", delete_failed_task,
            "kps:task:delete"),
        _op("DeleteAllFailedTask", "DELETE", "/failed-tasks", delete_all_failed_tasks,
            "kps:task:delete"),
        # Ours: the servers registry (``dew servers``).
        _op("DewAddServer", "POST", "/dew/servers", add_server, "kps:server:create"),
        _op("DewListServers", "GET", "/dew/servers", list_servers, "kps:server:list"),
        _op("DewShowServer", "GET", "/dew/servers/{server_id}", show_server,
            "kps:server:list"),
        _op("DewDeleteServer", "DELETE", "/dew/servers/{server_id}", delete_server,
            "kps:server:delete"),
    ]
