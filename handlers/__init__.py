"""Domain handlers. Importing this package registers every job with ``engine.registry.JOBS``."""

from handlers import engine_jobs, kms
from handlers import keypairs as keypairs  # KPS jobs: kps.bind, kps.replace, kps.reset, kps.unbind
from handlers import secrets as secrets  # CSMS jobs: csms.rotate_secret, csms.delete_due_secrets

__all__ = ["engine_jobs", "kms"]
