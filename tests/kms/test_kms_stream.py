"""Streaming envelope encryption of files: round trips at the segment edges, and every
kind of tampering refused with a clear error and no plaintext file left behind."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.crypto import IntegrityCheckFailed
from engine.errors import InvalidInput
from engine.settings import Settings
from handlers.kms import stream as kms_stream
from handlers.kms.service import KmsService
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


async def test_tampering_is_detected(kms: KmsService) -> None:
    for name, (blob, text) in (await _tampered_cases(kms)).items():
        with pytest.raises(IntegrityCheckFailed) as caught:
            await _decrypt(kms, blob)
        assert text in caught.value.message, (name, caught.value.message)
    with pytest.raises(InvalidInput, match="not a file made by"):
        await _decrypt(kms, b"plain text, not ours")


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
