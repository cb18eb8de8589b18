"""Who is calling: the authenticated identity of one API request, and role catalogs.

A :class:`Principal` is built anew for every request from the identity store
(no cache outlives a request), so a changed role, a disabled user or a deleted
access key applies to the very next call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from engine.errors import PermissionDenied


def action_matches(pattern: str, action: str) -> bool:
    """``kms:*`` and ``kms:cmk:*`` match every action under that prefix; else exact."""
    if pattern == "*":
        return True
    if pattern.endswith(":*"):
        return action.startswith(pattern[:-1])
    return pattern == action


@dataclass(frozen=True)
class Principal:
    """The caller of one request: its project (the services' account), user,
    access key, source address and the actions its roles allow."""

    project_id: str
    project: str  # the project's name: what the services call the account
    user_id: str
    user: str
    access_key: str
    source_ip: str
    actions: frozenset[str] = frozenset()

    def allows(self, action: str) -> bool:
        return any(action_matches(pattern, action) for pattern in self.actions)

    def require(self, action: str) -> None:
        """PermissionDenied (403) naming ``action`` unless a role allows it."""
        if not self.allows(action):
            raise PermissionDenied(
                f"user {self.user} is not allowed to do {action}",
                code="permission_denied", target=action,
            )

    @property
    def actor(self) -> str:
        """The audit log's ``actor`` for what this caller does."""
        return (f"api:{self.user}@{self.project}"
                f" ak={self.access_key} ip={self.source_ip}")


@dataclass(frozen=True)
class RoleCatalog:
    """What a service declares for identities: its built-in roles (name -> action
    patterns) and every action its operations check (name -> one-line meaning)."""

    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    actions: Mapping[str, str] = field(default_factory=dict)


def merge_catalogs(catalogs: Iterable[RoleCatalog]) -> RoleCatalog:
    roles: dict[str, tuple[str, ...]] = {}
    actions: dict[str, str] = {}
    for catalog in catalogs:
        roles.update(catalog.roles)
        actions.update(catalog.actions)
    return RoleCatalog(roles, actions)
