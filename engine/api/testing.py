"""For tests: the API served in this process on a free loopback port, and a
stand-in identity store.

    identities = StaticIdentities()
    caller = identities.add(actions={"echo:*"})          # AK / SK / project made up
    with ApiServerThread(settings, identities=identities) as server:
        ...  # server.url, server.ca_file; the SDK trusts server.ca_file

The server runs uvicorn (uvloop, httptools, real TLS from ``STATE_DIR/tls``) on
its own thread and event loop, so synchronous clients (the official SDKs) call
it from the test's thread.
"""

from __future__ import annotations

import ipaddress
import secrets
import string
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from starlette.routing import BaseRoute

from engine.api.app import ServiceApi, build_app
from engine.api.principal import Principal
from engine.api.ratelimit import RateLimits
from engine.api.server import ApiServer, bind_socket, uvicorn_config
from engine.api.signing import refused
from engine.api.tls import Transport, prepare
from engine.resources import Resources
from engine.settings import Settings


@dataclass(frozen=True)
class StaticCaller:
    """What engine.iam's Caller holds (access key, SK, user, project, actions, networks)."""

    access_key: str
    secret_key: bytes = field(repr=False)
    active: bool
    user_id: str
    user: str
    project_id: str
    project: str
    actions: frozenset[str]
    cidrs: tuple[str, ...] = ()

    def principal(self, source_ip: str) -> Principal:
        if self.cidrs and not any(_inside(source_ip, cidr) for cidr in self.cidrs):
            raise refused(f"current ip:{source_ip} refused")
        return Principal(project_id=self.project_id, project=self.project, user_id=self.user_id,
                         user=self.user, access_key=self.access_key, source_ip=source_ip,
                         actions=self.actions)


def _inside(ip: str, cidr: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


def _token(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


class StaticIdentities:
    """An in-memory ``identities`` resource: ``caller(ak)`` -> StaticCaller or None."""

    def __init__(self, callers: Iterable[StaticCaller] = ()) -> None:
        self._by_key = {c.access_key: c for c in callers}

    def add(self, *, actions: Iterable[str] = ("*",), project: str = "acme",
            project_id: str | None = None, user: str = "alice", cidrs: Sequence[str] = (),
            active: bool = True, access_key: str | None = None,
            secret_key: str | None = None) -> StaticCaller:
        caller = StaticCaller(
            access_key=access_key or _token(string.ascii_uppercase + string.digits, 20),
            secret_key=(secret_key or _token(string.ascii_letters + string.digits, 40)).encode(),
            active=active, user_id=secrets.token_hex(16), user=user,
            project_id=project_id or secrets.token_hex(16), project=project,
            actions=frozenset(actions), cidrs=tuple(cidrs),
        )
        self._by_key[caller.access_key] = caller
        return caller

    async def caller(self, access_key: str) -> StaticCaller | None:
        return self._by_key.get(access_key)


class ApiServerThread:
    """``build_app`` under uvicorn on a thread of its own, on ``host`` and a free port."""

    def __init__(
        self, settings: Settings, *, identities: Any = None, resources: Resources | None = None,
        apis: Sequence[ServiceApi] | None = None, limits: RateLimits | None = None,
        extra_routes: Sequence[BaseRoute] = (), host: str = "127.0.0.1",
    ) -> None:
        self.settings = settings
        # Resources made here are the app's: closed at shutdown, on the server's loop.
        self.resources = resources if resources is not None else Resources(settings)
        if identities is not None:
            self.resources.put("identities", identities)
        sock = bind_socket(host, 0)
        self.port = int(sock.getsockname()[1])
        self.transport: Transport = prepare(settings, host, self.port)
        self.app = build_app(settings, apis=apis, resources=self.resources,
                             close_resources=resources is None, limits=limits,
                             extra_routes=extra_routes)
        self._sock = sock
        self.server = ApiServer(uvicorn_config(self.app, self.transport))
        self._thread = threading.Thread(target=self._run, name="api-server", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self.transport.url(self.port)

    @property
    def ca_file(self) -> Path | None:
        return self.transport.ca_file

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:  # noqa: BLE001 - shown by start()
            self._error = exc

    def start(self, timeout: float = 20) -> ApiServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API server did not start: {self._error!r}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._sock.close()

    def __enter__(self) -> ApiServerThread:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
