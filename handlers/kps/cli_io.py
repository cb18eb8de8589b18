"""The files of ``dew keypairs`` / ``dew servers``: bounded reads of ``--<name>-file``
inputs (``-`` is standard input, read at most once), and private-key outputs that are
created 0600 and never overwrite anything, opened before any work so that a bad path
costs nothing."""

from __future__ import annotations

import contextlib
import os

from engine.cli_output import read_input
from engine.errors import InvalidInput

MAX_INPUT_BYTES = 64 * 1024  # keys, certificates, passwords: far below this
STDIN = "-"


def parameter_error(cause: str) -> InvalidInput:
    """The product's message with why (the CLI prints them on one line)."""
    return InvalidInput("Invalid parameter.", cause=cause)


def one_stdin(inputs: dict[str, str | None]) -> None:
    """Refuse two inputs read from standard input: the first would take all of it."""
    from_stdin = [option for option, name in inputs.items() if name == STDIN]
    if len(from_stdin) > 1:
        raise parameter_error(f"only one input can be read from standard input (-): "
                              f"{' and '.join(from_stdin)} both name it")


def read_bounded(option: str, name: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """``option``'s file (or stdin for ``-``), at most ``limit`` bytes: one byte more is
    read so that ``/dev/zero`` is refused, not read to the end."""
    try:
        data = read_input(option, name, limit + 1)
    except InvalidInput as exc:
        raise parameter_error(exc.message) from None
    if len(data) > limit:
        where = "standard input" if name == STDIN else name
        raise parameter_error(f"{option} {where} is over {limit} bytes")
    return data


def read_secret_line(option: str, name: str) -> str:
    """A password or passphrase: the file's text without its final newline."""
    text = read_bounded(option, name).decode("utf-8", errors="replace")
    return text[:-1] if text.endswith("\n") else text


def wrote(what: str, size: int, path: str) -> str:
    """The one line printed instead of a payload (as ``engine.cli_output.write_out``)."""
    return f"wrote {what} ({size} bytes) to {path}"


def open_new(option: str, path: str) -> int:
    """``path`` created 0600 (O_EXCL: never overwritten); a bad path is bad input."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise parameter_error(f"{option} {path} exists; it is not overwritten") from None
    except OSError as exc:
        raise parameter_error(f"cannot create {option} {path}: {exc.strerror}") from None


class NewFiles:
    """Output files opened (O_EXCL, 0600) before anything is generated or stored, so a
    bad path costs nothing; removed again unless :meth:`keep` is called."""

    def __init__(self, option: str, *paths: str) -> None:
        self.paths = list(paths)
        self.fds: list[int] = []
        try:
            for path in self.paths:
                self.fds.append(open_new(option, path))
        except BaseException:
            self.discard()
            raise

    def write(self, index: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fds[index], view):]

    def keep(self) -> None:
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []

    def discard(self) -> None:
        for fd, path in zip(self.fds, self.paths, strict=False):
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.fds = []
