"""HsmConfig, PIN files and the failure modes of connecting to a token."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pkcs11
import pytest

from engine.crypto import CryptoCore, HsmConfig, init_token, read_pin_file
from engine.crypto.config import write_pin_file
from engine.errors import ConfigError, DewError

SECRET_PIN = "pin-7f3a9c-never-shown"


def _all_text(err: DewError) -> str:
    return " ".join([str(err), repr(err), *map(str, err.to_dict().values())])


def test_repr_and_str_hide_the_pin() -> None:
    config = HsmConfig(pin=SECRET_PIN)
    for text in (repr(config), str(config), f"{config}", f"{config!r}"):
        assert SECRET_PIN not in text
        assert "pin=<hidden>" in text
    assert "pin=None" in repr(HsmConfig())


def test_for_softhsm_layout(tmp_path: Path) -> None:
    config = HsmConfig.for_softhsm(tmp_path, pool_size=3)
    assert config.softhsm_conf == tmp_path / "hsm" / "softhsm2.conf"
    assert config.token_dir == tmp_path / "hsm" / "tokens"
    assert config.pin_file == tmp_path / "hsm" / "user.pin"
    assert config.so_pin_file == tmp_path / "hsm" / "so.pin"
    assert config.pool_size == 3


def test_bad_values_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        HsmConfig(pool_size=0)
    with pytest.raises(ConfigError):
        HsmConfig(token_label="x" * 33)


def test_pin_file_written_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "user.pin"
    write_pin_file(path, SECRET_PIN)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_pin_file(path) == SECRET_PIN
    assert [p.name for p in path.parent.iterdir()] == ["user.pin"]  # no temp file left


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o400, 0o700])
def test_pin_file_with_other_mode_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "user.pin"
    write_pin_file(path, SECRET_PIN)
    os.chmod(path, mode)
    with pytest.raises(ConfigError) as info:
        read_pin_file(path)
    err = info.value
    assert str(path) in err.message
    assert err.fix == f"chmod 600 {path}"
    assert err.code == "hsm_pin_file_mode"
    assert SECRET_PIN not in _all_text(err)


def test_explicit_pin_wins_over_file(tmp_path: Path) -> None:
    path = tmp_path / "user.pin"
    write_pin_file(path, "from-file")
    assert HsmConfig(pin="explicit", pin_file=path).user_pin() == "explicit"
    assert HsmConfig(pin_file=path).user_pin() == "from-file"
    with pytest.raises(ConfigError, match="no HSM user PIN"):
        HsmConfig(pin_file=tmp_path / "missing.pin").user_pin()


async def test_connect_refuses_a_readable_pin_file(hsm_config: HsmConfig, tmp_path: Path) -> None:
    path = tmp_path / "loose.pin"
    write_pin_file(path, hsm_config.user_pin())
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as info:
        await CryptoCore(replace(hsm_config, pin=None, pin_file=path)).connect()
    assert f"chmod 600 {path}" == info.value.fix
    assert hsm_config.user_pin() not in _all_text(info.value)


def test_generated_pin_files_are_0600(hsm_config: HsmConfig) -> None:
    assert hsm_config.pin_file is not None and hsm_config.so_pin_file is not None
    for path in (hsm_config.pin_file, hsm_config.so_pin_file):
        assert path.stat().st_mode & 0o777 == 0o600
    assert read_pin_file(hsm_config.pin_file) != read_pin_file(hsm_config.so_pin_file)
    assert init_token(hsm_config) is False  # exists already: nothing happens


async def test_explicit_pin_token_and_wrong_pin(hsm_config: HsmConfig) -> None:
    # A second token in the same token directory: its user PIN is the explicit
    # value, so no user PIN file is written for it.
    pin_file = hsm_config.pin_file
    assert pin_file is not None
    explicit = replace(
        hsm_config, token_label="dew-explicit", pin=SECRET_PIN,
        pin_file=pin_file.with_name("explicit-user.pin"),
        so_pin_file=pin_file.with_name("explicit-so.pin"),
    )
    assert init_token(explicit) is True
    assert explicit.pin_file is not None and not explicit.pin_file.exists()
    async with CryptoCore(explicit) as core:
        assert len(await core.random_bytes(8)) == 8

    wrong = replace(explicit, pin="not-the-pin-123")
    with pytest.raises(ConfigError) as info:
        await CryptoCore(wrong).connect()
    assert info.value.code == "hsm_pin_incorrect"
    assert "DEW_HSM_PIN" in info.value.fix
    assert "not-the-pin-123" not in _all_text(info.value)
    assert SECRET_PIN not in _all_text(info.value)


async def test_second_core_with_another_pin_is_refused(
    crypto_core: CryptoCore, hsm_config: HsmConfig
) -> None:
    # The process is logged in already; a wrong PIN must not ride on that login.
    with pytest.raises(ConfigError) as info:
        await CryptoCore(replace(hsm_config, pin="wrong-pin-456")).connect()
    assert info.value.code == "hsm_pin_incorrect"
    assert "wrong-pin-456" not in _all_text(info.value)


async def test_missing_token_is_a_config_error_with_a_fix(hsm_config: HsmConfig) -> None:
    with pytest.raises(ConfigError) as info:
        await CryptoCore(replace(hsm_config, token_label="no-such-token")).connect()
    assert info.value.code == "hsm_token_missing"
    assert "init_token" in info.value.fix


async def test_missing_module_is_a_config_error_with_a_fix(tmp_path: Path) -> None:
    config = HsmConfig(module_path=str(tmp_path / "libnothing.so"), pin=SECRET_PIN)
    with pytest.raises(ConfigError) as info:
        await CryptoCore(config).connect()
    assert info.value.code == "hsm_module_missing"
    assert "softhsm2" in info.value.fix
    assert SECRET_PIN not in _all_text(info.value)


async def test_other_token_dir_in_the_same_process_is_refused(
    hsm_config: HsmConfig, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        await CryptoCore(HsmConfig.for_softhsm(tmp_path, pin=SECRET_PIN)).connect()
    assert info.value.code == "hsm_module_reused"


async def test_core_shares_a_login_made_by_other_code(hsm_config: HsmConfig) -> None:
    # E.g. a benchmark that logs in through python-pkcs11 directly, then starts a core.
    token = pkcs11.lib(hsm_config.module_path).get_token(token_label=hsm_config.token_label)
    direct = token.open(user_pin=hsm_config.user_pin())
    try:
        async with CryptoCore(hsm_config) as core:
            assert len(await core.random_bytes(8)) == 8
    finally:
        direct.close()


def test_hsm_directory_is_private(hsm_config: HsmConfig) -> None:
    assert hsm_config.softhsm_conf is not None and hsm_config.token_dir is not None
    assert hsm_config.softhsm_conf.parent.stat().st_mode & 0o777 == 0o700
    assert hsm_config.token_dir.stat().st_mode & 0o777 == 0o700
    assert f"directories.tokendir = {hsm_config.token_dir}" in hsm_config.softhsm_conf.read_text()
