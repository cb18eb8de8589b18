"""Fixtures for the crypto core: one real SoftHSM2 token per test process.

``hsm_config`` is session-scoped because SoftHSM reads SOFTHSM2_CONF once per
process; other suites should take their config from
``engine.crypto.testing.shared_softhsm_config()`` so they share this token.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from engine.crypto import CryptoCore, HsmConfig, KeySpec
from engine.crypto.testing import shared_softhsm_config

PKCS11_TOOL = "pkcs11-tool"


@pytest.fixture(scope="session")
def hsm_config() -> HsmConfig:
    """The test token's config (generated user/SO PINs in 0600 files)."""
    return shared_softhsm_config()


@pytest.fixture
async def crypto_core(hsm_config: HsmConfig) -> AsyncIterator[CryptoCore]:
    """A connected crypto core on the test token; closed after the test."""
    async with CryptoCore(hsm_config) as core:
        yield core


@pytest.fixture
def key_label() -> Callable[[str], str]:
    """Unique labels, so tests sharing the session token never collide."""

    def make(prefix: str = "k") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture
async def aes_key(crypto_core: CryptoCore, key_label: Callable[[str], str]) -> AsyncIterator[str]:
    """The label of a fresh AES-256 master key, destroyed after the test."""
    label = key_label("aes")
    await crypto_core.generate_key(KeySpec.AES_256, label, label.encode())
    yield label
    await crypto_core.destroy_key(label)


@dataclass
class ListedObject:
    """One object in ``pkcs11-tool --list-objects`` output."""

    header: str
    fields: dict[str, str]

    @property
    def access(self) -> set[str]:
        return {part.strip() for part in self.fields.get("Access", "").split(",") if part.strip()}


def parse_pkcs11_tool_objects(text: str) -> list[ListedObject]:
    objects: list[ListedObject] = []
    for line in text.splitlines():
        if re.match(r"^\S.* Object;", line):
            objects.append(ListedObject(line.strip(), {}))
        elif objects and (m := re.match(r"^\s+([A-Za-z_ ]+):\s*(.*)$", line)):
            objects[-1].fields[m.group(1).strip()] = m.group(2).strip()
    return objects


@pytest.fixture
def pkcs11_tool(hsm_config: HsmConfig) -> Callable[..., list[ListedObject]]:
    """Run OpenSC's pkcs11-tool --list-objects on the test token (another process)."""

    def run(*, login: bool) -> list[ListedObject]:
        args = [
            PKCS11_TOOL, "--module", hsm_config.module_path,
            "--token-label", hsm_config.token_label, "--list-objects",
        ]
        if login:
            args += ["--login", "--pin", hsm_config.user_pin()]
        env = {**os.environ, "SOFTHSM2_CONF": str(hsm_config.softhsm_conf)}
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60,
                              check=True)
        return parse_pkcs11_tool_objects(done.stdout)

    return run
