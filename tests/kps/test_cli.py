"""Key pairs through the CLI: formats proven with ssh-keygen and puttygen, bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from engine.settings import Settings
from tests.helpers import run_dew
from tests.kps.conftest import dew_ok
from tests.pg_store import store_rows

ALGORITHMS = ["SSH_ED25519", "ECDSA_NISTP256", "ECDSA_NISTP384", "ECDSA_NISTP521",
              "SSH_RSA_2048"]


def _count(settings: Settings, table: str) -> int:
    rows = store_rows(settings.store_target, f"SELECT COUNT(*) FROM {table}")
    return int(str(rows[0][0])) if rows else 0


@pytest.mark.slow
def test_create_fingerprints_and_ppk_both_ways(kps_settings: Settings, tmp_path: Path) -> None:
    s = kps_settings
    for alg in ALGORITHMS:
        out = tmp_path / alg
        data = dew_ok(s, "keypairs", "create", alg.lower().replace("_", "-"), "--algorithm",
                      alg, "--managed", "--out", str(out))
        assert out.stat().st_mode & 0o777 == 0o600
        keygen = subprocess.run(["ssh-keygen", "-lf", f"{out}.pub"], capture_output=True,
                                text=True, check=True).stdout.strip()
        assert keygen == data["keygen"] and data["fingerprint"] in keygen
        # ssh-keygen derives the same public key from our private key file.
        derived = subprocess.run(["ssh-keygen", "-y", "-f", str(out)], capture_output=True,
                                 text=True, check=True).stdout.split()[1]
        assert derived == str(data["public_key"]).split()[1]
        # ours -> .ppk -> puttygen -> OpenSSH: same key.
        ppk = tmp_path / f"{alg}.ppk"
        dew_ok(s, "keypairs", "convert", "--private-key-file", str(out), "--format", "ppk",
               "--out", str(ppk))
        assert ppk.read_text().startswith("PuTTY-User-Key-File-3: ")
        back = subprocess.run(["puttygen", str(ppk), "-O", "public-openssh"],
                              capture_output=True, text=True, check=True).stdout.split()[1]
        assert back == derived
        # puttygen -> .ppk v2 and v3 -> ours -> OpenSSH: same key.
        for version in ("2", "3"):
            theirs = tmp_path / f"{alg}.v{version}.ppk"
            subprocess.run(["puttygen", str(out), "--ppk-param", f"version={version}", "-O",
                            "private", "-o", str(theirs)], check=True, capture_output=True)
            converted = tmp_path / f"{alg}.v{version}.key"
            dew_ok(s, "keypairs", "convert", "--private-key-file", str(theirs), "--format",
                   "openssh", "--out", str(converted))
            again = subprocess.run(["ssh-keygen", "-y", "-f", str(converted)],
                                   capture_output=True, text=True, check=True).stdout.split()[1]
            assert again == derived
    # export-private gives the managed key again, identical.
    exported = tmp_path / "exported"
    dew_ok(s, "keypairs", "export-private", "ssh-ed25519", "--out", str(exported))
    assert exported.read_bytes() == (tmp_path / "SSH_ED25519").read_bytes()


@pytest.mark.slow
def test_import_forms_scope_and_refusals(kps_settings: Settings, tmp_path: Path) -> None:
    s = kps_settings
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@host", "-f",
                    str(key)], check=True)
    rfc = tmp_path / "id.rfc"
    subprocess.run(["puttygen", str(key), "-O", "public", "-o", str(rfc)], check=True)
    assert rfc.read_text().startswith("---- BEGIN SSH2 PUBLIC KEY ----")
    a = dew_ok(s, "keypairs", "import", "from-rfc", "--public-key-file", str(rfc))
    b = dew_ok(s, "keypairs", "import", "from-openssh", "--public-key-file", f"{key}.pub",
               "--private-key-file", str(key))
    assert a["fingerprint"] == b["fingerprint"] and b["managed"] is True
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    before = _count(s, "kps_keypairs")
    bad = run_dew(s, "keypairs", "import", "mismatch", "--public-key-file", f"{key}.pub",
                  "--private-key-file", str(other))
    assert bad.returncode == 2
    assert bad.stderr.startswith(
        "dew: error: The imported private key does not match the public key.")
    assert bad.stderr.count("\n") == 1
    # Choices are refused by the parser, naming the flag.
    for flag, value in (("--type", "pgp"), ("--algorithm", "DSA"), ("--scope", "world")):
        verb = ["create", "x"] if flag != "--type" else ["import", "x", "--public-key-file",
                                                         f"{key}.pub"]
        bad = run_dew(s, "keypairs", *verb, flag, value)
        assert bad.returncode == 2 and f"argument {flag}: invalid choice" in bad.stderr
        assert bad.stderr.count("\n") == 1
    for args in (["create", "bad name!"],
                 ["import", "x", "--public-key-file", str(tmp_path / "missing")],
                 ["import", "x", "--public-key-file", str(key)]):
        bad = run_dew(s, "keypairs", *args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert bad.stderr.startswith("dew: error: Invalid parameter."), bad.stderr
        assert bad.stderr.count("\n") == 1
    assert _count(s, "kps_keypairs") == before  # nothing stored on any error
    # Scope: alice's user pair is hers; upgrade makes it the account's; a clash is refused.
    dew_ok(s, "keypairs", "create", "shared", "--owner", "alice", "--out", str(tmp_path / "sh"))
    assert run_dew(s, "keypairs", "show", "shared", "--owner", "bob").returncode == 2
    dew_ok(s, "keypairs", "create", "dup", "--owner", "alice", "--out", str(tmp_path / "d1"))
    dew_ok(s, "keypairs", "create", "dup", "--owner", "bob", "--out", str(tmp_path / "d2"))
    assert dew_ok(s, "keypairs", "upgrade", "shared", "--owner", "alice")["scope"] == "account"
    assert dew_ok(s, "keypairs", "show", "shared", "--owner", "bob")["scope"] == "account"
    assert run_dew(s, "keypairs", "upgrade", "dup", "--owner", "alice").returncode == 1
    listed = json.loads(run_dew(s, "keypairs", "list", "--owner", "bob", "--json").stdout)
    assert sorted(p["name"] for p in listed) == ["dup", "shared"]
    # Unmanaged private keys are never stored.
    rows = store_rows(s.store_target, "SELECT name, managed, private_key FROM kps_keypairs")
    assert all((m == 0) == (p is None) for _, m, p in rows)
    assert all(p is None or "PRIVATE KEY" not in str(p) for _, _, p in rows)


def test_create_into_a_bad_path_leaves_nothing(kps_settings: Settings, tmp_path: Path) -> None:
    """L1: the output files are opened before the key pair is generated and stored."""
    s = kps_settings
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out in (tmp_path / "missing-dir" / "orphan", a_file / "orphan"):
        bad = run_dew(s, "keypairs", "create", "orphan", "--out", str(out))
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.startswith("dew: error: Invalid parameter. cannot create --out "), \
            bad.stderr
        assert bad.stderr.count("\n") == 1
    existing = tmp_path / "taken"
    existing.write_text("keep")
    bad = run_dew(s, "keypairs", "create", "orphan", "--out", str(existing))
    assert bad.returncode == 2 and existing.read_text() == "keep"
    assert "exists; it is not overwritten" in bad.stderr
    assert not Path(f"{existing}.pub").exists()
    assert _count(s, "kps_keypairs") == 0


def test_bounded_reads_and_timeout_checked(kps_settings: Settings, tmp_path: Path) -> None:
    """L7: /dev/zero is refused, not read; --timeout must be in (0, 86400]."""
    s = kps_settings
    bad = run_dew(s, "keypairs", "import", "z", "--public-key-file", "/dev/zero")
    assert bad.returncode == 2 and "over 65536 bytes" in bad.stderr, bad.stderr
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    for timeout in ("nan", "0", "-1", "86401"):
        bad = run_dew(s, "keypairs", "bind", "k", "s", "--password-file", str(pw),
                      "--timeout", timeout)
        assert bad.returncode == 2, (timeout, bad.stderr)
        assert "--timeout" in bad.stderr and bad.stderr.count("\n") == 1
