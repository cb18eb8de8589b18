"""``sshd_config`` edits as pure text transforms (sans-I/O).

sshd keeps the *first* value it reads for a keyword (outside ``Match``
blocks), and ``Include`` pulls other files in where it stands (Debian 12 has
``Include /etc/ssh/sshd_config.d/*.conf`` on its first lines). So a setting is
changed in place only when its first global occurrence comes before any
``Include`` and ``Match``; otherwise our line is inserted before the first
directive of the file, where it wins. Every other line is kept byte for byte,
and a text that already says what we want is returned unchanged.
"""

from __future__ import annotations

import re

_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)(?P<key>[A-Za-z]+)(?P<sep>[ \t]*=?[ \t]*)"
                        r"(?P<value>[^\r\n]*?)(?P<tail>[ \t]*(?:\r?\n)?)$")
# Password login through PAM's keyboard-interactive is still a password: manage both
# (ChallengeResponseAuthentication is the old name of KbdInteractiveAuthentication).
PASSWORD_KEYWORDS = ("PasswordAuthentication", "KbdInteractiveAuthentication")


def _parse(line: str) -> tuple[str, str] | None:
    if line.lstrip().startswith("#"):
        return None
    m = _DIRECTIVE.match(line)
    if not m or (not m.group("value") and not m.group("sep")):
        return None
    return m.group("key").lower(), m.group("value").strip()


def effective(text: str, keyword: str) -> str | None:
    """The value sshd takes for ``keyword`` from this file alone (first global one)."""
    for line in text.splitlines():
        parsed = _parse(line)
        if parsed is None:
            continue
        key, value = parsed
        if key == "match":
            return None
        if key == keyword.lower():
            return value.split()[0].lower() if value else ""
    return None


def set_option(text: str, keyword: str, value: str) -> str:
    """``text`` with ``keyword`` taking ``value`` (the first global occurrence wins)."""
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if text.endswith("\r\n") else "\n"
    first_directive = None
    for i, line in enumerate(lines):
        parsed = _parse(line)
        if parsed is None:
            continue
        key, current = parsed
        if first_directive is None:
            first_directive = i
        if key in ("include", "match"):
            break
        if key == keyword.lower():
            if current.split()[:1] == [value] or current.lower().split()[:1] == [value.lower()]:
                return text
            m = _DIRECTIVE.match(line)
            assert m is not None
            lines[i] = (f"{m.group('indent')}{m.group('key')}{m.group('sep') or ' '}{value}"
                        f"{m.group('tail')}")
            return "".join(lines)
    ours = f"{keyword} {value}{newline}"
    if first_directive is None:
        if text and not text.endswith(("\n", "\r")):
            return text + newline + ours
        return text + ours
    lines.insert(first_directive, ours)
    return "".join(lines)


def set_password_login(text: str, enabled: bool, suse: bool = False) -> str:
    """Turn password login on or off (SUSE: ``UsePAM`` too, as the product says).

    Off sets ``PasswordAuthentication no`` and ``KbdInteractiveAuthentication no``;
    on sets ``PasswordAuthentication yes`` and leaves keyboard-interactive as it is.
    """
    if enabled:
        text = set_option(text, "PasswordAuthentication", "yes")
        return set_option(text, "UsePAM", "yes") if suse else text
    for keyword in PASSWORD_KEYWORDS:
        text = set_option(text, keyword, "no")
    return set_option(text, "UsePAM", "no") if suse else text


def password_login_enabled(text: str) -> bool:
    """Whether this file leaves password login on (sshd's default is yes)."""
    return effective(text, "PasswordAuthentication") in (None, "yes")


# --------------------------------------------------------------------------- sshd -T


def connection_spec(user: str, ssh_connection: str) -> str | None:
    """``sshd -T -C`` connection spec for this session, from ``$SSH_CONNECTION``
    (``client_ip client_port server_ip server_port``); None when it is not there."""
    fields = ssh_connection.split()
    if len(fields) != 4 or not all(fields) or "," in ssh_connection:
        return None
    client, _, server, port = fields
    return f"user={user},host={client},addr={client},laddr={server},lport={port}"


def parse_effective(text: str) -> dict[str, str]:
    """``sshd -T`` output as keyword (lower case) -> value (the first line of each)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key and key.lower() not in out:
            out[key.lower()] = value.strip()
    return out


def effective_password_login(options: dict[str, str]) -> bool | None:
    """Whether sshd's effective options let a password in (password or
    keyboard-interactive); None when the output does not say."""
    password = options.get("passwordauthentication")
    kbdint = options.get("kbdinteractiveauthentication",
                         options.get("challengeresponseauthentication"))
    if password is None:
        return None
    return password.lower() == "yes" or (kbdint or "no").lower() == "yes"


def password_methods(methods: set[str]) -> set[str]:
    """The password-like methods among those a server offers."""
    return methods & {"password", "keyboard-interactive", "none"}
