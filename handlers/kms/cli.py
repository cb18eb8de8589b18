"""``dew kms ...`` and ``dew audit ...``: the KMS from the command line.

Every ``kms`` command takes ``--project`` (a name or id; alias ``--account``; default
``default``) and ``--json``.
Input is checked before anything is opened, so bad input (exit 2, one line)
leaves no trace. ``schedule-key-deletion`` and ``cancel-key-deletion`` run as
jobs: they enqueue the job and wait for a worker to run it (``dew stack up``
or ``make up`` starts one). Without a worker the task stays queued and the
command gives up after ``--timeout`` seconds (default 30, exit 1); the task
still runs when a worker starts. ``--no-wait`` only enqueues.

``dew audit verify`` exits 0 when the chain is intact and 1 with the first
broken entry otherwise. ``dew audit list`` filters by ``--key``, ``--project``,
``--secret`` (reads of a CSMS secret's values), ``--operation``, ``--actor``
(substring), ``--outcome`` and ``--since`` / ``--until``.

Secrets are read from a file or stdin (``--plain-text-file FILE``,
``--private-hex-file FILE``, ``-`` for stdin), so they never appear in
``/proc/*/cmdline``; the older argv forms (``--plain-text HEX``,
``--plain-text-base64``, ``--private-hex``) still work but are discouraged.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from engine.cli_output import add_project_option, print_result, read_file, read_input, run_job
from engine.cli_output import lines as key_values
from engine.cli_output import text as _text
from engine.errors import InvalidInput
from engine.settings import Settings

DEFAULT_JOB_TIMEOUT = 30.0
ARGV_SECRET = "discouraged: other local users can read it in /proc/*/cmdline"
MAX_SECRET_FILE_BYTES = 4096
JOB_NOTE = (
    "This enqueues a job and waits for a worker to run it (`dew stack up` starts one). "
    "Without a worker the task stays queued: the command gives up after --timeout seconds "
    "(exit 1) and the task still runs when a worker starts."
)


def register(subparsers: Any, commands: dict[str, Any]) -> None:
    kms = subparsers.add_parser("kms", help="KMS: master keys, data keys, encrypt-data")
    ksub = kms.add_subparsers(dest="action", metavar="ACTION", required=True,
                              parser_class=type(kms))

    def command(name: str, help_text: str, description: str = "") -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = ksub.add_parser(
            name, help=help_text, description=description or help_text)
        add_project_option(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    p = command("create-key", "create a customer master key in the HSM")
    p.add_argument("--alias", required=True)
    p.add_argument("--spec", default="AES_256",
                   help="AES_256 (default), HMAC_256/384/512, RSA_2048/3072/4096, EC_P256/P384, "
                   "ML_DSA_44/65/87")
    p.add_argument("--usage", help="ENCRYPT_DECRYPT, SIGN_VERIFY or GENERATE_VERIFY_MAC "
                   "(default: the spec's usual one)")
    p.add_argument("--description", default="")
    p.add_argument("--origin", default="kms",
                   help="kms (default: generated in the HSM) or external (import your own)")
    p = command("describe-key", "show one key (KEY is its id or alias)")
    p.add_argument("key")
    p = command("list-keys", "list the account's keys")
    p.add_argument("--state", help="enabled, disabled, pending_deletion or pending_import")
    for name, text in (("enable-key", "enable a disabled key"),
                       ("disable-key", "disable a key (it can no longer be used)")):
        command(name, text).add_argument("key")
    for name, text in (
        ("create-datakey", "a new data key: plaintext and encrypted (hex)"),
        ("create-datakey-without-plaintext", "a new data key, encrypted only (hex)"),
    ):
        p = command(name, text)
        p.add_argument("key")
        p.add_argument("--length-bits", type=int, default=256, help="128, 256 (default) or 512")
        _context_option(p)
    p = command("encrypt-datakey", "encrypt your own data key (16..64 bytes) under KEY")
    p.add_argument("key")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--plain-text-file", metavar="FILE",
                       help="the data key's raw bytes ('-' for stdin)")
    given.add_argument("--plain-text", metavar="HEX",
                       help=f"the data key in hex as an argument ({ARGV_SECRET})")
    _context_option(p)
    p = command("decrypt-datakey", "decrypt a data key made under KEY")
    p.add_argument("key")
    p.add_argument("--cipher-text", required=True, metavar="HEX")
    _context_option(p)
    p = command("encrypt-data", "encrypt at most 4096 bytes under KEY (Base64 ciphertext)")
    p.add_argument("key")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--plain-text-file", metavar="FILE",
                        help="the plaintext ('-' for stdin)")
    source.add_argument("--plain-text-base64", metavar="B64",
                        help=f"the plaintext in Base64 as an argument ({ARGV_SECRET})")
    _context_option(p)
    p = command("decrypt-data", "decrypt encrypt-data output (the key is inside it), or an "
                "RSA-OAEP ciphertext with --key and --encryption-algorithm")
    p.add_argument("--cipher-text", required=True, metavar="B64")
    p.add_argument("--key", help="the RSA ENCRYPT_DECRYPT key (RSA ciphertexts only)")
    p.add_argument("--encryption-algorithm", metavar="ALG",
                   help="SYMMETRIC_DEFAULT (default), RSAES_OAEP_SHA_256 or RSAES_OAEP_SHA_1")
    _context_option(p)
    for name, text in (("sign", "sign a message (or its digest) in the HSM"),
                       ("verify", "verify a signature in the HSM; exit 0 valid, 1 invalid")):
        p = command(name, text)
        p.add_argument("key")
        p.add_argument("--message-file", required=True, metavar="FILE")
        p.add_argument("--message-type", default="RAW",
                       help="RAW (default: we hash it, at most 4096 bytes) or DIGEST")
        p.add_argument("--algorithm", required=True, metavar="ALG",
                       help="RSASSA_PSS_SHA_256/384/512, RSASSA_PKCS1_V1_5_SHA_256/384/512, "
                       "ECDSA_SHA_256 (P-256), ECDSA_SHA_384 (P-384), ML_DSA_44/65/87 (RAW)")
        if name == "sign":
            p.add_argument("--out", metavar="SIGFILE", help="also write the binary signature")
        else:
            given = p.add_mutually_exclusive_group(required=True)
            given.add_argument("--signature-file", metavar="FILE", help="binary signature")
            given.add_argument("--signature", metavar="B64", help="Base64 signature")
    p = command("encrypt-file", "envelope-encrypt a file of any size under KEY (streaming)",
                "Encrypt IN to OUT ('-' for stdin / stdout) with a fresh data key made under "
                "KEY; OUT is written through a temporary file and renamed on success.")
    p.add_argument("key")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p = command("decrypt-file", "verify and decrypt an encrypt-file output",
                "Decrypt IN to OUT ('-' for stdin / stdout); any alteration, truncation, "
                "reordering or appended data fails (exit 1) and leaves no OUT file.")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p = command("get-parameters-for-import",
                "a wrapping public key (PEM) and an import token, valid 24 h")
    p.add_argument("key")
    p.add_argument("--wrapping-algorithm", default="RSAES_OAEP_SHA_256", metavar="ALG",
                   help="RSAES_OAEP_SHA_256 (default) or _SHA_1 for AES/HMAC material; "
                   "RSA_AES_KEY_WRAP_SHA_256 or _SHA_1 for RSA/EC private keys")
    p = command("import-key-material", "import wrapped key material into a pending key")
    p.add_argument("key")
    p.add_argument("--import-token", required=True)
    p.add_argument("--encrypted-key-material-base64", required=True, metavar="B64")
    p.add_argument("--expiration-time", metavar="ISO",
                   help="delete the material then (e.g. 2027-01-31T00:00:00Z)")
    p = command("delete-imported-key-material", "delete imported material (pending import)")
    p.add_argument("key")
    p = command("wrap-key-material", "client side: wrap material for import-key-material")
    p.add_argument("--public-key", required=True, metavar="PEM",
                   help="the wrapping public key from get-parameters-for-import")
    p.add_argument("--material", required=True, metavar="FILE",
                   help="raw AES/HMAC bytes, or a private key (PKCS#8 / PEM)")
    p.add_argument("--algorithm", required=True, metavar="ALG")
    p.add_argument("--out", required=True, metavar="FILE", help="the wrapped material")
    p = command("ec-raw-to-pkcs8", "client side: a bare EC private scalar to PKCS#8")
    p.add_argument("--curve", required=True,
                   help="secp256r1 (P-256), secp384r1 (P-384), secp521r1, secp256k1")
    scalar = p.add_mutually_exclusive_group(required=True)
    scalar.add_argument("--private-hex-file", metavar="FILE",
                        help="a file holding the scalar in hex ('-' for stdin)")
    scalar.add_argument("--private-hex", metavar="HEX",
                        help=f"the scalar in hex as an argument ({ARGV_SECRET})")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--der", action="store_true", help="binary DER to stdout")
    form.add_argument("--pem", action="store_true", help="PEM to stdout (the default)")
    p = command("get-public-key", "the public key of an RSA / EC key (SubjectPublicKeyInfo PEM)")
    p.add_argument("key")
    for name, text in (("generate-mac", "an HMAC of a message (at most 4096 bytes) in the HSM"),
                       ("verify-mac", "verify an HMAC in the HSM; exit 0 valid, 1 invalid")):
        p = command(name, text)
        p.add_argument("key")
        p.add_argument("--message-file", required=True, metavar="FILE")
        p.add_argument("--algorithm", metavar="ALG",
                       help="HMAC_SHA_256/384/512 (default: the key's own)")
        if name == "generate-mac":
            p.add_argument("--out", metavar="MACFILE", help="also write the binary MAC")
        else:
            given = p.add_mutually_exclusive_group(required=True)
            given.add_argument("--mac-file", metavar="FILE", help="binary MAC")
            given.add_argument("--mac", metavar="B64", help="Base64 MAC")
    p = command("gen-random", "random bytes from the HSM (hex)")
    p.add_argument("--bytes", type=int, required=True, metavar="N", help="1..1024")
    p = command("schedule-key-deletion", "schedule a key's deletion (a job; needs a worker)",
                "Schedule the key's deletion in 7..1096 days. " + JOB_NOTE)
    p.add_argument("key")
    p.add_argument("--pending-days", type=int, required=True, metavar="N", help="7..1096")
    _job_options(p)
    p = command("enable-key-rotation", "rotate an AES_256 key on a period")
    p.add_argument("key")
    p.add_argument("--interval-days", type=int, metavar="N",
                   help="30..365 (default: the interval set before, else 365)")
    for name, text in (("disable-key-rotation", "stop rotating a key"),
                       ("get-key-rotation-status", "rotation: enabled, interval, last, count")):
        command(name, text).add_argument("key")
    p = command("rotate-key", "rotate an AES_256 key now (a job; needs a worker)",
                "Add a new key version now; old ciphertexts still decrypt. " + JOB_NOTE)
    p.add_argument("key")
    _job_options(p)
    p = command("update-key-alias", "give a custom key another alias")
    p.add_argument("key")
    p.add_argument("--alias", required=True)
    p = command("update-key-description", "change a custom key's description")
    p.add_argument("key")
    p.add_argument("--description", required=True)
    p = command("update-key-rotation-interval", "change a key's rotation interval")
    p.add_argument("key")
    p.add_argument("--interval-days", type=int, required=True, metavar="N", help="30..365")
    p = command("usage", "how often keys were used, per UTC day",
                "Uses per key and UTC day (data keys, encrypt/decrypt, sign/verify, MACs), "
                "oldest day first.")
    p.add_argument("--key", help="only this key (id, or alias in --project)")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="from this UTC day on")
    p.add_argument("--all-accounts", action="store_true", help="every account's keys")
    p = command("list-tags", "a key's tags")
    p.add_argument("key")
    p = command("tag", "add tags to a key, or change their values (all or none)")
    p.add_argument("key")
    p.add_argument("--tag", required=True, action="append", metavar="KEY=VALUE",
                   help="repeat for several tags (at most 20 a key)")
    p = command("untag", "remove tags from a key (all or none)")
    p.add_argument("key")
    p.add_argument("--tag-key", required=True, action="append", metavar="KEY")
    p = command("create-grant", "let an IAM user (or project) use a key")
    p.add_argument("key")
    p.add_argument("--grantee", required=True, metavar="ID",
                   help="the IAM user id (or project id with --type domain): 32 hex digits")
    p.add_argument("--operation", required=True, action="append", metavar="OP",
                   help="repeat: create-datakey, encrypt-data, decrypt-data, describe-key, ...")
    p.add_argument("--type", default="user", help="user (default) or domain")
    p.add_argument("--name")
    p.add_argument("--retiring", metavar="ID", help="who else may retire the grant")
    p = command("list-grants", "a key's grants")
    p.add_argument("key")
    p = command("revoke-grant", "withdraw a grant")
    p.add_argument("key")
    p.add_argument("grant_id", metavar="GRANT_ID")
    command("quotas", "custom keys and grants used, and their limits")
    p = command("cancel-key-deletion", "cancel a scheduled deletion; the key comes back "
                "disabled (a job; needs a worker)",
                "Cancel the key's scheduled deletion; the key comes back disabled (enable it "
                "with enable-key). " + JOB_NOTE)
    p.add_argument("key")
    _job_options(p)

    audit = subparsers.add_parser("audit", help="the hash-chained audit log of key operations")
    asub = audit.add_subparsers(dest="action", metavar="ACTION", required=True,
                                parser_class=type(audit))
    p = asub.add_parser(
        "list", help="audit entries, oldest first (the newest --limit); the filters combine",
        description="Audit entries, oldest first (the newest --limit that match). Who read "
        "secret db.app, and when: `dew audit list --secret db.app`.")
    p.add_argument("--key", help="only this key (id, or alias in --project)")
    p.add_argument("--project", "--account", dest="account", metavar="PROJECT",
                   help="only this project (name or id)")
    p.add_argument("--secret", metavar="NAME",
                   help="only reads of this CSMS secret's values (csms.get_value)")
    p.add_argument("--operation", metavar="OP",
                   help="only this operation (e.g. decrypt_datakey, csms.get_value)")
    p.add_argument("--actor", metavar="TEXT",
                   help="only entries whose actor (principal) contains TEXT")
    p.add_argument("--outcome", choices=("success", "failure"),
                   help="only entries with this outcome")
    p.add_argument("--since", metavar="TIME",
                   help="only entries at or after TIME (ISO 8601, UTC when no offset: "
                   "2026-12-01 or 2026-12-01T08:00:00Z)")
    p.add_argument("--until", metavar="TIME",
                   help="only entries at or before TIME (ISO 8601, as --since)")
    p.add_argument("--limit", type=int, default=100, help="at most this many (1..100000)")
    p.add_argument("--json", action="store_true")
    p = asub.add_parser("verify", help="check the chain; exit 1 at the first broken entry")
    p.add_argument("--json", action="store_true")

    commands["kms"] = cmd_kms
    commands["audit"] = cmd_audit


def _context_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encryption-context", metavar="JSON",
                   help='a JSON object of strings, e.g. {"file":"a.txt"}; decrypt needs the same')


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=DEFAULT_JOB_TIMEOUT, metavar="S",
                   help=f"give up waiting after S seconds (default {DEFAULT_JOB_TIMEOUT:g})")
    p.add_argument("--no-wait", action="store_true", help="enqueue and print the task id")


# --------------------------------------------------------------------------- kms


def _checked(args: argparse.Namespace) -> dict[str, Any]:
    """Every check that needs no store or HSM, done before either is opened."""
    from handlers.kms import asym as a
    from handlers.kms import byok as i
    from handlers.kms import format as f

    f.check_account(args.account)
    out: dict[str, Any] = {}
    if getattr(args, "key", None) is not None:
        f.check_key_ref(args.key)
    if getattr(args, "encryption_context", None) is not None:
        try:
            context = json.loads(args.encryption_context)
        except json.JSONDecodeError:
            raise InvalidInput("--encryption-context is not valid JSON") from None
        out["context"] = f.check_context(context)
    action = args.action
    if action == "create-key":
        f.check_origin(args.origin)
        f.check_custom_alias(args.alias)
        f.check_usage(f.check_spec(args.spec), args.usage)
        f.check_description(args.description)
    elif action == "list-keys" and args.state is not None:
        states = [s.value for s in f.KeyState if s is not f.KeyState.DELETED]
        if args.state not in states:
            raise InvalidInput(f"--state must be one of {', '.join(states)}")
    elif action in ("create-datakey", "create-datakey-without-plaintext"):
        f.check_length_bits(args.length_bits)
    elif action == "encrypt-datakey":
        from handlers.kms.data import DATA_KEY_BYTES

        low, high = DATA_KEY_BYTES
        plain = (f.decode_hex("--plain-text", args.plain_text) if args.plain_text is not None
                 else read_input("--plain-text-file", args.plain_text_file, high + 1))
        if not low <= len(plain) <= high:
            got = f"more than {high}" if len(plain) > high else str(len(plain))
            raise InvalidInput(f"a data key must be {low}..{high} bytes ({low * 8}..{high * 8} "
                               f"bits), got {got}", code="invalid_datakey")
        out["plain"] = plain
    elif action == "decrypt-datakey":
        out["cipher"] = f.decode_hex("--cipher-text", args.cipher_text)
    elif action == "encrypt-data":
        out["plain"] = f.check_plaintext(_plaintext(args))
    elif action == "decrypt-data":
        out["cipher"] = f.decode_base64("--cipher-text", args.cipher_text)
        if args.encryption_algorithm not in (None, "SYMMETRIC_DEFAULT"):
            a.check_encryption_algorithm(args.encryption_algorithm)
            if args.key is None:
                raise InvalidInput(f"{args.encryption_algorithm} needs --key")
        elif args.key is not None:
            raise InvalidInput("--key is only for RSA ciphertexts (with --encryption-algorithm)")
    elif action in ("sign", "verify"):
        out["message"] = read_file("--message-file", args.message_file,
                                    a.MAX_MESSAGE_BYTES + 1)
        a.sign_request(args.algorithm, out["message"], args.message_type)
        if action == "verify":
            out["signature"] = (f.decode_base64("--signature", args.signature)
                                if args.signature is not None
                                else read_file("--signature-file", args.signature_file,
                                                a.MAX_SIGNATURE_BYTES))
    elif action in ("generate-mac", "verify-mac"):
        out["message"] = a.check_mac_message(
            read_file("--message-file", args.message_file, a.MAX_MESSAGE_BYTES + 1))
        if args.algorithm is not None and args.algorithm not in a.MAC:
            raise InvalidInput(f"--algorithm must be one of {', '.join(a.MAC)}")
        if action == "verify-mac":
            out["mac"] = (f.decode_base64("--mac", args.mac) if args.mac is not None
                          else read_file("--mac-file", args.mac_file, 64))
    elif action == "gen-random":
        f.check_random_bytes(args.bytes)
    elif action in ("encrypt-file", "decrypt-file"):
        _check_paths(args.input, args.output, action)
    elif action in ("enable-key-rotation", "update-key-rotation-interval") and (
            args.interval_days is not None):
        f.check_rotation_days(args.interval_days)
    elif action == "update-key-alias":
        f.check_custom_alias(args.alias)
    elif action == "update-key-description":
        f.check_description(args.description)
    elif action == "usage":
        out["since"] = _day("--since", args.since)
    elif action == "tag":
        out["tags"] = f.check_tags([_tag_pair(t) for t in args.tag], "--tag")
    elif action == "untag":
        out["tags"] = f.check_tags([(k, "") for k in args.tag_key], "--tag-key")
    elif action == "create-grant":
        f.check_principal(args.grantee, "grantee_principal")
        f.check_grantee_type(args.type)
        f.check_operations(args.operation)
        f.check_grant_name(args.name)
        if args.retiring is not None:
            f.check_principal(args.retiring, "retiring_principal")
    elif action == "revoke-grant":
        f.check_grant_id(args.grant_id)
    elif action == "get-parameters-for-import":
        i.check_wrapping_algorithm(args.wrapping_algorithm)
    elif action == "import-key-material":
        out["material"] = f.decode_base64("--encrypted-key-material-base64",
                                          args.encrypted_key_material_base64)
        out["expires"] = _iso_time("--expiration-time", args.expiration_time)
    elif action == "wrap-key-material":
        out["wrapped"] = i.wrap_key_material(
            read_file("--public-key", args.public_key, 1 << 16),
            read_file("--material", args.material, 1 << 16), args.algorithm)
    elif action == "ec-raw-to-pkcs8":
        out["pkcs8"] = i.ec_raw_to_pkcs8(args.curve, _private_hex(args), pem=not args.der)
    elif action in ("schedule-key-deletion", "cancel-key-deletion", "rotate-key") and not (
        0 < args.timeout <= 24 * 3600
    ):
        raise InvalidInput("--timeout must be between 0 and 86400 seconds")
    return out


def _day(option: str, text: str | None) -> date | None:
    if text is None:
        return None
    problem = InvalidInput(f"{option} must be a day as YYYY-MM-DD, got {text!r}")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise problem
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise problem from None


def _tag_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidInput(f"--tag must be KEY=VALUE, got {text!r}")
    return key, value


def _private_hex(args: argparse.Namespace) -> str:
    if args.private_hex is not None:
        return str(args.private_hex)
    data = read_input("--private-hex-file", args.private_hex_file, MAX_SECRET_FILE_BYTES + 1)
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise InvalidInput(f"--private-hex-file holds more than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InvalidInput("--private-hex-file is not hexadecimal text",
                           code="invalid_hex") from None
    if not text:
        raise InvalidInput("--private-hex-file is empty", code="invalid_hex")
    return text


def _check_paths(source: str, target: str, action: str) -> None:
    from handlers.kms.stream import MAGIC

    if source != "-":
        head = read_file("IN", source, len(MAGIC))
        if action == "decrypt-file" and head != MAGIC:
            raise InvalidInput(f"{source} is not a file made by dew kms encrypt-file")
    if target != "-" and not Path(target).resolve().parent.is_dir():
        raise InvalidInput(f"cannot write {target}: its directory does not exist")
    if target != "-" and Path(target).is_dir():
        raise InvalidInput(f"cannot write {target}: it is a directory")


def _iso_time(option: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{option} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise InvalidInput(f"{option} needs a time zone (e.g. a trailing Z for UTC)")
    return when


def _write_file(name: str, data: bytes) -> None:
    try:
        Path(name).write_bytes(data)
    except OSError as exc:
        raise InvalidInput(f"cannot write {name}: {exc.strerror}") from None


def _plaintext(args: argparse.Namespace) -> bytes:
    from handlers.kms.format import MAX_DATA_BYTES, decode_base64

    if args.plain_text_base64 is not None:
        return decode_base64("--plain-text-base64", args.plain_text_base64)
    # Read one byte more than allowed: enough to refuse a large input.
    return read_input("--plain-text-file", args.plain_text_file, MAX_DATA_BYTES + 1)


async def cmd_kms(args: argparse.Namespace, settings: Settings) -> int:
    from handlers.kms.wiring import open_kms

    checked = _checked(args)
    if args.action == "wrap-key-material":  # client side: no store, no HSM
        _write_file(args.out, checked["wrapped"])
        print_result({"out": args.out, "bytes": len(checked["wrapped"])}, args.json, key_values)
        return 0
    if args.action == "ec-raw-to-pkcs8":
        sys.stdout.buffer.write(checked["pkcs8"])
        return 0
    if args.action in ("schedule-key-deletion", "cancel-key-deletion", "rotate-key"):
        return await _run_job(args, settings)
    async with open_kms(settings) as kms:
        acct: str = args.account
        ctx: dict[str, str] | None = checked.get("context")
        action = args.action
        data: Any
        status = 0
        human: Callable[[Any], str] = key_values
        if action == "create-key":
            data = (await kms.create_key(args.alias, args.spec, args.usage, args.description,
                                         account=acct, origin=args.origin)).to_json()
        elif action == "get-parameters-for-import":
            data = (await kms.get_parameters_for_import(
                args.key, args.wrapping_algorithm, account=acct)).to_json()
        elif action == "import-key-material":
            data = (await kms.import_key_material(
                args.key, args.import_token, checked["material"],
                expiration_time=checked["expires"], account=acct)).to_json()
        elif action == "delete-imported-key-material":
            data = (await kms.delete_imported_key_material(args.key, account=acct)).to_json()
        elif action == "describe-key":
            data = (await kms.describe_key(args.key, account=acct)).to_json()
        elif action == "list-keys":
            data = [k.to_json() for k in await kms.list_keys(state=args.state, account=acct)]
            human = _key_table
        elif action == "enable-key":
            data = (await kms.enable_key(args.key, account=acct)).to_json()
        elif action == "disable-key":
            data = (await kms.disable_key(args.key, account=acct)).to_json()
        elif action == "create-datakey":
            data = (await kms.create_datakey(args.key, args.length_bits, account=acct,
                                             encryption_context=ctx)).to_json()
        elif action == "create-datakey-without-plaintext":
            data = (await kms.create_datakey_without_plaintext(
                args.key, args.length_bits, account=acct, encryption_context=ctx)).to_json()
        elif action == "encrypt-datakey":
            data = (await kms.encrypt_datakey(args.key, checked["plain"], account=acct,
                                              encryption_context=ctx)).to_json()
        elif action == "decrypt-datakey":
            data = (await kms.decrypt_datakey(args.key, checked["cipher"], account=acct,
                                              encryption_context=ctx)).to_json()
        elif action == "encrypt-data":
            data = (await kms.encrypt_data(args.key, checked["plain"], account=acct,
                                           encryption_context=ctx)).to_json()
        elif action == "decrypt-data":
            data = (await kms.decrypt_data(
                checked["cipher"], account=acct, encryption_context=ctx, key=args.key,
                encryption_algorithm=args.encryption_algorithm)).to_json()
        elif action in ("encrypt-file", "decrypt-file"):
            from handlers.kms import stream as kms_stream

            size = None if args.input == "-" else Path(args.input).stat().st_size
            progress = kms_stream.terminal_progress(size)
            if action == "encrypt-file":
                result = await kms_stream.encrypt_file(kms, args.key, args.input, args.output,
                                                       account=acct, progress=progress)
            else:
                result = await kms_stream.decrypt_file(kms, args.input, args.output,
                                                       account=acct, progress=progress)
            if progress is not None:
                sys.stderr.write("\n")
            if args.output == "-":
                return 0  # stdout holds the data itself
            data = {**result.to_json(), "output": args.output}
        elif action == "enable-key-rotation":
            data = (await kms.enable_key_rotation(args.key, args.interval_days,
                                                  account=acct)).to_json()
        elif action == "disable-key-rotation":
            data = (await kms.disable_key_rotation(args.key, account=acct)).to_json()
        elif action == "get-key-rotation-status":
            data = (await kms.get_key_rotation_status(args.key, account=acct)).to_json()
        elif action == "update-key-rotation-interval":
            data = (await kms.update_key_rotation_interval(args.key, args.interval_days,
                                                           account=acct)).to_json()
        elif action == "update-key-alias":
            data = (await kms.update_key_alias(args.key, args.alias, account=acct)).to_json()
        elif action == "update-key-description":
            data = (await kms.update_key_description(args.key, args.description,
                                                     account=acct)).to_json()
        elif action == "usage":
            rows = await kms.usage(account=None if args.all_accounts else acct, key=args.key,
                                   since=checked["since"])
            data, human = [r.to_json() for r in rows], _usage_table
        elif action == "list-tags":
            data = [{"key": k, "value": v} for k, v in await kms.key_tags(args.key,
                                                                            account=acct)]
            human = _tag_lines
        elif action in ("tag", "untag"):
            await kms.batch_tags(args.key, checked["tags"],
                                 "create" if action == "tag" else "delete", account=acct)
            data = [{"key": k, "value": v} for k, v in await kms.key_tags(args.key,
                                                                            account=acct)]
            human = _tag_lines
        elif action == "create-grant":
            data = (await kms.create_grant(
                args.key, args.grantee, args.operation, name=args.name,
                retiring_principal=args.retiring, grantee_principal_type=args.type,
                account=acct)).to_json()
        elif action == "list-grants":
            data = [g.to_json() for g in (await kms.list_grants(args.key, account=acct)).grants]
            human = _grant_table
        elif action == "revoke-grant":
            await kms.revoke_grant(args.key, args.grant_id, account=acct)
            data = {"grant_id": args.grant_id, "revoked": True}
        elif action == "quotas":
            data = [q.to_json() for q in await kms.user_quotas(account=acct)]
            human = _quota_table
        elif action == "sign":
            signed = await kms.sign(args.key, checked["message"], args.algorithm,
                                    args.message_type, account=acct)
            if args.out is not None:
                _write_file(args.out, signed.signature)
            data = signed.to_json()
        elif action == "verify":
            verdict = await kms.verify(args.key, checked["message"], checked["signature"],
                                       args.algorithm, args.message_type, account=acct)
            data, status = verdict.to_json(), 0 if verdict.valid else 1
        elif action == "get-public-key":
            public = await kms.get_public_key(args.key, account=acct)
            data = public.to_json()
            human = _public_key_text
        elif action == "generate-mac":
            mac = await kms.generate_mac(args.key, checked["message"], args.algorithm,
                                         account=acct)
            if args.out is not None:
                _write_file(args.out, mac.mac)
            data = mac.to_json()
        elif action == "verify-mac":
            verdict = await kms.verify_mac(args.key, checked["message"], checked["mac"],
                                           args.algorithm, account=acct)
            data, status = verdict.to_json(), 0 if verdict.valid else 1
        else:  # gen-random
            data = {"random_data": (await kms.gen_random(args.bytes, account=acct)).hex()}
    print_result(data, args.json, human)
    return status


async def _run_job(args: argparse.Namespace, settings: Settings) -> int:
    from engine.registry import default_registry
    from handlers.kms.wiring import open_kms

    if args.action == "schedule-key-deletion":
        name = "kms.schedule_key_deletion"
        job_args: dict[str, Any] = {"key": args.key, "pending_days": args.pending_days}
    elif args.action == "rotate-key":
        name, job_args = "kms.rotate_key", {"key": args.key}
    else:
        name = "kms.cancel_key_deletion"
        job_args = {"key": args.key}
    if args.account != "default":
        job_args["account"] = args.account
    default_registry(settings).check_args(name, job_args)
    # A key that is not there is bad input (exit 2), not a task that fails later.
    async with open_kms(settings) as kms:
        await kms.describe_key(args.key, account=args.account)
    return await run_job(settings, name, job_args, wait=not args.no_wait,
                         timeout=args.timeout, as_json=args.json)


# --------------------------------------------------------------------------- audit


async def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from handlers.kms.format import check_account, check_key_ref
    from handlers.kms.wiring import open_kms

    if args.action == "list":
        if not 1 <= args.limit <= 100_000:
            raise InvalidInput(f"--limit must be between 1 and 100000, got {args.limit}")
        if args.account is not None:
            check_account(args.account)
        if args.key is not None:
            check_key_ref(args.key)
        where = audit_filter(args)
    async with open_kms(settings) as kms:
        if args.action == "list":
            entries = await kms.audit_list(args.key, account=args.account, limit=args.limit,
                                           where=where)
            print_result([e.to_json() for e in entries], args.json, _audit_table)
            return 0
        verdict = await kms.audit_verify()
    print_result(verdict.to_json(), args.json, _verdict)
    return 0 if verdict.intact else 1


def audit_filter(args: argparse.Namespace) -> Any:
    """``dew audit list``'s filters, checked (bad input: exit 2, naming the flag)."""
    from handlers.kms.store import AuditFilter

    for flag in ("secret", "operation", "actor"):
        value = getattr(args, flag)
        if value is not None and (not value or len(value) > 255 or "\0" in value):
            raise InvalidInput(f"--{flag} must be 1-255 characters")
    since, until = parse_utc(args.since, "--since"), parse_utc(args.until, "--until")
    if since is not None and until is not None and since > until:
        raise InvalidInput("--since is after --until", fix="Swap them.")
    return AuditFilter(secret=args.secret, operation=args.operation, actor=args.actor,
                       outcome=args.outcome, since=since, until=until)


