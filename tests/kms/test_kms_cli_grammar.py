"""``dew kms`` / ``dew audit`` follow the CLI grammar of docs/cli.md (issue 16): KEY
positional, ``--<name>-file`` inputs, ``--out`` prints a summary and no payload,
old spellings work with one deprecation line, errors name the CLI flag (as JSON with
``--json``), one time format, yes/no in text, help on every option, a progress line
for a slow step only on a terminal. Through the real CLI where it matters; the pure
parts in-process."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.cli import build_parser
from engine.errors import InvalidInput
from engine.settings import Settings
from handlers.kms.cli_checks import (
    checked,
    flag_message,
    parse_utc,
    unknown_key_message,
    utc_day,
)
from handlers.kms.cli_render import announce_if_slow, audit_table, key_table
from tests.helpers import run_dew

DEPRECATED = re.compile(r"^dew: warning: (\S+) is deprecated and will be removed in the next "
                        r"release; use (.+)$")


def _deprecations(stderr: str) -> list[tuple[str, str]]:
    return [m.groups() for line in stderr.splitlines() if (m := DEPRECATED.match(line))]


def test_out_prints_a_summary_and_no_payload(kms_settings: Settings, tmp_path: Path) -> None:
    msg, sig, mac = tmp_path / "msg", tmp_path / "msg.sig", tmp_path / "msg.mac"
    msg.write_bytes(b"grammar")
    for alias, spec in (("g/ec", "EC_P256"), ("g/mac", "HMAC_256")):
        made = run_dew(kms_settings, "kms", "create-key", "--alias", alias, "--spec", spec)
        assert made.returncode == 0, made.stderr
    signed = run_dew(kms_settings, "kms", "sign", "g/ec", "--message-file", str(msg),
                     "--algorithm", "ECDSA_SHA_256", "--out", str(sig))
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout == f"wrote signature ({sig.stat().st_size} bytes) to {sig}\n"
    maced = run_dew(kms_settings, "kms", "generate-mac", "g/mac", "--message-file", str(msg),
                    "--out", str(mac), "--json")
    assert maced.returncode == 0, maced.stderr
    shown = json.loads(maced.stdout)
    assert "mac" not in shown and shown["out"] == str(mac) and shown["bytes"] == 32
    assert base64.b64encode(mac.read_bytes()).decode() not in maced.stdout
    checked_mac = run_dew(kms_settings, "kms", "verify-mac", "g/mac", "--message-file",
                          str(msg), "--mac-file", str(mac))
    assert checked_mac.returncode == 0 and "mac_valid" in checked_mac.stdout


def test_an_unknown_key_suggests_the_closest_alias_as_json(kms_settings: Settings) -> None:
    assert run_dew(kms_settings, "kms", "create-key", "--alias", "app/orders").returncode == 0
    typo = run_dew(kms_settings, "kms", "describe-key", "app/ordres", "--json")
    assert typo.returncode == 2 and typo.stdout == ""
    error = json.loads(typo.stderr)["error"]
    assert error["code"] == "key_not_found"
    assert "did you mean 'app/orders'?" in error["message"]
    assert "dew kms list-keys" in error["message"] and "--project" in error["fix"]
    # A missing argument is called missing, as JSON too.
    missing = run_dew(kms_settings, "kms", "schedule-key-deletion", "app/orders", "--json")
    usage = json.loads(missing.stderr)["error"]
    assert missing.returncode == 2 and usage["code"] == "usage"
    assert "required: --pending-days" in usage["message"]


def test_old_spellings_still_work_with_one_deprecation_line(
    kms_settings: Settings, tmp_path: Path
) -> None:
    """Client side (no store, no HSM): the old --public-key and --material, then the
    old --der."""
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem, material, wrapped = tmp_path / "w.pem", tmp_path / "k.bin", tmp_path / "k.wrapped"
    pem.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    material.write_bytes(bytes(range(32)))
    old = run_dew(kms_settings, "kms", "wrap-key-material", "--public-key", str(pem),
                  "--material-file", str(material), "--algorithm", "RSAES_OAEP_SHA_256",
                  "--out", str(wrapped))
    assert old.returncode == 0, old.stderr
    assert _deprecations(old.stderr) == [("--public-key", "--public-key-file")]
    assert len(old.stderr.splitlines()) == 1
    assert old.stdout == f"wrote wrapped key material (256 bytes) to {wrapped}\n"
    der = run_dew(kms_settings, "kms", "ec-raw-to-pkcs8", "--curve", "secp256k1",
                  "--private-hex-file", "-", "--der", "--json", input="01")
    assert der.returncode == 0, der.stderr
    # With --json, the deprecation line is JSON too (stderr stays machine-readable).
    assert json.loads(der.stderr)["warning"] == {
        "code": "deprecated",
        "message": "--der is deprecated and will be removed in the next release; "
                   "use --format der"}
    assert json.loads(der.stdout)["format"] == "der"
    assert not kms_settings.db_path.exists()  # client side: nothing opened


def test_errors_name_the_cli_flag_not_the_field() -> None:
    parser = build_parser()
    user = "a" * 32
    for args, text in (
        (("schedule-key-deletion", "k", "--pending-days", "6"),
         "--pending-days must be between 7 and 1096"),
        (("create-grant", "k", "--grantee", "x", "--operation", "encrypt-data"),
         "--grantee: must be 32"),
        (("create-grant", "k", "--grantee", user, "--operation", "nope"),
         "--operation: unknown operation"),
        (("create-grant", "k", "--grantee", user, "--operation", "encrypt-data",
          "--grantee-type", "group"), "--grantee-type: must be user or domain"),
        (("revoke-grant", "k", "abc"), "GRANT_ID: must be 64"),
        (("tag", "k", "--tag", "=v"), "--tag KEY: must be 1..128"),
        (("untag", "k", "--tag-key", ""), "--tag-key: must be 1..128"),
        (("create-key", "--alias", "a", "--spec", "AES_128"), "--spec: invalid key spec"),
        (("gen-random", "--bytes", "0"), "--bytes: the number of random bytes"),
        (("create-datakey", "k", "--length-bits", "100"), "--length-bits: the data key length"),
        (("encrypt-data", "k", "--plain-text-base64", "aGk=", "--encryption-context", "[1]"),
         "--encryption-context: the encryption context"),
        (("usage", "--since", "2026-1-1"), "--since must be an ISO 8601 time (YYYY-MM-DD"),
    ):
        with pytest.raises(InvalidInput, match=re.escape(text)):
            checked(parser.parse_args(["kms", *args]))
    assert flag_message("pending_days must be 7..1096", "--pending-days",
                        {"pending_days": "--pending-days"}) == "--pending-days must be 7..1096"
    assert flag_message("--bytes must be 1..1024", "--bytes") == "--bytes must be 1..1024"


def test_unknown_key_message_and_times_are_decided_in_plain_functions() -> None:
    names = ["app/orders", "app/sales", "kps/default"]
    assert "did you mean 'app/sales'?" in unknown_key_message("app/sale", "default", names)
    far = unknown_key_message("zzz", "shop", names)
    assert "did you mean" not in far and "`dew kms list-keys --project shop`" in far
    assert parse_utc("2026-12-01", "--since") == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_utc("2026-12-01T10:00:00+02:00", "--until") == datetime(
        2026, 12, 1, 8, tzinfo=UTC)
    assert parse_utc("2026-12-01T08:00:00Z", "--x") == parse_utc("2026-12-01T08:00", "--x")
    assert utc_day("2026-12-01T01:00:00+05:00", "--since") == date(2026, 11, 30)
    with pytest.raises(InvalidInput, match="--since must be an ISO 8601 time"):
        parse_utc("yesterday", "--since")


def test_text_shows_yes_no_and_the_json_time() -> None:
    when = "2026-12-02T03:44:15.822917+00:00"
    key = {"key_id": "k" * 36, "key_alias": "app/x", "key_spec": "AES_256",
           "key_state": "pending_deletion", "default_key": False,
           "scheduled_deletion_date": when}
    entry = {"seq": 1, "time": when, "account": "default", "operation": "create_key",
             "outcome": "success", "key_id": None, "actor": "cli:a@b"}
    for shown in (key_table([key]), audit_table([entry])):
        assert when in shown and "True" not in shown and "False" not in shown
    assert " no " in key_table([key])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_slow_step_says_so_once_and_only_on_a_terminal() -> None:
    async def slow() -> str:
        await asyncio.sleep(0.3)
        return "done"

    async def fast() -> str:
        return "done"

    async def run(stream: io.StringIO, call: str) -> str:
        coro = slow() if call == "slow" else fast()
        return await announce_if_slow(coro, "making it...", stream, delay=0.05)

    tty, pipe, quick = _Terminal(), io.StringIO(), _Terminal()
    assert asyncio.run(run(tty, "slow")) == "done"
    assert tty.getvalue() == "making it...\n"
    asyncio.run(run(pipe, "slow"))
    asyncio.run(run(quick, "fast"))
    assert pipe.getvalue() == quick.getvalue() == ""


def _undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            for name, sub in action.choices.items():
                missing += [] if name in helped else [f"{path} {name}"]
                missing += _undocumented(sub, f"{path} {name}")
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_kms_and_audit_option_has_help_and_json() -> None:
    parser = build_parser()
    groups = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for group in ("kms", "audit"):
        assert _undocumented(groups.choices[group], f"dew {group}") == []
        verbs = next(a for a in groups.choices[group]._actions
                     if isinstance(a, argparse._SubParsersAction))
        for name, verb in verbs.choices.items():
            assert "--json" in verb._option_string_actions, f"dew {group} {name}"
