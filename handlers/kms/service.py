"""``KmsService``: the KMS's one surface, composed of small parts on one shared core.

Each part is a plain object over :class:`~handlers.kms.core.KmsCore` (registry,
token, audit buffer, cache), testable alone: :class:`KeyManagement`,
:class:`DataPlane`, :class:`Signing`, :class:`Rotation` and :class:`KeyImport`.
The service binds their operations under one name each, so the CLI, the jobs,
the demo, the HTTPS API and other services call ``kms.encrypt_data(...)`` without
knowing which part does it. :class:`Tags`, :class:`Grants` (and quotas) and
:class:`Usage` hold what the HTTPS API adds.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from engine.crypto import CryptoCore
from handlers.kms.byok_ops import KeyImport
from handlers.kms.core import CryptoProvider, KmsCore
from handlers.kms.data import DATA_KEY_BYTES, DataPlane
from handlers.kms.grants import Grants
from handlers.kms.keys import KeyManagement
from handlers.kms.rotation import Rotation
from handlers.kms.signing import Signing
from handlers.kms.store import KmsStore
from handlers.kms.tags import Tags
from handlers.kms.usage import Usage

__all__ = ["DATA_KEY_BYTES", "KmsService"]


class KmsService:
    """Customer master keys of every account, on one token and one registry."""

    def __init__(self, store: KmsStore, crypto: CryptoCore | CryptoProvider,
                 **options: Any) -> None:
        """``options`` are :class:`KmsCore`'s: quota, clock, actor, cache_ttl,
        audit_flush_interval."""
        self.core = KmsCore(store, crypto, **options)
        self.byok = KeyImport(self.core)
        self.keys = KeyManagement(self.core, self.byok)
        self.signing = Signing(self.core)
        self.data = DataPlane(self.core, self.signing)
        self.rotation = Rotation(self.core)
        self.tags = Tags(self.core)
        self.grants = Grants(self.core)
        self.usage_counts = Usage(self.core)

        keys, data, signing, rotation, byok = (self.keys, self.data, self.signing,
                                               self.rotation, self.byok)
        tags, grants = self.tags, self.grants
        self.create_key = keys.create_key
        self.describe_key = keys.describe_key
        self.list_keys = keys.list_keys
        self.list_keys_page = keys.list_keys_page
        self.update_key_alias = keys.update_key_alias
        self.update_key_description = keys.update_key_description
        self.enable_key = keys.enable_key
        self.disable_key = keys.disable_key
        self.schedule_key_deletion = keys.schedule_key_deletion
        self.cancel_key_deletion = keys.cancel_key_deletion
        self.delete_due_keys = keys.delete_due_keys
        self.audit_list = keys.audit_list
        self.audit_verify = keys.audit_verify
        self.record_audit = keys.record_audit

        self.create_datakey = data.create_datakey
        self.create_datakey_without_plaintext = data.create_datakey_without_plaintext
        self.encrypt_datakey = data.encrypt_datakey
        self.decrypt_datakey = data.decrypt_datakey
        self.encrypt_data = data.encrypt_data
        self.decrypt_data = data.decrypt_data
        self.gen_random = data.gen_random

        self.sign = signing.sign
        self.verify = signing.verify
        self.get_public_key = signing.get_public_key
        self.generate_mac = signing.generate_mac
        self.verify_mac = signing.verify_mac

        self.enable_key_rotation = rotation.enable_key_rotation
        self.disable_key_rotation = rotation.disable_key_rotation
        self.get_key_rotation_status = rotation.get_key_rotation_status
        self.rotate_key = rotation.rotate_key
        self.rotate_due_keys = rotation.rotate_due_keys
        self.update_key_rotation_interval = rotation.update_key_rotation_interval

        self.create_tag = tags.create_tag
        self.delete_tag = tags.delete_tag
        self.batch_tags = tags.batch_tags
        self.key_tags = tags.key_tags
        self.project_tags = tags.project_tags
        self.keys_by_tags = tags.keys_by_tags

        self.create_grant = grants.create_grant
        self.list_grants = grants.list_grants
        self.revoke_grant = grants.revoke_grant
        self.retire_grant = grants.retire_grant
        self.list_retirable_grants = grants.list_retirable_grants
        self.grant_account = grants.grant_account
        self.user_quotas = grants.user_quotas

        self.usage = self.usage_counts.usage

        self.get_parameters_for_import = byok.get_parameters_for_import
        self.import_key_material = byok.import_key_material
        self.delete_imported_key_material = byok.delete_imported_key_material

    @property
    def store(self) -> KmsStore:
        return self.core.store

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.core.clock

    async def flush_audit(self) -> None:
        """Append the buffered use entries now (one transaction)."""
        await self.core.flush_audit()

    async def close(self) -> None:
        """Write the buffered audit entries. Does not close the store or the core."""
        await self.core.close()
