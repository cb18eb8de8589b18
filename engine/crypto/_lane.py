"""The data plane's token calls in child processes of their own (``hsm.data_processes``).

Measured (bench/kms_ops.py, py-spy): in one process the event loop and the token
thread take turns. python-pkcs11 releases the GIL inside the module, but each token
call's Python around it needs the GIL back, and the loop holds it while it runs the
callers of the last batch; so a data-key operation costs the loop's work *plus* the
token's, never the larger of the two. A child process has a GIL of its own: it runs
one batch of token calls while the loop works on the results of the one before.

What goes to a child: AES-GCM seal / open and new data keys (``CryptoCore.submit_*``),
the calls of KMS data keys and encrypt-data. Everything else (key generation and
destruction, signing, wrapping, lookups) stays on the crypto core's threads, so the
child never changes the token: it only uses keys.

* A child is a Python process running :func:`main`: it reads its :class:`HsmConfig`
  (with the PIN: never in its arguments or environment) from its stdin, logs in,
  and answers batches on its stdout. It exits when its stdin closes, so it never
  outlives the process that started it.
* Its keys are cached as the pool threads cache them (session copies, checked
  against the token object every ``key_recheck_seconds``); every batch carries the
  pool's generation, and a key generated, imported or destroyed in this process
  drops the child's copies before its next call, as it does the threads'.
* Two batches per child are out at a time: when the calls that wait find no batch
  out, they are split in two, so the child starts the second while the loop takes
  the first's results.
* A child that dies or answers nonsense is not used again: its calls, and every
  later one, go to the threads (one warning). A call is never lost or failed by it.
* Only plain values cross the pipe (``marshal``: bytes, str, numbers, tuples; about
  half pickle's cost, and nothing is constructed from the other side's bytes but
  those). Errors travel as :meth:`DewError.to_dict` and come back through
  :meth:`DewError.from_dict`, as a failed task's error does.
"""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import os
import signal
import struct
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, BinaryIO

from engine.crypto import _pkcs11
from engine.crypto._pool import SessionPool, Worker
from engine.crypto.config import HsmConfig
from engine.crypto.model import Sealed
from engine.errors import BackendUnavailable, DewError
from engine.logs import get_logger

log = get_logger("dew.crypto")

# Batches out per child at a time: one it works on, one it takes next.
IN_FLIGHT = 2
_LENGTH = struct.Struct("!I")
START_TIMEOUT = 30.0
SPAWN_TRIES = 3

# A call: its kind and arguments, what the threads would run instead, its future.
_Call = tuple[str, tuple[Any, ...], Callable[[Worker], Any], asyncio.Future[Any]]


def frame(obj: Any) -> bytes:
    data = marshal.dumps(obj)
    return _LENGTH.pack(len(data)) + data


def config_to_wire(config: HsmConfig) -> dict[str, Any]:
    return {f.name: str(v) if isinstance(v := getattr(config, f.name), Path) else v
            for f in fields(config)}


def config_from_wire(wire: dict[str, Any]) -> HsmConfig:
    paths = {f.name for f in fields(HsmConfig) if "Path" in str(f.type)}
    values: dict[str, Any] = {name: Path(value) if name in paths and value is not None
                              else value for name, value in wire.items()}
    return HsmConfig(**values)


def result_to_wire(kind: str, value: Any) -> Any:
    """A call's result as plain values (``Sealed`` as its two byte strings)."""
    if kind == "datakey":
        dek, sealed = value
        return (dek, *sealed)
    return tuple(value) if kind == "seal" else value


def result_from_wire(kind: str, wire: Any) -> Any:
    if kind == "datakey":
        return wire[0], Sealed(wire[1], wire[2])
    return Sealed(*wire) if kind == "seal" else wire


def run_call(worker: Worker, kind: str, args: tuple[Any, ...]) -> Any:
    """One data-plane token call, as a pool thread runs it (a child's and a test's)."""
    label = args[0]
    key = worker.key(label, "secret")
    if kind == "seal":
        return _pkcs11.gcm_seal(worker.session, key, label, args[1], args[2])
    if kind == "open":
        return _pkcs11.gcm_open(key, label, args[1], args[2], args[3])
    if kind == "datakey":
        return _pkcs11.new_data_key(worker.session, key, label, args[1], args[2])
    raise ValueError(f"unknown data-plane call {kind!r}")


