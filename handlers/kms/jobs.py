"""KMS jobs (``kms.*``) and what the cron entries run; registered on import."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from engine.context import JobContext
from engine.errors import InvalidInput
from engine.models import utcnow
from engine.registry import JOBS
from engine.resources import Resources
from handlers.kms.errors import DefaultKeyProtected
from handlers.kms.format import (
    DEFAULT_ACCOUNT,
    check_account,
    check_key_ref,
    check_pending_days,
    default_service,
)
from handlers.kms.results import DeletionReport
from handlers.kms.service import KmsService
from handlers.kms.store import KmsStore
from handlers.kms.wiring import (
    open_kms as open_kms,  # registers the crypto, kms_store, kms, sealer resources
)

ACCOUNT_FIELD = {"account": "string, optional: the project (name) owning the key"}


def _only(args: dict[str, Any], allowed: Iterable[str], job: str) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise InvalidInput(f"{job} does not take {', '.join(map(repr, unknown))}")


def _check_key_job(args: dict[str, Any], job: str, extra: tuple[str, ...] = ()) -> None:
    _only(args, ("key", "account", *extra), job)
    key = check_key_ref(args.get("key"))
    check_account(args.get("account", DEFAULT_ACCOUNT))
    if default_service(key) is not None:
        raise DefaultKeyProtected(
            f"{key!r} is a default key: it cannot be disabled or scheduled for deletion"
        )


def check_schedule_args(args: dict[str, Any]) -> None:
    _check_key_job(args, "kms.schedule_key_deletion", ("pending_days",))
    check_pending_days(args.get("pending_days"))


def check_cancel_args(args: dict[str, Any]) -> None:
    _check_key_job(args, "kms.cancel_key_deletion")


def check_rotate_args(args: dict[str, Any]) -> None:
    _only(args, ("key", "account"), "kms.rotate_key")
    check_key_ref(args.get("key"))
    check_account(args.get("account", DEFAULT_ACCOUNT))


def check_delete_due_args(args: dict[str, Any]) -> None:
    _only(args, (), "kms.delete_due_keys")


def _job_actor(ctx: JobContext) -> str:
    return f"job:{ctx.name}:{ctx.task_id}"


@JOBS.job("kms.schedule_key_deletion", validate=check_schedule_args,
          fields={"key": "string: key id or alias", "pending_days": "integer 7..1096",
                  **ACCOUNT_FIELD})
async def schedule_key_deletion_job(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    """Schedule a key's deletion in 7..1096 days (state pending_deletion)."""
    kms: KmsService = await ctx.resources.get("kms")
    change = await kms.schedule_key_deletion(
        args["key"], args["pending_days"], account=args.get("account", DEFAULT_ACCOUNT),
        actor=_job_actor(ctx), now=ctx.now(),
    )
    return change.to_json()


@JOBS.job("kms.cancel_key_deletion", validate=check_cancel_args,
          fields={"key": "string: key id or alias", **ACCOUNT_FIELD})
async def cancel_key_deletion_job(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    """Cancel a scheduled key deletion (the key comes back disabled)."""
    kms: KmsService = await ctx.resources.get("kms")
    change = await kms.cancel_key_deletion(
        args["key"], account=args.get("account", DEFAULT_ACCOUNT), actor=_job_actor(ctx),
        now=ctx.now(),
    )
    return change.to_json()


@JOBS.job("kms.delete_due_keys", validate=check_delete_due_args)
async def delete_due_keys_job(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    """Destroy the keys whose pending deletion period is over."""
    return await delete_due_keys(ctx.resources, ctx.now(), actor=_job_actor(ctx))


async def delete_due_keys(
    resources: Resources, now: datetime | None = None, *, actor: str | None = None
) -> dict[str, Any]:
    """What the job and the cron entry run: cheap when nothing is due (no HSM)."""
    store: KmsStore = await resources.get("kms_store")
    if not await store.has_deletion_work(now or utcnow()):
        return DeletionReport([], 0).to_json()
    kms: KmsService = await resources.get("kms")
    report = await kms.delete_due_keys(now, actor=actor)
    return report.to_json()


@JOBS.job("kms.rotate_key", validate=check_rotate_args,
          fields={"key": "string: key id or alias", **ACCOUNT_FIELD})
async def rotate_key_job(ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
    """Rotate a KMS-generated AES_256 key now (a new version; old data still decrypts)."""
    kms: KmsService = await ctx.resources.get("kms")
    change = await kms.rotate_key(
        args["key"], account=args.get("account", DEFAULT_ACCOUNT), actor=_job_actor(ctx),
        now=ctx.now(), request=ctx.task_id,
    )
    return change.to_json()


async def rotate_due_keys(
    resources: Resources, now: datetime | None = None, *, actor: str | None = None
) -> dict[str, Any]:
    """What the cron entry runs: cheap when nothing is due (no HSM)."""
    store: KmsStore = await resources.get("kms_store")
    if not await store.due_rotations(now or utcnow()):
        return {"rotated": [], "failed": {}}
    kms: KmsService = await resources.get("kms")
    return await kms.rotate_due_keys(now or utcnow(), actor=actor)
