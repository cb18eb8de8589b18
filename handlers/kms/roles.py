"""The KMS's actions and built-in roles, as identities (``dew iam``) know them.

Role names are the hosted service's; each action is what one group of API
operations checks (``handlers/kms/api.py``). Listed in docs/api.md.
"""

from __future__ import annotations

from engine.api.principal import RoleCatalog

ACTIONS = {
    "kms:cmk:create": "create a key (CreateKey)",
    "kms:cmk:list": "list keys, tags and keys by tags",
    "kms:cmk:get": "describe a key, its tags, rotation status and public key",
    "kms:cmk:update": "change a key's alias, description, tags or rotation",
    "kms:cmk:enable": "enable a key",
    "kms:cmk:disable": "disable a key",
    "kms:cmk:delete": "schedule or cancel a key's deletion",
    "kms:cmk:import": "import key material (parameters, import, delete material)",
    "kms:cmk:crypto": "encrypt-data, decrypt-data, sign, verify, generate and verify MACs",
    "kms:dek:crypto": "create, encrypt and decrypt data keys",
    "kms:random:generate": "random bytes from the HSM",
    "kms:grant:create": "create a grant on a key",
    "kms:grant:list": "list a key's grants",
    "kms:grant:revoke": "revoke a grant",
    "kms:quota:get": "show the project's quotas",
    "kms:audit:list": "read the project's audit entries (dew's own DewListAudit)",
    "kms:audit:verify": "check the audit log's hash chain (dew's own DewVerifyAudit)",
}

READ_ONLY = ("kms:cmk:list", "kms:cmk:get", "kms:grant:list", "kms:quota:get",
             "kms:audit:list", "kms:audit:verify")

CATALOG = RoleCatalog(
    roles={
        "KMS Administrator": ("kms:*",),
        "KMS CMKFullAccess": ("kms:cmk:*", "kms:dek:*", "kms:grant:*", "kms:random:*",
                              "kms:quota:get"),
        "KMS CMKReadOnlyAccess": READ_ONLY,
    },
    actions=ACTIONS,
)
