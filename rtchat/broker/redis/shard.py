"""One shard of a Redis Cluster as this node reads it: its servers, one sharded subscription.

Owns, per shard: the slot ranges it serves, a ``Topology`` (its master, its
replicas and the verdict on each, exactly as with one master), the rooms of
this node whose slot it serves, and the sharded subscription
(``SSUBSCRIBE``) on its healthiest replica with its delivery probe — a
probe channel whose hash tag lands in one of the shard's slots. A switch
moves the subscription to another of the shard's servers, resubscribes the
shard's rooms and replays what they missed; the other shards are not
touched.

It is the ``Listener`` of its subscription: live messages go through
``Delivery`` (``prev``-chain order, gap fill) under a per-room lock, so a
room that moves between shards is never delivered from two at once. A
channel the server drops (its slot moved away) is handed back to the
broker, which attaches the room to the shard that owns the slot now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable

from redis.crc import key_slot
from redis.exceptions import RedisError

from rtchat.broker.base import BrokerUnavailable, EndpointStatus, Failover
from rtchat.broker.redis.delivery import Delivery, RoomState
from rtchat.broker.redis.endpoint import SOCKET_TIMEOUT, EndpointHealth, error_text
from rtchat.broker.redis.history import History
from rtchat.broker.redis.keys import ClusterKeys
from rtchat.broker.redis.subscription import Subscription
from rtchat.broker.redis.topology import Topology
from rtchat.config import mask_url
from rtchat.messages import Message

log = logging.getLogger("rtchat.broker.redis")

CATCH_UP_PER_ROOM = 0.005  # seconds a switch allows per room for its catch-up read
PROBE_SEARCH = 200_000  # candidate probe channels tried for a tag in the shard's slots

_room_locks: weakref.WeakKeyDictionary[RoomState, asyncio.Lock] = weakref.WeakKeyDictionary()


def room_lock(state: RoomState) -> asyncio.Lock:
    """The lock that serialises every delivery of one room, whichever shard it comes from."""
    lock = _room_locks.get(state)
    if lock is None:
        lock = _room_locks[state] = asyncio.Lock()
    return lock


def in_ranges(slot: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= slot <= hi for lo, hi in ranges)


def probe_channel(keys: ClusterKeys, ranges: list[tuple[int, int]]) -> str | None:
    """This node's probe channel for a shard: the first candidate whose slot it serves."""
    for n in range(PROBE_SEARCH):
        channel = keys.probe_for(n)
        if in_ranges(key_slot(channel.encode()), ranges):
            return channel
    return None


