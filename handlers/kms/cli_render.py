"""How ``dew kms`` / ``dew audit`` show results: text tables (times as the JSON has
them, ISO 8601 UTC; booleans yes/no), ``--out`` summaries, and a progress line for a
slow step on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TextIO, TypeVar

from engine.cli_output import lines as key_values
from engine.cli_output import text

T = TypeVar("T")
PROGRESS_DELAY = 0.5  # seconds: a call slower than this says what it is doing
WRAPPING_KEY_PROGRESS = "making the 4096-bit wrapping key (first time only, ~10 s)..."


class Shown(NamedTuple):
    """What a verb prints (``data`` as JSON, or ``human(data)``) and its exit code."""

    data: Any
    human: Callable[[Any], str] = key_values
    status: int = 0


def written(data: dict[str, Any], payload: str, path: str, size: int, summary: str) -> Shown:
    """A result whose ``payload`` field went to ``--out``: the JSON without it (plus
    ``out`` and ``bytes``), the text only the one-line summary."""
    shown = {k: v for k, v in data.items() if k != payload}
    shown.update(out=path, bytes=size)
    return Shown(shown, lambda _: summary)


async def announce_if_slow(call: Awaitable[T], message: str, stream: TextIO | None = None,
                           delay: float = PROGRESS_DELAY) -> T:
    """Await ``call``; on a terminal, print ``message`` once if it is still running
    after ``delay`` seconds. Never on a pipe or a file (scripts see no noise)."""
    out = sys.stderr if stream is None else stream
    if not _is_terminal(out):
        return await call
    import asyncio  # here: every `dew kms` start would pay for it (~30 ms), the API path too

    async def later() -> None:
        await asyncio.sleep(delay)
        out.write(message + "\n")
        out.flush()

    timer = asyncio.create_task(later())
    try:
        return await call
    finally:
        timer.cancel()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def public_key_text(data: dict[str, Any]) -> str:
    return str(data["public_key"]).rstrip("\n")


def key_table(keys: list[dict[str, Any]]) -> str:
    if not keys:
        return "no keys"
    lines = [f"{'KEY ID':36}  {'ALIAS':24} {'SPEC':9} {'STATE':16} {'DEFAULT':7}  DELETION DATE"]
    for k in keys:
        lines.append(
            f"{k['key_id']:36}  {cut(k['key_alias'], 24):24} {k['key_spec']:9} "
            f"{k['key_state']:16} {text(k['default_key']):7}  "
            f"{text(k['scheduled_deletion_date'])}"
        )
    return "\n".join(lines)


def usage_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no uses recorded"
    lines = [f"{'DAY':10}  {'PROJECT':12} {'KEY ID':36}  {'ALIAS':24} {'USES':>9}"]
    for r in rows:
        lines.append(f"{r['day']:10}  {cut(r['account'], 12):12} {r['key_id']:36}  "
                     f"{cut(r['key_alias'], 24):24} {r['count']:>9}")
    return "\n".join(lines)


def tag_lines(tags: list[dict[str, Any]]) -> str:
    return "\n".join(f"{t['key']}={t['value']}" for t in tags) if tags else "no tags"


def grant_table(grants: list[dict[str, Any]]) -> str:
    if not grants:
        return "no grants"
    lines = [f"{'GRANT ID':64}  {'GRANTEE':32} {'TYPE':6}  OPERATIONS"]
    for g in grants:
        lines.append(f"{g['grant_id']:64}  {g['grantee_principal']:32} "
                     f"{g['grantee_principal_type']:6}  {','.join(g['operations'])}")
    return "\n".join(lines)


def quota_table(quotas: list[dict[str, Any]]) -> str:
    return "\n".join(f"{q['type']}: {q['used']} of {q['quota']}" for q in quotas)


def audit_table(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "no audit entries"
    lines = [f"{'SEQ':>6}  {'TIME (UTC)':32}  {'PROJECT':12} {'OPERATION':32} {'OUTCOME':9} "
             f"{'KEY':36}  ACTOR"]
    for e in entries:
        lines.append(
            f"{e['seq']:>6}  {e['time']:32}  {cut(e['account'], 12):12} "
            f"{e['operation']:32} {e['outcome']:9} {text(e['key_id'])[:36]:36}  {e['actor']}"
            + subject(e.get("detail"))
        )
    return "\n".join(lines)


def subject(detail: Any) -> str:
    """A secret read's secret and version, after the actor."""
    if not isinstance(detail, dict) or "secret" not in detail:
        return ""
    return f"  secret {detail['secret']} {detail.get('version') or '-'}"


def verdict(v: dict[str, Any]) -> str:
    if v["intact"]:
        shown = f"audit chain intact: {v['entries']} entries"
        if v.get("sealed_through"):
            shown += f", sealed in the HSM through entry {v['sealed_through']}"
        if v.get("unsealed"):
            shown += f"; the newest {v['unsealed']} not sealed yet"
        return shown
    where = "" if v["first_broken_seq"] is None else f" at seq {v['first_broken_seq']}"
    return f"audit chain BROKEN{where}: {v['reason']}"


def cut(value: str, width: int) -> str:
    return value if len(value) <= width else value[: width - 1] + "…"
