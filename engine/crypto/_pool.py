"""A bounded set of threads where each thread owns one PKCS#11 session.

python-pkcs11 blocks (it releases the GIL inside the module), so every token
call runs on one of ``size`` threads, never on the event loop. Each thread
opens its own session on first use and keeps a cache of the keys found in it
(finding an object by label is a search over the whole token). A secret key is
used through a session copy (``_pkcs11.session_copy``): SoftHSM re-reads a token
object's file before every use, about half the cost of an AES-GCM call, and not
a session object's. The cache is dropped, copies destroyed, in every thread when
this process generates, imports or destroys a key (a generation counter checked
before each call); a key destroyed by another process is noticed within
``HsmConfig.key_recheck_seconds`` (1 s: each thread checks that the token object
still exists before using a copy older than that), and a handle that went stale
anyway is looked up once more.

Calls are handed over in batches rather than through a ThreadPoolExecutor:
the calls made during one turn of the event loop go to the threads together
(split evenly), each thread runs its share back to back and hands the results
back together. A SoftHSM AES-GCM call takes about 40 µs, and a thread hand-off
costs about as much again (wake-ups, GIL hand-offs; a queue round trip between
two threads costs ~13 µs of CPU on the development VM), so hand-offs are what
this module saves, two ways beyond the batches themselves:

- A thread that finds no other thread idle takes every batch queued behind its
  own. Callers fall out of step (one waits for the registry, one writes the
  audit batch) and each would then cost a hand-off per call; taken together,
  they fall back into step.
- Results go back through one outbox per event loop, which wakes the loop only
  if no wake-up is on the way already: batches finished while the loop is busy
  cost no wake-up of their own.
- One batch per loop is out at a time: the calls made meanwhile go over when its
  results are in (or after ``HOLD``), with the calls its callers make next. The
  loop and the threads then take turns a batch at a time, not call by call (see
  ``_Outbox``).

Results are not handed back one by one, although that would let the loop work
on the first while the thread is in the token with the next: measured, that
cost 40-50 µs more CPU per call than it saved, since the thread must retake the
GIL after each token call and the loop holds it (bench/kms_ops.py).

When the module could not be initialised with OS locking, the pool has one
thread, so one session serves every call in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.crypto import _pkcs11
from engine.errors import BackendUnavailable

T = TypeVar("T")


@dataclass
class _Key:
    """A key a pool thread found: the token object, what its calls use (a session
    copy of a secret key, else the token object) and when it last checked that
    the token object still exists."""

    token: Any
    use: Any
    checked: float


@dataclass
class Worker:
    """One pool thread's session and its key-object cache."""

    session: Any
    generation: int
    recheck: float = 1.0
    keys: dict[tuple[str, str], _Key] = field(default_factory=dict)

    def key(self, label: str, kind: str) -> Any:
        cached = self.keys.get((label, kind))
        now = time.monotonic()
        if cached is not None:
            # A token object in use is checked by the module itself, at every use.
            if cached.use is cached.token or now - cached.checked < self.recheck:
                return cached.use
            if _pkcs11.still_there(cached.token, label):
                cached.checked = now
                return cached.use
            self.forget((label, kind))  # destroyed by another process
        token = _pkcs11.find_key(self.session, label, kind)
        # recheck 0: no copy; the module checks the token object on every use.
        copy = kind == "secret" and self.recheck > 0
        use = _pkcs11.session_copy(token) if copy else token
        self.keys[(label, kind)] = _Key(token, use, now)
        return use

    def forget(self, which: tuple[str, str] | None = None) -> None:
        """Drop one cached key (or all), destroying their session copies."""
        for name in [which] if which is not None else list(self.keys):
            cached = self.keys.pop(name, None)
            if cached is not None and cached.use is not cached.token:
                _pkcs11.destroy_copy(cached.use)


