"""One Redis server: its clients and its health record.

Owns ``EndpointHealth`` (what the last ``PING`` + ``INFO replication`` saw,
and the runs of good and bad checks that the topology's verdict reads), the
client settings every connection shares (RESP2, short timeouts, a bounded
pool), and the rule for reading from the first endpoint that answers.

It does not judge: whether a replica lags or replicates the wrong master is
``topology``'s call, which needs every endpoint at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rtchat.broker.base import BrokerUnavailable, EndpointStatus
from rtchat.config import mask_url

SOCKET_TIMEOUT = 1.0  # no request ever waits longer than this on one Redis call
POOL_SIZE = 64  # connections per client; a burst beyond waits (up to SOCKET_TIMEOUT) for one

T = TypeVar("T")


def error_text(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def lost_connection(e: BaseException) -> bool:
    """A connection that broke or was refused (not: loading, or our own pool being busy)."""
    if not isinstance(e, (RedisConnectionError, OSError)) or isinstance(e, BusyLoadingError):
        return False
    text = str(e)
    return "No connection available" not in text and "Too many connections" not in text


class ReadOnlyConnection(Connection):
    """A connection that sends ``READONLY`` first: a cluster replica then serves reads of
    its shard's keys instead of answering ``MOVED``."""

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health)
        await self.send_command("READONLY")
        await self.read_response()


def make_client(url: str, name: str, retry: Retry, socket_timeout: float = SOCKET_TIMEOUT,
                readonly: bool = False) -> aioredis.Redis:
    """A RESP2 client with short timeouts on a bounded pool that queues a burst briefly.

    ``readonly``: every connection sends ``READONLY`` (cluster replicas only)."""
    extra: dict[str, Any] = {"connection_class": ReadOnlyConnection} if readonly else {}
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=SOCKET_TIMEOUT, decode_responses=True,
        protocol=2, socket_timeout=socket_timeout, socket_connect_timeout=SOCKET_TIMEOUT,
        health_check_interval=0, retry=retry, client_name=name, driver_info=None, **extra)
    return aioredis.Redis.from_pool(pool)


def int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@dataclass
class Check:
    """One health check's raw result."""

    ok: bool
    hard: bool = False
    error: str | None = None
    ping_ms: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


