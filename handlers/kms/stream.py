"""Streaming envelope encryption of files (``dew kms encrypt-file`` / ``decrypt-file``).

A fresh data key per file from ``create-datakey``; the encrypted data key goes in
the header, the plaintext one only in memory. The body is a segmented AEAD
stream in the spirit of Tink's streaming AEAD and age's STREAM (format in
docs_kms2.md)::

    header  = "DEWF" | version (1) | algorithm (1 = AES-256-GCM) | segment size (u32)
              | encrypted data key length (u16) | encrypted data key | nonce prefix (7)
    segment = AES-256-GCM(data key, nonce, plaintext, aad = header) -> ciphertext || tag
    nonce   = nonce prefix (7) | segment index (u32, big-endian) | last flag (0x00 / 0x01)

Every segment but the last holds exactly ``segment size`` plaintext bytes; the
last holds 0..segment size (an empty file is one empty last segment). So a
reordered segment fails (its index is in the nonce), a truncated file fails
(its new last segment was sealed with flag 0), appended data fails (the real
last segment was sealed with flag 1), and any flipped bit fails its tag, or
the header's (it is every segment's AAD). Memory is six segment buffers
whatever the file size (two in, four out: a writer thread overlaps the disk
writes with reading and encrypting). Output to a path goes to a temporary file
in the same directory, renamed only when everything verified: a failure leaves
no plaintext behind.
To stdout (``-``) verified segments are written as they come; a failure is
then reported (exit 1) after part of the output was written, as with age.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.crypto import IntegrityCheckFailed
from engine.errors import InvalidInput
from handlers.kms.format import DEFAULT_ACCOUNT, Purpose, unpack_ciphertext

if TYPE_CHECKING:
    from handlers.kms.service import KmsService

MAGIC = b"DEWF"
FORMAT_VERSION = 1
ALGORITHM_AES_256_GCM_SEGMENTED = 1
DEFAULT_SEGMENT = 1 << 20
MIN_SEGMENT, MAX_SEGMENT = 1 << 10, 1 << 24
TAG = 16
PREFIX = 7
MAX_SEGMENTS = 1 << 32
_FIXED = struct.Struct(">4sBBIH")  # magic, version, algorithm, segment size, edk length
MAX_EDK = 1024
# The data key's encryption context: a file's data key cannot be passed off as another's.
CONTEXT = {"dew:format": "encrypt-file/v1"}
PROGRESS_MIN_BYTES = 64 << 20

Progress = Callable[[int], None]


@dataclass(frozen=True)
class StreamResult:
    key_id: str
    plaintext_bytes: int
    segments: int

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "plaintext_bytes": self.plaintext_bytes,
                "segments": self.segments}


def _broken(message: str, cause: str = "") -> IntegrityCheckFailed:
    return IntegrityCheckFailed(
        f"integrity check failed: {message}", cause=cause,
        fix="The file was altered, truncated or extended after encryption; use an intact "
        "copy. No plaintext was written (to a file).",
    )


def pack_header(segment_size: int, edk: bytes, prefix: bytes) -> bytes:
    return _FIXED.pack(MAGIC, FORMAT_VERSION, ALGORITHM_AES_256_GCM_SEGMENTED, segment_size,
                       len(edk)) + edk + prefix


def read_header(src: IO[bytes]) -> tuple[bytes, int, bytes, bytes]:
    """(header bytes, segment size, encrypted data key, nonce prefix) from the stream."""
    fixed = _read_exact(src, _FIXED.size)
    if len(fixed) < 4 or fixed[:4] != MAGIC:
        raise InvalidInput("this is not a file made by dew kms encrypt-file (bad magic bytes)",
                           code="invalid_ciphertext")
    if len(fixed) < _FIXED.size:
        raise _broken("the file is shorter than its header")
    _, version, algorithm, segment, edk_len = _FIXED.unpack(fixed)
    if version != FORMAT_VERSION or algorithm != ALGORITHM_AES_256_GCM_SEGMENTED:
        raise InvalidInput(f"unsupported encrypted-file format {version}/{algorithm}",
                           code="invalid_ciphertext", fix="Use a newer dew to decrypt it.")
    if not MIN_SEGMENT <= segment <= MAX_SEGMENT or not 0 < edk_len <= MAX_EDK:
        raise _broken("the header's sizes are out of range")
    rest = _read_exact(src, edk_len + PREFIX)
    if len(rest) < edk_len + PREFIX:
        raise _broken("the file is shorter than its header")
    return fixed + rest, segment, rest[:edk_len], rest[edk_len:]


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= MAX_SEGMENTS:
        raise InvalidInput("the file is too large for this format (2^32 segments)")
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _read_exact(src: IO[bytes], n: int) -> bytes:
    """``n`` bytes, fewer only at end of file (pipes return short reads)."""
    chunks, got = [], 0
    while got < n:
        chunk = src.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _fill(src: IO[bytes], view: memoryview) -> int:
    """Fill ``view`` from the stream; fewer bytes only at end of file."""
    got = 0
    readinto = getattr(src, "readinto", None)
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:])
        else:
            chunk = src.read(len(view) - got)
            n = len(chunk)
            view[got : got + n] = chunk
        if not n:
            break
        got += n
    return got


class _Writer:
    """Writes on a thread of its own, so that the disk write of one segment overlaps the
    read and the encryption of the next (file writes release the GIL; AES-GCM does not).

    ``buffer()`` hands out one of ``depth + 2`` output buffers, in turn; a buffer
    comes back only after its data was written (the queue holds at most ``depth``).
    """

    def __init__(self, dst: IO[bytes], size: int, depth: int = 2) -> None:
        self._dst = dst
        self._buffers = [bytearray(size) for _ in range(depth + 2)]
        self._next = 0
        self._queue: queue.Queue[memoryview | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dew-file-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._dst.write(item)
                except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = exc

    def buffer(self) -> bytearray:
        buf = self._buffers[self._next]
        self._next = (self._next + 1) % len(self._buffers)
        return buf

    def write(self, data: memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def close(self) -> None:
        """Wait for every queued write; raise the writer's error, if any."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


