"""HSM configuration, PIN files and the SoftHSM2 configuration file.

The PKCS#11 module path, token label and slot are plain configuration, so a
vendor HSM replaces SoftHSM without code changes: set ``module_path`` to the
vendor's library and ``softhsm_conf`` to None (:func:`hsm_config_from_settings`
does this from the ``[hsm]`` settings). A token served over the network by
``p11-kit server`` (``dew hsm serve``) is the same: ``module_path`` is
``p11-kit-client.so`` and ``server_address`` its socket (``unix:path=...``).
A PIN comes from ``pin`` (the
caller passes ``DEW_HSM_PIN`` when set) or from ``pin_file``, which must be mode
0600 and owned by us. The PIN never appears in a repr, a log line or an error.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.settings import Settings

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_TOKEN_LABEL = "dew"
PIN_FILE_MODE = 0o600


@dataclass(frozen=True, repr=False)
class HsmConfig:
    module_path: str = SOFTHSM_MODULE
    token_label: str = DEFAULT_TOKEN_LABEL
    slot: int | None = None
    pin: str | None = field(default=None, compare=False)
    pin_file: Path | None = None
    so_pin_file: Path | None = None
    # SoftHSM only: the softhsm2.conf to write (if missing) and point SOFTHSM2_CONF at.
    softhsm_conf: Path | None = None
    token_dir: Path | None = None
    # p11-kit client only: the server's address (unix:path=SOCKET); None: the
    # P11_KIT_SERVER_ADDRESS of the environment.
    server_address: str | None = None
    pool_size: int = 2
    # How long a pool thread uses its in-memory copy of a secret key before it checks
    # that the token object still exists (another process may have destroyed it).
    # 0: no copies; the token object is used, and checked by the module, every time.
    key_recheck_seconds: float = 1.0
    # Child processes for the data plane's token calls (engine/crypto/_lane.py); 0:
    # the pool threads make them. A local module only (not through p11-kit).
    data_processes: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.pool_size <= 64:
            raise ConfigError(f"hsm pool_size must be 1..64, got {self.pool_size}")
        if not 0 <= self.data_processes <= 16:
            raise ConfigError(f"hsm data_processes must be 0..16, got {self.data_processes}")
        if not 0 <= self.key_recheck_seconds <= 60:
            raise ConfigError("hsm key_recheck_seconds must be 0..60, got "
                              f"{self.key_recheck_seconds}")
        if not self.token_label or len(self.token_label.encode()) > 32:
            raise ConfigError("hsm token_label must be 1..32 bytes (a PKCS#11 token label)")

    @classmethod
    def for_softhsm(
        cls,
        state_dir: Path | str,
        *,
        pin: str | None = None,
        token_label: str = DEFAULT_TOKEN_LABEL,
        module_path: str = SOFTHSM_MODULE,
        pool_size: int = 2,
    ) -> HsmConfig:
        """The default layout: ``STATE/hsm/{softhsm2.conf,tokens/,user.pin,so.pin}``."""
        hsm = Path(state_dir) / "hsm"
        return cls(
            module_path=module_path,
            token_label=token_label,
            pin=pin,
            pin_file=hsm / "user.pin",
            so_pin_file=hsm / "so.pin",
            softhsm_conf=hsm / "softhsm2.conf",
            token_dir=hsm / "tokens",
            pool_size=pool_size,
        )

    def __repr__(self) -> str:
        return (
            f"HsmConfig(module_path={self.module_path!r}, token_label={self.token_label!r}, "
            f"slot={self.slot!r}, pin={'<hidden>' if self.pin is not None else None}, "
            f"pin_file={self.pin_file!r}, so_pin_file={self.so_pin_file!r}, "
            f"softhsm_conf={self.softhsm_conf!r}, token_dir={self.token_dir!r}, "
            f"server_address={self.server_address!r}, pool_size={self.pool_size!r})"
        )

    __str__ = __repr__

    def user_pin(self) -> str:
        """The user PIN: the explicit value, else the PIN file."""
        if self.pin is not None:
            return self.pin
        if self.pin_file is not None and self.pin_file.exists():
            return read_pin_file(self.pin_file)
        if is_p11kit_client(self.module_path):
            # A node of a served token: its PIN file was written on the HSM node.
            raise ConfigError(
                "no HSM user PIN is configured for the served token",
                cause="neither DEW_HSM_PIN nor an existing PIN file was given",
                fix="Copy the HSM node's STATE_DIR/hsm/user.pin to "
                + (f"{self.pin_file} " if self.pin_file else "this node ")
                + "(mode 0600; or set hsm.pin_file), or set DEW_HSM_PIN.",
                code="hsm_pin_missing",
            )
        raise ConfigError(
            "no HSM user PIN is configured",
            cause="neither an explicit PIN nor an existing PIN file was given",
            fix="Set DEW_HSM_PIN, or initialise the token so that it writes the PIN file"
            + (f" {self.pin_file}" if self.pin_file else "")
            + ".",
            code="hsm_pin_missing",
        )


def read_pin_file(path: Path) -> str:
    """Read a PIN file, refusing one that others could read or that is not ours."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the PIN file {path}: {exc.strerror}", code="hsm_pin_file"
        ) from None
    mode = stat.S_IMODE(st.st_mode)
    if mode != PIN_FILE_MODE:
        raise ConfigError(
            f"the PIN file {path} has mode {mode:04o}; it must be 0600",
            cause="a PIN file readable by others exposes the HSM user PIN",
            fix=f"chmod 600 {path}",
            code="hsm_pin_file_mode",
        )
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"the PIN file {path} is owned by uid {st.st_uid}, not by this user",
            fix=f"chown {os.geteuid()} {path}",
            code="hsm_pin_file_owner",
        )
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ConfigError(f"the PIN file {path} is empty", code="hsm_pin_file")
    return text


