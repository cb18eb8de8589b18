"""Streaming envelope encryption of files: round trips at the segment edges, and every
kind of tampering refused with a clear error and no plaintext file left behind."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.crypto import IntegrityCheckFailed
from engine.errors import InvalidInput
from engine.settings import Settings
from handlers.kms import stream as kms_stream
from handlers.kms import stream_io
from handlers.kms.service import KmsService
from handlers.kms.stream_io import FileIOFailed, writeback_plan
from tests.helpers import ROOT, dew_env, run_dew

SEG = 1024  # small segments keep multi-segment cases small
TAG = 16


async def _encrypt(kms: KmsService, key: str, data: bytes) -> bytes:
    out = io.BytesIO()
    result = await kms_stream.encrypt_stream(kms, key, io.BytesIO(data), out, segment_size=SEG)
    assert result.plaintext_bytes == len(data)
    assert result.segments == max(1, -(-len(data) // SEG))
    return out.getvalue()


async def _decrypt(kms: KmsService, blob: bytes) -> bytes:
    out = io.BytesIO()
    await kms_stream.decrypt_stream(kms, io.BytesIO(blob), out)
    return out.getvalue()


def _header_len(blob: bytes) -> int:
    return len(kms_stream.read_header(io.BytesIO(blob))[0])


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 3 * SEG + 5])
async def test_round_trips(kms: KmsService, size: int) -> None:
    key = await kms.create_key(f"file/{size}")
    data = os.urandom(size)
    blob = await _encrypt(kms, key.key_id, data)
    segments = max(1, -(-size // SEG))
    assert len(blob) == _header_len(blob) + size + segments * TAG
    assert await _decrypt(kms, blob) == data
    # A fresh data key (and nonce prefix) per file: same input, different output.
    assert await _encrypt(kms, key.key_id, data) != blob


async def _tampered_cases(kms: KmsService) -> dict[str, tuple[bytes, str]]:
    key = await kms.create_key("file/tamper")
    data = os.urandom(3 * SEG + 100)
    blob = await _encrypt(kms, key.key_id, data)
    full = await _encrypt(kms, key.key_id, os.urandom(2 * SEG))
    other = await _encrypt(kms, key.key_id, data)
    h = _header_len(blob)
    seg = SEG + TAG
    s0, s1 = blob[h : h + seg], blob[h + seg : h + 2 * seg]
    flip_body = bytearray(blob)
    flip_body[h + seg + 7] ^= 0x10
    flip_header = bytearray(blob)
    flip_header[h - 1] ^= 1  # the nonce prefix
    flip_size = bytearray(blob)
    flip_size[9] ^= 0x04  # the segment size: 1024 -> 2048
    return {
        "cut at a segment boundary": (blob[: h + 3 * seg], "truncated"),
        "cut inside a segment": (blob[:-50], "altered"),
        "cut to the header": (blob[:h], "truncated"),
        "segments swapped": (blob[:h] + s1 + s0 + blob[h + 2 * seg :], "altered, moved"),
        "segment dropped": (blob[:h] + s1 + blob[h + 2 * seg :], "altered, moved"),
        "bit flip in the body": (bytes(flip_body), "segment 1 was altered"),
        "bit flip in the nonce prefix": (bytes(flip_header), "segment 0"),
        "segment size changed": (bytes(flip_size), "integrity check failed"),
        "bytes appended": (blob + b"\x00" * 10, "integrity check failed"),
        "segment appended after a full last one": (
            full + full[_header_len(full) : _header_len(full) + seg], "appended"),
        "another file's header": (other[: _header_len(other)] + blob[h:], "segment 0"),
        "tag cut off the empty last segment": (blob[: h + 3 * seg] + b"\x00" * 5, "truncated"),
    }


@pytest.mark.parametrize("segments_per_block", [2, None])
async def test_tampering_is_detected(kms: KmsService, monkeypatch: pytest.MonkeyPatch,
                                     segments_per_block: int | None) -> None:
    if segments_per_block is not None:  # blocks of 2 segments: the cases cross blocks
        monkeypatch.setattr(kms_stream, "BLOCK", segments_per_block * (SEG + TAG))
    for name, (blob, text) in (await _tampered_cases(kms)).items():
        with pytest.raises(IntegrityCheckFailed) as caught:
            await _decrypt(kms, blob)
        assert text in caught.value.message, (name, caught.value.message)
    with pytest.raises(InvalidInput, match="not a file made by"):
        await _decrypt(kms, b"plain text, not ours")
    # A refused segment stops the reader and writer threads too.
    assert not [t for t in threading.enumerate() if t.name.startswith("dew-file-")]


async def test_no_plaintext_left_behind_on_failure(kms: KmsService, tmp_path: Path) -> None:
    key = await kms.create_key("file/atomic")
    tmp_path = tmp_path / "files"
    tmp_path.mkdir()
    plain, enc, out = tmp_path / "plain", tmp_path / "enc", tmp_path / "out"
    plain.write_bytes(os.urandom(5 * SEG))
    with plain.open("rb") as src, enc.open("wb") as dst:
        await kms_stream.encrypt_stream(kms, key.key_id, src, dst, segment_size=SEG)
    await kms_stream.decrypt_file(kms, str(enc), str(out))
    assert out.read_bytes() == plain.read_bytes() and (out.stat().st_mode & 0o777) == 0o600
    out.unlink()
    blob = enc.read_bytes()
    enc.write_bytes(blob[: -(SEG + TAG)])  # the (full) last segment cut off
    with pytest.raises(IntegrityCheckFailed, match="truncated"):
        await kms_stream.decrypt_file(kms, str(enc), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc", "plain"]
    # An existing OUT is left as it was when decryption fails.
    out.write_bytes(b"keep me")
    with pytest.raises(IntegrityCheckFailed):
        await kms_stream.decrypt_file(kms, str(enc), str(out))
    assert out.read_bytes() == b"keep me"


def test_cli_files_and_pipes(kms_settings: Settings, tmp_path: Path) -> None:
    assert run_dew(kms_settings, "kms", "create-key", "--alias", "file/cli").returncode == 0
    plain, enc, out = tmp_path / "plain", tmp_path / "enc", tmp_path / "out"
    plain.write_bytes(os.urandom(3 * (1 << 20) + 7))  # multi-segment at the default size
    done = run_dew(kms_settings, "kms", "encrypt-file", "file/cli", str(plain), str(enc),
                   "--json")
    assert done.returncode == 0, done.stderr
    assert '"segments": 4' in done.stdout
    assert run_dew(kms_settings, "kms", "decrypt-file", str(enc), str(out)).returncode == 0
    assert out.read_bytes() == plain.read_bytes()
    # stdin -> stdout, both ways.
    cmd = [sys.executable, "-m", "engine.cli", "kms"]
    env = dew_env(kms_settings)
    piped = subprocess.run([*cmd, "encrypt-file", "file/cli", "-", "-"], input=b"via pipes",
                           capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert piped.returncode == 0, piped.stderr
    back = subprocess.run([*cmd, "decrypt-file", "-", "-"], input=piped.stdout,
                          capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert back.returncode == 0 and back.stdout == b"via pipes"
    # Tampered: exit 1, one clear error, no OUT.
    blob = bytearray(enc.read_bytes())
    blob[-100] ^= 1
    enc.write_bytes(bytes(blob))
    out.unlink()
    failed = run_dew(kms_settings, "kms", "decrypt-file", str(enc), str(out))
    assert failed.returncode == 1 and "integrity check failed" in failed.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    # Bad input (exit 2, before anything opens) is in test_kms_cli_sign.py.


# --------------------------------------------------------------- the I/O pipeline


def _reference(key: bytes, prefix: bytes, header: bytes, data: bytes) -> bytes:
    """The body as docs/kms.md defines it, one segment after the other."""
    aead, count = AESGCM(key), max(1, -(-len(data) // SEG))
    return b"".join(
        aead.encrypt(prefix + i.to_bytes(4, "big") + bytes([i == count - 1]),
                     data[i * SEG : (i + 1) * SEG], header)
        for i in range(count))


def _through_a_pipe(data: bytes) -> IO[bytes]:
    """A real pipe fed in 100-byte writes: the reader gets short reads."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with open(write_fd, "wb", buffering=0) as pipe:
            for at in range(0, len(data), 100):
                pipe.write(data[at : at + 100])

    threading.Thread(target=feed, daemon=True).start()
    return open(read_fd, "rb", buffering=0)


