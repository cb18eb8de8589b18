"""The CSMS's actions and built-in roles, as identities (``dew iam``) know them.

Role names are the hosted service's; each action is what one group of API
operations checks (``handlers/csms/api.py``). Reading a secret's **value**
(``csms:secret:getValue``) is an action of its own: ``CSMS ReadOnlyAccess``
sees secrets, versions, stages and tags, never a value. Listed in docs/api.md.
"""

from __future__ import annotations

from engine.api.principal import RoleCatalog

ACTIONS = {
    "csms:secret:create": "create a secret (CreateSecret)",
    "csms:secret:list": "list secrets, and find them by tags (ListResourceInstances)",
    "csms:secret:get": "a secret's metadata, its versions' metadata and its stages",
    "csms:secret:getValue": "read a secret's value (ShowSecretVersion)",
    "csms:secret:update": "change a secret, add versions, move stages, version expiry",
    "csms:secret:delete": "delete a secret, schedule or cancel its deletion",
    "csms:secret:rotate": "rotate a secret now (RotateSecret)",
    "csms:tag:list": "list a secret's tags",
    "csms:tag:create": "add tags to a secret",
    "csms:tag:delete": "remove tags from a secret",
    "csms:task:list": "list rotation tasks (ListSecretTask)",
    "csms:password:generate": "generate a random password (GenerateRandomPassword)",
}

READ_ONLY = ("csms:secret:list", "csms:secret:get", "csms:tag:list", "csms:task:list")

CATALOG = RoleCatalog(
    roles={
        "CSMS FullAccess": ("csms:*",),
        "CSMS ReadOnlyAccess": READ_ONLY,
    },
    actions=ACTIONS,
)
