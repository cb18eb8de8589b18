"""The I/O pipeline under ``dew kms encrypt-file`` / ``decrypt-file``: a reader thread
fills fixed-size input buffers, the caller seals (or opens) each one in its own
thread, and a writer thread writes the results::

    reader thread --(filled)--> caller: AES-GCM --(sealed)--> writer thread
         ^                                  |                      |
         +---------- free input buffers ----+   free output <------+

File reads and writes release the GIL, and so does AES-GCM on large buffers, so
on two cores the stages overlap: a file takes the time of its slowest stage, not
the sum of all three. Memory is the two buffer pools (``depth`` + 1 input and
``depth`` output buffers), whatever the file size: a stage that runs ahead waits
for a free buffer.

An error in either thread stops the pipeline and is raised once, in the caller's
thread, as :class:`FileIOFailed`; an error of the caller stops both threads. The
writer writes nothing once anything failed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
import queue
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO, cast

from engine.errors import PermanentError

DEPTH = 3
# The output goes to disk while it is written, a window at a time (see _Writeback).
WRITEBACK_WINDOW = 16 << 20
WRITEBACK_KEPT = 4  # windows written but still in the page cache (dirty or being written)
READER_GRACE_SECONDS = 1.0


class FileIOFailed(PermanentError):
    """Reading IN or writing OUT failed part-way (a disk error, a full disk, a closed pipe)."""

    code = "file_io_failed"
    category = "io"
    default_fix = "Check the disk or the pipe named, then run the command again."


def io_error(what: str, name: str, exc: BaseException) -> FileIOFailed:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return FileIOFailed(f"cannot {what} {name}: {reason}", cause=type(exc).__name__)


class _End:
    """The reader's last item: no more input."""


_END = _End()


def fill(src: IO[bytes], view: memoryview) -> int:
    """Fill ``view`` from the stream; fewer bytes only at end of file (pipes and raw
    files return short reads)."""
    got = 0
    readinto = getattr(src, "readinto", None)
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:]) or 0
        else:
            chunk = src.read(len(view) - got)
            n = len(chunk)
            view[got : got + n] = chunk
        if not n:
            break
        got += n
    return got


def write_all(dst: IO[bytes], view: memoryview) -> None:
    """Write all of ``view``: a raw file may take less than it was given."""
    while view:
        n = dst.write(view)
        if n is None:  # a non-blocking raw stream that would block
            raise OSError(errno.EAGAIN, "the output would block")
        view = view[n:]


def _regular_fd(stream: IO[bytes]) -> int | None:
    try:
        fd = stream.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError):  # BytesIO, a closed or odd stream
        return None


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", call)


_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4  # SYNC_FILE_RANGE_* flags


@functools.cache
def _writeback() -> Callable[[int, int, int, int], int] | None:
    return _load_sync_file_range()


def writeback_plan(started: int, dropped: int, end: int, window: int = WRITEBACK_WINDOW,
                   kept: int = WRITEBACK_KEPT) -> list[tuple[str, int]]:
    """What to do once the output reaches offset ``end``, when windows were started up
    to ``started`` and dropped up to ``dropped``: ("start", offset) to start writing a
    full window back, ("drop", offset) to wait until an older one is on disk and drop
    it from the page cache, so that at most ``kept`` windows stay cached."""
    steps = []
    while end - started >= window:
        steps.append(("start", started))
        started += window
        if started - dropped > kept * window:
            steps.append(("drop", dropped))
            dropped += window
    return steps


class _Writeback:
    """Streams a regular output file to disk as it is written (Linux).

    The final fsync then waits for the last windows only, and the file keeps at most
    ``WRITEBACK_KEPT`` windows of page cache: the pages of a window that reached the
    disk are dropped and reused for the next. On a VM that hands free memory back to
    its host, new page-cache pages cost ~2 s per GiB to fault in; reused ones ~0.25 s.
    The price: a file just written is read back from disk. Every call is a hint: a
    failure changes nothing, as the fsync before the rename writes what is left.
    """

    def __init__(self, fd: int, start: int, sync: Callable[[int, int, int, int], int]) -> None:
        self._fd, self._sync = fd, sync
        self._started = self._dropped = start
        self._window, self._kept = WRITEBACK_WINDOW, WRITEBACK_KEPT

    def wrote(self, end: int) -> None:
        window = self._window
        for step, offset in writeback_plan(self._started, self._dropped, end, window,
                                           self._kept):
            if step == "start":
                self._sync(self._fd, offset, window, _WRITE)
                self._started = offset + window
            else:
                self._sync(self._fd, offset, window, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self._fd, offset, window, os.POSIX_FADV_DONTNEED)
                self._dropped = offset + window


