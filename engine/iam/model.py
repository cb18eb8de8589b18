"""The records of the identity store, the checks of their input, and the Caller.

Pure code (no I/O): names, ids, access keys, networks and action patterns are
checked here, before anything is written. A project's ``name`` is what the
services call the *account*, with the same rule as theirs.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.api.principal import Principal, action_matches
from engine.errors import AuthenticationFailed, Conflict, InvalidInput
from engine.models import iso

DEFAULT_PROJECT = "default"
MAX_ACCESS_KEYS = 2  # per user, as the hosted service allows
MAX_CIDRS = 64
MAX_ROLES = 64  # per user, and actions per custom role (below)
MAX_ACTIONS = 256
ACTIVE, INACTIVE = "active", "inactive"
KEY_STATUSES = (ACTIVE, INACTIVE)

# The services' account rule (handlers/kms/format.py check_account), copied: the
# engine names no service.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ID = re.compile(r"[0-9a-f]{32}")
# Role names may hold spaces, like the hosted service's ("KMS Administrator").
ROLE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 _.@:/-]{0,62}[A-Za-z0-9_.@:/-])?")
ACCESS_KEY_ALPHABET = string.ascii_uppercase + string.digits
SECRET_KEY_ALPHABET = string.ascii_letters + string.digits
ACCESS_KEY_LENGTH = 20
SECRET_KEY_LENGTH = 40
ACCESS_KEY = re.compile(f"[A-Z0-9]{{{ACCESS_KEY_LENGTH}}}")
SECRET_KEY = re.compile(f"[A-Za-z0-9]{{{SECRET_KEY_LENGTH}}}")


class IdentityConflict(Conflict):
    """A taken name, a role still held, the access-key limit: nothing was changed."""

    code = "iam_conflict"


# --------------------------------------------------------------------------- ids and keys


def new_id() -> str:
    """A project or user id: 32 lower-case hex digits, random."""
    return secrets.token_hex(16)


def is_id(ref: str) -> bool:
    return ID.fullmatch(ref) is not None


def new_access_key() -> str:
    return "".join(secrets.choice(ACCESS_KEY_ALPHABET) for _ in range(ACCESS_KEY_LENGTH))


def new_secret_key() -> str:
    return "".join(secrets.choice(SECRET_KEY_ALPHABET) for _ in range(SECRET_KEY_LENGTH))


def is_access_key(value: object) -> bool:
    return isinstance(value, str) and ACCESS_KEY.fullmatch(value) is not None


# --------------------------------------------------------------------------- input checks


def check_name(value: object, what: str) -> str:
    """A project or user name: the services' account rule, and not an id's shape
    (a 32-hex reference always means an id)."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise InvalidInput(
            f"invalid {what} name {value!r}: use 1-64 letters, digits, '_', '.', '@' or '-'",
            code="invalid_name", target=what)
    if is_id(value):
        raise InvalidInput(f"invalid {what} name {value!r}: 32 hex digits is the shape of an id",
                           code="invalid_name", target=what)
    return value


def check_role_name(value: object) -> str:
    if not isinstance(value, str) or not ROLE_NAME.fullmatch(value):
        raise InvalidInput(
            f"invalid role name {value!r}: use 1-64 letters, digits, spaces, '_', '.', '@', "
            "':', '/' or '-' (no space first or last)", code="invalid_role", target="role")
    return value


def check_reference(value: object, what: str) -> str:
    """A user or project given by name or by id."""
    if not isinstance(value, str) or not (is_id(value) or NAME.fullmatch(value)):
        raise InvalidInput(f"invalid {what} {value!r}: give its name or its 32-hex id",
                           code="invalid_name", target=what)
    return value


def check_access_key(value: object) -> str:
    if not isinstance(value, str) or ACCESS_KEY.fullmatch(value) is None:
        raise InvalidInput(f"invalid access key {value!r}: 20 upper-case letters or digits",
                           code="invalid_access_key", target="access_key")
    return value


def check_key_status(value: object) -> str:
    if value not in KEY_STATUSES:
        raise InvalidInput(f"invalid access key status {value!r}: active or inactive",
                           code="invalid_parameter", target="status")
    return str(value)


def parse_cidrs(values: Iterable[str]) -> tuple[str, ...]:
    """Allowed source networks (IPv4 or IPv6; an address alone is its /32 or /128),
    normalised and without repeats; empty means any address."""
    networks: list[str] = []
    for value in values:
        text = value.strip() if isinstance(value, str) else value
        if not isinstance(text, str) or not text:
            raise InvalidInput(f"invalid CIDR {value!r}: give a network such as 10.0.0.0/8",
                               code="invalid_cidr", target="cidr")
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            reason = str(exc)
            if "has host bits set" in reason:
                loose = ipaddress.ip_network(text, strict=False)
                reason = f"it has host bits set (the network is {loose})"
            raise InvalidInput(f"invalid CIDR {value!r}: {reason}", code="invalid_cidr",
                               target="cidr") from None
        if str(network) not in networks:
            networks.append(str(network))
    if len(networks) > MAX_CIDRS:
        raise InvalidInput(f"at most {MAX_CIDRS} allowed networks per user, got {len(networks)}",
                           code="invalid_cidr", target="cidr")
    return tuple(networks)


