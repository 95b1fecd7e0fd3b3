"""The failover history: this node's switches, and every node's as kept in Redis.

Owns the record of each subscription move. This node keeps its own last
``FAILOVER_HISTORY`` in memory (and counts every one), and pushes each to
``<prefix>failovers`` on the master (``LPUSH`` + ``LTRIM``: a capped list,
newest first) with its node id and time. A switch made while the master is
out of reach waits in a queue and is pushed with a later health round, so
the cluster-wide list misses nothing a node saw. ``read`` fetches that list
(from the first endpoint that answers) so every node's admin page shows the
same history, whichever node the load balancer picked.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from rtchat.broker.base import BrokerUnavailable, Failover
from rtchat.broker.redis.endpoint import EndpointHealth, read_first
from rtchat.broker.redis.keys import Keys

log = logging.getLogger("rtchat.broker.redis")

FAILOVER_HISTORY = 50  # kept per node in memory, and cluster-wide in Redis


class FailoverLog:
    """This node's switches, and the cluster's as last read from Redis."""

    def __init__(self, keys: Keys, timeout: float, size: int = FAILOVER_HISTORY) -> None:
        self._key = keys.failovers
        self._node_id = keys.node_id
        self._timeout = timeout
        self._size = size
        self.local: deque[Failover] = deque(maxlen=size)
        self.count = 0
        self._pending: deque[Failover] = deque(maxlen=size)
        self.cluster: tuple[Failover, ...] = ()  # oldest first
        self._read_once = False

    def record(self, failover: Failover) -> Failover:
        """Keep a switch; it is pushed to Redis with the next ``flush``."""
        if not failover.node:
            failover = Failover(failover.at, failover.from_, failover.to, failover.reason,
                                failover.recovered, self._node_id)
        self.local.append(failover)
        self.count += 1
        self._pending.append(failover)
        return failover

    async def flush(self, master: EndpointHealth | None) -> None:
        """Push the switches not yet in Redis, oldest first. Keeps them on failure."""
        if not self._pending or master is None or not master.reachable:
            return
        batch = list(self._pending)
        try:
            async with master.client.pipeline(transaction=True) as pipe:
                pipe.lpush(self._key, *(json.dumps(f.to_dict()) for f in batch))
                pipe.ltrim(self._key, 0, self._size - 1)
                await asyncio.wait_for(pipe.execute(), self._timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            log.debug("failover history not written now: %s", e)
            return
        for _ in batch:
            self._pending.popleft()

    async def read(self, eps: list[EndpointHealth]) -> None:
        """Refresh ``cluster`` from Redis; on failure it keeps the last list read."""

        async def fetch(client: aioredis.Redis) -> list[str]:
            return await asyncio.wait_for(client.lrange(self._key, 0, self._size - 1),
                                          self._timeout)

        try:
            raw = await read_first(eps, fetch)
        except BrokerUnavailable:
            return
        records = []
        for item in reversed(raw):
            try:
                records.append(Failover.from_dict(json.loads(item)))
            except (ValueError, TypeError, KeyError):
                continue
        self.cluster = tuple(records)
        self._read_once = True

    def shown(self) -> tuple[Failover, ...]:
        """The cluster's history, with this node's switches not yet in Redis at the end."""
        if not self._read_once:
            return tuple(self.local)
        return self.cluster + tuple(f for f in self._pending if f not in self.cluster)
