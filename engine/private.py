"""Private state: the state directory and everything in it belong to the engine's user alone.

Every dew process sets ``umask 077`` (so new files are 0600 and directories
0700, the Redis child's included); these helpers also tighten what an older
version or another tool left looser, and refuse a state directory that belongs
to another user (its owner could read or swap our files).
"""

from __future__ import annotations

import os
import stat

from engine.errors import ConfigError

TYPE_CHECKING = False  # typing/pathlib stay out of `dew --help`'s start
if TYPE_CHECKING:
    from pathlib import Path

PRIVATE_UMASK = 0o077


def private_umask() -> None:
    """New files 0600, directories 0700, in this process and its children."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) 0700, or tighten it if it is ours and looser."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot create the directory {path}: {exc.strerror}") from None
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"{path} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})",
            cause="another user could read or replace the engine's private files there",
            fix="Use a state directory of your own (DEW_STATE_DIR), or run as its owner.",
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def private_files(*paths: Path) -> None:
    """Make the files that exist among ``paths`` 0600 (the SQLite WAL and SHM appear
    beside the database, created with whatever umask the first opener had)."""
    for path in paths:
        try:
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                path.chmod(0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot make {path} private: {exc.strerror}") from None
