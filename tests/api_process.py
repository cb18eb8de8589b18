"""``dew api`` in a subprocess, and official-SDK clients pointed at it (tests only)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine.settings import Settings
from tests.helpers import ROOT, dew_env


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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sdk_home(path: Path) -> None:
    """The SDKs write ~/.huaweicloud/application_id: keep it out of the real home."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(path)


def kms_client(api: ApiProcess, ak: str, sk: str, project_id: str) -> Any:
    """``huaweicloudsdkkms`` as its users build it, trusting our ``ca.pem``."""
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.http.http_config import HttpConfig
    from huaweicloudsdkkms.v2 import KmsClient

    config = HttpConfig.get_default_config()
    config.ssl_ca_cert = str(api.ca)
    config.timeout = (10, 60)
    return (KmsClient.new_builder()
            .with_credentials(BasicCredentials(ak, sk, project_id))
            .with_http_config(config)
            .with_endpoints([api.url])
            .build())
