"""The echo service's operations (prefix ``ECHO``).

``CALLS`` records every handler run in this process, so a test can prove a
refused request never reached its handler.
"""

from __future__ import annotations

from typing import Any

from engine.api.fields import body_object, required_integer
from engine.api.jobs import task_result
from engine.api.operations import CRYPTO, MANAGE, Call, Operation, Reply
from engine.api.principal import RoleCatalog

ERROR_PREFIX = "ECHO"
CALLS: list[str] = []
ROLES = RoleCatalog(
    roles={"Echo User": ("echo:call", "echo:crypto"), "Echo Admin": ("echo:*",)},
    actions={"echo:call": "call the echo operations", "echo:crypto": "the crypto bucket",
             "echo:admin": "the admin operation"},
)


def _seen(call: Call, name: str) -> dict[str, Any]:
    CALLS.append(name)
    return {
        "op": name, "params": dict(call.params), "query": dict(call.query), "body": call.body,
        "project": call.account, "project_id": call.principal.project_id,
        "user": call.principal.user, "source_ip": call.principal.source_ip,
        "request_id": call.request_id,
    }


async def echo(call: Call) -> Any:
    return _seen(call, "Echo")


async def echo_get(call: Call) -> Any:
    return _seen(call, "EchoGet")


async def echo_delete(call: Call) -> Reply:
    _seen(call, "EchoDelete")
    return Reply(status=204)


async def crypto(call: Call) -> Any:
    return _seen(call, "Crypto")


async def admin(call: Call) -> Any:
    return _seen(call, "Admin")


async def crash(call: Call) -> Any:
    CALLS.append("Crash")
    raise RuntimeError("the database password is hunter2")  # never in a reply


async def empty(call: Call) -> None:
    CALLS.append("Empty")
    return None


async def sleep_job(call: Call) -> Any:
    CALLS.append("SleepJob")
    seconds = required_integer(body_object(call.body), "seconds", low=0, high=60)
    task = await call.jobs.run("engine.sleep", {"seconds": seconds})
    return {"result": task_result(task)}


async def list_kms_tags(call: Call) -> Any:
    """KMS ListKmsTags' shape, so the real KmsClient can call this service."""
    CALLS.append("ListKmsTags")
    return {"tags": [{"key": "project", "values": [call.account]}]}


def operations() -> list[Operation]:
    base = "/v1/{project_id}"
    return [
        Operation("Echo", "POST", base + "/echo/{name}", echo, "echo:call"),
        Operation("EchoGet", "GET", base + "/echo/{name}", echo_get, "echo:call"),
        Operation("EchoDelete", "DELETE", base + "/echo/{name}", echo_delete, "echo:call"),
        Operation("EchoLiteral", "POST", base + "/echo/literal", echo, "echo:call"),
        Operation("Crypto", "POST", base + "/crypto", crypto, "echo:crypto", limit=CRYPTO),
        Operation("Admin", "POST", base + "/admin", admin, "echo:admin", limit=MANAGE),
        Operation("Crash", "POST", base + "/crash", crash, "echo:call"),
        Operation("Empty", "POST", base + "/empty", empty, "echo:call"),
        Operation("SleepJob", "POST", base + "/jobs/sleep", sleep_job, "echo:call"),
        Operation("ListKmsTags", "GET", "/v1.0/{project_id}/kms/tags", list_kms_tags,
                  "echo:call"),
    ]
