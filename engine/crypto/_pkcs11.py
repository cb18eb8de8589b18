"""Everything raw about PKCS#11: module loading, login, templates, mechanisms.

This is the only module that calls python-pkcs11, and :func:`translate` is the
only place its exceptions become ours. The rest of ``engine.crypto`` sees
opaque sessions and keys and our errors.

Module loading: the module is initialised once per process with
``CKF_OS_LOCKING_OK`` (see :mod:`engine.crypto._cinit`), then python-pkcs11
attaches to it through :class:`_AttachedLib`. If the module refuses OS locking
(``CKR_CANT_LOCK``) or someone initialised it before us, we fall back to a
plain initialisation and report ``os_locking=False``; the pool then uses one
session on one thread.

A p11-kit client module (a token served over a socket) is not initialised that
way: :mod:`engine.crypto._remote` explains why, and its ``RemoteToken`` takes
the place of the python-pkcs11 Token (reconnecting when the server comes back).

Login: PKCS#11 login state belongs to the application, not to a session, and
closing the session that logged in logs out every session. So one "anchor"
session per token logs in, reference-counted across the process; worker
sessions never log in themselves.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from pkcs11 import (
    MGF,
    Attribute,
    GCMParams,
    KeyType,
    Mechanism,
    ObjectClass,
    Session,
    Token,
    TokenFlag,
)
from pkcs11 import _pkcs11 as _native
from pkcs11.util.ec import encode_named_curve_parameters

from engine.crypto import _cinit, _remote, gcm_ecb
from engine.crypto.config import HsmConfig, ensure_softhsm_conf
from engine.crypto.errors import (
    HsmUnreachable,
    IntegrityCheckFailed,
    KeyExists,
    KeyNotFound,
    KeyUsageError,
)
from engine.crypto.model import GCM_TAG_BYTES, KeyFamily, KeyInfo, KeySpec, Sealed, SignAlgorithm
from engine.crypto.oaep import decryption_failed
from engine.errors import (
    BackendUnavailable,
    ConfigError,
    Conflict,
    DewError,
    InternalError,
    InvalidInput,
    SecurityError,
)

T = TypeVar("T")
INIT_TOKEN_FIX = (
    "Initialise the token with engine.crypto.init_token (the CLI's HSM set-up step), "
    "or for a vendor HSM create the token with the vendor's tools."
)


# --------------------------------------------------------------------------- errors


class StaleHandle(KeyNotFound):
    """A cached key handle no longer names an object; the pool looks the key up again."""


class SessionLost(BackendUnavailable):
    """The session is gone (closed, device removed); the pool drops it and reopens."""


class ConnectionLost(SessionLost, HsmUnreachable):
    """The module's device (for p11-kit: its socket) is gone: the pool drops the
    session, and the next one is opened on a new connection (``_remote``)."""

    code = "hsm_unreachable"


def _unsupported(action: str, label: str | None, exc: p11e.PKCS11Error) -> DewError:
    return InvalidInput(
        f"the HSM does not support what {action} needs",
        cause=type(exc).__name__,
        fix="Choose another key spec or algorithm; this token lacks the mechanism or size.",
        code="hsm_mechanism_unsupported",
        target=label,
    )


def _map(exc: p11e.PKCS11Error, action: str, label: str | None, integrity: bool) -> DewError:
    """One python-pkcs11 exception -> one of our errors. Messages never carry a PIN."""
    name = type(exc).__name__
    what = f"{action} ({label!r})" if label else action
    if integrity and isinstance(
        exc, p11e.GeneralError | p11e.EncryptedDataInvalid | p11e.EncryptedDataLenRange
    ):
        # SoftHSM reports a GCM tag mismatch as CKR_GENERAL_ERROR (see FACTS.md).
        return IntegrityCheckFailed(
            "integrity check failed: wrong key, wrong additional data, or altered ciphertext",
            cause=name,
            target=label,
        )
    if isinstance(exc, p11e.PinIncorrect):
        return ConfigError(
            "the HSM rejected the user PIN",
            cause=name,
            fix="Set DEW_HSM_PIN (or the PIN file) to the token's user PIN.",
            code="hsm_pin_incorrect",
        )
    if isinstance(exc, p11e.PinLocked | p11e.PinExpired):
        return ConfigError(
            "the token's user PIN is locked or expired",
            cause=name,
            fix="Unlock or reset the user PIN with the token's security officer PIN.",
            code="hsm_pin_locked",
        )
    if isinstance(exc, p11e.PinInvalid | p11e.PinLenRange | p11e.PinTooWeak):
        return ConfigError(
            "the HSM does not accept this PIN (characters or length)",
            cause=name,
            code="hsm_pin_invalid",
        )
    if isinstance(exc, p11e.UserPinNotInitialized):
        return ConfigError(
            "the token's user PIN is not initialised", cause=name, fix=INIT_TOKEN_FIX,
            code="hsm_token_uninitialised",
        )
    if isinstance(exc, p11e.NoSuchToken | p11e.TokenNotRecognised):
        return ConfigError(
            "no usable token found", cause=name, fix=INIT_TOKEN_FIX, code="hsm_token_missing"
        )
    if isinstance(exc, p11e.MultipleTokensReturned):
        return ConfigError(
            "several tokens match the configured label", cause=name,
            fix="Set the HSM slot to choose one.", code="hsm_token_ambiguous",
        )
    if isinstance(exc, p11e.NoSuchKey):
        return KeyNotFound(f"no key labelled {label!r} in the HSM", cause=name, target=label)
    if isinstance(exc, p11e.ObjectHandleInvalid | p11e.KeyHandleInvalid):
        return StaleHandle(f"the key {label!r} vanished from the HSM", cause=name, target=label)
    if isinstance(exc, p11e.MultipleObjectsReturned):
        return Conflict(
            f"several HSM objects share the label {label!r}", cause=name,
            fix="Destroy the duplicate objects (pkcs11-tool --delete-object) or use another label.",
            code="hsm_label_ambiguous", target=label,
        )
    if isinstance(exc, p11e.AttributeSensitive | p11e.KeyUnextractable | p11e.KeyNotWrappable):
        return SecurityError(
            f"refused: key material of {label!r} cannot leave the HSM", cause=name,
            code="key_unextractable", target=label,
        )
    if isinstance(exc, p11e.KeyTypeInconsistent):
        return KeyUsageError(f"the key cannot {action}", cause=name, target=label)
    if isinstance(
        exc,
        p11e.MechanismInvalid | p11e.MechanismParamInvalid | p11e.KeySizeRange
        | p11e.FunctionNotSupported | p11e.DomainParamsInvalid,
    ):
        return _unsupported(action, label, exc)
    if isinstance(exc, p11e.DataLenRange | p11e.DataInvalid):
        return InvalidInput(f"the HSM refused the data length for {what}", cause=name)
    if isinstance(exc, p11e.SessionHandleInvalid | p11e.SessionClosed | p11e.UserNotLoggedIn):
        return SessionLost(f"the HSM session was lost during {what}", cause=name)
    if isinstance(exc, p11e.DeviceError | p11e.DeviceRemoved | p11e.TokenNotPresent) or (
            _remote.not_initialised(exc)):
        # What p11-kit's client answers once its socket is gone (measured): retried,
        # and the next session is opened on a new connection.
        addresses = _remote.known_addresses()
        where = f" (p11-kit socket {addresses})" if addresses else ""
        return ConnectionLost(
            f"the HSM became unreachable during {what}{where}",
            cause="CKR_CRYPTOKI_NOT_INITIALIZED" if name == "PKCS11Error" else name,
        )
    if isinstance(
        exc,
        p11e.DeviceMemory | p11e.HostMemory | p11e.SessionCount | p11e.FunctionFailed,
    ):
        return BackendUnavailable(
            f"the HSM failed during {what}", cause=name,
            fix="Check that the HSM is reachable and has room; then retry.",
            code="hsm_unavailable",
        )
    if isinstance(exc, p11e.TokenWriteProtected | p11e.SessionReadOnly):
        return ConfigError(f"the token is read-only; cannot {action}", cause=name,
                           code="hsm_read_only")
    return InternalError(f"unexpected HSM error during {what}", cause=name)


@contextmanager
def translate(action: str, label: str | None = None, *, integrity: bool = False) -> Iterator[None]:
    """Run python-pkcs11 calls, turning its exceptions into ours."""
    try:
        yield
    except p11e.PKCS11Error as exc:
        raise _map(exc, action, label, integrity) from exc


# --------------------------------------------------------------------------- module


class _AttachedLib(_native.lib):
    """python-pkcs11's ``lib`` for a module we initialised ourselves.

    ``lib.__init__`` (and ``pkcs11.lib()`` when ``initialized`` is False) call
    ``initialize()``, which would send ``C_Initialize(NULL)`` and fail with
    CKR_CRYPTOKI_ALREADY_INITIALIZED. The override makes it a no-op.
    """

    def initialize(self) -> None:
        return None


@dataclass
class Module:
    path: str
    softhsm_conf: str | None
    os_locking: bool
    lib: _native.lib
    raw: _cinit.RawModule | None
    # p11-kit client modules: the server address in use (None: a local module), and
    # the configured one (None: P11_KIT_SERVER_ADDRESS's).
    address: str | None = None
    server_address: str | None = None


_MODULES: dict[str, Module] = {}
_MODULES_LOCK = threading.Lock()


def _same_file(a: str | None, b: str) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


def load_module(config: HsmConfig) -> Module:
    """Load and initialise the configured module once per process (a p11-kit client:
    a new connection each time, see ``_remote``)."""
    if _remote.is_client(config.module_path):
        with translate("connect to the HSM through p11-kit"):
            lib = _remote.open_lib(config.module_path, config.server_address)
        # os_locking: the RPC client locks its socket itself (see _remote).
        return Module(config.module_path, None, True, lib, None,
                      address=_remote.address_of(config.server_address),
                      server_address=config.server_address)
    conf = str(config.softhsm_conf) if config.softhsm_conf else None
    with _MODULES_LOCK:
        module = _MODULES.get(config.module_path)
        if module is not None:
            # The same file under another name (a symlink) is the same configuration.
            if conf is not None and not _same_file(module.softhsm_conf, conf):
                raise ConfigError(
                    f"{config.module_path} is already loaded in this process with "
                    f"SOFTHSM2_CONF={module.softhsm_conf}, not {conf}",
                    cause="SoftHSM reads its configuration once, when it is initialised",
                    fix="Use one token directory per process.",
                    code="hsm_module_reused",
                )
            return module
        if config.softhsm_conf is not None:
            token_dir = config.token_dir or config.softhsm_conf.parent / "tokens"
            ensure_softhsm_conf(config.softhsm_conf, Path(token_dir))
            # SoftHSM reads SOFTHSM2_CONF inside C_Initialize: set it just before.
            os.environ["SOFTHSM2_CONF"] = str(config.softhsm_conf)
        raw = _cinit.load(config.module_path)
        rv = raw.initialize(os_locking=True)
        os_locking = rv == _cinit.CKR_OK
        if rv == _cinit.CKR_CANT_LOCK:
            rv = raw.initialize(os_locking=False)
        if rv not in (_cinit.CKR_OK, _cinit.CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise BackendUnavailable(
                f"C_Initialize of {config.module_path} failed (CK_RV 0x{rv:x})",
                fix="Check the module's own configuration (for SoftHSM: SOFTHSM2_CONF and "
                "its token directory) and retry.",
                code="hsm_init_failed",
            )
        try:
            lib = _AttachedLib(config.module_path)
        except p11e.PKCS11Error as exc:
            if not _remote.not_initialised(exc):
                raise _map(exc, "attach to the PKCS#11 module", None, False) from exc
            # The module handed python-pkcs11 another function list than ours (as
            # p11-kit's do): ours initialised nothing it uses. Let python-pkcs11
            # initialise its own, without OS locking: one session on one thread.
            raw.finalize()
            os_locking = False
            with translate("initialise the PKCS#11 module"):
                lib = _native.lib(config.module_path)
        _register_with_python_pkcs11(config.module_path, lib)
        module = Module(config.module_path, conf, os_locking, lib, raw)
        _MODULES[config.module_path] = module
        return module


def _register_with_python_pkcs11(path: str, lib: _native.lib) -> None:
    # pkcs11.lib(path) keeps a per-path cache; seeding it means other code in the
    # process (benchmarks, tools) that calls pkcs11.lib(path) shares our
    # OS-locking module instead of failing on a second C_Initialize.
    loaded = getattr(pkcs11, "_loaded", None)
    if isinstance(loaded, dict) and loaded.setdefault(path, lib) is lib:
        # Take it back before interpreter shutdown: freed during python-pkcs11's
        # own teardown, the object errors out on a half-dismantled module.
        atexit.register(loaded.pop, path, None)


def find_token(module: Module, label: str, slot: int | None) -> Token | None:
    """The initialised token with ``label`` (in ``slot`` when given), or None."""
    with translate("list the HSM slots"):
        found: list[Token] = list(_remote.tokens_in(module.lib, label, slot))
    if len(found) > 1:
        raise ConfigError(
            f"{len(found)} tokens are labelled {label!r}",
            fix="Set the HSM slot to choose one.",
            code="hsm_token_ambiguous",
        )
    return found[0] if found else None


def require_token(module: Module, label: str, slot: int | None) -> Any:
    """The token (for a p11-kit client, a ``_remote.RemoteToken`` standing in for it)."""
    token = find_token(module, label, slot)
    if token is None:
        where = f" in slot {slot}" if slot is not None else ""
        if module.address is not None:
            raise ConfigError(
                f"the HSM served at {module.address} has no initialised token labelled "
                f"{label!r}{where}",
                fix="Serve that token (`dew hsm serve` with the same hsm.token_label), or "
                "set hsm.token_label to the label it serves.",
                code="hsm_token_missing",
            )
        raise ConfigError(
            f"no initialised token labelled {label!r}{where} in {module.path}",
            fix=INIT_TOKEN_FIX,
            code="hsm_token_missing",
        )
    if not token.flags & TokenFlag.USER_PIN_INITIALIZED:
        raise ConfigError(
            f"the user PIN of token {label!r} is not initialised",
            fix=INIT_TOKEN_FIX,
            code="hsm_token_uninitialised",
        )
    if module.address is not None:
        with translate("list the token's mechanisms"):
            return _remote.adopt(module.path, module.server_address, label, slot,
                                 module.lib, token)
    return token


def free_slot_id(module: Module, slot: int | None) -> int:
    """A slot whose token is not initialised yet (SoftHSM always keeps one free)."""
    with translate("list the HSM slots"):
        for candidate in module.lib.get_slots(token_present=True):
            if slot is not None and candidate.slot_id != slot:
                continue
            if not candidate.get_token().flags & TokenFlag.TOKEN_INITIALIZED:
                return int(candidate.slot_id)
    raise ConfigError(
        f"no free slot to initialise a token in {module.path}",
        fix="For SoftHSM, check the token directory; for a vendor HSM, use its tools.",
        code="hsm_no_free_slot",
    )


def init_token(module: Module, slot_id: int, label: str, so_pin: str, user_pin: str) -> None:
    """C_InitToken with the SO PIN, then C_InitPIN for the user PIN."""
    if module.raw is None:
        raise ConfigError(f"tokens are not initialised through {module.path}",
                          fix="Initialise the token where it is served (`dew hsm serve`).",
                          code="hsm_init_token_failed")
    rv = module.raw.init_token(slot_id, so_pin, label)
    if rv != _cinit.CKR_OK:
        raise ConfigError(
            f"C_InitToken for token {label!r} failed (CK_RV 0x{rv:x})",
            fix="Check that the slot is free and that no session is open on it.",
            code="hsm_init_token_failed",
        )
    token = find_token(module, label, None)
    if token is None:
        raise InternalError(f"token {label!r} not visible after C_InitToken")
    with translate("set the token's user PIN", label), token.open(rw=True, so_pin=so_pin) as so:
        so.init_pin(user_pin)


# --------------------------------------------------------------------------- sessions


@dataclass
class _Login:
    anchor: Session
    pin_digest: bytes
    users: int


_LOGINS: dict[tuple[str, int], _Login] = {}
_LOGINS_LOCK = threading.Lock()
_PIN_SALT = secrets.token_bytes(16)


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(_PIN_SALT + pin.encode("utf-8")).digest()


def _token_key(module: Module, token: Token) -> tuple[str, int]:
    return module.path, int(token.slot.slot_id)


def login(module: Module, token: Any, pin: str) -> None:
    """Log the process in to ``token`` (reference-counted; PIN checked every time)."""
    if isinstance(token, _remote.RemoteToken):
        with translate("log in to the HSM token", token.label):
            token.login(pin)
        return
    key = _token_key(module, token)
    with _LOGINS_LOCK:
        current = _LOGINS.get(key)
        if current is not None:
            if not hmac.compare_digest(current.pin_digest, _pin_digest(pin)):
                raise ConfigError(
                    "this process is logged in to the token with a different user PIN",
                    fix="Use the same HSM PIN for every crypto core of a process.",
                    code="hsm_pin_incorrect",
                )
            current.users += 1
            return
        with translate("log in to the HSM token", token.label):
            anchor = _open_logged_in(token, pin)
        _LOGINS[key] = _Login(anchor, _pin_digest(pin), 1)


# SoftHSM rewrites its token file at every login, and logins of several processes at
# once (a worker and an API starting together) now and then fail with
# CKR_GENERAL_ERROR (measured: 1 in 40 with two processes logging in in a loop).
LOGIN_TRIES = 3
LOGIN_PAUSE = 0.05


def _open_logged_in(token: Any, pin: str) -> Any:
    for attempt in range(LOGIN_TRIES):
        try:
            return token.open(rw=True, user_pin=pin)
        except p11e.UserAlreadyLoggedIn:
            # Other code in this process (a tool using python-pkcs11 directly)
            # logged in first; share its login rather than fail.
            return token.open(rw=True)
        except p11e.GeneralError:
            if attempt == LOGIN_TRIES - 1:
                raise
            time.sleep(LOGIN_PAUSE)
    raise AssertionError("unreachable")


def logout(module: Module, token: Any) -> None:
    if isinstance(token, _remote.RemoteToken):
        token.release()
        return
    key = _token_key(module, token)
    with _LOGINS_LOCK:
        current = _LOGINS.get(key)
        if current is None:
            return
        current.users -= 1
        if current.users > 0:
            return
        del _LOGINS[key]
        # Closing the anchor logs out every session of the process on this token.
        with translate("log out of the HSM token", token.label):
            current.anchor.close()


def open_session(token: Token) -> Session:
    """A worker session; it inherits the process's login (see :func:`login`)."""
    with translate("open an HSM session", token.label):
        return token.open(rw=True)


