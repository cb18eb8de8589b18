"""``dew kms ...`` and ``dew audit ...``: the KMS from the command line (docs/kms.md).

The grammar of docs/cli.md: the key is the positional KEY (an id or alias in
``--project``); inputs from files are ``--<name>-file`` (``-`` is stdin, so secrets
stay off ``/proc/*/cmdline``); ``--out FILE`` writes the payload there and prints a
one-line summary; ``--algorithm`` is every algorithm; times are ISO 8601 UTC; every
verb takes ``--json``. Old spellings still work for one release with a deprecation
line on stderr (docs/kms.md, "Renamed in this release").

Input is checked before anything is opened (``cli_checks``), so bad input (exit 2,
one line naming the flag) leaves no trace. An unknown KEY is told the closest
alias. ``schedule-key-deletion``, ``cancel-key-deletion`` and ``rotate-key`` run as
jobs: they enqueue the job and wait for a worker (``--timeout``, default 30 s;
``--no-wait`` only enqueues). ``dew audit verify`` exits 0 when the chain is
intact and 1 with the first broken entry otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engine.cli_output import (
    add_deprecated,
    add_option,
    add_project_option,
    print_result,
    run_job,
    write_out,
)
from engine.errors import NotFound
from engine.settings import Settings
from handlers.kms import cli_render as r
from handlers.kms.cli_checks import (
    audit_filter,
    checked,
    merge_key_flag,
    unknown_key_message,
)
from handlers.kms.cli_remote import ROUTED
from handlers.kms.cli_render import Shown

DEFAULT_JOB_TIMEOUT = 30.0
ARGV_SECRET = "discouraged: other local users can read it in /proc/*/cmdline"
JOB_NOTE = (
    "This enqueues a job and waits for a worker to run it (`dew stack up` starts one). "
    "Without a worker the task stays queued: the command gives up after --timeout seconds "
    "(exit 1) and the task still runs when a worker starts."
)
KEY_HELP = "the key: its id, or its alias in --project"
JSON_HELP = "print JSON (errors too: one JSON line on stderr)"
ROUTED_PROJECT_HELP = ("the project: its name or 32-hex id (default: default; through "
                       "[cli] api_url: the access key's project, and only that one)")
LOCAL_HELP = ("use the local token and store even when [cli] api_url names a running "
              "dew api")
SIGNING_ALGORITHMS = ("RSASSA_PSS_SHA_256/384/512, RSASSA_PKCS1_V1_5_SHA_256/384/512, "
                      "ECDSA_SHA_256 (P-256), ECDSA_SHA_384 (P-384), ML_DSA_44/65/87 (RAW)")
WRAPPING_ALGORITHMS = ("RSAES_OAEP_SHA_256 (default) or _SHA_1 for AES/HMAC material; "
                       "RSA_AES_KEY_WRAP_SHA_256 or _SHA_1 for RSA/EC private keys")

Verb = Callable[[Any, argparse.Namespace, dict[str, Any]], Awaitable[Shown]]


# --------------------------------------------------------------------------- parser


def register(subparsers: Any, commands: dict[str, Any]) -> None:
    kms = subparsers.add_parser("kms", help="KMS: master keys, data keys, encrypt-data")
    ksub = kms.add_subparsers(dest="action", metavar="ACTION", required=True,
                              parser_class=type(kms))

    def command(name: str, help_text: str, description: str = "",
                key: bool = False) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = ksub.add_parser(
            name, help=help_text, description=description or help_text)
        if key:
            p.add_argument("key", metavar="KEY", help=KEY_HELP)
        add_project_option(p)
        p.add_argument("--json", action="store_true", help=JSON_HELP)
        if name in ROUTED:
            p.add_argument("--local", action="store_true", help=LOCAL_HELP)
            # None: not given, so that through the API the access key's project applies.
            p.set_defaults(account=None)
            for action in p._actions:
                if action.dest == "account":
                    action.help = ROUTED_PROJECT_HELP
        return p

    _key_verbs(command)
    _data_verbs(command)
    _signing_verbs(command)
    _import_verbs(command)
    _lifecycle_verbs(command)
    _tag_grant_verbs(command)
    _audit_commands(subparsers)
    commands["kms"] = KmsCommand()
    commands["audit"] = cmd_audit


Command = Callable[..., argparse.ArgumentParser]


def _key_verbs(command: Command) -> None:
    p = command("create-key", "create a customer master key in the HSM")
    p.add_argument("--alias", required=True,
                   help="the key's alias (1-255 letters, digits, ':', '/', '_', '-'; unique "
                   "in the project; not ending with /default)")
    p.add_argument("--spec", default="AES_256",
                   help="AES_256 (default), HMAC_256/384/512, RSA_2048/3072/4096, EC_P256/P384, "
                   "ML_DSA_44/65/87")
    p.add_argument("--usage", help="ENCRYPT_DECRYPT, SIGN_VERIFY or GENERATE_VERIFY_MAC "
                   "(default: the spec's usual one)")
    p.add_argument("--description", default="", help="free text, at most 255 characters")
    p.add_argument("--origin", default="kms",
                   help="kms (default: generated in the HSM) or external (import your own)")
    command("describe-key", "show one key", key=True)
    p = command("list-keys", "list the project's keys")
    p.add_argument("--state", help="only keys in this state: enabled, disabled, "
                   "pending_deletion or pending_import")
    command("enable-key", "enable a disabled key", key=True)
    command("disable-key", "disable a key (it can no longer be used)", key=True)
    p = command("update-key-alias", "give a custom key another alias", key=True)
    p.add_argument("--alias", required=True, help="the new alias (create-key's rules)")
    p = command("update-key-description", "change a custom key's description", key=True)
    p.add_argument("--description", required=True, help="free text, at most 255 characters")
    p = command("get-public-key", "the public key of an RSA / EC / ML-DSA key "
                "(SubjectPublicKeyInfo PEM)", key=True)
    p = command("usage", "how often keys were used, per UTC day",
                "Uses per key and UTC day (data keys, encrypt/decrypt, sign/verify, MACs), "
                "oldest day first.")
    p.add_argument("--key", help="only this key (a filter: its id, or its alias in --project)")
    p.add_argument("--since", metavar="TIME", help="from the UTC day of TIME on (ISO 8601: "
                   "2026-12-01 or 2026-12-01T08:00:00Z)")
    add_option(p, "--all-projects", "--all-accounts", action="store_true",
               help="every project's keys (not only --project's)")
    command("quotas", "custom keys and grants used, and their limits")


def _context_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encryption-context", metavar="JSON",
                   help='a JSON object of strings, e.g. {"file":"a.txt"}; decrypt needs the same')


def _data_verbs(command: Command) -> None:
    for name, text in (
        ("create-datakey", "a new data key: plaintext and encrypted (hex)"),
        ("create-datakey-without-plaintext", "a new data key, encrypted only (hex)"),
    ):
        p = command(name, text, key=True)
        p.add_argument("--length-bits", type=int, default=256, help="128, 256 (default) or 512")
        _context_option(p)
    p = command("encrypt-datakey", "encrypt your own data key (16..64 bytes) under KEY",
                key=True)
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--plain-text-file", metavar="FILE",
                       help="the data key's raw bytes ('-' for stdin)")
    given.add_argument("--plain-text", metavar="HEX",
                       help=f"the data key in hex as an argument ({ARGV_SECRET})")
    _context_option(p)
    p = command("decrypt-datakey", "decrypt a data key made under KEY (prints its plaintext)",
                key=True)
    p.add_argument("--cipher-text", required=True, metavar="HEX",
                   help="the encrypted data key (hex, as create-datakey printed it)")
    _context_option(p)
    p = command("encrypt-data", "encrypt at most 4096 bytes under KEY (Base64 ciphertext)",
                key=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--plain-text-file", metavar="FILE",
                        help="the plaintext ('-' for stdin)")
    source.add_argument("--plain-text-base64", metavar="B64",
                        help=f"the plaintext in Base64 as an argument ({ARGV_SECRET})")
    _context_option(p)
    p = command("decrypt-data", "decrypt encrypt-data output (the key is inside it), or an "
                "RSA-OAEP ciphertext under KEY with --algorithm")
    p.add_argument("key", metavar="KEY", nargs="?",
                   help="the RSA ENCRYPT_DECRYPT key (RSA ciphertexts only: others name "
                   "their key)")
    p.add_argument("--cipher-text", required=True, metavar="B64",
                   help="the ciphertext (Base64)")
    add_option(p, "--algorithm", "--encryption-algorithm", metavar="ALG",
               help="SYMMETRIC_DEFAULT (default), RSAES_OAEP_SHA_256 or RSAES_OAEP_SHA_1")
    add_deprecated(p, "--key", "the positional KEY", dest="key_flag", metavar="KEY",
                      help="deprecated: give KEY as the positional argument")
    _context_option(p)
    p = command("gen-random", "random bytes from the HSM (hex)")
    p.add_argument("--bytes", type=int, required=True, metavar="N", help="how many: 1..1024")
    p = command("encrypt-file", "envelope-encrypt a file of any size under KEY (streaming)",
                "Encrypt IN to OUT ('-' for stdin / stdout) with a fresh data key made under "
                "KEY; OUT is written through a temporary file and renamed on success.", key=True)
    p.add_argument("input", metavar="IN", help="the file to encrypt ('-' for stdin)")
    p.add_argument("output", metavar="OUT", help="where to write it ('-' for stdout)")
    p = command("decrypt-file", "verify and decrypt an encrypt-file output",
                "Decrypt IN to OUT ('-' for stdin / stdout); any alteration, truncation, "
                "reordering or appended data fails (exit 1) and leaves no OUT file.")
    p.add_argument("input", metavar="IN", help="a file made by encrypt-file ('-' for stdin)")
    p.add_argument("output", metavar="OUT", help="where to write the plaintext ('-' for "
                   "stdout)")


def _signing_verbs(command: Command) -> None:
    for name, text in (("sign", "sign a message (or its digest) in the HSM"),
                       ("verify", "verify a signature in the HSM; exit 0 valid, 1 invalid")):
        p = command(name, text, key=True)
        p.add_argument("--message-file", required=True, metavar="FILE",
                       help="the message (RAW) or its binary digest (DIGEST)")
        p.add_argument("--message-type", default="RAW",
                       help="RAW (default: we hash it, at most 4096 bytes) or DIGEST")
        p.add_argument("--algorithm", required=True, metavar="ALG", help=SIGNING_ALGORITHMS)
        if name == "sign":
            p.add_argument("--out", metavar="FILE", help="write the binary signature to FILE "
                           "and print only a summary")
        else:
            given = p.add_mutually_exclusive_group(required=True)
            given.add_argument("--signature-file", metavar="FILE",
                               help="the binary signature (as sign --out wrote it)")
            given.add_argument("--signature", metavar="B64", help="the signature in Base64")
    for name, text in (("generate-mac", "an HMAC of a message (at most 4096 bytes) in the HSM"),
                       ("verify-mac", "verify an HMAC in the HSM; exit 0 valid, 1 invalid")):
        p = command(name, text, key=True)
        p.add_argument("--message-file", required=True, metavar="FILE",
                       help="the message (at most 4096 bytes)")
        p.add_argument("--algorithm", metavar="ALG",
                       help="HMAC_SHA_256/384/512 (default: the key's own)")
        if name == "generate-mac":
            p.add_argument("--out", metavar="FILE", help="write the binary MAC to FILE and "
                           "print only a summary")
        else:
            given = p.add_mutually_exclusive_group(required=True)
            given.add_argument("--mac-file", metavar="FILE",
                               help="the binary MAC (as generate-mac --out wrote it)")
            given.add_argument("--mac", metavar="B64", help="the MAC in Base64")


def _import_verbs(command: Command) -> None:
    p = command("get-parameters-for-import",
                "a wrapping public key (PEM) and an import token, valid 24 h", key=True)
    add_option(p, "--algorithm", "--wrapping-algorithm", default="RSAES_OAEP_SHA_256",
               metavar="ALG", help=WRAPPING_ALGORITHMS)
    p = command("import-key-material", "import wrapped key material into a pending key",
                key=True)
    p.add_argument("--import-token", required=True, metavar="TOKEN",
                   help="the import token from get-parameters-for-import")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--encrypted-key-material-file", metavar="FILE",
                       help="the wrapped material, as wrap-key-material wrote it ('-' for "
                       "stdin)")
    given.add_argument("--encrypted-key-material-base64", metavar="B64",
                       help="the wrapped material in Base64")
    p.add_argument("--expiration-time", metavar="TIME",
                   help="delete the material then (ISO 8601, UTC when no offset: "
                   "2027-01-31T00:00:00Z)")
    command("delete-imported-key-material", "delete imported material (back to pending "
            "import)", key=True)
    p = command("wrap-key-material", "client side: wrap material for import-key-material")
    add_option(p, "--public-key-file", "--public-key", required=True, metavar="FILE",
               help="the wrapping public key (PEM) from get-parameters-for-import")
    add_option(p, "--material-file", "--material", required=True, metavar="FILE",
               help="raw AES/HMAC bytes, or a private key (PKCS#8 DER or PEM)")
    p.add_argument("--algorithm", required=True, metavar="ALG", help=WRAPPING_ALGORITHMS)
    p.add_argument("--out", required=True, metavar="FILE",
                   help="write the wrapped material to FILE")
    p = command("ec-raw-to-pkcs8", "client side: a bare EC private scalar to PKCS#8 (stdout)")
    p.add_argument("--curve", required=True,
                   help="secp256r1 (P-256), secp384r1 (P-384), secp521r1, secp256k1")
    scalar = p.add_mutually_exclusive_group(required=True)
    scalar.add_argument("--private-hex-file", metavar="FILE",
                        help="a file holding the scalar in hex ('-' for stdin)")
    scalar.add_argument("--private-hex", metavar="HEX",
                        help=f"the scalar in hex as an argument ({ARGV_SECRET})")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--format", choices=("pem", "der"), default="pem",
                      help="pem (default) or der (binary)")
    for old in ("der", "pem"):
        add_deprecated(form, f"--{old}", f"--format {old}", action="store_const",
                          const=old, dest="format", help=f"deprecated: use --format {old}")


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=DEFAULT_JOB_TIMEOUT, metavar="S",
                   help=f"give up waiting after S seconds (default {DEFAULT_JOB_TIMEOUT:g})")
    p.add_argument("--no-wait", action="store_true", help="enqueue and print the task id")


def _lifecycle_verbs(command: Command) -> None:
    p = command("schedule-key-deletion", "schedule a key's deletion (a job; needs a worker)",
                "Schedule the key's deletion in 7..1096 days. " + JOB_NOTE, key=True)
    p.add_argument("--pending-days", type=int, required=True, metavar="N",
                   help="delete it after N days (7..1096)")
    _job_options(p)
    p = command("cancel-key-deletion", "cancel a scheduled deletion; the key comes back "
                "disabled (a job; needs a worker)",
                "Cancel the key's scheduled deletion; the key comes back disabled (enable it "
                "with enable-key). " + JOB_NOTE, key=True)
    _job_options(p)
    p = command("enable-key-rotation", "rotate an AES_256 key on a period", key=True)
    p.add_argument("--interval-days", type=int, metavar="N",
                   help="30..365 (default: the interval set before, else 365)")
    command("disable-key-rotation", "stop rotating a key", key=True)
    command("get-key-rotation-status", "rotation: enabled, interval, last, count", key=True)
    p = command("update-key-rotation-interval", "change a key's rotation interval", key=True)
    p.add_argument("--interval-days", type=int, required=True, metavar="N",
                   help="rotate every N days (30..365)")
    p = command("rotate-key", "rotate an AES_256 key now (a job; needs a worker)",
                "Add a new key version now; old ciphertexts still decrypt. " + JOB_NOTE,
                key=True)
    _job_options(p)


def _tag_grant_verbs(command: Command) -> None:
    command("list-tags", "a key's tags", key=True)
    p = command("tag", "add tags to a key, or change their values (all or none)", key=True)
    p.add_argument("--tag", required=True, action="append", metavar="KEY=VALUE",
                   help="repeat for several tags (at most 20 a key)")
    p = command("untag", "remove tags from a key (all or none)", key=True)
    p.add_argument("--tag-key", required=True, action="append", metavar="KEY",
                   help="the tag key to remove; repeat for several")
    p = command("create-grant", "let an IAM user (or project) use a key", key=True)
    p.add_argument("--grantee", required=True, metavar="ID",
                   help="the IAM user id (or project id with --grantee-type domain): 32 hex "
                   "digits")
    p.add_argument("--operation", required=True, action="append", metavar="OP",
                   help="repeat: create-datakey, encrypt-data, decrypt-data, describe-key, ...")
    add_option(p, "--grantee-type", "--type", default="user", help="user (default) or domain")
    p.add_argument("--name", help="the grant's name (create-key's alias characters)")
    p.add_argument("--retiring", metavar="ID", help="who else may retire the grant (an IAM "
                   "user id)")
    command("list-grants", "a key's grants", key=True)
    p = command("revoke-grant", "withdraw a grant", key=True)
    p.add_argument("grant_id", metavar="GRANT_ID", help="the grant's id (64 hex digits)")


def _audit_commands(subparsers: Any) -> None:
    audit = subparsers.add_parser("audit", help="the hash-chained audit log of key operations")
    asub = audit.add_subparsers(dest="action", metavar="ACTION", required=True,
                                parser_class=type(audit))
    p = asub.add_parser(
        "list", help="audit entries, oldest first (the newest --limit); the filters combine",
        description="Audit entries, oldest first (the newest --limit that match). Who read "
        "secret db.app, and when: `dew audit list --secret db.app`.")
    p.add_argument("--key", help="only this key (a filter: its id, or its alias in --project)")
    add_option(p, "--project", "--account", dest="account", metavar="PROJECT",
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
    p.add_argument("--limit", type=int, default=100,
                   help="at most this many (1..100000; default: 100)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p = asub.add_parser("verify", help="check the chain; exit 1 at the first broken entry")
    p.add_argument("--json", action="store_true", help=JSON_HELP)


# --------------------------------------------------------------------------- kms


class KmsCommand:
    """``dew kms``: a data-plane verb goes to the running API when ``[cli] api_url`` is
    set (``cli_remote``: done here, before the engine sets up logging, so that such a
    call imports no service, HSM or database module); everything else returns the
    local path's coroutine."""

    lean_start = True  # engine.cli: call before logging and project ids are set up

    def __call__(self, args: argparse.Namespace, settings: Settings) -> int | Awaitable[int]:
        merge_key_flag(args)
        from handlers.kms import cli_remote

        if cli_remote.routed(args, settings):
            return cli_remote.run(args, settings)
        if args.account is None:
            args.account = "default"
        return cmd_kms(args, settings)


