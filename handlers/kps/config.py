"""The ``[kps]`` settings section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.errors import ConfigError


@dataclass(frozen=True)
class KpsSettings:
    """SSH key pairs: batch size, fan-out, SSH timeouts (seconds), retries, quota."""

    SECTION: ClassVar[str] = "kps"

    batch_limit: int = 100
    concurrency: int = 50
    connect_timeout: float = 10.0
    login_timeout: float = 15.0
    command_timeout: float = 30.0
    retries: int = 2
    retry_delay: float = 1.0
    quota: int = 500

    def __post_init__(self) -> None:
        if not 1 <= self.batch_limit <= 10_000:
            raise ConfigError("kps.batch_limit must be between 1 and 10000")
        if not 1 <= self.concurrency <= 1000:
            raise ConfigError("kps.concurrency must be between 1 and 1000")
        if min(self.connect_timeout, self.login_timeout, self.command_timeout) <= 0:
            raise ConfigError("kps timeouts must be above 0")
        if not 0 <= self.retries <= 10 or self.retry_delay < 0:
            raise ConfigError("kps.retries must be 0..10 and kps.retry_delay not negative")
        if not 1 <= self.quota <= 100_000:
            raise ConfigError("kps.quota must be between 1 and 100000")
