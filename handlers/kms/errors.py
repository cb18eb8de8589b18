"""KMS errors: what the service and its jobs raise, each with its error code."""

from __future__ import annotations

from engine.errors import Conflict, NotFound, TransientError


class UnknownKey(NotFound):
    code = "key_not_found"
    default_fix = "Check the key id or alias and the account (--account)."


class KeyStateError(Conflict):
    code = "key_state_invalid"


class KeyDeleted(Conflict):
    code = "key_deleted"
    default_fix = "Nothing can bring the key back; data encrypted under it is lost."


class QuotaExceeded(Conflict):
    code = "kms_quota_exceeded"
    default_fix = "Schedule the deletion of keys you no longer need, or raise kms.quota."


class AliasExists(Conflict):
    code = "alias_exists"
    default_fix = "Choose another alias, or use the existing key."


class RotationUnsupported(Conflict):
    code = "rotation_unsupported"
    default_fix = "Only KMS-generated AES_256 keys rotate; create such a key for rotation."


class RotationInProgress(TransientError):
    code = "rotation_in_progress"
    default_fix = "Another rotation of this key is running; retry in a moment."


class DefaultKeyProtected(Conflict):
    code = "default_key_protected"
    default_fix = "Default keys are managed by their service; create a custom key instead."


class ImportInProgress(Conflict):
    code = "import_in_progress"
    default_fix = ("Another import or removal of this key's material is running; check the "
                   "key's state (dew kms describe-key) before trying again.")


class GrantQuotaExceeded(QuotaExceeded):
    code = "grant_quota_exceeded"
    default_fix = "Revoke or retire grants of this key that are no longer needed."


class TagQuotaExceeded(QuotaExceeded):
    code = "tag_quota_exceeded"
    default_fix = "Delete tags of this key that are no longer needed."


class UnknownGrant(NotFound):
    code = "grant_not_found"
    default_fix = "Check the key id and grant id (list-grants shows a key's grants)."


class UnknownTag(NotFound):
    code = "tag_not_found"
    default_fix = "Check the tag key (the key's tags show which it has)."
