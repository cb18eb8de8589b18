"""Token set-up from settings (``ensure_token``), each run in a fresh process:
SoftHSM reads its configuration once per process, and this one uses the shared
test token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.crypto import hsm_config_from_settings
from engine.settings import Settings, load_settings
from tests.helpers import ROOT, dew_env

SCRIPT = """
import json, sys
from engine.crypto import CryptoCore, ensure_token, hsm_config_from_settings
from engine.settings import load_settings
import asyncio

settings = load_settings()
created = ensure_token(settings)

async def use():
    async with CryptoCore(hsm_config_from_settings(settings)) as core:
        return len(await core.random_bytes(8))

print(json.dumps({"created": created, "random": asyncio.run(use())}))
"""


def _run(settings: Settings, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT,
                            env=dew_env(settings, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    data: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return data


def _fresh(tmp_path: Path) -> Settings:
    return load_settings().replace(engine={"state_dir": tmp_path / "var"},
                                   log={"console": "off"})


def test_config_from_settings(tmp_path: Path) -> None:
    settings = _fresh(tmp_path)
    config = hsm_config_from_settings(settings, environ={"DEW_HSM_PIN": "1234"})
    assert config.pin == "1234" and "1234" not in repr(config)
    assert config.softhsm_conf == (tmp_path / "var" / "hsm" / "softhsm2.conf").absolute()
    assert config.slot is None and config.token_label == "dew"
    vendor = settings.replace(hsm={"module": "/opt/vendor/libvendorpkcs11.so", "slot": 3,
                                   "pin_file": str(tmp_path / "pin")})
    config = hsm_config_from_settings(vendor, environ={})
    assert config.softhsm_conf is None and config.token_dir is None
    assert config.slot == 3 and config.pin_file == tmp_path / "pin" and config.pin is None


def test_first_run_makes_one_token_and_a_0600_pin_file(tmp_path: Path) -> None:
    settings = _fresh(tmp_path)
    # Two processes racing on a fresh state directory still make exactly one token.
    first, second = _run(settings), _run(settings)
    results = [_result(first), _result(second)]
    assert sorted(r["created"] for r in results) == [False, True]
    assert all(r["random"] == 8 for r in results)
    pin = tmp_path / "var" / "hsm" / "user.pin"
    assert pin.stat().st_mode & 0o777 == 0o600
    assert _result(_run(settings))["created"] is False
    # A PIN file others can read is refused.
    pin.chmod(0o644)
    proc = _run(settings)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "must be 0600" in err


def test_pin_from_the_environment_is_not_written(tmp_path: Path) -> None:
    settings = _fresh(tmp_path)
    assert _result(_run(settings, DEW_HSM_PIN="env-pin-4321"))["created"] is True
    assert not (tmp_path / "var" / "hsm" / "user.pin").exists()
    assert _result(_run(settings, DEW_HSM_PIN="env-pin-4321"))["random"] == 8
    proc = _run(settings, DEW_HSM_PIN="wrong-pin")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "rejected the user PIN" in err
    assert "wrong-pin" not in err
