"""Structured logs: JSON lines to a file, readable lines on a terminal.

Everything goes through structlog's processor chain, stdlib loggers (arq's,
asyncio's) included, so that one redaction processor sees every event before
any renderer: a secret never reaches a log line. Job code binds ``task_id`` and
``job`` with ``structlog.contextvars``, which follow each asyncio task, so every
line of a job carries them even when a hundred jobs run at once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

from engine.private import private_dir, private_files
from engine.redaction import redact

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def redact_secrets(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: replace the value of every secret-named key."""
    redacted: dict[str, Any] = redact(dict(event_dict))
    return redacted


SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    redact_secrets,
]


def configure_logging(
    log_file: Path | None, level: str = "info", console: str = "auto",
    console_level: str | None = None,
) -> None:
    """Set up structlog and stdlib logging for this process (idempotent).

    ``console``: ``auto`` (pretty on a terminal, JSON otherwise), ``pretty``,
    ``json`` or ``off``. ``console_level`` lets the CLI keep the terminal quiet
    (warnings only) while the file gets everything at ``level``.
    """
    structlog.configure(
        processors=[
            # Drop lines below the level before any other work: "job started" is a
            # debug line a busy worker writes thousands of times a second.
            structlog.stdlib.filter_by_level,
            *SHARED_PROCESSORS,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    file_level = LEVELS.get(level.lower(), logging.INFO)
    term_level = LEVELS.get((console_level or level).lower(), logging.INFO)
    root.setLevel(min(file_level, term_level))

    if log_file is not None:
        file_handler = LazyFileHandler(log_file, encoding="utf-8", delay=True)
        file_handler.setLevel(file_level)
        file_handler.setFormatter(_formatter(structlog.processors.JSONRenderer()))
        root.addHandler(file_handler)

    logging.getLogger("asyncio").setLevel(logging.WARNING)  # "Using selector" noise

    if console != "off":
        pretty = console == "pretty" or (console == "auto" and sys.stderr.isatty())
        renderer: Any = (
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
            if pretty
            else structlog.processors.JSONRenderer()
        )
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(term_level)
        stream.setFormatter(_formatter(renderer))
        root.addHandler(stream)


class LazyFileHandler(logging.FileHandler):
    """A file handler that creates its directory on the first line, not before:
    a command refused for bad input leaves no trace on disk."""

    def _open(self) -> Any:
        private_dir(Path(self.baseFilename).parent)
        stream = super()._open()
        private_files(Path(self.baseFilename))
        return stream


def _formatter(renderer: Any) -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=SHARED_PROCESSORS,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )


def get_logger(name: str = "dew") -> Any:
    return structlog.get_logger(name)


def enabled(name: str, level: int) -> bool:
    """Whether a line of ``level`` from logger ``name`` would be written: the test
    ``filter_by_level`` makes, without building a bound logger and an event first
    (tens of microseconds per line: too much for a line every job writes)."""
    return logging.getLogger(name).isEnabledFor(level)
