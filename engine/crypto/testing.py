"""Test support: one throw-away SoftHSM2 token per process.

SoftHSM reads ``SOFTHSM2_CONF`` once, when the module is initialised, and a
process initialises the module once; so every test suite in a pytest process
must share one token directory. :func:`shared_softhsm_config` hands out the
same config to every caller (tests/crypto, handler tests, ...), creating the
token in a temporary directory on first use and removing it at exit.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from engine.crypto.config import HsmConfig
from engine.crypto.token import init_token

_LOCK = threading.Lock()
_SHARED: HsmConfig | None = None


def shared_softhsm_config(pool_size: int = 2) -> HsmConfig:
    """The process's test token (label ``dew-test``, generated PINs in 0600 files)."""
    global _SHARED
    with _LOCK:
        if _SHARED is None:
            state = Path(tempfile.mkdtemp(prefix="dew-hsm-"))
            atexit.register(shutil.rmtree, state, True)
            config = HsmConfig.for_softhsm(state, token_label="dew-test", pool_size=pool_size)
            init_token(config)
            _SHARED = config
        if _SHARED.pool_size != pool_size:
            return replace(_SHARED, pool_size=pool_size)
        return _SHARED

