"""The HTTPS API end to end: uvicorn over real TLS, requests built and signed by the
official SDK (trusting our ca.pem), a test-only echo service, identities from a
stand-in store. In-process servers (ApiServerThread) for most checks, real
``dew api`` processes for the rate limit shared across processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from huaweicloudsdkcore.exceptions.exceptions import (
    ClientRequestException,
    ServerResponseException,
    SslHandShakeException,
)

from engine.api.app import bare_echo_route
from engine.api.testing import ApiServerThread, StaticCaller, StaticIdentities
from engine.logs import configure_logging
from engine.redis_server import free_port
from engine.settings import Settings
from tests.engine.api_echo_service import api as echo_api
from tests.engine.api_echo_service import sdk
from tests.engine.api_echo_service.jobs import VARIABLE, write_identities
from tests.helpers import ROOT, WorkerProcess, dew_env

SERVICES = ["handlers.builtin", "tests.engine.api_echo_service"]
MAX_BODY = 4096


@pytest.fixture(autouse=True)
def sdk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the SDK writes ~/.huaweicloud


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    api_settings = settings.replace(engine={"services": SERVICES}, api={"max_body": MAX_BODY})
    # In-process servers log where `dew api` would: the state directory's dew.log.
    configure_logging(api_settings.log_file, "debug", console="off")
    return api_settings


@pytest.fixture
def identities() -> StaticIdentities:
    return StaticIdentities()


@pytest.fixture
def alice(identities: StaticIdentities) -> StaticCaller:
    return identities.add(actions={"echo:call", "echo:crypto"}, project="acme", user="alice")


@pytest.fixture
def server(api_settings: Settings, identities: StaticIdentities) -> Iterator[ApiServerThread]:
    with ApiServerThread(api_settings, identities=identities,
                         extra_routes=[bare_echo_route()]) as running:
        yield running


@pytest.fixture
def connect(server: ApiServerThread) -> Iterator[Any]:
    """``connect(caller, secret_key=None)``: an SDK client of that caller; all closed
    at the end (an idle keep-alive connection would hold the server's shutdown)."""
    made: list[sdk.GenericClient] = []

    def factory(caller: StaticCaller, **options: Any) -> sdk.GenericClient:
        client = sdk.caller_client(server.url, caller, server.ca_file, **options)
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()


def refusal(call: Any) -> ClientRequestException | ServerResponseException:
    """The SDK's exception for a call that must fail."""
    try:
        call()
    except (ClientRequestException, ServerResponseException) as exc:
        return exc
    raise AssertionError("the call succeeded")


def https(server: ApiServerThread) -> requests.Session:
    """Plain requests, trusting only our CA (the environment's bundle left out)."""
    http = requests.Session()
    http.trust_env = False
    http.verify = str(server.ca_file)
    return http


def handler_runs() -> int:
    return len(echo_api.CALLS)


# --- signed calls -----------------------------------------------------------------------


def test_signed_sdk_calls_reach_the_handler(connect: Any, alice: StaticCaller) -> None:
    client = connect(alice)
    reply = client.call("POST", "/v1/{project_id}/echo/{name}", path_params={"name": "a b/é"},
                        query=[("marker", "x/y z"), ("limit", 10)],
                        body={"value": "wörld", "n": 7})
    assert reply.status_code == 200
    echoed = sdk.body_of(reply)
    assert echoed["op"] == "Echo"
    assert echoed["params"] == {"project_id": alice.project_id, "name": "a b/é"}
    assert echoed["query"] == {"marker": "x/y z", "limit": "10"}
    assert echoed["body"] == {"value": "wörld", "n": 7}
    assert (echoed["project"], echoed["user"], echoed["source_ip"]) == (
        "acme", "alice", "127.0.0.1")
    response = client.last
    assert response.headers["X-Request-Id"] == echoed["request_id"]
    assert len(echoed["request_id"]) == 32
    assert response.headers["Content-Type"] == "application/json;charset=UTF-8"

    # A literal segment wins over a parameter of the same place.
    assert sdk.body_of(client.call("POST", "/v1/{project_id}/echo/literal"))["params"] == {
        "project_id": alice.project_id}
    got = sdk.body_of(client.call("GET", "/v1/{project_id}/echo/{name}",
                                  path_params={"name": "k"}, query=[("flag", True)]))
    assert (got["op"], got["query"], got["body"]) == ("EchoGet", {"flag": "true"}, None)
    deleted = client.call("DELETE", "/v1/{project_id}/echo/{name}", path_params={"name": "k"})
    assert (deleted.status_code, client.last.content) == (204, b"")
    assert "X-Request-Id" in client.last.headers
    empty = client.call("POST", "/v1/{project_id}/empty")
    assert (empty.status_code, sdk.body_of(empty)) == (200, {})


def test_the_real_kms_client_works_against_the_server(
    server: ApiServerThread, alice: StaticCaller,
) -> None:
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkkms.v2 import KmsClient, ListKmsTagsRequest

    kms = (KmsClient.new_builder()
           .with_credentials(BasicCredentials(alice.access_key, alice.secret_key.decode(),
                                              alice.project_id))
           .with_http_config(sdk.http_config(server.ca_file))
           .with_endpoints([server.url]).build())
    try:
        reply = kms.list_kms_tags(ListKmsTagsRequest())
    finally:
        kms.close()
    assert reply.status_code == 200
    assert [(t.key, t.values) for t in reply.tags] == [("project", ["acme"])]


def test_the_sdk_refuses_the_server_without_our_ca(server: ApiServerThread,
                                                   alice: StaticCaller) -> None:
    client = sdk.caller_client(server.url, alice, None)  # the default trust store
    try:
        with pytest.raises(SslHandShakeException):
            client.call("POST", "/v1/{project_id}/empty")
    finally:
        client.close()


# --- authentication -----------------------------------------------------------------


def test_a_wrong_secret_key_is_401_apigw_0301(connect: Any, alice: StaticCaller) -> None:
    before = handler_runs()
    error = refusal(lambda: connect(alice, secret_key="x" * 40).call(
        "POST", "/v1/{project_id}/echo/n", body={"v": 1}))
    assert (error.status_code, error.error_code) == (401, "APIGW.0301")
    assert error.error_msg == ("Incorrect IAM authentication information: "
                               "signature does not match")
    assert len(error.request_id) == 32
    assert handler_runs() == before


@pytest.mark.parametrize("minutes", [16, -16])
def test_a_skewed_date_is_refused(connect: Any, alice: StaticCaller, minutes: int) -> None:
    date = (datetime.now(UTC) - timedelta(minutes=minutes)).strftime("%Y%m%dT%H%M%SZ")
    error = refusal(lambda: connect(alice).call("POST", "/v1/{project_id}/empty",
                                                headers={"X-Sdk-Date": date}))
    assert (error.status_code, error.error_code) == (401, "APIGW.0301")
    assert "X-Sdk-Date is 9" in error.error_msg and "s away from the server clock" in (
        error.error_msg)
    # Within the allowed skew the same client is served.
    date = (datetime.now(UTC) - timedelta(minutes=10)).strftime("%Y%m%dT%H%M%SZ")
    assert connect(alice).call("POST", "/v1/{project_id}/empty",
                               headers={"X-Sdk-Date": date}).status_code == 200


def test_unsigned_and_malformed_requests(server: ApiServerThread, alice: StaticCaller) -> None:
    url = f"{server.url}/v1/{alice.project_id}/empty"
    with https(server) as http:
        missing = http.post(url, json={})
        assert missing.status_code == 401
        assert missing.json() == {
            "error_code": "APIGW.0301",
            "error_msg": "Incorrect IAM authentication information: missing Authorization "
                         "header",
            "request_id": missing.headers["X-Request-Id"]}
        bad = http.post(url, json={}, headers={"Authorization": "Bearer abc"})
        assert bad.json()["error_msg"].endswith("malformed Authorization header")
        sm3 = http.post(url, json={}, headers={
            "Authorization": "SDK-HMAC-SM3 Access=AK, SignedHeaders=host;x-sdk-date, "
                             "Signature=" + "0" * 64})
        assert "unsupported signing algorithm SDK-HMAC-SM3" in sm3.json()["error_msg"]


def test_unknown_and_inactive_keys_get_one_message(
    connect: Any, identities: StaticIdentities, alice: StaticCaller,
) -> None:
    inactive = identities.add(actions={"echo:*"}, active=False)
    unknown = StaticCaller("AKUNKNOWN00000000000", b"s" * 40, True, "u", "bob", "p" * 32,
                           "acme", frozenset({"echo:*"}))
    messages = set()
    for caller in (inactive, unknown):
        error = refusal(lambda c=caller: connect(c).call("POST", "/v1/{project_id}/empty"))
        assert (error.status_code, error.error_code) == (401, "APIGW.0301")
        messages.add(error.error_msg)
    assert messages == {"Incorrect IAM authentication information: unknown or inactive "
                        "access key"}


def test_a_source_outside_the_users_networks_is_refused(
    connect: Any, identities: StaticIdentities,
) -> None:
    fenced = identities.add(actions={"echo:*"}, cidrs=["10.0.0.0/8", "fd00::/8"])
    error = refusal(lambda: connect(fenced).call("POST", "/v1/{project_id}/empty"))
    assert (error.status_code, error.error_code) == (401, "APIGW.0301")
    assert error.error_msg == ("Incorrect IAM authentication information: "
                               "current ip:127.0.0.1 refused")
    inside = identities.add(actions={"echo:*"}, cidrs=["10.0.0.0/8", "127.0.0.0/8"])
    assert connect(inside).call("POST", "/v1/{project_id}/empty").status_code == 200


def test_real_identities_apply_on_the_next_request(api_settings: Settings) -> None:
    """engine.iam's store (no stand-in): a role change, an inactive key, a disabled
    user each apply to the very next call."""
    from engine.iam.service import Identities

    async def setup() -> tuple[str, str, str]:
        ids = await Identities.open(api_settings)
        try:
            project = await ids.create_project("shop")
            await ids.create_user("app", "shop", roles=["Echo User"])
            key, secret = await ids.create_access_key("app")
            return key.access_key, secret, project.project_id
        finally:
            await ids.close()

    async def change(step: str, ak: str) -> None:
        ids = await Identities.open(api_settings)
        try:
            if step == "admin":
                await ids.set_roles("app", ["Echo Admin"])
            elif step == "inactive":
                await ids.set_access_key_status(ak, "inactive")
            elif step == "active":
                await ids.set_access_key_status(ak, "active")
            else:
                await ids.disable_user("app")
        finally:
            await ids.close()

    ak, sk, project_id = asyncio.run(setup())
    with ApiServerThread(api_settings) as server:
        client = sdk.client(server.url, ak, sk, project_id, server.ca_file)
        try:
            echoed = sdk.body_of(client.call("POST", "/v1/{project_id}/echo/x"))
            assert (echoed["project"], echoed["user"]) == ("shop", "app")
            error = refusal(lambda: client.call("POST", "/v1/{project_id}/admin"))
            assert (error.status_code, error.error_msg) == (
                403, "user app is not allowed to do echo:admin")
            asyncio.run(change("admin", ak))
            assert client.call("POST", "/v1/{project_id}/admin").status_code == 200
            unknown = "Incorrect IAM authentication information: unknown or inactive access key"
            for step in ("inactive", "active", "disabled"):
                asyncio.run(change(step, ak))
                if step == "active":
                    assert client.call("POST", "/v1/{project_id}/empty").status_code == 200
                    continue
                error = refusal(lambda: client.call("POST", "/v1/{project_id}/empty"))
                assert (error.status_code, error.error_msg) == (401, unknown)
        finally:
            client.close()


# --- authorization -------------------------------------------------------------------


def test_a_missing_action_is_403_naming_it(connect: Any, alice: StaticCaller) -> None:
    before = handler_runs()
    error = refusal(lambda: connect(alice).call("POST", "/v1/{project_id}/admin"))
    assert (error.status_code, error.error_code) == (403, "ECHO.0403")
    assert error.error_msg == "user alice is not allowed to do echo:admin"
    assert handler_runs() == before


def test_another_projects_path_is_403(server: ApiServerThread, alice: StaticCaller) -> None:
    other = sdk.client(server.url, alice.access_key, alice.secret_key.decode(), "f" * 32,
                       server.ca_file)
    try:
        error = refusal(lambda: other.call("POST", "/v1/{project_id}/empty"))
    finally:
        other.close()
    assert (error.status_code, error.error_code) == (403, "ECHO.0403")
    assert error.error_msg == f"project {'f' * 32} is not the caller's project"


# --- the error shape -----------------------------------------------------------------


def test_unknown_paths_and_methods_in_the_error_shape(server: ApiServerThread) -> None:
    with https(server) as http:
        missing = http.get(f"{server.url}/v1/p/nothing/here")
        assert missing.status_code == 404
        assert missing.headers["Content-Type"] == "application/json;charset=UTF-8"
        assert missing.json() == {"error_code": "APIGW.0404",
                                  "error_msg": "no API operation at /v1/p/nothing/here",
                                  "request_id": missing.headers["X-Request-Id"]}
        wrong = http.patch(f"{server.url}/v1/p/echo/n")
        assert wrong.status_code == 405
        assert wrong.headers["Allow"] == "DELETE, GET, POST"
        assert wrong.json()["error_code"] == "APIGW.0405"
        assert len(wrong.headers["X-Request-Id"]) == 32
        assert wrong.headers["X-Request-Id"] != missing.headers["X-Request-Id"]
        # The plain Starlette route beside the API (for benchmarks) answers too.
        assert http.post(f"{server.url}/bench/echo", json={"a": 1}).json() == {"a": 1}


def test_a_body_that_is_not_json_is_400_naming_body(connect: Any, alice: StaticCaller) -> None:
    before = handler_runs()
    error = refusal(lambda: connect(alice).call("POST", "/v1/{project_id}/echo/n",
                                                body="{not json"))
    assert (error.status_code, error.error_code) == (400, "ECHO.0400")
    assert error.error_msg.startswith("body: is not valid JSON")
    assert handler_runs() == before


def test_an_unexpected_exception_is_500_with_the_request_id_only(
    connect: Any, alice: StaticCaller, api_settings: Settings,
) -> None:
    client = connect(alice)
    error = refusal(lambda: client.call("POST", "/v1/{project_id}/crash"))
    assert (error.status_code, error.error_code) == (500, "ECHO.0500")
    assert error.error_msg == f"internal error, request id {error.request_id}"
    assert b"hunter2" not in client.last.content and b"Traceback" not in client.last.content
    assert client.last.headers["X-Request-Id"] == error.request_id
    # The traceback is in the server's log, with the request id.
    failed = logged(api_settings, error.request_id, "api call failed")
    assert "RuntimeError" in failed["exception"]
    line = logged(api_settings, error.request_id, "api request")
    assert (line["status"], line["op"], line["project"], line["user"]) == (
        500, "Crash", "acme", "alice")
    assert line["duration_ms"] >= 0 and line["method"] == "POST"


def logged(settings: Settings, request_id: str, event: str) -> dict[str, Any]:
    """The log line ``event`` of request ``request_id`` (written just after the reply)."""
    deadline = time.monotonic() + 10
    while True:
        for text in settings.log_file.read_text().splitlines():
            line = json.loads(text)
            if line.get("request_id") == request_id and line["event"] == event:
                return line  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"no {event!r} line for {request_id}"
        time.sleep(0.05)


# --- body size ---------------------------------------------------------------------------


def test_a_declared_oversized_body_is_413_before_anything_else(
    connect: Any, alice: StaticCaller,
) -> None:
    before = handler_runs()
    error = refusal(lambda: connect(alice).call("POST", "/v1/{project_id}/echo/n",
                                                body={"v": "x" * MAX_BODY}))
    assert (error.status_code, error.error_code) == (413, "ECHO.0413")
    assert f"over the {MAX_BODY}-byte limit" in error.error_msg
    assert handler_runs() == before


def test_a_streamed_oversized_body_is_refused_before_it_ends(
    server: ApiServerThread, alice: StaticCaller,
) -> None:
    """Chunked, no Content-Length: the server answers 413 while the body is still
    coming (it never sees its end), and the handler never runs."""
    before = handler_runs()
    context = ssl.create_default_context(cafile=str(server.ca_file))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall((f"POST /v1/{alice.project_id}/echo/n HTTP/1.1\r\n"
                     f"Host: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b"x" * 1024
        sent = 0
        answer = b""
        while sent < 1024 * 1024 and not answer:
            tls.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            if select.select([tls], [], [], 0.05)[0]:
                tls.settimeout(0.05)  # readable may be a TLS 1.3 session ticket alone
                with contextlib.suppress(TimeoutError):
                    answer = tls.recv(65536)
                tls.settimeout(10)
        # No terminating chunk was ever sent: the answer came mid-body.
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert sent <= 4 * MAX_BODY
        while True:  # the rest of the reply, up to the server's close
            more = tls.recv(65536)
            if not more:
                break
            answer += more
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"x-request-id: " in head.lower() and b"connection: close" in head.lower()
        assert json.loads(body)["error_code"] == "ECHO.0413"
    assert handler_runs() == before


# --- rate limits ---------------------------------------------------------------------


def test_limits_hold_across_two_api_processes_sharing_redis(
    api_settings: Settings, tmp_path: Path,
) -> None:
    identities = StaticIdentities()
    acme = identities.add(actions={"echo:*"}, project="acme")
    other = identities.add(actions={"echo:*"}, project="other")
    write_identities(tmp_path / "identities.json", [acme, other])
    env = dew_env(api_settings, DEW_API_RATE_MANAGE="10/minute",
                  DEW_API_RATE_CRYPTO="1000/second",
                  **{VARIABLE: str(tmp_path / "identities.json")})
    first, second = DewApi(env, tmp_path / "a.err"), DewApi(env, tmp_path / "b.err")
    clients: list[sdk.GenericClient] = []
    try:
        for api in (first, second):
            api.start()
            assert api.line.startswith("dew api listening on https://127.0.0.1:")
            assert api.line.endswith(f"(CA: {api_settings.state_dir / 'tls' / 'ca.pem'})")
        ca = api_settings.state_dir / "tls" / "ca.pem"
        a = sdk.caller_client(first.url, acme, ca)
        b = sdk.caller_client(second.url, acme, ca)
        clients += [a, b]
        outcomes = []
        for i in range(12):  # alternately through each process
            client = (a, b)[i % 2]
            try:
                outcomes.append(client.call("POST", "/v1/{project_id}/empty").status_code)
            except ClientRequestException as exc:
                outcomes.append(exc.status_code)
                assert exc.error_code == "ECHO.0429"
                assert "project " + acme.project_id in exc.error_msg
                assert int(client.last.headers["Retry-After"]) >= 1
        assert outcomes == [200] * 10 + [429, 429]
        # Another bucket, and another project, are counted apart.
        assert a.call("POST", "/v1/{project_id}/crypto").status_code == 200
        c = sdk.caller_client(second.url, other, ca)
        clients.append(c)
        assert c.call("POST", "/v1/{project_id}/empty").status_code == 200
    finally:
        for client in clients:
            client.close()
        codes = [api.stop() for api in (first, second)]
    assert codes == [0, 0]  # SIGTERM: a clean stop
    log = api_settings.log_file.read_text()
    assert log.count('"Application shutdown complete."') >= 2


def test_a_redis_outage_lets_calls_through_with_one_warning(
    api_settings: Settings, identities: StaticIdentities, alice: StaticCaller,
) -> None:
    dead = api_settings.replace(redis={"url": f"redis://default:pw@127.0.0.1:{free_port()}/0"},
                                api={"rate_manage": "1/minute"})
    with ApiServerThread(dead, identities=identities) as server:
        client = sdk.caller_client(server.url, alice, server.ca_file)
        try:
            codes = [client.call("POST", "/v1/{project_id}/empty").status_code
                     for _ in range(3)]
        finally:
            client.close()
    assert codes == [200, 200, 200]
    warnings = [line for line in dead.log_file.read_text().splitlines()
                if "rate limits not applied while Redis cannot be reached" in line]
    assert len(warnings) == 1


# --- jobs ------------------------------------------------------------------------------


def test_a_call_that_runs_a_job_waits_for_it_or_answers_202(
    api_settings: Settings, identities: StaticIdentities, alice: StaticCaller, tmp_path: Path,
) -> None:
    settings = api_settings.replace(api={"job_wait": 1.0})
    worker = WorkerProcess(settings, tmp_path / "worker.out").start()
    try:
        with ApiServerThread(settings, identities=identities) as server:
            client = sdk.caller_client(server.url, alice, server.ca_file)
            try:
                done = client.call("POST", "/v1/{project_id}/jobs/sleep", body={"seconds": 0})
                assert sdk.body_of(done) == {"result": 0}
                assert len(client.last.headers["X-Dew-Task-Id"]) == 32
                pending = client.call("POST", "/v1/{project_id}/jobs/sleep",
                                      body={"seconds": 3})
                assert pending.status_code == 202
                task_id = client.last.headers["X-Dew-Task-Id"]
                assert sdk.body_of(pending) == {"task_id": task_id, "task_status": "running"}
            finally:
                client.close()
    finally:
        worker.stop()


# --- a `dew api` process -------------------------------------------------------------


class DewApi:
    """``dew api --listen 127.0.0.1:0``: the port is read from the line it prints."""

    def __init__(self, env: dict[str, str], stderr: Path) -> None:
        self.env = env
        self.stderr = stderr
        self.proc: subprocess.Popen[str] | None = None
        self.line = ""

    @property
    def url(self) -> str:
        return self.line.split()[4]

    def start(self, timeout: float = 30) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "api", "--listen", "127.0.0.1:0"],
            env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.stderr.open("w"),
            text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        self.line = self.proc.stdout.readline().strip() if ready else ""
        if not self.line:
            raise RuntimeError(f"dew api did not start: {self.stderr.read_text()[-2000:]}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
        code = self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code