def parse_utc(text: str | None, flag: str) -> datetime | None:
    """ISO 8601; no offset means UTC; ``Z`` is accepted; a date alone is its midnight."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"{flag} must be an ISO 8601 time, got {text[:40]!r}",
                           fix=f"For example {flag} 2026-12-01T08:00:00Z.") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


# --------------------------------------------------------------------------- output


def _public_key_text(data: dict[str, Any]) -> str:
    return str(data["public_key"]).rstrip("\n")


def _key_table(keys: list[dict[str, Any]]) -> str:
    if not keys:
        return "no keys"
    lines = [f"{'KEY ID':36}  {'ALIAS':24} {'SPEC':9} {'STATE':16} {'DEFAULT':7}  DELETION DATE"]
    for k in keys:
        lines.append(
            f"{k['key_id']:36}  {_cut(k['key_alias'], 24):24} {k['key_spec']:9} "
            f"{k['key_state']:16} {'yes' if k['default_key'] else 'no':7}  "
            f"{_text(k['scheduled_deletion_date'])[:19]}"
        )
    return "\n".join(lines)


def _usage_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no uses recorded"
    lines = [f"{'DAY':10}  {'ACCOUNT':12} {'KEY ID':36}  {'ALIAS':24} {'USES':>9}"]
    for r in rows:
        lines.append(f"{r['day']:10}  {_cut(r['account'], 12):12} {r['key_id']:36}  "
                     f"{_cut(r['key_alias'], 24):24} {r['count']:>9}")
    return "\n".join(lines)


def _tag_lines(tags: list[dict[str, Any]]) -> str:
    return "\n".join(f"{t['key']}={t['value']}" for t in tags) if tags else "no tags"


def _grant_table(grants: list[dict[str, Any]]) -> str:
    if not grants:
        return "no grants"
    lines = [f"{'GRANT ID':64}  {'GRANTEE':32} {'TYPE':6}  OPERATIONS"]
    for g in grants:
        lines.append(f"{g['grant_id']:64}  {g['grantee_principal']:32} "
                     f"{g['grantee_principal_type']:6}  {','.join(g['operations'])}")
    return "\n".join(lines)


def _quota_table(quotas: list[dict[str, Any]]) -> str:
    return "\n".join(f"{q['type']}: {q['used']} of {q['quota']}" for q in quotas)


def _audit_table(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "no audit entries"
    lines = [f"{'SEQ':>6}  {'TIME (UTC)':19}  {'ACCOUNT':12} {'OPERATION':32} {'OUTCOME':9} "
             f"{'KEY':36}  ACTOR"]
    for e in entries:
        lines.append(
            f"{e['seq']:>6}  {e['time'][:19].replace('T', ' '):19}  {_cut(e['account'], 12):12} "
            f"{e['operation']:32} {e['outcome']:9} {_text(e['key_id'])[:36]:36}  {e['actor']}"
            + _subject(e.get("detail"))
        )
    return "\n".join(lines)


def _subject(detail: Any) -> str:
    """A secret read's secret and version, after the actor."""
    if not isinstance(detail, dict) or "secret" not in detail:
        return ""
    return f"  secret {detail['secret']} {detail.get('version') or '-'}"


def _verdict(v: dict[str, Any]) -> str:
    if v["intact"]:
        text = f"audit chain intact: {v['entries']} entries"
        if v.get("sealed_through"):
            text += f", sealed in the HSM through entry {v['sealed_through']}"
        if v.get("unsealed"):
            text += f"; the newest {v['unsealed']} not sealed yet"
        return text
    where = "" if v["first_broken_seq"] is None else f" at seq {v['first_broken_seq']}"
    return f"audit chain BROKEN{where}: {v['reason']}"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