class Pipeline:
    """Reader and writer threads around the caller's loop::

        with Pipeline(src, dst, in_size, out_size) as pipe:
            for data, last in pipe.chunks():
                out = pipe.output(sealed_size(len(data)))
                seal(data, last, into=out)
                pipe.write(out)

    ``chunks()`` yields every input buffer as it was filled (all ``in_size`` bytes
    but the last, which holds 0..in_size) with a flag for the last; the buffer is
    reused once the loop asks for the next. An empty input is one empty last chunk.
    A chunk may hold several segments: every hop between threads costs a wake-up,
    which on a busy machine waits for a free core, so the fewer the better.
    """

    def __init__(self, src: IO[bytes], dst: IO[bytes], in_size: int, out_size: int, *,
                 depth: int = DEPTH, src_name: str = "the input",
                 dst_name: str = "the output") -> None:
        self._src, self._dst = src, dst
        self._src_name, self._dst_name = src_name, dst_name
        # Unbounded queues: the pools bound them, and a put never blocks a stopping thread.
        self._free_in: queue.SimpleQueue[mmap.mmap | None] = queue.SimpleQueue()
        self._filled: queue.SimpleQueue[tuple[mmap.mmap, int] | _End | BaseException] = (
            queue.SimpleQueue())
        self._free_out: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._todo: queue.SimpleQueue[memoryview | _End] = queue.SimpleQueue()
        # Anonymous maps, not bytearrays: no zero-filling up front, and a page is
        # faulted in only when used (a small file touches one buffer's worth). One
        # input buffer more: the caller holds a chunk and the next, to learn if it is
        # the last, while the reader fills the others.
        for _ in range(depth + 1):
            self._free_in.put(mmap.mmap(-1, in_size))
        for _ in range(depth):
            self._free_out.put(mmap.mmap(-1, out_size))
        self._write_error: BaseException | None = None
        self._failed = False
        self._reader = threading.Thread(target=self._read, name="dew-file-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="dew-file-writer", daemon=True)
        self._read_fd = _regular_fd(src)
        self._written = 0
        self._writeback: _Writeback | None = None
        write_fd = _regular_fd(dst)
        sync = _writeback() if write_fd is not None else None
        if write_fd is not None and sync is not None:
            # File offsets: the body starts after what dst already holds (the header).
            self._written = dst.tell()
            self._writeback = _Writeback(write_fd, self._written, sync)

    def __enter__(self) -> Pipeline:
        if self._read_fd is not None:
            # Twice the read-ahead; a hint only, so a refusal changes nothing.
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(self._read_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._reader.start()
        self._writer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: object) -> None:
        if kind is not None:
            self._failed = True  # the writer writes nothing more
        self._free_in.put(None)  # stops the reader if it still runs
        self._todo.put(_END)
        self._writer.join()
        # After a failure the reader may be blocked reading a pipe whose writer stalls,
        # which nothing can interrupt: it is a daemon that touches only its own buffers,
        # so it gets a moment to see the stop, then is left behind.
        self._reader.join(None if kind is None or self._read_fd is not None
                          else READER_GRACE_SECONDS)
        if kind is None and self._write_error is not None:
            raise io_error("write", self._dst_name, self._write_error)

    # ------------------------------------------------------------------ caller side

    def chunks(self) -> Iterator[tuple[memoryview, bool]]:
        current = self._take()
        if isinstance(current, _End):
            yield memoryview(b""), True
            return
        while True:
            after = self._take()
            buf, n = current
            yield memoryview(buf)[:n], isinstance(after, _End)
            self._free_in.put(buf)
            if isinstance(after, _End):
                return
            current = after

    def output(self, size: int) -> memoryview:
        """A free output buffer of ``size`` bytes (waits while all are being written)."""
        return memoryview(self._free_out.get())[:size]

    def write(self, data: memoryview) -> None:
        """Queue ``data`` (a view of an :meth:`output` buffer) for the writer."""
        if self._write_error is not None:
            self._failed = True
            raise io_error("write", self._dst_name, self._write_error)
        self._todo.put(data)

    def _take(self) -> tuple[mmap.mmap, int] | _End:
        item = self._filled.get()
        if isinstance(item, BaseException):
            raise io_error("read", self._src_name, item) from item
        return item

    # ------------------------------------------------------------------ threads

    def _read(self) -> None:
        try:
            while (buf := self._free_in.get()) is not None:
                n = fill(self._src, memoryview(buf))
                if n:
                    self._filled.put((buf, n))
                if n < len(buf):
                    break
        except Exception as exc:  # noqa: BLE001 - raised in the caller's thread
            self._filled.put(exc)
            return
        self._filled.put(_END)

    def _write(self) -> None:
        while not isinstance(item := self._todo.get(), _End):
            if self._write_error is None and not self._failed:
                try:
                    write_all(self._dst, item)
                except Exception as exc:  # noqa: BLE001 - raised in the caller's thread
                    self._write_error = exc
                else:
                    self._written += len(item)
                    if self._writeback is not None:
                        self._writeback.wrote(self._written)
            buf = item.obj  # the caller may still hold the view: not released here
            assert isinstance(buf, mmap.mmap)
            self._free_out.put(buf)
