"""Per-project rate limits, counted in the engine's Redis across every API process.

Two buckets (``engine.api.operations.MANAGE`` and ``CRYPTO``) with the rates of
``[api] rate_manage`` / ``rate_crypto``, a moving window each (the ``limits``
library, redis-py, Lua scripts). A project over a rate gets 429
(:class:`~engine.errors.Throttled`).

A process takes its calls from the shared window in small batches: a rate of N
per window takes ``N // BATCH_DIVISOR`` (1 to ``BATCH_MAX``) at a time and spends them
locally until they run out or the window they were counted in has passed. Every
call is still counted in Redis before it is served, so all processes together
never pass N in a window; a batch not spent in time is given up (a project may
be throttled slightly early, by at most one batch per process). A round trip
to Redis per call was a third of a call's time in the server.

When Redis cannot be reached the limiter **fails open**: requests are served
unlimited and one warning is logged per outage (the limiter then skips Redis
for ``RETRY_AFTER`` seconds instead of waiting on it for every request). A
Redis outage already stops every job; it must not also turn the synchronous
calls (encrypt, sign) into 500s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisSentinelStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from redis.exceptions import RedisError

from engine.api.operations import CRYPTO, MANAGE
from engine.errors import Throttled
from engine.logs import get_logger
from engine.queue import redis_settings
from engine.settings import Settings

RETRY_AFTER = 5.0  # seconds the limiter leaves Redis alone after a failure
BATCH_DIVISOR = 50  # a rate of N takes N // 50 calls from Redis at a time...
BATCH_MAX = 50  # ...but no more (a moving window stores one entry per call)
TIMEOUT = 0.5  # seconds: a slow Redis must not hold requests for long

log = get_logger("dew.api")


def storage_uri(url: str) -> str:
    """Our ``redis.url`` in the ``limits`` library's notation."""
    if url.startswith("unix://"):
        return "async+redis+unix://" + url.removeprefix("unix://")
    return "async+" + url


def sentinel_uri(sentinels: Sequence[str], master: str) -> str:
    """Our ``[redis] sentinels`` and ``sentinel_master`` in ``limits``' notation."""
    return f"async+redis+sentinel://{','.join(sentinels)}/{master}"


def _storage(settings: Settings) -> RedisStorage:
    options: dict[str, Any] = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT}
    rs = redis_settings(settings)  # ConfigError: a TCP Redis without a password
    if rs.password:
        options["password"] = rs.password
    prefix = f"dew:api-limits:{settings.redis.queue}"
    if settings.redis.sentinels:
        # The Sentinels are asked without the master's password (limits would pass it on).
        to_sentinels: dict[str, Any] = {"password": None, "socket_timeout": TIMEOUT,
                                        "socket_connect_timeout": TIMEOUT}
        return RedisSentinelStorage(
            sentinel_uri(settings.redis.sentinels, settings.redis.sentinel_master),
            implementation="redispy", wrap_exceptions=True, key_prefix=prefix,
            use_replicas=False,  # the master counts: a replica may lag behind it
            sentinel_kwargs=to_sentinels, **options,
        )
    return RedisStorage(storage_uri(settings.redis_url), implementation="redispy",
                        wrap_exceptions=True, key_prefix=prefix, **options)


class OverLimit(Throttled):
    """429, with the seconds until the window lets the next call through."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, code="throttled")
        self.retry_after = retry_after


class RateLimits:
    """``check(project_id, bucket)``: Throttled when the project is over that bucket's rate."""

    def __init__(self, settings: Settings, limiter: MovingWindowRateLimiter | None = None,
                 clock: Any = time.monotonic) -> None:
        self.rates: dict[str, Sequence[RateLimitItem]] = {
            MANAGE: parse_many(settings.api.rate_manage),
            CRYPTO: parse_many(settings.api.rate_crypto),
        }
        self.text = {MANAGE: settings.api.rate_manage, CRYPTO: settings.api.rate_crypto}
        self._clock = clock
        self._skip_until = 0.0
        self._down = False
        self._storage: RedisStorage | None = None
        # (bucket, project, rate) -> [calls taken from Redis and not spent yet, until when]
        self._taken: dict[tuple[str, str, str], list[float]] = {}
        if limiter is None:
            self._storage = _storage(settings)
            limiter = MovingWindowRateLimiter(self._storage)
        self.limiter = limiter

    async def check(self, project_id: str, bucket: str) -> None:
        if self._clock() < self._skip_until:
            return
        try:
            over = await self._over(project_id, bucket)
        except (StorageError, RedisError, OSError) as exc:
            # Fail open (see the module's docstring), and say so once per outage.
            self._skip_until = self._clock() + RETRY_AFTER
            if not self._down:
                self._down = True
                log.warning("rate limits not applied while Redis cannot be reached",
                            bucket=bucket, error=f"{type(exc).__name__}: {exc}"[:300])
            return
        if self._down:
            self._down = False
            log.info("rate limits applied again: Redis is back")
        if over is not None:
            raise over

    async def _over(self, project_id: str, bucket: str) -> OverLimit | None:
        for item in self.rates[bucket]:
            if not await self._take(item, bucket, project_id):
                stats = await self.limiter.get_window_stats(item, bucket, project_id)
                return OverLimit(
                    f"project {project_id} is over its {bucket} rate limit "
                    f"({self.text[bucket]})", max(1, math.ceil(stats.reset_time - time.time())),
                )
        return None

    async def _take(self, item: RateLimitItem, bucket: str, project_id: str) -> bool:
        """One call of ``item``'s rate: from this process's batch, else from Redis."""
        key = (bucket, project_id, str(item))
        now = self._clock()
        held = self._taken.get(key)
        if held is not None and held[0] >= 1 and now < held[1]:
            held[0] -= 1
            return True
        if len(self._taken) > 10_000:
            self._taken.clear()  # batches of idle projects: given up
        batch = max(1, min(BATCH_MAX, item.amount // BATCH_DIVISOR))
        # Spent within the window it is counted in (less a margin for the round trip).
        until = now + item.get_expiry() * 0.9
        if batch > 1 and await self.limiter.hit(item, bucket, project_id, cost=batch):
            self._taken[key] = [batch - 1, until]
            return True
        self._taken.pop(key, None)
        return bool(await self.limiter.hit(item, bucket, project_id))

    async def close(self) -> None:
        bridge = getattr(self._storage, "bridge", None)
        # The master's client; with Sentinels also the replicas' and the Sentinels'.
        clients = [getattr(bridge, "storage", None), getattr(bridge, "storage_replica", None),
                   *getattr(getattr(bridge, "sentinel", None), "sentinels", ())]
        for client in clients:
            if client is not None:
                await client.aclose()
