"""KPS: SSH key pairs, and bind / replace / reset / unbind on servers over SSH.

``KpsService`` is the domain API (CLI, demo, tests): create, import, list,
show, delete, upgrade, export-private, convert; servers add, list, show,
remove. Key generation draws its randomness from the HSM (``gen_random``, which
the KMS audit records). A managed private key is kept envelope-encrypted: a
fresh data key from ``create-datakey`` under ``kps/default`` encrypts it with
AES-256-GCM locally, and only the encrypted data key is stored beside it.

Jobs (``servers`` up to ``kps.batch_limit``; ``auth`` sealed by the client):

- ``kps.bind {keypair, servers, auth: {password | private_key}, disable_pw_login}``
- ``kps.replace {keypair (new), servers, auth: {private_key of the old pair}}``
- ``kps.reset {keypair, servers, auth: {password}, disable_pw_login}``: the keys of
  the pairs bound to the server before are removed (their private key is lost).
- ``kps.unbind {keypair, servers, auth: {private_key}, enable_pw_login}``

(The issue's ``disable_password`` / ``enable_password`` are named ``*_pw_login``
here: :mod:`engine.redaction` redacts every argument named like a password.)

Each server is edited idempotently (pure transforms in
:mod:`handlers.kps.authorized_keys` and :mod:`handlers.kps.sshd_config`, atomic writes
through :mod:`handlers.kps.ssh`) in the order that keeps a way in (ARCHITECTURE
principle 11): a new key is proven by a fresh login before password login goes off
(and only a key the engine holds can be proven); unbind turns password login on and
proves it before the key goes, and counts the key gone only once it read the file
again; password login on/off is proven from what sshd offers and from ``sshd -T``.
Every file written is journaled (:class:`Journal`) and put back if any later step
fails. A server that fails gets its own failure record and leaves the others going.
The task's state tells the truth about the batch (docs/kps.md, "Task states"):

- every server succeeded: ``succeeded``, ``partially_failed: false``;
- some failed: ``succeeded`` with ``partially_failed: true``, ``failed`` > 0 and the
  per-server results (``pw_login_state``: not named like a password, which the
  engine's redaction would hide);
- every server failed: ``failed``, with a :class:`BatchFailed` summary ("all N servers
  failed", code ``kps_all_servers_failed``, target None) beside the per-server records;
- the batch refused as a whole (bad input, batch over the limit, inconsistent batch):
  ``failed``, one record with target None.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.context import JobContext
from engine.errors import Conflict, DewError, InvalidInput, NotFound, PermanentError
from engine.models import iso, utcnow
from engine.redaction import is_sealed
from engine.registry import JOBS
from engine.resources import Closer, Resources, resource
from engine.settings import Settings
from handlers.kms.interface import (
    DEFAULT_ACCOUNT,
    SEAL_KEY,
    KeyCipher,
    KmsSealer,
    open_key_cipher,
)
from handlers.kps import authorized_keys as ak
from handlers.kps import keys as ssh_keys
from handlers.kps.config import KpsSettings
from handlers.kps.os_release import DEFAULT_SSHD_CONFIG, default_reload_command, parse_os_release
from handlers.kps.ssh import (
    STATUS_ERROR,
    Credential,
    HostKeyChanged,
    InvalidCredential,
    PermissionProblem,
    RemoteFile,
    ServerStatusError,
    Session,
    Snapshot,
    Target,
    Timeouts,
    absolute,
    check_login,
    connect,
    offered_methods,
    server_lock,
)
from handlers.kps.sshd_config import (
    connection_spec,
    effective_password_login,
    parse_effective,
    password_methods,
    set_password_login,
)
from handlers.kps.store import KeyPairRecord, ServerRecord, SqliteKpsStore

DEFAULT_AUTHORIZED_KEYS = "~/.ssh/authorized_keys"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOST = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
LOGIN = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$")
ACTOR = "kps"

TOO_MANY = "Too many key pairs to be bound in batches."
INCONSISTENT = "Key pairs to be bound in batches are inconsistent."
OS_NOT_SUPPORTED = "ECS OS not supported."
RELOAD_SETTLE_ATTEMPTS = 4
# The code of the task-level failure record of a batch whose every server failed.
ALL_FAILED = "kps_all_servers_failed"


def invalid(cause: str, fix: str = "Check the call.") -> InvalidInput:
    return InvalidInput(ssh_keys.INVALID_PARAMETER, cause=cause, fix=fix)


def check_name(name: Any, what: str = "key pair") -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise invalid(f"a {what} name must be 1-64 letters, digits, '.', '_' or '-' "
                      f"(starting with a letter or digit), got {str(name)[:70]!r}")
    return name


class KeyPairNotFound(NotFound):
    code = "keypair_not_found"
    default_fix = "Run `dew keypairs list` to see the key pairs you can use."


class ServerNotFound(NotFound):
    code = "server_not_found"
    default_fix = "Run `dew servers list` to see the servers."


class BatchError(PermanentError):
    category = "batch"


class BatchFailed(PermanentError):
    """Every server of a batch failed: the task fails with this summary (target None);
    the per-server failure records carry the product messages."""

    code = ALL_FAILED
    category = "batch"


# --------------------------------------------------------------------------- views


@dataclass(frozen=True)
class KeyPairView:
    record: KeyPairRecord
    servers: list[str]

    def to_json(self) -> dict[str, Any]:
        r = self.record
        key = ssh_keys.parse_public_key(r.public_key)
        return {
            "name": r.name, "algorithm": r.algorithm, "type": r.key_type,
            "fingerprint": r.fingerprint, "keygen": key.keygen_line(),
            "public_key": r.public_key, "scope": r.scope, "owner": r.owner,
            "account": r.account, "managed": r.managed, "servers": self.servers,
            "created_at": iso(r.created_at),
        }


@dataclass(frozen=True, repr=False)
class CreatedKeyPair:
    view: KeyPairView
    private_key: bytes  # OpenSSH format; handed out once

    def __repr__(self) -> str:
        return f"CreatedKeyPair({self.view.record.name!r}, private_key=<hidden>)"


# --------------------------------------------------------------------------- service


class KpsService:
    """Key pairs and servers of every account, over the KPS store and KMS."""

    def __init__(self, store: SqliteKpsStore, kms: KeyCipher, config: KpsSettings,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.kms = kms
        self.sealer = KmsSealer(kms)
        self.config = config
        self.clock = clock

    # -- key pairs

    async def create(self, name: str, algorithm: str, *, managed: bool = False,
                     scope: str = "user", account: str = DEFAULT_ACCOUNT,
                     user: str = "local") -> CreatedKeyPair:
        """A new key pair; the private key is returned once (and kept only if managed)."""
        check_name(name)
        _check_scope(scope)
        if algorithm not in ssh_keys.CREATE_ALGORITHMS:
            raise invalid(f"unknown algorithm {str(algorithm)[:40]!r}",
                          f"Use one of {', '.join(ssh_keys.CREATE_ALGORITHMS)}.")
        await self._refuse_taken(account, user, name)
        seed = await self.kms.gen_random(96, account=account, actor=f"{ACTOR}:{user}")
        key = await asyncio.to_thread(ssh_keys.generate_private_key, algorithm, seed)
        public = ssh_keys.public_key_of(key, name)
        pem = ssh_keys.dump_private_key(key, "openssh")
        record = await self._store_new(name, public, "ssh", pem if managed else None,
                                       scope, account, user)
        return CreatedKeyPair(KeyPairView(record, []), pem)

    async def import_(self, name: str, public_text: str, kind: str = "ssh", *,
                      private_key: bytes | None = None, passphrase: bytes | None = None,
                      scope: str = "user", account: str = DEFAULT_ACCOUNT,
                      user: str = "local") -> KeyPairView:
        """Import a public key (any accepted form); a matching private key is kept managed."""
        check_name(name)
        _check_scope(scope)
        public = ssh_keys.parse_public_key(public_text, kind)
        pem = None
        if private_key is not None:
            loaded = ssh_keys.load_private_key(private_key, passphrase)
            if not ssh_keys.matches(loaded.key, public):
                raise InvalidInput(ssh_keys.MISMATCH, code="private_key_mismatch",
                                   cause="the private key's public half differs from the "
                                   "public key given", fix="Check both keys.")
            pem = ssh_keys.dump_private_key(loaded.key, "openssh")
        await self._refuse_taken(account, user, name)
        record = await self._store_new(name, public.with_comment(public.comment or name),
                                       kind, pem, scope, account, user)
        return KeyPairView(record, [])

    async def _refuse_taken(self, account: str, user: str, name: str) -> None:
        # Early, before an RSA key is generated for nothing; the store checks again
        # (and for account scope, against every user's names) when it inserts.
        if await self.store.find_keypair(account, user, name) is not None:
            raise Conflict(f"a key pair named {name!r} exists", code="keypair_exists",
                           fix="Choose another name.")

    async def _store_new(self, name: str, public: ssh_keys.PublicKey, kind: str,
                         pem: bytes | None, scope: str, account: str, user: str
                         ) -> KeyPairRecord:
        keypair_id = uuid.uuid4().hex
        envelope = None if pem is None else await self._seal_private(keypair_id, pem, account)
        now = self.clock()
        record = KeyPairRecord(
            keypair_id=keypair_id, account=account, owner=user, scope=scope, name=name,
            algorithm=public.algorithm, key_type=kind, public_key=public.openssh(),
            fingerprint=public.fingerprint, managed=pem is not None, private_key=envelope,
            created_at=now, updated_at=now)
        outcome = await self.store.create_keypair(record, self.config.quota)
        if outcome == "name_taken":
            raise Conflict(f"a key pair named {name!r} exists", code="keypair_exists",
                           fix="Choose another name.")
        if outcome == "quota_exceeded":
            raise Conflict(f"the account has {self.config.quota} account key pairs already",
                           code="kps_quota_exceeded",
                           fix="Delete account key pairs you no longer need, or raise "
                           "kps.quota.")
        return record

    async def _seal_private(self, keypair_id: str, pem: bytes, account: str) -> str:
        context = {"kps:keypair": keypair_id}
        dek = await self.kms.create_datakey(SEAL_KEY, 256, account=account, actor=ACTOR,
                                            encryption_context=context)
        nonce = os.urandom(12)
        body = AESGCM(dek.plain_text).encrypt(nonce, pem, keypair_id.encode())
        return json.dumps({"v": 1, "kms_key": SEAL_KEY,
                           "dek": base64.b64encode(dek.cipher_text).decode(),
                           "nonce": base64.b64encode(nonce).decode(),
                           "body": base64.b64encode(body).decode()})

    async def private_key(self, record: KeyPairRecord) -> bytes:
        """The managed private key in clear (for export and for login checks)."""
        if not record.managed or record.private_key is None:
            raise Conflict(f"the private key of {record.name!r} is not managed",
                           code="keypair_not_managed",
                           fix="Only key pairs created or imported with their private key "
                           "managed (--managed) can be exported.")
        data = json.loads(record.private_key)
        dek = await self.kms.decrypt_datakey(
            data["kms_key"], base64.b64decode(data["dek"]), account=record.account,
            actor=ACTOR, encryption_context={"kps:keypair": record.keypair_id})
        try:
            return AESGCM(dek.plain_text).decrypt(
                base64.b64decode(data["nonce"]), base64.b64decode(data["body"]),
                record.keypair_id.encode())
        except InvalidTag:
            raise PermanentError("the stored private key failed its integrity check",
                                 code="keypair_integrity", category="security") from None

    async def get(self, name: str, *, account: str = DEFAULT_ACCOUNT, user: str = "local"
                  ) -> KeyPairRecord:
        check_name(name)
        record = await self.store.find_keypair(account, user, name)
        if record is None:
            raise KeyPairNotFound(f"no key pair named {name!r}")
        return record

    async def show(self, name: str, **who: str) -> KeyPairView:
        record = await self.get(name, **who)
        return KeyPairView(record, await self.store.servers_of(record.keypair_id))

    async def list(self, *, account: str = DEFAULT_ACCOUNT, user: str = "local"
                   ) -> list[KeyPairView]:
        return [KeyPairView(r, await self.store.servers_of(r.keypair_id))
                for r in await self.store.list_keypairs(account, user)]

    async def delete(self, name: str, **who: str) -> None:
        record = await self.get(name, **who)
        outcome = await self.store.delete_keypair(record.keypair_id)
        if outcome == "bound":
            servers = await self.store.servers_of(record.keypair_id)
            raise Conflict(f"{name!r} is bound to {', '.join(servers)}",
                           code="keypair_bound",
                           fix="Unbind it from those servers first (`dew keypairs unbind`).")
        if outcome == "missing":
            raise KeyPairNotFound(f"no key pair named {name!r}")

    async def upgrade(self, name: str, **who: str) -> KeyPairView:
        record = await self.get(name, **who)
        if record.scope == "account":
            return KeyPairView(record, await self.store.servers_of(record.keypair_id))
        outcome = await self.store.upgrade_keypair(record, self.config.quota, self.clock())
        if outcome == "name_taken":
            raise Conflict(f"another key pair of the account is named {name!r}",
                           code="keypair_name_clash",
                           fix="Rename or delete the other key pair, then upgrade.")
        if outcome == "quota_exceeded":
            raise Conflict("the account key pair quota is reached", code="kps_quota_exceeded",
                           fix="Delete account key pairs you no longer need.")
        return await self.show(name, **who)

    async def describe(self, name: str, description: str, **who: str) -> KeyPairRecord:
        """Set a key pair's description (at most 255 characters)."""
        if not isinstance(description, str) or len(description) > 255:
            raise invalid("the description must be text of at most 255 characters")
        record = await self.get(name, **who)
        await self.store.set_description(record.keypair_id, description, self.clock())
        return await self.get(name, **who)

    async def keep_private_key(self, name: str, private_key: bytes, *,
                               passphrase: bytes | None = None,
                               account: str = DEFAULT_ACCOUNT, user: str = "local"
                               ) -> KeyPairRecord:
        """Let the engine manage the private key of an existing pair (it must match)."""
        who = {"account": account, "user": user}
        record = await self.get(name, **who)
        loaded = ssh_keys.load_private_key(private_key, passphrase)
        if not ssh_keys.matches(loaded.key, ssh_keys.parse_public_key(record.public_key)):
            raise InvalidInput(ssh_keys.MISMATCH, code="private_key_mismatch",
                               cause="the private key's public half differs from the key "
                               f"pair {name!r}", fix="Check both keys.")
        pem = ssh_keys.dump_private_key(loaded.key, "openssh")
        envelope = await self._seal_private(record.keypair_id, pem, record.account)
        await self.store.set_private_key(record.keypair_id, envelope, self.clock())
        return await self.get(name, **who)

    async def forget_private_key(self, name: str, **who: str) -> KeyPairRecord:
        """Stop managing the private key of a pair (the stored envelope is dropped)."""
        record = await self.get(name, **who)
        await self.store.set_private_key(record.keypair_id, None, self.clock())
        return await self.get(name, **who)

    # -- servers

    async def add_server(self, name: str, host: str, *, port: int = 22, user: str = "root",
                         host_key: str | None = None, trust_first_use: bool = False,
                         sshd_config: str | None = None, reload_command: str | None = None,
                         authorized_keys: str | None = None, sudo: bool = False,
                         account: str = DEFAULT_ACCOUNT) -> ServerRecord:
        check_name(name, "server")
        if not isinstance(host, str) or not HOST.match(host):
            raise invalid(f"invalid host {str(host)[:60]!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise invalid(f"the port must be 1..65535, got {port!r}")
        if not LOGIN.match(user):
            raise invalid(f"invalid login user {user[:40]!r}")
        if (host_key is None) == (not trust_first_use):
            raise invalid("give either a host key (--host-key-file FILE) or --trust-first-use",
                          "Pin the server's host key, or accept the first one it shows.")
        pinned = None
        if host_key is not None:
            pinned = " ".join(ssh_keys.parse_public_key(host_key).openssh().split()[:2])
        for label, path in (("--sshd-config", sshd_config),
                            ("--authorized-keys", authorized_keys)):
            if path is not None and (not path or "\n" in path or "\0" in path):
                raise invalid(f"{label} must be a path")
        if reload_command is not None and (not reload_command.strip() or "\n" in reload_command):
            raise invalid("--reload-command must be one line")
        record = ServerRecord(
            server_id=uuid.uuid4().hex, account=account, name=name, host=host, port=port,
            login_user=user, host_key=pinned, trust_first_use=trust_first_use,
            sshd_config=sshd_config, reload_command=reload_command,
            authorized_keys=authorized_keys, created_at=self.clock(), sudo=bool(sudo))
        if not await self.store.add_server(record):
            raise Conflict(f"a server named {name!r} exists", code="server_exists",
                           fix="Choose another name, or remove the old one first.")
        return record

    async def server(self, name: str, account: str = DEFAULT_ACCOUNT) -> ServerRecord:
        check_name(name, "server")
        record = await self.store.find_server(account, name)
        if record is None:
            raise ServerNotFound(f"no server named {name!r}")
        return record

    async def remove_server(self, name: str, account: str = DEFAULT_ACCOUNT) -> None:
        record = await self.server(name, account)
        if await self.store.remove_server(record.server_id) == "bound":
            pairs = await self.store.keypairs_on(record.server_id)
            raise Conflict(f"key pairs are bound to {name!r}: {', '.join(pairs)}",
                           code="server_bound", fix="Unbind them first.")


def _check_scope(scope: str) -> None:
    if scope not in ("user", "account"):
        raise invalid(f"scope must be user or account, got {str(scope)[:20]!r}")


def convert_private_key(data: bytes, to: str, *, passphrase: bytes | None = None,
                        new_passphrase: bytes | None = None, comment: str | None = None
                        ) -> bytes:
    """Convert a private key between OpenSSH, PEM, PKCS#8 and PuTTY (.ppk v3)."""
    if to not in ssh_keys.PRIVATE_FORMATS:
        raise invalid(f"unknown format {to[:20]!r}",
                      f"Use {', '.join(ssh_keys.PRIVATE_FORMATS)}.")
    loaded = ssh_keys.load_private_key(data, passphrase)
    return ssh_keys.dump_private_key(loaded.key, to, comment or loaded.comment, new_passphrase)


# --------------------------------------------------------------------------- resources


@resource("kps_store")
async def _kps_store_resource(resources: Resources) -> tuple[SqliteKpsStore, Closer]:
    store = await SqliteKpsStore.open(resources.settings.store_target)
    return store, store.close


@resource("kps")
async def _kps_resource(resources: Resources) -> tuple[KpsService, None]:
    store = await resources.get("kps_store")
    kms = await resources.get("kms")
    return KpsService(store, kms, resources.settings.section(KpsSettings)), None


# --------------------------------------------------------------------------- jobs

OPERATIONS = ("bind", "replace", "reset", "unbind")
AUTH_NEEDED = {"bind": ("password", "private_key"), "replace": ("private_key",),
               "reset": ("password",), "unbind": ("private_key",)}
# Not "disable_password": the engine redacts every argument whose name says
# "password" (engine.redaction), which would lose a plain flag on re-delivery.
FLAGS = {"bind": "disable_pw_login", "reset": "disable_pw_login",
         "unbind": "enable_pw_login", "replace": ""}


def _validator(op: str) -> Callable[[dict[str, Any]], None]:
    """Shape checks run before anything is stored (the batch rules run in the job,
    so that a refused batch leaves a failure record)."""
    allowed = {"keypair", "servers", "auth", "account", "user", FLAGS[op]} - {""}

    def validate(args: dict[str, Any]) -> None:
        unknown = sorted(set(args) - allowed)
        renamed = {"disable_password": "disable_pw_login", "enable_password": "enable_pw_login"}
        for old, new in renamed.items():
            if old in args:
                raise invalid(f"use {new!r}, not {old!r}: arguments named *password* are "
                              "redacted in the task store, so a re-run would lose the flag")
        if unknown:
            raise invalid(f"kps.{op} does not take {', '.join(unknown)}")
        check_name(args.get("keypair"))
        servers = args.get("servers")
        if not isinstance(servers, list) or not servers:
            raise invalid("servers must be a non-empty list")
        for item in servers:
            name = item.get("server") if isinstance(item, dict) else item
            check_name(name, "server")
            if isinstance(item, dict) and set(item) - {"server", "keypair"}:
                raise invalid("a batch item has 'server' and optionally 'keypair'")
        auth = args.get("auth")
        # Clear on the way in (the client seals it, as the job declares it secret);
        # sealed once recorded.
        if not is_sealed(auth) and not (isinstance(auth, dict) and len(auth) == 1
                                        and set(auth) <= {"password", "private_key"}):
            raise invalid("auth must be {\"password\": ...} or {\"private_key\": ...}",
                          "Give the server login credential; the client seals it before "
                          "anything is written.")
        flag = FLAGS[op]
        if flag and not isinstance(args.get(flag, False), bool):
            raise invalid(f"{flag} must be true or false")
        for key in ("account", "user"):
            if key in args and not isinstance(args[key], str):
                raise invalid(f"{key} must be a string")

    return validate


@dataclass(frozen=True)
class Plan:
    """One job's resolved inputs."""

    op: str
    keypair: KeyPairRecord
    public: ssh_keys.PublicKey
    new_private: str | None  # the engine-held private key of ``keypair`` (login checks)
    credential: Credential
    old_public: ssh_keys.PublicKey | None  # replace: the key the auth private key proves
    password_change: bool | None  # True: turn on; False: turn off; None: leave
    timeouts: Timeouts


def _check_batch(op: str, args: dict[str, Any], limit: int) -> list[str]:
    servers = args["servers"]
    if len(servers) > limit:
        raise BatchError(TOO_MANY, code="kps_batch_too_large",
                         cause=f"{len(servers)} servers in one batch; the limit is {limit}",
                         fix="Bind fewer at once.")
    names: list[str] = []
    for item in servers:
        if isinstance(item, dict):
            if item.get("keypair", args["keypair"]) != args["keypair"]:
                raise BatchError(INCONSISTENT, code="kps_batch_inconsistent",
                                 cause=f"the batch names {args['keypair']!r} and "
                                 f"{str(item.get('keypair'))[:64]!r}",
                                 fix="One key pair per batch.")
            names.append(str(item["server"]))
        else:
            names.append(str(item))
    return list(dict.fromkeys(names))  # a server named twice is done once


def _credential(op: str, auth: Any) -> Credential:
    if not isinstance(auth, dict) or len(auth) != 1:
        raise invalid("auth must be {password: ...} or {private_key: ...}")
    (kind, value), = auth.items()
    if kind not in AUTH_NEEDED[op] or not isinstance(value, str) or not value:
        raise invalid(f"kps.{op} authenticates with {' or '.join(AUTH_NEEDED[op])}")
    if kind == "password":
        return Credential(password=value)
    try:
        loaded = ssh_keys.load_private_key(value.encode())
    except InvalidInput:
        raise invalid("auth.private_key is not a readable unencrypted private key") from None
    return Credential(private_key=ssh_keys.dump_private_key(loaded.key, "openssh").decode())


async def run_operation(ctx: JobContext, args: dict[str, Any], op: str) -> dict[str, Any]:
    """The body of the four jobs."""
    config = ctx.settings.section(KpsSettings)
    names = _check_batch(op, args, config.batch_limit)
    kps: KpsService = await ctx.resources.get("kps")
    account = args.get("account", DEFAULT_ACCOUNT)
    user = args.get("user", "local")
    credential = _credential(op, args["auth"])  # the runner opened its seal
    record = await kps.get(args["keypair"], account=account, user=user)
    servers = [await kps.server(name, account) for name in names]
    new_private = (await kps.private_key(record)).decode() if record.managed else None
    old_public = None
    if op == "replace":
        assert credential.private_key is not None
        old_public = ssh_keys.public_key_of(
            ssh_keys.load_private_key(credential.private_key.encode()).key)
    if op == "unbind" and credential.private_key is not None:
        own = ssh_keys.public_key_of(
            ssh_keys.load_private_key(credential.private_key.encode()).key)
        if own.blob != ssh_keys.parse_public_key(record.public_key).blob:
            raise InvalidInput(ssh_keys.MISMATCH, code="private_key_mismatch",
                               cause=f"unbind authenticates with the private key of "
                               f"{record.name!r}; the key given belongs to another pair",
                               fix="Check both keys.")
    flag = args.get(FLAGS[op], False) if FLAGS[op] else False
    plan = Plan(op, record, ssh_keys.parse_public_key(record.public_key), new_private,
                credential, old_public,
                (op == "unbind") if flag else None,
                Timeouts(config.connect_timeout, config.login_timeout, config.command_timeout))
    limit = asyncio.Semaphore(config.concurrency)

    async def progress(server: ServerRecord, status: str, detail: str = "") -> None:
        # Progress only feeds the CLI's progress bar: a store hiccup must not fail
        # the server's operation (or leave its siblings running on a failed job).
        try:
            await kps.store.set_progress(ctx.task_id, server.name, status, detail, ctx.now())
        except DewError as exc:
            ctx.log.warning("progress not recorded", target=server.name, error=exc.message)

    async def one(server: ServerRecord) -> dict[str, Any]:
        async with limit:
            # The safe point of `dew tasks cancel`: before a server starts, never in the
            # middle of one (a half-changed authorized_keys could lock its users out).
            if await ctx.cancel_requested():
                await progress(server, "skipped", "cancelled")
                return {"server": server.name, "status": "skipped", "reason": "cancelled"}
            await progress(server, "running")
            try:
                result = await _with_retries(ctx, config, lambda: _apply(ctx, kps, plan, server))
            except DewError as exc:
                await ctx.record_failure(server.name, exc)
                await progress(server, "failed", exc.message)
                return {"server": server.name, "status": "failed", "code": exc.code,
                        "error": exc.message}
            await progress(server, "succeeded")
            return {"server": server.name, "status": "succeeded", **result}

    # A TaskGroup, so an unexpected error in one server's coroutine cancels the others
    # instead of leaving them running after the job has ended.
    try:
        async with asyncio.TaskGroup() as group:
            running = [group.create_task(one(s)) for s in servers]
    except ExceptionGroup as errors:
        raise errors.exceptions[0] from None  # e.g. a store error: the engine retries it
    results = [t.result() for t in running]
    failed = sum(1 for r in results if r["status"] == "failed")
    skipped = sum(1 for r in results if r["status"] == "skipped")
    summary = {"operation": op, "keypair": record.name, "fingerprint": record.fingerprint,
               "servers": list(results), "succeeded": len(results) - failed - skipped,
               "failed": failed, "partially_failed": failed > 0}
    if skipped:
        # Cancelled part-way: the task ends cancelled, its result saying which servers
        # were done (each one whole) and which never started.
        raise ctx.cancelled({**summary, "skipped": skipped})
    if results and failed == len(results):
        raise all_failed(op, results)
    return summary


def all_failed(op: str, results: list[dict[str, Any]]) -> BatchFailed:
    """The task-level error of a batch whose every server failed (the task ends
    ``failed``); each server keeps its own failure record with the product message."""
    n = len(results)
    what = "the server" if n == 1 else f"all {n} servers"
    detail = "; ".join(f"{r['server']}: {r['error']}" for r in results[:5])
    if n > 5:
        detail += f"; ... ({n - 5} more)"
    return BatchFailed(f"kps.{op}: {what} failed ({n} of {n})",
                       cause=detail,
                       fix="See each server's failure record (`dew failures list --task-id "
                       "TASK`), fix the cause, then `dew tasks retry TASK`.")


async def _with_retries(ctx: JobContext, config: KpsSettings,
                        attempt: Callable[[], Any]) -> dict[str, Any]:
    for n in range(config.retries + 1):
        try:
            result: dict[str, Any] = await attempt()
            return result
        except DewError as exc:
            if not exc.retryable or n == config.retries:
                raise
            ctx.log.info("server attempt failed; retrying", target=exc.target, code=exc.code,
                         cause=exc.cause)
            await asyncio.sleep(config.retry_delay * 2 ** n)
    raise AssertionError("unreachable")


def _target(server: ServerRecord) -> Target:
    return Target(server.name, server.host, server.port, server.login_user, server.host_key)


async def _apply(ctx: JobContext, kps: KpsService, plan: Plan, server: ServerRecord
                 ) -> dict[str, Any]:
    """One server, under its lock: read, decide (pure), write, reload, prove."""
    async with server_lock(server.server_id):
        # The pin may have been taken by an earlier job since the plan was made.
        if server.host_key is None:
            server = await kps.store.get_server(server.server_id) or server
        target = _target(server)
        try:
            session = await connect(target, plan.credential, plan.timeouts)
        except InvalidCredential as exc:
            if plan.op == "unbind":
                # Refused for any reason (already removed? StrictModes? AllowUsers?): we
                # cannot read authorized_keys, so nothing is recorded (audit M3).
                raise InvalidCredential(
                    exc.message, target=server.name,
                    cause=f"the private key of {plan.keypair.name!r} was refused, so "
                    "authorized_keys could not be read: the key may be gone already, or sshd "
                    "refuses it for another reason (StrictModes: modes of the home directory "
                    "or ~/.ssh; AllowUsers; AuthorizedKeysCommand)",
                    fix="Check the server; the binding is kept until the key is seen gone."
                ) from None
            # A re-run (retry, or a worker killed mid-job) may find its own work done.
            if plan.op == "replace" and plan.new_private is not None:
                session = await connect(target, Credential(private_key=plan.new_private),
                                        plan.timeouts)
            else:
                raise
        session.sudo = server.sudo
        try:
            if server.host_key is None:
                pinned = await kps.store.pin_host_key(server.server_id, session.host_key)
                target = Target(target.name, target.host, target.port, target.user, pinned)
                if pinned != session.host_key:
                    # Another job pinned a different key in between: do not trust this one.
                    raise HostKeyChanged("The server's host key does not match the pinned "
                                         "key.", target=server.name,
                                         cause="the key pinned on first use differs")
            return await _change(ctx, kps, plan, server, target, session)
        finally:
            await session.close()


# --------------------------------------------------------------------------- decisions


def password_off_refusal(plan_op: str, password_change: bool | None, key_held: bool,
                         name: str) -> str | None:
    """Why password login must not be turned off (None: it may, once the new key logged
    in). Only a fresh login with the new key proves it; the engine can log in with a key
    only when it holds the private key."""
    if password_change is not False or plan_op == "unbind":
        return None
    if not key_held:
        return (f"password login stays on: the engine does not hold the private key of "
                f"{name!r}, so it cannot prove that the key logs in before the password "
                "stops working")
    return None


def unproven_removal(op: str, key_held: bool, removes_a_key: bool) -> bool:
    """replace/reset remove keys; with a new key the engine cannot log in with, another
    way in (password login offered) must be proven before the old key goes."""
    return op in ("replace", "reset") and removes_a_key and not key_held


@dataclass
class Edit:
    """One file written on the server: what to put back if a later step fails."""

    file: RemoteFile
    new: bytes | None
    privileged: bool
    config: bool  # an sshd_config: sshd reloads after it is put back


def restore_order(edits: list[Edit]) -> list[Edit]:
    """The edits to undo, last first (each file back to what was read)."""
    return [e for e in reversed(edits) if e.new != e.file.content]


@dataclass
class Journal:
    """The edits of one server operation, so that a failure puts every file back."""

    session: Session
    server: ServerRecord
    reload_command: str
    edits: list[Edit] = field(default_factory=list)

    async def write(self, file: RemoteFile, new: bytes, *, privileged: bool,
                    config: bool = False, private_under: str | None = None) -> None:
        await self.session.write_file(file.real, new, file.content, privileged=privileged,
                                      mode=None if config else "600",
                                      private_under=private_under)
        self.edits.append(Edit(file, new, privileged, config))

    async def reload(self) -> None:
        status, _, err = await self.session.run(self.reload_command, privileged=True)
        if status != 0:
            raise ServerStatusError(
                STATUS_ERROR, code="sshd_reload_failed", target=self.server.name,
                cause=f"`{self.reload_command}` exited with {status}: "
                f"{err.decode(errors='replace').strip()[:200]}; every file was put back",
                fix="Check the reload command (--reload-command) and sshd.")

    async def restore(self, log: Any) -> None:
        """Put every edited file back (best effort: the first error is what is reported)."""
        reload = False
        for edit in restore_order(self.edits):
            try:
                await self.session.write_file(edit.file.real, edit.file.content, edit.new,
                                              privileged=edit.privileged)
                reload = reload or edit.config
            except DewError as exc:
                log.error("could not put a file back", target=self.server.name,
                          path=edit.file.real, error=exc.message, cause=exc.cause)
        if reload:
            status, _, _ = await self.session.run(self.reload_command, privileged=True)
            if status != 0:
                log.warning("reload after putting sshd_config back failed",
                            target=self.server.name, status=status)


def _permission(server: ServerRecord, login: str, file: RemoteFile) -> None:
    """Refuse, before anything is written, a file the session cannot read or replace."""
    what = "read" if not file.readable else "write" if not file.writable else None
    if what is None:
        return
    hint = ("sudo is on for this server: check the sudo rules" if server.sudo
            else "add the server with --sudo")
    raise PermissionProblem(
        f"cannot {what} {file.real} as user {login}: permission denied; {hint}",
        target=server.name,
        cause=f"{login} lacks {what} permission on {file.real}"
        + ("" if file.real == file.path else f" (the target of {file.path})"),
        fix="Add the server with --sudo (passwordless sudo for the login user), or log in "
        "as root." if not server.sudo else "Allow the login user passwordless sudo.")


async def _read(session: Session, server: ServerRecord, login: str, path: str,
                privileged: bool, read: RemoteFile | None = None) -> tuple[RemoteFile, bool]:
    """A file to edit and whether it needs sudo: the login user's own file is edited as
    the user; through sudo when the server allows it and the user cannot. ``read``: the
    file as the login user already read it (with the snapshot)."""
    use_sudo = server.sudo and privileged
    file = (read if read is not None and not use_sudo
            else (await session.read_files([path], privileged=use_sudo))[0])
    if not use_sudo and server.sudo and not (file.readable and file.writable):
        use_sudo = True
        file = (await session.read_files([path], privileged=True))[0]
    _permission(server, "root" if use_sudo else login, file)
    return file, use_sudo


# --------------------------------------------------------------------------- the steps


async def _change(ctx: JobContext, kps: KpsService, plan: Plan, server: ServerRecord,
                  target: Target, session: Session) -> dict[str, Any]:
    # authorized_keys is first read as the login user: with the snapshot, one round trip.
    snap = await session.snapshot(read=[server.authorized_keys or DEFAULT_AUTHORIZED_KEYS])
    system = parse_os_release(snap.os_release)
    if not system.supported:
        raise ServerStatusError(OS_NOT_SUPPORTED, code="os_not_supported",
                                cause=f"Server OS not supported: {system.name}",
                                fix="Use a supported OS (see `dew keypairs --help`).",
                                target=server.name)
    refusal = password_off_refusal(plan.op, plan.password_change, plan.new_private is not None,
                                   plan.keypair.name)
    if refusal is not None:
        raise ServerStatusError(STATUS_ERROR, code="password_off_unproven", target=server.name,
                                cause=refusal,
                                fix="Bind with a managed key pair (--managed, or import its "
                                "private key) to turn password login off, or bind without "
                                "--disable-password.")
    keys, keys_sudo = await _read(session, server, snap.login, snap.files[0].path,
                                  privileged=False, read=snap.files[0])
    config = None
    if plan.password_change is not None:
        config, _ = await _read(session, server, snap.login,
                                absolute(server.sshd_config or DEFAULT_SSHD_CONFIG, snap.home),
                                privileged=True)
        if config.content is None:
            raise ServerStatusError(STATUS_ERROR, code="sshd_config_missing",
                                    target=server.name,
                                    cause=f"{config.path} does not exist on the server",
                                    fix="Set the server's sshd config path (--sshd-config).")
    victims = await _reset_victims(kps, plan, server)
    journal = Journal(session, server,
                      server.reload_command or default_reload_command(system, snap.systemd))
    steps = Steps(ctx, plan, server, target, session, journal, snap, system.suse)
    try:
        result = await steps.run(keys, keys_sudo, config, victims)
        await _record_binding(ctx, kps, plan, server)
    except Exception:
        await journal.restore(ctx.log)
        raise
    return result


@dataclass
class Steps:
    """One server's operation, in the order that keeps a way in at every step."""

    ctx: JobContext
    plan: Plan
    server: ServerRecord
    target: Target
    session: Session
    journal: Journal
    snap: Snapshot
    suse: bool

    async def run(self, keys: RemoteFile, keys_sudo: bool, config: RemoteFile | None,
                  victims: list[ssh_keys.PublicKey]) -> dict[str, Any]:
        plan = self.plan
        password = None
        if config is not None and plan.password_change:
            # unbind --enable-password: the password works before the key goes (H1).
            password = await self.switch_password(config, True)
        old_text = (keys.content or b"").decode("utf-8", errors="surrogateescape")
        new_text = _new_keys(plan, old_text, victims)
        changed = new_text != old_text
        if changed:
            await self.journal.write(keys, new_text.encode("utf-8", errors="surrogateescape"),
                                     privileged=keys_sudo, private_under=self.snap.home)
        verified = False
        if plan.op != "unbind" and plan.new_private is not None:
            await _prove(check_login(self.target, Credential(private_key=plan.new_private),
                                     plan.timeouts), self.server, "the new key pair")
            verified = True
        elif unproven_removal(plan.op, plan.new_private is not None,
                              ak.removed_keys(old_text, new_text) > 0):
            await self.prove_password_offered("the new key pair cannot be proven (the engine "
                                              "does not hold its private key)")
        if plan.op == "unbind":
            await self.prove_key_gone(keys, keys_sudo)
        if plan.op == "unbind" or (plan.op == "replace" and plan.old_public is not None
                                   and plan.old_public.blob != plan.public.blob):
            await _prove_refused(self.target, plan.credential, plan.timeouts, self.server)
            verified = True
        if config is not None and plan.password_change is False:
            password = await self.switch_password(config, False)
        return {"changed": changed, "verified": verified, "pw_login_state": password}

    async def prove_key_gone(self, keys: RemoteFile, keys_sudo: bool) -> None:
        """unbind: read authorized_keys again; the key must not be in it (M3)."""
        now = (await self.session.read_files([keys.path], privileged=keys_sudo))[0]
        text = (now.content or b"").decode("utf-8", errors="surrogateescape")
        if ak.has_key(text, self.plan.public):
            raise ServerStatusError(STATUS_ERROR, code="key_still_present",
                                    target=self.server.name,
                                    cause=f"{keys.real} still holds the key after the edit",
                                    fix="Check the file on the server.")

    async def switch_password(self, config: RemoteFile, enabled: bool) -> str:
        """Edit sshd_config, reload, then prove the state from the server itself."""
        assert config.content is not None
        old = config.content.decode("utf-8", errors="surrogateescape")
        new = set_password_login(old, enabled, self.suse)
        state = "unchanged"
        if new != old:
            await self.journal.write(config, new.encode("utf-8", errors="surrogateescape"),
                                     privileged=True, config=True)
            await self.journal.reload()
            state = "changed"
        await self.prove_password_state(config, enabled)
        return state

    async def prove_password_state(self, config: RemoteFile, enabled: bool) -> None:
        """The methods sshd offers the login user now, and ``sshd -T`` for this
        connection (Match blocks applied), must both agree with ``enabled`` (M1)."""
        for attempt in range(RELOAD_SETTLE_ATTEMPTS):
            # A reload is a signal: sshd may answer with its old config for a moment.
            offered = password_methods(await offered_methods(self.target, self.plan.timeouts))
            if bool(offered) == enabled:
                break
            await asyncio.sleep(0.25 * (attempt + 1))
        else:
            raise self.password_error(
                enabled, f"after the reload sshd offers {self.server.login_user} "
                f"{', '.join(sorted(offered)) or 'no password method'}")
        spec = connection_spec(self.snap.login, self.snap.connection)
        if spec is None:
            return
        status, out, err = await self.session.effective_config(config.real, spec)
        if status != 0:
            # Not root and no sudo: sshd cannot load the host keys. The methods the
            # server offers (above) are the proof then.
            self.ctx.log.info("sshd -T not available", target=self.server.name,
                              status=status, error=err[:200])
            return
        effective = effective_password_login(parse_effective(out))
        if effective is not None and effective != enabled:
            raise self.password_error(enabled, f"`sshd -T -C {spec}` says password login "
                                      f"is {'off' if enabled else 'on'}")

    def password_error(self, enabled: bool, why: str) -> ServerStatusError:
        wanted = "on" if enabled else "off"
        return ServerStatusError(
            f"Password login could not be turned {wanted}.", code="password_login_unproven",
            target=self.server.name,
            cause=f"{why}: a Match block, an Include or another setting decides otherwise; "
            "every file was put back",
            fix="Check the server's sshd_config (Match blocks, Include files, "
            "KbdInteractiveAuthentication) and run `sshd -T -C user=...` on it.")

    async def prove_password_offered(self, why: str) -> None:
        offered = password_methods(await offered_methods(self.target, self.plan.timeouts))
        if not offered:
            raise ServerStatusError(
                STATUS_ERROR, code="removal_unproven", target=self.server.name,
                cause=f"{why} and sshd offers no password login: removing the old key could "
                "lock everyone out; every file was put back",
                fix="Use a managed key pair (the engine proves it logs in), or turn password "
                "login on first.")


def _new_keys(plan: Plan, text: str, victims: list[ssh_keys.PublicKey]) -> str:
    if plan.op == "unbind":
        return ak.remove_key(text, plan.public)
    comment = plan.keypair.name
    if plan.op == "replace" and plan.old_public is not None:
        return ak.replace_key(text, plan.old_public, plan.public, comment)
    text = ak.add_key(text, plan.public, comment)
    for old in victims:
        if old.blob != plan.public.blob:
            text = ak.remove_key(text, old)
    return text


async def _reset_victims(kps: KpsService, plan: Plan, server: ServerRecord
                         ) -> list[ssh_keys.PublicKey]:
    """reset: the keys of every pair recorded as bound to the server, whoever owns it
    (their private key is lost); every other line of the file is left alone."""
    if plan.op != "reset":
        return []
    return [ssh_keys.parse_public_key(public)
            for keypair_id, public in await kps.store.bound_keys(server.server_id)
            if keypair_id != plan.keypair.keypair_id]


async def _prove(check: Any, server: ServerRecord, what: str) -> None:
    try:
        await check
    except InvalidCredential:
        raise ServerStatusError(STATUS_ERROR, code="login_check_failed", target=server.name,
                                cause=f"after the change, a fresh login with {what} was "
                                "refused (StrictModes, AuthorizedKeysFile or another "
                                "authorized_keys path?); every file was put back",
                                fix="Check the server's AuthorizedKeysFile and the modes of "
                                "~/.ssh.") from None


async def _prove_refused(target: Target, credential: Credential, timeouts: Timeouts,
                         server: ServerRecord, password_only: bool = False) -> None:
    try:
        await check_login(target, credential, timeouts, password_only)
    except InvalidCredential:
        return
    what = "the password" if password_only else "the removed key"
    raise ServerStatusError(STATUS_ERROR, code="login_still_accepted", target=server.name,
                            cause=f"after the change, {what} still logs in; every file was "
                            "put back",
                            fix="Check the server's sshd_config (Include, Match blocks) and "
                            "other authorized_keys files.")


async def _record_binding(ctx: JobContext, kps: KpsService, plan: Plan,
                          server: ServerRecord) -> None:
    record = plan.keypair
    if plan.op == "unbind":
        await kps.store.unbind(record.keypair_id, server.server_id)
        return
    replaced = None
    if plan.op == "replace" and plan.old_public is not None:
        for keypair_id, public in await kps.store.bound_keys(server.server_id):
            if ssh_keys.parse_public_key(public).blob == plan.old_public.blob:
                replaced = keypair_id
    await kps.store.bind(record.keypair_id, server.server_id, ctx.now(), ctx.task_id,
                         replaces=replaced)
    if plan.op == "reset":
        await kps.store.unbind_all_on(server.server_id, keep=record.keypair_id)


_COMMON_FIELDS = {
    "keypair": "string: the key pair", "servers": "list of strings: registered servers",
    "account": "string, optional: the project (name)",
    "user": "string, optional: the owner of a user-scope key pair",
}
JOB_FIELDS = {
    "bind": {**_COMMON_FIELDS, "auth": "object {password | private_key}: the login (sealed)",
             "disable_pw_login": "boolean, optional: turn password login off"},
    "replace": {**_COMMON_FIELDS, "auth": "object {private_key}: the old pair's key (sealed)"},
    "reset": {**_COMMON_FIELDS, "auth": "object {password}: the login (sealed)",
              "disable_pw_login": "boolean, optional: turn password login off"},
    "unbind": {**_COMMON_FIELDS, "auth": "object {private_key}: the login (sealed)",
               "enable_pw_login": "boolean, optional: turn password login on"},
}


def _job(op: str) -> None:
    async def handler(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
        return await run_operation(ctx, args, op)

    handler.__doc__ = {
        "bind": "Install a key pair on servers (optionally turn password login off).",
        "replace": "Swap the bound key pair for a new one (auth: the old private key).",
        "reset": "Install a key pair when the old private key is lost (auth: password).",
        "unbind": "Remove a key pair from servers (optionally turn password login on).",
    }[op]
    # Cancellable: run_operation stops between servers (never inside one) on request.
    JOBS.job(f"kps.{op}", validate=_validator(op), secret_fields=("auth",),
             fields=JOB_FIELDS[op], cancellable=True)(handler)


for _op in OPERATIONS:
    _job(_op)


def settings_timeouts(settings: Settings) -> Timeouts:
    k = settings.section(KpsSettings)
    return Timeouts(k.connect_timeout, k.login_timeout, k.command_timeout)


@asynccontextmanager
async def open_kps(settings: Settings) -> AsyncIterator[KpsService]:
    """A KPS service for one command or script (KMS opened lazily); closed on exit."""
    async with open_key_cipher(settings) as kms:
        store = await SqliteKpsStore.open(settings.store_target)
        try:
            yield KpsService(store, kms, settings.section(KpsSettings))
        finally:
            await store.close()