async def cmd_kms(args: argparse.Namespace, settings: Settings) -> int:
    from handlers.kms.errors import UnknownKey
    from handlers.kms.wiring import open_kms

    merge_key_flag(args)
    inputs = checked(args)
    client_side = CLIENT_SIDE.get(args.action)
    if client_side is not None:  # no store, no HSM
        shown = client_side(args, inputs)
    elif args.action in JOBS:
        return await _run_job(args, settings)
    else:
        async with open_kms(settings) as kms:
            try:
                shown = await VERBS[args.action](kms, args, inputs)
            except UnknownKey as exc:
                raise await _suggest(kms, exc, args) from None
    if shown is not None:
        print_result(shown.data, args.json, shown.human)
        return shown.status
    return 0


async def _suggest(kms: Any, exc: NotFound, args: argparse.Namespace) -> NotFound:
    """An unknown KEY, with the closest alias of the project (listing them is
    audited as list_keys, like any listing)."""
    ref, project = getattr(args, "key", None), getattr(args, "account", None) or "default"
    if not isinstance(ref, str) or repr(ref) not in exc.message:
        return exc  # a key named inside a ciphertext: not a typo of the user's
    keys = await kms.list_keys(account=project)
    names = [k.key_alias for k in keys] + [k.key_id for k in keys]
    return type(exc)(unknown_key_message(ref, project, names), target=ref,
                     fix="Check the key id or alias and the project (--project); "
                     "`dew kms list-keys --project P` lists a project's keys.")


