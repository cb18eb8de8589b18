"""``dew kms`` through a running ``dew api`` (``[cli] api_url``; docs/kms.md).

The data-plane verbs (:data:`ROUTED`) become one signed call each to the KMS's
API operations (handlers/kms/api.py), made by the lean client of
``engine.api.client``, and print exactly what the local path prints: the same
text, the same ``--json`` shape, the same exit codes and error lines. The call is
audited under the CLI's access key (``api:USER@PROJECT ak=...``), as any API
caller's. ``--local`` runs the verb on the local token instead; a server that is
configured but down is an error, never a silent fall-back to the local token
(which would change the identity that is audited).

This module imports no service, HSM or database module: the input checks the
local path takes from ``handlers.kms.format`` (which loads the token's
library) are mirrored here on the same constants and words, and a test holds
the two to the same answers.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Callable
from typing import Any

from engine.cli_output import print_result, read_input
from engine.errors import DewError, InvalidInput, NotFound
from engine.settings import Settings
from handlers.kms.cli_checks import as_flag, unknown_key_message
from handlers.kms.cli_render import Shown

# Mirrors of handlers.kms.format / asym / data (tests/kms/test_kms_cli_remote.py
# compares them): importing those would load the token's library.
ACCOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ALIAS = re.compile(r"^[a-zA-Z0-9:/_-]{1,255}$")
KEY_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
MAX_DATA_BYTES = 4096
RANDOM_MAX_BYTES = 1024
DATA_KEY_BITS = (128, 256, 512)
DATA_KEY_BYTES = (16, 64)
MAX_CONTEXT_BYTES = 8192
ENCRYPTION_ALGORITHMS = ("RSAES_OAEP_SHA_256", "RSAES_OAEP_SHA_1")
KEY_ID_SLICE = slice(16, 52)  # where a ciphertext names its key (format.py's layout)

PREFIX = "/v1.0/{project_id}/kms"
# The verbs that go to the API when [cli] api_url is set, and the operation of each.
ROUTED = {
    "gen-random": "/gen-random",
    "encrypt-data": "/encrypt-data",
    "decrypt-data": "/decrypt-data",
    "create-datakey": "/create-datakey",
    "create-datakey-without-plaintext": "/create-datakey-without-plaintext",
    "encrypt-datakey": "/encrypt-datakey",
    "decrypt-datakey": "/decrypt-datakey",
}
LOCAL_HINT = "add --local to run it on the local token"


def routed(args: argparse.Namespace, settings: Settings) -> bool:
    """Whether this ``dew kms`` command goes to the API."""
    return (bool(settings.cli.api_url) and args.action in ROUTED
            and not getattr(args, "local", False))


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Check the input (bad input: exit 2 before anything is sent), make the call,
    print the result as the local path does."""
    from engine.api.client import open_client

    inputs = checked(args)
    client = open_client(settings, os.environ)
    check_project(args.account, client.creds.project_id, client.creds.project,
                  client.creds.origin)
    body = REQUESTS[args.action](args, inputs)
    try:
        reply = client.call("POST", PREFIX + ROUTED[args.action], body)
    except NotFound as exc:
        raise suggest(client, exc, args.key) from None
    if not isinstance(reply, dict):
        raise InvalidInput(f"the API's reply to {args.action} is not a JSON object")
    shown = SHOWN[args.action](args, inputs, reply)
    print_result(shown.data, args.json, shown.human)
    return shown.status


# --------------------------------------------------------------------------- checks


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def check_account(account: object) -> str:
    if not isinstance(account, str) or not ACCOUNT.fullmatch(account):
        raise InvalidInput(
            f"invalid account {account!r}: use 1-64 letters, digits, '_', '.', '@' or '-'",
            code="invalid_account",
        )
    return account


def check_key_ref(ref: object) -> str:
    if not isinstance(ref, str) or not ref:
        raise InvalidInput("a key (its id or alias) is required", code="invalid_key")
    if KEY_ID.match(ref) or ALIAS.fullmatch(ref):
        return ref
    raise InvalidInput(f"invalid key {_shown(ref)}: give a key id (UUID) or an alias matching "
                       f"{ALIAS.pattern}", code="invalid_key")


