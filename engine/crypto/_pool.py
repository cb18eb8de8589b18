"""A bounded thread pool where each thread owns one PKCS#11 session.

python-pkcs11 blocks (it releases the GIL inside the module), so every token
call runs on one of ``size`` threads, never on the event loop. Each thread
opens its own session on first use and keeps a cache of key objects found in
it (finding an object by label is a search over the whole token; caching makes
a seal one token call plus one RNG call). A generation counter, bumped when a
key is generated or destroyed, empties every thread's cache; a handle that
went stale anyway (another process destroyed the key) is looked up once more.

When the module could not be initialised with OS locking, the pool has one
thread, so one session serves every call in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.crypto import _pkcs11
from engine.errors import BackendUnavailable

T = TypeVar("T")


@dataclass
class Worker:
    """One pool thread's session and its key-object cache."""

    session: Any
    generation: int
    keys: dict[tuple[str, str], Any] = field(default_factory=dict)

    def key(self, label: str, kind: str) -> Any:
        cached = self.keys.get((label, kind))
        if cached is None:
            cached = _pkcs11.find_key(self.session, label, kind)
            self.keys[(label, kind)] = cached
        return cached


class SessionPool:
    def __init__(self, token: Any, size: int, *, per_thread_sessions: bool) -> None:
        self.per_thread_sessions = per_thread_sessions
        self.size = size if per_thread_sessions else 1
        self._token = token
        self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="dew-hsm")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._workers: list[Worker] = []
        self._generation = 0
        self._closed = False
        self.sessions_opened = 0
        # Serialises generate/destroy so two tasks cannot both pass "label is free".
        self.admin_lock = threading.Lock()

    async def run(self, fn: Callable[[Worker], T]) -> T:
        if self._closed:
            raise BackendUnavailable("the crypto core is closed", code="hsm_closed",
                                     fix="Connect the crypto core before using it.")
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, self._call, fn)
        except RuntimeError:  # the executor shut down between the check and now
            raise BackendUnavailable("the crypto core is closed", code="hsm_closed") from None
        return await future

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1

    def _call(self, fn: Callable[[Worker], T]) -> T:
        worker = self._worker()
        try:
            return fn(worker)
        except _pkcs11.StaleHandle:
            worker.keys.clear()
            return fn(worker)
        except _pkcs11.SessionLost:
            self._drop(worker)
            raise

    def _worker(self) -> Worker:
        worker: Worker | None = getattr(self._local, "worker", None)
        if worker is None:
            session = _pkcs11.open_session(self._token)
            with self._lock:
                worker = Worker(session, self._generation)
                self._workers.append(worker)
                self.sessions_opened += 1
            self._local.worker = worker
        if worker.generation != self._generation:
            worker.keys.clear()
            worker.generation = self._generation
        return worker

    def _drop(self, worker: Worker) -> None:
        self._local.worker = None
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
        # The session is usually gone already (that is why we drop it): ignore that.
        with contextlib.suppress(BackendUnavailable):
            _pkcs11.close_session(worker.session)

    async def close(self) -> None:
        """Stop the threads, then close their sessions (no call can be using them)."""
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, True)
        with self._lock:
            workers, self._workers = self._workers, []
        await asyncio.to_thread(self._close_sessions, workers)

    @staticmethod
    def _close_sessions(workers: list[Worker]) -> None:
        for worker in workers:
            try:
                _pkcs11.close_session(worker.session)
            except BackendUnavailable:
                continue  # a session the module already dropped needs no closing