def _wrap_key_material(args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    wrapped: bytes = inputs["wrapped"]
    summary = write_out(args.out, wrapped, "wrapped key material")
    return r.written({"algorithm": args.algorithm}, "", args.out, len(wrapped), summary)


def _ec_raw_to_pkcs8(args: argparse.Namespace, inputs: dict[str, Any]) -> Shown | None:
    from handlers.kms.format import b64

    pkcs8: bytes = inputs["pkcs8"]
    if args.json:
        shown = pkcs8.decode() if args.format == "pem" else b64(pkcs8)
        return Shown({"curve": args.curve, "format": args.format, "private_key": shown})
    sys.stdout.buffer.write(pkcs8)
    return None


CLIENT_SIDE: dict[str, Callable[[argparse.Namespace, dict[str, Any]], Shown | None]] = {
    "wrap-key-material": _wrap_key_material,
    "ec-raw-to-pkcs8": _ec_raw_to_pkcs8,
}


def _metadata(method: str) -> Verb:
    """A verb that takes KEY alone and shows the service's result object."""
    async def verb(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
        return Shown((await getattr(kms, method)(args.key, account=args.account)).to_json())
    return verb


async def _create_key(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    made = await kms.create_key(args.alias, args.spec, args.usage, args.description,
                                account=args.account, origin=args.origin)
    return Shown(made.to_json())


async def _list_keys(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    keys = await kms.list_keys(state=args.state, account=args.account)
    return Shown([k.to_json() for k in keys], r.key_table)


async def _datakey(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    method = (kms.create_datakey if args.action == "create-datakey"
              else kms.create_datakey_without_plaintext)
    made = await method(args.key, args.length_bits, account=args.account,
                        encryption_context=inputs.get("context"))
    return Shown(made.to_json())


async def _encrypt_datakey(kms: Any, args: argparse.Namespace,
                           inputs: dict[str, Any]) -> Shown:
    made = await kms.encrypt_datakey(args.key, inputs["plain"], account=args.account,
                                     encryption_context=inputs.get("context"))
    return Shown(made.to_json())


async def _decrypt_datakey(kms: Any, args: argparse.Namespace,
                           inputs: dict[str, Any]) -> Shown:
    opened = await kms.decrypt_datakey(args.key, inputs["cipher"], account=args.account,
                                       encryption_context=inputs.get("context"))
    # The caller gave the ciphertext: showing it back is noise.
    return Shown({k: v for k, v in opened.to_json().items() if k != "cipher_text"})


async def _encrypt_data(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    sealed = await kms.encrypt_data(args.key, inputs["plain"], account=args.account,
                                    encryption_context=inputs.get("context"))
    return Shown(sealed.to_json())


async def _decrypt_data(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    opened = await kms.decrypt_data(inputs["cipher"], account=args.account,
                                    encryption_context=inputs.get("context"), key=args.key,
                                    encryption_algorithm=args.algorithm)
    return Shown(opened.to_json())


async def _gen_random(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    return Shown({"random_data": (await kms.gen_random(args.bytes, account=args.account)).hex()})


async def _file(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown | None:
    from handlers.kms import stream as kms_stream

    size = None if args.input == "-" else Path(args.input).stat().st_size
    progress = kms_stream.terminal_progress(size)
    if args.action == "encrypt-file":
        result = await kms_stream.encrypt_file(kms, args.key, args.input, args.output,
                                               account=args.account, progress=progress)
    else:
        result = await kms_stream.decrypt_file(kms, args.input, args.output,
                                               account=args.account, progress=progress)
    if progress is not None:
        sys.stderr.write("\n")
    if args.output == "-":
        return None  # stdout holds the data itself
    return Shown({**result.to_json(), "output": args.output})


async def _sign(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    signed = await kms.sign(args.key, inputs["message"], args.algorithm, args.message_type,
                            account=args.account)
    if args.out is None:
        return Shown(signed.to_json())
    summary = write_out(args.out, signed.signature, "signature")
    return r.written(signed.to_json(), "signature", args.out, len(signed.signature), summary)


async def _verify(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    verdict = await kms.verify(args.key, inputs["message"], inputs["signature"],
                               args.algorithm, args.message_type, account=args.account)
    return Shown(verdict.to_json(), status=0 if verdict.valid else 1)


async def _generate_mac(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    mac = await kms.generate_mac(args.key, inputs["message"], args.algorithm,
                                 account=args.account)
    if args.out is None:
        return Shown(mac.to_json())
    summary = write_out(args.out, mac.mac, "MAC")
    return r.written(mac.to_json(), "mac", args.out, len(mac.mac), summary)


async def _verify_mac(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    verdict = await kms.verify_mac(args.key, inputs["message"], inputs["mac"], args.algorithm,
                                   account=args.account)
    return Shown(verdict.to_json(), status=0 if verdict.valid else 1)


async def _public_key(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    public = await kms.get_public_key(args.key, account=args.account)
    return Shown(public.to_json(), r.public_key_text)


async def _import_parameters(kms: Any, args: argparse.Namespace,
                             inputs: dict[str, Any]) -> Shown:
    # The first call of a project makes an RSA-4096 key in the token (seconds).
    params = await r.announce_if_slow(
        kms.get_parameters_for_import(args.key, args.algorithm, account=args.account),
        r.WRAPPING_KEY_PROGRESS)
    return Shown(params.to_json())


async def _import_material(kms: Any, args: argparse.Namespace,
                           inputs: dict[str, Any]) -> Shown:
    done = await kms.import_key_material(args.key, args.import_token, inputs["material"],
                                         expiration_time=inputs["expires"], account=args.account)
    return Shown(done.to_json())


async def _enable_rotation(kms: Any, args: argparse.Namespace,
                           inputs: dict[str, Any]) -> Shown:
    change = await kms.enable_key_rotation(args.key, args.interval_days, account=args.account)
    return Shown(change.to_json())


async def _rotation_interval(kms: Any, args: argparse.Namespace,
                             inputs: dict[str, Any]) -> Shown:
    change = await kms.update_key_rotation_interval(args.key, args.interval_days,
                                                    account=args.account)
    return Shown(change.to_json())


async def _update_alias(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    return Shown((await kms.update_key_alias(args.key, args.alias,
                                             account=args.account)).to_json())


async def _update_description(kms: Any, args: argparse.Namespace,
                              inputs: dict[str, Any]) -> Shown:
    return Shown((await kms.update_key_description(args.key, args.description,
                                                   account=args.account)).to_json())


async def _usage(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    rows = await kms.usage(account=None if args.all_projects else args.account, key=args.key,
                           since=inputs["since"])
    return Shown([row.to_json() for row in rows], r.usage_table)


async def _tags(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    if args.action != "list-tags":
        await kms.batch_tags(args.key, inputs["tags"],
                             "create" if args.action == "tag" else "delete", account=args.account)
    tags = await kms.key_tags(args.key, account=args.account)
    return Shown([{"key": k, "value": v} for k, v in tags], r.tag_lines)


async def _create_grant(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    grant = await kms.create_grant(
        args.key, args.grantee, args.operation, name=args.name,
        retiring_principal=args.retiring, grantee_principal_type=args.grantee_type,
        account=args.account)
    return Shown(grant.to_json())


async def _list_grants(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    page = await kms.list_grants(args.key, account=args.account)
    return Shown([g.to_json() for g in page.grants], r.grant_table)


async def _revoke_grant(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    await kms.revoke_grant(args.key, args.grant_id, account=args.account)
    return Shown({"grant_id": args.grant_id, "revoked": True})


async def _quotas(kms: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> Shown:
    return Shown([q.to_json() for q in await kms.user_quotas(account=args.account)],
                 r.quota_table)


VERBS: dict[str, Callable[[Any, argparse.Namespace, dict[str, Any]], Awaitable[Any]]] = {
    "create-key": _create_key,
    "describe-key": _metadata("describe_key"),
    "list-keys": _list_keys,
    "enable-key": _metadata("enable_key"),
    "disable-key": _metadata("disable_key"),
    "update-key-alias": _update_alias,
    "update-key-description": _update_description,
    "get-public-key": _public_key,
    "usage": _usage,
    "quotas": _quotas,
    "create-datakey": _datakey,
    "create-datakey-without-plaintext": _datakey,
    "encrypt-datakey": _encrypt_datakey,
    "decrypt-datakey": _decrypt_datakey,
    "encrypt-data": _encrypt_data,
    "decrypt-data": _decrypt_data,
    "gen-random": _gen_random,
    "encrypt-file": _file,
    "decrypt-file": _file,
    "sign": _sign,
    "verify": _verify,
    "generate-mac": _generate_mac,
    "verify-mac": _verify_mac,
    "get-parameters-for-import": _import_parameters,
    "import-key-material": _import_material,
    "delete-imported-key-material": _metadata("delete_imported_key_material"),
    "enable-key-rotation": _enable_rotation,
    "disable-key-rotation": _metadata("disable_key_rotation"),
    "get-key-rotation-status": _metadata("get_key_rotation_status"),
    "update-key-rotation-interval": _rotation_interval,
    "list-tags": _tags,
    "tag": _tags,
    "untag": _tags,
    "create-grant": _create_grant,
    "list-grants": _list_grants,
    "revoke-grant": _revoke_grant,
}
JOBS = {"schedule-key-deletion": "kms.schedule_key_deletion",
        "cancel-key-deletion": "kms.cancel_key_deletion",
        "rotate-key": "kms.rotate_key"}


async def _run_job(args: argparse.Namespace, settings: Settings) -> int:
    from engine.registry import default_registry
    from handlers.kms.errors import UnknownKey
    from handlers.kms.wiring import open_kms

    name = JOBS[args.action]
    job_args: dict[str, Any] = {"key": args.key}
    if args.action == "schedule-key-deletion":
        job_args["pending_days"] = args.pending_days
    if args.account != "default":
        job_args["account"] = args.account
    default_registry(settings).check_args(name, job_args)
    # A key that is not there is bad input (exit 2), not a task that fails later.
    async with open_kms(settings) as kms:
        try:
            await kms.describe_key(args.key, account=args.account)
        except UnknownKey as exc:
            raise await _suggest(kms, exc, args) from None
    return await run_job(settings, name, job_args, wait=not args.no_wait,
                         timeout=args.timeout, as_json=args.json)


# --------------------------------------------------------------------------- audit


async def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from handlers.kms.errors import UnknownKey
    from handlers.kms.wiring import open_kms

    where = audit_filter(args) if args.action == "list" else None
    async with open_kms(settings) as kms:
        if args.action == "list":
            try:
                entries = await kms.audit_list(args.key, account=args.account,
                                               limit=args.limit, where=where)
            except UnknownKey as exc:
                raise await _suggest(kms, exc, args) from None
            print_result([e.to_json() for e in entries], args.json, r.audit_table)
            return 0
        verdict = await kms.audit_verify()
    print_result(verdict.to_json(), args.json, r.verdict)
    return 0 if verdict.intact else 1
