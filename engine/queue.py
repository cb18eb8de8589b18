"""The Redis transport: arq's queue, seen through the few operations we need.

This is the one place redis/arq exceptions become engine errors. Jobs are
always serialized with ``engine.serialization`` (JSON), never pickle. The job
id in Redis is the task id of the task store.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine import serialization
from engine.errors import BackendUnavailable, ConfigError
from engine.job_signing import SIGNATURE_ARG
from engine.lifecycle import RedisView
from engine.settings import Settings


def redis_settings(settings: Settings) -> RedisSettings:
    try:
        rs = RedisSettings.from_dsn(settings.redis_url)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"invalid redis.url {_shown(settings.redis_url)!r}: {exc}") from None
    if not rs.unix_socket_path:
        # Any local user (and more) reaches a TCP port: that Redis must ask for a password.
        rs.password = rs.password or redis_password(settings)
        if not rs.password:
            raise ConfigError(
                f"the Redis at {_shown(settings.redis_url)} is reached over TCP without a "
                "password",
                fix="Give it one (requirepass / an ACL user) and set DEW_REDIS_PASSWORD, or "
                "[redis] password_file (mode 0600), or redis://:PASSWORD@host/ in redis.url.",
            )
    # Fail fast: a CLI call must not hang for long when Redis is down...
    rs.conn_timeout = 2
    rs.conn_retries = 2
    rs.conn_retry_delay = 0
    # ...but ride out a restart: a dropped connection is re-opened and the
    # command retried a few times (about 3 s in all) before it counts as down.
    rs.retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), 5)
    rs.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    return rs


def redis_password(settings: Settings) -> str:
    """DEW_REDIS_PASSWORD, else the first line of ``[redis] password_file`` (0600)."""
    if os.environ.get("DEW_REDIS_PASSWORD"):
        return os.environ["DEW_REDIS_PASSWORD"]
    if not settings.redis.password_file:
        return ""
    path = Path(settings.redis.password_file)
    try:
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"the Redis password file {path} is readable by others",
                              fix=f"chmod 600 {path}")
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the Redis password file {path}: {exc}") from None


def _shown(url: str) -> str:
    """A Redis URL as it may be shown: without its password."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def unavailable(exc: BaseException, url: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"Redis at {_shown(url)} cannot be reached", cause=f"{type(exc).__name__}: {exc}"
    )


@asynccontextmanager
async def mapped_redis_errors(url: str) -> AsyncIterator[None]:
    """The one place redis-py errors become engine errors."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise unavailable(exc, url) from None


class Queue:
    """arq's queue on one Redis, for the client and the sweeper."""

    def __init__(self, pool: ArqRedis, queue_name: str, url: str) -> None:
        self.pool = pool
        self.queue_name = queue_name
        self.url = url

    @classmethod
    async def connect(cls, settings: Settings) -> Queue:
        async with mapped_redis_errors(settings.redis_url):
            pool = await create_pool(
                redis_settings(settings),
                job_serializer=serialization.dumps,
                job_deserializer=serialization.loads,
                default_queue_name=settings.redis.queue,
            )
        return cls(pool, settings.redis.queue, settings.redis_url)

    async def close(self) -> None:
        await self.pool.aclose()

    async def push(
        self, task_id: str, name: str, args: dict[str, Any], due_at: datetime | None = None,
        signature: str | None = None,
    ) -> bool:
        """Put the job, with its signature, on the queue; False if Redis already has it."""
        signed: dict[str, Any] = {SIGNATURE_ARG: signature} if signature is not None else {}
        async with mapped_redis_errors(self.url):
            job = await self.pool.enqueue_job(
                name, args, _job_id=task_id, _queue_name=self.queue_name, _defer_until=due_at,
                **signed,
            )
        return job is not None

    async def views(self, task_ids: Sequence[str]) -> dict[str, RedisView]:
        """What Redis knows of each job, in one round trip."""
        if not task_ids:
            return {}
        async with mapped_redis_errors(self.url):
            pipe = self.pool.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.zscore(self.queue_name, task_id)
                pipe.exists(in_progress_key_prefix + task_id)
                pipe.exists(result_key_prefix + task_id)
                pipe.exists(job_key_prefix + task_id)
            replies = await pipe.execute()
        views = {}
        for i, task_id in enumerate(task_ids):
            score, in_progress, has_result, has_job = replies[4 * i : 4 * i + 4]
            views[task_id] = RedisView(
                queued=score is not None and bool(has_job),
                in_progress=bool(in_progress),
                has_result=bool(has_result),
            )
        return views

    async def release(self, task_id: str) -> None:
        """Drop the in-progress lock of a job whose worker died, so another takes it."""
        async with mapped_redis_errors(self.url):
            await self.pool.delete(in_progress_key_prefix + task_id)

    async def result_error(self, task_id: str) -> str:
        """The error arq stored for a job that failed outside our runner."""
        async with mapped_redis_errors(self.url):
            raw = await self.pool.get(result_key_prefix + task_id)
        if raw is None:
            return "unknown"
        try:
            data = serialization.loads(raw)
        except serialization.NotJson as exc:
            return str(exc)
        result = data.get("r") if isinstance(data, dict) else None
        if isinstance(result, dict):
            return f"{result.get('error', 'error')}: {result.get('message', '')}"
        return str(result)
