"""Identities: who may call the HTTPS API, read anew on every request.

:class:`Identities` is the one way to the identity store: the API server calls
:meth:`Identities.caller` for every request (one SQL statement, one unseal in
the HSM, nothing cached between requests, so a changed role, a disabled user or
a deleted key applies to the very next request in every process), and ``dew
iam`` manages projects, users, access keys and custom roles through the rest.

Secret keys: an SK is 40 random letters and digits, shown once when its access
key is made, and stored only sealed: AES-256-GCM in the HSM under the token key
``engine:iam-secret-keys`` (made on first use, never extractable), with the AK
in the associated data, so a sealed SK copied onto another AK does not open.

Built-in roles come from the configured services (``ServiceSpec(roles=...)``, a
:class:`~engine.api.principal.RoleCatalog`), loaded once per process (they are
code); custom roles live in the store. A built-in role wins over a custom role
of the same name (one made before a service brought that name).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from engine.api.principal import Principal, RoleCatalog, merge_catalogs
from engine.errors import (
    AuthenticationFailed,
    ConfigError,
    DewError,
    InvalidInput,
    NotFound,
    Throttled,
)
from engine.iam.model import (
    ACTIVE,
    MAX_ACCESS_KEYS,
    MAX_ROLES,
    NAME,
    SECRET_KEY,
    AccessKey,
    Caller,
    IdentityConflict,
    Project,
    Role,
    User,
    check_access_key,
    check_actions,
    check_key_status,
    check_name,
    check_reference,
    check_role_name,
    is_access_key,
    is_id,
    new_access_key,
    new_id,
    new_secret_key,
    parse_cidrs,
    source_allowed,
)
from engine.iam.passwords import check_new_password, hash_password, locked_until, verify_password
from engine.iam.store import SqliteIamStore
from engine.logs import get_logger
from engine.models import utcnow
from engine.resources import Closer, Resources, resource
from engine.services import ServiceUnavailable, load_object, load_specs
from engine.settings import Settings

if TYPE_CHECKING:
    from engine.crypto import CryptoCore

SECRET_KEY_LABEL = "engine:iam-secret-keys"
_AAD_DOMAIN = b"dew-iam-sk-v1\0"
# Sealed SKs whose HSM answer a process remembers (emptied when full).
UNSEALED_MEMO = 10_000

CryptoProvider = Callable[[], Awaitable["CryptoCore"]]

log = get_logger("dew.iam")


WRONG_SIGN_IN = "Wrong user name or password."


class SignInRefused(AuthenticationFailed):
    """A console sign-in refused: one message whatever was wrong (the name unknown,
    the password wrong or never set, the user disabled), so it tells nothing."""

    code = "sign_in_refused"

    def __init__(self) -> None:
        super().__init__(WRONG_SIGN_IN)


class SignedIn(NamedTuple):
    """A sign-in that passed: the user, and the password hash the password was checked
    against (a console session opens only while it is still the user's)."""

    user_id: str
    password_hash: str


class SignInThrottled(Throttled):
    """Too many wrong passwords in a row for one user name: it waits before the next."""

    code = "sign_in_throttled"

    def __init__(self, wait: float) -> None:
        self.retry_after = max(1, int(wait + 0.999))
        super().__init__(
            f"Too many wrong passwords for this user name: try again in "
            f"{self.retry_after} seconds.", fix="Wait, then sign in with the right password.")


def secret_key_aad(access_key: str) -> bytes:
    """The associated data a secret key is sealed with: it binds the SK to its AK."""
    return _AAD_DOMAIN + access_key.encode("ascii")


def load_role_catalog(settings: Settings) -> tuple[RoleCatalog, list[str]]:
    """The merged catalog of the configured services' roles, and one message per
    service whose catalog could not be imported (left out: its roles grant nothing)."""
    catalogs: list[RoleCatalog] = []
    unavailable: list[str] = []
    for spec in load_specs(settings.engine.services):
        if spec.roles is None:
            continue
        try:
            catalog = load_object(spec, spec.roles)
        except ServiceUnavailable as exc:
            log.warning("iam.roles_unavailable", service=spec.name, error=exc.message)
            unavailable.append(exc.message)
            continue
        if not isinstance(catalog, RoleCatalog):
            raise ConfigError(f"service {spec.name!r}: {spec.roles} is not a RoleCatalog")
        catalogs.append(catalog)
    return merge_catalogs(catalogs), unavailable


class Identities:
    """Projects, users, access keys and roles; :meth:`caller` for each API request."""

    def __init__(
        self, settings: Settings, store: SqliteIamStore, catalog: RoleCatalog,
        crypto: CryptoProvider | None = None, *, clock: Callable[[], datetime] = utcnow,
        unavailable: Iterable[str] = (),
    ) -> None:
        self.settings = settings
        self.store = store
        self.catalog = catalog
        self.unavailable = tuple(unavailable)  # services whose roles could not be loaded
        self.clock = clock
        self._provider = crypto
        self._own_crypto: CryptoCore | None = None
        self._crypto_lock = asyncio.Lock()
        self._key_ready = False
        self._unsealed: dict[tuple[str, bytes], bytes] = {}

    @classmethod
    async def open(
        cls, settings: Settings, crypto: Callable[[], Awaitable[CryptoCore]] | None = None
    ) -> Identities:
        """The store opened (schema current, project ``default`` present) and the
        services' role catalogs loaded. ``crypto`` gives the process's crypto core;
        without it one is connected on first need and closed by :meth:`close`."""
        catalog, unavailable = load_role_catalog(settings)
        store = await SqliteIamStore.open(settings.store_target)
        return cls(settings, store, catalog, crypto, unavailable=unavailable)

    async def close(self) -> None:
        own, self._own_crypto = self._own_crypto, None
        try:
            await self.store.close()
        finally:
            if own is not None:
                await own.close()

    async def __aenter__(self) -> Identities:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # --- the per-request lookup ------------------------------------------------------

    async def caller(self, access_key: str) -> Caller | None:
        """Who ``access_key`` stands for, read now (None for an unknown AK). The SK is
        unsealed for this request only; one that does not open (altered, moved to
        another AK, its token key gone) is AuthenticationFailed ``access_key_unusable``."""
        if not is_access_key(access_key):
            return None
        row = await self.store.caller_row(access_key)
        if row is None:
            return None
        secret = await self._opened(access_key, row["secret_sealed"])
        return Caller(
            access_key=access_key, secret_key=secret,
            active=row["status"] == ACTIVE and bool(row["enabled"]),
            user_id=str(row["user_id"]), user=str(row["user"]),
            project_id=str(row["project_id"]), project=str(row["project"]),
            actions=self._actions(row["roles"]), cidrs=tuple(json.loads(row["cidrs"])))

    def _actions(self, roles_json: str | None) -> frozenset[str]:
        """The patterns of the user's roles: built-in ones from the catalogs, custom
        ones as stored; a role that is neither any more grants nothing."""
        actions: set[str] = set()
        for name, custom in json.loads(roles_json or "[]"):
            if name in self.catalog.roles:
                actions.update(self.catalog.roles[name])
            elif custom is not None:
                actions.update(json.loads(custom))
        return frozenset(actions)

    async def _opened(self, access_key: str, blob: Any) -> bytes:
        """The SK of a sealed blob just read from the store. What the HSM answered for
        this very blob is remembered (the blob is bound to its AK, so the pair names one
        answer): the row itself is read on every request, so a deleted or disabled key,
        a role change or a new SK applies to the next request all the same."""
        memo_key = (access_key, bytes(blob) if isinstance(blob, bytes | bytearray) else b"")
        secret = self._unsealed.get(memo_key) if memo_key[1] else None
        if secret is None:
            secret = await self._unseal(access_key, blob)
            if len(self._unsealed) >= UNSEALED_MEMO:
                self._unsealed.clear()
            self._unsealed[memo_key] = secret
        return secret

    async def _unseal(self, access_key: str, blob: Any) -> bytes:
        from engine.crypto import unpack_sealed

        core = await self._crypto()
        try:
            iv, ciphertext = unpack_sealed(bytes(blob) if blob is not None else b"")
            secret = await core.open(SECRET_KEY_LABEL, iv, ciphertext,
                                     aad=secret_key_aad(access_key))
        except DewError as exc:
            if exc.retryable:  # the HSM is unreachable: say so, do not blame the key
                raise
            raise _unusable(access_key, exc.message) from None
        except TypeError:  # not a blob at all
            raise _unusable(access_key, "it is not a sealed blob") from None
        if SECRET_KEY.fullmatch(secret.decode("ascii", "replace")) is None:
            raise _unusable(access_key, "it does not hold a secret key")
        return secret

    # --- crypto ----------------------------------------------------------------------

    async def _crypto(self) -> CryptoCore:
        if self._provider is not None:
            return await self._provider()
        async with self._crypto_lock:
            if self._own_crypto is None:
                from engine.hsm import connect_crypto

                self._own_crypto = await connect_crypto(self.settings)
            return self._own_crypto

    async def _sealing_key(self) -> CryptoCore:
        """The core, with ``engine:iam-secret-keys`` made if the token lacks it
        (processes sharing the token make it once: under a file lock)."""
        from engine.crypto import KeySpec

        core = await self._crypto()
        if self._key_ready:
            return core
        async with self._crypto_lock:
            if not self._key_ready:
                fd = await asyncio.to_thread(_lock_file, self.settings.state_dir / "hsm")
                try:
                    await core.ensure_key(KeySpec.AES_256, SECRET_KEY_LABEL, b"engine:iam")
                finally:
                    os.close(fd)  # releases the lock
                self._key_ready = True
        return core

    # --- projects --------------------------------------------------------------------

    async def project(self, ref: str) -> Project | None:
        """A project by its 32-hex id or by its name."""
        if not isinstance(ref, str) or not ref:
            return None
        return await self.store.get_project(ref)

    async def list_projects(self) -> list[Project]:
        return await self.store.list_projects()

    async def create_project(self, name: str) -> Project:
        project = Project(new_id(), check_name(name, "project"), self.clock())
        await self.store.create_project(project)
        log.info("iam.project_created", project=project.name, project_id=project.project_id)
        return project

    async def _project_of(self, ref: str) -> Project:
        project = await self.store.get_project(check_reference(ref, "project"))
        if project is None:
            raise NotFound(f"no project {ref!r}", code="project_not_found", target=ref,
                           fix="List them with `dew iam list-projects`.")
        return project

    # --- users -----------------------------------------------------------------------

    async def user(self, ref: str) -> User | None:
        """A user by its 32-hex id or by its name."""
        if not isinstance(ref, str) or not ref:
            return None
        return await self.store.get_user(ref)

    async def _user_of(self, ref: str) -> User:
        user = await self.store.get_user(check_reference(ref, "user"))
        if user is None:
            raise NotFound(f"no user {ref!r}", code="user_not_found", target=ref,
                           fix="List them with `dew iam list-users`.")
        return user

    async def list_users(self, project_ref: str | None = None) -> list[User]:
        if project_ref is None:
            return await self.store.list_users()
        return await self.store.list_users((await self._project_of(project_ref)).project_id)

    async def create_user(self, name: str, project_ref: str, roles: Iterable[str] = (),
                          cidrs: Iterable[str] = ()) -> User:
        """A user of a project, enabled, with roles (each built in or custom) and the
        networks it may call from (none: any). Everything is checked first."""
        check_name(name, "user")
        role_names = self._check_role_names(roles)
        networks = parse_cidrs(cidrs)
        project = await self._project_of(project_ref)
        user = User(user_id=new_id(), name=name, project_id=project.project_id,
                    project=project.name, enabled=True, roles=role_names, cidrs=networks,
                    created_at=self.clock())
        await self.store.create_user(user, self.catalog.roles.keys())
        log.info("iam.user_created", user=user.name, user_id=user.user_id,
                 project=project.name, roles=list(role_names), cidrs=list(networks))
        return user

    async def set_roles(self, user_ref: str, roles: Iterable[str]) -> User:
        """Replace the user's roles (none: it may do nothing)."""
        role_names = self._check_role_names(roles)
        user = await self._user_of(user_ref)
        if not await self.store.set_roles(user.user_id, role_names, self.catalog.roles.keys()):
            raise NotFound(f"no user {user_ref!r}", code="user_not_found", target=user_ref)
        log.info("iam.roles_set", user=user.name, user_id=user.user_id, roles=list(role_names))
        return await self._user_of(user.user_id)

    async def disable_user(self, user_ref: str) -> User:
        return await self._set_enabled(user_ref, False)

    async def enable_user(self, user_ref: str) -> User:
        return await self._set_enabled(user_ref, True)

    async def _set_enabled(self, user_ref: str, enabled: bool) -> User:
        user = await self._user_of(user_ref)
        if not await self.store.set_enabled(user.user_id, enabled):
            raise NotFound(f"no user {user_ref!r}", code="user_not_found", target=user_ref)
        log.info("iam.user_enabled" if enabled else "iam.user_disabled", user=user.name,
                 user_id=user.user_id)
        return await self._user_of(user.user_id)

    def _check_role_names(self, roles: Iterable[str]) -> tuple[str, ...]:
        """Role names, each a built-in one or of a custom role's shape (whether that one
        exists is checked in the write's transaction), without repeats, sorted."""
        if isinstance(roles, str):
            roles = (roles,)
        names: set[str] = set()
        for role in roles:
            names.add(role if role in self.catalog.roles else check_role_name(role))
        if len(names) > MAX_ROLES:
            raise InvalidInput(f"at most {MAX_ROLES} roles per user", code="invalid_role")
        return tuple(sorted(names))

    # --- access keys -----------------------------------------------------------------

    async def create_access_key(self, user_ref: str) -> tuple[AccessKey, str]:
        """A new active access key of the user: the record and the SK in clear, which
        is shown this once (the store keeps it sealed). At most two per user."""
        user = await self._user_of(user_ref)
        if await self.store.count_access_keys(user.user_id) >= MAX_ACCESS_KEYS:
            raise IdentityConflict(
                f"user {user.name!r} has {MAX_ACCESS_KEYS} access keys already, the most a "
                "user may have", code="access_key_limit",
                fix="Delete one first (dew iam delete-access-key).")
        from engine.crypto import pack_sealed

        core = await self._sealing_key()
        access_key, secret_key = new_access_key(), new_secret_key()
        sealed = await core.seal(SECRET_KEY_LABEL, secret_key.encode("ascii"),
                                 aad=secret_key_aad(access_key))
        now = self.clock()
        await self.store.create_access_key(access_key, user.user_id, pack_sealed(sealed), now,
                                           MAX_ACCESS_KEYS)
        log.info("iam.access_key_created", access_key=access_key, user=user.name,
                 user_id=user.user_id)
        record = AccessKey(access_key=access_key, user_id=user.user_id, user=user.name,
                           project_id=user.project_id, project=user.project, status=ACTIVE,
                           created_at=now)
        return record, secret_key

    async def access_key(self, access_key: str) -> AccessKey | None:
        if not is_access_key(access_key):
            return None
        return await self.store.get_access_key(access_key)

    async def list_access_keys(self, user_ref: str) -> list[AccessKey]:
        return await self.store.list_access_keys((await self._user_of(user_ref)).user_id)

    async def delete_access_key(self, access_key: str) -> None:
        check_access_key(access_key)
        if not await self.store.delete_access_key(access_key):
            raise NotFound(f"no access key {access_key!r}", code="access_key_not_found",
                           target=access_key)
        log.info("iam.access_key_deleted", access_key=access_key)

    async def set_access_key_status(self, access_key: str, status: str) -> AccessKey:
        """``active`` or ``inactive`` (an inactive key authenticates nothing)."""
        check_access_key(access_key)
        status = check_key_status(status)
        if not await self.store.set_access_key_status(access_key, status):
            raise NotFound(f"no access key {access_key!r}", code="access_key_not_found",
                           target=access_key)
        log.info("iam.access_key_status", access_key=access_key, status=status)
        record = await self.store.get_access_key(access_key)
        if record is None:  # deleted meanwhile
            raise NotFound(f"no access key {access_key!r}", code="access_key_not_found",
                           target=access_key)
        return record

    # --- console passwords and principals ---------------------------------------------

    async def set_password(self, user_ref: str, password: str) -> User:
        """Set the user's console password (stored as an argon2id hash); the user's
        console sessions end. Checked first: nothing is written on bad input."""
        check_new_password(password)
        user = await self._user_of(user_ref)
        hashed = await asyncio.to_thread(hash_password, password)
        if not await self.store.set_password(user.user_id, hashed):
            raise NotFound(f"no user {user_ref!r}", code="user_not_found", target=user_ref)
        log.info("iam.password_set", user=user.name, user_id=user.user_id)
        return user

    async def sign_in(self, name: str, password: str) -> SignedIn:
        """The user ``name`` whose ``password`` this is, enabled. Otherwise
        one generic refusal, whether the name is unknown, the password wrong, none set
        or the user disabled (:class:`SignInRefused`); after ``[console] lockout_after``
        wrong ones in a row the name must wait (:class:`SignInThrottled`), counted in the
        store so that every API process applies it."""
        console = self.settings.console
        now = self.clock()
        key = name[:64]

        def wait(failures: int, last: datetime | None) -> float:
            until = locked_until(failures, last, console.lockout_after,
                                 console.lockout_seconds, console.lockout_max_seconds)
            return 0.0 if until is None or now >= until else (until - now).total_seconds()

        failures, last = await self.store.sign_in_failures(key)
        if pause := wait(failures, last):
            raise SignInThrottled(pause)
        # The attempt counts as a failure before its password is checked (a right one
        # clears the count): guesses sent at once, to one process or several, each see
        # the others' and only the first ``lockout_after`` are checked at all.
        count = await self.store.add_sign_in_failure(key, now)
        if count - 1 > failures and (pause := wait(count - 1, last or now)):
            log.info("iam.sign_in_refused", user=key, failures=count)
            raise SignInThrottled(pause)
        found = await self.store.password_of(name) if NAME.fullmatch(name) else None
        stored = found[1] if found is not None else None
        right = await asyncio.to_thread(verify_password, stored, password)
        if found is None or stored is None or not right or not found[2]:
            log.info("iam.sign_in_refused", user=key, failures=count)
            raise SignInRefused()
        await self.store.clear_sign_in_failures(key)
        log.info("iam.signed_in", user=name, user_id=found[0])
        return SignedIn(found[0], stored)

    async def principal_for(self, user_id: str, source_ip: str, via: str) -> Principal | None:
        """The :class:`Principal` of a console user, read now (a changed role or a
        disabled user applies to the next request); None when the user is gone or
        disabled, or ``source_ip`` is outside the user's allowed networks."""
        row = await self.store.user_principal_row(user_id)
        if row is None or not row["enabled"]:
            return None
        cidrs = tuple(json.loads(row["cidrs"]))
        if not source_allowed(cidrs, source_ip):
            return None
        return Principal(project_id=str(row["project_id"]), project=str(row["project"]),
                         user_id=str(row["user_id"]), user=str(row["user"]), access_key=via,
                         source_ip=source_ip, actions=self._actions(row["roles"]))

    # --- roles -----------------------------------------------------------------------

    def actions(self) -> Mapping[str, str]:
        """Every action the configured services check, with its meaning."""
        return self.catalog.actions

    async def list_roles(self) -> list[Role]:
        """The built-in roles (by name), then the custom ones."""
        builtin = [Role(name, tuple(actions), True)
                   for name, actions in sorted(self.catalog.roles.items())]
        custom = [r for r in await self.store.list_roles() if r.name not in self.catalog.roles]
        return builtin + custom

    async def create_role(self, name: str, actions: Iterable[str],
                          description: str = "") -> Role:
        """A custom role: each action one of the services' catalogs, or a wildcard
        (``kms:*``, ``kms:cmk:*``) matching at least one."""
        check_role_name(name)
        if name in self.catalog.roles:
            raise IdentityConflict(f"{name!r} is a built-in role", code="role_exists",
                                   target=name, fix="Choose another name.")
        if isinstance(actions, str):
            actions = (actions,)
        if not isinstance(description, str) or len(description) > 255 or \
                not description.isprintable():
            raise InvalidInput("a role description is at most 255 printable characters",
                               code="invalid_parameter", target="description")
        role = Role(name, check_actions(actions, self.catalog.actions), False, description)
        await self.store.create_role(role, self.clock())
        log.info("iam.role_created", role=name, actions=list(role.actions))
        return role

    async def delete_role(self, name: str) -> None:
        """Delete a custom role; refused while a user holds it."""
        if name in self.catalog.roles:
            raise InvalidInput(f"{name!r} is a built-in role; it cannot be deleted",
                               code="invalid_role", target=name)
        check_role_name(name)
        await self.store.delete_role(name)
        log.info("iam.role_deleted", role=name)


def _unusable(access_key: str, why: str) -> AuthenticationFailed:
    log.error("iam.access_key_unusable", access_key=access_key, why=why)
    return AuthenticationFailed(
        "Incorrect IAM authentication information: the access key cannot be used",
        cause=f"the sealed secret key of {access_key} does not open: {why}",
        fix="Delete the access key and create a new one (dew iam delete-access-key, "
        "dew iam create-access-key).",
        code="access_key_unusable", target=access_key)


def _lock_file(lock_dir: Any) -> int:
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(lock_dir, ".iam-secret-keys.lock"), os.O_WRONLY | os.O_CREAT,
                 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def resolve_project(settings: Settings, ref: str) -> str:
    """The project NAME (the services' account) for a project name or id. A 32-hex
    ``ref`` must be a project's id; any other ``ref`` is returned as it is, project
    row or not, so free-form accounts keep working."""
    if not is_id(ref):
        return ref
    store = await SqliteIamStore.open(settings.store_target)
    try:
        project = await store.get_project(ref)
    finally:
        await store.close()
    if project is None:
        raise InvalidInput(f"no project {ref!r}: no project has that id",
                           code="project_not_found", target=ref,
                           fix="List them with `dew iam list-projects`.")
    return project.name


@resource("identities")
async def _identities(resources: Resources) -> tuple[Identities, Closer]:
    import engine.hsm  # noqa: F401  registers the crypto resource

    async def crypto() -> CryptoCore:
        core: CryptoCore = await resources.get("crypto")
        return core

    identities = await Identities.open(resources.settings, crypto)
    return identities, identities.close
