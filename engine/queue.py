"""The Redis transport: arq's queue, seen through the few operations we need.

This is the one place redis/arq exceptions become engine errors. Jobs are
always serialized with ``engine.serialization`` (JSON), never pickle. The job
id in Redis is the task id of the task store.

Jobs are written and claimed in arq's own layout (job key, queue sorted set,
in-progress key), but by Lua scripts that each do a whole batch in one round
trip: arq's ``enqueue_job`` costs three round trips a job (WATCH, EXISTS,
MULTI/EXEC) and its worker four to start one (WATCH, EXISTS, ZSCORE, MULTI/EXEC),
one job after the other. A script runs atomically in Redis, so each job is still
checked and written as one step: a push never overwrites a job (or a result)
Redis has, and a claim never takes a job that is running or not yet due.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import (
    abort_jobs_ss,
    expires_extra_ms,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_unix_ms
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine import serialization
from engine.batching import Batcher
from engine.errors import BackendUnavailable, ConfigError
from engine.job_signing import SIGNATURE_ARG
from engine.lifecycle import RedisView
from engine.settings import Settings, parse_sentinel


def redis_settings(settings: Settings) -> RedisSettings:
    if settings.redis.sentinels:
        # The Sentinels name the master; arq's create_pool (and our open_pool) give
        # its connections this password and database.
        rs = RedisSettings(host=sentinel_addresses(settings), sentinel=True,
                           sentinel_master=settings.redis.sentinel_master, database=0)
    else:
        try:
            rs = RedisSettings.from_dsn(settings.redis_url)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"invalid redis.url {_shown(settings.redis_url)!r}: {exc}") from None
    if not rs.unix_socket_path:
        # Any local user (and more) reaches a TCP port: that Redis must ask for a password.
        rs.password = rs.password or redis_password(settings)
        if not rs.password:
            fix = ("Give it one (requirepass / an ACL user) and set DEW_REDIS_PASSWORD, or "
                   "[redis] password_file (mode 0600), or redis://:PASSWORD@host/ in redis.url.")
            if settings.redis.sentinels:
                fix = ("Give the master and its replicas one password (requirepass and "
                       "masterauth: a replica may become the master) and set "
                       "DEW_REDIS_PASSWORD, or [redis] password_file (mode 0600).")
            raise ConfigError(
                f"the {redis_where(settings)} is reached over TCP without a password",
                fix=fix)
    # Fail fast: a CLI call must not hang for long when Redis is down...
    rs.conn_timeout = 2
    rs.conn_retries = 2
    rs.conn_retry_delay = 0
    # ...but ride out a restart: a dropped connection is re-opened and the command
    # retried a few times (about 3 s in all) before it counts as down. (With
    # Sentinels, re-opening also waits for a failover: _FailoverConnection.)
    rs.retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), 5)
    rs.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    return rs


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    """``[redis] sentinels`` as (host, port) pairs (checked when settings load)."""
    return [parse_sentinel(entry) for entry in settings.redis.sentinels]


def redis_where(settings: Settings) -> str:
    """This process's Redis as messages name it (never with its password)."""
    if settings.redis.sentinels:
        return (f"Redis master {settings.redis.sentinel_master!r} of the Sentinels "
                f"{', '.join(settings.redis.sentinels)}")
    return f"Redis at {_shown(settings.redis_url)}"


# How long a process waits for a master when the Sentinels name none that answers
# (a failover: down-after-milliseconds, then a second or two of promotion).
FAILOVER_WAIT = 10.0  # seconds


class NoRedisMaster(RedisError):
    """No Redis master to connect to: no Sentinel answers, or none named a master that
    answered within ``FAILOVER_WAIT``. Not a ConnectionError, so a command's own
    retries (``redis_settings``) do not wait for the failover once more."""


