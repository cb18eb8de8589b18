"""Secret job arguments sealed under kps/default: round trip, and no plaintext at rest."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
import redis

from engine.client import Client
from engine.errors import InvalidInput, SecurityError
from engine.redaction import SEALED_MARKER, is_sealed, redact
from engine.sealing import SealBinding, Sealer, seal_args, unseal_args
from engine.settings import Settings
from handlers.kms.format import Purpose, unpack_ciphertext
from handlers.kms.interface import KmsSealer
from handlers.kms.service import KmsService

PASSWORD = "Tr0ub4dor&3-never-in-clear"
TOKEN = "tok-5f1c7d0e-also-secret"


BOUND = SealBinding("task-1", "kps.bind", "default")


async def test_round_trip_and_sealed_form(kms: KmsService) -> None:
    cipher: Sealer = KmsSealer(kms)  # the KMS as the engine's sealer
    args = {"server": "db1", "password": PASSWORD, "dsn": {"nested": [1, 2], "t": TOKEN},
            "note": None}
    sealed = await seal_args(args, {"password", "dsn", "note"}, cipher, BOUND)
    assert sealed["server"] == "db1" and sealed["note"] is None
    for name in ("password", "dsn"):  # declared: sealed whole, whatever the name
        assert is_sealed(sealed[name])
    text = json.dumps(sealed)
    assert PASSWORD not in text and TOKEN not in text
    # Sealed with encrypt-data under kps/default: the key id travels inside.
    kps = await kms.describe_key("kps/default")
    blob = base64.b64decode(sealed["password"][SEALED_MARKER])
    assert unpack_ciphertext(blob, Purpose.DATA)[0].key_id == kps.key_id
    assert redact(sealed)["password"] != sealed["password"]  # listings hide it
    assert await unseal_args(sealed, cipher, BOUND) == args
    assert await seal_args(sealed, {"dsn"}, cipher, BOUND) == sealed  # sealing twice: no-op


async def test_only_declared_fields_are_sealed(kms: KmsService) -> None:
    args = {"password": PASSWORD}
    assert await seal_args(args, (), KmsSealer(kms), BOUND) == args


@pytest.mark.parametrize("other", [
    SealBinding("task-2", "kps.bind", "default"),
    SealBinding("task-1", "kps.unbind", "default"),
    SealBinding("task-1", "kps.bind", "acme"),
])
async def test_a_sealed_value_opens_only_for_its_use(kms: KmsService, other: SealBinding) -> None:
    sealer = KmsSealer(kms)
    sealed = await seal_args({"password": PASSWORD}, {"password"}, sealer, BOUND)
    with pytest.raises(SecurityError, match="'password' was not sealed for this use") as info:
        await unseal_args(sealed, sealer, other)
    assert info.value.target == "password"
    with pytest.raises(SecurityError):  # another field of the same task
        await unseal_args({"other_password": sealed["password"]}, sealer, BOUND)
    broken = dict(sealed["password"])
    raw = bytearray(base64.b64decode(broken[SEALED_MARKER]))
    raw[-1] ^= 1
    with pytest.raises(SecurityError):  # altered: fails its integrity check
        await unseal_args({"password": {SEALED_MARKER: base64.b64encode(raw).decode()}}, sealer,
                          BOUND)


async def test_too_large_secret_is_refused_without_showing_it(kms: KmsService) -> None:
    with pytest.raises(InvalidInput, match="'password' is 5002 bytes") as info:
        await seal_args({"password": "s" * 5000}, {"password"}, KmsSealer(kms), BOUND)
    assert "sss" not in json.dumps(info.value.to_dict())


async def test_no_plaintext_in_redis_or_the_task_store(
    client: Client, kms_settings: Settings
) -> None:
    # engine.echo declares nothing secret: kps.bind's auth is the declared secret here.
    args = {"keypair": "visible", "servers": ["s1"], "auth": {"password": PASSWORD}}
    task = await client.enqueue("kps.bind", args)  # no worker: it stays queued
    assert is_sealed(task.args["auth"])

    url = kms_settings.redis_url
    keys = subprocess.run(["redis-cli", "-u", url, "--scan"], capture_output=True, text=True,
                          check=True, timeout=30).stdout.split()
    assert any(task.task_id in k for k in keys)
    r = redis.Redis.from_url(url)
    # DUMP may LZF-compress a value, so look at the plain values of strings too.
    seen = b""
    for k in keys:
        seen += bytes(r.dump(k) or b"")  # type: ignore[arg-type]
        if r.type(k) == b"string":
            seen += bytes(r.get(k) or b"")  # type: ignore[arg-type]
    assert b"visible" in seen  # the scan does see job arguments...
    assert PASSWORD.encode() not in seen  # ...but never the secret in clear

    db = Path(kms_settings.db_path)
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))  # with -wal
    assert task.args["auth"][SEALED_MARKER].encode() in stored
    assert PASSWORD.encode() not in stored
