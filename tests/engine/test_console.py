"""The web console without a browser: its pure parts, its sessions in the real identity
store, and its pages served by the real API app (uvicorn, TLS) in this process, read
with ``requests``. The browser tests are tests/engine/test_console_browser.py."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import requests

from engine.api.testing import ApiServerThread
from engine.console import filters
from engine.console.auth import safe_next
from engine.console.sessions import Sessions, idle_over, token_hash
from engine.crypto import HsmConfig
from engine.iam.passwords import lockout_seconds, verify_password
from engine.iam.service import WRONG_SIGN_IN, Identities, SignInRefused, SignInThrottled
from engine.models import FailureRecord, utcnow
from engine.redis_server import RedisServer
from engine.settings import Settings, load_settings
from engine.sqlite_store import SqliteTaskStore
from tests.conftest import TEST_SETTINGS
from tests.helpers import link_shared_token

PASSWORD = "right-password-1"

# --------------------------------------------------------------------------- pure parts


def test_the_slow_down_grows_and_stops_growing() -> None:
    assert [lockout_seconds(n, 5, 30, 900) for n in (0, 4, 5, 6, 7, 10, 99)] == [
        0, 0, 30, 60, 120, 900, 900]


def test_filters_drop_everything_when_one_is_bad() -> None:
    spec = {"operation": filters.name, "since": filters.time,
            "status": filters.choice("failed", "running")}
    good = filters.read({"operation": "kps.bind", "since": "2026-01-02T03:04:05Z"}, spec)
    assert good.error is None and good["operation"] == "kps.bind"
    assert good["since"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC) and good.active
    bad = filters.read({"operation": "kps.bind", "since": "yesterday"}, spec)
    assert bad.error is not None and bad.error.startswith("The filter 'since' must be a time")
    assert not bad.active and bad.given["since"] == "yesterday"
    assert "must be one of failed, running" in str(filters.read({"status": "x"}, spec).error)
    backwards = filters.read({"since": "2026-02-01", "until": "2026-01-01"}, {
        "since": filters.time, "until": filters.time})
    assert backwards.error is not None and "after 'until'" in backwards.error


def test_after_sign_in_only_console_paths() -> None:
    assert safe_next("/console/tasks?status=failed") == "/console/tasks?status=failed"
    for bad in ("https://evil.example/", "//evil.example/console/", "/consolex", "/v1/x",
                "/console/sign-out", None, "/console/\\evil"):
        assert safe_next(bad) == "/console/"


def test_idle_expiry_is_a_plain_comparison() -> None:
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert not idle_over(now - timedelta(minutes=29), now, 30)
    assert idle_over(now - timedelta(minutes=30), now, 30)


# --------------------------------------------------------------------------- the store


@pytest.fixture
def console_settings(settings: Settings) -> Settings:
    return settings.replace(console={"lockout_after": 5, "lockout_seconds": 30,
                                     "lockout_max_seconds": 600})


async def _user(ids: Identities, name: str, roles: tuple[str, ...] = ()) -> str:
    user = await ids.create_user(name, "default", roles)
    await ids.set_password(name, PASSWORD)
    return user.user_id


@pytest.mark.slow  # argon2 hashes: a fifth of a second of CPU each
async def test_passwords_are_argon2id_and_sign_in_says_one_thing(
    console_settings: Settings
) -> None:
    async with await Identities.open(console_settings) as ids:
        user_id = await _user(ids, "erin")
        found = await ids.store.password_of("erin")
        assert found is not None and found[1] is not None
        assert found[1].startswith("$argon2id$") and PASSWORD not in found[1]
        assert verify_password(found[1], PASSWORD) and not verify_password(found[1], "x")
        assert (await ids.sign_in("erin", PASSWORD)).user_id == user_id
        refusals = []
        for name, password in (("erin", "wrong-one"), ("nobody", PASSWORD)):
            with pytest.raises(SignInRefused) as info:
                await ids.sign_in(name, password)
            refusals.append(info.value.message)
        await ids.disable_user("erin")
        with pytest.raises(SignInRefused) as info:
            await ids.sign_in("erin", PASSWORD)
        assert {*refusals, info.value.message} == {WRONG_SIGN_IN}


@pytest.mark.slow  # argon2 hashes: a fifth of a second of CPU each
async def test_wrong_passwords_in_a_row_slow_that_name_down(settings: Settings) -> None:
    # Two in a row here (five by default: [console] lockout_after), so that the test
    # checks few argon2 hashes: each costs a fifth of a second of CPU.
    settings = settings.replace(console={"lockout_after": 2, "lockout_seconds": 30})
    now = [datetime(2026, 1, 1, 12, tzinfo=UTC)]
    async with await Identities.open(settings) as ids:
        ids.clock = lambda: now[0]
        user_id = await _user(ids, "frank")
        with pytest.raises(SignInRefused):
            await ids.sign_in("frank", "wrong-password")
        assert (await ids.sign_in("frank", PASSWORD)).user_id == user_id  # a right one: count ends
        for _ in range(2):
            with pytest.raises(SignInRefused):
                await ids.sign_in("frank", "wrong-password")
        with pytest.raises(SignInThrottled) as info:
            await ids.sign_in("frank", PASSWORD)  # even the right password waits
        assert info.value.retry_after == 30 and "try again in 30 seconds" in info.value.message
        # Another process (its own connection to the store) sees the same count.
        async with await Identities.open(settings) as other:
            other.clock = ids.clock
            with pytest.raises(SignInThrottled):
                await other.sign_in("frank", PASSWORD)
        now[0] += timedelta(seconds=31)
        with pytest.raises(SignInRefused):
            await ids.sign_in("frank", "still-wrong")
        with pytest.raises(SignInThrottled) as info:
            await ids.sign_in("frank", PASSWORD)
        assert info.value.retry_after == 60  # one more wrong one doubled the wait
        # An unknown name is counted and slowed the same way: nothing tells it apart.
        for _ in range(2):
            with pytest.raises(SignInRefused):
                await ids.sign_in("nobody", "x-password")
        with pytest.raises(SignInThrottled):
            await ids.sign_in("nobody", "x-password")


@pytest.mark.slow
async def test_guesses_sent_at_once_are_checked_no_more_than_the_limit(
    settings: Settings,
) -> None:
    """A burst of parallel guesses (one process or several) must not all be checked
    before the first failures are counted: only ``lockout_after`` of them are."""
    settings = settings.replace(console={"lockout_after": 2, "lockout_seconds": 30})
    async with await Identities.open(settings) as ids, \
            await Identities.open(settings) as other:
        await _user(ids, "grace")
        results = await asyncio.gather(
            *((ids if n % 2 else other).sign_in("grace", f"guess-{n}") for n in range(8)),
            return_exceptions=True)
        checked = [r for r in results if isinstance(r, SignInRefused)]
        assert len(checked) <= 2 and len(checked) + sum(
            isinstance(r, SignInThrottled) for r in results) == 8, results
        with pytest.raises(SignInThrottled):
            await ids.sign_in("grace", PASSWORD)


def test_the_default_slows_down_after_five() -> None:
    assert load_settings().console.lockout_after == 5


async def test_sessions_end_when_idle_signed_out_or_the_password_changes(
    console_settings: Settings
) -> None:
    now = [datetime(2026, 1, 1, 12, tzinfo=UTC)]
    async with await Identities.open(console_settings) as ids:
        user_id = await _user(ids, "heidi")
        sessions = Sessions(ids.store, 30, clock=lambda: now[0])
        signed = await ids.sign_in("heidi", PASSWORD)
        assert signed.user_id == user_id
        first = await sessions.open(signed)
        assert len(first.token) >= 40 and first.csrf != first.token
        row = await ids.store.get_session(token_hash(first.token))
        assert row is not None and row[0] == user_id
        assert await ids.store.get_session(first.token) is None  # only the hash is stored
        now[0] += timedelta(minutes=29)
        assert await sessions.find(first.token) == first  # used: its idle time starts again
        now[0] += timedelta(minutes=29)
        assert await sessions.find(first.token) == first
        now[0] += timedelta(minutes=30)
        assert await sessions.find(first.token) is None  # idle: over, and gone
        assert await ids.store.get_session(token_hash(first.token)) is None
        second = await sessions.open(signed)
        assert await sessions.end(second.token)
        assert await sessions.find(second.token) is None
        third = await sessions.open(signed)
        await ids.set_password("heidi", "a-new-password")
        assert await sessions.find(third.token) is None
        assert await sessions.find("not-a-token") is None and await sessions.find(None) is None


@pytest.mark.slow  # argon2 hashes: a fifth of a second of CPU each
async def test_a_password_changed_during_a_sign_in_gets_it_no_session(
    console_settings: Settings
) -> None:
    """The old password was checked (a fifth of a second of argon2), then the password
    changed (or the user was disabled) before the session was stored: no session, the
    sign-in refused like a wrong password."""
    async with await Identities.open(console_settings) as ids:
        user_id = await _user(ids, "rita")
        sessions = Sessions(ids.store, 30)
        checked = await ids.sign_in("rita", PASSWORD)
        await ids.set_password("rita", "a-new-password")
        with pytest.raises(SignInRefused):
            await sessions.open(checked)
        assert await ids.store.count_sessions(user_id) == 0
        checked = await ids.sign_in("rita", "a-new-password")
        await ids.disable_user("rita")
        with pytest.raises(SignInRefused):
            await sessions.open(checked)
        assert await ids.store.count_sessions(user_id) == 0
        await ids.enable_user("rita")
        assert (await sessions.open(checked)).user_id == user_id


async def test_the_console_principal_is_read_anew(console_settings: Settings) -> None:
    async with await Identities.open(console_settings) as ids:
        user_id = await _user(ids, "ivan", ("DEW TaskReadOnlyAccess",))
        principal = await ids.principal_for(user_id, "127.0.0.1", "console")
        assert principal is not None and principal.allows("dew:tasks:list")
        assert not principal.allows("dew:failures:delete") and principal.access_key == "console"
        await ids.set_roles("ivan", ["DEW TaskOperator"])
        principal = await ids.principal_for(user_id, "127.0.0.1", "console")
        assert principal is not None and principal.allows("dew:failures:delete")
        await ids.disable_user("ivan")
        assert await ids.principal_for(user_id, "127.0.0.1", "console") is None


# --------------------------------------------------------------------------- the pages


@dataclass
class Site:
    server: ApiServerThread
    settings: Settings
    failure_id: str
    task_id: str

    def url(self, path: str) -> str:
        return f"{self.server.url}/console{path}"

    def session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # our CA only, not the environment's bundle
        s.verify = str(self.server.ca_file)
        return s

    def sign_in(self, who: str = "olga", password: str = PASSWORD) -> requests.Session:
        s = self.session()
        page = s.get(self.url("/sign-in"))
        reply = s.post(self.url("/sign-in"), data={
            "csrf": csrf_of(page.text), "user": who, "password": password,
            "next": "/console/"}, allow_redirects=False)
        assert reply.status_code == 303, reply.text
        return s


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html
    return found.group(1)


async def _site_data(settings: Settings) -> tuple[str, str]:
    async with await Identities.open(settings) as ids:
        project = await ids.create_project("siteproj")
        await ids.create_user("olga", project.name, ["DEW TaskOperator", "CSMS FullAccess",
                                                     "KMS Administrator",
                                                     "DEW KeypairFullAccess",
                                                     "DEW ScheduleFullAccess"])
        await ids.set_password("olga", PASSWORD)
        await ids.create_user("pete", project.name, ["DEW TaskReadOnlyAccess"])
        await ids.set_password("pete", PASSWORD)
    store = await SqliteTaskStore.open(settings.store_target)
    try:
        task_id, now = uuid.uuid4().hex, utcnow()
        await store.create_task(task_id, "engine.fail", {"message": "<b>boom</b>"}, now, now,
                                project="siteproj")
        failure = FailureRecord(
            failure_id=uuid.uuid4().hex, task_id=task_id, operation="engine.fail",
            target="web<script>1</script>", category="target", code="refused",
            error="The target refused the change.", cause="it said no",
            fix="Check the target.", created_at=now)
        await store.mark_failed(task_id, {"message": "The target refused the change."},
                                failure, now)
        return failure.failure_id, task_id
    finally:
        await store.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
         hsm_config: HsmConfig) -> Iterator[Site]:
    tmp: Path = tmp_path_factory.mktemp("site")
    if not redis_server.ping():
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    settings = link_shared_token(load_settings().replace(
        engine={"state_dir": tmp / "var"},
        redis={"url": redis_server.url, "queue": f"arq:queue:{uuid.uuid4().hex[:12]}"},
        **TEST_SETTINGS), hsm_config)
    failure_id, task_id = asyncio.run(_site_data(settings))
    with ApiServerThread(settings) as server:
        yield Site(server, settings, failure_id, task_id)


def test_a_page_needs_a_session_and_the_cookie_is_strict(site: Site) -> None:
    s = site.session()
    reply = s.get(site.url("/tasks"), allow_redirects=False)
    assert reply.status_code == 303
    assert reply.headers["Location"] == "/console/sign-in?next=%2Fconsole%2Ftasks"
    page = s.get(site.url("/sign-in"))
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers
    assert "script-src" not in page.headers["Content-Security-Policy"]  # none at all
    assert "<script" not in page.text and "http://" not in page.text
    token = csrf_of(page.text)
    refused = s.post(site.url("/sign-in"), data={"user": "olga", "password": PASSWORD},
                     allow_redirects=False)
    assert refused.status_code == 403 and "security token" in refused.text
    wrong = s.post(site.url("/sign-in"), data={"csrf": token, "user": "olga",
                                               "password": "nope-nope"})
    # Each form shown has a token of its own (cookie and field): the newest one counts.
    unknown = s.post(site.url("/sign-in"), data={"csrf": csrf_of(wrong.text), "user": "zed",
                                                 "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert WRONG_SIGN_IN in wrong.text and WRONG_SIGN_IN in unknown.text
    right = s.post(site.url("/sign-in"), data={"csrf": csrf_of(unknown.text), "user": "olga",
                                               "password": PASSWORD, "next": "/console/tasks"},
                   allow_redirects=False)
    assert right.status_code == 303 and right.headers["Location"] == "/console/tasks"
    cookie = next(c for c in right.headers["Set-Cookie"].split(", ")
                  if c.startswith("dew_console="))
    for part in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/console"):
        assert part in cookie, cookie
    assert s.get(site.url("/tasks")).status_code == 200


def test_every_area_renders_for_a_user_allowed_everything(site: Site) -> None:
    s = site.sign_in()
    for path, words in (("/", "Failures, last 24 h"), ("/failures", "The target refused"),
                        (f"/failures/{site.failure_id}", "Check the target."),
                        (f"/tasks/{site.task_id}", "Timeline"), ("/tasks", site.task_id),
                        ("/keys", "Keys"), ("/secrets", "No secrets"),
                        ("/keypairs", "No key pairs"), ("/schedules", "No schedules"),
                        ("/failures/delete-all", "Delete every failure record?")):
        page = s.get(site.url(path))
        assert page.status_code == 200, (path, page.text[-2000:])
        assert words in page.text, path
    report = s.get(site.url(f"/failures/{site.failure_id}")).text
    assert "web&lt;script&gt;1&lt;/script&gt;" in report and "<script>" not in report
    task = s.get(site.url(f"/tasks/{site.task_id}")).text
    assert "&lt;b&gt;boom&lt;/b&gt;" in task


def test_read_only_users_get_no_buttons_and_403_on_forms(site: Site) -> None:
    s = site.sign_in("pete")
    page = s.get(site.url("/failures"))
    assert page.status_code == 200 and "The target refused" in page.text
    assert ">Delete<" not in page.text and "Delete all" not in page.text
    assert "/keys" not in page.text  # no area the roles cannot list
    assert s.get(site.url("/failures/delete-all")).status_code == 403
    posted = s.post(site.url(f"/failures/{site.failure_id}/delete"),
                    data={"csrf": csrf_of(page.text)})
    assert posted.status_code == 403 and "dew:failures:delete" in posted.text
    assert s.get(site.url("/keys")).status_code == 403


def test_not_found_and_bad_input_are_console_pages(site: Site) -> None:
    s = site.sign_in()
    for path in ("/nope", "/failures/" + "0" * 32, "/keys/x/explode"):
        page = s.get(site.url(path))
        assert page.status_code in (404, 405), path
        assert "dew console" in page.text
    tasks = s.get(site.url("/tasks?since=soon"))
    assert tasks.status_code == 200 and "The filter &#39;since&#39; must be a time" in tasks.text
    assert site.task_id in tasks.text  # the unfiltered list
    form = s.get(site.url("/"))
    bad = s.post(site.url("/keys/k1/schedule-deletion"),
                 data={"csrf": csrf_of(form.text), "pending_days": "2"})
    assert bad.status_code == 400 and "pending days: give a whole number from 7" in bad.text


def test_sign_out_needs_the_token_and_ends_the_session(site: Site) -> None:
    s = site.sign_in()
    page = s.get(site.url("/"))
    assert s.post(site.url("/sign-out"), allow_redirects=False).status_code == 403
    out = s.post(site.url("/sign-out"), data={"csrf": csrf_of(page.text)},
                 allow_redirects=False)
    assert out.status_code == 303 and "signed-out" in out.headers["Location"]
    assert s.get(site.url("/"), allow_redirects=False).status_code == 303


def test_the_audit_page_lists_filters_and_verifies_the_chain(site: Site) -> None:
    s = site.sign_in()
    assert s.get(site.url("/keys")).status_code == 200  # ListKeys: an audited call
    page = s.get(site.url("/audit?operation=list_keys"))
    assert page.status_code == 200 and "list_keys" in page.text
    assert "ak=console" in page.text  # the console's calls are audited as the API's
    verified = s.post(site.url("/audit/verify"), data={"csrf": csrf_of(page.text)})
    assert verified.status_code == 200 and "The audit chain is intact" in verified.text
    bad = s.get(site.url("/audit?outcome=maybe"))
    assert bad.status_code == 200 and "outcome" in bad.text and "list_keys" in bad.text
    assert site.sign_in("pete").get(site.url("/audit")).status_code == 403