def close_session(session: Session) -> None:
    with translate("close an HSM session"):
        session.close()


# --------------------------------------------------------------------------- templates

_EC_CURVES: dict[KeySpec, str] = {KeySpec.EC_P256: "secp256r1", KeySpec.EC_P384: "secp384r1"}
_CURVE_BY_PARAMS: dict[bytes, KeySpec] = {
    encode_named_curve_parameters(name): spec for spec, name in _EC_CURVES.items()
}
_SECRET_KEY_TYPES: dict[KeyFamily, KeyType] = {
    KeyFamily.AES: KeyType.AES,
    KeyFamily.HMAC: KeyType.GENERIC_SECRET,
}

_SECRET_USAGES = (
    Attribute.ENCRYPT,
    Attribute.DECRYPT,
    Attribute.WRAP,
    Attribute.UNWRAP,
    Attribute.SIGN,
    Attribute.VERIFY,
    Attribute.DERIVE,
)
# A private key takes only these usage attributes; SoftHSM answers
# CKR_ATTRIBUTE_TYPE_INVALID to e.g. CKA_ENCRYPT on a private key.
_PRIVATE_USAGES = (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.SIGN, Attribute.DERIVE)
_PUBLIC_USAGES = (Attribute.ENCRYPT, Attribute.WRAP, Attribute.VERIFY)


