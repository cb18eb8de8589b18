"""Keyed seals over the audit chain, and the anchor of its head outside the database.

The audit chain itself is SHA-256 (``handlers.kms.store.entry_hash``): anyone
who can write the database could recompute it. So every append batch is
*sealed*: an HMAC-SHA-256, made in the token with a key that never leaves it
(``kms:audit-hmac``, generated on first use, sensitive, not extractable), over
the batch's last ``(seq, hash)``. Because each hash covers the one before, a
valid seal of entry n authenticates entries 1..n, old unkeyed ones included.

The newest seal is also written to an *anchor* file beside the database
(``<db>.kms-audit-anchor``, mode 0600, replaced atomically: temporary file,
fsync, rename, fsync of the directory; it only ever moves forward). Deleting the
newest entries and rewriting ``audit_head`` then no longer passes: the anchor
names an entry the log no longer has.

Several nodes (``[store] url``: one PostgreSQL database). The anchor is a file of
the node, not of the database: ``STATE_DIR/dew.sqlite3.kms-audit-anchor``, the
SQLite file's name serving only as the base of node-local files. Each node anchors
the newest batch *it* sealed, so when other nodes appended since, a node's anchor
names an older entry of the one chain, and that is no sign of tampering. What
``verify_audit`` on a node checks of that node's anchor, and reports:

- made with this token's audit key, else forged (or of another token); damaged;
- naming an entry the log still has, with the same hash (hence a valid seal):
  else the newest entries were deleted (the log ends before it) or rewritten;
- missing while the log has seals: on SQLite (one file, one machine, every sealed
  batch moved this anchor) it was deleted; on PostgreSQL the node has anchored
  nothing yet, and the seals alone are checked.

So a node's anchor vouches for the chain up to the newest entry that node wrote: a
cut of later entries is found on the nodes that wrote them (verify on each node,
or copy the anchors elsewhere). The nodes must seal with one key (the token they
share); another token's seals and anchors do not verify.

This module holds no crypto: the store gets an :class:`AuditKey` (the KMS core's
token key) and calls it. Pure functions: :func:`seal_message`,
:func:`parse_anchor`, :func:`format_anchor`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

AUDIT_KEY_LABEL = "kms:audit-hmac"
ANCHOR_SUFFIX = ".kms-audit-anchor"
_DOMAIN = b"dew-kms-audit-seal/v1\0"


class AuditKey(Protocol):
    """The HMAC key that seals the audit chain (in the token)."""

    def ready(self) -> bool:
        """True when sealing needs no HSM start-up (the token is open already)."""

    async def prepare(self) -> None:
        """Open the token and make sure the key exists (before a write transaction)."""

    async def mac(self, message: bytes) -> bytes: ...

    async def check(self, message: bytes, tag: bytes) -> bool: ...


class AnchorDamaged(ValueError):
    """The anchor file exists but is not an anchor."""


@dataclass(frozen=True)
class Anchor:
    """The newest sealed entry: its seq, its chain hash, and the seal (hex)."""

    seq: int
    hash: str
    mac: str


def seal_message(seq: int, entry_hash: str) -> bytes:
    """What a seal authenticates: entry ``seq`` and its chain hash."""
    return _DOMAIN + f"{seq}:{entry_hash}".encode("ascii")


def anchor_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ANCHOR_SUFFIX)


def format_anchor(anchor: Anchor) -> bytes:
    return (json.dumps({"seq": anchor.seq, "hash": anchor.hash, "mac": anchor.mac},
                       separators=(",", ":")) + "\n").encode("ascii")


def parse_anchor(data: bytes) -> Anchor:
    """An anchor from the file's bytes; AnchorDamaged if it is not one."""
    try:
        fields = json.loads(data.decode("ascii"))
        seq, digest, mac = fields["seq"], fields["hash"], fields["mac"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError):
        raise AnchorDamaged("not an audit anchor") from None
    if not (isinstance(seq, int) and not isinstance(seq, bool) and seq >= 1
            and _is_hex(digest, 64) and _is_hex(mac, 64)):
        raise AnchorDamaged("not an audit anchor")
    return Anchor(seq, digest, mac)


def read_anchor(path: Path) -> Anchor | None:
    """The anchor in ``path``; None when there is none; AnchorDamaged if unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AnchorDamaged(f"cannot read it: {exc.strerror}") from None
    return parse_anchor(data[:4096])


def write_anchor(path: Path, anchor: Anchor) -> bool:
    """Replace the anchor with ``anchor`` unless it already names a later entry
    (appends of several processes may finish out of order). Atomic and durable:
    a temporary file (0600), fsync, rename, fsync of the directory; serialised
    between processes by ``flock`` on ``<anchor>.lock``. True if written."""
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        with contextlib.suppress(AnchorDamaged):
            current = read_anchor(path)
            if current is not None and current.seq >= anchor.seq:
                return False
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, format_anchor(anchor))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True
    finally:
        os.close(lock_fd)  # releases the lock


def _is_hex(value: object, length: int) -> bool:
    return (isinstance(value, str) and len(value) == length
            and all(c in "0123456789abcdef" for c in value))
