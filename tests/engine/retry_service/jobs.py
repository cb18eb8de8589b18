"""``retrytest.needs_file {"path": ..., "token"?: ...}``: fails (permanently) while
the file is missing, and returns its text once it exists: a failure whose cause can
be fixed. ``token`` is a declared secret (sealed for each task), to show that a retry
carries it over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.context import JobContext
from engine.errors import InvalidInput, PermanentError
from engine.registry import JOBS


def _check(args: dict[str, Any]) -> None:
    if not isinstance(args.get("path"), str):
        raise InvalidInput("'path' must be a string")


@JOBS.job("retrytest.needs_file", validate=_check, secret_fields=("token",),
          fields={"path": "string: the file that must exist",
                  "token": "string, optional: a secret, to show that a retry carries it"})
async def needs_file(ctx: JobContext, args: dict[str, Any]) -> Any:
    """Return the text of the file at path; fail while it is missing."""
    path = Path(args["path"])
    if not path.exists():
        raise PermanentError(f"the file {path} does not exist", code="missing_file",
                             cause="the test has not written it yet",
                             fix="Write the file, then retry the task.", target=str(path))
    if "token" in args:
        return {"text": path.read_text(), "opened_bytes": len(args["token"])}
    return path.read_text()
