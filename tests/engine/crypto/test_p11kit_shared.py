"""One HSM for several nodes: a SoftHSM2 token served by a real `p11-kit server`, used
through Debian's `p11-kit-client.so` by crypto cores in this process and in other
processes (the "nodes"). No mocks: real SoftHSM, p11-kit, pkcs11-tool, `dew`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from engine.crypto import (
    CryptoCore,
    HsmConfig,
    KeySpec,
    Sealed,
    ensure_token,
    gcm_ecb,
    hsm_config_from_settings,
)
from engine.crypto._remote import client_module_path
from engine.crypto.config import SOFTHSM_MODULE, ensure_softhsm_conf, generate_pin
from engine.crypto.errors import HsmUnreachable, IntegrityCheckFailed
from engine.errors import BackendUnavailable, ConfigError
from engine.settings import Settings, load_settings
from tests.engine.crypto.conftest import parse_pkcs11_tool_objects

ROOT = Path(__file__).resolve().parents[3]
CLIENT = client_module_path()
LABEL = "p11-shared"


def test_the_client_module_is_installed() -> None:
    """.ci/system-packages installs p11-kit and p11-kit-modules: nothing here is skipped."""
    assert CLIENT is not None and Path(CLIENT).exists()


@dataclass
class Served:
    """A SoftHSM2 token (made by softhsm2-util) and a p11-kit server exporting it."""

    directory: Path
    conf: Path
    pin: str
    socket: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    def start(self) -> None:
        env = {**os.environ, "SOFTHSM2_CONF": str(self.conf)}
        env.pop("P11_KIT_SERVER_ADDRESS", None)
        # Its own process group: stop() ends the per-connection p11-kit-remote too.
        self.proc = subprocess.Popen(
            ["p11-kit", "server", "-f", "--provider", SOFTHSM_MODULE, "-n", str(self.socket),
             f"pkcs11:token={LABEL}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while not self.socket.is_socket():
            assert self.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.proc = None

    def client(self, pool_size: int = 2, label: str = LABEL) -> HsmConfig:
        assert CLIENT is not None
        return HsmConfig(module_path=CLIENT, token_label=label, pin=self.pin,
                         server_address=self.address, pool_size=pool_size)

    def local_env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("p11kit")
    conf = directory / "hsm" / "softhsm2.conf"
    # The token is made in another process: this one's SoftHSM is the shared test token's.
    ensure_softhsm_conf(conf, directory / "hsm" / "tokens")
    pin = generate_pin()
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", LABEL,
                    "--so-pin", generate_pin(), "--pin", pin],
                   env={**os.environ, "SOFTHSM2_CONF": str(conf)}, check=True,
                   capture_output=True, timeout=60)
    server = Served(directory, conf, pin, directory / "hsm.sock")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def running(served: Served) -> Served:
    """The server, started again if a test stopped it."""
    if served.proc is None or served.proc.poll() is not None:
        served.stop()
        served.start()
    return served


# A second node: another process with its own crypto core through the client module.
NODE = """
import asyncio, base64, json, sys
from engine.crypto import CryptoCore, HsmConfig, KeySpec
module, label, address, key, op = sys.argv[1:6]
pin = sys.stdin.readline().strip()
async def main():
    config = HsmConfig(module_path=module, token_label=label, pin=pin,
                       server_address=address or None)
    async with CryptoCore(config) as core:
        if op == "open":
            iv, ct, aad = (base64.b64decode(x) for x in sys.argv[6:9])
            print(json.dumps({"plain": (await core.open(key, iv, ct, aad)).decode()}))
        elif op == "seal":
            sealed = await core.seal(key, sys.argv[6].encode(), sys.argv[7].encode())
            print(json.dumps({"iv": base64.b64encode(sealed.iv).decode(),
                              "ct": base64.b64encode(sealed.ciphertext).decode()}))
