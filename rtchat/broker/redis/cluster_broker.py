"""The Broker protocol on a Redis Cluster: rooms spread over shards, each read on a replica.

Owns the lifecycle, the health round over every shard, the rooms of this
node and which shard each is attached to, publishing with its redirects,
readiness and status. Each shard (``shard.Shard``) has its own topology,
sharded subscription, probe and switches; ``shard_map.ShardMap`` keeps the
shards in step with ``CLUSTER SHARDS``.

Publishing goes to the master of the room's slot on a plain connection
(``publish.Publisher``: the script with ``SPUBLISH``, group commit, ``WAIT``
for the shard's replicas) so a script never runs twice: ``MOVED`` refreshes
the map and sends again, ``ASK`` sends to the importing master after
``ASKING`` — both mean the script did not run. Everything else (history,
presence, heartbeats, bans) goes through redis-py's ``RedisCluster``.

A room whose slot moved (the server drops its channel, or the map says so)
is detached from its old shard and attached to the new one; the new
subscription's confirmation replays everything after the room's last
delivered id, so a resharding loses nothing. Readiness fails only when no
shard can take writes: one shard failing over does not take the node out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any, cast

from rtchat.broker.base import (
    Ban,
    BrokerStatus,
    BrokerUnavailable,
    Deliver,
    Failover,
    NodeStats,
    Presence,
    Published,
    Replay,
    ShardStatus,
)
from rtchat.broker.redis.bans import BanList
from rtchat.broker.redis.cluster import ClusterState
from rtchat.broker.redis.delivery import Delivery, RoomState, wait_confirmed
from rtchat.broker.redis.endpoint import SOCKET_TIMEOUT, EndpointHealth
from rtchat.broker.redis.history import History
from rtchat.broker.redis.keys import ClusterKeys
from rtchat.broker.redis.publish import Publisher, Redirected
from rtchat.broker.redis.shard import Shard
from rtchat.broker.redis.shard_map import ClusterReader, ShardMap
from rtchat.broker.redis.tasks import stop_tasks
from rtchat.broker.redis.topology import health_rounds
from rtchat.config import Config, RedisConfig
from rtchat.messages import Message

log = logging.getLogger("rtchat.broker.redis")

FAILOVER_HISTORY = 50
REFRESH_CHECKS = 5  # re-read CLUSTER SHARDS every this many health rounds (and on trouble)
MAX_REDIRECTS = 5


class ClusterBroker:
    """The Broker protocol on a Redis Cluster: per-shard replica subscriptions, failover."""

    kind = "redis"

    def __init__(self, cfg: Config, node_id: str) -> None:
        self.cfg = cfg
        self.rc: RedisConfig = cfg.broker.redis
        assert self.rc.cluster is not None
        self.node_id = node_id
        self.keys = ClusterKeys(self.rc.key_prefix, node_id)
        interval = self.rc.health_interval_seconds
        self._interval = interval
        self._check_timeout = min(SOCKET_TIMEOUT, max(0.5, interval))
        self._subscribe_timeout = max(3.0, 3 * interval)
        self._seeds = list(self.rc.cluster.nodes)
        self._started = False
        self._closed = False
        self._checks = 0
        self._dirty = True  # re-read the shard map at the next round
        self._history = History(self.keys)
        self._publisher = Publisher(self.keys, cfg.history.size, cfg.history.ttl_seconds,
                                    self.rc.replica_ack_timeout_ms, cfg.history.dedup_seconds,
                                    publish_command="SPUBLISH")
        self._bans = BanList(self.keys)
        self._cluster = ClusterState(self.keys, max(3, math.ceil(3 * interval)),
                                     self._check_timeout)
        self._delivery = Delivery()
        self._reader: ClusterReader | None = None
        self._map: ShardMap | None = None
        self._rooms: dict[str, RoomState] = {}
        self._homes: dict[str, Shard] = {}  # room -> the shard it is attached to
        self._failovers: deque[Failover] = deque(maxlen=FAILOVER_HISTORY)
        self._failover_count = 0
        self.redirects: Counter[str] = Counter()  # "ask" / "moved" answers followed by sends
        self._monitor: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._background: set[asyncio.Future[None]] = set()

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, deliver: Deliver, node_stats: NodeStats) -> None:
        """Read the shard map, subscribe, then keep watching; never fails on a down cluster."""
        if self._started:
            return
        self._delivery.deliver = deliver
        self._cluster.node_stats = node_stats
        self._wakeup = asyncio.Event()
        self._reader = ClusterReader(self._seeds, self.node_id)
        self._map = ShardMap(self._seeds, self.node_id, self._new_shard, self._check_timeout)
        self._started = True
        await self._tick()
        self._monitor = asyncio.create_task(self._monitor_loop(), name="redis-cluster-monitor")

    def _new_shard(self) -> Shard:
        assert self._reader is not None
        return Shard(self.keys, self._history, self._delivery,
                     cast(EndpointHealth, self._reader), self._record_failover,
                     self.wake_monitor, self.rc.max_replica_lag_seconds, self._interval,
                     prefer_replica=self.rc.subscribe_from == "replica")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await stop_tasks(self._monitor, self._background)
        self._monitor = None
        for state in self._rooms.values():
            if not state.ready.done():
                state.ready.cancel()
        reader = self._reader
        if reader is not None and self._started:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._cluster.leave(self._writer()), SOCKET_TIMEOUT * 2)
        if self._map is not None:
            for shard in [*self._map.shards, *self._map.retired]:
                await shard.close()
            await self._map.aclose()
        if reader is not None:
            await reader.aclose()

    def wake_monitor(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _writer(self) -> EndpointHealth:
        assert self._reader is not None
        return cast(EndpointHealth, self._reader)

    def _record_failover(self, record: Failover) -> None:
        self._failovers.append(record)
        self._failover_count += 1

    def _shard_for(self, room: str) -> Shard | None:
        return self._map.shard_for(self.keys.stream(room)) if self._map is not None else None

    # -- publishing and history ------------------------------------------------------

    async def publish(self, room: str, nick: str, text: str, key: str | None = None,
                      user: str = "") -> Published:
        """Store and announce one message on the master of the room's slot."""
        if not self._started or self._closed or self._map is None:
            raise BrokerUnavailable("broker not running")
        shard = self._shard_for(room)
        master = shard.topology.master if shard is not None else None
        asking = False
        for _ in range(MAX_REDIRECTS):
            if shard is None or master is None:
                self._dirty = True
                self.wake_monitor()
                raise BrokerUnavailable(self._map.error or "no Redis master serves the room")
            wait = 0
            if self._publisher.wait_ms > 0 and not asking:
                wait = shard.topology.acks_to_wait(all_online=True)
            try:
                return await self._publisher.publish(master, room, nick, text, wait, key, user,
                                                     asking=asking)
            except Redirected as r:  # the script did not run: send it where Redis says
                self.redirects["ask" if r.ask else "moved"] += 1
                target = self._map.endpoint_at(r.host, r.port)
                if r.ask and target is not None:
                    master, asking = target, True
                    continue
                await self._map.refresh()
                self._dirty = True
                shard = self._shard_for(room)
                master = shard.topology.master if shard is not None else None
                asking = False
            except BrokerUnavailable:
                self._dirty = True
                self.wake_monitor()
                raise
        raise BrokerUnavailable("Redis Cluster kept redirecting the send")

    def _read_endpoints(self, room: str) -> list[EndpointHealth]:
        shard = self._shard_for(room)
        if shard is not None:
            return shard.read_endpoints()
        return [self._writer()] if self._reader is not None else []

    async def history(self, room: str, limit: int) -> list[Message]:
        return await self._history.last(self._read_endpoints(room), room, limit)

    async def read_since(self, room: str, last_id: str) -> Replay:
        return await self._history.read_since(self._read_endpoints(room), room, last_id)

    # -- subscriptions ---------------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        """Start delivery for ``room`` on its shard; returns once the SSUBSCRIBE is confirmed."""
        if not self._started or self._closed:
            raise BrokerUnavailable("broker not running")
        state = self._rooms.get(room)
        if state is None:
            state = RoomState(room, asyncio.get_running_loop().create_future())
            self._rooms[room] = state
            shard = self._shard_for(room)
            if shard is None or not shard.can_subscribe():
                del self._rooms[room]
                self.wake_monitor()
                raise BrokerUnavailable("no healthy Redis endpoint to subscribe on")
            self._homes[room] = shard
            await shard.attach(state)
        await wait_confirmed(state, self._subscribe_timeout, self._rooms, self.unsubscribe,
                             self._background)

    async def unsubscribe(self, room: str) -> None:
        state = self._rooms.pop(room, None)
        if state is None:
            return
        if not state.ready.done():
            state.ready.cancel()
        shard = self._homes.pop(room, None)
        if shard is not None:
            await shard.detach(room)

    async def _rehome(self) -> None:
        """Attach every room to the shard that serves its slot now (after a resharding)."""
        if self._map is None:
            return
        for room, state in list(self._rooms.items()):
            home = self._homes.get(room)
            owner = self._shard_for(room)
            if owner is None:
                continue
            dropped = home is not None and room in home.dropped
            if home is owner and not dropped:
                continue
            if home is not None:
                await home.detach(room)
            if self._rooms.get(room) is not state:
                continue  # unsubscribed meanwhile
            self._homes[room] = owner
            if home is not owner:
                log.info("room %s moved from shard %s to %s", room,
                         home.label if home else "-", owner.label)
            await owner.attach(state)

    # -- the health round ------------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        assert self._wakeup is not None
        await health_rounds(self._wakeup, self._interval, lambda: self._closed, self._tick,
                            "Redis Cluster")

    def _map_due(self) -> bool:
        assert self._map is not None
        if self._dirty or self._checks % REFRESH_CHECKS == 1 or not self._map.shards:
            return True
        for shard in self._map.shards:
            master = shard.topology.master
            if master is None or not (master.reachable and master.role == "master") \
                    or shard.dropped or (shard.sub is not None and not shard.sub.alive):
                return True
        return False

    async def _tick(self) -> None:
        """One round: follow the shard map, check every shard, re-home rooms, heartbeat."""
        assert self._map is not None
        self._checks += 1
        if self._map_due():
            self._dirty = False
            await self._map.refresh()
        await self._rehome()
        retired, self._map.retired = self._map.retired, []
        for shard in retired:
            await shard.close()
        await asyncio.gather(*(s.tick(self._check_timeout) for s in self._map.shards))
        await self._heartbeat()

    # -- cluster state: heartbeats, presence, bans ---------------------------------------

    def _reading(self) -> str | None:
        if self._map is None:
            return None
        reads = [s.reading.label for s in self._map.shards if s.reading is not None]
        return ", ".join(reads) if reads else None

    async def _heartbeat(self) -> None:
        if self._reader is None or self._map is None or not self._map.shards:
            return
        # Bounded: a shard that is down must not hold up the next round of the others.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                self._cluster.heartbeat(self._writer(), {"endpoint": self._reading()}),
                self._check_timeout * 2)
            await asyncio.wait_for(self._bans.refresh(self._writer()), self._check_timeout * 2)

    async def ban(self, ban: Ban) -> None:
        await self._bans.add(self._writer() if self._reader else None, ban)

    async def unban(self, user: str) -> bool:
        return await self._bans.remove(self._writer() if self._reader else None, user)

    def banned(self, user: str) -> Ban | None:
        return self._bans.get(user)

    def bans(self) -> list[Ban]:
        return self._bans.all()

    async def set_presence(self, room: str, nicks: Mapping[str, int]) -> None:
        await self._cluster.set_presence(self._writer() if self._reader else None, room, nicks)

    async def presence(self, room: str) -> Presence:
        return await self._cluster.presence([self._writer()], self._writer(), room)

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        nodes, _missing = await self._cluster.nodes([self._writer()], self._writer(),
                                                    {"endpoint": self._reading()})
        return nodes

    # -- reporting ---------------------------------------------------------------------------

    def _shard_problems(self, shard: Shard) -> list[str]:
        reasons = shard.topology.master_problems(None)
        sub = shard.sub
        if shard.rooms and (sub is None or not sub.alive):
            reasons.append("no endpoint delivers")
        elif sub is not None and sub.probe_overdue(shard.topology.max_lag):
            reasons.append("no endpoint delivers (delivery probe overdue)")
        return reasons

    def readiness(self) -> list[str]:
        """Not ready only when no shard can take writes: one failing shard is a partial outage
        (its rooms answer 503) that moving clients to another node would not cure."""
        if not self._started or self._closed or self._map is None:
            return ["broker not started"]
        if not self._map.shards:
            return [f"Redis Cluster: {self._map.error or 'no shards'}"]
        problems = {s.label: self._shard_problems(s) for s in self._map.shards}
        if all(problems.values()):
            return [f"shard {label}: {'; '.join(p)}" for label, p in problems.items()]
        return []

    def status(self) -> BrokerStatus:
        shards = self._map.shards if self._map is not None else []
        rows = []
        for shard in shards:
            master = shard.topology.master
            reading = shard.reading
            rows.append(ShardStatus(
                slots=tuple(shard.ranges), master=master.label if master else None,
                replicas=tuple(r.label for r in shard.topology.replicas),
                healthy=not self._shard_problems(shard) and (reading is None or reading.healthy),
                reading=reading.label if reading is not None else None,
                rooms=len(shard.rooms), endpoints=shard.endpoint_statuses()))
        masters = [r.master for r in rows if r.master]
        return BrokerStatus(
            backend="redis",
            master=", ".join(masters) if masters else None,
            subscribed_endpoint=self._reading(),
            endpoints=tuple(ep for r in rows for ep in r.endpoints),
            failovers=tuple(self._failovers),
            failover_count=self._failover_count,
            shards=tuple(rows),
        )