def decode_hex(name: str, text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidInput(f"{name} is not valid hexadecimal", code="invalid_hex") from None


def decode_base64(name: str, text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{name} is not valid Base64", code="invalid_base64") from None


def check_context(text: str) -> dict[str, str]:
    try:
        context = json.loads(text)
    except json.JSONDecodeError:
        raise InvalidInput("--encryption-context is not valid JSON") from None
    if context is None:
        return {}  # JSON null: no context, as the local path takes it
    with as_flag("--encryption-context"):
        if not isinstance(context, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in context.items()):
            raise InvalidInput("the encryption context must map strings to strings",
                               code="invalid_encryption_context")
        canonical = json.dumps(context, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False).encode("utf-8") if context else b""
        if len(canonical) > MAX_CONTEXT_BYTES:
            raise InvalidInput(f"the encryption context is over {MAX_CONTEXT_BYTES} bytes",
                               code="invalid_encryption_context")
    return context


def checked(args: argparse.Namespace) -> dict[str, Any]:
    """The checks ``cli_checks.checked`` makes for a routed verb, in the same order and
    words; returns the decoded inputs."""
    if args.account is not None:
        with as_flag("--project"):
            check_account(args.account)
    out: dict[str, Any] = {}
    if getattr(args, "key", None) is not None:
        check_key_ref(args.key)
    if getattr(args, "encryption_context", None) is not None:
        out["context"] = check_context(args.encryption_context)
    out.update(CHECKS[args.action](args))
    return out


def _gen_random(args: argparse.Namespace) -> dict[str, Any]:
    n = args.bytes
    if not 1 <= n <= RANDOM_MAX_BYTES:
        with as_flag("--bytes"):
            raise InvalidInput(f"the number of random bytes must be 1..{RANDOM_MAX_BYTES}, "
                               f"got {_shown(n)}", code="invalid_random_length")
    return {}


def _encrypt_data(args: argparse.Namespace) -> dict[str, Any]:
    if args.plain_text_base64 is not None:
        flag = "--plain-text-base64"
        plain = decode_base64(flag, args.plain_text_base64)
    else:
        flag = "--plain-text-file"
        plain = read_input(flag, args.plain_text_file, MAX_DATA_BYTES + 1)
    with as_flag(flag):
        if len(plain) > MAX_DATA_BYTES:
            raise InvalidInput(
                f"encrypt-data takes at most {MAX_DATA_BYTES} bytes of plaintext, got "
                f"{len(plain)}", code="plaintext_too_large",
                fix="Use envelope encryption: create-datakey, encrypt locally, store the "
                "encrypted data key beside the data.")
        try:
            text = plain.decode("utf-8")
        except UnicodeDecodeError:
            # EncryptData's plain_text is a JSON string: bytes that are not UTF-8 cannot
            # travel in it unchanged.
            raise InvalidInput("the plaintext is not UTF-8 text, and the API's encrypt-data "
                               f"carries text only: {LOCAL_HINT}",
                               code="invalid_plaintext") from None
    return {"plain": plain, "text": text}


def _decrypt_data(args: argparse.Namespace) -> dict[str, Any]:
    cipher = decode_base64("--cipher-text", args.cipher_text)
    if args.algorithm not in (None, "SYMMETRIC_DEFAULT"):
        if args.algorithm not in ENCRYPTION_ALGORITHMS:
            with as_flag("--algorithm"):
                raise InvalidInput(f"invalid encryption algorithm {args.algorithm!r}; choose "
                                   f"one of {', '.join(ENCRYPTION_ALGORITHMS)}",
                                   code="invalid_encryption_algorithm")
        if args.key is None:
            raise InvalidInput(f"KEY is missing: {args.algorithm} ciphertexts need the RSA key "
                               f"(dew kms decrypt-data KEY --algorithm {args.algorithm} ...)")
    elif args.key is not None:
        raise InvalidInput("KEY is only for RSA ciphertexts (with --algorithm RSAES_OAEP_...); "
                           "other ciphertexts name their key")
    return {"cipher": cipher}


def _length_bits(args: argparse.Namespace) -> dict[str, Any]:
    if args.length_bits not in DATA_KEY_BITS:
        with as_flag("--length-bits"):
            raise InvalidInput(f"the data key length must be 128, 256 or 512 bits, got "
                               f"{_shown(args.length_bits)}", code="invalid_datakey_length")
    return {}


def _encrypt_datakey(args: argparse.Namespace) -> dict[str, Any]:
    low, high = DATA_KEY_BYTES
    plain = (decode_hex("--plain-text", args.plain_text) if args.plain_text is not None
             else read_input("--plain-text-file", args.plain_text_file, high + 1))
    if not low <= len(plain) <= high:
        got = f"more than {high}" if len(plain) > high else str(len(plain))
        raise InvalidInput(f"a data key must be {low}..{high} bytes ({low * 8}..{high * 8} "
                           f"bits), got {got}", code="invalid_datakey")
    return {"plain": plain}


def _decrypt_datakey(args: argparse.Namespace) -> dict[str, Any]:
    return {"cipher": decode_hex("--cipher-text", args.cipher_text)}


CHECKS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "gen-random": _gen_random,
    "encrypt-data": _encrypt_data,
    "decrypt-data": _decrypt_data,
    "create-datakey": _length_bits,
    "create-datakey-without-plaintext": _length_bits,
    "encrypt-datakey": _encrypt_datakey,
    "decrypt-datakey": _decrypt_datakey,
}


def check_project(given: str | None, project_id: str, project: str, origin: str) -> None:
    """Through the API a command acts in its access key's project: ``--project``, when
    given, must name that one (by name or id)."""
    if given is None or given in (project_id, project):
        return
    raise InvalidInput(f"--project {given!r} is not the project of the CLI's access key "
                       f"({project or project_id}, from {origin}): through the API a command "
                       f"acts in its access key's project; {LOCAL_HINT} in another project")


# --------------------------------------------------------------------------- requests


def aad(inputs: dict[str, Any]) -> dict[str, str]:
    """The encryption context as the API carries it: ``additional_authenticated_data``
    is the context ``{"aad": VALUE}`` (handlers/kms/api_views.aad_context)."""
    context = inputs.get("context")
    if not context:
        return {}
    if set(context) != {"aad"}:
        raise InvalidInput("--encryption-context: through the API a context is one \"aad\" "
                           "entry (its additional_authenticated_data), e.g. "
                           f"{{\"aad\":\"...\"}}; {LOCAL_HINT} with other contexts")
    return {"additional_authenticated_data": context["aad"]}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


REQUESTS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], dict[str, Any]]] = {
    "gen-random": lambda args, inputs: {"random_data_length": args.bytes * 8},
    "encrypt-data": lambda args, inputs: {"key_id": args.key, "plain_text": inputs["text"],
                                          **aad(inputs)},
    "decrypt-data": lambda args, inputs: {
        "cipher_text": _b64(inputs["cipher"]), **aad(inputs),
        **({} if args.key is None else {"key_id": args.key}),
        **({} if args.algorithm is None else {"encryption_algorithm": args.algorithm})},
    "create-datakey": lambda args, inputs: {"key_id": args.key,
                                            "datakey_length": args.length_bits, **aad(inputs)},
    "create-datakey-without-plaintext": lambda args, inputs: {
        "key_id": args.key, "datakey_length": args.length_bits, **aad(inputs)},
    # EncryptDatakey takes the key followed by its SHA-256 (api_views.split_datakey).
    "encrypt-datakey": lambda args, inputs: {
        "key_id": args.key, "datakey_plain_length": len(inputs["plain"]),
        "plain_text": (inputs["plain"] + hashlib.sha256(inputs["plain"]).digest()).hex(),
        **aad(inputs)},
    "decrypt-datakey": lambda args, inputs: {
        "key_id": args.key, "cipher_text": inputs["cipher"].hex(),
        "datakey_cipher_length": max(1, len(inputs["cipher"])), **aad(inputs)},
}


