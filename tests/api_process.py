"""``dew api`` in a subprocess, official-SDK clients pointed at it, and the stack the
SDK tests share (tests only): a state directory, identities, a worker and the API."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.crypto import HsmConfig
from engine.redis_server import RedisServer
from engine.settings import Settings, load_settings
from tests.conftest import TEST_SETTINGS
from tests.helpers import (
    ROOT,
    WorkerProcess,
    dew_env,
    link_shared_token,
    run_dew,
    stop_process,
)
from tests.pg_store import on_postgresql, process_cluster


class ApiProcess:
    """A real ``dew api`` over TLS on a free loopback port."""

    def __init__(self, settings: Settings, log_path: Path, **env: str) -> None:
        self.settings = settings
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = _free_port()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.settings.state_dir / "tls" / "ca.pem"

    def start(self, timeout: float = 30) -> ApiProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dew_env(self.settings, DEW_API_LISTEN=f"127.0.0.1:{self.port}", **self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "api"], env=env, cwd=ROOT,
            stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dew api exited: {self.log_path.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"dew api did not listen: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sdk_home(path: Path) -> None:
    """The SDKs write ~/.huaweicloud/application_id: keep it out of the real home."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(path)


def sdk_client(client_class: Any, api: ApiProcess, ak: str, sk: str, project_id: str) -> Any:
    """An official SDK client (``KmsClient``, ``CsmsClient``, ``KpsClient``) as its users
    build it, trusting our ``ca.pem`` (no ``ignore_ssl_verification``)."""
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.http.http_config import HttpConfig

    config = HttpConfig.get_default_config()
    config.ssl_ca_cert = str(api.ca)
    config.timeout = (10, 60)
    return (client_class.new_builder()
            .with_credentials(BasicCredentials(ak, sk, project_id))
            .with_http_config(config)
            .with_endpoints([api.url])
            .build())


def kms_client(api: ApiProcess, ak: str, sk: str, project_id: str) -> Any:
    from huaweicloudsdkkms.v2 import KmsClient

    return sdk_client(KmsClient, api, ak, sk, project_id)


@dataclass
class Identity:
    user: str
    user_id: str
    project: str
    project_id: str
    ak: str
    sk: str


# name -> (project name, roles, allowed CIDRs)
Plan = Mapping[str, tuple[str, Sequence[str], Sequence[str]]]


async def make_identities(settings: Settings, plan: Plan) -> dict[str, Identity]:
    """Users with one access key each, as `dew iam` makes them (projects made as needed)."""
    from engine.iam.service import Identities

    ids = await Identities.open(settings)
    try:
        out: dict[str, Identity] = {}
        for name, (project_name, roles, cidrs) in plan.items():
            project = await ids.project(project_name) or await ids.create_project(project_name)
            user = await ids.create_user(name, project.name, roles=roles, cidrs=cidrs)
            key, sk = await ids.create_access_key(user.name)
            out[name] = Identity(name, user.user_id, project.name, project.project_id,
                                 key.access_key, sk)
        return out
    finally:
        await ids.close()


@dataclass
class ApiStack:
    settings: Settings
    api: ApiProcess
    identities: dict[str, Identity]
    tmp: Path
    client_class: Any = field(default=None, repr=False)

    def client(self, who: str, sk: str | None = None) -> Any:
        ident = self.identities[who]
        return sdk_client(self.client_class, self.api, ident.ak, sk or ident.sk,
                          ident.project_id)

    def raw(self, who: str, method: str, path: str, body: Any = None,
            prefix: str = "/v3/{project_id}") -> Raw:
        """A call the SDK has no model for (our extensions: KPS's ``/dew/servers``; the
        engine's ``/v1/{project_id}/dew/...`` with ``prefix``), built, signed and sent
        by the SDK's core."""
        from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException

        from tests.engine.api_echo_service.sdk import client

        ident = self.identities[who]
        sdk = client(self.api.url, ident.ak, ident.sk, ident.project_id, self.api.ca)
        try:
            sdk.call(method, prefix + path, body=body)
        except ClientRequestException as exc:
            return Raw(exc.status_code, {"error_msg": exc.error_msg})
        reply = sdk.last
        return Raw(reply.status_code, reply.json() if reply.content else None)


@dataclass
class Raw:
    status_code: int
    body: Any

    def json(self) -> Any:
        return self.body


@contextmanager
def api_stack(tmp: Path, redis_server: RedisServer, hsm_config: HsmConfig, plan: Plan,
              client_class: Any, **sections: Any) -> Iterator[ApiStack]:
    """A state directory on the session's Redis and HSM token, the ``plan``'s identities,
    a worker and ``dew api``, for one test module; the SDK's HOME is ``tmp/home``."""
    home = os.environ.get("HOME")
    sdk_home(tmp / "home")
    if not redis_server.ping():
        redis_server.start()
    settings = load_settings().replace(
        engine={"state_dir": tmp / "var"},
        redis={"url": redis_server.url, "queue": f"arq:queue:{uuid.uuid4().hex[:12]}"},
        **{**TEST_SETTINGS, **sections},
    )
    if on_postgresql():
        settings = settings.replace(store={"url": process_cluster().new_database()})
    settings = link_shared_token(settings, hsm_config)
    assert run_dew(settings, "init").returncode == 0
    identities = asyncio.run(make_identities(settings, plan))
    worker = WorkerProcess(settings, tmp / "worker.out").start()
    try:
        api = ApiProcess(settings, tmp / "api.out").start()
        try:
            yield ApiStack(settings, api, identities, tmp, client_class)
        finally:
            api.stop()
    finally:
        worker.stop()
        if home is not None:
            os.environ["HOME"] = home
