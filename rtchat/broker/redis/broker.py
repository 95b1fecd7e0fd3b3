"""The Redis broker: the Broker protocol on a master, its replicas and one subscription.

Owns the lifecycle (start, the monitor's health round, close), the rooms
this node subscribes to, the subscription and its moves between endpoints
(a switch resubscribes every room and replays what it missed), readiness,
the cluster verdict and status. The rest is delegated to the modules beside
it (see the package docstring), each owning its own state.

The health round, every ``health_interval_seconds``: ``PING`` and ``INFO
replication`` on each endpoint, a probe published on the master that must
come back on this node's subscription within ``max_replica_lag_seconds``,
the verdict on each endpoint (a lost connection counts at once; lag, link
and probe trouble must last two checks), a switch if the subscription's
endpoint failed, the heartbeat, and the cluster read back and judged
(``clusterview``). It knows the Broker protocol and the config, never
tornado or the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

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
)
from rtchat.broker.redis.bans import BanList
from rtchat.broker.redis.clusterview import ClusterView
from rtchat.broker.redis.delivery import Delivery, RoomState, wait_confirmed
from rtchat.broker.redis.endpoint import SOCKET_TIMEOUT, EndpointHealth, error_text
from rtchat.broker.redis.history import History, read_order
from rtchat.broker.redis.keys import Keys
from rtchat.broker.redis.publish import MasterReadOnly, Publisher
from rtchat.broker.redis.sentinel import SentinelWatch
from rtchat.broker.redis.subscription import Subscription
from rtchat.broker.redis.tasks import stop_tasks
from rtchat.broker.redis.topology import Topology, health_rounds
from rtchat.config import Config, RedisConfig, mask_url
from rtchat.messages import Message

log = logging.getLogger("rtchat.broker.redis")

CATCH_UP_PER_ROOM = 0.005  # seconds a switch allows per room for its catch-up read


class RedisBroker:
    """The Broker protocol on Redis: master publisher, replica subscriber, failover."""

    kind = "redis"

    def __init__(self, cfg: Config, node_id: str) -> None:
        self.cfg = cfg
        self.rc: RedisConfig = cfg.broker.redis
        self.node_id = node_id
        self.keys = Keys(self.rc.key_prefix, node_id)
        interval = self.rc.health_interval_seconds
        self._interval = interval
        self._check_timeout = min(SOCKET_TIMEOUT, max(0.5, interval))
        self._subscribe_timeout = max(3.0, 3 * interval)
        self._started = False
        self._closed = False
        self._topology = Topology(self.rc.max_replica_lag_seconds, interval, self.wake_monitor)
        self._sentinel: SentinelWatch | None = None
        self._checks = 0
        self._history = History(self.keys)
        self._publisher = Publisher(self.keys, cfg.history.size, cfg.history.ttl_seconds,
                                    self.rc.replica_ack_timeout_ms, cfg.history.dedup_seconds)
        self._bans = BanList(self.keys)
        self._cluster = ClusterView(self.keys, max(3, math.ceil(3 * interval)),
                                    self._check_timeout, self.rc.max_replica_lag_seconds)
        self._delivery = Delivery()
        self._sub: Subscription | None = None
        self._lost_from: str | None = None  # the endpoint a dead subscription was on
        self._lost_reason = ""
        self._sub_lock = asyncio.Lock()
        self._rooms: dict[str, RoomState] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._background: set[asyncio.Future[None]] = set()

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, deliver: Deliver, node_stats: NodeStats) -> None:
        """Check every endpoint once, subscribe, then keep watching in the background.

        Does not fail when Redis is down: ``readiness()`` says so, and the
        monitor connects as soon as it can.
        """
        if self._started:
            return
        self._delivery.deliver = deliver
        self._cluster.state.node_stats = node_stats
        self._wakeup = asyncio.Event()
        rc = self.rc
        if rc.sentinel is not None:
            self._sentinel = SentinelWatch(rc.sentinel, rc.master, self.node_id,
                                           self._check_timeout)
        else:
            self._topology.master = EndpointHealth(rc.master, "master", self.node_id)
            self._topology.replicas = [EndpointHealth(u, "replica", self.node_id)
                                       for u in rc.replicas]
        self._started = True
        await self._tick()
        self._monitor = asyncio.create_task(self._monitor_loop(), name="redis-broker-monitor")

    async def close(self) -> None:
        """Stop the monitor and the subscription, leave the cluster view, close clients."""
        if self._closed:
            return
        self._closed = True
        await stop_tasks(self._monitor, self._background)
        self._monitor = None
        endpoints = self._endpoints()
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.close()
        for state in self._rooms.values():
            if not state.ready.done():
                state.ready.cancel()
        master = self._topology.master
        if master is not None and self._started and master.reachable:
            await self._cluster.state.leave(master)
        for ep in endpoints:
            await ep.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    def wake_monitor(self) -> None:
        """Run the next health check now: a connection was lost, the master refused a write."""
        if self._wakeup is not None:
            self._wakeup.set()

    def _endpoints(self) -> list[EndpointHealth]:
        sub = self._sub
        return self._topology.endpoints(sub.endpoint if sub is not None else None)

    def _read_endpoints(self) -> list[EndpointHealth]:
        sub = self._sub
        return read_order(self._topology.master, sub.endpoint if sub is not None else None)

    # -- publishing and history ------------------------------------------------------

    async def publish(self, room: str, nick: str, text: str, key: str | None = None,
                      user: str = "") -> Published:
        """Store and announce one message on the master. ``replicated`` is None without
        replicas (or with ``replica_ack_timeout_ms: 0``); see ``Topology.acks_to_wait``."""
        if not self._started or self._closed:
            raise BrokerUnavailable("broker not running")
        master = self._topology.master
        if master is None:
            sentinel_error = self._sentinel.error if self._sentinel is not None else None
            raise BrokerUnavailable(sentinel_error or "no Redis master known")
        wait = 0
        if self._publisher.wait_ms > 0:
            wait = self._topology.acks_to_wait(all_online=self._sentinel is not None)
        try:
            published = await self._publisher.publish(master, room, nick, text, wait, key, user)
        except BrokerUnavailable as e:
            if isinstance(e, MasterReadOnly):
                self._topology.dirty = True  # the master was demoted: ask Sentinel now
            self.wake_monitor()
            raise
        if not published.duplicate:
            self._cluster.activity.note(room)
        return published

    async def history(self, room: str, limit: int) -> list[Message]:
        return await self._history.last(self._read_endpoints(), room, limit)

    async def read_since(self, room: str, last_id: str) -> Replay:
        """See ``History.read_since``: ``ValueError`` for a malformed id."""
        return await self._history.read_since(self._read_endpoints(), room, last_id)

    # -- subscriptions ---------------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        """Start delivery for ``room``; returns once Redis confirmed the SUBSCRIBE.

        Messages stored before this returns may be delivered too (the caller
        drops ids it already has). Raises BrokerUnavailable when no endpoint
        confirms in time; the room is then not subscribed.
        """
        if not self._started or self._closed:
            raise BrokerUnavailable("broker not running")
        state = self._rooms.get(room)
        if state is None:
            state = RoomState(room, asyncio.get_running_loop().create_future())
            self._rooms[room] = state
            async with self._sub_lock:
                sub = self._sub
                if sub is not None and sub.alive:
                    if state.sent_on is not sub and self._rooms.get(room) is state:
                        # (A switch that ran meanwhile may have subscribed it already.)
                        state.sent_on = sub
                        with contextlib.suppress(RedisError, OSError):
                            await sub.subscribe(self.keys.channel(room), state)
                elif self._choose(exclude=None) is None:
                    # Nothing to subscribe on: say so now rather than after a timeout.
                    if self._rooms.get(room) is state:
                        del self._rooms[room]
                    raise BrokerUnavailable("no healthy Redis endpoint to subscribe on")
                else:
                    self.wake_monitor()
        await wait_confirmed(state, self._subscribe_timeout, self._rooms, self.unsubscribe,
                             self._background)

    async def unsubscribe(self, room: str) -> None:
        """Stop delivery for ``room`` (its messages still in flight are dropped)."""
        state = self._rooms.pop(room, None)
        if state is None:
            return
        if not state.ready.done():
            state.ready.cancel()
        async with self._sub_lock:
            sub = self._sub
            if sub is not None and sub.alive:
                with contextlib.suppress(RedisError, OSError):
                    await sub.unsubscribe(self.keys.channel(room))

    # The subscription's Listener: called from its reader task, in order.

    async def on_message(self, sub: Subscription, channel: str, data: str) -> None:
        state = self._rooms.get(self.keys.room_of(channel))
        if state is None or state.last is None:
            return  # unsubscribed, or not yet confirmed: not ours to deliver

        async def gap(after: str, until: str) -> list[Message]:
            # The endpoint that passed on the PUBLISH has the XADD: read it first.
            eps = [sub.endpoint, *(e for e in self._read_endpoints() if e is not sub.endpoint)]
            return await self._history.range(eps, state.room, after, until)

        await self._delivery.live(state, data, gap, channel)

    async def on_confirmed(self, sub: Subscription, token: object) -> int:
        if not isinstance(token, RoomState) or self._rooms.get(token.room) is not token:
            return 0  # unsubscribed meanwhile
        eps = self._read_endpoints()
        if sub.endpoint not in eps:
            eps.append(sub.endpoint)
        history, room = self._history, token.room
        return await self._delivery.confirmed(
            token, lambda: history.newest_id(eps, room),
            lambda after, until: history.range(eps, room, after, until))

    def on_dead(self, sub: Subscription) -> None:
        self.wake_monitor()

    # -- the health round, and switching ------------------------------------------------

    async def _monitor_loop(self) -> None:
        assert self._wakeup is not None
        await health_rounds(self._wakeup, self._interval, lambda: self._closed, self._tick,
                            "Redis")

    async def _tick(self) -> None:
        """One round: check endpoints, follow the topology, probe, switch, heartbeat."""
        self._checks += 1
        topology = self._topology
        sentinel = self._sentinel
        if sentinel is not None and sentinel.due(topology, self._checks):
            sub = self._sub
            await sentinel.refresh(topology, sub.endpoint if sub is not None else None)
        now = await topology.check(self._endpoints(), self._check_timeout)
        sub = self._sub
        overdue = sub is not None and sub.alive and sub.probe_overdue(topology.max_lag)
        topology.judge(now, self._endpoints(), sub.endpoint if overdue and sub else None)
        if sentinel is not None:
            topology.follow_promotion()
        sub = self._sub
        if sub is not None and topology.master is not None:
            await sub.send_probe(topology.master, self._check_timeout)
        await self._maybe_switch()
        await self._heartbeat()

    def _choose(self, exclude: EndpointHealth | None) -> EndpointHealth | None:
        return self._topology.choose(exclude, prefer_replica=self.rc.subscribe_from == "replica")

    async def _maybe_switch(self) -> None:
        sub = self._sub
        if sub is not None and sub.alive:
            move = self._topology.move_from(sub.endpoint, self.rc.subscribe_from == "replica")
            if move is not None:
                await self._switch(*move)
            return
        if sub is not None:
            self._lost_from, self._lost_reason = sub.endpoint.url, sub.dead or "lost"
            await self._drop_subscription(sub)
            target = self._choose(exclude=sub.endpoint)
        else:
            target = self._choose(exclude=None)
        if target is not None:
            await self._switch(target, self._lost_reason or "no subscription")
        elif sub is not None:
            log.warning("subscription on %s lost (%s); no healthy endpoint to move to",
                        sub.endpoint.label, self._lost_reason)

    async def _drop_subscription(self, sub: Subscription) -> None:
        async with self._sub_lock:
            if self._sub is sub:
                self._sub = None
        sub.endpoint.probe_ms = None
        await sub.close()
        await self._retire_if_orphan(sub.endpoint)

    async def _retire_if_orphan(self, ep: EndpointHealth) -> None:
        """Close an endpoint the topology dropped once the subscription has left it."""
        if ep not in self._endpoints():
            await ep.aclose()

    async def _switch(self, target: EndpointHealth, reason: str) -> bool:
        """Move the subscription to ``target``: resubscribe every room and replay what was missed."""
        async with self._sub_lock:
            old = self._sub
            from_url = old.endpoint.url if old is not None else self._lost_from
            if old is not None:
                self._sub = None
                old.endpoint.probe_ms = None
                await old.close()
                await self._retire_if_orphan(old.endpoint)
            started = time.time()
            sub = Subscription(target, self.keys.probe_channel, f"rtchat-sub:{self.node_id}",
                               self)
            rooms = list(self._rooms.values())
            for state in rooms:
                state.sent_on = sub
            try:
                await asyncio.wait_for(
                    sub.open([(self.keys.channel(s.room), s) for s in rooms]), SOCKET_TIMEOUT * 2)
                # Each room's catch-up is one XRANGE, read in turn as its SUBSCRIBE is
                # confirmed: the budget grows with the rooms, so a busy node can switch.
                budget = max(5.0, self._interval * 3) + CATCH_UP_PER_ROOM * len(self._rooms)
                await asyncio.wait_for(sub.wait_opened(), budget)
            except (RedisError, OSError, BrokerUnavailable, asyncio.TimeoutError) as e:
                await sub.close()
                target.note_failure(e)
                target.soft_down = True  # until a clean check
                self._lost_from = from_url
                self._lost_reason = reason
                log.warning("cannot subscribe on %s: %s", target.label, error_text(e))
                return False
            except BaseException:  # cancelled (close() stops the monitor mid-switch)
                await asyncio.shield(sub.close())
                raise
            self._sub = sub
            self._lost_from, self._lost_reason = None, ""
        if from_url is None:
            log.info("subscribed on %s (%d rooms)", target.label, len(self._rooms))
        else:
            record = self._cluster.record(Failover(
                at=started, from_=mask_url(from_url), to=target.label, reason=reason,
                recovered=sub.replayed, node=self.node_id))
            log.warning("subscription moved from %s to %s (%s); %d messages recovered from history",
                        record.from_, record.to, reason, record.recovered)
        return True

    # -- cluster state: heartbeats and presence -------------------------------------------------

    def _share(self) -> dict[str, Any]:
        sub = self._sub
        return self._cluster.share(sub.endpoint.label if sub is not None and sub.alive else None,
                                   self.status().endpoints, self.readiness())

    async def _heartbeat(self) -> None:
        master = self._topology.master
        if master is not None and master.reachable:
            await self._cluster.beat(master, self._share())
        await self._cluster.observe(self._read_endpoints(), master, self._share())
        if master is not None and master.reachable:
            await self._bans.refresh(master)

    async def ban(self, ban: Ban) -> None:
        await self._bans.add(self._topology.master, ban)

    async def unban(self, user: str) -> bool:
        return await self._bans.remove(self._topology.master, user)

    def banned(self, user: str) -> Ban | None:
        return self._bans.get(user)

    def bans(self) -> list[Ban]:
        return self._bans.all()

    async def set_presence(self, room: str, nicks: Mapping[str, int]) -> None:
        """Record this node's clients in ``room``; kept locally and rewritten every heartbeat."""
        await self._cluster.state.set_presence(self._topology.master, room, nicks)

    async def presence(self, room: str) -> Presence:
        """Presence summed over nodes whose heartbeat is alive (a dead node's clients drop off)."""
        return await self._cluster.state.presence(self._read_endpoints(), self._topology.master,
                                                  room)

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        """Every node with a live heartbeat; this node alone when Redis cannot answer."""
        return await self._cluster.nodes(self._read_endpoints(), self._topology.master,
                                         self._share())

    # -- reporting ---------------------------------------------------------------------------

    def readiness(self) -> list[str]:
        if not self._started or self._closed:
            return ["broker not started"]
        sentinel_error = self._sentinel.error if self._sentinel is not None else None
        reasons = self._topology.master_problems(sentinel_error)
        sub = self._sub
        if sub is None or not sub.alive:
            reasons.append("no endpoint delivers")
        elif sub.probe_overdue(self._topology.max_lag):
            reasons.append("no endpoint delivers (delivery probe overdue)")
        return reasons

    def status(self) -> BrokerStatus:
        sub = self._sub
        sub_ep = sub.endpoint if sub is not None and sub.alive else None
        master = self._topology.master
        return BrokerStatus(
            backend="redis",
            master=master.label if master is not None else None,
            subscribed_endpoint=sub_ep.label if sub_ep is not None else None,
            endpoints=tuple(ep.snapshot(ep is sub_ep) for ep in self._endpoints()),
            failovers=tuple(self._cluster.failovers.local),
            failover_count=self._cluster.failovers.count,
            cluster_failovers=self._cluster.failovers.shown(),
            verdict=self._cluster.verdict,
            missing_nodes=self._cluster.missing_nodes(),
        )