class _Outbox:
    """One event loop's way to the pool threads and back (its calls and its results).

    Calls wait in ``waiting`` and go over together (:meth:`SessionPool._hand_over`);
    ``put_all`` runs on a pool thread, ``deliver`` on the loop. ``signalled`` is
    cleared *before* the loop drains, so a result appended while it drains is
    either drained now or wakes the loop once more: none is left behind, and a
    burst of results costs one wake-up (a write to the loop's self-pipe).

    One batch is in flight at a time: calls made while the threads work on one wait
    for its results and go over with the calls their callers make next (``deliver``
    hands them over once the callers it woke have run). Else a caller that fell out
    of step (it waited for the registry, or wrote the audit batch) makes a batch of
    its own, and the next, until the loop works on one batch's results while a thread
    works on another's calls: under the GIL they then take turns call by call, each
    turn a thread switch, and both spend more than one does after the other
    (bench/kms_ops.py: about a third more CPU per data-key operation). A batch that
    takes longer than ``HOLD`` (a key generation, a slow token) does not hold the
    others back: after that they go over anyway.
    """

    __slots__ = ("done", "hand_over", "in_flight", "loop", "scheduled", "signalled", "timer",
                 "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 hand_over: Callable[[_Outbox], None] | None = None) -> None:
        self.loop = loop
        self.hand_over = hand_over  # the owning pool's (None: results only)
        self.waiting: list[_Call] = []
        self.in_flight = 0  # calls handed over whose results are not delivered yet
        self.scheduled = False  # a hand-over is due in the loop's next turn
        self.timer: asyncio.TimerHandle | None = None
        self.done: deque[_Result] = deque()
        self.signalled = False

    def put_all(self, results: Iterable[_Result]) -> None:
        self.done.extend(results)
        if not self.signalled:
            self.signalled = True
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:
        self.signalled = False
        done = self.done
        delivered = 0
        while done:
            future, result, error = done.popleft()
            delivered += 1
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        self.in_flight -= delivered
        if not self.in_flight and not self.scheduled and self.hand_over is not None:
            # After the callers just woken (their wake-ups were scheduled first): the
            # calls they make next go over with the ones that waited, as one batch.
            self.scheduled = True
            self.loop.call_soon(self.hand_over, self)


# How long calls wait for the batch in flight before they go over anyway (seconds).
HOLD = 0.002

# A queued call: the work, its future and where its result goes.
_Call = tuple[Callable[[Worker], Any], asyncio.Future[Any], _Outbox]
_Result = tuple[asyncio.Future[Any], Any, BaseException | None]


class SessionPool:
    def __init__(self, token: Any, size: int, *, per_thread_sessions: bool,
                 key_recheck: float = 1.0) -> None:
        self.per_thread_sessions = per_thread_sessions
        self.key_recheck = key_recheck
        self.size = size if per_thread_sessions else 1
        self._token = token
        self._calls: queue.SimpleQueue[list[_Call] | None] = queue.SimpleQueue()
        self._outboxes: dict[asyncio.AbstractEventLoop, _Outbox] = {}
        self._idle = 0  # threads waiting for work (changed under the lock, read as a hint)
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
        return await self.submit(fn)

    def submit(self, fn: Callable[[Worker], T]) -> asyncio.Future[T]:
        """Queue ``fn`` for a pool thread; its result (or error) arrives in the future.

        Not a coroutine: a data-plane call awaits this future itself, one coroutine
        layer (its frame, its send at every resume) fewer than through :meth:`run`."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise BackendUnavailable("the crypto core is closed", code="hsm_closed",
                                     fix="Connect the crypto core before using it.")
        future: asyncio.Future[T] = loop.create_future()
        outbox = self._outboxes.get(loop)
        if outbox is None:
            outbox = self._outboxes.setdefault(loop, _Outbox(loop, self._hand_over))
        outbox.waiting.append((fn, future, outbox))
        if not outbox.scheduled:
            if not outbox.in_flight:
                # Calls made during this turn of the loop travel together.
                outbox.scheduled = True
                loop.call_soon(self._hand_over, outbox)
            elif outbox.timer is None:
                outbox.timer = loop.call_later(HOLD, self._hand_over, outbox)
        return future

    def _hand_over(self, outbox: _Outbox) -> None:
        outbox.scheduled = False
        if outbox.timer is not None:
            outbox.timer.cancel()
            outbox.timer = None
        calls, outbox.waiting = outbox.waiting, []
        if not calls:
            return
        # Under the lock, so no call can be queued behind close()'s stop marks.
        with self._lock:
            if not self._closed:
                outbox.in_flight += len(calls)
                # One share per thread, so every thread has work.
                share = -(-len(calls) // self.size)
                for i in range(0, len(calls), share):
                    self._calls.put(calls[i : i + share])
                return
        closed = BackendUnavailable("the crypto core is closed", code="hsm_closed")
        for _, future, _ in calls:
            if not future.done():
                future.set_exception(closed)

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            batch = self._calls.get()
            with self._lock:
                self._idle -= 1
            if batch is None:
                return
            if not self._idle:
                batch = self._take_queued(batch)
            done: dict[_Outbox, list[_Result]] = {}
            for fn, future, outbox in batch:
                item: _Result
                try:
                    item = (future, self._call(fn), None)
                except Exception as exc:  # noqa: BLE001 - re-raised in the awaiting coroutine
                    item = (future, None, exc)
                results = done.get(outbox)
                if results is None:
                    done[outbox] = [item]
                else:
                    results.append(item)
            for outbox, results in done.items():
                outbox.put_all(results)

    def _take_queued(self, batch: list[_Call]) -> list[_Call]:
        """``batch`` and every batch queued behind it (no other thread is idle to take
        them): calls whose callers fell out of step (one waited for the registry, say)
        go with the others instead of costing a hand-over each, so the callers fall
        back into step."""
        while True:
            try:
                more = self._calls.get_nowait()
            except queue.Empty:
                return batch
            if more is None:
                self._calls.put(None)  # a stop mark: leave it for the next get()
                return batch
            batch = batch + more

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1

    @property
    def generation(self) -> int:
        """Counts the keys generated, imported or destroyed in this process (a thread,
        or a data process, drops its cached keys when it changed)."""
        return self._generation

    def _call(self, fn: Callable[[Worker], T]) -> T:
        worker = self._worker()
        try:
            return fn(worker)
        except _pkcs11.StaleHandle:
            worker.forget()
            return fn(worker)
        except _pkcs11.SessionLost:
            self._drop(worker)
            raise

    def _worker(self) -> Worker:
        worker: Worker | None = getattr(self._local, "worker", None)
        if worker is None:
            session = _pkcs11.open_session(self._token)
            with self._lock:
                worker = Worker(session, self._generation, self.key_recheck)
                self._workers.append(worker)
                self.sessions_opened += 1
            self._local.worker = worker
        if worker.generation != self._generation:
            worker.forget()
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