def write_pin_file(path: Path, pin: str) -> None:
    """Write a PIN atomically, mode 0600 from the first byte (O_EXCL temp, fsync, rename)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PIN_FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(pin + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_pin() -> str:
    # 32 hex characters: within every SoftHSM / common HSM PIN length limit.
    return secrets.token_hex(16)


def ensure_softhsm_conf(conf: Path, token_dir: Path) -> None:
    """Create ``softhsm2.conf`` naming ``token_dir`` unless it already exists."""
    # The HSM directory holds the PIN files too: private from its creation.
    conf.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if conf.exists():
        return
    conf.write_text(
        f"directories.tokendir = {token_dir}\nobjectstore.backend = file\nlog.level = ERROR\n",
        encoding="utf-8",
    )


# --------------------------------------------------------------------------- from settings

PIN_VARIABLE = "DEW_HSM_PIN"


def is_softhsm_module(module_path: str) -> bool:
    """SoftHSM2's library (``libsofthsm2.so`` wherever it is installed)."""
    return Path(module_path).name.startswith("libsofthsm2")


def is_p11kit_client(module_path: str) -> bool:
    """p11-kit's client module: a token served by ``p11-kit server`` (``dew hsm serve``)."""
    return Path(module_path).name.startswith("p11-kit-client")


