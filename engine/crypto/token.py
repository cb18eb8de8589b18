"""First-run token set-up: create the configured token when none exists.

PINs: the user PIN is the explicit one (the caller passes ``DEW_HSM_PIN`` when
set), else the PIN file's, else a generated one written to the PIN file (mode
0600). The SO PIN is read from, or generated into, the SO PIN file (0600).
PIN files are written *before* ``C_InitToken``: a crash in between leaves a PIN
file for a token that does not exist yet (the next run reuses it), never a
token nobody knows the PIN of. PINs reach the module through ctypes and
python-pkcs11 in this process, never through a command line.
"""

from __future__ import annotations

from pathlib import Path

from engine.crypto import _pkcs11
from engine.crypto.config import HsmConfig, generate_pin, read_pin_file, write_pin_file
from engine.errors import ConfigError


def _pin_from(path: Path | None, field: str, *, explicit: str | None = None) -> str:
    if explicit is not None:
        return explicit
    if path is None:
        raise ConfigError(
            f"cannot initialise the token: no PIN and no {field} to store a generated one",
            fix=f"Set HsmConfig.{field} (or pass the PIN explicitly).",
            code="hsm_pin_missing",
        )
    if path.exists():
        return read_pin_file(path)
    pin = generate_pin()
    write_pin_file(path, pin)
    return pin


def token_exists(config: HsmConfig) -> bool:
    module = _pkcs11.load_module(config)
    return _pkcs11.find_token(module, config.token_label, config.slot) is not None


def init_token(config: HsmConfig) -> bool:
    """Create the token named by ``config`` unless it exists. True when it was created.

    Blocking (token files, PIN files); call it at start-up or through
    ``asyncio.to_thread``, before a :class:`~engine.crypto.CryptoCore` connects.
    """
    module = _pkcs11.load_module(config)
    if _pkcs11.find_token(module, config.token_label, config.slot) is not None:
        return False
    user_pin = _pin_from(config.pin_file, "pin_file", explicit=config.pin)
    so_pin = _pin_from(config.so_pin_file, "so_pin_file")
    slot_id = _pkcs11.free_slot_id(module, config.slot)
    _pkcs11.init_token(module, slot_id, config.token_label, so_pin, user_pin)
    return True
