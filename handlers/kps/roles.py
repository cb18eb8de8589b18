"""The KPS's actions and built-in roles, as identities (``dew iam``) know them.

Role names are the hosted service's; each action is what one group of API
operations checks (``handlers/kps/api.py``). Listed in docs/api.md.
"""

from __future__ import annotations

from engine.api.principal import RoleCatalog

ACTIONS = {
    "kps:keypair:create": "create or import key pairs (CreateKeypair, BatchImportKeypair)",
    "kps:keypair:list": "list key pairs",
    "kps:keypair:get": "show a key pair",
    "kps:keypair:update": "change a key pair's description, or stop managing its private key",
    "kps:keypair:delete": "delete a key pair",
    "kps:keypair:export": "export managed private keys",
    "kps:keypair:import": "hand a key pair's private key to the engine to manage",
    "kps:keypair:associate": "bind a key pair to servers (AssociateKeypair, batches)",
    "kps:keypair:disassociate": "unbind a key pair from a server",
    "kps:task:list": "show key pair tasks: one task, running and failed tasks",
    "kps:task:delete": "delete failed key pair task records",
    "kps:server:create": "register a server (ours: /dew/servers)",
    "kps:server:list": "list and show registered servers",
    "kps:server:delete": "remove a registered server",
}

READ_ONLY = ("kps:keypair:list", "kps:keypair:get", "kps:task:list", "kps:server:list")

CATALOG = RoleCatalog(
    roles={
        "DEW KeypairFullAccess": ("kps:*",),
        "DEW KeypairReadOnlyAccess": READ_ONLY,
    },
    actions=ACTIONS,
)