@contextlib.contextmanager
def _writer(dst: IO[bytes], size: int) -> Iterator[_Writer]:
    writer = _Writer(dst, size)
    try:
        yield writer
    except BaseException:
        # Stop the thread; its own error (if any) matters less than ours.
        with contextlib.suppress(Exception):
            writer.close()
        raise
    writer.close()


def encrypt_segments(
    aead: AESGCM, prefix: bytes, header: bytes, segment: int, src: IO[bytes], dst: IO[bytes],
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Blocking: the body of an encrypted file. Returns (plaintext bytes, segments)."""
    bufs = [bytearray(segment), bytearray(segment)]
    cur, n_cur = 0, _fill(src, memoryview(bufs[0]))
    index = total = 0
    with _writer(dst, segment + TAG) as writer:
        while True:
            n_next = _fill(src, memoryview(bufs[1 - cur])) if n_cur == segment else 0
            last = n_next == 0
            # encrypt_into wants a buffer of exactly the output's size.
            sealed = memoryview(writer.buffer())[: n_cur + TAG]
            aead.encrypt_into(_nonce(prefix, index, last), memoryview(bufs[cur])[:n_cur],
                              header, sealed)
            writer.write(sealed)
            total += n_cur
            index += 1
            if progress is not None:
                progress(total)
            if last:
                return total, index
            cur, n_cur = 1 - cur, n_next


def decrypt_segments(
    aead: AESGCM, prefix: bytes, header: bytes, segment: int, src: IO[bytes], dst: IO[bytes],
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Blocking: verify and decrypt the body. Returns (plaintext bytes, segments)."""
    size = segment + TAG
    bufs = [bytearray(size), bytearray(size)]
    cur, n_cur = 0, _fill(src, memoryview(bufs[0]))
    index = total = 0
    with _writer(dst, segment) as writer:
        while True:
            if n_cur < TAG:
                raise _broken("the file ends before its final segment (truncated)",
                              f"segment {index} has {n_cur} bytes, less than a tag")
            n_next = _fill(src, memoryview(bufs[1 - cur])) if n_cur == size else 0
            last = n_next == 0
            data = memoryview(bufs[cur])[:n_cur]
            plain = memoryview(writer.buffer())[: n_cur - TAG]
            try:
                aead.decrypt_into(_nonce(prefix, index, last), data, header, plain)
            except InvalidTag:
                raise _why(aead, prefix, header, index, last, data) from None
            writer.write(plain)  # only verified plaintext is ever written
            total += len(plain)
            index += 1
            if progress is not None:
                progress(total)
            if last:
                return total, index
            cur, n_cur = 1 - cur, n_next


def _why(aead: AESGCM, prefix: bytes, header: bytes, index: int, last: bool,
         data: memoryview) -> IntegrityCheckFailed:
    """Say what went wrong: the segment opens with the other last flag only when the
    file was cut at a segment boundary, or when data follows the final segment."""
    try:
        aead.decrypt(_nonce(prefix, index, not last), bytes(data), header)
    except InvalidTag:
        return _broken(f"segment {index} was altered, moved or belongs to another file")
    if last:
        return _broken("the file was truncated: it ends without its final segment")
    return _broken("data was appended after the final segment")


# --------------------------------------------------------------------------- with KMS


async def encrypt_stream(
    kms: KmsService, key: str, src: IO[bytes], dst: IO[bytes], *,
    account: str = DEFAULT_ACCOUNT, segment_size: int = DEFAULT_SEGMENT,
    progress: Progress | None = None,
) -> StreamResult:
    """Encrypt ``src`` into ``dst`` under a fresh data key made under ``key``."""
    if not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
        raise InvalidInput(f"the segment size must be {MIN_SEGMENT}..{MAX_SEGMENT} bytes")
    dk = await kms.create_datakey(key, 256, account=account, encryption_context=CONTEXT)
    assert dk.plain_text is not None
    header = pack_header(segment_size, dk.cipher_text, os.urandom(PREFIX))
    dst.write(header)
    aead = AESGCM(dk.plain_text)
    total, count = await asyncio.to_thread(
        encrypt_segments, aead, header[-PREFIX:], header, segment_size, src, dst, progress)
    return StreamResult(dk.key_id, total, count)


async def decrypt_stream(
    kms: KmsService, src: IO[bytes], dst: IO[bytes], *, account: str = DEFAULT_ACCOUNT,
    progress: Progress | None = None,
) -> StreamResult:
    """Verify and decrypt ``src`` (made by :func:`encrypt_stream`) into ``dst``."""
    header, segment, edk, prefix = await asyncio.to_thread(read_header, src)
    key_id = unpack_ciphertext(edk, Purpose.DATA_KEY)[0].key_id
    dk = await kms.decrypt_datakey(key_id, edk, account=account, encryption_context=CONTEXT)
    assert dk.plain_text is not None
    aead = AESGCM(dk.plain_text)
    total, count = await asyncio.to_thread(
        decrypt_segments, aead, prefix, header, segment, src, dst, progress)
    return StreamResult(dk.key_id, total, count)


@contextlib.contextmanager
def open_input(path: str) -> Iterator[IO[bytes]]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        fh = Path(path).open("rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        yield fh


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[IO[bytes]]:
    """A temporary file beside ``path`` (mode 0600), renamed over it on success and
    removed on any failure; ``-`` is stdout."""
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".dew-tmp",
                                   dir=target.parent or Path("."))
    except OSError as exc:
        raise InvalidInput(f"cannot write in {target.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def terminal_progress(total_bytes: int | None) -> Progress | None:
    """A progress line on stderr for large files when stderr is a terminal."""
    if not sys.stderr.isatty() or (total_bytes is not None and total_bytes < PROGRESS_MIN_BYTES):
        return None
    shown = [-1]

    def show(done: int) -> None:
        mib = done >> 20
        if mib != shown[0]:
            shown[0] = mib
            of = f" / {total_bytes >> 20} MiB ({100 * done // max(total_bytes, 1)}%)" \
                if total_bytes else " MiB"
            sys.stderr.write(f"\r{mib}{of}   ")
            sys.stderr.flush()

    return show


async def encrypt_file(
    kms: KmsService, key: str, in_path: str, out_path: str, *,
    account: str = DEFAULT_ACCOUNT, segment_size: int = DEFAULT_SEGMENT,
    progress: Progress | None = None,
) -> StreamResult:
    with open_input(in_path) as src, atomic_output(out_path) as dst:
        return await encrypt_stream(kms, key, src, dst, account=account,
                                    segment_size=segment_size, progress=progress)


async def decrypt_file(
    kms: KmsService, in_path: str, out_path: str, *, account: str = DEFAULT_ACCOUNT,
    progress: Progress | None = None,
) -> StreamResult:
    with open_input(in_path) as src, atomic_output(out_path) as dst:
        return await decrypt_stream(kms, src, dst, account=account, progress=progress)
