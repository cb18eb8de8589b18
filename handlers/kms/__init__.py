"""KMS: customer master keys in the HSM, data keys, encrypt-data, signing, rotation, BYOK.

The package's modules: ``service`` (``KmsService``, composed of ``keys``,
``data``, ``signing``, ``rotation`` and ``byok_ops`` on one shared ``core``),
``store`` (key registry and audit chain), ``format`` (input checks and the
ciphertext format), ``jobs``, ``cli``, ``demo``, ``schedules``, ``wiring``
(resources, ``open_kms``). Other services use ``interface`` only.
Reference: docs/kms.md.
"""

from engine.services import ServiceSpec

SERVICE = ServiceSpec(
    "kms",
    title="KMS: master keys, data keys, encrypt-data",
    commands={
        "kms": "KMS: master keys, data keys, encrypt-data",
        "audit": "the hash-chained audit log of key operations",
    },
    cli="handlers.kms.cli",
    jobs="handlers.kms.jobs",
    demo="handlers.kms.demo",
    schedules="handlers.kms.schedules",
    settings="handlers.kms.config:KmsSettings",
    api="handlers.kms.api",
    roles="handlers.kms.roles:CATALOG",
    token_keys="handlers.kms.token_keys:TOKEN_KEYS",
)
