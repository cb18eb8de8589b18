"""The two PKCS#11 calls python-pkcs11 does not make our way, through ctypes.

* ``C_Initialize`` with ``CKF_OS_LOCKING_OK``: python-pkcs11 passes NULL, which
  tells the module that the application is single-threaded; SoftHSM then runs
  without locks and concurrent sessions crash the process. We initialise the
  module first, with OS locking, and python-pkcs11 then only attaches to it.
* ``C_InitToken``: python-pkcs11 0.10 has no binding for it.

ctypes ``dlopen``s the same path python-pkcs11 opens later; the dynamic linker
hands both the same loaded library, so the initialisation is shared, as long as
the module's ``C_GetFunctionList`` returns one list for the process (SoftHSM and
most vendor libraries). p11-kit's client hands out a new list, with its own
connection, on every call: it is initialised by python-pkcs11 instead (see
:mod:`engine.crypto._remote`), and so is any other module whose list turns out
not to be the one we initialised (``C_Finalize`` undoes ours then).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from engine.errors import ConfigError

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG
CKF_OS_LOCKING_OK = 0x00000002
CKR_OK = 0x000
CKR_CANT_LOCK = 0x00A
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKR_PIN_INCORRECT = 0x0A0
CKR_PIN_LEN_RANGE = 0x0A2
CKR_SESSION_EXISTS = 0x0B6
CKR_TOKEN_NOT_PRESENT = 0x0E0


class _CInitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", CK_ULONG),
        ("pReserved", ctypes.c_void_p),
    ]


class _CVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


_C_Initialize = ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p)
_C_Finalize = ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p)
_C_InitToken = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_char_p, CK_ULONG, ctypes.c_char_p)

# CK_FUNCTION_LIST up to C_InitToken, in the order the standard fixes.
_SKIPPED = (
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
)


class _CFunctionList(ctypes.Structure):
    _fields_ = [
        ("version", _CVersion),
        ("C_Initialize", _C_Initialize),
        ("C_Finalize", _C_Finalize),
        *((name, ctypes.c_void_p) for name in _SKIPPED),
        ("C_InitToken", _C_InitToken),
    ]


@dataclass
class RawModule:
    """A dlopen'ed PKCS#11 module and its function list (kept alive with the module)."""

    path: str
    dll: ctypes.CDLL
    functions: _CFunctionList

    def initialize(self, *, os_locking: bool) -> int:
        """``C_Initialize``; returns the CK_RV so the caller can choose a fallback."""
        if not os_locking:
            return int(self.functions.C_Initialize(None))
        args = _CInitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        return int(self.functions.C_Initialize(ctypes.cast(ctypes.pointer(args), ctypes.c_void_p)))

    def finalize(self) -> int:
        """``C_Finalize`` of this function list; returns the CK_RV."""
        return int(self.functions.C_Finalize(None))

    def init_token(self, slot_id: int, so_pin: str, label: str) -> int:
        """``C_InitToken``; returns the CK_RV. The label is blank-padded to 32 bytes."""
        pin = so_pin.encode("utf-8")
        padded = label.encode("utf-8").ljust(32, b" ")
        return int(self.functions.C_InitToken(slot_id, pin, len(pin), padded))


def load(path: str) -> RawModule:
    """dlopen ``path`` and fetch its function list; ConfigError when that fails."""
    try:
        dll = ctypes.CDLL(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot load the PKCS#11 module {path}",
            cause=str(exc),
            fix="Install SoftHSM2 (`apt-get install softhsm2`), or set the HSM module path "
            "to your HSM vendor's PKCS#11 library.",
            code="hsm_module_missing",
        ) from None
    try:
        get_function_list = dll.C_GetFunctionList
    except AttributeError:
        raise ConfigError(
            f"{path} is not a PKCS#11 module (no C_GetFunctionList)",
            fix="Set the HSM module path to a PKCS#11 library.",
            code="hsm_module_invalid",
        ) from None
    get_function_list.restype = CK_RV
    get_function_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_CFunctionList))]
    pointer = ctypes.POINTER(_CFunctionList)()
    rv = get_function_list(ctypes.byref(pointer))
    if rv != CKR_OK or not pointer:
        raise ConfigError(
            f"C_GetFunctionList of {path} failed (CK_RV 0x{rv:x})",
            code="hsm_module_invalid",
        )
    return RawModule(path, dll, pointer.contents)
