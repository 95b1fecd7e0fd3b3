"""The embedded in-process broker: the single-node default.

Owns per-room history (bounded by ``history.size``, expired after
``history.ttl_seconds`` of silence) and the id sequence. A room silent for
that long with no subscriber is forgotten whole, so creating rooms without
end does not grow the node without end. Delivery is a plain
synchronous call into the hub, so it can neither lag nor lose anything; the
``prev`` chain is kept anyway so resume logic is the same as on Redis.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rtchat.broker.activity import RoomActivity
from rtchat.broker.base import (
    Ban,
    BrokerStatus,
    Deliver,
    KeyConflict,
    NodeStats,
    Presence,
    Published,
    Replay,
    content_digest,
    replay_is_complete,
)
from rtchat.config import Config
from rtchat.messages import Message, id_key


@dataclass
class _Room:
    messages: deque[Message]
    last_ms: int = 0
    last_seq: int = -1
    touched: float = field(default_factory=time.monotonic)


class MemoryBroker:
    kind = "memory"

    def __init__(self, cfg: Config, node_id: str) -> None:
        self._size = cfg.history.size
        self._ttl = cfg.history.ttl_seconds
        self._node_id = node_id
        self._rooms: dict[str, _Room] = {}
        self._subscribed: set[str] = set()
        self._presence: dict[str, dict[str, int]] = {}
        self._dedup_seconds = cfg.history.dedup_seconds
        # (room, idempotency key) -> (expires at, content digest, the message it stored)
        self._keys: dict[tuple[str, str], tuple[float, str, Message]] = {}
        self._deliver: Deliver | None = None
        self._node_stats: NodeStats | None = None
        self._next_sweep = time.monotonic() + self._sweep_interval()
        self._sweeper: asyncio.Task[None] | None = None
        self._bans: dict[str, Ban] = {}
        self._activity = RoomActivity()

    def _sweep_interval(self) -> float:
        return min(60.0, max(0.5, min(self._ttl, self._dedup_seconds) / 4))

    @property
    def room_count(self) -> int:
        """Rooms held in memory (with history, or subscribed)."""
        return len(self._rooms)

    def _sweep(self, now: float) -> None:
        """Forget rooms silent for longer than the TTL that nobody here listens to."""
        self._next_sweep = now + self._sweep_interval()
        idle = [room for room, state in self._rooms.items()
                if now - state.touched > self._ttl and room not in self._subscribed]
        for room in idle:
            del self._rooms[room]
        self._keys = {k: v for k, v in self._keys.items() if v[0] > now}

    async def start(self, deliver: Deliver, node_stats: NodeStats) -> None:
        self._deliver = deliver
        self._node_stats = node_stats
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="memory-broker-sweep")

    async def close(self) -> None:
        self._deliver = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper])
            self._sweeper = None

    async def _sweep_loop(self) -> None:
        """Sweep even when nothing is sent: an idle node still lets go of idle rooms."""
        while self._deliver is not None:
            await asyncio.sleep(self._sweep_interval())
            self._sweep(time.monotonic())

    def _room(self, room: str) -> _Room | None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        state = self._rooms.get(room)
        if state is not None and time.monotonic() - state.touched > self._ttl:
            # Expired like a Redis key with a TTL; the id sequence goes on.
            state.messages.clear()
        return state

    async def publish(self, room: str, nick: str, text: str, key: str | None = None,
                      user: str = "") -> Published:
        digest = ""
        if key is not None:
            digest = content_digest(nick, text, user)
            seen = self._keys.get((room, key))
            if seen is not None and seen[0] > time.monotonic():
                if seen[1] != digest:
                    raise KeyConflict(key)
                return Published(seen[2], replicated=None, duplicate=True)
        state = self._room(room)
        if state is None:
            state = self._rooms[room] = _Room(deque(maxlen=self._size))
        now_ms = int(time.time() * 1000)
        if now_ms > state.last_ms:
            state.last_ms, state.last_seq = now_ms, 0
        else:
            state.last_seq += 1
        prev = state.messages[-1].id if state.messages else ""
        msg = Message(
            id=f"{state.last_ms}-{state.last_seq}", room=room, nick=nick, text=text,
            ts=time.time(), node=self._node_id, prev=prev, user=user,
        )
        state.messages.append(msg)
        state.touched = time.monotonic()
        self._activity.note(room)
        if key is not None:
            self._keys[(room, key)] = (state.touched + self._dedup_seconds, digest, msg)
        if room in self._subscribed and self._deliver is not None:
            self._deliver(msg)
        return Published(msg, replicated=None)

    async def history(self, room: str, limit: int) -> list[Message]:
        state = self._room(room)
        if state is None or limit <= 0:
            return []
        msgs = state.messages
        return list(msgs)[-limit:] if len(msgs) > limit else list(msgs)

    async def read_since(self, room: str, last_id: str) -> Replay:
        state = self._room(room)
        msgs = list(state.messages) if state is not None else []
        key = id_key(last_id)
        after = [m for m in msgs if m.key > key]
        oldest = msgs[0].id if msgs else ""
        ok = replay_is_complete(last_id, after[0].prev if after else None,
                                msgs[-1].id if msgs else None)
        return Replay(after, truncated=not ok, oldest=oldest)

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._subscribed.discard(room)

    async def set_presence(self, room: str, nicks: Mapping[str, int]) -> None:
        if nicks:
            self._presence[room] = dict(nicks)
        else:
            self._presence.pop(room, None)

    async def presence(self, room: str) -> Presence:
        nicks = self._presence.get(room, {})
        return Presence(count=sum(nicks.values()), nicks=sorted(n for n in nicks if n))

    async def ban(self, ban: Ban) -> None:
        self._bans[ban.user] = ban

    async def unban(self, user: str) -> bool:
        return self._bans.pop(user, None) is not None

    def banned(self, user: str) -> Ban | None:
        ban = self._bans.get(user)
        if ban is not None and ban.until <= time.time():
            del self._bans[user]
            return None
        return ban

    def bans(self) -> list[Ban]:
        now = time.time()
        self._bans = {u: b for u, b in self._bans.items() if b.until > now}
        return sorted(self._bans.values(), key=lambda b: b.until)

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        stats = dict(self._node_stats()) if self._node_stats else {}
        stats.setdefault("id", self._node_id)
        stats.setdefault("pid", os.getpid())
        stats["last_seen"] = time.time()
        stats["endpoint"] = "embedded"
        stats["room_stats"] = self._activity.rooms(
            {room: sum(nicks.values()) for room, nicks in self._presence.items()})
        return [stats]

    def readiness(self) -> list[str]:
        return [] if self._deliver is not None else ["broker not started"]

    def status(self) -> BrokerStatus:
        return BrokerStatus(backend="memory", master=None, subscribed_endpoint=None)