class EndpointHealth:
    """One Redis server (the master or a replica): its clients and what the checks saw."""

    def __init__(self, url: str, configured_role: str, node_id: str,
                 cluster: bool = False) -> None:
        self.url = url
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.configured_role = configured_role
        # One retry on a dropped connection (a restarted server, CLIENT KILL), never on a
        # timeout: a slow server must show up as slow.
        # In a Redis Cluster, reads on a replica need READONLY (else MOVED to its master).
        self.client = make_client(url, f"rtchat:{node_id}",
                                  Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                                  readonly=cluster)
        self._writer: aioredis.Redis | None = None
        self._node_id = node_id
        # What the last check saw.
        self.checked = False
        self.reachable: bool | None = None
        self.role: str | None = None
        self.master_link_status: str | None = None
        self.master_host: str | None = None
        self.master_port: int | None = None
        self.offset: int | None = None
        self.replid = ""
        self.replid2 = ""
        self.second_offset = -1
        self.connected_replicas: int | None = None
        self.lag_bytes: int | None = None
        self.lag_seconds: float | None = None
        self.ping_ms: float | None = None
        self.probe_ms: float | None = None  # written by the subscription on this endpoint
        self.last_error: str | None = None
        self.problem: str | None = None  # this check's trouble, if any
        self.hard_down = False  # connection lost: counts at once
        self.bad_checks = 0  # checks in a row with soft trouble (lag, link, probe, timeout)
        self.bad_since = 0.0  # when that run of trouble began
        self.soft_down = False  # trouble held for two checks and a health interval
        self.good_checks = 0  # clean checks in a row
        self.down_since: float | None = None  # unix time it turned unhealthy (None: healthy)

    @property
    def label(self) -> str:
        return mask_url(self.url)

    @property
    def healthy(self) -> bool:
        return self.checked and bool(self.reachable) and not self.hard_down and not self.soft_down

    def track_down(self, wall: float) -> None:
        """Note when it turned unhealthy (once per outage), or that it is healthy again."""
        if self.healthy or not self.checked:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = wall

    def writer(self, wait_ms: int) -> aioredis.Redis:
        """The publishing client: no retries at all, so a script never runs twice."""
        if self._writer is None:
            self._writer = make_client(self.url, f"rtchat-pub:{self._node_id}",
                                       Retry(NoBackoff(), 0),
                                       socket_timeout=SOCKET_TIMEOUT + wait_ms / 1000.0)
        return self._writer

    def note_failure(self, e: BaseException) -> None:
        """A command failed outside the health check (e.g. a publish)."""
        self.last_error = error_text(e)
        if lost_connection(e):
            self.reachable = False
            self.hard_down = True
            self.good_checks = 0

    async def check(self, timeout: float) -> Check:
        """``PING`` and ``INFO replication`` within ``timeout``; records nothing (see ``apply``)."""
        loop = asyncio.get_running_loop()

        async def run() -> Check:
            t0 = loop.time()
            await self.client.ping()
            ping_ms = (loop.time() - t0) * 1000.0
            info = await self.client.info("replication")
            return Check(ok=True, ping_ms=ping_ms, info=info)

        try:
            return await asyncio.wait_for(run(), timeout)
        except BusyLoadingError:
            return Check(ok=False, error="loading the dataset")
        except (RedisTimeoutError, asyncio.TimeoutError):
            return Check(ok=False, error="timeout")
        except (RedisError, OSError) as e:
            return Check(ok=False, hard=lost_connection(e), error=error_text(e))

    def apply(self, res: Check) -> None:
        """Record one check's raw result (role, offsets, link); the verdict comes later."""
        self.checked = True
        if not res.ok:
            # A timeout or an error reply leaves "reachable" as it was: it is trouble that
            # must last two checks. A lost connection is down at once.
            self.last_error = res.error
            self.problem = res.error
            self.hard_down = res.hard
            if res.hard or self.reachable is None:
                self.reachable = False
                self.ping_ms = None
            return
        info = res.info
        self.reachable = True
        self.hard_down = False
        self.problem = None
        self.ping_ms = res.ping_ms
        self.role = "master" if info.get("role") == "master" else "replica"
        self.replid = str(info.get("master_replid", ""))
        self.replid2 = str(info.get("master_replid2", ""))
        self.second_offset = int_or(info.get("second_repl_offset"), -1)
        if self.role == "master":
            self.master_link_status = None
            self.master_host = self.master_port = None
            self.offset = int_or(info.get("master_repl_offset"), 0)
            self.connected_replicas = sum(
                1 for k, v in info.items()
                if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online")
            self.lag_bytes = self.lag_seconds = None
        else:
            self.master_link_status = str(info.get("master_link_status", "down"))
            self.master_host = str(info.get("master_host", ""))
            self.master_port = int_or(info.get("master_port"), 0)
            self.offset = int_or(info.get("slave_repl_offset", info.get("master_repl_offset")), 0)
            self.connected_replicas = None
            if self.master_link_status != "up":
                down = info.get("master_link_down_since_seconds")
                self.lag_seconds = float(down) if isinstance(down, (int, float)) and down >= 0 \
                    else None
            self.lag_bytes = None

    def snapshot(self, subscribed: bool) -> EndpointStatus:
        return EndpointStatus(
            url=self.label, configured_role=self.configured_role,
            reachable=self.reachable, role=self.role,
            master_link_status=self.master_link_status, lag_bytes=self.lag_bytes,
            lag_seconds=None if self.lag_seconds is None else round(self.lag_seconds, 3),
            ping_ms=None if self.ping_ms is None else round(self.ping_ms, 3),
            probe_ms=None if self.probe_ms is None else round(self.probe_ms, 3),
            last_error=self.last_error, healthy=self.healthy, subscribed=subscribed,
            down_since=self.down_since,
            problem=None if self.healthy else (
                "unreachable" if self.reachable is False else self.problem or self.last_error),
        )

    async def aclose(self) -> None:
        for client in (self.client, self._writer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()


async def read_first(eps: Iterable[EndpointHealth],
                     fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """``fn`` on the first endpoint that answers; ``BrokerUnavailable`` when none does."""
    last: BaseException | None = None
    for ep in eps:
        try:
            return await fn(ep.client)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            last = e
            ep.note_failure(e)
    reason = error_text(last) if last is not None else "no Redis endpoint"
    raise BrokerUnavailable(f"cannot read from Redis: {reason}")
