"""Group commit: callers submit one item each and get one result each, while the
items that arrive during a write in flight are written together in the next one.

At low load a batch holds one item and costs what a single write costs; under
load (a worker running a hundred jobs, a client enqueueing thousands) the store
makes one transaction, and one thread hand-off, per batch instead of per item.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(
        self, run: Callable[[Sequence[T]], Awaitable[Sequence[R]]], max_batch: int = 500
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        # shield: a caller that is cancelled must not cancel the write of the others.
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    results = await self._run([item for item, _ in batch])
                except BaseException as exc:  # every waiter of the batch gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._drainer = None
