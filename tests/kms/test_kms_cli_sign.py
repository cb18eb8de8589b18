"""``dew kms sign|verify|get-public-key|generate-mac|verify-mac`` and RSA decrypt-data
as users run them: exit 0 valid, 1 invalid, 2 bad input (one line, nothing opened).
``--out`` prints no payload; decrypt-data's old ``--key`` still works, with one
deprecation line."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from engine.cli import build_parser
from engine.errors import InvalidInput
from engine.settings import Settings
from handlers.kms.cli_checks import checked
from tests.helpers import run_dew


def _ok(settings: Settings, *args: str) -> dict[str, object]:
    done = run_dew(settings, "kms", *args, "--json")
    assert done.returncode == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    return data


def test_sign_verify_public_key_mac_and_rsa_decrypt(kms_settings: Settings,
                                                    tmp_path: Path) -> None:
    msg, sig = tmp_path / "msg", tmp_path / "sig"
    msg.write_bytes(b"sign me")
    _ok(kms_settings, "create-key", "--alias", "cli/ec", "--spec", "EC_P256")
    signed = _ok(kms_settings, "sign", "cli/ec", "--message-file", str(msg), "--algorithm",
                 "ECDSA_SHA_256", "--out", str(sig))
    assert "signature" not in signed  # --out: the JSON without the payload
    assert signed["out"] == str(sig) and signed["bytes"] == len(sig.read_bytes()) > 0
    signature_b64 = base64.b64encode(sig.read_bytes()).decode()
    pem = run_dew(kms_settings, "kms", "get-public-key", "cli/ec")
    assert pem.returncode == 0 and pem.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    public = serialization.load_pem_public_key(pem.stdout.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig.read_bytes(), b"sign me", ec.ECDSA(hashes.SHA256()))

    verify = ("verify", "cli/ec", "--message-file", str(msg), "--algorithm", "ECDSA_SHA_256")
    good = run_dew(kms_settings, "kms", *verify, "--signature-file", str(sig), "--json")
    assert good.returncode == 0 and json.loads(good.stdout)["signature_valid"] is True
    msg.write_bytes(b"sign me!")
    bad = run_dew(kms_settings, "kms", *verify, "--signature", signature_b64)
    assert bad.returncode == 1 and "no" in bad.stdout and bad.stderr == ""

    _ok(kms_settings, "create-key", "--alias", "cli/mac", "--spec", "HMAC_384")
    mac = _ok(kms_settings, "generate-mac", "cli/mac", "--message-file", str(msg))
    assert mac["mac_algorithm"] == "HMAC_SHA_384"
    check = ("verify-mac", "cli/mac", "--message-file", str(msg), "--mac", str(mac["mac"]))
    assert run_dew(kms_settings, "kms", *check).returncode == 0
    msg.write_bytes(b"changed")
    assert run_dew(kms_settings, "kms", *check).returncode == 1

    _ok(kms_settings, "create-key", "--alias", "cli/rsa", "--spec", "RSA_2048", "--usage",
        "ENCRYPT_DECRYPT")
    rsa_pem = str(_ok(kms_settings, "get-public-key", "cli/rsa")["public_key"])
    rsa_public = serialization.load_pem_public_key(rsa_pem.encode())
    h = hashes.SHA256()
    ct = rsa_public.encrypt(b"offline", padding.OAEP(padding.MGF1(h), h, None))  # type: ignore[union-attr]
    out = _ok(kms_settings, "decrypt-data", "cli/rsa", "--algorithm", "RSAES_OAEP_SHA_256",
              "--cipher-text", base64.b64encode(ct).decode())
    assert base64.b64decode(str(out["plain_text_base64"])) == b"offline"
    # The old spelling (KEY as --key) still works, with exactly one deprecation line.
    flipped = base64.b64encode(bytes([ct[0] ^ 1]) + ct[1:]).decode()
    failed = run_dew(kms_settings, "kms", "decrypt-data", "--key", "cli/rsa",
                     "--algorithm", "RSAES_OAEP_SHA_256", "--cipher-text", flipped)
    assert failed.returncode == 1 and "decryption failed" in failed.stderr
    warnings = [line for line in failed.stderr.splitlines() if "deprecated" in line]
    assert warnings == ["dew: warning: --key is deprecated and will be removed in the next "
                        "release; use the positional KEY"]


def _refused(done: subprocess.CompletedProcess[str], text: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dew: error: ") and text in lines[0], lines


def test_bad_sign_input_is_refused_before_anything_opens(kms_settings: Settings,
                                                         tmp_path: Path) -> None:
    big, msg = tmp_path / "big", tmp_path / "msg"
    big.write_bytes(bytes(4097))
    msg.write_bytes(b"m")
    parser = build_parser()
    # The checks the CLI runs before opening the store or the HSM (pure: in-process).
    for args, text in (
        (("sign", "k", "--message-file", str(big), "--algorithm", "ECDSA_SHA_256"),
         "at most 4096"),
        (("sign", "k", "--message-file", str(msg), "--algorithm", "ECDSA"), "signing algorithm"),
        (("sign", "k", "--message-file", str(msg), "--algorithm", "ECDSA_SHA_256",
          "--message-type", "DIGEST"), "32 bytes"),
        (("sign", "k", "--message-file", str(tmp_path / "none"), "--algorithm",
          "ECDSA_SHA_256"), "cannot read"),
        (("verify", "k", "--message-file", str(msg), "--algorithm", "ECDSA_SHA_256",
          "--signature", "%%"), "Base64"),
        (("generate-mac", "k", "--message-file", str(msg), "--algorithm", "HMAC_MD5"),
         "--algorithm"),
        (("verify-mac", "k", "--message-file", str(big), "--mac", "AAAA"), "at most 4096"),
        (("decrypt-data", "--cipher-text", "AAAA", "--algorithm", "RSAES_OAEP_SHA_256"),
         "KEY is missing"),
        (("decrypt-data", "k", "--cipher-text", "AAAA", "--algorithm", "RSA_OAEP"),
         "--algorithm: invalid encryption algorithm"),
        (("decrypt-data", "k", "--cipher-text", "AAAA"), "KEY is only for RSA"),
        (("enable-key-rotation", "k", "--interval-days", "29"), "30..365"),
        (("decrypt-file", str(msg), str(tmp_path / "out")), "not a file made by"),
        (("encrypt-file", "k", str(msg), str(tmp_path / "no" / "out")), "does not exist"),
        (("create-key", "--alias", "a", "--origin", "aws"), "invalid origin"),
        (("get-parameters-for-import", "k", "--algorithm", "RSA_OAEP"),
         "--algorithm: invalid wrapping algorithm"),
        (("import-key-material", "k", "--import-token", "t", "--encrypted-key-material-base64",
          "AAAA", "--expiration-time", "tomorrow"), "--expiration-time must be an ISO 8601"),
        (("import-key-material", "k", "--import-token", "t", "--encrypted-key-material-file",
          str(tmp_path / "none")), "cannot read --encrypted-key-material-file"),
        (("ec-raw-to-pkcs8", "--curve", "curve25519", "--private-hex", "01"),
         "--curve: unknown curve"),
        (("ec-raw-to-pkcs8", "--curve", "secp256k1", "--private-hex", "zz"),
         "--private-hex is not hexadecimal"),
        (("wrap-key-material", "--public-key-file", str(msg), "--material-file", str(msg),
          "--algorithm", "RSAES_OAEP_SHA_256", "--out", str(tmp_path / "w")),
         "--public-key-file: the wrapping public key is not a PEM public key"),
        (("sign", "k", "--message-file", str(msg), "--algorithm", "ECDSA_SHA_256", "--out",
          str(tmp_path / "no" / "sig")), "cannot write --out"),
    ):
        with pytest.raises(InvalidInput, match=re.escape(text)):
            checked(parser.parse_args(["kms", *args]))
    # Times are ISO 8601 UTC everywhere: no offset means UTC, as in `dew audit list`.
    expires = checked(parser.parse_args(
        ["kms", "import-key-material", "k", "--import-token", "t",
         "--encrypted-key-material-base64", "AAAA", "--expiration-time", "2030-01-01T00:00:00"]
    ))["expires"]
    assert expires.isoformat() == "2030-01-01T00:00:00+00:00"
    # And as a user sees it: exit 2, one line, nothing opened.
    _refused(run_dew(kms_settings, "kms", "sign", "k", "--message-file", str(big),
                     "--algorithm", "ECDSA_SHA_256"), "at most 4096")
    assert not kms_settings.db_path.exists()