class Shard:
    """A shard's servers, health verdict and this node's sharded subscription on it."""

    def __init__(self, keys: ClusterKeys, history: History, delivery: Delivery,
                 reader: EndpointHealth, failovers: Callable[[Failover], None],
                 wake: Callable[[], None], max_lag: float, interval: float,
                 prefer_replica: bool) -> None:
        """``reader`` reads any slot through the cluster client (it follows MOVED/ASK)."""
        self.keys = keys
        self._reader = reader
        self.node_ids: set[str] = set()  # the cluster node ids seen in it (identity)
        self.ranges: list[tuple[int, int]] = []
        self.topology = Topology(max_lag, interval, wake)
        self.rooms: dict[str, RoomState] = {}
        self.sub: Subscription | None = None
        self.probe: str | None = None
        self.lock = asyncio.Lock()
        self._history = history
        self._delivery = delivery
        self._record = failovers
        self._wake = wake
        self._interval = interval
        self._prefer_replica = prefer_replica
        self._lost_from: str | None = None
        self._lost_reason = ""
        self.dropped: set[str] = set()  # rooms the server unsubscribed: the broker re-homes them
        self.closed = False

    @property
    def label(self) -> str:
        return ",".join(f"{lo}-{hi}" for lo, hi in self.ranges) or "no slots"

    def serves(self, slot: int) -> bool:
        return in_ranges(slot, self.ranges)

    def set_ranges(self, ranges: list[tuple[int, int]]) -> None:
        if ranges != self.ranges:
            self.ranges = ranges
            probe = probe_channel(self.keys, ranges) if ranges else None
            if probe != self.probe:
                self.probe = probe
                sub = self.sub
                if sub is not None and sub.alive:
                    sub.kill("the shard's slots changed: a new probe channel")

    def endpoints(self) -> list[EndpointHealth]:
        sub = self.sub
        return self.topology.endpoints(sub.endpoint if sub is not None else None)

    def read_endpoints(self, sub: Subscription | None = None) -> list[EndpointHealth]:
        """Where to read this shard's streams: the cluster client (the master), then the
        subscription's endpoint (``sub``'s, else the current one's); that one first while
        the master is known to be down."""
        sub = sub or self.sub
        if sub is None:
            return [self._reader]
        master = self.topology.master
        if master is not None and master.reachable is False:
            return [sub.endpoint, self._reader]
        return [self._reader, sub.endpoint]

    # -- rooms -------------------------------------------------------------------------

    async def attach(self, state: RoomState) -> bool:
        """Subscribe ``state``'s room here (a confirmation replays what it missed).
        False when there is no subscription yet (the next health round opens one)."""
        async with self.lock:
            self.rooms[state.room] = state
            self.dropped.discard(state.room)
            sub = self.sub
            if sub is not None and sub.alive:
                if state.sent_on is not sub:
                    state.sent_on = sub
                    with contextlib.suppress(RedisError, OSError):
                        await sub.subscribe(self.keys.channel(state.room), state)
                return True
        self._wake()
        return False

    async def detach(self, room: str) -> RoomState | None:
        """Stop delivering ``room`` from this shard; returns its state (None if not here)."""
        async with self.lock:
            state = self.rooms.pop(room, None)
            self.dropped.discard(room)
            if state is None:
                return None
            sent_on, state.sent_on = state.sent_on, None
            sub = self.sub
            if sub is not None and sub.alive and sent_on is sub:
                with contextlib.suppress(RedisError, OSError):
                    await sub.unsubscribe(self.keys.channel(room))
            return state

    def can_subscribe(self) -> bool:
        sub = self.sub
        return (sub is not None and sub.alive) or self._choose(None) is not None

    # -- the subscription's Listener ---------------------------------------------------

    async def on_message(self, sub: Subscription, channel: str, data: str) -> None:
        state = self.rooms.get(self.keys.room_of(channel))
        if state is None or state.last is None:
            return
        async with room_lock(state):
            if self.rooms.get(state.room) is not state:
                return  # moved to another shard meanwhile: that one delivers it now

            async def gap(after: str, until: str) -> list[Message]:
                # The endpoint that passed on the SPUBLISH has the XADD: read it first.
                return await self._history.range([sub.endpoint, *self._fallback()], state.room,
                                                 after, until)

            await self._delivery.live(state, data, gap, channel)

    async def on_confirmed(self, sub: Subscription, token: object) -> int:
        if not isinstance(token, RoomState) or self.rooms.get(token.room) is not token:
            return 0
        eps = self.read_endpoints(sub)
        history, room = self._history, token.room
        async with room_lock(token):
            return await self._delivery.confirmed(
                token, lambda: history.newest_id(eps, room),
                lambda after, until: history.range(eps, room, after, until))

    def on_dead(self, sub: Subscription) -> None:
        self._wake()

    def on_dropped(self, sub: Subscription, channel: str) -> None:
        if channel == self.probe:
            sub.kill("the probe channel's slot moved")
            return
        room = self.keys.room_of(channel)
        state = self.rooms.get(room)
        if state is not None and state.sent_on is sub:
            state.sent_on = None
            self.dropped.add(room)
            self._wake()

    def _fallback(self) -> list[EndpointHealth]:
        return [self._reader]

    # -- the health round --------------------------------------------------------------

    async def tick(self, check_timeout: float) -> None:
        """Check the shard's servers, judge them, probe, switch if needed."""
        topology = self.topology
        now = await topology.check(self.endpoints(), check_timeout)
        sub = self.sub
        overdue = sub is not None and sub.alive and sub.probe_overdue(topology.max_lag)
        topology.judge(now, self.endpoints(), sub.endpoint if overdue and sub else None)
        sub, master = self.sub, topology.master
        if sub is not None and master is not None and self.probe is not None:
            await sub.send_probe(master, check_timeout)
        await self._maybe_switch()

    def _choose(self, exclude: EndpointHealth | None) -> EndpointHealth | None:
        return self.topology.choose(exclude, prefer_replica=self._prefer_replica)

    async def _maybe_switch(self) -> None:
        sub = self.sub
        if sub is not None and sub.alive:
            move = self.topology.move_from(sub.endpoint, self._prefer_replica)
            if move is not None:
                await self._switch(*move)
            return
        if sub is not None:
            self._lost_from, self._lost_reason = sub.endpoint.url, sub.dead or "lost"
            async with self.lock:
                if self.sub is sub:
                    self.sub = None
            sub.endpoint.probe_ms = None
            await sub.close()
            await self._retire_if_orphan(sub.endpoint)
            target = self._choose(exclude=sub.endpoint)
        elif not self.rooms or self.probe is None:
            return  # nothing to read here yet: no subscription needed
        else:
            target = self._choose(exclude=None)
        if target is not None:
            await self._switch(target, self._lost_reason or "no subscription")
        elif sub is not None:
            log.warning("shard %s: subscription on %s lost (%s); no healthy endpoint to move to",
                        self.label, sub.endpoint.label, self._lost_reason)

    async def _retire_if_orphan(self, ep: EndpointHealth) -> None:
        if ep not in self.endpoints():
            await ep.aclose()

    async def _switch(self, target: EndpointHealth, reason: str) -> bool:
        """Move the subscription to ``target``: resubscribe the shard's rooms, replay the missed."""
        probe = self.probe
        if probe is None or self.closed:
            return False
        async with self.lock:
            old = self.sub
            from_url = old.endpoint.url if old is not None else self._lost_from
            if old is not None:
                self.sub = None
                old.endpoint.probe_ms = None
                await old.close()
                await self._retire_if_orphan(old.endpoint)
            started = time.time()
            sub = Subscription(target, probe, f"rtchat-sub:{self.keys.node_id}", self,
                               sharded=True)
            rooms = list(self.rooms.values())
            for state in rooms:
                state.sent_on = sub
            self.dropped.clear()
            try:
                await asyncio.wait_for(
                    sub.open([(self.keys.channel(s.room), s) for s in rooms]), SOCKET_TIMEOUT * 2)
                budget = max(5.0, self._interval * 3) + CATCH_UP_PER_ROOM * len(rooms)
                await asyncio.wait_for(sub.wait_opened(), budget)
            except (RedisError, OSError, BrokerUnavailable, asyncio.TimeoutError) as e:
                await sub.close()
                target.note_failure(e)
                target.soft_down = True
                self._lost_from, self._lost_reason = from_url, reason
                log.warning("shard %s: cannot subscribe on %s: %s", self.label, target.label,
                            error_text(e))
                return False
            except BaseException:
                await asyncio.shield(sub.close())
                raise
            self.sub = sub
            self._lost_from, self._lost_reason = None, ""
        if from_url is None:
            log.info("shard %s: subscribed on %s (%d rooms)", self.label, target.label,
                     len(rooms))
        else:
            record = Failover(at=started, from_=mask_url(from_url), to=target.label,
                              reason=f"shard {self.label}: {reason}", recovered=sub.replayed)
            self._record(record)
            log.warning("shard %s: subscription moved from %s to %s (%s); %d recovered",
                        self.label, record.from_, record.to, reason, record.recovered)
        return True

    # -- reporting ---------------------------------------------------------------------

    @property
    def reading(self) -> EndpointHealth | None:
        sub = self.sub
        return sub.endpoint if sub is not None and sub.alive else None

    def endpoint_statuses(self) -> tuple[EndpointStatus, ...]:
        reading = self.reading
        return tuple(ep.snapshot(ep is reading) for ep in self.endpoints())

    async def close(self) -> None:
        self.closed = True
        async with self.lock:
            sub, self.sub = self.sub, None
        if sub is not None:
            await sub.close()
        for ep in self.endpoints():
            await ep.aclose()
