"""``dew kms`` / ``dew audit`` input checks: everything decided from the command line
alone, before the store or the HSM is opened (bad input: exit 2, one line naming
the CLI flag, nothing written)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from engine.cli_output import read_file, read_input
from engine.errors import InvalidInput

MAX_SECRET_FILE_BYTES = 4096
MAX_KEY_FILE_BYTES = 1 << 16  # a PEM, a PKCS#8 private key, wrapped material
TIME_FORMS = "YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ"
# Which flag a sign/verify request's error is about, by its code.
SIGN_FLAGS = {"invalid_signing_algorithm": "--algorithm", "invalid_message_type": "--message-type"}


# --------------------------------------------------------------------------- naming flags


def flag_message(message: str, flag: str, fields: Mapping[str, str] | None = None) -> str:
    """A check's message naming the CLI flag: a leading internal field name (``fields``
    maps it to its CLI name; default: ``flag``) is replaced, else ``flag`` is put first
    unless the message already names it."""
    for field, name in (fields or {}).items():
        if message.startswith(field):
            return name + message[len(field):]
    return message if flag in message else f"{flag}: {message}"


@contextmanager
def as_flag(flag: str, *fields: str, renames: Mapping[str, str] | None = None,
            codes: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raise a check's ``InvalidInput`` with its message naming the CLI flag:
    ``flag``, or ``codes[error code]`` when one check covers several flags.
    ``fields`` are internal names the message may start with (shown as the flag);
    ``renames`` maps other message prefixes to their replacement."""
    try:
        yield
    except InvalidInput as exc:
        name = (codes or {}).get(exc.code, flag)
        table = {field: name for field in fields} | dict(renames or {})
        raise InvalidInput(flag_message(exc.message, name, table), code=exc.code,
                           fix=exc.fix) from None


def merge_key_flag(args: argparse.Namespace) -> None:
    """``decrypt-data --key K`` (the old spelling) into the positional KEY; the
    deprecation line was printed when it was parsed."""
    old = getattr(args, "key_flag", None)
    if old is None:
        return
    if args.key is not None and args.key != old:
        raise InvalidInput(f"KEY given twice: {args.key!r} and --key {old!r}",
                           fix="Give the key once, as the positional KEY.")
    args.key = old


# --------------------------------------------------------------------------- times