def _pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dew-file-")]


@pytest.mark.parametrize("segments_per_block", [1, 2])
@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 2 * SEG + 1, 3 * SEG,
                                  4 * SEG])
def test_pipeline_writes_the_documented_bytes(monkeypatch: pytest.MonkeyPatch, size: int,
                                              segments_per_block: int) -> None:
    # The pipeline hands blocks of whole segments between its threads: the segment and
    # block edges must not show in the output.
    monkeypatch.setattr(kms_stream, "BLOCK", segments_per_block * (SEG + TAG))
    key, prefix, data = os.urandom(32), os.urandom(kms_stream.PREFIX), os.urandom(size)
    header = kms_stream.pack_header(SEG, b"edk", prefix)
    sealed = io.BytesIO()
    with _through_a_pipe(data) as src:
        done = kms_stream.encrypt_segments(AESGCM(key), prefix, header, SEG, src, sealed)
    assert sealed.getvalue() == _reference(key, prefix, header, data)
    assert done == (size, max(1, -(-size // SEG)))
    opened = io.BytesIO()
    with _through_a_pipe(sealed.getvalue()) as src:
        kms_stream.decrypt_segments(AESGCM(key), prefix, header, SEG, src, opened)
    assert opened.getvalue() == data
    assert _pipeline_threads() == []


class _FailingDisk(io.RawIOBase):
    """A file whose disk fails (EIO) after ``good`` bytes."""

    def __init__(self, data: bytes, good: int) -> None:
        self._data, self._good, self._at = data, good, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._at >= self._good:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        n = min(len(buffer), self._good - self._at)
        buffer[:n] = self._data[self._at : self._at + n]
        self._at += n
        return n


def _failing_disk(data: bytes, good: int) -> IO[bytes]:
    return io.BufferedReader(_FailingDisk(data, good))


async def test_a_read_error_is_one_error_and_no_output(kms: KmsService, tmp_path: Path) -> None:
    key = await kms.create_key("file/eio")
    data = os.urandom(5 * SEG)
    where = tmp_path / "files"
    where.mkdir()
    out = where / "out"
    with (pytest.raises(FileIOFailed, match="cannot read the input: Input/output error"),
          kms_stream.atomic_output(str(out)) as dst):
        await kms_stream.encrypt_stream(kms, key.key_id, _failing_disk(data, 2 * SEG + 9),
                                        dst, segment_size=SEG)
    blob = await _encrypt(kms, key.key_id, data)
    with (pytest.raises(FileIOFailed, match="cannot read the input"),
          kms_stream.atomic_output(str(out)) as dst):
        await kms_stream.decrypt_stream(kms, _failing_disk(blob, len(blob) - 40), dst)
    assert list(where.iterdir()) == [] and _pipeline_threads() == []


async def test_a_write_error_is_one_error(kms: KmsService) -> None:
    key = await kms.create_key("file/enospc")
    data = os.urandom(3 * SEG)
    blob = await _encrypt(kms, key.key_id, data)
    # /dev/full: every write fails with ENOSPC (here the header's, below a segment's).
    with (open("/dev/full", "wb", buffering=0) as full,
          pytest.raises(FileIOFailed, match="cannot write the output: No space left")):
        await kms_stream.encrypt_stream(kms, key.key_id, io.BytesIO(data), full,
                                        segment_size=SEG)
    with (open("/dev/full", "wb", buffering=0) as full,
          pytest.raises(FileIOFailed, match="cannot write the output: No space left")):
        await kms_stream.decrypt_stream(kms, io.BytesIO(blob), full)
    assert _pipeline_threads() == []


def test_writeback_keeps_a_bounded_window_of_the_output_cached() -> None:
    w = 16
    # Below a window: nothing; each full window is started; once more than two were
    # started, the oldest is waited for and dropped, in order, never beyond the start.
    assert writeback_plan(100, 100, 100 + w - 1, w, kept=2) == []
    assert writeback_plan(100, 100, 100 + 3 * w + 5, w, kept=2) == [
        ("start", 100), ("start", 100 + w), ("start", 100 + 2 * w), ("drop", 100)]
    started = dropped = 0
    for end in range(0, 40 * w, 7):  # writes of odd sizes
        for step, offset in writeback_plan(started, dropped, end, w, kept=2):
            if step == "start":
                started = offset + w
            else:
                assert offset == dropped and offset + 3 * w <= started
                dropped = offset + w
    assert started - dropped == 2 * w and started > 38 * w


def test_writeback_to_real_files_changes_no_byte(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    # Small windows, so that a small file starts, waits for and drops many of them.
    monkeypatch.setattr(stream_io, "WRITEBACK_WINDOW", 4096)
    monkeypatch.setattr(stream_io, "WRITEBACK_KEPT", 2)
    monkeypatch.setattr(kms_stream, "BLOCK", 2 * (SEG + TAG))
    key, prefix, data = os.urandom(32), os.urandom(kms_stream.PREFIX), os.urandom(40 * SEG + 3)
    header = kms_stream.pack_header(SEG, b"edk", prefix)
    plain, sealed, opened = tmp_path / "plain", tmp_path / "sealed", tmp_path / "opened"
    plain.write_bytes(data)
    with kms_stream.open_input(str(plain)) as src, kms_stream.atomic_output(str(sealed)) as dst:
        dst.write(header)
        kms_stream.encrypt_segments(AESGCM(key), prefix, header, SEG, src, dst)
    assert sealed.read_bytes() == header + _reference(key, prefix, header, data)
    with kms_stream.open_input(str(sealed)) as src, kms_stream.atomic_output(str(opened)) as dst:
        src.seek(len(header))
        kms_stream.decrypt_segments(AESGCM(key), prefix, header, SEG, src, dst)
    assert opened.read_bytes() == data
