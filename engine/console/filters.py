"""A list page's filters, read from its query string: pure functions.

A filter with a bad value is not applied: the page says which filter is wrong
and why, and shows the unfiltered list (every filter dropped, so what is shown
is never a half-filtered list that looks whole).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

NAME = re.compile(r"[A-Za-z0-9_.:@/-]{1,200}")
MAX_TEXT = 253
TIME_EXAMPLE = "2026-12-01T10:00:00Z"


class BadFilter(ValueError):
    pass


@dataclass
class Filters:
    """The filters a page applies (by query name) and the one it refused, if any."""

    values: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    given: dict[str, str] = field(default_factory=dict)  # the form shows what was typed

    def __getitem__(self, name: str) -> Any:
        return self.values.get(name)

    @property
    def active(self) -> bool:
        return any(v is not None for v in self.values.values())


def text(value: str) -> str:
    if len(value) > MAX_TEXT or any(ord(c) < 32 for c in value):
        raise BadFilter(f"must be at most {MAX_TEXT} printable characters")
    return value


def name(value: str) -> str:
    if not NAME.fullmatch(value):
        raise BadFilter("must be a name such as kps.bind (letters, digits, '_.:@/-')")
    return value


def time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadFilter(f"must be a time such as {TIME_EXAMPLE} (ISO 8601, UTC when it "
                        "names no offset)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def choice(*allowed: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in allowed:
            raise BadFilter(f"must be one of {', '.join(allowed)}")
        return value

    return check


def read(query: Mapping[str, str], spec: Mapping[str, Callable[[str], Any]]) -> Filters:
    """The filters of ``spec`` (query name -> parser) from ``query``. An empty value is
    no filter; the first bad one drops them all (see the module's docstring)."""
    out = Filters(given={k: query.get(k, "") for k in spec})
    for key, parse in spec.items():
        raw = query.get(key, "")
        if raw == "":
            out.values[key] = None
            continue
        try:
            out.values[key] = parse(raw)
        except BadFilter as exc:
            return Filters({k: None for k in spec}, f"The filter {key!r} {exc}: showing the "
                           "unfiltered list.", out.given)
    since, until = out.values.get("since"), out.values.get("until")
    if isinstance(since, datetime) and isinstance(until, datetime) and since > until:
        return Filters({k: None for k in spec}, "The filter 'since' is after 'until': "
                       "showing the unfiltered list.", out.given)
    return out


def iso_z(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace(
        "+00:00", "Z")


def created_within(item: Mapping[str, Any], key: str, since: datetime | None,
                   until: datetime | None) -> bool:
    """Whether ``item[key]`` (an ISO time) is within [since, until]."""
    if since is None and until is None:
        return True
    value = item.get(key)
    if not value:
        return False
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (since is None or moment >= since) and (until is None or moment <= until)