def parse_utc(text: str | None, flag: str) -> datetime | None:
    """ISO 8601; no offset means UTC; ``Z`` is accepted; a day alone is its midnight
    (UTC). One form for every time option of ``dew kms`` and ``dew audit``."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"{flag} must be an ISO 8601 time ({TIME_FORMS}; UTC when no "
                           f"offset), got {text[:40]!r}",
                           fix=f"For example {flag} 2026-12-01T08:00:00Z.") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def utc_day(text: str | None, flag: str) -> date | None:
    """The UTC day an ISO 8601 time (or a day) falls on."""
    when = parse_utc(text, flag)
    return None if when is None else when.date()


# --------------------------------------------------------------------------- suggestions


def closest(ref: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``ref`` (difflib), if any is close enough."""
    import difflib

    found = difflib.get_close_matches(ref, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key_message(ref: str, project: str, candidates: Iterable[str]) -> str:
    """What an unknown KEY is told: the closest existing alias or id, and where to look."""
    match = closest(ref, candidates)
    hint = f"; did you mean {match!r}?" if match is not None else ""
    listing = "dew kms list-keys" + ("" if project == "default" else f" --project {project}")
    return f"no key {ref!r} in project {project!r}{hint} (`{listing}` lists its keys)"


# --------------------------------------------------------------------------- files


def read_bounded(flag: str, name: str, limit: int) -> bytes:
    """A file (or stdin for ``-``) of at most ``limit`` bytes; a larger one is refused."""
    data = read_input(flag, name, limit + 1)
    if len(data) > limit:
        raise InvalidInput(f"{flag} holds more than {limit} bytes")
    return data


def check_out(path: str, flag: str = "--out") -> None:
    """A file the command may write: checked before the operation, so nothing is done
    (signed, audited, counted) for an output that cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise InvalidInput(f"cannot write {flag} {path}: it is a directory")
    if not target.resolve().parent.is_dir():
        raise InvalidInput(f"cannot write {flag} {path}: its directory does not exist")


def check_paths(source: str, target: str, action: str) -> None:
    """encrypt-file / decrypt-file's IN and OUT."""
    from handlers.kms.stream import MAGIC

    if source != "-":
        head = read_file("IN", source, len(MAGIC))
        if action == "decrypt-file" and head != MAGIC:
            raise InvalidInput(f"{source} is not a file made by dew kms encrypt-file")
    if target != "-":
        check_out(target, "OUT")


# --------------------------------------------------------------------------- per verb


def checked(args: argparse.Namespace) -> dict[str, Any]:
    """Every check of a ``dew kms`` command that needs no store or HSM, done before
    either is opened; returns the decoded inputs."""
    from handlers.kms import format as f

    with as_flag("--project"):
        # None: a verb that may go to the API, --project not given (the default project).
        f.check_account(f.DEFAULT_ACCOUNT if args.account is None else args.account)
    out: dict[str, Any] = {}
    if getattr(args, "key", None) is not None:
        f.check_key_ref(args.key)
    if getattr(args, "encryption_context", None) is not None:
        out["context"] = _context(args.encryption_context)
    if getattr(args, "out", None) is not None:
        check_out(args.out)
    check = CHECKS.get(args.action)
    if check is not None:
        out.update(check(args))
    return out


def _context(text: str) -> dict[str, str]:
    from handlers.kms.format import check_context

    try:
        context = json.loads(text)
    except json.JSONDecodeError:
        raise InvalidInput("--encryption-context is not valid JSON") from None
    with as_flag("--encryption-context"):
        return check_context(context)


def _create_key(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms import format as f

    with as_flag("--origin"):
        f.check_origin(args.origin)
    with as_flag("--alias"):
        f.check_custom_alias(args.alias)
    with as_flag("--spec"):
        spec = f.check_spec(args.spec)
    with as_flag("--usage"):
        f.check_usage(spec, args.usage)
    with as_flag("--description"):
        f.check_description(args.description)
    return {}


def _list_keys(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.format import KeyState

    states = [s.value for s in KeyState if s is not KeyState.DELETED]
    if args.state is not None and args.state not in states:
        raise InvalidInput(f"--state must be one of {', '.join(states)}")
    return {}


def _length_bits(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.format import check_length_bits

    with as_flag("--length-bits"):
        check_length_bits(args.length_bits)
    return {}


def _encrypt_datakey(args: argparse.Namespace) -> dict[str, Any]:
    # The API path's check is the same and imports no HSM module: one copy of it.
    from handlers.kms import cli_remote

    return cli_remote.CHECKS["encrypt-datakey"](args)


def _decrypt_datakey(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms import cli_remote

    return cli_remote.CHECKS["decrypt-datakey"](args)


def _encrypt_data(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.format import MAX_DATA_BYTES, check_plaintext, decode_base64

    if args.plain_text_base64 is not None:
        plain = decode_base64("--plain-text-base64", args.plain_text_base64)
    else:  # one byte more than allowed: enough to refuse a large input
        plain = read_input("--plain-text-file", args.plain_text_file, MAX_DATA_BYTES + 1)
    with as_flag("--plain-text-file" if args.plain_text_base64 is None
                 else "--plain-text-base64"):
        return {"plain": check_plaintext(plain)}


def _decrypt_data(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.asym import check_encryption_algorithm
    from handlers.kms.format import decode_base64

    cipher = decode_base64("--cipher-text", args.cipher_text)
    if args.algorithm not in (None, "SYMMETRIC_DEFAULT"):
        with as_flag("--algorithm"):
            check_encryption_algorithm(args.algorithm)
        if args.key is None:
            raise InvalidInput(f"KEY is missing: {args.algorithm} ciphertexts need the RSA key "
                               f"(dew kms decrypt-data KEY --algorithm {args.algorithm} ...)")
    elif args.key is not None:
        raise InvalidInput("KEY is only for RSA ciphertexts (with --algorithm RSAES_OAEP_...); "
                           "other ciphertexts name their key")
    return {"cipher": cipher}


def _sign_or_verify(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms import asym as a
    from handlers.kms.format import decode_base64

    message = read_file("--message-file", args.message_file, a.MAX_MESSAGE_BYTES + 1)
    with as_flag("--message-file", codes=SIGN_FLAGS):
        a.sign_request(args.algorithm, message, args.message_type)
    out: dict[str, Any] = {"message": message}
    if args.action == "verify":
        out["signature"] = (decode_base64("--signature", args.signature)
                            if args.signature is not None
                            else read_file("--signature-file", args.signature_file,
                                           a.MAX_SIGNATURE_BYTES))
    return out


def _mac(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms import asym as a
    from handlers.kms.format import decode_base64

    with as_flag("--message-file"):
        message = a.check_mac_message(
            read_file("--message-file", args.message_file, a.MAX_MESSAGE_BYTES + 1))
    if args.algorithm is not None and args.algorithm not in a.MAC:
        raise InvalidInput(f"--algorithm must be one of {', '.join(a.MAC)}")
    out: dict[str, Any] = {"message": message}
    if args.action == "verify-mac":
        out["mac"] = (decode_base64("--mac", args.mac) if args.mac is not None
                      else read_file("--mac-file", args.mac_file, 64))
    return out


def _gen_random(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.format import check_random_bytes

    with as_flag("--bytes"):
        check_random_bytes(args.bytes)
    return {}


def _files(args: argparse.Namespace) -> dict[str, Any]:
    check_paths(args.input, args.output, args.action)
    return {}


def _interval(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.format import check_rotation_days

    if args.interval_days is not None:
        with as_flag("--interval-days"):
            check_rotation_days(args.interval_days)
    return {}


def _alias(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.format import check_custom_alias

    with as_flag("--alias"):
        check_custom_alias(args.alias)
    return {}


def _description(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.format import check_description

    with as_flag("--description"):
        check_description(args.description)
    return {}


def _usage(args: argparse.Namespace) -> dict[str, Any]:
    return {"since": utc_day(args.since, "--since")}


def _tag(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.format import check_tags

    pairs = [_tag_pair(t) for t in args.tag]
    with as_flag("--tag", renames={"--tag.key": "--tag KEY", "--tag.value": "--tag VALUE"}):
        return {"tags": check_tags(pairs, "--tag")}


def _untag(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.format import check_tags

    with as_flag("--tag-key", renames={"--tag-key.key": "--tag-key"}):
        return {"tags": check_tags([(k, "") for k in args.tag_key], "--tag-key")}


def _tag_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidInput(f"--tag must be KEY=VALUE, got {text!r}")
    return key, value


def _create_grant(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms import format as f

    with as_flag("--grantee", "grantee_principal"):
        f.check_principal(args.grantee, "grantee_principal")
    with as_flag("--grantee-type", "grantee_principal_type"):
        f.check_grantee_type(args.grantee_type)
    with as_flag("--operation", "operations"):
        f.check_operations(args.operation)
    with as_flag("--name", "name"):
        f.check_grant_name(args.name)
    if args.retiring is not None:
        with as_flag("--retiring", "retiring_principal"):
            f.check_principal(args.retiring, "retiring_principal")
    return {}


def _revoke_grant(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.format import check_grant_id

    with as_flag("GRANT_ID", "grant_id"):
        check_grant_id(args.grant_id)
    return {}


def _wrapping_algorithm(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.byok import check_wrapping_algorithm

    with as_flag("--algorithm"):
        check_wrapping_algorithm(args.algorithm)
    return {}


def _import_material(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.format import decode_base64

    if args.encrypted_key_material_base64 is not None:
        material = decode_base64("--encrypted-key-material-base64",
                                 args.encrypted_key_material_base64)
    else:
        material = read_bounded("--encrypted-key-material-file",
                                args.encrypted_key_material_file, MAX_KEY_FILE_BYTES)
    return {"material": material,
            "expires": parse_utc(args.expiration_time, "--expiration-time")}


def _wrap_material(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.byok import check_wrapping_algorithm, wrap_key_material

    with as_flag("--algorithm"):
        check_wrapping_algorithm(args.algorithm)
    public = read_bounded("--public-key-file", args.public_key_file, MAX_KEY_FILE_BYTES)
    material = read_bounded("--material-file", args.material_file, MAX_KEY_FILE_BYTES)
    with as_flag("--algorithm", codes={"invalid_public_key": "--public-key-file",
                                       "invalid_key_material": "--material-file"}):
        return {"wrapped": wrap_key_material(public, material, args.algorithm)}


def _ec_raw(args: argparse.Namespace) -> dict[str, Any]:
    from handlers.kms.byok import ec_raw_to_pkcs8

    scalar = private_hex(args)
    source = "--private-hex" if args.private_hex is not None else "--private-hex-file"
    with as_flag("--curve", renames={"--private-hex ": f"{source} "},
                 codes={"invalid_hex": source, "invalid_key_material": source}):
        return {"pkcs8": ec_raw_to_pkcs8(args.curve, scalar, pem=args.format == "pem")}


def private_hex(args: argparse.Namespace) -> str:
    if args.private_hex is not None:
        return str(args.private_hex)
    data = read_bounded("--private-hex-file", args.private_hex_file, MAX_SECRET_FILE_BYTES)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InvalidInput("--private-hex-file is not hexadecimal text",
                           code="invalid_hex") from None
    if not text:
        raise InvalidInput("--private-hex-file is empty", code="invalid_hex")
    return text


def _job(args: argparse.Namespace) -> dict[str, Any]:
    if not 0 < args.timeout <= 24 * 3600:
        raise InvalidInput("--timeout must be between 0 and 86400 seconds")
    if args.action == "schedule-key-deletion":
        from handlers.kms.format import check_pending_days

        with as_flag("--pending-days", "pending_days"):
            check_pending_days(args.pending_days)
    return {}


CHECKS = {
    "create-key": _create_key,
    "list-keys": _list_keys,
    "create-datakey": _length_bits,
    "create-datakey-without-plaintext": _length_bits,
    "encrypt-datakey": _encrypt_datakey,
    "decrypt-datakey": _decrypt_datakey,
    "encrypt-data": _encrypt_data,
    "decrypt-data": _decrypt_data,
    "sign": _sign_or_verify,
    "verify": _sign_or_verify,
    "generate-mac": _mac,
    "verify-mac": _mac,
    "gen-random": _gen_random,
    "encrypt-file": _files,
    "decrypt-file": _files,
    "enable-key-rotation": _interval,
    "update-key-rotation-interval": _interval,
    "update-key-alias": _alias,
    "update-key-description": _description,
    "usage": _usage,
    "tag": _tag,
    "untag": _untag,
    "create-grant": _create_grant,
    "revoke-grant": _revoke_grant,
    "get-parameters-for-import": _wrapping_algorithm,
    "import-key-material": _import_material,
    "wrap-key-material": _wrap_material,
    "ec-raw-to-pkcs8": _ec_raw,
    "schedule-key-deletion": _job,
    "cancel-key-deletion": _job,
    "rotate-key": _job,
}


# --------------------------------------------------------------------------- audit


def audit_filter(args: argparse.Namespace) -> Any:
    """``dew audit list``'s filters, checked (bad input: exit 2, naming the flag)."""
    from handlers.kms.format import check_account, check_key_ref
    from handlers.kms.store import AuditFilter

    if not 1 <= args.limit <= 100_000:
        raise InvalidInput(f"--limit must be between 1 and 100000, got {args.limit}")
    if args.account is not None:
        with as_flag("--project"):
            check_account(args.account)
    if args.key is not None:
        with as_flag("--key"):
            check_key_ref(args.key)
    for flag in ("secret", "operation", "actor"):
        value = getattr(args, flag)
        if value is not None and (not value or len(value) > 255 or "\0" in value):
            raise InvalidInput(f"--{flag} must be 1-255 characters")
    since, until = parse_utc(args.since, "--since"), parse_utc(args.until, "--until")
    if since is not None and until is not None and since > until:
        raise InvalidInput("--since is after --until", fix="Swap them.")
    return AuditFilter(secret=args.secret, operation=args.operation, actor=args.actor,
                       outcome=args.outcome, since=since, until=until)
