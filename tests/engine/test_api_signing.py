"""SDK-HMAC-SHA256 verification (engine.api.signing) against requests the official
SDK built, signed and sent: captured off the wire by a bare HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from engine.api import signing
from engine.errors import AuthenticationFailed
from tests.engine.api_echo_service import sdk

AK = "HPUAQ1YBUJXN3ZGZQWKD"
SK = "f0sVu2GHrB9cEkqYyoSqnNmTvMB1OeqDXc7xRBkd"
PROJECT = "0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class Captured:
    method: str
    target: str  # the raw request target, as it came off the wire
    headers: list[tuple[str, str]]
    body: bytes

    def request(self) -> signing.SignedRequest:
        path, _, query = self.target.partition("?")
        # http.server decodes header bytes as latin-1; the SDK sent UTF-8.
        headers = {k.lower(): v.encode("latin-1").decode("utf-8") for k, v in self.headers}
        return signing.SignedRequest(self.method, path, query, headers, self.body)


class _Capture(BaseHTTPRequestHandler):
    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.captured.append(  # type: ignore[attr-defined]
            Captured(self.command, self.path, list(self.headers.items()), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = do_PUT = do_DELETE = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def capture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the SDK writes ~/.huaweicloud
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    server.captured = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = sdk.client(f"http://127.0.0.1:{server.server_port}", AK, SK, PROJECT)

    def send(method: str, path: str, **options: Any) -> Captured:
        client.call(method, path, **options)
        return server.captured[-1]  # type: ignore[attr-defined, no-any-return]

    yield send
    client.close()
    server.shutdown()
    server.server_close()


def verify(captured: Captured, secret_key: str = SK) -> signing.Authorization:
    request = captured.request()
    auth = signing.parse_authorization(request.headers.get("authorization"))
    signing.check_date(request.headers.get("x-sdk-date"), datetime.now(UTC), 900)
    signing.verify(request, auth, secret_key.encode())
    return auth


CASES = {
    "post non-ascii json": dict(method="POST", path="/v1.0/{project_id}/kms/create-key",
                                body={"key_alias": "ключ/é", "n": 7, "ok": True}),
    "path with a space, é and %2F": dict(method="DELETE", path="/v1/{project_id}/secrets/{name}",
                                         path_params={"name": "a b/é~"}),
    "query with %2F, +, space, é, ~, *": dict(
        method="GET", path="/v1/{project_id}/secrets",
        query=[("limit", 10), ("marker", "a b+c/é~*"), ("empty", ""), ("flag", True)]),
    "delete, empty body": dict(method="DELETE", path="/v1.0/{project_id}/kms/{key_id}/tags/{key}",
                               path_params={"key_id": "k-1", "key": "env"}),
    "post, no body": dict(method="POST", path="/v1/{project_id}/secrets/{name}/rotate",
                          path_params={"name": "db"}),
    "put": dict(method="PUT", path="/v1/{project_id}/secrets/{name}",
                path_params={"name": "db"}, body={"description": "x"}),
    "root": dict(method="GET", path="/"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_real_sdk_requests_verify_with_the_right_key_only(capture: Any, case: str) -> None:
    options = dict(CASES[case])
    captured = capture(options.pop("method"), options.pop("path"), **options)
    auth = verify(captured)
    assert auth.access_key == AK
    assert {"host", "x-sdk-date", "content-type", "x-project-id"} <= set(auth.signed_headers) \
        or case == "root"
    with pytest.raises(AuthenticationFailed, match="signature does not match"):
        verify(captured, secret_key=SK[:-1] + "X")


def test_the_wire_forms_the_cases_cover(capture: Any) -> None:
    spaced = capture("DELETE", "/v1/{project_id}/secrets/{name}", path_params={"name": "a b/é"})
    assert spaced.target == f"/v1/{PROJECT}/secrets/a%20b%2F%C3%A9"
    assert spaced.body == b""
    # The %2F is signed as '/': the canonical URI has one more segment.
    assert signing.canonical_uri(spaced.target) == f"/v1/{PROJECT}/secrets/a%20b/%C3%A9/"
    queried = capture("GET", "/v1/{project_id}/secrets", query=[("marker", "x/y z")])
    assert queried.target.endswith("?marker=x%2Fy%20z")
    posted = capture("POST", "/v1/{project_id}/x", body={"v": "é"})
    assert json.loads(posted.body) == {"v": "é"}


@pytest.mark.parametrize("tamper", ["method", "path", "query", "body", "header", "date"])
def test_any_change_to_a_signed_part_breaks_the_signature(capture: Any, tamper: str) -> None:
    captured = capture("POST", "/v1/{project_id}/secrets/{name}", path_params={"name": "db"},
                       query=[("a", "1")], body={"v": 1})
    headers = list(captured.headers)
    if tamper == "method":
        captured = replace(captured, method="PUT")
    elif tamper == "path":
        captured = replace(captured, target=captured.target.replace("/db?", "/dc?"))
    elif tamper == "query":
        captured = replace(captured, target=captured.target.replace("a=1", "a=2"))
    elif tamper == "body":
        captured = replace(captured, body=b'{"v": 2}')
    elif tamper == "header":
        captured = replace(captured, headers=[
            (k, "other" if k.lower() == "x-project-id" else v) for k, v in headers])
    else:
        later = (datetime.now(UTC) + timedelta(seconds=1)).strftime(signing.DATE_FORMAT)
        captured = replace(captured, headers=[
            (k, later if k.lower() == "x-sdk-date" else v) for k, v in headers])
    with pytest.raises(AuthenticationFailed, match="signature does not match"):
        verify(captured)


def test_unsigned_headers_may_change(capture: Any) -> None:
    captured = capture("POST", "/v1/{project_id}/x", body={"v": 1})
    verify(replace(captured, headers=[*captured.headers, ("Accept-Encoding", "br")]))


# --- the pure parts --------------------------------------------------------------------


@pytest.mark.parametrize(("header", "message"), [
    (None, "missing Authorization header"),
    ("", "missing Authorization header"),
    ("Bearer abc", "malformed Authorization header"),
    ("SDK-HMAC-SHA256 Access=AK, SignedHeaders=host;x-sdk-date", "malformed Authorization"),
    ("SDK-HMAC-SHA256 Access=AK, SignedHeaders=host;x-sdk-date, Signature=zz",
     "malformed Authorization"),
    ("SDK-HMAC-SM3 Access=AK, SignedHeaders=host;x-sdk-date, Signature=" + "a" * 64,
     "unsupported signing algorithm SDK-HMAC-SM3"),
    ("SDK-HMAC-SHA256 Access=AK, SignedHeaders=content-type;x-sdk-date, Signature=" + "a" * 64,
     "must cover the host header"),
    ("SDK-HMAC-SHA256 Access=AK, SignedHeaders=host, Signature=" + "a" * 64,
     "must cover the x-sdk-date header"),
    ("SDK-HMAC-SHA256 Access=AK, SignedHeaders=host;X Y;x-sdk-date, Signature=" + "a" * 64,
     "malformed Authorization"),
])
def test_authorization_header_refusals_name_the_check(header: str | None, message: str) -> None:
    with pytest.raises(AuthenticationFailed, match=message) as info:
        signing.parse_authorization(header)
    assert info.value.message.startswith("Incorrect IAM authentication information: ")


def test_the_date_must_be_fresh_and_well_formed() -> None:
    now = datetime(2026, 12, 1, 21, 46, 1, tzinfo=UTC)
    assert signing.check_date("20261201T214601Z", now, 900) == now
    assert signing.check_date("20261201T213101Z", now, 900)  # exactly 900 s: accepted
    with pytest.raises(AuthenticationFailed,
                       match="X-Sdk-Date is 960 s away from the server clock"):
        signing.check_date("20261201T213001Z", now, 900)
    with pytest.raises(AuthenticationFailed, match="960 s away"):
        signing.check_date("20261201T220201Z", now, 900)  # the future too
    for bad in ("2026-12-01T21:46:01Z", "20261301T214601Z", "20261201T214601", "x"):
        with pytest.raises(AuthenticationFailed, match="malformed X-Sdk-Date"):
            signing.check_date(bad, now, 900)
    with pytest.raises(AuthenticationFailed, match="missing X-Sdk-Date"):
        signing.check_date(None, now, 900)


def test_canonical_forms() -> None:
    assert signing.canonical_uri("/") == "/"
    assert signing.canonical_uri("/v1/p/x") == "/v1/p/x/"
    assert signing.canonical_uri("/v1/p/a%20b%2Fc%7E") == "/v1/p/a%20b/c~/"
    assert signing.canonical_query("") == ""
    assert signing.canonical_query("b=2&a=1&a=0&c=") == "a=0&a=1&b=2&c="
    assert signing.canonical_query("m=a%2Fb%20c%2B~") == "m=a%2Fb%20c%2B~"
    assert signing.query_pairs("flag&m=a+b") == [("flag", ""), ("m", "a+b")]


def test_a_signed_header_that_is_missing_is_refused() -> None:
    request = signing.SignedRequest("GET", "/", "", {"host": "h", "x-sdk-date": "d"}, b"")
    auth = signing.Authorization("AK", ("host", "x-sdk-date", "x-project-id"), "a" * 64)
    with pytest.raises(AuthenticationFailed, match="signed header x-project-id is missing"):
        signing.verify(request, auth, b"sk")


def test_sign_and_verify_round_trip() -> None:
    request = signing.SignedRequest(
        "POST", "/v1/p/x", "b=1&a=2",
        {"host": "h:1", "x-sdk-date": "20261201T214601Z", "content-type": "application/json"},
        b'{"a": 1}')
    value = signing.sign(request, "AK", b"sk", ("host", "x-sdk-date", "content-type"))
    auth = signing.parse_authorization(value)
    assert auth.signed_headers == ("content-type", "host", "x-sdk-date")
    signing.verify(request, auth, b"sk")
    with pytest.raises(AuthenticationFailed):
        signing.verify(request, auth, b"other")