def source_allowed(cidrs: Iterable[str], source_ip: str) -> bool:
    """Whether ``source_ip`` is in one of ``cidrs`` (always, when there is none). An
    IPv4-mapped IPv6 address counts as its IPv4 address; an unreadable one is outside."""
    networks = [ipaddress.ip_network(c) for c in cidrs]
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(source_ip.partition("%")[0])
    except (ValueError, AttributeError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def check_actions(actions: Iterable[str], catalog: Mapping[str, str]) -> tuple[str, ...]:
    """A custom role's action patterns: each an action of the configured services'
    catalogs, or a wildcard (``kms:*``, ``kms:cmk:*``, ``*``) matching at least one."""
    checked: list[str] = []
    for action in actions:
        if not isinstance(action, str) or not action:
            raise InvalidInput(f"invalid action {action!r}", code="invalid_action",
                               target="action")
        wildcard = action == "*" or action.endswith(":*")
        known = (any(action_matches(action, a) for a in catalog) if wildcard
                 else action in catalog)
        if not known:
            what = "matches no action" if wildcard else "is not an action"
            raise InvalidInput(
                f"unknown action {action!r}: it {what} of the configured services "
                "(dew iam list-actions)", code="invalid_action", target=action)
        if action not in checked:
            checked.append(action)
    if not checked:
        raise InvalidInput("a role needs at least one action", code="invalid_action")
    if len(checked) > MAX_ACTIONS:
        raise InvalidInput(f"at most {MAX_ACTIONS} actions per role", code="invalid_action")
    return tuple(checked)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Project:
    project_id: str
    name: str  # the services' account
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"project_id": self.project_id, "name": self.name,
                "created_at": iso(self.created_at)}


@dataclass(frozen=True)
class User:
    user_id: str
    name: str
    project_id: str
    project: str  # the project's name
    enabled: bool
    roles: tuple[str, ...]
    cidrs: tuple[str, ...]  # allowed source networks; empty = any
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "name": self.name, "project_id": self.project_id,
                "project": self.project, "enabled": self.enabled, "roles": list(self.roles),
                "cidrs": list(self.cidrs), "created_at": iso(self.created_at)}


@dataclass(frozen=True)
class AccessKey:
    """An access key as listed: never its secret key, sealed or not."""

    access_key: str
    user_id: str
    user: str
    project_id: str
    project: str
    status: str  # active | inactive
    created_at: datetime

    @property
    def active(self) -> bool:
        return self.status == ACTIVE

    def to_json(self) -> dict[str, Any]:
        return {"access_key": self.access_key, "user_id": self.user_id, "user": self.user,
                "project_id": self.project_id, "project": self.project,
                "status": self.status, "created_at": iso(self.created_at)}


@dataclass(frozen=True)
class Role:
    """A role: built in (a service's catalog) or custom (the store)."""

    name: str
    actions: tuple[str, ...]
    builtin: bool
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "builtin": self.builtin, "actions": list(self.actions),
                "description": self.description}


@dataclass(frozen=True)
class Caller:
    """What an access key stands for, read anew for every request."""

    access_key: str
    secret_key: bytes = field(repr=False)  # the SK, unsealed (ascii): the HMAC key
    active: bool  # the key is active AND its user enabled
    user_id: str
    user: str
    project_id: str
    project: str  # the project's name: the services' account
    actions: frozenset[str]  # every pattern of the user's roles, resolved now
    cidrs: tuple[str, ...]  # allowed source networks; empty = any

    def allows_source(self, source_ip: str) -> bool:
        return source_allowed(self.cidrs, source_ip)

    def principal(self, source_ip: str) -> Principal:
        """The request's :class:`Principal`, once the signature checked out;
        AuthenticationFailed (HTTP 401) when the key is inactive, its user disabled, or
        ``source_ip`` outside the user's allowed networks."""
        if not self.active:
            raise AuthenticationFailed(
                "Incorrect IAM authentication information: the access key is inactive or "
                "its user is disabled", target=self.access_key)
        if not self.allows_source(source_ip):
            raise AuthenticationFailed(
                f"Incorrect IAM authentication information: current ip:{source_ip} refused",
                target=self.access_key)
        return Principal(project_id=self.project_id, project=self.project,
                         user_id=self.user_id, user=self.user, access_key=self.access_key,
                         source_ip=source_ip, actions=self.actions)
