"""The ``[kms]`` settings section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.errors import ConfigError


@dataclass(frozen=True)
class KmsSettings:
    SECTION: ClassVar[str] = "kms"

    quota: int = 100

    def __post_init__(self) -> None:
        if not 1 <= self.quota <= 100_000:
            raise ConfigError("kms.quota must be between 1 and 100000")
