"""The pure parts: authorized_keys and sshd_config transforms, os-release (no I/O)."""

from __future__ import annotations

import pytest

from handlers.kps import authorized_keys as ak
from handlers.kps import keys as ssh_keys
from handlers.kps.os_release import default_reload_command, parse_os_release
from handlers.kps.sshd_config import effective, password_login_enabled, set_password_login


def _key(comment: str = "", seed: int = 0) -> ssh_keys.PublicKey:
    # Fixed seeds: the keys appear in parametrized test ids, which must be the same in
    # every collecting process (pytest-xdist).
    return ssh_keys.public_key_of(
        ssh_keys.generate_private_key("SSH_ED25519", bytes([seed]) * 96), comment)


K, OTHER = _key("k", 1), _key("other", 2)
FILES = [
    "",
    "\n",
    "# only a comment",
    "# c\r\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 junk\r\n",
    f"{OTHER.openssh()}\n\n# note\n",
    f"{OTHER.openssh()}",
    f'command="echo hi there",no-pty {OTHER.openssh()}\n   \n\tgarbage line\n',
    f"{OTHER.openssh()}\n{OTHER.openssh()}\n",
    "\n\n\n# trailing blank lines\n\n",
]


@pytest.mark.parametrize("text", FILES)
def test_add_is_idempotent_and_remove_restores(text: str) -> None:
    added = ak.add_key(text, K, "k")
    assert ak.count_key(added, K) == 1
    assert ak.add_key(added, K, "k") == added  # twice: once
    assert added.startswith(text)  # nothing before it changed
    removed = ak.remove_key(added, K)
    expected = text if not text or text.endswith("\n") else text + "\n"
    assert removed == expected
    assert ak.remove_key(text, K) == text  # removing an absent key changes nothing


@pytest.mark.parametrize("text", FILES)
def test_remove_keeps_every_other_line_byte_for_byte(text: str) -> None:
    variants = [K.openssh(), K.openssh("other comment"), f'from="10.0.0.1" {K.openssh()}',
                f'command="a b \\" c" {K.openssh("x")}\r']
    for variant in variants:
        placements = [variant + "\n" + text]
        if text.endswith("\n"):
            placements.append(text + variant + "\n")
        for mixed in placements:
            assert ak.has_key(mixed, K)
            assert ak.remove_key(mixed, K) == text


def test_same_key_other_comment_is_not_added_twice() -> None:
    text = K.openssh("a comment someone else wrote") + "\n"
    assert ak.add_key(text, K, "k") == text


def test_replace_key() -> None:
    text = f"# x\n{OTHER.openssh()}\n"
    new = _key("new")
    replaced = ak.replace_key(text, OTHER, new, "new")
    assert ak.has_key(replaced, new) and not ak.has_key(replaced, OTHER)
    assert replaced.startswith("# x\n")
    assert ak.replace_key(replaced, OTHER, new) == replaced


def test_crlf_file_keeps_crlf() -> None:
    text = f"{OTHER.openssh()}\r\n"
    assert ak.add_key(text, K) == text + K.openssh() + "\r\n"


DEBIAN = ("Include /etc/ssh/sshd_config.d/*.conf\n\n#PasswordAuthentication yes\n"
          "KbdInteractiveAuthentication no\nUsePAM yes\nX11Forwarding yes\n"
          "Match User backup\n    PasswordAuthentication yes\n")


@pytest.mark.parametrize("text", [
    "", "Port 22\n", "PasswordAuthentication yes\n", "passwordauthentication=yes\nPort 22",
    DEBIAN, "# comment\n\nPasswordAuthentication no\nPasswordAuthentication yes\n",
    "Port 22\r\nPasswordAuthentication  yes\r\n",
])
def test_password_login_switch(text: str) -> None:
    off = set_password_login(text, False)
    assert not password_login_enabled(off)
    assert effective(off, "KbdInteractiveAuthentication") == "no"
    assert set_password_login(off, False) == off  # idempotent
    on = set_password_login(off, True)
    assert password_login_enabled(on)
    assert set_password_login(on, True) == on
    # Lines we did not need are untouched (Match blocks included).
    for line in text.splitlines():
        if "assword" not in line.split("#")[0] and "bdInteractive" not in line:
            assert line in off.splitlines()


def test_password_switch_beats_include_and_keeps_match() -> None:
    off = set_password_login(DEBIAN, False)
    first = next(ln for ln in off.splitlines() if ln and not ln.startswith("#"))
    assert first.startswith(("PasswordAuthentication no", "KbdInteractiveAuthentication no"))
    assert "Match User backup\n    PasswordAuthentication yes\n" in off


