"""Pure parts of KMS: input checks and the self-describing ciphertext format.

Nothing here touches the token or the store, so all of it is tested in
milliseconds. The ciphertext of ``encrypt-data`` (and, with another purpose
byte, the ``cipher_text`` of a data key) is, before Base64 (or hex)::

    off  len  field
      0    4  magic b"DEWC"
      4    1  format version (1)
      5    1  algorithm (1 = AES_256_GCM, computed in the HSM)
      6    1  purpose (1 = encrypt-data, 2 = data key)
      7    1  flags (0; reserved)
      8    4  key version (uint32, big-endian)
     12    4  plaintext length n (uint32, big-endian; at most 4096)
     16   36  key id (a UUID in ASCII)
     52   12  context digest: SHA-256 of the canonical encryption context, first 12 bytes
     64   12  GCM IV (from the token's RNG)
     76   32  header digest: SHA-256 of bytes 0..76
    108    m  AES-256-GCM ciphertext of the plaintext zero-padded to m = ceil(n/16)*16
  108+m   16  GCM tag

so its length is ``124 + ceil(n/16)*16``: the documented size (4 bytes of
plaintext give 140 bytes, 188 Base64 characters). The GCM additional data is
bytes 0..64 plus the canonical encryption context, so the key id, version,
length, purpose and context are all authenticated by the tag; the header
digest lets a damaged or truncated ciphertext be refused with a clear error
before any key is looked up.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import IntEnum, StrEnum
from typing import NamedTuple

from engine.crypto import IntegrityCheckFailed, KeySpec
from engine.errors import InvalidInput
from engine.models import iso

DEFAULT_ACCOUNT = "default"
ACCOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ALIAS = re.compile(r"^[a-zA-Z0-9:/_-]{1,255}$")
KEY_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
DEFAULT_SUFFIX = "/default"
# Services whose "<service>/default" key is created on first request. A fixed
# list, so that a typo ("kpss/default") is an unknown key instead of a new one.
DEFAULT_KEY_SERVICES = frozenset(
    {"obs", "evs", "kps", "csms", "cce", "rds", "sfs", "ims", "dws", "dds", "css"}
)

ROTATION_DAYS_MIN = 30
ROTATION_DAYS_MAX = 365
ROTATION_DAYS_DEFAULT = 365
PENDING_DAYS_MIN = 7
PENDING_DAYS_MAX = 1096
MAX_DATA_BYTES = 4096
DATA_KEY_BITS = (128, 256, 512)
RANDOM_MAX_BYTES = 1024
MAX_DESCRIPTION = 255
MAX_CONTEXT_BYTES = 8192

MAGIC = b"DEWC"
FORMAT_VERSION = 1
HEADER_BYTES = 108
AAD_HEADER_BYTES = 64
IV_BYTES = 12
TAG_BYTES = 16
BLOCK = 16
KEY_ID_BYTES = 36
CONTEXT_DIGEST_BYTES = 12
_FIXED = struct.Struct(">4sBBBBII")  # magic, version, algorithm, purpose, flags, kver, length


class KeyState(StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    PENDING_DELETION = "pending_deletion"
    PENDING_IMPORT = "pending_import"
    DELETED = "deleted"  # internal: never listed; its material is gone


class KeyUsage(StrEnum):
    ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
    SIGN_VERIFY = "SIGN_VERIFY"
    GENERATE_VERIFY_MAC = "GENERATE_VERIFY_MAC"


class Algorithm(IntEnum):
    AES_256_GCM = 1


class Purpose(IntEnum):
    DATA = 1
    DATA_KEY = 2


# Which usages each family of key specs allows; the first is the default.
USAGES: dict[str, tuple[KeyUsage, ...]] = {
    "AES": (KeyUsage.ENCRYPT_DECRYPT,),
    "HMAC": (KeyUsage.GENERATE_VERIFY_MAC,),
    "RSA": (KeyUsage.SIGN_VERIFY, KeyUsage.ENCRYPT_DECRYPT),
    "EC": (KeyUsage.SIGN_VERIFY,),
    "MLDSA": (KeyUsage.SIGN_VERIFY,),
}


# --------------------------------------------------------------------------- input checks


def check_account(account: object) -> str:
    if not isinstance(account, str) or not ACCOUNT.fullmatch(account):
        raise InvalidInput(
            f"invalid account {account!r}: use 1-64 letters, digits, '_', '.', '@' or '-'",
            code="invalid_account",
        )
    return account


def is_key_id(ref: str) -> bool:
    """Key ids are canonical lower-case UUIDs; everything else is an alias."""
    return KEY_ID.match(ref) is not None


def check_key_ref(ref: object) -> str:
    """A key id or an alias (what every command's KEY argument is)."""
    if not isinstance(ref, str) or not ref:
        raise InvalidInput("a key (its id or alias) is required", code="invalid_key")
    if is_key_id(ref) or ALIAS.fullmatch(ref):
        return ref
    raise InvalidInput(
        f"invalid key {_shown(ref)}: give a key id (UUID) or an alias matching "
        f"{ALIAS.pattern}",
        code="invalid_key",
    )


def default_service(alias: str) -> str | None:
    """``"kps"`` for ``"kps/default"`` when kps has a default key, else None."""
    if not alias.endswith(DEFAULT_SUFFIX):
        return None
    service = alias[: -len(DEFAULT_SUFFIX)]
    return service if service in DEFAULT_KEY_SERVICES else None


def check_custom_alias(alias: object) -> str:
    if not isinstance(alias, str) or not ALIAS.fullmatch(alias):
        raise InvalidInput(
            f"invalid alias {_shown(alias)}: 1-255 characters of letters, digits, ':', '/', "
            "'_' and '-'",
            code="invalid_alias",
        )
    if is_key_id(alias):
        raise InvalidInput("an alias cannot be a UUID (that is what key ids look like)",
                           code="invalid_alias")
    if alias.endswith(DEFAULT_SUFFIX):
        raise InvalidInput(
            f"the alias {alias!r} ends with '/default', which is reserved for the default "
            "keys that services create",
            code="invalid_alias",
            fix="Choose an alias that does not end with '/default'.",
        )
    return alias


def check_spec(spec: object) -> KeySpec:
    try:
        return KeySpec(str(spec))
    except ValueError:
        choices = ", ".join(s.value for s in KeySpec)
        raise InvalidInput(f"invalid key spec {_shown(spec)}; choose one of {choices}",
                           code="invalid_key_spec") from None


def check_usage(spec: KeySpec, usage: object | None) -> KeyUsage:
    allowed = USAGES[spec.family.name]
    if usage is None:
        return allowed[0]
    try:
        value = KeyUsage(str(usage))
    except ValueError:
        value = None
    if value not in allowed:
        choices = " or ".join(u.value for u in allowed)
        raise InvalidInput(
            f"key usage {_shown(usage)} does not fit a {spec.value} key; use {choices}",
            code="invalid_key_usage",
        )
    return value


def check_description(description: object) -> str:
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise InvalidInput(f"the description must be text of at most {MAX_DESCRIPTION} "
                           "characters", code="invalid_description")
    if not description.isprintable():
        raise InvalidInput("the description must be printable text", code="invalid_description")
    return description


def check_pending_days(days: object) -> int:
    if isinstance(days, bool) or not isinstance(days, int):
        raise InvalidInput(f"pending_days must be a whole number of days, got {_shown(days)}",
                           code="invalid_pending_days")
    if not PENDING_DAYS_MIN <= days <= PENDING_DAYS_MAX:
        raise InvalidInput(
            f"pending_days must be between {PENDING_DAYS_MIN} and {PENDING_DAYS_MAX}, got {days}",
            code="invalid_pending_days",
            fix=f"Choose a pending period of {PENDING_DAYS_MIN} to {PENDING_DAYS_MAX} days.",
        )
    return days


def check_rotation_days(days: object) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not (
        ROTATION_DAYS_MIN <= days <= ROTATION_DAYS_MAX
    ):
        raise InvalidInput(
            f"the rotation interval must be {ROTATION_DAYS_MIN}..{ROTATION_DAYS_MAX} days, "
            f"got {_shown(days)}", code="invalid_rotation_interval",
        )
    return days


def check_origin(origin: object) -> str:
    if origin not in ("kms", "external"):
        raise InvalidInput(f"invalid origin {_shown(origin)}: kms (generated in the HSM) or "
                           "external (import your own material)", code="invalid_origin")
    assert isinstance(origin, str)
    return origin


def check_length_bits(bits: object) -> int:
    if isinstance(bits, bool) or bits not in DATA_KEY_BITS:
        raise InvalidInput(
            f"the data key length must be 128, 256 or 512 bits, got {_shown(bits)}",
            code="invalid_datakey_length",
        )
    assert isinstance(bits, int)
    return bits


def check_plaintext(data: object) -> bytes:
    if not isinstance(data, bytes | bytearray):
        raise InvalidInput("the plaintext must be bytes", code="invalid_plaintext")
    if len(data) > MAX_DATA_BYTES:
        raise InvalidInput(
            f"encrypt-data takes at most {MAX_DATA_BYTES} bytes of plaintext, got {len(data)}",
            code="plaintext_too_large",
            fix="Use envelope encryption: create-datakey, encrypt locally, store the "
            "encrypted data key beside the data.",
        )
    return bytes(data)


def check_random_bytes(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= RANDOM_MAX_BYTES:
        raise InvalidInput(f"the number of random bytes must be 1..{RANDOM_MAX_BYTES}, got "
                           f"{_shown(n)}", code="invalid_random_length")
    return n


def check_context(context: object | None) -> dict[str, str]:
    """An encryption context: a flat string-to-string mapping (may be empty)."""
    if context is None:
        return {}
    if not isinstance(context, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise InvalidInput("the encryption context must map strings to strings",
                           code="invalid_encryption_context")
    if len(canonical_context(dict(context))) > MAX_CONTEXT_BYTES:
        raise InvalidInput(f"the encryption context is over {MAX_CONTEXT_BYTES} bytes",
                           code="invalid_encryption_context")
    return dict(context)


def decode_hex(name: str, text: object) -> bytes:
    if not isinstance(text, str):
        raise InvalidInput(f"{name} must be hexadecimal text", code="invalid_hex")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidInput(f"{name} is not valid hexadecimal", code="invalid_hex") from None


def decode_base64(name: str, text: object) -> bytes:
    if not isinstance(text, str):
        raise InvalidInput(f"{name} must be Base64 text", code="invalid_base64")
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{name} is not valid Base64", code="invalid_base64") from None


# --------------------------------------------------------------------------- tags, grants, pages

TAG_KEY_MAX = 128
TAG_VALUE_MAX = 255
TAGS_PER_KEY = 20
GRANTS_PER_KEY = 100
LIST_LIMIT_MAX = 1000
GRANT_LIST_MAX = 100
# The operations a grant can allow (Huawei's names, with dashes).
GRANT_OPERATIONS = (
    "create-datakey", "create-datakey-without-plaintext", "encrypt-datakey", "decrypt-datakey",
    "describe-key", "create-grant", "retire-grant", "encrypt-data", "decrypt-data",
)
GRANTEE_TYPES = ("user", "domain")
PRINCIPAL = re.compile(r"^[0-9a-f]{32}\Z")
GRANT_ID = re.compile(r"^[0-9a-f]{64}\Z")
MARKER = re.compile(r"^([0-9a-f]{1,15})\.([0-9a-f-]{36}|[0-9a-f]{64})\Z")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Specs the hosted service has and this one does not: a list filter on them finds nothing.
OTHER_SPECS = frozenset({"SM4", "SECP256K1", "SM2", "ED25519", "HMAC_SM3"})


def _field(name: str, problem: str, code: str) -> InvalidInput:
    return InvalidInput(f"{name}: {problem}", code=code, target=name)


def check_tag_key(key: object, name: str = "tag key") -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= TAG_KEY_MAX:
        raise _field(name, f"must be 1..{TAG_KEY_MAX} characters, got {_shown(key)}",
                     "invalid_tag")
    if not key.isprintable() or key != key.strip():
        raise _field(name, "must be printable text without leading or trailing spaces",
                     "invalid_tag")
    return key


def check_tag_value(value: object, name: str = "tag value") -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > TAG_VALUE_MAX:
        raise _field(name, f"must be text of 0..{TAG_VALUE_MAX} characters, got "
                     f"{_shown(value)}", "invalid_tag")
    if not value.isprintable():
        raise _field(name, "must be printable text", "invalid_tag")
    return value


def check_tags(tags: object, name: str = "tags") -> list[tuple[str, str]]:
    """A list of (key, value) pairs whose keys are all different."""
    if not isinstance(tags, list | tuple) or not tags:
        raise _field(name, "must be a non-empty list of (key, value) pairs", "invalid_tag")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in tags:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise _field(name, "each tag must be a (key, value) pair", "invalid_tag")
        key = check_tag_key(item[0], f"{name}.key")
        if key in seen:
            raise _field(name, f"the tag key {key!r} is given twice", "invalid_tag")
        seen.add(key)
        out.append((key, check_tag_value(item[1], f"{name}.value")))
    return out


def check_spec_filter(spec: object) -> str | None:
    """A list filter: None or ``ALL`` (every spec), a spec of ours, or one of the hosted
    service's that this one has not (it then finds nothing)."""
    if spec is None or spec == "ALL":
        return None
    if isinstance(spec, str) and spec in OTHER_SPECS:
        return spec
    return check_spec(spec).value


def check_limit(limit: object, high: int, name: str = "limit") -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= high:
        raise _field(name, f"must be 1..{high}, got {_shown(limit)}", "invalid_limit")
    return limit


def check_offset(offset: object, name: str = "offset") -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise _field(name, f"must be a whole number from 0, got {_shown(offset)}",
                     "invalid_offset")
    return offset


def check_principal(value: object, name: str) -> str:
    """An IAM user id or project id: 32 lower-case hexadecimal characters."""
    if not isinstance(value, str) or not PRINCIPAL.match(value):
        raise _field(name, f"must be 32 lower-case hexadecimal characters (an IAM user or "
                     f"project id), got {_shown(value)}", f"invalid_{name}")
    return value


def check_grantee_type(value: object) -> str:
    if value not in GRANTEE_TYPES:
        raise _field("grantee_principal_type", f"must be user or domain, got {_shown(value)}",
                     "invalid_grantee_principal_type")
    assert isinstance(value, str)
    return value


def check_operations(operations: object) -> list[str]:
    """A grant's operations: at least one, each from :data:`GRANT_OPERATIONS` (once)."""
    if isinstance(operations, str) or not isinstance(operations, list | tuple) or not operations:
        raise _field("operations", "must be a non-empty list of operations",
                     "invalid_operations")
    out: list[str] = []
    for op in operations:
        if op not in GRANT_OPERATIONS:
            raise _field("operations", f"unknown operation {_shown(op)}; choose from "
                         f"{', '.join(GRANT_OPERATIONS)}", "invalid_operations")
        if op not in out:
            out.append(op)
    return out


def check_grant_name(name: object) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not ALIAS.fullmatch(name):
        raise _field("name", f"must be 1-255 characters of letters, digits, ':', '/', '_' and "
                     f"'-', got {_shown(name)}", "invalid_grant_name")
    return name


def check_grant_id(grant_id: object) -> str:
    if not isinstance(grant_id, str) or not GRANT_ID.match(grant_id):
        raise _field("grant_id", f"must be 64 lower-case hexadecimal characters, got "
                     f"{_shown(grant_id)}", "invalid_grant_id")
    return grant_id


def page_marker(created: datetime, ident: str) -> str:
    """A paging marker: the position (creation time, id) of the last item shown, as
    ``<microseconds since the epoch, hex>.<id>`` (51 characters for a key)."""
    micros = (created - _EPOCH) // timedelta(microseconds=1)
    return f"{micros:x}.{ident}"


def read_marker(marker: object, name: str = "marker") -> tuple[str, str]:
    """The (creation time as stored, id) that a :func:`page_marker` names."""
    found = MARKER.match(marker) if isinstance(marker, str) else None
    if found is None:
        raise _field(name, "is not a marker this service returned", "invalid_marker")
    try:
        created = _EPOCH + timedelta(microseconds=int(found[1], 16))
    except OverflowError:
        raise _field(name, "is not a marker this service returned",
                     "invalid_marker") from None
    text = iso(created)
    assert text is not None
    return text, found[2]


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


# --------------------------------------------------------------------------- ciphertext


def padded_length(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def ciphertext_size(n: int) -> int:
    """The documented size: 124 + ceil(n/16)*16 bytes (before Base64)."""
    return HEADER_BYTES + padded_length(n) + TAG_BYTES


def canonical_context(context: Mapping[str, str]) -> bytes:
    if not context:
        return b""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def context_digest(context: Mapping[str, str]) -> bytes:
    if not context:
        return _EMPTY_CONTEXT_DIGEST
    return hashlib.sha256(canonical_context(context)).digest()[:CONTEXT_DIGEST_BYTES]


_EMPTY_CONTEXT_DIGEST = hashlib.sha256(b"").digest()[:CONTEXT_DIGEST_BYTES]


def pad(plaintext: bytes) -> bytes:
    return plaintext + bytes(padded_length(len(plaintext)) - len(plaintext))


class CipherHeader(NamedTuple):
    """The authenticated fields of a ciphertext (everything but IV and body).

    A NamedTuple, not a frozen dataclass: one is built for every data-plane call,
    and a frozen dataclass's ``__init__`` cost more than packing the bytes."""

    key_id: str
    key_version: int
    length: int
    purpose: Purpose
    context: bytes  # the 12-byte context digest
    algorithm: Algorithm = Algorithm.AES_256_GCM

    def aad_prefix(self) -> bytes:
        """Bytes 0..64: what the GCM tag authenticates besides the context."""
        key_id = self.key_id.encode("ascii")
        if len(key_id) != KEY_ID_BYTES or len(self.context) != CONTEXT_DIGEST_BYTES:
            raise ValueError("key id must be a 36-character UUID and the digest 12 bytes")
        return b"".join((_FIXED.pack(MAGIC, FORMAT_VERSION, self.algorithm, self.purpose, 0,
                                     self.key_version, self.length), key_id, self.context))

    def aad(self, context: Mapping[str, str]) -> bytes:
        prefix = self.aad_prefix()
        return prefix + canonical_context(context) if context else prefix


def pack_ciphertext(header: CipherHeader, iv: bytes, body: bytes, *,
                    prefix: bytes | None = None) -> bytes:
    """header || IV || header digest || body (ciphertext of the padded plaintext, then tag).

    ``prefix``: ``header.aad_prefix()`` when the caller has it already (it made the
    AAD from it)."""
    return pack_after_prefix(header.aad_prefix() if prefix is None else prefix,
                             header.length, iv, body)


def pack_after_prefix(prefix: bytes, length: int, iv: bytes, body: bytes) -> bytes:
    """:func:`pack_ciphertext` from the header's AAD prefix (bytes 0..64) and its
    plaintext length: what the data plane has in hand, without a header object."""
    if len(iv) != IV_BYTES:
        raise ValueError("the IV must be 12 bytes")
    if len(body) != -(-length // BLOCK) * BLOCK + TAG_BYTES:
        raise ValueError("the body does not match the plaintext length")
    head = prefix + iv
    return b"".join((head, _sha256(head).digest(), body))


_sha256 = hashlib.sha256


def _broken(cause: str) -> IntegrityCheckFailed:
    return IntegrityCheckFailed(
        "the ciphertext is damaged or truncated: integrity check failed",
        cause=cause,
        fix="Pass the ciphertext exactly as encrypt-data (or create-datakey) returned it.",
    )


_ALGORITHMS = {a.value: a for a in Algorithm}
_PURPOSES = {p.value: p for p in Purpose}


# Headers read before, by their first 64 bytes (what the GCM tag authenticates
# besides the context): the ciphertexts of one key, length and context share them,
# so a decrypt parses its header once, not per call. Only prefixes that passed every
# check of their own go in; what depends on the whole blob (its header digest, its
# length) and on the caller (the purpose) is checked on every call.
_HEADERS: dict[bytes, CipherHeader] = {}
HEADER_MEMO_MAX = 4096


def unpack_ciphertext(blob: bytes, purpose: Purpose) -> tuple[CipherHeader, bytes, bytes]:
    """(header, IV, body) of a ciphertext; refuses anything damaged before key lookup."""
    if blob.__class__ is not bytes:  # a bytearray's slices are no dict keys
        return _unpack(bytes(blob), purpose)
    header = _HEADERS.get(blob[:AAD_HEADER_BYTES])
    if (header is not None and header.purpose is purpose
            and len(blob) == ciphertext_size(header.length)
            and _sha256(blob[: HEADER_BYTES - 32]).digest() == blob[HEADER_BYTES - 32 :
                                                                     HEADER_BYTES]):
        return header, blob[64:76], blob[HEADER_BYTES:]
    header, iv, body = _unpack(blob, purpose)
    if len(_HEADERS) >= HEADER_MEMO_MAX:
        _HEADERS.clear()
    _HEADERS[blob[:AAD_HEADER_BYTES]] = header
    return header, iv, body


def _unpack(blob: bytes, purpose: Purpose) -> tuple[CipherHeader, bytes, bytes]:
    what = "data key" if purpose is Purpose.DATA_KEY else "ciphertext"
    if len(blob) < HEADER_BYTES + TAG_BYTES or blob[:4] != MAGIC:
        if len(blob) >= 4 and blob[:4] != MAGIC:
            raise InvalidInput(
                f"this is not a KMS {what} (it does not start with the format's magic bytes)",
                code="invalid_ciphertext",
                fix="Pass the ciphertext exactly as encrypt-data (or create-datakey) "
                "returned it.",
            )
        raise _broken(f"{len(blob)} bytes, less than the {HEADER_BYTES + TAG_BYTES} of an "
                      "empty ciphertext")
    head = blob[: HEADER_BYTES - 32]
    if hashlib.sha256(head).digest() != blob[HEADER_BYTES - 32 : HEADER_BYTES]:
        raise _broken("the header digest does not match the header")
    _, version, algorithm, kind, flags, key_version, length = _FIXED.unpack_from(blob)
    if version != FORMAT_VERSION or flags != 0:
        raise InvalidInput(f"unsupported ciphertext format version {version}",
                           code="invalid_ciphertext")
    algo = _ALGORITHMS.get(algorithm)
    if algo is None:
        raise InvalidInput(f"unsupported ciphertext algorithm {algorithm}",
                           code="invalid_ciphertext")
    if kind != purpose:
        other = "data key" if kind == Purpose.DATA_KEY else "encrypt-data ciphertext"
        raise InvalidInput(
            f"this is a {other}, not a {what}",
            code="invalid_ciphertext",
            fix="Use decrypt-datakey for data keys and decrypt-data for encrypt-data output.",
        )
    if length > MAX_DATA_BYTES or len(blob) != ciphertext_size(length):
        raise _broken(f"{len(blob)} bytes, but a {length}-byte plaintext gives "
                      f"{ciphertext_size(length)}")
    try:
        key_id = blob[16:52].decode("ascii")
    except UnicodeDecodeError:
        raise _broken("the key id is not text") from None
    if not is_key_id(key_id):
        raise _broken("the key id is not a UUID")
    header = CipherHeader(key_id, key_version, length, _PURPOSES[kind], blob[52:64], algo)
    return header, blob[64:76], blob[HEADER_BYTES:]


def unpad(header: CipherHeader, padded: bytes) -> bytes:
    if len(padded) == header.length:
        return padded  # a multiple of 16 bytes (every data key): no padding
    plaintext, padding = padded[: header.length], padded[header.length :]
    if len(plaintext) != header.length or any(padding):
        raise _broken("the padding is not what encrypt-data writes")
    return plaintext


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
