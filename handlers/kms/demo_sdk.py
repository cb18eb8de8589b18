"""The ``make demo`` step where the official SDK (``huaweicloudsdkkms``) talks to
``dew api``: what a program written for the hosted service does, pointed at us.

Needs the API of ``make up`` (TLS with the local CA ``STATE_DIR/tls/ca.pem``).
The demo user ``demo-sdk`` of the default project gets a fresh access key on
every run (its older keys are deleted); the secret key is never printed.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from typing import Any

from engine.settings import Settings

USER = "demo-sdk"
ROLE = "KMS CMKFullAccess"


async def _access_key(settings: Settings) -> tuple[str, str, str]:
    from engine.iam.service import Identities

    ids = await Identities.open(settings)
    try:
        project = await ids.project("default")
        assert project is not None
        users = {u.name: u for u in await ids.list_users()}
        if USER not in users:
            await ids.create_user(USER, project.name, roles=[ROLE])
        else:
            await ids.set_roles(USER, [ROLE])
            for old in await ids.list_access_keys(USER):
                await ids.delete_access_key(old.access_key)
        key, secret = await ids.create_access_key(USER)
        return project.project_id, key.access_key, secret
    finally:
        await ids.close()


def _sdk_calls(settings: Settings, project_id: str, ak: str, sk: str,
               say: Callable[[str], None]) -> None:
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.http.http_config import HttpConfig
    from huaweicloudsdkkms.v2 import (
        CreateDatakeyRequest,
        CreateDatakeyRequestBody,
        DecryptDatakeyRequest,
        DecryptDatakeyRequestBody,
        KmsClient,
        ListKeysRequest,
        ListKeysRequestBody,
    )

    config = HttpConfig.get_default_config()
    config.ssl_ca_cert = str(settings.state_dir / "tls" / "ca.pem")
    endpoint = f"https://{settings.api.listen}"
    client: Any = (KmsClient.new_builder()
                   .with_credentials(BasicCredentials(ak, sk, project_id))
                   .with_http_config(config).with_endpoints([endpoint]).build())
    say(f"SDK: huaweicloudsdkkms -> {endpoint} (trusting {config.ssl_ca_cert}), "
        f"project {project_id}, AK {ak}")
    keys = client.list_keys(ListKeysRequest(body=ListKeysRequestBody(limit="10")))
    say(f"SDK: ListKeys: {keys.total} key(s) in the project")
    made = client.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(
        key_id="demo/cmk", datakey_length="256")))
    back = client.decrypt_datakey(DecryptDatakeyRequest(body=DecryptDatakeyRequestBody(
        key_id=made.key_id, cipher_text=made.cipher_text,
        datakey_cipher_length=str(len(made.cipher_text) // 2))))
    say(f"SDK: CreateDatakey then DecryptDatakey under demo/cmk: "
        f"{'same key' if back.data_key == made.plain_text else 'MISMATCH'} "
        f"(SHA-256 {back.datakey_dgst[:16]}...)")


async def run(settings: Settings, say: Callable[[str], None]) -> None:
    try:
        import huaweicloudsdkkms  # noqa: F401
    except ImportError:
        say("SDK: skipped (pip install huaweicloudsdkkms to see the official SDK call dew api)")
        return
    project_id, ak, sk = await _access_key(settings)
    home = os.environ.get("HOME")
    with tempfile.TemporaryDirectory() as sdk_home:
        os.environ["HOME"] = sdk_home  # the SDK writes ~/.huaweicloud/
        try:
            await asyncio.to_thread(_sdk_calls, settings, project_id, ak, sk, say)
        finally:
            if home is not None:
                os.environ["HOME"] = home