def _usages(possible: tuple[Attribute, ...], *allowed: Attribute) -> dict[Attribute, Any]:
    # Every usage attribute is set explicitly, so no module default leaks in.
    return {attr: attr in allowed for attr in possible}


def _protected(label: str, key_id: bytes) -> dict[Attribute, Any]:
    """What every master (private/secret) key is: in the token, never readable."""
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
    }


def secret_key_template(spec: KeySpec, label: str, key_id: bytes) -> dict[Attribute, Any]:
    usage = (
        _usages(_SECRET_USAGES, Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP,
                Attribute.UNWRAP)
        if spec.family is KeyFamily.AES
        else _usages(_SECRET_USAGES, Attribute.SIGN, Attribute.VERIFY)
    )
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: _SECRET_KEY_TYPES[spec.family],
        Attribute.VALUE_LEN: spec.bits // 8,
        **_protected(label, key_id),
        **usage,
    }


def keypair_templates(
    spec: KeySpec, label: str, key_id: bytes
) -> tuple[dict[Attribute, Any], dict[Attribute, Any]]:
    """(public, private) templates for RSA / EC."""
    public: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
    }
    private: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        **_protected(label, key_id),
    }
    if spec.family is KeyFamily.RSA:
        public |= {
            Attribute.MODULUS_BITS: spec.bits,
            Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
            **_usages(_PUBLIC_USAGES, Attribute.VERIFY, Attribute.ENCRYPT),
        }
        private |= _usages(_PRIVATE_USAGES, Attribute.SIGN, Attribute.DECRYPT)
    else:
        public |= {
            Attribute.EC_PARAMS: encode_named_curve_parameters(_EC_CURVES[spec]),
            **_usages(_PUBLIC_USAGES, Attribute.VERIFY),
        }
        private |= _usages(_PRIVATE_USAGES, Attribute.SIGN)
    return public, private