class _Sentinels(Sentinel):
    """redis-py's Sentinel client, telling "no Sentinel answers" (Redis is down for
    us: fail now) from "no master is up" (a failover: worth waiting for)."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        errors = []
        for sentinel in self.sentinels:
            try:
                masters = await sentinel.sentinel_masters()  # type: ignore[no-untyped-call]
            except (RedisConnectionError, RedisTimeoutError) as exc:
                errors.append(f"{_where(sentinel)}: {exc}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                # Ask this one first next time (as redis-py does).
                at = self.sentinels.index(sentinel)
                self.sentinels[0], self.sentinels[at] = sentinel, self.sentinels[0]
                return state["ip"], int(state["port"])
        if len(errors) == len(self.sentinels):
            raise NoRedisMaster("no Sentinel answers (" + "; ".join(errors) + ")")
        raise MasterNotFoundError(f"the Sentinels name no master {service_name!r} that is up")


def _where(client: Any) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


class _FailoverConnection(SentinelManagedConnection):
    """A connection to the master the Sentinels name, asked again on each (re)connect.
    While they name none that is up, or the one named refuses (it died and they
    have not noticed yet), it waits up to ``FAILOVER_WAIT`` for the new master, so
    a worker rides out a failover instead of ending."""

    async def connect(self) -> None:
        deadline = asyncio.get_running_loop().time() + FAILOVER_WAIT
        delay = 0.05
        while True:
            try:
                await self._connect_retry()  # type: ignore[no-untyped-call]
                return
            except AuthenticationError:
                raise  # a wrong password: no failover mends that
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise NoRedisMaster(
                        f"no Redis master answered within {FAILOVER_WAIT:g} s: {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


async def open_pool(rs: RedisSettings, queue_name: str, expires_extra: int = expires_extra_ms,
                    ) -> ArqRedis:
    """arq's ``create_pool``, with JSON jobs. For a Sentinel master arq passes only the
    password and database to its connections, not ``redis_settings``' timeouts and
    retries, so that pool is made here, the way arq makes it otherwise."""
    if not rs.sentinel:
        return await create_pool(rs, job_serializer=serialization.dumps,
                                 job_deserializer=serialization.loads,
                                 default_queue_name=queue_name, expires_extra_ms=expires_extra)
    assert not isinstance(rs.host, str)
    # The Sentinels are asked without a password (theirs is not the master's).
    timeouts = {"socket_connect_timeout": rs.conn_timeout, "socket_timeout": rs.conn_timeout}
    sentinels = _Sentinels(  # type: ignore[no-untyped-call]
        rs.host, sentinel_kwargs=timeouts, db=rs.database, username=rs.username,
        password=rs.password, socket_connect_timeout=rs.conn_timeout, retry=rs.retry,
        retry_on_error=rs.retry_on_error, max_connections=rs.max_connections,
    )
    pool = cast(ArqRedis, sentinels.master_for(rs.sentinel_master, redis_class=ArqRedis,
                                               connection_class=_FailoverConnection))
    pool.job_serializer = serialization.dumps
    pool.job_deserializer = serialization.loads
    pool.default_queue_name = queue_name
    pool.expires_extra_ms = expires_extra
    try:
        # One try: connecting already waited for a failover (FAILOVER_WAIT).
        await pool.ping()
    except BaseException:
        await close_pool(pool)
        raise
    return pool


async def close_pool(pool: ArqRedis) -> None:
    """Close ``pool``'s connections, and those to the Sentinels if it has any."""
    await pool.aclose()
    manager = getattr(pool.connection_pool, "sentinel_manager", None)
    for client in getattr(manager, "sentinels", ()):
        await client.aclose()


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


def unavailable(exc: BaseException, where: str) -> BackendUnavailable:
    """``where``: ``redis_where(settings)``."""
    return BackendUnavailable(
        f"{where} cannot be reached", cause=f"{type(exc).__name__}: {exc}"
    )