asyncio.run(main())
"""


def node(config: HsmConfig, key: str, op: str, *args: str,
         env: dict[str, str] | None = None) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", NODE, config.module_path, config.token_label,
         config.server_address or "", key, op, *args],
        input=(config.pin or "") + "\n", capture_output=True, text=True, timeout=120,
        cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


async def test_a_key_made_on_one_node_encrypts_there_and_decrypts_on_another(
        running: Served) -> None:
    async with CryptoCore(running.client()) as core:
        assert core.session_mode == "session-per-thread"
        await core.generate_key(KeySpec.AES_256, "shared-aes", b"shared-aes")
        sealed = await core.seal("shared-aes", b"node A wrote this", aad=b"ctx")
        # Node B, another process through p11-kit, opens it ...
        opened = node(running.client(), "shared-aes", "open", b64(sealed.iv),
                      b64(sealed.ciphertext), b64(b"ctx"))
        assert opened["plain"] == "node A wrote this"
        # ... and what B seals, A opens.
        back = node(running.client(), "shared-aes", "seal", "node B wrote this", "ctx2")
        import base64

        plain = await core.open("shared-aes", base64.b64decode(back["iv"]),
                                base64.b64decode(back["ct"]), aad=b"ctx2")
        assert plain == b"node B wrote this"
        with pytest.raises(IntegrityCheckFailed):
            await core.open("shared-aes", sealed.iv, sealed.ciphertext, aad=b"other")
        key = await core.generate_data_key("shared-aes", 32, aad=b"dk")
        assert await core.unwrap_data_key("shared-aes", key.wrapped, b"dk") == \
            key.plaintext


async def test_gcm_through_p11kit_is_the_tokens_own_gcm(running: Served) -> None:
    """p11-kit 0.24 cannot carry CKM_AES_GCM: the core builds GCM from the token's AES
    block function. The bytes are the token's GCM: the HSM node opens them with the
    SoftHSM module itself (CKM_AES_GCM), and what it seals opens through p11-kit."""
    async with CryptoCore(running.client()) as core:
        await core.ensure_key(KeySpec.AES_256, "gcm-compat", b"gcm-compat")
        sealed = await core.seal("gcm-compat", b"the same bytes", aad=b"a")
        local = HsmConfig(module_path=SOFTHSM_MODULE, token_label=LABEL, pin=running.pin)
        opened = node(local, "gcm-compat", "open", b64(sealed.iv), b64(sealed.ciphertext),
                      b64(b"a"), env=running.local_env())
        assert opened["plain"] == "the same bytes"
        made = node(local, "gcm-compat", "seal", "sealed by the HSM node", "b",
                    env=running.local_env())
        import base64

        assert await core.open("gcm-compat", base64.b64decode(made["iv"]),
                               base64.b64decode(made["ct"]), aad=b"b") == \
            b"sealed by the HSM node"


def test_gcm_from_a_block_function_equals_aes_gcm() -> None:
    for size in (0, 1, 16, 17, 1000, 70_000):
        for aad in (b"", b"x" * 33):
            key, iv, data = os.urandom(32), os.urandom(12), os.urandom(size)

            def ecb(blocks: bytes, key: bytes = key) -> bytes:
                return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(blocks)

            sealed = gcm_ecb.seal(ecb, iv, data, aad)
            assert sealed == AESGCM(key).encrypt(iv, data, aad or None)
            assert gcm_ecb.open_sealed(ecb, iv, sealed, aad) == data
            with pytest.raises(IntegrityCheckFailed):
                gcm_ecb.open_sealed(ecb, iv, sealed[:-1] + bytes([sealed[-1] ^ 1]), aad)


def test_key_wrap_from_a_block_function_equals_rfc_5649() -> None:
    for size in (1, 8, 9, 32, 1024):
        key, secret = os.urandom(32), os.urandom(size)
        cipher = Cipher(algorithms.AES(key), modes.ECB())
        wrapped = gcm_ecb.kwp_wrap(lambda b, c=cipher: c.encryptor().update(b), secret)
        assert wrapped == aes_key_wrap_with_padding(key, secret)
        unwrap = cipher.decryptor().update
        assert gcm_ecb.kwp_unwrap(lambda b, c=cipher: c.decryptor().update(b), wrapped) == \
            secret
        with pytest.raises(IntegrityCheckFailed):
            gcm_ecb.kwp_unwrap(unwrap, wrapped[:-1] + bytes([wrapped[-1] ^ 1]))


async def test_what_p11kit_does_not_carry_is_done_with_what_it_does(running: Served) -> None:
    """AES key wrap with padding (from AES-ECB) and RSA-PSS over a message (hashed
    here, CKM_RSA_PKCS_PSS in the token) work through p11-kit 0.24 too."""
    async with CryptoCore(running.client()) as core:
        await core.ensure_key(KeySpec.AES_256, "kek-aes", b"kek-aes")
        secret = os.urandom(32)
        wrapped = await core.wrap_secret("kek-aes", secret)
        assert len(wrapped) == 40 and await core.unwrap_secret("kek-aes", wrapped) == secret
        with pytest.raises(IntegrityCheckFailed):
            await core.unwrap_secret("kek-aes", wrapped[:-1] + bytes([wrapped[-1] ^ 1]))
        await core.ensure_key(KeySpec.RSA_2048, "pss-rsa", b"pss-rsa")
        signature = await core.sign("pss-rsa", b"message", "RSA_PSS_SHA256")
        public = serialization.load_der_public_key(await core.public_key_spki_der("pss-rsa"))
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, b"message", padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                      hashes.SHA256())
        assert await core.verify("pss-rsa", b"message", signature, "RSA_PSS_SHA256")
        assert not await core.verify("pss-rsa", b"massage", signature, "RSA_PSS_SHA256")


async def test_keys_made_through_the_client_are_sensitive_and_never_extractable(
        running: Served) -> None:
    async with CryptoCore(running.client()) as core:
        await core.ensure_key(KeySpec.AES_256, "sensitive-aes", b"sensitive-aes")
        await core.ensure_key(KeySpec.EC_P256, "sensitive-ec", b"sensitive-ec")
    assert CLIENT is not None
    # Listed by pkcs11-tool both through p11-kit and in the served token itself.
    for module, env in ((CLIENT, {**os.environ, "P11_KIT_SERVER_ADDRESS": running.address}),
                        (SOFTHSM_MODULE, running.local_env())):
        done = subprocess.run(
            ["pkcs11-tool", "--module", module, "--token-label", LABEL, "--list-objects",
             "--login", "--pin", running.pin],
            env=env, capture_output=True, text=True, timeout=60, check=True)
        objects = parse_pkcs11_tool_objects(done.stdout)
        for label in ("sensitive-aes", "sensitive-ec"):
            private = [o for o in objects if o.fields.get("label") == label
                       and not o.header.startswith("Public Key")]
            assert private, (module, label, done.stdout)
            for obj in private:
                assert {"sensitive", "always sensitive", "never extractable"} <= obj.access


async def test_concurrent_calls_through_the_client_are_all_right(running: Served) -> None:
    async with CryptoCore(running.client(pool_size=2)) as core:
        await core.ensure_key(KeySpec.AES_256, "busy-aes", b"busy-aes")
        messages = [os.urandom(40) for _ in range(200)]
        sealed = await asyncio.gather(*(core.seal("busy-aes", m, aad=m[:5]) for m in messages))
        opened = await asyncio.gather(*(core.open("busy-aes", s.iv, s.ciphertext, aad=m[:5])
                                        for s, m in zip(sealed, messages, strict=True)))
        assert opened == messages
        assert core.sessions_opened == 2


async def test_the_export_going_away_fails_retryably_and_coming_back_heals(
        running: Served) -> None:
    async with CryptoCore(running.client(pool_size=2)) as core:
        await core.ensure_key(KeySpec.AES_256, "heal-aes", b"heal-aes")
        before = await core.seal("heal-aes", b"before", aad=b"h")
        running.stop()  # the server and its per-connection p11-kit-remote
        # Every call fails, retryably, with a message naming the socket; none answers.
        for _ in range(3):
            results = await asyncio.gather(
                *(core.open("heal-aes", before.iv, before.ciphertext, aad=b"h")
                  for _ in range(6)),
                core.seal("heal-aes", b"during"), return_exceptions=True)
            for result in results:
                assert isinstance(result, BackendUnavailable), result
                assert result.retryable and result.code == "hsm_unreachable"
                assert "unreachable" in result.message and running.address in result.message
        running.start()  # on the same socket
        # Each pool thread meets its lost session once (its calls then fail, retryably)
        # and reconnects; which thread takes which call is the pool's choice, so a few
        # rounds of calls on both threads, until one round fails nothing.
        for _ in range(4):
            results = await asyncio.gather(
                *(core.seal("heal-aes", b"after") for _ in range(8)), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            assert all(isinstance(r, BackendUnavailable) and r.retryable for r in failed), failed
            if not failed:
                break
        assert not failed, "the pool did not heal"
        for sealed in results:
            assert isinstance(sealed, Sealed)
            assert await core.open("heal-aes", sealed.iv, sealed.ciphertext) == b"after"
        assert await core.open("heal-aes", before.iv, before.ciphertext, aad=b"h") == b"before"


async def test_a_socket_that_does_not_answer_is_a_clear_retryable_error(
        tmp_path: Path, served: Served) -> None:
    config = HsmConfig(module_path=served.client().module_path, token_label=LABEL,
                       pin=served.pin, server_address=f"unix:path={tmp_path / 'none.sock'}")
    with pytest.raises(HsmUnreachable) as refused:
        await CryptoCore(config).connect()
    assert "p11-kit socket" in refused.value.message and "none.sock" in refused.value.message
    assert "dew hsm serve" in refused.value.fix


def node_settings(tmp_path: Path, address: str, label: str = LABEL) -> Settings:
    return load_settings().replace(
        engine={"state_dir": tmp_path / "node"},
        hsm={"module": "p11-kit-client", "server_address": address, "token_label": label})


def test_a_node_never_creates_a_token_and_a_missing_one_is_a_config_error(
        tmp_path: Path, running: Served) -> None:
    settings = node_settings(tmp_path, running.address, label="no-such-token")
    with pytest.raises(ConfigError) as missing:
        ensure_token(settings, environ={"DEW_HSM_PIN": running.pin})
    assert missing.value.code == "hsm_token_missing"
    assert running.address in missing.value.message
    assert not (tmp_path / "node" / "hsm").exists()  # no softhsm2.conf, no PIN file
    present = node_settings(tmp_path, running.address)
    assert ensure_token(present, environ={"DEW_HSM_PIN": running.pin}) is False
    config = hsm_config_from_settings(present, environ={})
    assert config.module_path == CLIENT and config.softhsm_conf is None
    with pytest.raises(ConfigError) as no_pin:
        config.user_pin()
    assert "user.pin" in no_pin.value.fix


def test_the_server_address_must_be_a_unix_socket(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unix:path="):
        node_settings(tmp_path, "tcp:host=10.0.0.1;port=99")


def dew(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def dew_env(state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DEW_") and k != "P11_KIT_SERVER_ADDRESS"}
    state.mkdir(parents=True, exist_ok=True)
    return {**env, "DEW_STATE_DIR": str(state), "DEW_LOG_CONSOLE": "off", **extra}


def test_a_node_whose_socket_does_not_answer_says_so_in_one_line(tmp_path: Path) -> None:
    env = dew_env(tmp_path / "node", DEW_HSM_MODULE="p11-kit-client", DEW_HSM_PIN="1234",
                  DEW_HSM_SERVER_ADDRESS=f"unix:path={tmp_path / 'gone.sock'}")
    done = dew(env, "init")
    assert done.returncode == 1, done.stderr
    first, *rest = done.stderr.strip().splitlines()
    assert first.startswith("dew: error: the HSM is unreachable: the p11-kit socket")
    assert "gone.sock" in first and "Traceback" not in done.stderr
    assert all(line.startswith("dew: fix: ") for line in rest) and len(rest) <= 1


def test_dew_hsm_serve_exports_a_token_a_node_uses(tmp_path: Path) -> None:
    state = tmp_path / "hsmnode"
    env = dew_env(state)
    serve = subprocess.Popen([sys.executable, "-m", "engine.cli", "hsm", "serve", "--json"],
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        assert line, serve.stderr.read() if serve.stderr else ""
        info = json.loads(line)
        socket = Path(info["socket"])
        assert socket.is_socket() and socket.stat().st_mode & 0o777 == 0o600
        hsm = info["node_settings"]["hsm"]
        assert hsm["module"] == CLIENT and hsm["server_address"] == f"unix:path={socket}"
        assert info["environment"] == {"P11_KIT_SERVER_ADDRESS": hsm["server_address"]}
        pin_file = state / "hsm" / "user.pin"
        assert str(pin_file) in hsm["pin_file"]
        # A node with a copy of the PIN file uses the served token.
        node_state = tmp_path / "node"
        (node_state / "hsm").mkdir(parents=True)
        copy = node_state / "hsm" / "user.pin"
        copy.write_text(pin_file.read_text())
        copy.chmod(0o600)
        settings = load_settings().replace(
            engine={"state_dir": node_state},
            hsm={"module": hsm["module"], "server_address": hsm["server_address"]})
        assert ensure_token(settings, environ={}) is False

        async def use() -> bytes:
            async with CryptoCore(hsm_config_from_settings(settings, environ={})) as core:
                await core.ensure_key(KeySpec.AES_256, "served-aes", b"served-aes")
                sealed = await core.seal("served-aes", b"through dew hsm serve")
                return await core.open("served-aes", sealed.iv, sealed.ciphertext)

        assert asyncio.run(use()) == b"through dew hsm serve"
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=20) == 0
        assert not socket.exists()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        # Whatever the server forked went with it (stopped as a process group).
        for pid in _pids_of(f"-n {state}"):
            pytest.fail(f"p11-kit process {pid} outlived dew hsm serve")


def _pids_of(text: str) -> list[int]:
    done = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True,
                          check=True)
    return [int(line.split()[0]) for line in done.stdout.splitlines()[1:] if text in line]


def test_dew_hsm_serve_without_p11kit_names_the_package(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dew_env(tmp_path / "state", PATH=str(empty))
    done = dew(env, "hsm", "serve")
    assert done.returncode == 1
    first = done.stderr.strip().splitlines()[0]
    assert "p11-kit is not installed" in first and "apt-get install p11-kit" in first
    as_json = dew(env, "hsm", "serve", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stderr.strip().splitlines()[-1])["error"]["code"] == \
        "p11kit_missing"


def test_dew_hsm_serve_looks_again_for_a_token_a_login_hid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SoftHSM token rewrites its file at each login; a module initialised meanwhile
    in another process (the server's p11-kit-remote) lists no such token. The export
    check connects again until it sees the token, and says so only when it never does."""
    from engine import hsm_serve
    from engine.crypto import _remote

    answers = [None, None, object()]
    connections: list[object] = []

    def opened(module: str, address: str) -> object:
        connections.append(object())
        return connections[-1]

    monkeypatch.setattr(_remote, "client_module_path", lambda: "client.so")
    monkeypatch.setattr(_remote, "open_lib", opened)
    monkeypatch.setattr(_remote, "_finalize", lambda lib: None)
    monkeypatch.setattr(_remote, "find_in", lambda lib, label, slot: answers.pop(0))
    monkeypatch.setattr(hsm_serve, "TOKEN_CHECK_PAUSE", 0.01)
    settings = load_settings()
    hsm_serve._check_serving(settings, SOFTHSM_MODULE, "unix:path=/x")
    assert len(connections) == 3  # a new connection each time

    monkeypatch.setattr(_remote, "find_in", lambda lib, label, slot: None)
    monkeypatch.setattr(hsm_serve, "TOKEN_CHECK_TIMEOUT", 0.05)
    with pytest.raises(ConfigError, match="serves no token labelled"):
        hsm_serve._check_serving(settings, SOFTHSM_MODULE, "unix:path=/x")
