"""``authorized_keys`` edits as pure text transforms (sans-I/O).

A key is identified by its type and Base64 blob, never by its comment or
options: ``ssh-ed25519 AAAA... alice`` and ``from="10.0.0.1" ssh-ed25519 AAAA... bob``
are the same key. Adding a key that is present returns the text unchanged;
removing a key drops exactly the lines holding it and keeps every other byte
(line endings, comments, blank lines, a missing final newline) as it was.
"""

from __future__ import annotations

import base64
import binascii

from handlers.kps.keys import PublicKey

# Key types sshd knows in authorized_keys (certificates and security keys included).
_TYPE_PREFIXES = ("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-sha2-")


def _tokens(line: str) -> list[str]:
    """Whitespace-separated fields, where a double-quoted option value may hold spaces."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for ch in line:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            current.append(ch)
            quoted = not quoted
        elif ch in " \t" and not quoted:
            if current:
                out.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        out.append("".join(current))
    return out


def key_of_line(line: str) -> tuple[str, bytes] | None:
    """(type, blob) of the key on one line, or None for comments, blanks and junk."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    tokens = _tokens(text)
    # Either "type blob [comment]" or "options type blob [comment]".
    for start in (0, 1):
        if len(tokens) >= start + 2 and tokens[start].startswith(_TYPE_PREFIXES):
            try:
                blob = base64.b64decode(tokens[start + 1], validate=True)
            except (binascii.Error, ValueError):
                return None
            return tokens[start], blob
    return None


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def count_key(text: str, key: PublicKey) -> int:
    """How many lines hold ``key``."""
    return sum(1 for line in _lines(text) if key_of_line(line) == (key.key_type, key.blob))


def has_key(text: str, key: PublicKey) -> bool:
    return count_key(text, key) > 0


def add_key(text: str, key: PublicKey, comment: str | None = None) -> str:
    """``text`` with ``key`` appended on its own line, unless it is already there."""
    if has_key(text, key):
        return text
    newline = "\r\n" if text.endswith("\r\n") else "\n"
    if text and not text.endswith(("\n", "\r")):
        text += newline
    return text + key.openssh(comment) + newline


def remove_key(text: str, key: PublicKey) -> str:
    """``text`` without the lines holding ``key``; every other line byte for byte."""
    target = (key.key_type, key.blob)
    return "".join(line for line in _lines(text) if key_of_line(line) != target)


def replace_key(text: str, old: PublicKey, new: PublicKey, comment: str | None = None) -> str:
    """Add ``new`` first, then remove ``old`` (the same key twice changes nothing)."""
    if old.blob == new.blob:
        return add_key(text, new, comment)
    return remove_key(add_key(text, new, comment), old)


def removed_keys(old: str, new: str) -> int:
    """How many distinct keys of ``old`` are no longer in ``new``."""
    def keys(text: str) -> set[tuple[str, bytes]]:
        return {k for line in _lines(text) if (k := key_of_line(line)) is not None}
    return len(keys(old) - keys(new))
