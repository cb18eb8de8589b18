"""``dew kms`` through a running ``dew api`` ([cli] api_url): the same output as the
local path, audited under the CLI's access key, and one-line errors when the API is
down, the credentials are wrong or their file is open to others.

The pure parts (the mirrored input checks, the error table, the signer, the
credentials) are tested in-process; one API process and one worker serve the
subprocess tests of the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.api import client as c
from engine.api import signing
from engine.api.errors import TABLE
from engine.cli import build_parser
from engine.crypto import HsmConfig
from engine.errors import ConfigError, DewError, InvalidInput, NotFound
from engine.redis_server import RedisServer
from engine.settings import Settings
from handlers.kms import cli_checks, cli_remote
from tests.api_process import ApiStack, Identity, api_stack
from tests.helpers import ROOT, dew_env, run_dew

PLAN = {"cli": ("default", ["KMS CMKFullAccess"], ())}


# --------------------------------------------------------------------------- pure parts


@pytest.fixture(scope="module")
def parser() -> Any:
    return build_parser(load=None)


def _outcome(check: Any, args: Any) -> Any:
    try:
        return check(args)
    except DewError as exc:
        return (type(exc).__name__, exc.code, exc.message, exc.fix)


@pytest.mark.parametrize("argv", [
    ["gen-random", "--bytes", "16"],
    ["gen-random", "--bytes", "0"],
    ["gen-random", "--bytes", "1025", "--project", "bad project"],
    ["encrypt-data", "k1", "--plain-text-base64", "ZGV3IQ=="],
    ["encrypt-data", "k1", "--plain-text-base64", "not base64!"],
    ["encrypt-data", "k 1", "--plain-text-base64", "ZGV3IQ=="],
    ["encrypt-data", "k1", "--plain-text-base64", "QUFB" * 1366],
    ["encrypt-data", "k1", "--plain-text-base64", "ZA==", "--encryption-context", "{"],
    ["encrypt-data", "k1", "--plain-text-base64", "ZA==", "--encryption-context", "[1]"],
    ["encrypt-data", "k1", "--plain-text-base64", "ZA==", "--encryption-context", "null"],
    ["encrypt-data", "k1", "--plain-text-base64", "ZA==", "--encryption-context",
     json.dumps({"aad": "x" * 9000})],
    ["decrypt-data", "--cipher-text", "ZGV3IQ=="],
    ["decrypt-data", "--cipher-text", "%%"],
    ["decrypt-data", "k1", "--cipher-text", "ZGV3IQ=="],
    ["decrypt-data", "--cipher-text", "ZGV3IQ==", "--algorithm", "RSAES_OAEP_SHA_256"],
    ["decrypt-data", "k1", "--cipher-text", "ZGV3IQ==", "--algorithm", "RSA_NONE"],
    ["create-datakey", "k1", "--length-bits", "100"],
    ["create-datakey-without-plaintext", "k1", "--length-bits", "512"],
    ["encrypt-datakey", "k1", "--plain-text", "00" * 16],
    ["encrypt-datakey", "k1", "--plain-text", "00" * 8],
    ["encrypt-datakey", "k1", "--plain-text", "zz"],
    ["decrypt-datakey", "k1", "--cipher-text", "0a0b"],
    ["decrypt-datakey", "k1", "--cipher-text", "0x"],
])
def test_mirrored_checks_answer_as_the_local_checks(parser: Any, argv: list[str]) -> None:
    local = parser.parse_args(["kms", *argv])
    remote = parser.parse_args(["kms", *argv])
    expected, got = _outcome(cli_checks.checked, local), _outcome(cli_remote.checked, remote)
    if isinstance(expected, dict):
        assert isinstance(got, dict)
        got = {k: v for k, v in got.items() if k != "text"}  # the API's copy of "plain"
    assert got == expected


def test_mirrored_constants_are_the_services() -> None:
    from handlers.kms import asym, data
    from handlers.kms import format as f

    assert cli_remote.ACCOUNT.pattern == f.ACCOUNT.pattern
    assert cli_remote.ALIAS.pattern == f.ALIAS.pattern
    assert cli_remote.KEY_ID.pattern == f.KEY_ID.pattern
    assert (cli_remote.MAX_DATA_BYTES, cli_remote.RANDOM_MAX_BYTES) == (
        f.MAX_DATA_BYTES, f.RANDOM_MAX_BYTES)
    assert cli_remote.DATA_KEY_BITS == f.DATA_KEY_BITS
    assert cli_remote.DATA_KEY_BYTES == data.DATA_KEY_BYTES
    assert cli_remote.MAX_CONTEXT_BYTES == f.MAX_CONTEXT_BYTES
    assert tuple(asym.ENCRYPTION) == cli_remote.ENCRYPTION_ALGORITHMS
    assert slice(16, 16 + f.KEY_ID_BYTES) == cli_remote.KEY_ID_SLICE


def test_binary_plaintexts_and_other_contexts_need_the_local_path(tmp_path: Path) -> None:
    binary = tmp_path / "plain.bin"
    binary.write_bytes(b"\xff\xfe")
    args = build_parser(load=None).parse_args(
        ["kms", "encrypt-data", "k1", "--plain-text-file", str(binary)])
    with pytest.raises(InvalidInput, match=r"^--plain-text-file: .*not UTF-8.*--local"):
        cli_remote.checked(args)
    assert cli_remote.aad({"context": {"aad": ""}}) == {"additional_authenticated_data": ""}
    assert cli_remote.aad({"context": {}}) == {}
    with pytest.raises(InvalidInput, match=r"^--encryption-context: .*--local"):
        cli_remote.aad({"context": {"file": "a.txt"}})


def test_project_must_be_the_access_keys() -> None:
    cli_remote.check_project(None, "p" * 32, "alpha", "f")
    cli_remote.check_project("alpha", "p" * 32, "alpha", "f")
    cli_remote.check_project("p" * 32, "p" * 32, "", "environment")
    with pytest.raises(InvalidInput, match=r"^--project 'beta' is not the project of the CLI's "
                       r"access key \(alpha, from f\).*--local"):
        cli_remote.check_project("beta", "p" * 32, "alpha", "f")


def test_error_codes_map_back_to_the_classes_the_server_mapped() -> None:
    for kind, mapping in TABLE:
        rebuilt = c.ERRORS[mapping.suffix]
        assert issubclass(kind, rebuilt), kind
        local_bad_input = issubclass(kind, InvalidInput | NotFound)
        assert issubclass(rebuilt, InvalidInput | NotFound) == local_bad_input, kind
    error = c.error_of_reply(404, b'{"error_code": "KMS.0404", "error_msg": "no key"}')
    assert type(error) is NotFound and error.message == "no key"
    assert isinstance(c.error_of_reply(502, b"<html>"), DewError)


def test_the_signer_signs_what_the_server_verifies() -> None:
    creds = c.Credentials("AK" * 10, "secret-key", "f" * 32)
    body = b'{"random_data_length": 128}'
    target = "/v1.0/" + "f" * 32 + "/kms/gen-random?a=%20b&c"
    headers = c.sign_headers("POST", target, body, "127.0.0.1:8443", creds)
    path, _, query = target.partition("?")
    auth = signing.parse_authorization(headers["authorization"])
    signing.verify(signing.SignedRequest("POST", path, query, headers, body), auth,
                   b"secret-key")
    with pytest.raises(DewError, match="signature does not match"):
        signing.verify(signing.SignedRequest("POST", path, query, headers, body + b" "), auth,
                       b"secret-key")
    assert set(auth.signed_headers) == set(c.SIGNED_HEADERS)


def test_credentials_sources(tmp_path: Path) -> None:
    key = {"access_key": "A" * 20, "secret_key": "s", "project_id": "f" * 32,
           "project": "alpha", "user": "cli"}
    path = tmp_path / "creds"
    path.write_text(json.dumps(key))
    path.chmod(0o600)
    read = c.read_credentials(path)
    assert (read.access_key, read.project, read.origin) == ("A" * 20, "alpha", str(path))
    path.chmod(0o640)
    with pytest.raises(ConfigError, match=r"open to other users \(mode 0640\): chmod 600"):
        c.read_credentials(path)
    with pytest.raises(ConfigError, match="has no secret_key"):
        c.parse_credentials(b'{"access_key": "A", "project_id": "p"}', "f")
    with pytest.raises(ConfigError, match="DEW_CLI_PROJECT_ID"):
        c.load_credentials(Settings(), {"DEW_CLI_ACCESS_KEY": "A", "DEW_CLI_SECRET_KEY": "s"})
    env = c.load_credentials(Settings(), {"DEW_CLI_ACCESS_KEY": "A", "DEW_CLI_SECRET_KEY": "s",
                                          "DEW_CLI_PROJECT_ID": "p"})
    assert (env.access_key, env.project_id, env.origin) == ("A", "p", "environment")
    with pytest.raises(ConfigError, match="only to a loopback address"):
        c.parse_endpoint("http://10.0.0.1:8443")
    assert c.parse_endpoint("https://[::1]:8443/").host_header == "[::1]:8443"


# --------------------------------------------------------------------------- through a server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
          hsm_config: HsmConfig) -> Iterator[ApiStack]:
    with api_stack(tmp_path_factory.mktemp("cli-api"), redis_server, hsm_config, PLAN,
                   None) as made:
        yield made


def _credentials(path: Path, ident: Identity, secret: str | None = None) -> Path:
    path.write_text(json.dumps({"access_key": ident.ak, "secret_key": secret or ident.sk,
                                "project_id": ident.project_id, "project": ident.project}))
    path.chmod(0o600)
    return path


def _remote(stack: ApiStack, path: Path | None = None, url: str | None = None) -> Settings:
    """The stack's settings with [cli] api_url set (and the access key's file)."""
    creds = path or _credentials(stack.tmp / "cli-credentials", stack.identities["cli"])
    return stack.settings.replace(cli={"api_url": url or stack.api.url,
                                       "credentials_file": str(creds)})


def _ok(settings: Settings, *args: str) -> str:
    done = run_dew(settings, "kms", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_routed_verbs_print_what_the_local_path_prints(stack: ApiStack) -> None:
    local, remote = stack.settings, _remote(stack)
    alias = "cli-remote"
    _ok(local, "create-key", "--alias", alias)
    aad = ["--encryption-context", '{"aad":"row 7"}']

    sealed = json.loads(_ok(remote, "encrypt-data", alias, "--plain-text-base64", "ZGV3IQ==",
                            *aad, "--json"))
    assert list(sealed) == ["key_id", "cipher_text"]
    opened = [_ok(s, "decrypt-data", "--cipher-text", sealed["cipher_text"], *aad)
              for s in (remote, local)]
    assert opened[0] == opened[1] == (f"key_id             {sealed['key_id']}\n"
                                      "plain_text_base64  ZGV3IQ==\n")

    made = json.loads(_ok(remote, "create-datakey", alias, "--length-bits", "128", "--json"))
    assert list(made) == list(json.loads(_ok(local, "create-datakey", alias, "--json")))
    for settings in (remote, local):
        assert json.loads(_ok(settings, "decrypt-datakey", alias, "--cipher-text",
                              made["cipher_text"], "--json")) == {
            "key_id": made["key_id"], "plain_text": made["plain_text"]}

    wrapped = json.loads(_ok(remote, "encrypt-datakey", alias, "--plain-text", "ab" * 32,
                             "--json"))
    assert list(wrapped) == ["key_id", "cipher_text"]
    assert _ok(local, "decrypt-datakey", alias, "--cipher-text", wrapped["cipher_text"]
               ).splitlines()[1].split() == ["plain_text", "ab" * 32]

    shown = json.loads(_ok(remote, "gen-random", "--bytes", "16", "--json"))
    assert list(shown) == ["random_data"] and len(bytes.fromhex(shown["random_data"])) == 16

    # An unknown key is told the closest alias, as locally (exit 2, one line).
    told = [run_dew(s, "kms", "encrypt-data", "cli-remot", "--plain-text-base64", "ZA==")
            for s in (remote, local)]
    assert [t.returncode for t in told] == [2, 2]
    assert told[0].stderr == told[1].stderr
    assert told[0].stderr.count("\n") == 1 and "did you mean 'cli-remote'?" in told[0].stderr


@pytest.mark.slow
def test_api_calls_are_audited_under_the_cli_access_key(stack: ApiStack) -> None:
    _ok(_remote(stack), "gen-random", "--bytes", "4")
    entries = json.loads(run_dew(stack.settings, "audit", "list", "--operation", "gen_random",
                                 "--limit", "1", "--json").stdout)
    ident = stack.identities["cli"]
    assert entries[-1]["actor"].startswith(f"api:cli@default ak={ident.ak} ip=127.0.0.1")


def test_a_configured_api_that_is_down_is_one_line(stack: ApiStack) -> None:
    from tests.api_process import _free_port

    url = f"https://127.0.0.1:{_free_port()}"
    done = run_dew(_remote(stack, url=url), "kms", "gen-random", "--bytes", "4")
    assert done.returncode == 1
    assert done.stderr.startswith(f"dew: error: the API at {url} is not answering (")
    assert done.stderr.endswith("start it with make up (or dew api)\n")
    assert done.stderr.count("\n") == 1 and done.stdout == ""


def test_bad_credentials_are_the_apis_401_in_one_line(stack: ApiStack) -> None:
    path = _credentials(stack.tmp / "wrong-credentials", stack.identities["cli"], "x" * 40)
    done = run_dew(_remote(stack, path), "kms", "gen-random", "--bytes", "4")
    assert done.returncode == 1
    assert done.stderr == ("dew: error: Incorrect IAM authentication information: signature "
                           f"does not match (access key {stack.identities['cli'].ak} from "
                           f"{path})\n")


def test_a_credentials_file_open_to_others_is_refused(stack: ApiStack) -> None:
    path = _credentials(stack.tmp / "open-credentials", stack.identities["cli"])
    path.chmod(0o644)
    done = run_dew(_remote(stack, path), "kms", "gen-random", "--bytes", "4")
    assert done.returncode == 2
    assert done.stderr == (f"dew: error: the CLI's API credentials file {path} is open to "
                           f"other users (mode 0644): chmod 600 {path}\n")


def test_the_api_path_imports_no_service_hsm_or_database_module(stack: ApiStack) -> None:
    code = ("import json, sys\nfrom engine.cli import main\n"
            "rc = main(['kms', 'gen-random', '--bytes', '4'])\n"
            "sys.stderr.write(json.dumps([rc, sorted(sys.modules)]))\n")
    done = subprocess.run([sys.executable, "-c", code], env=dew_env(_remote(stack)), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    rc, modules = json.loads(done.stderr.splitlines()[-1])
    assert rc == 0
    heavy = ("asyncio", "structlog", "pkcs11", "aiosqlite", "sqlite3", "cryptography", "arq",
             "redis", "engine.crypto", "engine.store", "engine.logs")
    assert not [m for m in modules if m.startswith(heavy)]
    assert {m for m in modules if m.startswith("handlers.kms.")} <= {
        "handlers.kms.cli", "handlers.kms.cli_checks", "handlers.kms.cli_remote",
        "handlers.kms.cli_render", "handlers.kms.config"}