# --------------------------------------------------------------------------- operations


# Searches by label and the making or destroying of session copies take turns in a
# process. SoftHSM's C_CopyObject gives a copy every attribute of its source (label
# and CKA_TOKEN included) and applies the copy's template only after: a search of
# another session's thread in between found two keys under one label (0.7% of the
# rounds of 8 concurrent first uses of a new key; no attribute tells them apart).
# Session objects are the process's own, so searches in other processes never see
# them; both are rare here (a key's first use per thread, a cache miss).
_COPY_OR_SEARCH = threading.Lock()


def _search(session: Session, template: dict[Any, Any]) -> list[Any]:
    """Every object matching ``template`` (the search run to its end)."""
    with _COPY_OR_SEARCH:
        return list(session.get_objects(template))


def objects_with_label(session: Session, label: str) -> list[Any]:
    with translate("look up key", label):
        return _search(session, {Attribute.LABEL: label})


def generate_key(session: Session, spec: KeySpec, label: str, key_id: bytes) -> KeyInfo:
    if objects_with_label(session, label):
        raise KeyExists(f"a key labelled {label!r} already exists in the HSM", target=label)
    def make() -> Any:
        if spec.family in _SECRET_KEY_TYPES:
            return session.generate_key(
                _SECRET_KEY_TYPES[spec.family],
                spec.bits,
                label=label,
                id=key_id,
                store=True,
                template=secret_key_template(spec, label, key_id),
            )
        public, private = keypair_templates(spec, label, key_id)
        return session.generate_keypair(
            KeyType.RSA if spec.family is KeyFamily.RSA else KeyType.EC,
            spec.bits if spec.family is KeyFamily.RSA else None,
            label=label,
            id=key_id,
            store=True,
            public_template=public,
            private_template=private,
        )

    with translate(f"generate a {spec.value} key", label):
        once_more_if_nothing_made(session, {Attribute.LABEL: label}, make)
    return KeyInfo(label, key_id, spec)


def destroy_key(session: Session, label: str) -> bool:
    objects = objects_with_label(session, label)
    with translate("destroy key", label):
        for obj in objects:
            obj.destroy()
    return bool(objects)


