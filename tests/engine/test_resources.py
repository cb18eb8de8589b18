"""Resources: built on first use, closed newest first, ``close_first`` ones before all."""

from __future__ import annotations

from typing import Any

from engine.resources import FACTORIES, Resources
from engine.settings import Settings


async def test_a_resource_needing_a_later_one_while_closing_closes_first(
    settings: Settings,
) -> None:
    closed: list[str] = []

    async def token(resources: Resources) -> tuple[str, Any]:
        async def close() -> None:
            closed.append("token")
        return "token", close

    async def service(resources: Resources) -> tuple[str, Any]:
        async def close() -> None:
            closed.append(f"service (token {'closed' if 'token' in closed else 'open'})")
        resources.close_first(close)
        return "service", None

    FACTORIES.update({"t.token": token, "t.service": service})
    try:
        resources = Resources(settings)
        await resources.get("t.service")
        await resources.get("t.token")  # opened lazily, after the service
        await resources.close()
    finally:
        del FACTORIES["t.token"], FACTORIES["t.service"]
    assert closed == ["service (token open)", "token"]
