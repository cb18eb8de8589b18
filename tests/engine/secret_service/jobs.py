"""``testsecret.use {conn, blob, account?}``: proves it saw the clear values, returns none."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from engine.context import JobContext
from engine.registry import JOBS


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@JOBS.job("testsecret.use", secret_fields=("conn", "blob"))
async def use(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"conn_sha256": digest(args["conn"]), "blob_sha256": digest(args["blob"]),
            "account": args.get("account", "default")}