@asynccontextmanager
async def mapped_redis_errors(where: str) -> AsyncIterator[None]:
    """The one place redis-py errors become engine errors."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise unavailable(exc, where) from None


# KEYS: the queue, then each job's job key and result key; ARGV: each job's id,
# score, expiry (ms) and payload. Returns 1 per job written, 0 per job Redis had.
PUSH_SCRIPT = """
local pushed = {}
for i = 0, (#KEYS - 1) / 2 - 1 do
  if redis.call('EXISTS', KEYS[2 + 2 * i], KEYS[3 + 2 * i]) == 0 then
    redis.call('PSETEX', KEYS[2 + 2 * i], ARGV[3 + 4 * i], ARGV[4 + 4 * i])
    redis.call('ZADD', KEYS[1], ARGV[2 + 4 * i], ARGV[1 + 4 * i])
    pushed[i + 1] = 1
  else
    pushed[i + 1] = 0
  end
end
return pushed
"""

# KEYS: the queue, then per job its in-progress, job and retry keys; ARGV: now (ms),
# the in-progress timeout (ms), how many jobs to take at most, then the job ids.
# arq's start check, job by job (not running, still queued, due: then its
# in-progress key), and the start of arq's run_job (read the job, count the try).
# Returns id, score, payload (nil: expired), try, for each job taken.
CLAIM_SCRIPT = """
local claimed = {}
local taken = 0
local limit = tonumber(ARGV[3])
local now = tonumber(ARGV[1])
for j = 0, (#KEYS - 1) / 3 - 1 do
  if taken >= limit then break end
  if redis.call('EXISTS', KEYS[2 + 3 * j]) == 0 then
    local id = ARGV[4 + j]
    local score = redis.call('ZSCORE', KEYS[1], id)
    if score and tonumber(score) <= now then
      redis.call('PSETEX', KEYS[2 + 3 * j], ARGV[2], '1')
      local job = redis.call('GET', KEYS[3 + 3 * j])
      local try = redis.call('INCR', KEYS[4 + 3 * j])
      redis.call('EXPIRE', KEYS[4 + 3 * j], 88400)
      claimed[4 * taken + 1] = id
      claimed[4 * taken + 2] = score
      claimed[4 * taken + 3] = job
      claimed[4 * taken + 4] = try
      taken = taken + 1
    end
  end
end
return claimed
"""

# KEYS: a finished job's in-progress, retry and job keys, arq's abort set and the
# queue; ARGV: the job id. arq's finish_job for a job that ended with no result kept.
FINISH_SCRIPT = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
return 1
"""

# One job as the push script takes it: its id, score, expiry (ms) and payload.
PushItem = tuple[str, int, int, bytes]


def push_item(
    task_id: str, name: str, args: dict[str, Any], due_at: datetime | None,
    signature: str | None, expires_extra_ms: int,
) -> PushItem:
    """A job as arq's ``enqueue_job`` would write it (same payload, score and expiry)."""
    kwargs: dict[str, Any] = {SIGNATURE_ARG: signature} if signature is not None else {}
    enqueued = timestamp_ms()
    score = to_unix_ms(due_at) if due_at is not None else enqueued
    payload = serialize_job(name, (args,), kwargs, None, enqueued,
                            serializer=serialization.dumps)
    return task_id, score, score - enqueued + expires_extra_ms, payload


@dataclass(frozen=True)
class Claimed:
    """A job taken by ``JobClaimer``: its score, its payload (None: it expired) and
    which try this is (arq's retry counter, already counted)."""

    job_id: str
    score: int
    payload: bytes | None
    job_try: int


class JobClaimer:
    """arq's start of the jobs of one poll, in one round trip (the worker's)."""

    def __init__(self, pool: ArqRedis, queue_name: str, in_progress_ms: int) -> None:
        self._script: AsyncScript = pool.register_script(CLAIM_SCRIPT)
        self._queue_name = queue_name
        self._in_progress_ms = in_progress_ms

    async def claim(self, job_ids: Sequence[str], limit: int) -> list[Claimed]:
        """Take up to ``limit`` of ``job_ids`` (in order) that are queued, due and not
        running: their in-progress keys are set, their payloads read and their tries
        counted, as arq's worker does before running a job."""
        if not job_ids or limit <= 0:
            return []
        keys = [self._queue_name]
        for i in job_ids:
            keys += (in_progress_key_prefix + i, job_key_prefix + i, retry_key_prefix + i)
        reply = await self._script(
            keys=keys, args=[timestamp_ms(), self._in_progress_ms, limit, *job_ids])
        return [Claimed(_text(reply[i]), int(float(reply[i + 1])), reply[i + 2],
                        int(reply[i + 3]))
                for i in range(0, len(reply), 4)]


class JobFinisher:
    """arq's end of a finished job that keeps no result (the worker's), as one
    command instead of a MULTI/EXEC of five."""

    def __init__(self, pool: ArqRedis, queue_name: str) -> None:
        self._script: AsyncScript = pool.register_script(FINISH_SCRIPT)
        self._queue_name = queue_name

    async def finish(self, job_id: str) -> None:
        await self._script(
            keys=[in_progress_key_prefix + job_id, retry_key_prefix + job_id,
                  job_key_prefix + job_id, abort_jobs_ss, self._queue_name],
            args=[job_id])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Queue:
    """arq's queue on one Redis, for the client and the sweeper."""

    def __init__(self, pool: ArqRedis, queue_name: str, where: str) -> None:
        self.pool = pool
        self.queue_name = queue_name
        self.where = where  # redis_where(settings), for messages
        self._push_script: AsyncScript = pool.register_script(PUSH_SCRIPT)
        # Pushes that arrive together (a client enqueueing many jobs) share a round trip.
        self._pushes: Batcher[PushItem, bool] = Batcher(self._push_batch)

    @classmethod
    async def connect(cls, settings: Settings) -> Queue:
        rs = redis_settings(settings)
        where = redis_where(settings)
        async with mapped_redis_errors(where):
            pool = await open_pool(rs, settings.redis.queue)
        return cls(pool, settings.redis.queue, where)

    async def close(self) -> None:
        await close_pool(self.pool)

    async def push(
        self, task_id: str, name: str, args: dict[str, Any], due_at: datetime | None = None,
        signature: str | None = None,
    ) -> bool:
        """Put the job, with its signature, on the queue; False if Redis already has it
        (queued, running, or finished with its result kept)."""
        return await self._pushes.submit(
            push_item(task_id, name, args, due_at, signature, self.pool.expires_extra_ms))

    async def _push_batch(self, items: Sequence[PushItem]) -> list[bool]:
        keys = [self.queue_name]
        args: list[str | int | bytes] = []
        for task_id, score, expires_ms, payload in items:
            keys += (job_key_prefix + task_id, result_key_prefix + task_id)
            args += (task_id, score, expires_ms, payload)
        async with mapped_redis_errors(self.where):
            reply = await self._push_script(keys=keys, args=args)
        return [bool(r) for r in reply]

    async def views(self, task_ids: Sequence[str]) -> dict[str, RedisView]:
        """What Redis knows of each job, in one round trip."""
        if not task_ids:
            return {}
        async with mapped_redis_errors(self.where):
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
        async with mapped_redis_errors(self.where):
            await self.pool.delete(in_progress_key_prefix + task_id)

    async def result_error(self, task_id: str) -> str:
        """The error arq stored for a job that failed outside our runner."""
        async with mapped_redis_errors(self.where):
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
