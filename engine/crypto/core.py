"""The crypto core: an async, safe API over a PKCS#11 token.

Every key operation of the engine comes here (ARCHITECTURE principle 1). Master
keys are generated in the token as sensitive, never-extractable objects; no
method returns or exports their material. Data keys (DEKs) handed to callers
are random bytes from the token RNG, sealed under a master key with
AES-256-GCM inside the token.

Threading design (why one session per pool thread)
---------------------------------------------------
python-pkcs11 blocks, so calls run in a bounded thread pool (``pool_size``
threads). python-pkcs11 would call ``C_Initialize(NULL)``, which tells the
module the application is single-threaded: SoftHSM then takes no locks, and two
threads with their own sessions crashed the process in 6 of 6 probe runs. One
session shared by all threads is safe (python-pkcs11 holds a lock per session
operation) but serialises everything. So we initialise the module ourselves
with ``CKF_OS_LOCKING_OK`` through ctypes before python-pkcs11 attaches
(:mod:`engine.crypto._cinit`); the module then locks its own shared state and
each pool thread can own a session, as PKCS#11 intends. Evidence:
``tests/crypto/test_concurrency.py`` runs 2 threads x 1,000 mixed data-key /
seal / open calls from asyncio tasks in a subprocess (a crash would kill only
that process) and checks every result. If a module refuses OS locking
(``CKR_CANT_LOCK``) the pool shrinks to one thread with one session, which is
the safe shared-session design.

Lifecycle: ``await core.connect()`` / ``await core.close()``, or
``async with CryptoCore(config) as core``. (``open`` is the inverse of ``seal``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from engine.crypto import _pkcs11
from engine.crypto._lane import DataLane, run_call
from engine.crypto._pool import SessionPool, Worker
from engine.crypto.config import HsmConfig
from engine.crypto.errors import KeyExists
from engine.crypto.model import (
    DATA_KEY_MAX_BYTES,
    DATA_KEY_MIN_BYTES,
    GCM_TAG_BYTES,
    MAX_AAD_BYTES,
    MAX_KEY_ID_BYTES,
    MAX_PLAINTEXT_BYTES,
    RANDOM_MAX_BYTES,
    RANDOM_MIN_BYTES,
    DataKey,
    KeyFamily,
    KeyInfo,
    KeySpec,
    Sealed,
    SignAlgorithm,
    check_bytes,
    check_iv,
    check_label,
    check_length,
    pack_sealed,
    unpack_sealed,
)
from engine.crypto.oaep import OAEP_HASHES, oaep_decode
from engine.errors import BackendUnavailable, DewError, InvalidInput
from engine.logs import get_logger

log = get_logger("dew.crypto")


def _spec(value: KeySpec | str) -> KeySpec:
    try:
        return KeySpec(value)
    except ValueError:
        choices = ", ".join(s.value for s in KeySpec)
        raise InvalidInput(f"unknown key spec {value!r}; choose one of {choices}") from None


def _algorithm(value: SignAlgorithm | str) -> SignAlgorithm:
    try:
        return SignAlgorithm(value)
    except ValueError:
        choices = ", ".join(a.value for a in SignAlgorithm)
        raise InvalidInput(
            f"unknown signing algorithm {value!r}; choose one of {choices}"
        ) from None


class CryptoCore:
    """Async access to one token. Construct from :class:`HsmConfig`, then connect."""

    def __init__(self, config: HsmConfig) -> None:
        self.config = config
        self._pool: SessionPool | None = None
        self._lane: DataLane | None = None
        self._module: _pkcs11.Module | None = None
        self._token: Any = None
        self._connect_lock = asyncio.Lock()
        # OAEP hashes the token refused (CKR_ARGUMENTS_BAD): decoded in our code instead.
        self._oaep_refused: set[str] = set()

    def __repr__(self) -> str:
        state = "connected" if self._pool is not None else "closed"
        return f"<CryptoCore {self.config.token_label!r} {state}>"

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Load the module, find the token and log in. Idempotent."""
        async with self._connect_lock:
            if self._pool is not None:
                return
            module, token = await asyncio.to_thread(self._login)
            self._module, self._token = module, token
            pool = SessionPool(
                token, self.config.pool_size, per_thread_sessions=module.os_locking,
                key_recheck=self.config.key_recheck_seconds,
            )
            if self.config.data_processes and module.address is None:
                lane = DataLane(self.config, pool, self.config.data_processes)
                try:
                    await lane.start()
                    self._lane = lane
                except DewError as exc:
                    # A way to go faster, not a reason to stop: the threads serve.
                    log.warning("the HSM data processes did not start; the crypto core's "
                                "threads make their calls", error=exc.message)
                except BaseException:
                    await pool.close()
                    await asyncio.to_thread(_pkcs11.logout, module, token)
                    raise
            self._pool = pool

    def _login(self) -> tuple[_pkcs11.Module, Any]:
        module = _pkcs11.load_module(self.config)
        token = _pkcs11.require_token(module, self.config.token_label, self.config.slot)
        _pkcs11.login(module, token, self.config.user_pin())
        return module, token

    async def close(self) -> None:
        """Finish running calls, close the sessions, log out (last core of the process)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        lane, self._lane = self._lane, None
        try:
            if lane is not None:
                await lane.close()  # its last calls may go to the threads: first
            await pool.close()
        finally:
            if self._module is not None:
                await asyncio.to_thread(_pkcs11.logout, self._module, self._token)

    async def __aenter__(self) -> CryptoCore:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def session_mode(self) -> str:
        """``"session-per-thread"`` (OS locking) or ``"single-session"`` (fallback)."""
        pool = self._require()
        return "session-per-thread" if pool.per_thread_sessions else "single-session"

    @property
    def threads(self) -> int:
        return self._require().size

    @property
    def data_process_pids(self) -> list[int]:
        """The data processes' pids (none: the threads make the data plane's calls)."""
        lane = self._lane
        return lane.pids if lane is not None and lane.broken is None else []

    @property
    def sessions_opened(self) -> int:
        return self._require().sessions_opened

    def _require(self) -> SessionPool:
        if self._pool is None:
            raise BackendUnavailable(
                "the crypto core is not connected", code="hsm_closed",
                fix="Call `await core.connect()` (or use `async with`) first.",
            )
        return self._pool

    # ------------------------------------------------------------------ keys

    async def generate_key(self, spec: KeySpec | str, label: str, key_id: bytes) -> KeyInfo:
        """Generate a master key in the token. KeyExists if the label is taken."""
        key_spec = _spec(spec)
        if key_spec.family is KeyFamily.MLDSA:
            raise InvalidInput(f"this token cannot generate {key_spec.value} keys",
                               code="hsm_mechanism_unsupported",
                               fix="The KMS keeps ML-DSA keys wrapped under a token AES key.")
        check_label(label)
        key_id = check_bytes("key_id", key_id, MAX_KEY_ID_BYTES, min_len=1)
        pool = self._require()

        def work(w: Worker) -> KeyInfo:
            with pool.admin_lock:
                try:
                    return _pkcs11.generate_key(w.session, key_spec, label, key_id)
                finally:
                    pool.invalidate()

        return await pool.run(work)

    async def ensure_key(self, spec: KeySpec | str, label: str, key_id: bytes) -> None:
        """Generate the key ``label`` unless the token has it (a service's own key,
        made on first use). One made meanwhile by another process is the one used.
        Nodes sharing a token do not race here: the node that serves it makes these
        keys up front (engine/token_keys.py)."""
        if not await self.key_exists(label):
            with contextlib.suppress(KeyExists):
                await self.generate_key(spec, label, key_id)

    async def destroy_key(self, label: str) -> bool:
        """Destroy every object labelled ``label``; False if there was none."""
        check_label(label)
        pool = self._require()

        def work(w: Worker) -> bool:
            with pool.admin_lock:
                try:
                    return _pkcs11.destroy_key(w.session, label)
                finally:
                    pool.invalidate()

        return await pool.run(work)

    async def key_exists(self, label: str) -> bool:
        check_label(label)
        return await self._require().run(
            lambda w: bool(_pkcs11.objects_with_label(w.session, label))
        )

    async def key_info(self, label: str) -> KeyInfo:
        """Label, CKA_ID and spec of a key; KeyNotFound if absent."""
        check_label(label)
        return await self._require().run(lambda w: _pkcs11.key_info(w.session, label))

    async def public_key_spki_der(self, label: str) -> bytes:
        """An RSA / EC key's public half as DER SubjectPublicKeyInfo."""
        check_label(label)
        return await self._require().run(
            lambda w: _pkcs11.public_key_spki_der(w.key(label, "public"), label)
        )

    # ------------------------------------------------------------------ AES-GCM

    async def seal(self, key_label: str, plaintext: bytes, aad: bytes = b"") -> Sealed:
        """AES-256-GCM in the token: ``(iv, ciphertext || tag)``, IV from the token RNG."""
        return await self.submit_seal(key_label, plaintext, aad)

    async def open(
        self, key_label: str, iv: bytes, ciphertext: bytes, aad: bytes = b""
    ) -> bytes:
        """Inverse of :meth:`seal`; IntegrityCheckFailed on a wrong key, AAD or tag."""
        return await self.submit_open(key_label, iv, ciphertext, aad)

    # The data plane's calls without a coroutine of their own: each checks its input
    # and returns the pool's future, which the caller awaits (an asyncio hand-off
    # costs about as much as the token call, so every layer on the way counts).

    def submit_seal(self, key_label: str, plaintext: bytes, aad: bytes = b""
                    ) -> asyncio.Future[Sealed]:
        """:meth:`seal`'s future."""
        check_label(key_label)
        plaintext = check_bytes("plaintext", plaintext, MAX_PLAINTEXT_BYTES)
        aad = check_bytes("aad", aad, MAX_AAD_BYTES)
        return self._submit("seal", (key_label, plaintext, aad))

    def submit_open(self, key_label: str, iv: bytes, ciphertext: bytes, aad: bytes = b""
                    ) -> asyncio.Future[bytes]:
        """:meth:`open`'s future."""
        check_label(key_label)
        check_iv(iv)
        ciphertext = check_bytes("ciphertext", ciphertext, MAX_PLAINTEXT_BYTES + GCM_TAG_BYTES)
        aad = check_bytes("aad", aad, MAX_AAD_BYTES)
        return self._submit("open", (key_label, iv, ciphertext, aad))

    def submit_data_key(self, key_label: str, length_bytes: int = 32, aad: bytes = b""
                        ) -> asyncio.Future[tuple[bytes, Sealed]]:
        """:meth:`generate_data_key`'s future: the DEK and its :class:`Sealed` (not packed
        into a blob: a caller with a format of its own would only take it apart)."""
        check_label(key_label)
        check_length("length_bytes", length_bytes, DATA_KEY_MIN_BYTES, DATA_KEY_MAX_BYTES)
        aad = check_bytes("aad", aad, MAX_AAD_BYTES)
        return self._submit("datakey", (key_label, length_bytes, aad))

    def _submit(self, kind: str, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """A data-plane call: to a data process when there is one for this loop, else
        to the pool's threads (the same call, :func:`_lane.run_call`)."""
        pool = self._require()
        lane = self._lane

        def on_thread(w: Worker) -> Any:
            return run_call(w, kind, args)

        if lane is not None and lane.usable():
            return lane.submit(kind, args, on_thread)
        return pool.submit(on_thread)

    # ------------------------------------------------------------------ data keys

    async def generate_data_key(
        self, key_label: str, length_bytes: int = 32, aad: bytes = b""
    ) -> DataKey:
        """A fresh DEK from the token RNG, and the same DEK sealed under ``key_label``."""
        dek, sealed = await self.submit_data_key(key_label, length_bytes, aad)
        return DataKey(dek, pack_sealed(sealed))

    async def wrap_data_key(self, key_label: str, plaintext_dek: bytes, aad: bytes = b"") -> bytes:
        """Seal a caller's DEK under ``key_label``; returns the wrapped blob."""
        check_label(key_label)
        dek = check_bytes("plaintext_dek", plaintext_dek, DATA_KEY_MAX_BYTES,
                          min_len=DATA_KEY_MIN_BYTES)
        aad = check_bytes("aad", aad, MAX_AAD_BYTES)
        sealed = await self.seal(key_label, dek, aad)
        return pack_sealed(sealed)

    async def unwrap_data_key(self, key_label: str, blob: bytes, aad: bytes = b"") -> bytes:
        """The DEK inside a blob from :meth:`generate_data_key` / :meth:`wrap_data_key`."""
        iv, ciphertext = unpack_sealed(blob)
        return await self.open(key_label, iv, ciphertext, aad)

    # ------------------------------------------------------------------ misc

    async def random_bytes(self, n: int) -> bytes:
        """``n`` (1..1024) random bytes from the token's RNG."""
        check_length("n", n, RANDOM_MIN_BYTES, RANDOM_MAX_BYTES)
        return await self._require().run(lambda w: _pkcs11.random_bytes(w.session, n))

    async def sign(
        self, label: str, message: bytes, algorithm: SignAlgorithm | str
    ) -> bytes:
        """HMAC tag, RSA signature, or DER ECDSA signature over ``message``."""
        algo = _algorithm(algorithm)
        check_label(label)
        message = check_bytes("message", message, MAX_PLAINTEXT_BYTES)
        kind = "secret" if algo.family is KeyFamily.HMAC else "private"
        return await self._require().run(
            lambda w: _pkcs11.sign(w.key(label, kind), label, algo, message)
        )

    async def verify(
        self, label: str, message: bytes, signature: bytes, algorithm: SignAlgorithm | str
    ) -> bool:
        """True when ``signature`` is valid for ``message`` (checked in the token)."""
        algo = _algorithm(algorithm)
        check_label(label)
        message = check_bytes("message", message, MAX_PLAINTEXT_BYTES)
        signature = check_bytes("signature", signature, 4096)
        kind = "secret" if algo.family is KeyFamily.HMAC else "public"
        return await self._require().run(
            lambda w: _pkcs11.verify(w.key(label, kind), label, algo, message, signature)
        )

    # ------------------------------------------------------------------ digests, RSA

    async def sign_digest(
        self, label: str, digest: bytes, algorithm: SignAlgorithm | str
    ) -> bytes:
        """RSA-PSS (salt = hash length), PKCS#1 v1.5 or DER ECDSA over a computed digest."""
        algo = _algorithm(algorithm)
        check_label(label)
        digest = _check_digest(algo, digest)
        return await self._require().run(
            lambda w: _pkcs11.sign_digest(w.key(label, "private"), label, algo, digest)
        )

    async def verify_digest(
        self, label: str, digest: bytes, signature: bytes, algorithm: SignAlgorithm | str
    ) -> bool:
        """True when ``signature`` over ``digest`` is valid (checked in the token)."""
        algo = _algorithm(algorithm)
        check_label(label)
        digest = _check_digest(algo, digest)
        signature = check_bytes("signature", signature, 4096)
        return await self._require().run(
            lambda w: _pkcs11.verify_digest(w.key(label, "public"), label, algo, digest,
                                            signature)
        )

    async def rsa_oaep_decrypt(self, label: str, ciphertext: bytes, hash_name: str) -> bytes:
        """RSAES-OAEP (MGF1 with the same hash, empty label) with the token's private key.

        The token's OAEP is used when it takes ``hash_name``; otherwise the token
        does raw RSA and :func:`engine.crypto.oaep.oaep_decode` decodes. Either way
        every failure is the one :class:`DecryptionFailed`.
        """
        if hash_name not in OAEP_HASHES:
            raise InvalidInput(f"unsupported OAEP hash {hash_name!r}")
        check_label(label)
        ciphertext = check_bytes("ciphertext", ciphertext, 1024, min_len=1)
        refused = self._oaep_refused

        def work(w: Worker) -> bytes:
            key = w.key(label, "private")
            if hash_name not in refused:
                plain = _pkcs11.oaep_decrypt(key, label, ciphertext, hash_name)
                if plain is not None:
                    return plain
                refused.add(hash_name)
            k = _pkcs11.rsa_modulus_bytes(key, label)
            return oaep_decode(_pkcs11.rsa_raw_decrypt(key, label, ciphertext), k, hash_name)

        return await self._require().run(work)

    @property
    def oaep_hashes_decoded_here(self) -> frozenset[str]:
        """OAEP hashes the token refused, so decoded by :mod:`engine.crypto.oaep`."""
        return frozenset(self._oaep_refused)

    # ------------------------------------------------------------------ imported material

    async def import_secret_key(
        self, spec: KeySpec | str, label: str, key_id: bytes, value: bytes
    ) -> KeyInfo:
        """An AES / HMAC key from its value (BYOK): sensitive, not extractable."""
        key_spec = _spec(spec)
        if key_spec.is_asymmetric or len(value) != key_spec.bits // 8:
            raise InvalidInput(f"a {key_spec.value} key is {key_spec.bits // 8} bytes of "
                               "secret material", code="invalid_key_material")
        check_label(label)
        pool = self._require()

        def work(w: Worker) -> KeyInfo:
            with pool.admin_lock:
                try:
                    return _pkcs11.import_secret(w.session, key_spec, label, key_id, value)
                finally:
                    pool.invalidate()

        return await pool.run(work)

    async def import_key_pair(
        self, spec: KeySpec | str, label: str, key_id: bytes,
        private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    ) -> KeyInfo:
        """RSA / EC key objects from a private key (BYOK); the private one not extractable."""
        key_spec = _spec(spec)
        check_label(label)
        pool = self._require()

        def work(w: Worker) -> KeyInfo:
            with pool.admin_lock:
                try:
                    return _pkcs11.import_key_pair(w.session, key_spec, label, key_id,
                                                   private_key)
                finally:
                    pool.invalidate()

        return await pool.run(work)

    async def generate_wrapping_key(self, label: str, bits: int = 4096) -> None:
        """An RSA key pair whose public half wraps key material for import."""
        check_label(label)
        pool = self._require()

        def work(w: Worker) -> None:
            with pool.admin_lock:
                try:
                    _pkcs11.generate_wrapping_key(w.session, label, bits)
                finally:
                    pool.invalidate()

        await pool.run(work)

    # ------------------------------------------------------------------ wrapped secrets

    async def wrap_secret(self, kek_label: str, secret: bytes) -> bytes:
        """``secret`` wrapped under the AES key ``kek_label`` with AES key wrap with
        padding (RFC 5649), in the token (through a short-lived session object)."""
        check_label(kek_label)
        secret = check_bytes("secret", secret, 1024, min_len=16)
        return await self._require().run(
            lambda w: _pkcs11.wrap_secret(w.session, w.key(kek_label, "secret"), kek_label,
                                          secret))

    async def unwrap_secret(self, kek_label: str, wrapped: bytes) -> bytes:
        """Inverse of :meth:`wrap_secret`: the secret, in memory, for one operation."""
        check_label(kek_label)
        wrapped = check_bytes("wrapped", wrapped, 2048, min_len=24)
        return await self._require().run(
            lambda w: _pkcs11.unwrap_secret(w.session, w.key(kek_label, "secret"), kek_label,
                                            wrapped))

    async def mechanisms(self) -> frozenset[int]:
        """The mechanism numbers the token offers (to ask before using one)."""
        return await self._require().run(lambda w: _pkcs11.mechanisms(w.session))


def _check_digest(algorithm: SignAlgorithm, digest: bytes) -> bytes:
    if algorithm.family is KeyFamily.HMAC:
        raise InvalidInput(f"{algorithm.value} is a MAC; it does not sign digests")
    size = hashlib.new(algorithm.hash_name).digest_size
    return check_bytes(f"a {algorithm.hash_name.upper()} digest", digest, size, min_len=size)
