"""Domain handlers. Importing this package registers every job with ``engine.registry.JOBS``."""

from handlers import engine_jobs

__all__ = ["engine_jobs"]
