"""The API's pure parts: routing on raw paths, the error table, a failed task's
error, and the [api] settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from engine.api.errors import BodyTooLarge, MethodNotAllowed, UnknownPath, error_reply
from engine.api.jobs import JobPending, task_error, task_result
from engine.api.operations import CRYPTO, Call, Operation
from engine.api.ratelimit import OverLimit, RateLimits, storage_uri
from engine.api.routing import Router
from engine.api.server import auto_data_processes, usable_cpus
from engine.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    ConfigError,
    Conflict,
    InternalError,
    InvalidInput,
    NotFound,
    PermanentError,
    PermissionDenied,
    SecurityError,
    TransientError,
)
from engine.models import TaskRecord, utcnow
from engine.redis_server import RedisServer
from engine.services import default_config_text
from engine.settings import build_settings, load_settings


async def handler(call: Call) -> Any:
    return None


def op(name: str, method: str, path: str, **options: Any) -> Operation:
    return Operation(name, method, path, handler, "x:y", **options)


def router() -> Router:
    r = Router()
    r.add_all([
        op("ListTags", "GET", "/v1.0/{project_id}/kms/tags"),
        op("ShowTags", "GET", "/v1.0/{project_id}/kms/{key_id}/tags"),
        op("ByTags", "POST", "/v1.0/{project_id}/kms/{resource_instances}/action"),
        op("Associate", "POST", "/v1.0/{project_id}/kms/alias/associate"),
        op("DeleteTag", "DELETE", "/v1.0/{project_id}/kms/{key_id}/tags/{key}"),
        op("Versions", "GET", "/"),
    ], "KMS", "kms")
    return r


def test_routes_match_raw_paths_literal_segments_first() -> None:
    r = router()
    route, params = r.resolve("GET", "/v1.0/p1/kms/tags")
    assert route is not None and route.operation.name == "ListTags"
    assert params == {"project_id": "p1"}
    route, params = r.resolve("POST", "/v1.0/p1/kms/alias/associate")
    assert route is not None and route.operation.name == "Associate"
    route, params = r.resolve("POST", "/v1.0/p1/kms/resource_instances/action")
    assert route is not None and route.operation.name == "ByTags"
    # A %2F stays inside its parameter; each parameter is decoded on its own.
    route, params = r.resolve("DELETE", "/v1.0/p1/kms/a%2Fb/tags/env%20x%C3%A9")
    assert route is not None and params == {"project_id": "p1", "key_id": "a/b",
                                            "key": "env xé"}
    route, _ = r.resolve("GET", "/v1.0/p1/kms/tags/")  # one trailing slash is ignored
    assert route is not None and route.operation.name == "ListTags"
    route, _ = r.resolve("GET", "/")
    assert route is not None and route.operation.name == "Versions"
    assert r.resolve("GET", "/v1.0/p1/kms/nothing/here/at/all") == (None, ())
    assert r.resolve("PUT", "/v1.0/p1/kms/k/tags") == (None, ("GET",))
    assert r.resolve("GET", "/v1.0/p1/kms/k/tags/x") == (None, ("DELETE",))
    assert len(r) == 6


@pytest.mark.parametrize(("operation", "message"), [
    (op("Again", "GET", "/v1.0/{p}/kms/{other}/tags"), "are both GET"),
    (op("Bad", "FETCH", "/x"), "unknown method"),
    (op("Bad", "GET", "x"), "must start with '/'"),
    (op("Bad", "GET", "/x/a{b}"), "a parameter must be a whole segment"),
    (op("Bad", "GET", "/x", limit="bulk"), "limit must be"),
])
def test_bad_declarations_are_refused(operation: Operation, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        router().add(operation, "KMS", "kms")


@pytest.mark.parametrize(("error", "status", "code"), [
    (AuthenticationFailed("x"), 401, "APIGW.0301"),
    (UnknownPath("x"), 404, "APIGW.0404"),
    (MethodNotAllowed("x", ("GET",)), 405, "APIGW.0405"),
    (BodyTooLarge("x"), 413, "KMS.0413"),
    (PermissionDenied("x"), 403, "KMS.0403"),
    (NotFound("x"), 404, "KMS.0404"),
    (Conflict("x"), 409, "KMS.0409"),
    (InvalidInput("x"), 400, "KMS.0400"),
    (ConfigError("x"), 400, "KMS.0400"),
    (SecurityError("x"), 400, "KMS.0410"),
    (PermanentError("x"), 400, "KMS.0420"),
    (OverLimit("x", 3), 429, "KMS.0429"),
    (BackendUnavailable("x"), 503, "KMS.0503"),
    (TransientError("x"), 503, "KMS.0530"),
    (InternalError("x"), 500, "KMS.0500"),
    (RuntimeError("x"), 500, "KMS.0500"),
])
def test_the_error_table(error: Exception, status: int, code: str) -> None:
    reply = error_reply(error, "KMS", "rid")
    assert (reply.status, reply.body["error_code"], reply.body["request_id"]) == (
        status, code, "rid")
    expected = "internal error, request id rid" if status == 500 else "x"
    assert reply.body["error_msg"] == expected


def test_error_headers_and_the_gateway_prefix() -> None:
    assert error_reply(InvalidInput("x"), None, "r").body["error_code"] == "APIGW.0400"
    assert error_reply(MethodNotAllowed("x", ("GET", "POST")), None, "r").headers == {
        "Allow": "GET, POST"}
    assert error_reply(BodyTooLarge("x"), "KMS", "r").headers == {"Connection": "close"}
    assert error_reply(OverLimit("x", 7), "KMS", "r").headers == {"Retry-After": "7"}
    assert error_reply(BackendUnavailable("x"), "KMS", "r").headers == {"Retry-After": "1"}
    secret = error_reply(ValueError("password=hunter2"), "KMS", "r")
    assert "hunter2" not in str(secret.body)


def task(status: str, error: dict[str, Any] | None = None, result: Any = None) -> TaskRecord:
    now = utcnow()
    return TaskRecord("t1", "kms.x", {}, status, 1, now, now, now, now, result,  # type: ignore[arg-type]
                      error, None)


@pytest.mark.parametrize(("error", "kind", "status"), [
    ({"code": "key_not_found", "category": "parameters", "message": "m"}, NotFound, 404),
    ({"code": "invalid_parameter", "category": "parameters", "message": "m"}, InvalidInput,
     400),
    ({"code": "key_state_invalid", "category": "state", "message": "m"}, Conflict, 409),
    ({"code": "seal_not_for_this_use", "category": "security", "message": "m"},
     SecurityError, 400),
    ({"code": "x", "category": "backend", "message": "m", "retryable": True},
     BackendUnavailable, 503),
    ({"code": "internal_error", "category": "internal", "message": "m"}, InternalError, 500),
    ({"code": "odd", "category": "odd", "message": "m", "retryable": True}, TransientError,
     503),
])
def test_a_failed_tasks_error_keeps_its_class(error: dict[str, Any], kind: type,
                                              status: int) -> None:
    rebuilt = task_error(task("failed", error))
    assert isinstance(rebuilt, kind) and rebuilt.code == error["code"] and rebuilt.message == "m"
    assert error_reply(rebuilt, "KMS", "r").status == status
    with pytest.raises(kind):
        task_result(task("failed", error))
    assert task_result(task("succeeded", result={"a": 1})) == {"a": 1}
    with pytest.raises(JobPending):
        task_result(task("running"))


def test_storage_uris() -> None:
    assert storage_uri("unix:///var/run/redis.sock") == "async+redis+unix:///var/run/redis.sock"
    assert storage_uri("redis://h:1/0") == "async+redis://h:1/0"
    assert storage_uri("rediss://h:1/0") == "async+rediss://h:1/0"


def test_api_settings_defaults_environment_and_checks() -> None:
    api = load_settings().api
    assert (api.listen, api.tls, api.max_body, api.rate_manage, api.rate_crypto,
            api.clock_skew, api.job_wait) == ("127.0.0.1:8443", True, 65536, "50/second",
                                              "1000/second", 900, 30.0)
    env = build_settings(default_config_text(), environ={
        "DEW_API_LISTEN": "[::1]:9443", "DEW_API_TLS_NAMES": "a.example, 10.0.0.5",
        "DEW_API_RATE_CRYPTO": "10 per 5 minutes; 100/hour", "DEW_API_TLS": "false"}).api
    assert (env.listen, env.tls_names, env.rate_crypto, env.tls) == (
        "[::1]:9443", ("a.example", "10.0.0.5"), "10 per 5 minutes; 100/hour", False)
    for variable, value, message in [
        ("DEW_API_LISTEN", "8443", "api.listen must be host:port"),
        ("DEW_API_RATE_MANAGE", "fast", "api.rate_manage must be a rate"),
        ("DEW_API_RATE_CRYPTO", "0/second", "api.rate_crypto must be a rate"),
        ("DEW_API_MAX_BODY", "0", "api.max_body must be at least 1"),
        ("DEW_API_CLOCK_SKEW", "0", "api.clock_skew must be between"),
        ("DEW_API_JOB_WAIT", "0", "api.job_wait must be above 0"),
        ("DEW_API_KEY_FILE", "/k.pem", "set both or neither"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_settings(default_config_text(), environ={variable: value})


def test_a_crypto_bucket_operation() -> None:
    assert op("Encrypt", "POST", "/e", limit=CRYPTO).limit == "crypto"


async def test_limits_on_a_unix_socket_redis(tmp_path: Path) -> None:
    """The private Redis of `make up` (a unix socket, no password) counts too."""
    server = RedisServer(tmp_path / "r", unix_socket=tmp_path / "r" / "redis.sock")
    server.start()
    try:
        settings = load_settings().replace(
            engine={"state_dir": tmp_path / "var"}, redis={"url": server.url},
            api={"rate_manage": "3/minute"})
        limits = RateLimits(settings)
        outcomes = []
        for _ in range(5):
            try:
                await limits.check("p1", "manage")
                outcomes.append(0)
            except OverLimit as exc:
                outcomes.append(exc.retry_after)
        await limits.check("p2", "manage")  # another project: its own count
        await limits.close()
    finally:
        server.stop()
    assert outcomes[:3] == [0, 0, 0] and all(55 <= s <= 60 for s in outcomes[3:])


async def test_processes_taking_calls_in_batches_never_pass_the_rate(tmp_path: Path) -> None:
    """Two API processes (two limiters on one Redis) take calls from the shared window
    in batches: together they never serve more than the rate, and lose at most one
    batch each to the batching."""
    server = RedisServer(tmp_path / "r", unix_socket=tmp_path / "r" / "redis.sock")
    server.start()
    try:
        settings = load_settings().replace(
            engine={"state_dir": tmp_path / "var"}, redis={"url": server.url},
            api={"rate_crypto": "500/minute"})
        first, second = RateLimits(settings), RateLimits(settings)
        served = 0
        for i in range(800):
            try:
                await (first if i % 3 else second).check("p1", "crypto")
                served += 1
            except OverLimit:
                pass
        await first.close()
        await second.close()
    finally:
        server.stop()
    batch = 500 // 50
    assert 500 - 2 * (batch - 1) <= served <= 500


def test_the_api_runs_one_data_process_by_default_only_with_a_cpu_to_spare() -> None:
    assert [auto_data_processes(n) for n in (1, 2, 4, 64)] == [0, 1, 1, 1]
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