def test_suse_also_turns_pam_off() -> None:
    off = set_password_login("UsePAM yes\n", False, suse=True)
    assert effective(off, "UsePAM") == "no"
    assert effective(set_password_login(off, True, suse=True), "UsePAM") == "yes"


@pytest.mark.parametrize(("text", "supported", "reload"), [
    ('ID=debian\nVERSION_ID="12"\n', True, "systemctl reload ssh"),
    ('ID=ubuntu\nVERSION_ID="14.04"\n', True, "service ssh restart"),
    ('ID="centos"\nVERSION_ID="7"\n', True, "systemctl reload sshd"),
    ('ID="sles"\nVERSION_ID="15"\n', True, "systemctl reload sshd"),
    ("ID=alpine\n", False, "systemctl reload sshd"),
    ("", False, "systemctl reload sshd"),
])
def test_os_release(text: str, supported: bool, reload: str) -> None:
    info = parse_os_release(text)
    assert info.supported is supported
    assert default_reload_command(info, True) == reload


# --------------------------------------------------------------------------- trust decisions


def test_password_off_needs_a_key_the_engine_can_log_in_with() -> None:
    from handlers.kps.service import password_off_refusal, unproven_removal

    assert password_off_refusal("bind", False, False, "k") is not None
    assert password_off_refusal("reset", False, False, "k") is not None
    assert password_off_refusal("bind", False, True, "k") is None
    assert password_off_refusal("bind", None, False, "k") is None
    assert password_off_refusal("unbind", True, False, "k") is None
    assert unproven_removal("replace", False, True)
    assert not unproven_removal("replace", True, True)
    assert not unproven_removal("bind", False, False)


def test_restore_order_is_last_first_and_skips_no_ops() -> None:
    from handlers.kps.service import Edit, restore_order
    from handlers.kps.ssh import RemoteFile

    keys = RemoteFile("/h/.ssh/ak", "/h/central/ak", b"old", True, True)
    config = RemoteFile("/etc/ssh/sshd_config", "/etc/ssh/sshd_config", b"c", True, True)
    same = RemoteFile("/x", "/x", b"same", True, True)
    edits = [Edit(config, b"c2", True, True), Edit(keys, b"new", False, False),
             Edit(same, b"same", False, False)]
    assert [e.file.real for e in restore_order(edits)] == ["/h/central/ak",
                                                          "/etc/ssh/sshd_config"]


def test_sshd_effective_configuration() -> None:
    from handlers.kps.sshd_config import (
        connection_spec,
        effective_password_login,
        parse_effective,
        password_methods,
    )

    assert connection_spec("alice", "10.0.0.9 51234 10.0.0.5 22") == (
        "user=alice,host=10.0.0.9,addr=10.0.0.9,laddr=10.0.0.5,lport=22")
    assert connection_spec("alice", "") is None
    out = "port 22\npasswordauthentication no\nkbdinteractiveauthentication no\n"
    assert effective_password_login(parse_effective(out)) is False
    assert effective_password_login(parse_effective(out.replace("tion no\nkbd",
                                                                "tion yes\nkbd"))) is True
    assert effective_password_login(parse_effective(
        "passwordauthentication no\nkbdinteractiveauthentication yes\n")) is True
    assert effective_password_login({}) is None
    assert password_methods({"publickey"}) == set()
    assert password_methods({"publickey", "password"}) == {"password"}


def test_paths_and_removed_keys() -> None:
    from handlers.kps.ssh import _parse_files, absolute

    assert absolute("~/.ssh/authorized_keys", "/home/a") == "/home/a/.ssh/authorized_keys"
    assert absolute(".ssh/k", "/home/a/") == "/home/a/.ssh/k"
    assert absolute("/etc/ssh/sshd_config", "/home/a") == "/etc/ssh/sshd_config"
    text = f"{K.openssh()}\n{OTHER.openssh()}\n"
    assert ak.removed_keys(text, ak.remove_key(text, K)) == 1
    assert ak.removed_keys(text, text + "# x\n") == 0
    out = b"1 1 /real/a b\nhello\n\nM\n0 0 /b\n\nM\n0 R /c\n\nM\n"
    files = _parse_files(["/a", "/b", "/c"], out, "M")
    assert files is not None
    assert [(f.real, f.content, f.readable, f.writable) for f in files] == [
        ("/real/a b", b"hello\n", True, True), ("/b", None, True, False),
        ("/c", None, False, False)]
