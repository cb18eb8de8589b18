"""The console's HTML: Jinja2 templates with autoescape on, and the formats they use.

Every value reaches the page escaped (a key alias or an error message is text,
never markup). Times are shown in UTC, to the second.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


def when(value: Any) -> str:
    """An ISO time (or epoch seconds / milliseconds) as ``2026-05-01 10:00:00 UTC``."""
    if value in (None, "", 0):
        return "-"
    moment: datetime
    if isinstance(value, int | float):
        seconds = value / 1000 if value > 10**11 else value
        moment = datetime.fromtimestamp(seconds, UTC)
    else:
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pretty(value: Any) -> str:
    """A JSON value as indented text (already redacted by the operation)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)),
                      autoescape=select_autoescape(["html"], default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=when, pretty=pretty, cell=cell)
    return env


def stylesheet() -> bytes:
    return (STATIC / "console.css").read_bytes()
