"""``dew iam ...`` end to end, in subprocesses, on the shared SoftHSM token.

The built-in roles come from the test-only service in tests/engine/test_iam.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine.crypto import CryptoCore, HsmConfig
from engine.iam.service import Identities
from engine.settings import Settings
from tests.engine.test_iam import SERVICES
from tests.helpers import ROOT, dew_env, run_dew


@pytest.fixture
def iam_settings(settings: Settings) -> Settings:
    return settings.replace(engine={"services": SERVICES})


def dew(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return run_dew(settings, "iam", *args)


def dew_json(settings: Settings, *args: str) -> Any:
    done = dew(settings, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def refused(settings: Settings, *args: str) -> str:
    """The one line of a call refused as bad input (exit 2)."""
    done = dew(settings, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def in_conflict(settings: Settings, *args: str) -> str:
    """The error line of a call refused by the state (a name taken, a role held: exit 1,
    docs/cli.md), which also says what to do."""
    done = dew(settings, *args)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) in (1, 2), done.stderr
    return lines[0]


@pytest.fixture
async def core(hsm_config: HsmConfig) -> AsyncIterator[CryptoCore]:
    async with CryptoCore(hsm_config) as c:
        yield c


async def test_the_verbs_end_to_end(iam_settings: Settings, core: CryptoCore) -> None:
    s = iam_settings
    project = dew_json(s, "create-project", "acme")
    assert project["name"] == "acme" and len(project["project_id"]) == 32
    assert [p["name"] for p in dew_json(s, "list-projects")] == ["acme", "default"]

    user = dew_json(s, "create-user", "alice", "--project", project["project_id"],
                    "--role", "Test Reader", "--allow-cidr", "10.0.0.0/8",
                    "--allow-cidr", "2001:db8::/32")
    assert (user["project"], user["roles"], user["cidrs"], user["enabled"]) == (
        "acme", ["Test Reader"], ["10.0.0.0/8", "2001:db8::/32"], True)
    dew_json(s, "create-user", "bob", "--project", "default")
    assert [u["name"] for u in dew_json(s, "list-users")] == ["alice", "bob"]
    assert [u["name"] for u in dew_json(s, "list-users", "--project", "acme")] == ["alice"]

    key = dew_json(s, "create-access-key", "alice")
    assert len(key["access_key"]) == 20 and len(key["secret_key"]) == 40
    assert (key["user"], key["project"], key["status"]) == ("alice", "acme", "active")
    listed = dew_json(s, "list-access-keys", "alice")
    assert [k["access_key"] for k in listed] == [key["access_key"]]
    assert "secret_key" not in listed[0]

    async def crypto() -> CryptoCore:
        return core

    async with await Identities.open(s, crypto) as ids:  # what the API server would see
        caller = await ids.caller(key["access_key"])
        assert caller is not None and caller.secret_key == key["secret_key"].encode()
        assert caller.actions == {"test:key:list", "test:key:show"}

        role = dew_json(s, "create-role", "Key Keeper", "test:key:*", "--description", "keys")
        assert role == {"name": "Key Keeper", "builtin": False, "actions": ["test:key:*"],
                        "description": "keys"}
        roles = {r["name"]: r for r in dew_json(s, "list-roles")}
        assert roles["Test Administrator"] == {"name": "Test Administrator", "builtin": True,
                                               "actions": ["test:*"], "description": ""}
        assert roles["Key Keeper"] == role
        actions = dew_json(s, "list-actions")
        assert {"action": "test:key:list", "meaning": "list keys"} in actions

        user = dew_json(s, "set-roles", "alice", "Key Keeper", "Test Reader")
        assert user["roles"] == ["Key Keeper", "Test Reader"]
        caller = await ids.caller(key["access_key"])
        assert caller is not None and "test:key:*" in caller.actions

        assert dew_json(s, "disable-user", "alice")["enabled"] is False
        caller = await ids.caller(key["access_key"])
        assert caller is not None and not caller.active
        assert dew_json(s, "enable-user", user["user_id"])["enabled"] is True

        status = dew_json(s, "set-access-key-status", key["access_key"], "inactive")
        assert status["status"] == "inactive"
        caller = await ids.caller(key["access_key"])
        assert caller is not None and not caller.active

        assert "held by users (alice)" in in_conflict(s, "delete-role", "Key Keeper")
        dew_json(s, "set-roles", "alice")  # none
        assert dew_json(s, "delete-role", "Key Keeper") == {"deleted": "Key Keeper"}

        assert dew_json(s, "delete-access-key", key["access_key"]) == {
            "deleted": key["access_key"]}
        assert await ids.caller(key["access_key"]) is None
        assert dew_json(s, "list-access-keys", "alice") == []


def test_human_output(iam_settings: Settings) -> None:
    s = iam_settings
    done = dew(s, "create-user", "carol", "--project", "default", "--role", "Test Reader")
    assert done.returncode == 0, done.stderr
    assert "carol" in done.stdout and "Test Reader" in done.stdout
    done = dew(s, "create-access-key", "carol")
    assert done.returncode == 0, done.stderr
    assert "secret_key" in done.stdout and "shown only this once" in done.stdout
    done = dew(s, "list-users")
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "USER", "ID"] and row.startswith("carol ")
    done = dew(s, "list-roles")
    assert "Test Administrator" in done.stdout and "test:*" in done.stdout


def test_bad_input_is_one_line_exit_2_and_writes_nothing(iam_settings: Settings) -> None:
    s = iam_settings
    dew_json(s, "create-user", "dave", "--project", "default", "--role", "Test Reader")
    before = (dew_json(s, "list-projects"), dew_json(s, "list-users"),
              dew_json(s, "list-roles"))
    cases = [
        (("create-project", "bad name"), "invalid project name 'bad name'"),
        (("create-user", "erin", "--project", "nope"), "no project 'nope'"),
        (("create-user", "erin", "--project", "default", "--allow-cidr", "10.0.0.1/8"),
         "invalid CIDR '10.0.0.1/8': it has host bits set (the network is 10.0.0.0/8)"),
        (("create-user", "erin", "--project", "default", "--role", "Nope"),
         "unknown role 'Nope'"),
        (("create-user", "erin"), "the following arguments are required: --project"),
        (("set-roles", "dave", "Nope"), "unknown role 'Nope'"),
        (("set-roles", "nobody", "Test Reader"), "no user 'nobody'"),
        (("disable-user", "nobody"), "no user 'nobody'"),
        (("create-role", "Mine", "test:key:destroy"), "unknown action 'test:key:destroy'"),
        (("create-role", "Mine", "kms:*"), "unknown action 'kms:*': it matches no action"),
        (("delete-role", "Mine"), "no custom role 'Mine'"),
        (("delete-access-key", "AAAAAAAAAAAAAAAAAAAA"), "no access key 'AAAAAAAAAAAAAAAAAAAA'"),
        (("delete-access-key", "short"), "invalid access key 'short'"),
        (("set-access-key-status", "AAAAAAAAAAAAAAAAAAAA", "on"), "invalid choice: 'on'"),
        (("list-users", "--project", "0123456789abcdef0123456789abcdef"),
         "no project '0123456789abcdef0123456789abcdef'"),
        (("create-access-key", "nobody"), "no user 'nobody'"),
    ]
    for args, message in cases:
        line = refused(s, *args)
        assert line.startswith("dew: error: ") and message in line, (args, line)
    # Refused by the state (a Conflict): exit 1, nothing written either.
    conflicts = [
        (("create-project", "default"), "a project named 'default' exists"),
        (("create-user", "dave", "--project", "default"), "a user named 'dave' exists"),
        (("create-role", "Test Reader", "test:key:list"), "'Test Reader' is a built-in role"),
    ]
    for args, message in conflicts:
        line = in_conflict(s, *args)
        assert line.startswith("dew: error: ") and message in line, (args, line)
    assert (dew_json(s, "list-projects"), dew_json(s, "list-users"),
            dew_json(s, "list-roles")) == before

    dew_json(s, "create-access-key", "dave")
    dew_json(s, "create-access-key", "dave")
    assert "2 access keys already" in in_conflict(s, "create-access-key", "dave", "--json")
    assert len(dew_json(s, "list-access-keys", "dave")) == 2


def test_help_lists_iam_without_importing_it(settings: Settings) -> None:
    code = ("import sys\nfrom engine.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in sys.modules if m.startswith('engine.iam')])\n")
    done = subprocess.run([sys.executable, "-c", code], env=dew_env(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "iam" in done.stdout and "identities of the HTTPS API" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"
    done = dew(settings, "--help")
    assert done.returncode == 0 and "create-access-key" in done.stdout


async def test_set_password_from_stdin_or_a_private_file(iam_settings: Settings,
                                                         tmp_path: Path) -> None:
    from engine.iam.passwords import verify_password

    s = iam_settings
    dew_json(s, "create-user", "pia", "--project", "default")
    done = run_dew(s, "iam", "set-password", "pia", input="first-password\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "console password of pia set"
    loose = tmp_path / "pw"
    loose.write_text("second-password\n")
    loose.chmod(0o644)
    line = refused(s, "set-password", "pia", "--password-file", str(loose))
    assert line == f"dew: error: --password-file: {loose} is readable by others (mode 0644)"
    loose.chmod(0o600)
    assert dew_json(s, "set-password", "pia", "--password-file", str(loose))["user"] == "pia"
    short = run_dew(s, "iam", "set-password", "pia", input="short\n")
    assert short.returncode == 2 and "password: use 8 to 1024 characters" in short.stderr
    async with await Identities.open(s) as ids:
        found = await ids.store.password_of("pia")
    assert found is not None and found[1] is not None and found[1].startswith("$argon2id$")
    assert verify_password(found[1], "second-password")  # the short one changed nothing