def key_info(session: Session, label: str) -> KeyInfo:
    objects = objects_with_label(session, label)
    if not objects:
        raise KeyNotFound(f"no key labelled {label!r} in the HSM", target=label)
    by_class = {obj.object_class: obj for obj in objects}
    with translate("read key attributes", label):
        main = by_class.get(ObjectClass.SECRET_KEY)
        if main is None:
            main = by_class.get(ObjectClass.PUBLIC_KEY, objects[0])
        key_id = bytes(main[Attribute.ID])
        return KeyInfo(label, key_id, _spec_of(main))


def _spec_of(obj: Any) -> KeySpec | None:
    key_type = obj[Attribute.KEY_TYPE]
    if obj.object_class is ObjectClass.SECRET_KEY:
        bits = int(obj[Attribute.VALUE_LEN]) * 8
        name = {KeyType.AES: "AES", KeyType.GENERIC_SECRET: "HMAC"}.get(key_type)
        return KeySpec.__members__.get(f"{name}_{bits}") if name else None
    if obj.object_class is not ObjectClass.PUBLIC_KEY:
        return None
    if key_type == KeyType.RSA:
        return KeySpec.__members__.get(f"RSA_{len(obj[Attribute.MODULUS]) * 8}")
    if key_type == KeyType.EC:
        return _CURVE_BY_PARAMS.get(bytes(obj[Attribute.EC_PARAMS]))
    return None


_KIND_CLASS: dict[str, ObjectClass] = {
    "secret": ObjectClass.SECRET_KEY,
    "private": ObjectClass.PRIVATE_KEY,
    "public": ObjectClass.PUBLIC_KEY,
}


def find_key(session: Session, label: str, kind: str) -> Any:
    """The ``kind`` ("secret" / "private" / "public") key labelled ``label``."""
    try:
        with translate("look up key", label):
            found = _search(session, {Attribute.CLASS: _KIND_CLASS[kind], Attribute.LABEL: label})
            if not found:
                raise p11e.NoSuchKey(label)
            if len(found) > 1:
                raise p11e.MultipleObjectsReturned(label)
            return found[0]
    except KeyNotFound:
        if objects_with_label(session, label):
            raise KeyUsageError(
                f"the key {label!r} has no {kind} key object for this operation", target=label
            ) from None
        raise


def session_copy(key: Any) -> Any:
    """A session-object copy of the secret key ``key`` for this session's calls, or
    ``key`` itself when the module will not copy it.

    SoftHSM re-reads a token object's file before every use (two opens, three
    fcntl locks, a read: about half of an AES-GCM call's cost); a session object
    lives in memory. The copy keeps CKA_SENSITIVE and CKA_EXTRACTABLE (PKCS#11
    lets a copy only tighten them), lives in this process's session only and
    goes with it; its empty label keeps it out of every lookup by label."""
    try:
        with _COPY_OR_SEARCH:
            return key.copy({Attribute.TOKEN: False, Attribute.LABEL: ""})
    except p11e.PKCS11Error:
        return key  # CKA_COPYABLE false, or no C_CopyObject: use the token object


def still_there(key: Any, label: str) -> bool:
    """Whether the token object ``key`` still exists (another process may have
    destroyed it); the module re-reads it for this."""
    try:
        key[Attribute.CLASS]
    except (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid):
        return False
    except p11e.PKCS11Error as exc:
        raise _map(exc, "check key", label, False) from exc
    return True


def destroy_copy(copy: Any) -> None:
    """Destroy a :func:`session_copy` (its session may be gone already: then so is it)."""
    with suppress(p11e.PKCS11Error), _COPY_OR_SEARCH:
        copy.destroy()


def require_type(key: Any, label: str, key_type: KeyType, action: str) -> None:
    if key.key_type != key_type:
        raise KeyUsageError(
            f"the key {label!r} is {KeyType(key.key_type).name}, it cannot {action}", target=label
        )


# The three calls below run for every data-plane operation: they catch the
# module's errors themselves rather than through ``translate`` (a generator-based
# context manager costs a few µs per use, a tenth of the token call).


def random_bytes(session: Session, n: int) -> bytes:
    try:
        return bytes(session.generate_random(n * 8))
    except p11e.PKCS11Error as exc:
        raise _map(exc, "generate random bytes", None, False) from exc


def _ecb(key: Any, label: str, *, decrypt: bool = False) -> Callable[[bytes], bytes]:
    """The token's AES block function (or its inverse) under ``key``, for ``gcm_ecb``."""
    def encrypt(blocks: bytes) -> bytes:
        with translate("encrypt with AES-ECB (through p11-kit)", label):
            return bytes(key.encrypt(blocks, mechanism=Mechanism.AES_ECB))

    def inverse(blocks: bytes) -> bytes:
        with translate("decrypt with AES-ECB (through p11-kit)", label):
            return bytes(key.decrypt(blocks, mechanism=Mechanism.AES_ECB))
    return inverse if decrypt else encrypt


def _gcm_encrypt(key: Any, label: str, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
    if _remote.composes_gcm(key):
        return gcm_ecb.seal(_ecb(key, label), iv, plaintext, aad)
    try:
        return bytes(key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                                 mechanism_param=GCMParams(iv, aad or None)))
    except p11e.PKCS11Error as exc:
        raise _map(exc, "seal data", label, False) from exc


def gcm_seal(session: Session, key: Any, label: str, plaintext: bytes, aad: bytes) -> Sealed:
    require_type(key, label, KeyType.AES, "encrypt with AES-GCM")
    iv = random_bytes(session, 12)
    return Sealed(iv, _gcm_encrypt(key, label, iv, plaintext, aad))


def new_data_key(
    session: Session, key: Any, label: str, length: int, aad: bytes
) -> tuple[bytes, Sealed]:
    """``length`` random bytes and the same bytes sealed under ``key``: the DEK and the
    IV come from one RNG call (two token calls in all, not three)."""
    require_type(key, label, KeyType.AES, "encrypt with AES-GCM")
    both = random_bytes(session, length + 12)
    dek, iv = both[:length], both[length:]
    return dek, Sealed(iv, _gcm_encrypt(key, label, iv, dek, aad))