class _Child:
    """One child process and the batches it has not answered yet."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: deque[list[_Call]] = deque()
        self.reader: asyncio.Task[None] | None = None


class DataLane:
    """Child processes for the data plane's token calls, for one event loop."""

    def __init__(self, config: HsmConfig, pool: SessionPool, processes: int) -> None:
        self.config = config
        self.pool = pool
        self.processes = processes
        self.loop: asyncio.AbstractEventLoop | None = None
        self._children: list[_Child] = []
        self._waiting: list[_Call] = []
        self._scheduled = False
        self.broken: str | None = None  # why the threads took over
        self._closed = False

    async def start(self) -> None:
        """Start the children; each has logged in when this returns."""
        self.loop = asyncio.get_running_loop()
        setup = replace(self.config, pin=self.config.user_pin(), pool_size=1)
        try:
            for _ in range(self.processes):
                self._children.append(await self._spawn_retrying(setup))
        except BaseException:
            await self.close()
            raise
        for child in self._children:
            child.reader = asyncio.create_task(self._read(child))

    async def _spawn_retrying(self, setup: HsmConfig) -> _Child:
        # SoftHSM rewrites its token file at every login: a module initialised in
        # another process meanwhile may not list the token, or fail the login
        # (measured). A new process reads the file afresh.
        for attempt in range(SPAWN_TRIES):
            try:
                return await self._spawn(setup)
            except DewError:
                if attempt == SPAWN_TRIES - 1:
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("unreachable")

    async def _spawn(self, setup: HsmConfig) -> _Child:
        env = dict(os.environ)
        if setup.softhsm_conf is not None:
            env["SOFTHSM2_CONF"] = str(setup.softhsm_conf)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from engine.crypto._lane import main; main()",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
        child = _Child(proc)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(frame(config_to_wire(setup)))
        try:
            ready = await asyncio.wait_for(_read_frame(proc.stdout), START_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError):
            await _stop(proc)
            raise BackendUnavailable("the HSM data process did not start",
                                     fix="See its message above; set hsm.data_processes "
                                     "= 0 to use the crypto core's threads only.",
                                     code="hsm_lane_failed") from None
        if ready is not None:
            await _stop(proc)
            raise DewError.from_dict(ready)
        return child

    @property
    def pids(self) -> list[int]:
        return [child.proc.pid for child in self._children]

    def usable(self) -> bool:
        return (self.broken is None and not self._closed
                and asyncio.get_running_loop() is self.loop)

    def submit(self, kind: str, args: tuple[Any, ...], fallback: Callable[[Worker], Any]
               ) -> asyncio.Future[Any]:
        assert self.loop is not None
        future: asyncio.Future[Any] = self.loop.create_future()
        self._waiting.append((kind, args, fallback, future))
        if not self._scheduled:
            # The calls made during this turn of the loop go together.
            self._scheduled = True
            self.loop.call_soon(self._send)
        return future

    def _send(self) -> None:
        self._scheduled = False
        if self.broken is not None:
            self._to_threads(self._waiting)
            self._waiting = []
            return
        while self._waiting:
            child = min(self._children, key=lambda c: len(c.out))
            if len(child.out) >= IN_FLIGHT:
                return  # sent when a batch comes back
            waiting = self._waiting
            # Nothing out anywhere: half now, half next, so the child starts on the
            # second while the loop takes the first's results.
            take = (len(waiting) + 1) // 2 if not child.out and len(waiting) > 1 \
                else len(waiting)
            batch, self._waiting = waiting[:take], waiting[take:]
            child.out.append(batch)
            assert child.proc.stdin is not None
            child.proc.stdin.write(frame((self.pool.generation,
                                          [(kind, args) for kind, args, _, _ in batch])))

    async def _read(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        try:
            while True:
                results = await _read_frame(child.proc.stdout)
                if not child.out or not isinstance(results, list) \
                        or len(results) != len(child.out[0]):
                    # Left in ``out``: the threads take the whole batch over.
                    raise ValueError("an answer that does not fit its batch")
                batch = child.out.popleft()
                for (kind, _, _, future), (ok, value) in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(result_from_wire(kind, value))
                    else:
                        future.set_exception(DewError.from_dict(value))
                if self._waiting and not self._scheduled:
                    self._send()
        except asyncio.CancelledError:
            raise
        except asyncio.IncompleteReadError as exc:
            # Its output ended: it is exiting; its status says why.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 1.0)
            self._break(child, exc)
        except Exception as exc:  # noqa: BLE001 - any failure: the threads take over
            self._break(child, exc)

    def _break(self, child: _Child, exc: BaseException) -> None:
        if not self._closed and self.broken is None:
            code = child.proc.returncode
            self.broken = (f"exited with status {code}" if code is not None
                           else f"failed: {exc!r}")
            log.warning("the HSM data process stopped; its calls go to the crypto core's "
                        "threads", reason=self.broken)
        self.broken = self.broken or "closed"
        for other in self._children:
            while other.out:
                self._to_threads(other.out.popleft())
        self._to_threads(self._waiting)
        self._waiting = []

    def _to_threads(self, calls: list[_Call]) -> None:
        for _, _, fallback, future in calls:
            if not future.done():
                _chain(self.pool.submit(fallback), future)

    async def close(self) -> None:
        """Stop the children (their last answers are taken first)."""
        self._closed = True
        children, self._children = self._children, []
        for child in children:
            deadline = asyncio.get_running_loop().time() + START_TIMEOUT
            while (child.out and child.reader is not None and not child.reader.done()
                   and asyncio.get_running_loop().time() < deadline):
                await asyncio.sleep(0.001)
            if child.reader is not None:
                child.reader.cancel()
            await _stop(child.proc)
        if self._waiting:
            self._to_threads(self._waiting)
            self._waiting = []


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    def copy(done: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif (error := done.exception()) is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)


async def _read_frame(stream: asyncio.StreamReader) -> Any:
    (length,) = _LENGTH.unpack(await stream.readexactly(_LENGTH.size))
    return marshal.loads(await stream.readexactly(length))


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except TimeoutError:
        proc.kill()
        await proc.wait()


# ---------------------------------------------------------------------- the child


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            return None
        data += more
    return data


def _child_frame(stream: BinaryIO) -> Any:
    head = _read_exactly(stream, _LENGTH.size)
    if head is None:
        return None
    body = _read_exactly(stream, _LENGTH.unpack(head)[0])
    return None if body is None else marshal.loads(body)


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The child: log in, then answer batches until stdin closes."""
    wire = _child_frame(inp)
    if not isinstance(wire, dict):
        return
    try:
        config = config_from_wire(wire)
        module = _pkcs11.load_module(config)
        token = _pkcs11.require_token(module, config.token_label, config.slot)
        _pkcs11.login(module, token, config.user_pin())
        worker = Worker(_pkcs11.open_session(token), 0, config.key_recheck_seconds)
    except DewError as exc:
        out.write(frame(exc.to_dict()))
        out.flush()
        return
    out.write(frame(None))  # ready
    out.flush()
    while (request := _child_frame(inp)) is not None:
        generation, calls = request
        if generation != worker.generation:
            worker.forget()  # a key generated or destroyed by the parent meanwhile
            worker.generation = generation
        results: list[tuple[bool, Any]] = []
        for kind, args in calls:
            try:
                results.append((True, result_to_wire(kind, _call(worker, kind, args))))
            except DewError as exc:
                results.append((False, exc.to_dict()))
            except Exception as exc:  # noqa: BLE001 - reported to the caller, not fatal
                results.append((False, BackendUnavailable(
                    f"the HSM data process failed: {exc!r}",
                    code="hsm_lane_failed").to_dict()))
        out.write(frame(results))
        out.flush()


def _call(worker: Worker, kind: str, args: tuple[Any, ...]) -> Any:
    try:
        return run_call(worker, kind, args)
    except _pkcs11.StaleHandle:
        worker.forget()
        return run_call(worker, kind, args)


def main() -> None:
    # Ctrl-C in the parent's terminal reaches its whole process group: the parent
    # decides when its children stop (it closes their stdin).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The protocol owns fd 1; anything printed goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, out)

