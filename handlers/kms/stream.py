"""Streaming envelope encryption of files (``dew kms encrypt-file`` / ``decrypt-file``).

A fresh data key per file from ``create-datakey``; the encrypted data key goes in
the header, the plaintext one only in memory. The body is a segmented AEAD
stream in the spirit of Tink's streaming AEAD and age's STREAM (format in
docs/kms.md)::

    header  = "DEWF" | version (1) | algorithm (1 = AES-256-GCM) | segment size (u32)
              | encrypted data key length (u16) | encrypted data key | nonce prefix (7)
    segment = AES-256-GCM(data key, nonce, plaintext, aad = header) -> ciphertext || tag
    nonce   = nonce prefix (7) | segment index (u32, big-endian) | last flag (0x00 / 0x01)

Every segment but the last holds exactly ``segment size`` plaintext bytes; the
last holds 0..segment size (an empty file is one empty last segment). So a
reordered segment fails (its index is in the nonce), a truncated file fails
(its new last segment was sealed with flag 0), appended data fails (the real
last segment was sealed with flag 1), and any flipped bit fails its tag, or
the header's (it is every segment's AAD).

A reader thread, the sealing thread and a writer thread overlap
(``stream_io.Pipeline``), handing each other blocks of whole segments (``BLOCK``,
4 MiB), so a file takes the time of the slowest of read, AES-GCM and write, not
their sum. Memory is seven such buffers whatever the file size (four in, three
out), and the output keeps a bounded share of the page cache: it is written back
to disk as it goes (``stream_io._Writeback``). Output to a path goes to a
temporary file in the same directory, fsynced, and renamed only when everything
verified: a failure leaves no plaintext behind. To stdout (``-``) verified
blocks are written as they come; a failure is then reported (exit 1) after
part of the output was written, as with age. A read or write error part-way is
one ``FileIOFailed`` (exit 1) naming IN or OUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.crypto import IntegrityCheckFailed
from engine.errors import InvalidInput
from handlers.kms.format import DEFAULT_ACCOUNT, Purpose, unpack_ciphertext
from handlers.kms.stream_io import Pipeline, io_error, write_all

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
# Bytes of whole segments read, sealed and written as one unit by the pipeline: a
# wake-up per 4 MiB instead of per segment; memory is seven such buffers.
BLOCK = 4 << 20

Progress = Callable[[int], None]
Names = tuple[str, str]  # IN and OUT as the user named them, for I/O errors
NAMES: Names = ("the input", "the output")


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


def _block(unit: int) -> int:
    """Segments per buffer handed between the pipeline's threads (see ``BLOCK``)."""
    return max(1, BLOCK // unit)


def encrypt_segments(
    aead: AESGCM, prefix: bytes, header: bytes, segment: int, src: IO[bytes], dst: IO[bytes],
    progress: Progress | None = None, *, names: Names = NAMES,
) -> tuple[int, int]:
    """Blocking: the body of an encrypted file. Returns (plaintext bytes, segments)."""
    per = _block(segment)
    index = total = 0
    with Pipeline(src, dst, per * segment, per * (segment + TAG), src_name=names[0],
                  dst_name=names[1]) as pipe:
        for block, last_block in pipe.chunks():
            count = max(1, -(-len(block) // segment))  # an empty file: one empty segment
            sealed = pipe.output(len(block) + count * TAG)
            for at in range(count):
                plain = block[at * segment : (at + 1) * segment]
                out = at * (segment + TAG)
                # encrypt_into wants a buffer of exactly the output's size.
                aead.encrypt_into(_nonce(prefix, index, last_block and at == count - 1),
                                  plain, header, sealed[out : out + len(plain) + TAG])
                index += 1
            pipe.write(sealed)
            total += len(block)
            if progress is not None:
                progress(total)
    return total, index


def decrypt_segments(
    aead: AESGCM, prefix: bytes, header: bytes, segment: int, src: IO[bytes], dst: IO[bytes],
    progress: Progress | None = None, *, names: Names = NAMES,
) -> tuple[int, int]:
    """Blocking: verify and decrypt the body. Returns (plaintext bytes, segments)."""
    size = segment + TAG
    per = _block(size)
    index = total = 0
    with Pipeline(src, dst, per * size, per * segment, src_name=names[0],
                  dst_name=names[1]) as pipe:
        for block, last_block in pipe.chunks():
            full, rest = divmod(len(block), size)
            count = max(1, full + (rest > 0))
            # A last piece shorter than a tag is refused below, after the whole ones.
            plain = pipe.output(full * segment + max(0, rest - TAG))
            for at in range(count):
                data = block[at * size : (at + 1) * size]
                if len(data) < TAG:
                    raise _broken("the file ends before its final segment (truncated)",
                                  f"segment {index} has {len(data)} bytes, less than a tag")
                last = last_block and at == count - 1
                out = at * segment
                try:
                    aead.decrypt_into(_nonce(prefix, index, last), data, header,
                                      plain[out : out + len(data) - TAG])
                except InvalidTag:
                    raise _why(aead, prefix, header, index, last, data) from None
                index += 1
            pipe.write(plain)  # only verified plaintext is ever written
            total += len(plain)
            if progress is not None:
                progress(total)
    return total, index


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
    progress: Progress | None = None, names: Names = NAMES,
) -> StreamResult:
    """Encrypt ``src`` into ``dst`` under a fresh data key made under ``key``."""
    if not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
        raise InvalidInput(f"the segment size must be {MIN_SEGMENT}..{MAX_SEGMENT} bytes")
    dk = await kms.create_datakey(key, 256, account=account, encryption_context=CONTEXT)
    assert dk.plain_text is not None
    header = pack_header(segment_size, dk.cipher_text, os.urandom(PREFIX))
    try:
        write_all(dst, memoryview(header))
    except OSError as exc:
        raise io_error("write", names[1], exc) from exc
    aead = AESGCM(dk.plain_text)
    total, count = await asyncio.to_thread(
        encrypt_segments, aead, header[-PREFIX:], header, segment_size, src, dst, progress,
        names=names)
    return StreamResult(dk.key_id, total, count)


async def decrypt_stream(
    kms: KmsService, src: IO[bytes], dst: IO[bytes], *, account: str = DEFAULT_ACCOUNT,
    progress: Progress | None = None, names: Names = NAMES,
) -> StreamResult:
    """Verify and decrypt ``src`` (made by :func:`encrypt_stream`) into ``dst``."""
    header, segment, edk, prefix = await asyncio.to_thread(read_header, src)
    key_id = unpack_ciphertext(edk, Purpose.DATA_KEY)[0].key_id
    dk = await kms.decrypt_datakey(key_id, edk, account=account, encryption_context=CONTEXT)
    assert dk.plain_text is not None
    aead = AESGCM(dk.plain_text)
    total, count = await asyncio.to_thread(
        decrypt_segments, aead, prefix, header, segment, src, dst, progress, names=names)
    return StreamResult(dk.key_id, total, count)


@contextlib.contextmanager
def open_input(path: str) -> Iterator[IO[bytes]]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        # Unbuffered: segments are read straight into their buffers, with no copy.
        fh = Path(path).open("rb", buffering=0)  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        yield fh


def _temporary_beside(target: Path) -> tuple[int, str]:
    """A new file ``.NAME.RANDOM.dew-tmp`` in OUT's directory, mode 0600, as
    ``tempfile.mkstemp`` makes them (whose import costs every run a few ms)."""
    for _ in range(100):
        tmp = str(target.parent / f".{target.name}.{os.urandom(6).hex()}.dew-tmp")
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name")


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[IO[bytes]]:
    """A temporary file beside ``path`` (mode 0600), renamed over it on success and
    removed on any failure; ``-`` is stdout."""
    if path == "-":
        yield sys.stdout.buffer
        try:
            sys.stdout.buffer.flush()
        except OSError as exc:
            raise io_error("write", "standard output", exc) from exc
        return
    target = Path(path)
    try:
        fd, tmp = _temporary_beside(target)
    except OSError as exc:
        raise InvalidInput(f"cannot write in {target.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            try:
                fh.flush()
                os.fsync(fh.fileno())  # on disk before it takes OUT's name
            except OSError as exc:
                raise io_error("write", path, exc) from exc
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
                                    segment_size=segment_size, progress=progress,
                                    names=_names(in_path, out_path))


async def decrypt_file(
    kms: KmsService, in_path: str, out_path: str, *, account: str = DEFAULT_ACCOUNT,
    progress: Progress | None = None,
) -> StreamResult:
    with open_input(in_path) as src, atomic_output(out_path) as dst:
        return await decrypt_stream(kms, src, dst, account=account, progress=progress,
                                    names=_names(in_path, out_path))


def _names(in_path: str, out_path: str) -> Names:
    return ("standard input" if in_path == "-" else in_path,
            "standard output" if out_path == "-" else out_path)
