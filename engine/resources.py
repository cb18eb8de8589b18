"""Long-lived things jobs share in one process (the crypto core, the KMS service...).

Domain modules register an async factory by name; a ``Resources`` object builds
each one on first use (so a worker that never runs a KMS job never opens the
HSM) and closes them all, in reverse order, at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from engine.settings import Settings

Closer = Callable[[], Awaitable[None]]
Factory = Callable[["Resources"], Awaitable[tuple[Any, Closer | None]]]

FACTORIES: dict[str, Factory] = {}


def resource(name: str) -> Callable[[Factory], Factory]:
    """Decorator: ``factory(resources) -> (object, async closer or None)``."""

    def register(factory: Factory) -> Factory:
        FACTORIES[name] = factory
        return factory

    return register


class Resources:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._made: dict[str, Any] = {}
        self._closers: list[Closer] = []
        self._early: list[Closer] = []
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, name: str) -> Any:
        if name in self._made:
            return self._made[name]
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._made:
                try:
                    factory = FACTORIES[name]
                except KeyError:
                    raise LookupError(f"no resource named {name!r} is registered") from None
                obj, closer = await factory(self)
                self._made[name] = obj
                if closer is not None:
                    self._closers.append(closer)
        return self._made[name]

    def put(self, name: str, obj: Any, closer: Closer | None = None) -> None:
        """Provide a ready-made resource (tests, or a process that already has one)."""
        self._made[name] = obj
        if closer is not None:
            self._closers.append(closer)

    def close_first(self, closer: Closer) -> None:
        """Run ``closer`` before every other one: for a resource that still needs the
        others while closing (one it opened lazily, after itself, would close first)."""
        self._early.append(closer)

    async def close(self) -> None:
        """Close everything, newest first (``close_first`` ones before all); one failing
        closer does not keep the others open (the first error is raised once all ran)."""
        errors: list[Exception] = []
        while self._early:
            try:
                await self._early.pop()()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the rest
                errors.append(exc)
        while self._closers:
            try:
                await self._closers.pop()()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the rest
                errors.append(exc)
        self._made.clear()
        if errors:
            raise errors[0]