def gcm_open(key: Any, label: str, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    require_type(key, label, KeyType.AES, "decrypt with AES-GCM")
    if len(ciphertext) < GCM_TAG_BYTES:
        raise IntegrityCheckFailed(
            "integrity check failed: the ciphertext is shorter than its tag", target=label
        )
    if _remote.composes_gcm(key):
        return gcm_ecb.open_sealed(_ecb(key, label), iv, ciphertext, aad, label)
    try:
        return bytes(key.decrypt(ciphertext, mechanism=Mechanism.AES_GCM,
                                 mechanism_param=GCMParams(iv, aad or None)))
    except p11e.PKCS11Error as exc:
        raise _map(exc, "open sealed data", label, True) from exc


_HMAC = {
    SignAlgorithm.HMAC_SHA256: Mechanism.SHA256_HMAC,
    SignAlgorithm.HMAC_SHA384: Mechanism.SHA384_HMAC,
    SignAlgorithm.HMAC_SHA512: Mechanism.SHA512_HMAC,
}
_HASH = {"sha256": Mechanism.SHA256, "sha384": Mechanism.SHA384, "sha512": Mechanism.SHA512}
_MGF = {"sha256": MGF.SHA256, "sha384": MGF.SHA384, "sha512": MGF.SHA512}
_RSA_PSS = {
    "sha256": Mechanism.SHA256_RSA_PKCS_PSS,
    "sha384": Mechanism.SHA384_RSA_PKCS_PSS,
    "sha512": Mechanism.SHA512_RSA_PKCS_PSS,
}
_RSA_PKCS1 = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
_KEY_TYPE_OF = {KeyFamily.HMAC: KeyType.GENERIC_SECRET, KeyFamily.RSA: KeyType.RSA,
                KeyFamily.EC: KeyType.EC}


def _mechanism(algorithm: SignAlgorithm) -> tuple[Mechanism, Any]:
    h = algorithm.hash_name
    if algorithm.family is KeyFamily.HMAC:
        return _HMAC[algorithm], None
    if algorithm.family is KeyFamily.EC:
        # SoftHSM has no ECDSA_SHAxxx: hash here, sign the digest with CKM_ECDSA.
        return Mechanism.ECDSA, None
    if algorithm.name.startswith("RSA_PSS"):
        # Salt length = hash length (the common choice; the SHA-1 default is refused).
        salt = hashlib.new(h).digest_size
        return _RSA_PSS[h], (_HASH[h], _MGF[h], salt)
    return _RSA_PKCS1[h], None


def _signed_input(algorithm: SignAlgorithm, message: bytes) -> bytes:
    if algorithm.family is KeyFamily.EC:
        return hashlib.new(algorithm.hash_name, message).digest()
    return message


def sign(key: Any, label: str, algorithm: SignAlgorithm, message: bytes) -> bytes:
    require_type(key, label, _KEY_TYPE_OF[algorithm.family], f"sign with {algorithm.value}")
    if algorithm.name.startswith("RSA_PSS") and _remote.pss_over_digest(key):
        # Through p11-kit 0.24 only CKM_RSA_PKCS_PSS crosses: the same signature.
        digest = hashlib.new(algorithm.hash_name, message).digest()
        return sign_digest(key, label, algorithm, digest)
    mechanism, param = _mechanism(algorithm)
    with translate(f"sign with {algorithm.value}", label):
        signature = bytes(
            key.sign(_signed_input(algorithm, message), mechanism=mechanism,
                     mechanism_param=param)
        )
    if algorithm.family is KeyFamily.EC:
        # PKCS#11 gives raw r||s; everyone else (OpenSSL, cryptography) wants DER.
        half = len(signature) // 2
        r = int.from_bytes(signature[:half], "big")
        s = int.from_bytes(signature[half:], "big")
        return encode_dss_signature(r, s)
    return signature


def verify(
    key: Any, label: str, algorithm: SignAlgorithm, message: bytes, signature: bytes
) -> bool:
    require_type(key, label, _KEY_TYPE_OF[algorithm.family], f"verify {algorithm.value}")
    if algorithm.name.startswith("RSA_PSS") and _remote.pss_over_digest(key):
        digest = hashlib.new(algorithm.hash_name, message).digest()
        return verify_digest(key, label, algorithm, digest, signature)
    mechanism, param = _mechanism(algorithm)
    if algorithm.family is KeyFamily.EC:
        try:
            r, s = decode_dss_signature(signature)
        except ValueError:
            return False
        size = (_spec_of_ec_key(key).bits + 7) // 8
        if r.bit_length() > size * 8 or s.bit_length() > size * 8:
            return False
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    with translate(f"verify with {algorithm.value}", label):
        return bool(
            key.verify(_signed_input(algorithm, message), signature, mechanism=mechanism,
                       mechanism_param=param)
        )


def _spec_of_ec_key(key: Any) -> KeySpec:
    with translate("read key attributes"):
        spec = _CURVE_BY_PARAMS.get(bytes(key[Attribute.EC_PARAMS]))
    if spec is None:
        raise KeyUsageError("the EC key uses a curve this engine does not support")
    return spec


def public_key_spki_der(key: Any, label: str) -> bytes:
    """The public key as DER SubjectPublicKeyInfo (what OpenSSL calls PUBKEY)."""
    with translate("read the public key", label):
        key_type = key.key_type
        if key_type == KeyType.RSA:
            n = int.from_bytes(key[Attribute.MODULUS], "big")
            e = int.from_bytes(key[Attribute.PUBLIC_EXPONENT], "big")
            public: Any = rsa.RSAPublicNumbers(e, n).public_key()
        elif key_type == KeyType.EC:
            spec = _spec_of_ec_key(key)
            curve: ec.EllipticCurve = ec.SECP256R1() if spec is KeySpec.EC_P256 else ec.SECP384R1()
            point = _der_octet_string(bytes(key[Attribute.EC_POINT]))
            public = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        else:
            raise KeyUsageError(f"the key {label!r} has no public key", target=label)
    return bytes(
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _der_octet_string(data: bytes) -> bytes:
    """Unwrap CKA_EC_POINT's DER OCTET STRING (04 len point) to the raw point."""
    if len(data) < 2 or data[0] != 0x04:
        raise InternalError("unexpected CKA_EC_POINT encoding")
    length = data[1]
    offset = 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[2 : 2 + count], "big")
        offset = 2 + count
    point = data[offset : offset + length]
    if len(point) != length:
        raise InternalError("truncated CKA_EC_POINT")
    return point


# --------------------------------------------------------------------------- digests

# DER DigestInfo prefixes (RFC 8017, 9.2 note 1): CKM_RSA_PKCS signs DigestInfo || H.
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def _digest_mechanism(algorithm: SignAlgorithm, digest: bytes) -> tuple[Mechanism, Any, bytes]:
    """(mechanism, parameter, input) that sign a precomputed digest."""
    h = algorithm.hash_name
    if algorithm.family is KeyFamily.EC:
        return Mechanism.ECDSA, None, digest
    if algorithm.name.startswith("RSA_PSS"):
        return Mechanism.RSA_PKCS_PSS, (_HASH[h], _MGF[h], len(digest)), digest
    if algorithm.family is KeyFamily.RSA:
        return Mechanism.RSA_PKCS, None, _DIGEST_INFO[h] + digest
    raise KeyUsageError(f"{algorithm.value} does not sign digests")


def sign_digest(key: Any, label: str, algorithm: SignAlgorithm, digest: bytes) -> bytes:
    """RSA (PSS / PKCS#1 v1.5) or DER ECDSA signature over a digest computed by the caller."""
    require_type(key, label, _KEY_TYPE_OF[algorithm.family], f"sign with {algorithm.value}")
    mechanism, param, data = _digest_mechanism(algorithm, digest)
    with translate(f"sign with {algorithm.value}", label):
        signature = bytes(key.sign(data, mechanism=mechanism, mechanism_param=param))
    if algorithm.family is KeyFamily.EC:
        half = len(signature) // 2
        return encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                    int.from_bytes(signature[half:], "big"))
    return signature


