"""A bounded set of threads where each thread owns one PKCS#11 session.

python-pkcs11 blocks (it releases the GIL inside the module), so every token
call runs on one of ``size`` threads, never on the event loop. Each thread
opens its own session on first use and keeps a cache of key objects found in
it (finding an object by label is a search over the whole token; caching makes
a seal one token call plus one RNG call). A generation counter, bumped when a
key is generated or destroyed, empties every thread's cache; a handle that
went stale anyway (another process destroyed the key) is looked up once more.

Calls are handed over in batches rather than through a ThreadPoolExecutor:
the calls made during one turn of the event loop go to the threads together
(split evenly), each thread runs its share back to back and wakes the event
loop once for it. A SoftHSM AES-GCM call takes about 50 µs, and a
``run_in_executor`` round trip costs about as much again in thread wake-ups
and GIL hand-offs; batching pays that once per batch (bench/kms_ops.py).

When the module could not be initialised with OS locking, the pool has one
thread, so one session serves every call in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
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


@dataclass
class _Call:
    fn: Callable[[Worker], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _deliver(done: list[tuple[_Call, Any, BaseException | None]]) -> None:
    """On the event loop: resolve the futures of a finished batch."""
    for call, result, error in done:
        if call.future.cancelled():
            continue
        if error is not None:
            call.future.set_exception(error)
        else:
            call.future.set_result(result)


class SessionPool:
    def __init__(self, token: Any, size: int, *, per_thread_sessions: bool) -> None:
        self.per_thread_sessions = per_thread_sessions
        self.size = size if per_thread_sessions else 1
        self._token = token
        self._calls: queue.SimpleQueue[list[_Call] | None] = queue.SimpleQueue()
        self._waiting: dict[asyncio.AbstractEventLoop, list[_Call]] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._workers: list[Worker] = []
        self._generation = 0
        self._closed = False
        self.sessions_opened = 0
        # Serialises generate/destroy so two tasks cannot both pass "label is free".
        self.admin_lock = threading.Lock()
        # Daemon threads: a pool nobody closed must not keep the interpreter alive.
        self._threads = [
            threading.Thread(target=self._serve, name=f"dew-hsm-{i}", daemon=True)
            for i in range(self.size)
        ]
        for thread in self._threads:
            thread.start()

    async def run(self, fn: Callable[[Worker], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._closed:
            raise BackendUnavailable("the crypto core is closed", code="hsm_closed",
                                     fix="Connect the crypto core before using it.")
        # Calls made during one turn of the event loop travel together: when a
        # batch of results wakes many coroutines, their next calls go over as one.
        waiting = self._waiting.get(loop)
        if waiting is None:
            self._waiting[loop] = [_Call(fn, future, loop)]
            loop.call_soon(self._hand_over, loop)
        else:
            waiting.append(_Call(fn, future, loop))
        return await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        calls = self._waiting.pop(loop, [])
        # Under the lock, so no call can be queued behind close()'s stop marks.
        with self._lock:
            if not self._closed:
                # One share per thread, so every thread has work.
                share = -(-len(calls) // self.size)
                for i in range(0, len(calls), share):
                    self._calls.put(calls[i : i + share])
                return
        closed = BackendUnavailable("the crypto core is closed", code="hsm_closed")
        _deliver([(call, None, closed) for call in calls])

    def _serve(self) -> None:
        while True:
            batch = self._calls.get()
            if batch is None:
                return
            done: list[tuple[_Call, Any, BaseException | None]] = []
            for call in batch:
                try:
                    done.append((call, self._call(call.fn), None))
                except Exception as exc:  # noqa: BLE001 - re-raised in the awaiting coroutine
                    done.append((call, None, exc))
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                batch[0].loop.call_soon_threadsafe(_deliver, done)

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
        """Stop the threads (queued calls finish first), then close their sessions."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._calls.put(None)
        await asyncio.to_thread(self._join)
        with self._lock:
            workers, self._workers = self._workers, []
        await asyncio.to_thread(self._close_sessions, workers)

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()

    @staticmethod
    def _close_sessions(workers: list[Worker]) -> None:
        for worker in workers:
            try:
                _pkcs11.close_session(worker.session)
            except BackendUnavailable:
                continue  # a session the module already dropped needs no closing
