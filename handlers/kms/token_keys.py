"""KMS's own HSM keys, made up front by the node that holds the token (engine.token_keys)."""

from engine.crypto import KeySpec
from engine.token_keys import TokenKey
from handlers.kms.audit_seal import AUDIT_KEY_LABEL
from handlers.kms.byok_ops import FINGERPRINT_LABEL

TOKEN_KEYS = (
    TokenKey(AUDIT_KEY_LABEL, KeySpec.HMAC_256, b"kms:audit"),
    TokenKey(FINGERPRINT_LABEL, KeySpec.HMAC_256, b"kms:fingerprint"),
)