def verify_digest(
    key: Any, label: str, algorithm: SignAlgorithm, digest: bytes, signature: bytes
) -> bool:
    """True when ``signature`` is valid for ``digest``; False for any bad signature."""
    require_type(key, label, _KEY_TYPE_OF[algorithm.family], f"verify {algorithm.value}")
    mechanism, param, data = _digest_mechanism(algorithm, digest)
    if algorithm.family is KeyFamily.EC:
        raw = _raw_ecdsa(key, signature)
        if raw is None:
            return False
        signature = raw
    with translate(f"verify with {algorithm.value}", label):
        try:
            return bool(key.verify(data, signature, mechanism=mechanism, mechanism_param=param))
        except (p11e.SignatureLenRange, p11e.SignatureInvalid):
            return False  # a signature of the wrong length is just an invalid signature


def _raw_ecdsa(key: Any, signature: bytes) -> bytes | None:
    """DER ECDSA -> the token's r||s, or None when it is not a well-formed signature."""
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        return None
    size = (_spec_of_ec_key(key).bits + 7) // 8
    if not (r > 0 and s > 0 and r.bit_length() <= size * 8 and s.bit_length() <= size * 8):
        return None
    # Only the canonical DER encoding is accepted (no trailing bytes, minimal lengths).
    if encode_dss_signature(r, s) != signature:
        return None
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


# --------------------------------------------------------------------------- RSA decryption

_OAEP_HASH = {"sha1": (Mechanism.SHA_1, MGF.SHA1), "sha256": (Mechanism.SHA256, MGF.SHA256),
              "sha384": (Mechanism.SHA384, MGF.SHA384), "sha512": (Mechanism.SHA512, MGF.SHA512)}


def rsa_modulus_bytes(key: Any, label: str) -> int:
    require_type(key, label, KeyType.RSA, "decrypt with RSA")
    with translate("read key attributes", label):
        return len(bytes(key[Attribute.MODULUS]))


def oaep_decrypt(key: Any, label: str, ciphertext: bytes, hash_name: str) -> bytes | None:
    """OAEP in the token; None when the token refuses this hash (then decode it ourselves).

    Every other failure is the one :class:`DecryptionFailed`.
    """
    require_type(key, label, KeyType.RSA, "decrypt with RSA-OAEP")
    mech_hash, mgf = _OAEP_HASH[hash_name]
    try:
        return bytes(key.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                                 mechanism_param=(mech_hash, mgf, None)))
    except (p11e.ArgumentsBad, p11e.MechanismParamInvalid, p11e.MechanismInvalid):
        # Checked on the parameters before any decryption: tells nothing about the data.
        return None
    except (p11e.GeneralError, p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange,
            p11e.DataLenRange, p11e.DataInvalid, p11e.FunctionFailed):
        raise decryption_failed() from None
    except p11e.PKCS11Error as exc:
        raise _map(exc, "decrypt with RSA-OAEP", label, False) from exc


def rsa_raw_decrypt(key: Any, label: str, ciphertext: bytes) -> bytes:
    """c^d mod n in the token (``CKM_RSA_X_509``), left-padded to the modulus length."""
    k = rsa_modulus_bytes(key, label)
    if len(ciphertext) != k:
        raise decryption_failed()
    try:
        em = bytes(key.decrypt(ciphertext, mechanism=Mechanism.RSA_X_509))
    except (p11e.GeneralError, p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange,
            p11e.DataLenRange, p11e.DataInvalid, p11e.FunctionFailed):
        # e.g. a ciphertext >= n
        raise decryption_failed() from None
    except p11e.PKCS11Error as exc:
        raise _map(exc, "decrypt with RSA", label, False) from exc
    return em.rjust(k, b"\x00")


# --------------------------------------------------------------------------- imported keys


