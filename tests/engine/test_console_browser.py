"""The web console in a real headless browser (Debian's Chromium, Selenium, chromedriver)
against a real ``dew api`` over TLS, a real worker, Redis and the SoftHSM token.

One API stack and one browser serve the module; the tests run in order and share the
failure that a real failing bind makes (a server whose port is closed). Screenshots of
the dashboard, a failed-task report and a task page are taken on the way (written to
docs/console/ with DEW_TEST_SCREENSHOTS=1).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from engine.crypto import HsmConfig
from engine.iam.service import Identities
from engine.redis_server import RedisServer
from tests.api_process import ApiStack, api_stack
from tests.console_browser import Browser, available
from tests.helpers import run_dew

pytestmark = pytest.mark.slow

if (why := available()) is not None:
    pytest.skip(why, allow_module_level=True)

PORT_FAILURE = "SSH connection failure. Check your port."
WRONG = "Wrong user name or password."
SECRET_VALUE = "s3cr3t-console-value-42"
PASSWORDS = {"operator": "operator-password-1", "viewer": "viewer-password-1"}
PLAN = {
    "operator": ("conproj", ["DEW TaskOperator", "DEW KeypairFullAccess", "KMS Administrator",
                             "CSMS FullAccess", "DEW ScheduleFullAccess"], ()),
    "viewer": ("conproj", ["DEW TaskReadOnlyAccess", "DEW KeypairReadOnlyAccess",
                           "KMS CMKReadOnlyAccess", "CSMS ReadOnlyAccess"], ()),
}
# A failing server fails fast: one retry, a short connect timeout.
KPS = {"connect_timeout": 3.0, "login_timeout": 5.0, "command_timeout": 10.0, "retries": 1,
       "retry_delay": 0.2}
ENGINE = "/v1/{project_id}/dew"


@dataclass
class Console:
    stack: ApiStack
    browser: Browser
    failed_task: str
    failure_id: str

    def url(self, path: str = "/") -> str:
        return f"{self.stack.api.url}/console{path}"

    def sign_in(self, who: str, password: str | None = None) -> None:
        self.browser.open(self.url("/sign-in"))
        self.browser.fill(user=who, password=password or PASSWORDS[who])
        self.browser.press("Sign in")

    def sign_out(self) -> None:
        self.browser.press("Sign out", "form.who")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_task(stack: ApiStack, task_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task: dict[str, Any] = stack.raw("operator", "GET", f"/tasks/{task_id}",
                                         prefix=ENGINE).json()
        if task["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return task
        time.sleep(0.2)


def failures_of(stack: ApiStack, task_id: str) -> list[dict[str, Any]]:
    listed = stack.raw("operator", "GET", "/failures", prefix=ENGINE).json()["failures"]
    return [r for r in listed if r["task_id"] == task_id]


def failing_bind(stack: ApiStack) -> str:
    """A managed key pair bound to a server whose port is closed: the bind fails through
    the real worker and leaves the product's failed-task report. Its task id."""
    pair = stack.raw("operator", "POST", "/keypairs", {"keypair": {
        "name": "web", "key_protection": {"encryption": {"type": "default"}}}})
    assert pair.status_code == 200, pair.body
    server = stack.raw("operator", "POST", "/dew/servers", {"server": {
        "name": "down1", "host": "127.0.0.1", "port": _closed_port(), "user": "root",
        "trust_first_use": True}})
    assert server.status_code == 201, server.body
    bind = stack.raw("operator", "POST", "/keypairs/associate", {
        "keypair_name": "web", "server": {"id": server.json()["server"]["id"],
                                          "auth": {"type": "password", "key": "pw-unused"}}})
    assert bind.status_code == 200, bind.body
    task_id: str = bind.json()["task_id"]
    assert wait_task(stack, task_id)["status"] == "failed"
    return task_id


