"""For ``dew api`` subprocesses only: the ``identities`` resource read from the JSON
file named by ``API_ECHO_IDENTITIES`` (a stand-in for engine.iam). Registered only
when that variable is set, so a test process's real resource is never replaced."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.api.testing import StaticCaller, StaticIdentities
from engine.resources import Resources, resource

VARIABLE = "API_ECHO_IDENTITIES"


def write_identities(path: Path, callers: list[StaticCaller]) -> None:
    path.write_text(json.dumps([{
        "access_key": c.access_key, "secret_key": c.secret_key.decode(), "active": c.active,
        "user_id": c.user_id, "user": c.user, "project_id": c.project_id,
        "project": c.project, "actions": sorted(c.actions), "cidrs": list(c.cidrs),
    } for c in callers]))


def read_identities(path: Path) -> StaticIdentities:
    callers = []
    for item in json.loads(path.read_text()):
        callers.append(StaticCaller(
            access_key=item["access_key"], secret_key=item["secret_key"].encode(),
            active=item["active"], user_id=item["user_id"], user=item["user"],
            project_id=item["project_id"], project=item["project"],
            actions=frozenset(item["actions"]), cidrs=tuple(item["cidrs"]),
        ))
    return StaticIdentities(callers)


if os.environ.get(VARIABLE):

    @resource("identities")
    async def _identities(resources: Resources) -> tuple[Any, None]:
        return read_identities(Path(os.environ[VARIABLE])), None