def once_more_if_nothing_made(session: Session, made: dict[Any, Any],
                              make: Callable[[], T]) -> T:
    """Make token objects. SoftHSM2 now and then fails C_CreateObject / C_GenerateKey
    with CKR_GENERAL_ERROR while another session uses the token (it re-reads its object
    files then): when no object matching ``made`` exists after the failure, it is made
    once more; otherwise the error stands."""
    try:
        return make()
    except p11e.GeneralError:
        if _search(session, made):
            raise
        time.sleep(0.01)
        return make()


def create_object(session: Session, template: dict[Any, Any]) -> Any:
    """C_CreateObject of a token object (made once more after a spurious failure)."""
    same = {Attribute.LABEL: template[Attribute.LABEL], Attribute.CLASS: template[Attribute.CLASS]}
    return once_more_if_nothing_made(session, same, lambda: session.create_object(template))


def import_secret(session: Session, spec: KeySpec, label: str, key_id: bytes,
                  value: bytes) -> KeyInfo:
    """An AES / HMAC key object with a given value: sensitive, never extractable."""
    if objects_with_label(session, label):
        raise KeyExists(f"a key labelled {label!r} already exists in the HSM", target=label)
    template = secret_key_template(spec, label, key_id)
    # CKA_VALUE_LEN is computed from CKA_VALUE on creation; giving it is an error.
    del template[Attribute.VALUE_LEN]
    template[Attribute.VALUE] = value
    with translate(f"import a {spec.value} key", label):
        create_object(session, template)
    return KeyInfo(label, key_id, spec)


def import_key_pair(session: Session, spec: KeySpec, label: str, key_id: bytes,
                    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> KeyInfo:
    """Private and public key objects from a private key (the private one sensitive,
    never extractable from now on)."""
    if objects_with_label(session, label):
        raise KeyExists(f"a key labelled {label!r} already exists in the HSM", target=label)
    public, private = keypair_templates(spec, label, key_id)
    public.pop(Attribute.MODULUS_BITS, None)  # computed from the modulus on creation

    def big(n: int) -> bytes:
        return n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")

    if isinstance(private_key, rsa.RSAPrivateKey):
        nums = private_key.private_numbers()
        pub = nums.public_numbers
        public |= {Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: big(pub.n),
                   Attribute.PUBLIC_EXPONENT: big(pub.e)}
        private |= {Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: big(pub.n),
                    Attribute.PUBLIC_EXPONENT: big(pub.e),
                    Attribute.PRIVATE_EXPONENT: big(nums.d), Attribute.PRIME_1: big(nums.p),
                    Attribute.PRIME_2: big(nums.q), Attribute.EXPONENT_1: big(nums.dmp1),
                    Attribute.EXPONENT_2: big(nums.dmq1), Attribute.COEFFICIENT: big(nums.iqmp)}
    else:
        point = private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        params = encode_named_curve_parameters(_EC_CURVES[spec])
        size = (spec.bits + 7) // 8
        public |= {Attribute.KEY_TYPE: KeyType.EC,
                   Attribute.EC_POINT: bytes([0x04, len(point)]) + point}
        private |= {Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: params,
                    Attribute.VALUE: private_key.private_numbers().private_value.to_bytes(
                        size, "big")}
    with translate(f"import a {spec.value} key", label):
        created = [create_object(session, public)]
        try:
            created.append(create_object(session, private))
        except p11e.PKCS11Error:
            created[0].destroy()
            raise
    return KeyInfo(label, key_id, spec)


def generate_wrapping_key(session: Session, label: str, bits: int) -> None:
    """An RSA key pair for import: the public half encrypts, the private half decrypts."""
    public = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.TOKEN: True,
              Attribute.PRIVATE: False, Attribute.LABEL: label, Attribute.ID: label.encode(),
              Attribute.MODULUS_BITS: bits, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
              **_usages(_PUBLIC_USAGES, Attribute.ENCRYPT, Attribute.WRAP)}
    private = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, **_protected(label, label.encode()),
               **_usages(_PRIVATE_USAGES, Attribute.DECRYPT, Attribute.UNWRAP)}
    with translate("generate an import wrapping key", label):
        session.generate_keypair(KeyType.RSA, bits, label=label, id=label.encode(), store=True,
                                 public_template=public, private_template=private)


# --------------------------------------------------------------------------- wrapped secrets


def wrap_secret(session: Session, kek: Any, label: str, secret: bytes) -> bytes:
    """AES-KWP (RFC 5649) of ``secret`` under ``kek`` in the token: C_WrapKey of a
    session object holding it (SoftHSM has no C_Encrypt with CKM_AES_KEY_WRAP_PAD)."""
    require_type(kek, label, KeyType.AES, "wrap with AES key wrap")
    if _remote.composes_kwp(kek):
        return gcm_ecb.kwp_wrap(_ecb(kek, label), secret)
    with translate("wrap a secret", label):
        # Extractable on purpose: a throw-away session object (never a CMK) carrying
        # material that lives outside the token by design, only to wrap it.
        obj = session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.TOKEN: False, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
            Attribute.VALUE: secret,
        })
        try:
            return bytes(kek.wrap_key(obj, mechanism=Mechanism.AES_KEY_WRAP_PAD))
        finally:
            obj.destroy()


def unwrap_secret(session: Session, kek: Any, label: str, wrapped: bytes) -> bytes:
    """Inverse of :func:`wrap_secret`; a wrong KEK or altered blob is an integrity error."""
    require_type(kek, label, KeyType.AES, "unwrap with AES key wrap")
    if _remote.composes_kwp(kek):
        return gcm_ecb.kwp_unwrap(_ecb(kek, label, decrypt=True), wrapped, label)
    with translate("unwrap a secret", label, integrity=True):
        # A session object (never a CMK) whose value is read back once, then destroyed.
        obj = kek.unwrap_key(
            ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, wrapped,
            mechanism=Mechanism.AES_KEY_WRAP_PAD, store=False,
            template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
                      Attribute.TOKEN: False},
        )
        try:
            return bytes(obj[Attribute.VALUE])
        finally:
            obj.destroy()


def mechanisms(session: Session) -> frozenset[int]:
    with translate("list the token's mechanisms"):
        return frozenset(int(m) for m in session.token.slot.get_mechanisms())
