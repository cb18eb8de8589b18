"""The official SDK's core client on any path: requests built, signed and sent by
huaweicloudsdkcore exactly as KmsClient & co. send theirs (tests only)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import requests
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.client import Client, ClientBuilder
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkcore.http.http_handler import HttpHandler
from huaweicloudsdkcore.sdk_response import SdkResponse


class AnyResponse(SdkResponse):
    """A model with no fields: the reply is read from ``raw_content``."""

    openapi_types: ClassVar[dict[str, str]] = {}
    attribute_map: ClassVar[dict[str, str]] = {}


class _Models:
    AnyResponse = AnyResponse


class GenericClient(Client):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.model_package = _Models
        self.responses: list[requests.Response] = []  # what came off the wire, headers too

    @property
    def last(self) -> requests.Response:
        return self.responses[-1]

    @classmethod
    def new_builder(cls) -> ClientBuilder:
        return ClientBuilder(cls)

    def call(self, method: str, path: str, *, path_params: Mapping[str, Any] | None = None,
             query: Iterable[tuple[str, Any]] = (), body: Any = None,
             content_type: str = "application/json",
             headers: Mapping[str, str] | None = None) -> AnyResponse:
        """One call; ``headers`` are added before signing (an ``X-Sdk-Date`` given
        here is the one the SDK signs with)."""
        return self.do_http_request(
            method=method, resource_path=path, path_params=dict(path_params or {}),
            query_params=list(query), header_params={"Content-Type": content_type,
                                                     **(headers or {})},
            body=body, response_type="AnyResponse", collection_formats={},
        )


def http_config(ca_file: Path | None = None) -> HttpConfig:
    config = HttpConfig.get_default_config()
    if ca_file is not None:
        config.ssl_ca_cert = str(ca_file)
    config.timeout = (10, 60)
    return config


def client(url: str, ak: str, sk: str, project_id: str,
           ca_file: Path | None = None) -> GenericClient:
    seen: list[requests.Response] = []
    built: GenericClient = (
        GenericClient.new_builder()
        .with_credentials(BasicCredentials(ak, sk, project_id))
        .with_http_config(http_config(ca_file))
        .with_http_handler(HttpHandler().add_response_handler(
            lambda **kw: seen.append(kw["response"])))
        .with_endpoints([url])
        .build())
    built.responses = seen
    return built


def caller_client(url: str, caller: Any, ca_file: Path | None = None, *,
                  secret_key: str | None = None) -> GenericClient:
    """A client with a StaticCaller's credentials (or another SK)."""
    sk = secret_key if secret_key is not None else caller.secret_key.decode()
    return client(url, caller.access_key, sk, caller.project_id, ca_file)


def body_of(response: AnyResponse) -> Any:
    raw = response.raw_content
    return json.loads(raw) if raw else None
