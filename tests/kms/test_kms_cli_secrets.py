"""The CLI's trust boundaries: secrets from a file or stdin instead of argv (L2), and
``dew audit verify`` finding a cut tail (M6), as users run them."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from engine.settings import Settings
from tests.helpers import ROOT, dew_env, run_dew

SECP256K1_D = "e8f32e723decf4051aefac8e2c93c9c5b214313817cdb01a1494b917c8436b35"


def _dew_bytes(settings: Settings, *args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=dew_env(settings),
                          cwd=ROOT, capture_output=True, input=stdin, timeout=60)


def _json(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert done.returncode == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    return data


def _bad(done: subprocess.CompletedProcess[str], text: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], done.stderr
    assert done.stdout == ""


def test_secrets_come_from_files_or_stdin(kms_settings: Settings, tmp_path: Path) -> None:
    _json(run_dew(kms_settings, "kms", "create-key", "--alias", "cli/sec", "--json"))
    dek = bytes(range(32))
    (tmp_path / "dek.bin").write_bytes(dek)
    from_file = _json(run_dew(kms_settings, "kms", "encrypt-datakey", "cli/sec",
                              "--plain-text-file", str(tmp_path / "dek.bin"), "--json"))
    from_stdin = _dew_bytes(kms_settings, "kms", "encrypt-datakey", "cli/sec",
                            "--plain-text-file", "-", "--json", stdin=dek)
    assert from_stdin.returncode == 0, from_stdin.stderr
    from_argv = _json(run_dew(kms_settings, "kms", "encrypt-datakey", "cli/sec",
                              "--plain-text", dek.hex(), "--json"))  # still works
    for made in (from_file, json.loads(from_stdin.stdout), from_argv):
        back = _json(run_dew(kms_settings, "kms", "decrypt-datakey", "cli/sec",
                             "--cipher-text", str(made["cipher_text"]), "--json"))
        assert back["plain_text"] == dek.hex()

    enc = _json(run_dew(kms_settings, "kms", "encrypt-data", "cli/sec", "--plain-text-file",
                        "-", "--json", input="from stdin"))
    dec = _json(run_dew(kms_settings, "kms", "decrypt-data", "--cipher-text",
                        str(enc["cipher_text"]), "--json"))
    assert base64.b64decode(str(dec["plain_text_base64"])) == b"from stdin"

    argv = run_dew(kms_settings, "kms", "ec-raw-to-pkcs8", "--curve", "secp256k1",
                   "--private-hex", SECP256K1_D)
    (tmp_path / "d.hex").write_text(SECP256K1_D + "\n")
    from_hex_file = run_dew(kms_settings, "kms", "ec-raw-to-pkcs8", "--curve", "secp256k1",
                            "--private-hex-file", str(tmp_path / "d.hex"))
    piped = run_dew(kms_settings, "kms", "ec-raw-to-pkcs8", "--curve", "secp256k1",
                    "--private-hex-file", "-", input=SECP256K1_D)
    assert argv.returncode == from_hex_file.returncode == piped.returncode == 0
    assert "BEGIN PRIVATE KEY" in argv.stdout
    assert from_hex_file.stdout == piped.stdout == argv.stdout

    helped = run_dew(kms_settings, "kms", "encrypt-datakey", "--help")
    assert "--plain-text-file" in helped.stdout and "discouraged" in helped.stdout


def test_bad_secret_input_is_one_line_exit_2_and_opens_nothing(
    kms_settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "short.bin").write_bytes(bytes(15))
    (tmp_path / "long.bin").write_bytes(bytes(65))
    (tmp_path / "nothex").write_bytes(b"\xff\xfe")
    for args, text in (
        (("encrypt-datakey", "k", "--plain-text-file", str(tmp_path / "missing")),
         "cannot read --plain-text-file"),
        (("encrypt-datakey", "k", "--plain-text-file", str(tmp_path / "short.bin")),
         "16..64 bytes"),
        (("encrypt-datakey", "k", "--plain-text-file", str(tmp_path / "long.bin")),
         "got more than 64"),
        (("encrypt-datakey", "k", "--plain-text", "abcd"), "16..64 bytes"),
        (("encrypt-data", "k", "--plain-text-file", str(tmp_path / "missing")),
         "cannot read --plain-text-file"),
        (("ec-raw-to-pkcs8", "--curve", "secp256k1", "--private-hex-file",
          str(tmp_path / "nothex")), "not hexadecimal"),
        (("ec-raw-to-pkcs8", "--curve", "secp256k1", "--private-hex-file",
          str(tmp_path / "missing")), "cannot read --private-hex-file"),
    ):
        _bad(run_dew(kms_settings, "kms", *args), text)
    _bad(run_dew(kms_settings, "kms", "ec-raw-to-pkcs8", "--curve", "secp256k1",
                 "--private-hex-file", "-", input=""), "empty")
    _bad(run_dew(kms_settings, "kms", "encrypt-datakey", "k", "--plain-text", "00" * 32,
                 "--plain-text-file", "-"), "not allowed with")  # argparse: one of them
    assert not kms_settings.db_path.exists()


def test_audit_verify_cli_reports_a_cut_tail(kms_settings: Settings) -> None:
    _json(run_dew(kms_settings, "kms", "create-key", "--alias", "cli/audit", "--json"))
    for _ in range(3):
        _json(run_dew(kms_settings, "kms", "encrypt-data", "cli/audit", "--plain-text-file",
                      "-", "--json", input="x"))
    ok = run_dew(kms_settings, "audit", "verify", "--json")
    assert ok.returncode == 0, ok.stderr
    verdict = json.loads(ok.stdout)
    assert verdict["intact"] is True and verdict["unsealed"] == 0
    last = verdict["anchored_at"]
    assert last == verdict["entries"] >= 4
    human = run_dew(kms_settings, "audit", "verify")
    assert human.returncode == 0 and "sealed in the HSM" in human.stdout

    with sqlite3.connect(kms_settings.db_path) as db:
        db.execute("DELETE FROM audit WHERE seq > 2")
        db.execute("UPDATE audit_head SET seq = 2, hash = (SELECT hash FROM audit WHERE seq = 2)")
        db.execute("DELETE FROM audit_seals WHERE seq > 2")
    cut = run_dew(kms_settings, "audit", "verify", "--json")
    assert cut.returncode == 1, cut.stderr
    verdict = json.loads(cut.stdout)
    assert verdict["intact"] is False and verdict["first_broken_seq"] == 3
    assert f"ends at entry 2 but was anchored at entry {last}" in verdict["reason"]
    human = run_dew(kms_settings, "audit", "verify")
    assert human.returncode == 1 and "BROKEN at seq 3" in human.stdout
