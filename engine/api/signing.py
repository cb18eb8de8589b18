"""AK/SK request signatures as the official SDKs make them: ``SDK-HMAC-SHA256``.

Pure functions, no I/O (HUAWEI_API.md §3). The server gives the request as it
came off the wire (:class:`SignedRequest`: the raw request target, the header
values as UTF-8 text, the body bytes) and the caller's secret key; a refusal is
an :class:`~engine.errors.AuthenticationFailed` whose message names the check
that failed, never whether an access key exists.

    canonical request = METHOD, URI, QUERY, HEADERS, SIGNED-HEADERS, hex(sha256(body))
                        (joined by newlines)
    string to sign    = "SDK-HMAC-SHA256", X-Sdk-Date, hex(sha256(canonical request))
    signature         = hex(HMAC-SHA256(SK, string to sign))
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote

from engine.errors import AuthenticationFailed

ALGORITHM = "SDK-HMAC-SHA256"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
DATE_HEADER = "x-sdk-date"
REQUIRED_SIGNED = ("host", DATE_HEADER)
# The product's words for every refused authentication (PRODUCT.md, APIGW.0301).
PREFIX = "Incorrect IAM authentication information: "

_AUTH = re.compile(
    r"(?P<algorithm>[A-Za-z0-9-]+) +Access=(?P<access>[^\s,]+), *"
    r"SignedHeaders=(?P<signed>[^\s,]+), *Signature=(?P<signature>[0-9a-fA-F]{64})"
)
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")


def refused(check: str) -> AuthenticationFailed:
    """The 401 of one failed check: ``refused("signature does not match")``."""
    return AuthenticationFailed(PREFIX + check, code="authentication_failed")


@dataclass(frozen=True)
class Authorization:
    """The parsed ``Authorization`` header."""

    access_key: str
    signed_headers: tuple[str, ...]  # lowercased, as the client listed them
    signature: str  # 64 lowercase hex digits


@dataclass(frozen=True)
class SignedRequest:
    """A request as it came off the wire."""

    method: str
    raw_path: str  # the request target's path, still percent-encoded
    raw_query: str  # the request target's query, without '?'
    headers: Mapping[str, str]  # lowercased names; values decoded as UTF-8
    body: bytes


def parse_authorization(value: str | None) -> Authorization:
    if value is None or not value.strip():
        raise refused("missing Authorization header")
    match = _AUTH.fullmatch(value.strip())
    if match is None:
        raise refused("malformed Authorization header")
    if match["algorithm"] != ALGORITHM:
        raise refused(f"unsupported signing algorithm {match['algorithm'][:40]}; "
                      f"use {ALGORITHM}")
    signed = tuple(match["signed"].split(";"))
    if not all(_HEADER_NAME.fullmatch(name) for name in signed):
        raise refused("malformed Authorization header")
    for required in REQUIRED_SIGNED:
        if required not in signed:
            raise refused(f"the signature must cover the {required} header")
    return Authorization(match["access"], signed, match["signature"].lower())


def request_time(value: str | None) -> datetime:
    """X-Sdk-Date as an aware UTC datetime."""
    if value is None:
        raise refused("missing X-Sdk-Date header")
    text = value.strip()
    try:
        if not _DATE.fullmatch(text):
            raise ValueError(text)
        return datetime.strptime(text, DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise refused("malformed X-Sdk-Date header (want YYYYMMDDTHHMMSSZ)") from None


def check_date(value: str | None, now: datetime, clock_skew: float) -> datetime:
    """The request's X-Sdk-Date, if within ``clock_skew`` seconds of ``now``."""
    when = request_time(value)
    away = abs((now - when).total_seconds())
    if away > clock_skew:
        raise refused(f"X-Sdk-Date is {int(away)} s away from the server clock "
                      f"(at most {int(clock_skew)} s allowed)")
    return when


def canonical_uri(raw_path: str) -> str:
    """Percent-decode, split on '/', encode each segment (safe '~'), end with '/'.

    The raw path is decoded first, so a ``%2F`` inside a parameter is signed as
    '/', as the SDK signs it."""
    uri = "/".join(quote(segment, safe="~") for segment in unquote(raw_path).split("/"))
    return uri if uri.endswith("/") else uri + "/"


def query_pairs(raw_query: str) -> list[tuple[str, str]]:
    """The query's (key, value) pairs, percent-decoded ('+' stays '+': the SDK
    encodes a space as %20), empty values kept."""
    pairs = []
    for part in raw_query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        pairs.append((unquote(key), unquote(value)))
    return pairs


def canonical_query(raw_query: str) -> str:
    return "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}"
                    for k, v in sorted(query_pairs(raw_query)))


def canonical_request(request: SignedRequest, signed_headers: tuple[str, ...]) -> str:
    names = sorted(signed_headers)
    lines = []
    for name in names:
        value = request.headers.get(name)
        if value is None:
            raise refused(f"the signed header {name} is missing")
        lines.append(f"{name}:{value.strip()}\n")
    return "\n".join([
        request.method.upper(),
        canonical_uri(request.raw_path),
        canonical_query(request.raw_query),
        "".join(lines),
        ";".join(names),
        hashlib.sha256(request.body).hexdigest(),
    ])


def string_to_sign(date: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{date}\n{digest}"


def signature(secret_key: bytes, text: str) -> str:
    return hmac.new(secret_key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def verify(request: SignedRequest, auth: Authorization, secret_key: bytes) -> None:
    """AuthenticationFailed unless ``auth.signature`` signs ``request`` with ``secret_key``.

    The date is the X-Sdk-Date header as sent (its freshness is :func:`check_date`'s)."""
    date = request.headers.get(DATE_HEADER, "").strip()
    expected = signature(secret_key, string_to_sign(date, canonical_request(
        request, auth.signed_headers)))
    if not hmac.compare_digest(expected, auth.signature):
        raise refused("signature does not match")


def sign(request: SignedRequest, access_key: str, secret_key: bytes,
         signed_headers: tuple[str, ...]) -> str:
    """The Authorization value for ``request`` (for tests and tools; the SDK's own
    signer is what clients use)."""
    names = tuple(sorted(signed_headers))
    date = request.headers.get(DATE_HEADER, "").strip()
    value = signature(secret_key, string_to_sign(date, canonical_request(request, names)))
    return f"{ALGORITHM} Access={access_key}, SignedHeaders={';'.join(names)}, Signature={value}"
