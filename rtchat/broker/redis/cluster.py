"""The cluster view in Redis: one heartbeat per node, and per-room presence.

Owns this node's presence (nick -> open streams, per room; rewritten with
every heartbeat so it outlives a master restart) and the reads of everyone
else's: ``<prefix>node:<id>`` is a TTL'd heartbeat (the node's stats, what
it reads from, its view of every endpoint, its rooms, when it was last
seen), ``<prefix>presence:<room>`` a hash with one field per node. A node
whose heartbeat expired drops out of presence at once, and its fields are
cleaned up by the next reader. ``<prefix>members`` remembers when each node
last beat, so a node gone without leaving (killed, cut off) is listed as
missing for ``MISSING_KEPT_SECONDS`` rather than silently forgotten; a
graceful leave removes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from rtchat.broker.base import BrokerUnavailable, NodeStats, Presence
from rtchat.broker.redis.endpoint import SOCKET_TIMEOUT, EndpointHealth, read_first
from rtchat.broker.redis.keys import Keys
from rtchat.broker.redis.tasks import shared
from rtchat.broker.verdict import MISSING_KEPT_SECONDS

log = logging.getLogger("rtchat.broker.redis")


class ClusterState:
    """This node's heartbeat and presence, and the cluster's as read back."""

    def __init__(self, keys: Keys, heartbeat_ttl: int, check_timeout: float) -> None:
        self._keys = keys
        self._node_id = keys.node_id
        self._ttl = heartbeat_ttl
        self._check_timeout = check_timeout
        self._presence: dict[str, dict[str, int]] = {}
        self._presence_reads: dict[str, asyncio.Future[Presence]] = {}  # in flight, per room
        self.node_stats: NodeStats | None = None

    @property
    def ttl(self) -> int:
        return self._ttl

    def local_clients(self) -> dict[str, int]:
        """This node's open streams per room, as its presence records them."""
        return {room: sum(nicks.values()) for room, nicks in self._presence.items()}

    def stats(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        """This node's heartbeat: ``node_stats()`` plus ``extra`` (what it reads from, its view,
        its rooms), its id and the time."""
        stats: dict[str, Any] = {}
        if self.node_stats is not None:
            try:
                stats = dict(self.node_stats())
            except Exception:
                log.exception("node_stats() failed")
        stats.update(extra)
        stats.update(id=self._node_id, last_seen=time.time())
        return stats

    async def heartbeat(self, master: EndpointHealth, extra: Mapping[str, Any]) -> None:
        """Write this node's heartbeat (see ``stats``), its membership and its presence."""
        stats = self.stats(extra)
        ttl = self._ttl
        try:
            async with master.client.pipeline(transaction=False) as pipe:
                pipe.set(self._keys.own_node, json.dumps(stats, default=str), ex=ttl)
                pipe.hset(self._keys.members, self._node_id, repr(stats["last_seen"]))
                for room, nicks in self._presence.items():
                    pkey = self._keys.presence(room)
                    pipe.hset(pkey, self._node_id, json.dumps(nicks))
                    pipe.expire(pkey, ttl)
                await asyncio.wait_for(pipe.execute(), self._check_timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            master.note_failure(e)

    async def leave(self, master: EndpointHealth) -> None:
        """A graceful leave: this node's heartbeat and presence go at once. Never raises."""
        with contextlib.suppress(Exception):
            async with master.client.pipeline(transaction=False) as pipe:
                pipe.delete(self._keys.own_node)
                pipe.hdel(self._keys.members, self._node_id)
                for room in self._presence:
                    pipe.hdel(self._keys.presence(room), self._node_id)
                await asyncio.wait_for(pipe.execute(), SOCKET_TIMEOUT)

    async def set_presence(self, master: EndpointHealth | None, room: str,
                           nicks: Mapping[str, int]) -> None:
        """Record this node's clients in ``room``; kept locally and rewritten every heartbeat."""
        counts = {n: int(c) for n, c in nicks.items() if c > 0}
        if counts:
            self._presence[room] = counts
        else:
            self._presence.pop(room, None)
        if master is None:
            return
        pkey = self._keys.presence(room)
        try:
            async with master.client.pipeline(transaction=False) as pipe:
                if counts:
                    pipe.hset(pkey, self._node_id, json.dumps(counts))
                    pipe.expire(pkey, self._ttl)
                else:
                    pipe.hdel(pkey, self._node_id)
                await pipe.execute()
        except (RedisError, OSError) as e:
            log.debug("presence for %s not written now: %s", room, e)

    async def presence(self, eps: list[EndpointHealth], master: EndpointHealth | None,
                       room: str) -> Presence:
        """Presence summed over nodes whose heartbeat is alive (a dead node's clients drop off).
        Asked again while a read of the room is in flight, that read answers (``shared``)."""
        return await shared(self._presence_reads, room,
                            lambda: self._read_presence(eps, master, room))

    async def _read_presence(self, eps: list[EndpointHealth], master: EndpointHealth | None,
                             room: str) -> Presence:
        pkey = self._keys.presence(room)
        node_key = self._keys.node

        async def read(client: aioredis.Redis) -> tuple[dict[str, str], list[str]]:
            fields = await client.hgetall(pkey)
            others = [n for n in fields if n != self._node_id]
            if not others:
                return fields, []
            async with client.pipeline(transaction=False) as pipe:
                for n in others:
                    pipe.exists(node_key(n))
                alive = await pipe.execute()
            return fields, [n for n, a in zip(others, alive, strict=True) if a]

        fields, alive = await read_first(eps, read)
        total: Counter[str] = Counter(self._presence.get(room, {}))
        for node in alive:
            try:
                counts = json.loads(fields[node])
                total.update({str(k): int(v) for k, v in counts.items()})
            except (ValueError, TypeError, AttributeError):
                continue
        dead = [n for n in fields if n != self._node_id and n not in alive]
        if dead and master is not None and master.reachable:
            with contextlib.suppress(RedisError, OSError):
                await master.client.hdel(pkey, *dead)
        return Presence(count=sum(total.values()), nicks=sorted(n for n in total if n))

    async def nodes(self, eps: list[EndpointHealth], master: EndpointHealth | None,
                    extra: Mapping[str, Any]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every node with a live heartbeat, and every member gone without leaving (``missing:
        True``, with its ``last_seen``); this node alone (see ``stats``) when Redis cannot
        answer. Members missing longer than ``MISSING_KEPT_SECONDS`` are forgotten."""
        pattern = self._keys.node_pattern
        members_key = self._keys.members

        async def read(client: aioredis.Redis) -> tuple[list[Any], dict[str, str]]:
            keys = [k async for k in client.scan_iter(match=pattern, count=500)]
            values = await client.mget(keys) if keys else []
            return values, await client.hgetall(members_key)

        try:
            values, members = await read_first(eps, read)
        except BrokerUnavailable:
            return [self.stats(extra)], []
        nodes = []
        for v in values:
            if v is None:
                continue
            try:
                nodes.append(json.loads(v))
            except ValueError:
                continue
        live = {str(n.get("id", "")) for n in nodes}
        now = time.time()
        missing, forgotten = [], []
        for node_id, seen in members.items():
            if node_id in live or node_id == self._node_id:
                continue
            try:
                last_seen = float(seen)
            except ValueError:
                last_seen = 0.0
            if now - last_seen > MISSING_KEPT_SECONDS:
                forgotten.append(node_id)
            else:
                missing.append({"id": node_id, "last_seen": last_seen, "missing": True,
                                "endpoint": None})
        if forgotten and master is not None and master.reachable:
            with contextlib.suppress(RedisError, OSError):
                await master.client.hdel(members_key, *forgotten)
        by_id = lambda n: str(n.get("id", ""))  # noqa: E731
        return sorted(nodes, key=by_id), sorted(missing, key=by_id)