def hsm_config_from_settings(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> HsmConfig:
    """The HSM configuration of a process: ``[hsm]`` settings plus ``DEW_HSM_PIN``.

    With SoftHSM's module the token lives under the state directory
    (``STATE/hsm/{softhsm2.conf,tokens/}``); any other module is a vendor HSM
    whose own configuration finds its token, so no softhsm2.conf is written. With
    p11-kit's client (``hsm.module = "p11-kit-client"`` or its path) the token is
    the one ``hsm.server_address`` serves.
    The PIN is ``DEW_HSM_PIN`` when set (it is deliberately not a setting:
    settings get printed), else the PIN file: ``hsm.pin_file`` or
    ``STATE/hsm/user.pin``.
    """
    env = os.environ if environ is None else environ
    hsm = settings.hsm
    module = hsm.module
    server_address = None
    if is_p11kit_client(module):
        from engine.crypto import _remote  # imports python-pkcs11: only when needed

        module = _remote.resolve_client(module)
        server_address = _remote.check_address(hsm.server_address) if hsm.server_address \
            else None
    pin = env.get(PIN_VARIABLE) or None
    # Absolute, so a token directory written into softhsm2.conf does not depend
    # on the directory a later process starts in.
    state = settings.state_dir.absolute()
    pin_file = Path(hsm.pin_file).absolute() if hsm.pin_file else state / "hsm" / "user.pin"
    base = HsmConfig.for_softhsm(
        state, pin=pin, token_label=hsm.token_label, module_path=module,
        pool_size=hsm.pool_size,
    )
    softhsm = is_softhsm_module(module)
    token_dir = base.token_dir
    if softhsm and base.softhsm_conf is not None:
        # An existing softhsm2.conf is the truth about where the tokens are.
        token_dir = tokendir_of(base.softhsm_conf) or token_dir
    return replace(
        base,
        slot=None if hsm.slot < 0 else hsm.slot,
        pin_file=pin_file,
        softhsm_conf=base.softhsm_conf if softhsm else None,
        token_dir=token_dir if softhsm else None,
        server_address=server_address,
        data_processes=max(hsm.data_processes, 0),  # auto (-1): `dew api` sets it
    )


def tokendir_of(conf: Path) -> Path | None:
    """The ``directories.tokendir`` a softhsm2.conf names, if the file exists."""
    try:
        text = conf.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(
            f"cannot read {conf}: {exc.strerror}", code="hsm_conf_unreadable"
        ) from None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "directories.tokendir" and value.strip():
            return Path(value.strip())
    return None


def ensure_token(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """Initialise the configured token unless it exists; True when it was created.

    The user PIN is ``DEW_HSM_PIN`` when set, else the PIN file's, else a
    generated one written to the PIN file (mode 0600). Blocking: call it from
    ``dew init`` or through ``asyncio.to_thread``.

    SoftHSM lists its tokens once, in ``C_Initialize``: a process that loaded
    the module before another process created the token never sees it, and
    would create a second token with the same label. So the check-and-create
    runs under an exclusive lock on ``STATE/hsm/.init.lock``, and a marker
    file written after creation lets later processes skip loading the module
    here at all (they load it when they connect, and then see the token).
    """
    from engine.crypto.token import init_token, token_exists  # they import this module

    config = hsm_config_from_settings(settings, environ)
    if config.softhsm_conf is not None:
        return _ensure_softhsm_token(config, init_token)
    if config.softhsm_conf is None:
        # A vendor HSM's tokens are made with the vendor's tools (C_InitToken on a
        # real device may need its SO and wipes the slot), a served token where it
        # is served (`dew hsm serve`): only check.
        if token_exists(config):
            return False
        if is_p11kit_client(config.module_path):
            from engine.crypto import _remote

            raise ConfigError(
                f"the HSM served at {_remote.address_of(config.server_address)} has no "
                f"initialised token labelled {config.token_label!r}",
                fix="Serve that token (`dew hsm serve` with the same hsm.token_label on the "
                "HSM node), or set hsm.token_label to the label it serves.",
                code="hsm_token_missing",
            )
        raise ConfigError(
            f"no initialised token labelled {config.token_label!r} in {config.module_path}",
            fix="Create the token with your HSM vendor's tools, or set hsm.token_label / "
            "hsm.slot to an existing one.",
            code="hsm_token_missing",
        )
    return init_token(config)


def _ensure_softhsm_token(config: HsmConfig, init: Callable[[HsmConfig], bool]) -> bool:
    assert config.softhsm_conf is not None
    hsm = config.softhsm_conf.parent
    hsm.mkdir(mode=0o700, parents=True, exist_ok=True)
    marker = hsm / f".token-{config.token_label.encode().hex()}.ready"
    lock_fd = os.open(hsm / ".init.lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(lock_fd, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        tokens = config.token_dir
        if marker.exists() and tokens is not None and any(tokens.iterdir()):
            return False
        created = init(config)  # loads the module: a no-op if the token is already there
        marker.touch(mode=0o600)
        return created