# --------------------------------------------------------------------------- replies


def field(reply: dict[str, Any], name: str) -> str:
    value = reply.get(name)
    if not isinstance(value, str):
        raise InvalidInput(f"the API's reply has no {name}: is [cli] api_url a dew api?")
    return value


def _datakey(args: argparse.Namespace, inputs: dict[str, Any], reply: dict[str, Any]) -> Shown:
    shown = {"key_id": field(reply, "key_id")}
    if args.action == "create-datakey":
        shown["plain_text"] = field(reply, "plain_text")
    shown["cipher_text"] = field(reply, "cipher_text")
    return Shown(shown)


def _decrypt_datakey_shown(args: argparse.Namespace, inputs: dict[str, Any],
                           reply: dict[str, Any]) -> Shown:
    # DecryptDatakey names no key; the service decrypts only under the key the
    # ciphertext names, so on success that is the key.
    key_id = inputs["cipher"][KEY_ID_SLICE].decode("ascii", errors="replace")
    return Shown({"key_id": key_id, "plain_text": field(reply, "data_key")})


SHOWN: dict[str, Callable[[argparse.Namespace, dict[str, Any], dict[str, Any]], Shown]] = {
    "gen-random": lambda args, inputs, reply: Shown(
        {"random_data": field(reply, "random_data")}),
    "encrypt-data": lambda args, inputs, reply: Shown(
        {"key_id": field(reply, "key_id"), "cipher_text": field(reply, "cipher_text")}),
    "decrypt-data": lambda args, inputs, reply: Shown(
        {"key_id": field(reply, "key_id"),
         "plain_text_base64": field(reply, "plain_text_base64")}),
    "create-datakey": _datakey,
    "create-datakey-without-plaintext": _datakey,
    "encrypt-datakey": lambda args, inputs, reply: Shown(
        {"key_id": field(reply, "key_id"), "cipher_text": field(reply, "cipher_text")}),
    "decrypt-datakey": _decrypt_datakey_shown,
}


# --------------------------------------------------------------------------- unknown keys


def suggest(client: Any, exc: NotFound, ref: str | None) -> DewError:
    """An unknown KEY told as the local path tells it: the closest alias of the
    project (the listing is the API's ListKeys, audited like any listing)."""
    if not isinstance(ref, str) or repr(ref) not in exc.message:
        return exc  # a key named inside a ciphertext: not a typo of the user's
    creds = client.creds
    found = re.search(r" in account '([^']*)'", exc.message)
    project = creds.project or (found.group(1) if found else creds.project_id)
    try:
        listed = client.call("POST", PREFIX + "/list-keys", {"limit": 1000})
        details = listed.get("key_details", []) if isinstance(listed, dict) else []
        names = ([str(d.get("key_alias", "")) for d in details]
                 + [str(d.get("key_id", "")) for d in details])
    except DewError:
        names = []  # no right to list: the message without a suggestion
    return NotFound(unknown_key_message(ref, project, names), code="key_not_found",
                    target=ref, fix="Check the key id or alias and the project (--project); "
                    "`dew kms list-keys --project P` lists a project's keys.")
