"""Secret job arguments sealed under kps/default: round trip, and no plaintext at rest."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
import redis

from engine.client import Client
from engine.crypto import IntegrityCheckFailed
from engine.errors import InvalidInput
from engine.redaction import SEALED_MARKER, is_sealed, redact
from engine.sealing import Sealer, seal_args, unseal_args
from engine.settings import Settings
from handlers.kms.format import Purpose, unpack_ciphertext
from handlers.kms.interface import KmsSealer
from handlers.kms.service import KmsService

PASSWORD = "Tr0ub4dor&3-never-in-clear"
TOKEN = "tok-5f1c7d0e-also-secret"


async def test_round_trip_and_sealed_form(kms: KmsService) -> None:
    cipher: Sealer = KmsSealer(kms)  # the KMS as the engine's sealer
    args = {"server": "db1", "password": PASSWORD, "db_pin": 1234,
            "extra": {"nested": [1, 2]}, "api_token": TOKEN, "note": None}
    sealed = await seal_args(args, {"extra"}, cipher)
    assert sealed["server"] == "db1" and sealed["note"] is None
    for name in ("password", "db_pin", "extra", "api_token"):  # declared or secret-named
        assert is_sealed(sealed[name])
    text = json.dumps(sealed)
    assert PASSWORD not in text and TOKEN not in text and "1234" not in text
    # Sealed with encrypt-data under kps/default: the key id travels inside.
    kps = await kms.describe_key("kps/default")
    blob = base64.b64decode(sealed["password"][SEALED_MARKER])
    assert unpack_ciphertext(blob, Purpose.DATA)[0].key_id == kps.key_id
    assert redact(sealed)["password"] != sealed["password"]  # listings hide it
    assert await unseal_args(sealed, cipher) == args
    assert await seal_args(sealed, {"extra"}, cipher) == sealed  # sealing twice is a no-op


async def test_a_sealed_value_opens_only_under_its_own_field(kms: KmsService) -> None:
    sealer = KmsSealer(kms)
    sealed = await seal_args({"password": PASSWORD}, (), sealer)
    swapped = {"other_password": sealed["password"]}
    with pytest.raises(InvalidInput, match="encryption context") as info:
        await unseal_args(swapped, sealer)
    assert info.value.target == "other_password"
    broken = dict(sealed["password"])
    raw = bytearray(base64.b64decode(broken[SEALED_MARKER]))
    raw[-1] ^= 1
    with pytest.raises(IntegrityCheckFailed):
        await unseal_args({"password": {SEALED_MARKER: base64.b64encode(raw).decode()}}, sealer)


async def test_too_large_secret_is_refused_without_showing_it(kms: KmsService) -> None:
    with pytest.raises(InvalidInput, match="'password' is 5002 bytes") as info:
        await seal_args({"password": "s" * 5000}, (), KmsSealer(kms))
    assert "sss" not in json.dumps(info.value.to_dict())


async def test_no_plaintext_in_redis_or_the_task_store(
    shared_kms: KmsService, client: Client, kms_settings: Settings
) -> None:
    args = await seal_args({"value": "visible", "password": PASSWORD}, (), KmsSealer(shared_kms))
    task = await client.enqueue("engine.echo", args)  # no worker: it stays queued
    assert (await client.get(task.task_id)).args["password"] == args["password"]

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
    assert args["password"][SEALED_MARKER].encode() in stored
    assert PASSWORD.encode() not in stored
