"""The ``[csms]`` settings section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.errors import ConfigError


@dataclass(frozen=True)
class CsmsSettings:
    SECTION: ClassVar[str] = "csms"

    max_concurrent_rotations: int = 20
    db_timeout: float = 5.0
    scheduler_interval: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.max_concurrent_rotations <= 1000:
            raise ConfigError("csms.max_concurrent_rotations must be between 1 and 1000")
        if not 0 < self.db_timeout <= 300:
            raise ConfigError("csms.db_timeout must be above 0 and at most 300 seconds")
        if not 1 <= self.scheduler_interval <= 60 or 60 % self.scheduler_interval:
            raise ConfigError("csms.scheduler_interval must divide 60")