async def _passwords(stack: ApiStack) -> None:
    async with await Identities.open(stack.settings) as ids:
        for who, password in PASSWORDS.items():
            await ids.set_password(who, password)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
            hsm_config: HsmConfig) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    with api_stack(tmp, redis_server, hsm_config, PLAN, None, kps=KPS) as stack:
        asyncio.run(_passwords(stack))
        secret = stack.raw("operator", "POST", "/secrets", {
            "name": "db-password", "secret_string": SECRET_VALUE}, prefix="/v1/{project_id}")
        assert secret.status_code == 200, secret.body
        task_id = failing_bind(stack)
        # One record per server with the product's message (and the batch's summary).
        records = [r for r in failures_of(stack, task_id) if r["target"] == "down1"]
        assert [r["error"] for r in records] == [PORT_FAILURE], records
        with Browser.start(tmp) as browser:
            yield Console(stack, browser, task_id, records[0]["failure_id"])


def test_sign_in_says_one_thing_for_any_wrong_pair(console: Console) -> None:
    b = console.browser
    b.open(console.url("/failures"))
    assert "/console/sign-in" in b.url and "Sign in" in b.title
    for who, password in (("operator", "not-the-password"), ("nobody-at-all", "whatever1")):
        console.sign_in(who, password)
        assert WRONG in b.text and "/console/sign-in" in b.url
    cookie = b.cookie("dew_console")
    assert cookie is None
    console.sign_in("operator")
    assert b.title.startswith("Dashboard")
    cookie = b.cookie("dew_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["secure"]
    assert cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert "Failures, last 24 h" in b.text and "Tasks, last 24 h" in b.text
    b.screenshot("dashboard")


def test_the_failing_bind_is_reported_with_the_products_words(console: Console) -> None:
    b = console.browser
    b.open(console.url("/failures"))
    report = b.driver.find_element("id", f"f-{console.failure_id}").text
    assert PORT_FAILURE in report and "kps.bind" in report and "down1" in report
    assert "Cause" in report and "Fix" in report
    b.follow("kps.bind")
    assert b.title.startswith("Failed-task report") and PORT_FAILURE in b.text
    assert console.failed_task in b.text
    b.screenshot("failed-task-report")
    b.follow(console.failed_task)
    assert b.title.startswith(f"Task {console.failed_task}")
    text = b.text
    assert "failed" in text and "down1" in text and "Timeline" in text
    assert "pw-unused" not in b.source  # the bind's password: sealed, never shown
    b.screenshot("task")


def test_delete_one_and_it_is_gone_from_dew_failures_list(console: Console) -> None:
    b = console.browser
    b.open(console.url(f"/failures/{console.failure_id}"))
    b.press("Delete")
    assert "/console/failures" in b.url and "Deleted." in b.text
    assert console.failure_id not in b.source
    done = run_dew(console.stack.settings, "failures", "list", "--json")
    assert done.returncode == 0, done.stderr
    assert console.failure_id not in {r["failure_id"] for r in json.loads(done.stdout)}


def test_delete_all_asks_first(console: Console) -> None:
    stack, b = console.stack, console.browser
    task = stack.raw("operator", "POST", "/tasks", {"name": "engine.fail", "args": {
        "message": "console: the target refused", "target": "t1"}}, prefix=ENGINE).json()
    assert wait_task(stack, task["task_id"])["status"] == "failed"
    b.open(console.url("/failures"))
    assert "console: the target refused" in b.text
    b.follow("Delete all…")
    assert "Delete every failure record?" in b.text and "This deletes" in b.text
    left = stack.raw("operator", "GET", "/failures", prefix=ENGINE).json()["failures"]
    assert left, "nothing is deleted before the answer"
    b.press("Yes, delete them")
    assert "The failure records were deleted." in b.text
    assert stack.raw("operator", "GET", "/failures", prefix=ENGINE).json()["failures"] == []


def test_a_form_without_its_csrf_token_is_refused(console: Console) -> None:
    b = console.browser
    b.open(console.url("/failures"))
    b.post_form(console.url("/failures/delete-all"), {"operation": ""})
    assert "403" in b.title or "Not allowed" in b.text
    assert "security token" in b.text


def test_signing_out_ends_the_session_everywhere(console: Console) -> None:
    b = console.browser
    b.open(console.url("/"))
    token = b.cookie("dew_console")
    assert token is not None
    console.sign_out()
    assert "/console/sign-in" in b.url and "You are signed out." in b.text
    b.open(console.url("/tasks"))
    assert "/console/sign-in" in b.url
    # The old cookie, replayed by hand, opens nothing: the session is gone server-side.
    status, location = _get(console, "/console/tasks", f"dew_console={token['value']}")
    assert status == 303 and "/console/sign-in" in location


def test_a_read_only_user_sees_no_delete_and_is_refused_anyway(console: Console) -> None:
    stack, b = console.stack, console.browser
    task = stack.raw("operator", "POST", "/tasks", {"name": "engine.fail", "args": {
        "message": "console: read-only check", "target": "t2"}}, prefix=ENGINE).json()
    assert wait_task(stack, task["task_id"])["status"] == "failed"
    record = failures_of(stack, task["task_id"])[0]
    console.sign_in("viewer")
    b.open(console.url("/failures"))
    assert "console: read-only check" in b.text
    assert "Delete" not in b.buttons() and "Retry" not in b.buttons()
    assert "Delete all…" not in b.text
    b.post_form(console.url(f"/failures/{record['failure_id']}/delete"), {"csrf": b.csrf()})
    assert "403" in b.title and "dew:failures:delete" in b.text
    left = stack.raw("operator", "GET", "/failures", prefix=ENGINE).json()["failures"]
    assert record["failure_id"] in {r["failure_id"] for r in left}


def test_a_secret_value_is_not_in_the_page_of_a_user_who_may_not_read_it(
    console: Console
) -> None:
    b = console.browser  # still the viewer: CSMS ReadOnlyAccess has no getValue
    b.open(console.url("/secrets/db-password"))
    assert b.title.startswith("Secret db-password") and "v1" in b.text
    assert SECRET_VALUE not in b.source and "Show the value" not in b.buttons()
    b.post_form(console.url("/secrets/db-password/reveal"),
                {"csrf": b.csrf(), "version": "v1"})
    assert "403" in b.title and SECRET_VALUE not in b.source
    console.sign_out()
    console.sign_in("operator")
    b.open(console.url("/secrets/db-password"))
    assert SECRET_VALUE not in b.source  # shown only when asked for
    b.press("Show the value")
    assert SECRET_VALUE in b.text and "audit log" in b.text


def test_unknown_pages_and_bad_filters(console: Console) -> None:
    b = console.browser
    b.open(console.url("/no-such-page"))
    assert "404" in b.title and "There is no console page at /console/no-such-page" in b.text
    assert b.driver.find_elements("css selector", "header.top")  # the console's style
    b.open(console.url("/failures?since=yesterday&operation=kps.bind"))
    assert "The filter 'since' must be a time" in b.text
    assert "showing the unfiltered list" in b.text
    b.open(console.url("/tasks?status=exploded"))
    assert "The filter 'status' must be one of" in b.text and "engine.fail" in b.text


def _get(console: Console, path: str, cookie: str) -> tuple[int, str]:
    url = urlparse(console.stack.api.url)
    context = ssl.create_default_context(cafile=str(console.stack.api.ca))
    conn = http.client.HTTPSConnection(url.hostname or "127.0.0.1", url.port, context=context,
                                       timeout=10)
    try:
        conn.request("GET", path, headers={"Cookie": cookie})
        reply = conn.getresponse()
        reply.read()
        return reply.status, reply.getheader("Location") or ""
    finally:
        conn.close()


def test_screenshots_were_taken(console: Console) -> None:
    shots = console.browser.shots
    for name in ("dashboard", "failed-task-report", "task"):
        data = Path(shots / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name
