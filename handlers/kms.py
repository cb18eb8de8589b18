"""KMS: customer master keys in the HSM, data keys, encrypt-data, scheduled deletion.

``KmsService`` is the domain API; the CLI (``dew kms``), the jobs below, the
demo and secret-argument sealing all call it. Keys live in the token (through
:mod:`engine.crypto`), their registry and the audit chain in the task store's
database (:mod:`engine.kms_store`); input checks and the ciphertext format are
pure functions in :mod:`handlers.kms_format`.

This module is the KMS's public face: it re-exports what other code imports
from ``handlers.kms``, and importing it registers the KMS jobs and resources.
The code lives in:

- :mod:`handlers.kms_errors`: the errors; :mod:`handlers.kms_results`: the results.
- :mod:`handlers.kms_service`: ``KmsService`` (key management, data keys,
  encrypt-data), built on :mod:`handlers.kms_base` (audit buffer, lookup,
  cache, token calls) and its parts :mod:`handlers.kms_signing`,
  :mod:`handlers.kms_rotation` and :mod:`handlers.kms_import_ops`.
- :mod:`handlers.kms_wiring`: resources and ``open_kms``; :mod:`handlers.kms_jobs`: the jobs.

Jobs (idempotent under arq re-runs: each checks the key's state, then acts
with a guarded update):

- ``kms.schedule_key_deletion {key, pending_days, account?}``: 7..1096 days.
  A key already pending deletion is left as it is (``changed: false``).
- ``kms.cancel_key_deletion {key, account?}``: back to **disabled**, as the
  hosted service does (enable it again explicitly). A key that is not pending
  deletion is left as it is.
- ``kms.delete_due_keys {}``: marks due keys deleted, destroys their token
  objects, audits both; also run by cron every minute.

Two process-local shortcuts keep the data plane (create-datakey, encrypt,
decrypt) close to the speed of a bare PKCS#11 call:

- key metadata for *using* a key is cached for ``cache_ttl`` seconds (1 s by
  default). Changes made by this process take effect at once; changes made by
  another process (disable, schedule deletion) within ``cache_ttl``. Key
  management always reads the registry. A key whose material was destroyed
  fails in the token anyway, and is then reported as deleted.
- audit entries of key *uses* are buffered and appended in batches every
  ``audit_flush_interval`` seconds (0.2 s; 0 appends each one at once), and on
  close. Key management entries are written in the same transaction as the
  change they record. A process killed with SIGKILL can lose the last
  ``audit_flush_interval`` of use entries, never a management entry.
"""

from __future__ import annotations

from handlers.kms_base import (
    AUDIT_BATCH,
    CACHE_MAX,
    DEFAULT_AUDIT_FLUSH_INTERVAL,
    DEFAULT_CACHE_TTL,
    CryptoProvider,
    token_label,
)
from handlers.kms_errors import (
    AliasExists,
    DefaultKeyProtected,
    KeyDeleted,
    KeyStateError,
    QuotaExceeded,
    RotationInProgress,
    RotationUnsupported,
    UnknownKey,
)
from handlers.kms_import_ops import FINGERPRINT_LABEL, IMPORT_TOKEN_TTL
from handlers.kms_jobs import (  # importing it registers the kms.* jobs
    cancel_key_deletion_job,
    check_cancel_args,
    check_delete_due_args,
    check_rotate_args,
    check_schedule_args,
    delete_due_keys,
    delete_due_keys_job,
    rotate_due_keys,
    rotate_key_job,
    schedule_key_deletion_job,
)
from handlers.kms_results import (
    DataKeyResult,
    DecryptResult,
    DeletionReport,
    EncryptResult,
    ImportParameters,
    KeyChange,
    KeyMetadata,
    MacResult,
    PublicKeyResult,
    RotationChange,
    RotationStatus,
    SignResult,
    VerifyResult,
    protection,
)
from handlers.kms_rotation import ROTATION_LEASE
from handlers.kms_service import DATA_KEY_BYTES, KmsService
from handlers.kms_wiring import (  # importing it registers the crypto, kms_store, kms resources
    connect_crypto,
    default_actor,
    open_kms,
)

__all__ = [
    "AUDIT_BATCH",
    "CACHE_MAX",
    "DATA_KEY_BYTES",
    "DEFAULT_AUDIT_FLUSH_INTERVAL",
    "DEFAULT_CACHE_TTL",
    "FINGERPRINT_LABEL",
    "IMPORT_TOKEN_TTL",
    "ROTATION_LEASE",
    "AliasExists",
    "CryptoProvider",
    "DataKeyResult",
    "DecryptResult",
    "DefaultKeyProtected",
    "DeletionReport",
    "EncryptResult",
    "ImportParameters",
    "KeyChange",
    "KeyDeleted",
    "KeyMetadata",
    "KeyStateError",
    "KmsService",
    "MacResult",
    "PublicKeyResult",
    "QuotaExceeded",
    "RotationChange",
    "RotationInProgress",
    "RotationStatus",
    "RotationUnsupported",
    "SignResult",
    "UnknownKey",
    "VerifyResult",
    "cancel_key_deletion_job",
    "check_cancel_args",
    "check_delete_due_args",
    "check_rotate_args",
    "check_schedule_args",
    "connect_crypto",
    "default_actor",
    "delete_due_keys",
    "delete_due_keys_job",
    "open_kms",
    "protection",
    "rotate_due_keys",
    "rotate_key_job",
    "schedule_key_deletion_job",
    "token_label",
]
