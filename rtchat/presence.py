"""Presence for the rooms with streams on this node: who is here, told to every stream.

Owns: which rooms changed here (joins and leaves are batched: a refresh costs
O(room size), so a crowd reconnecting after a node restart must not cost that
each), what this node last recorded in the broker per room, the room count
each stream was last told, and the loop that writes this node's part and
reads the cluster's. Knows the Broker protocol and streams, not the hub.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable

from rtchat import sse
from rtchat.broker.base import Broker
from rtchat.stream import Stream

log = logging.getLogger("rtchat.hub")

REFRESH = 2.0  # seconds between cluster-wide presence reads for local rooms
BATCH = 0.25  # joins and leaves within this long are one presence update
# A room's count goes to every stream in it: a big room is told at most this many frames a
# second, so a crowd joining it does not cost O(room size) per batch. A 5,000-stream room
# hears of changes every 2.5 s; each joining stream is told the count at once anyway.
TELL_PER_SECOND = 2000


class PresenceTracker:
    def __init__(self, broker: Broker, streams_of: Callable[[str], set[Stream] | None],
                 rooms: Callable[[], Iterable[str]]) -> None:
        self._broker = broker
        self._streams_of = streams_of  # the room's local streams; None once it has none
        self._rooms = rooms
        self._dirty: set[str] = set()
        self._wakeup = asyncio.Event()
        # Per room: what this node last recorded, and the count its streams were last told.
        self._written: dict[str, Counter[str]] = {}
        self._counts: dict[str, int] = {}
        self._told_at: dict[str, float] = {}  # when a room's streams were last told a count
        self._frames: dict[str, tuple[int, bytes]] = {}  # the last presence frame per room

    def mark(self, room: str) -> None:
        """A stream joined or left ``room``: write and read its presence soon."""
        self._dirty.add(room)
        self._wakeup.set()

    def wake(self) -> None:
        self._wakeup.set()

    async def count_now(self, room: str) -> int | None:
        """The room's count as of now, counting streams not yet recorded: every new stream
        is told it, whether or not it just changed (a reload or a second tab leaves it as it
        was). None when the broker cannot say."""
        streams = self._streams_of(room)
        if streams is None:
            return None
        try:
            cluster = await self._broker.presence(room)
        except Exception as e:  # presence is informative; the stream goes on without it
            log.debug("presence for %s on join: %s", room, e)
            return None
        written = self._written.get(room, Counter())
        return max(0, cluster.count - sum(written.values()) + len(streams))

    async def run(self, closing: Callable[[], bool]) -> None:
        """Refresh rooms that changed here at once, and every room now and then."""
        loop = asyncio.get_running_loop()
        next_full = loop.time() + REFRESH
        next_due = next_full  # the soonest a big room held back may be told again
        while not closing():
            timer = loop.call_at(min(next_full, next_due), self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()
            self._wakeup.clear()
            changed, self._dirty = self._dirty, set()
            now = loop.time()
            rooms = set(changed)
            if now >= next_full:  # other nodes' clients come and go too
                next_full = now + REFRESH
                rooms |= set(self._rooms())
            next_due = next_full
            for room in rooms:
                if closing():
                    return
                wait = self._pause(room, now)
                if wait > 0:  # a big room told recently: this change waits its turn
                    if room in changed:
                        self._dirty.add(room)
                    next_due = min(next_due, now + wait)
                    continue
                try:
                    await self.refresh(room, write=room in changed)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the broker is down: presence waits for it
                    log.debug("presence refresh for %s failed: %s", room, e)
                    if room in changed:
                        self._dirty.add(room)  # write it on the next round
            await asyncio.sleep(BATCH)

    def frame(self, room: str, count: int) -> bytes:
        """The presence event for ``room`` at ``count``: built once, sent to every stream."""
        last = self._frames.get(room)
        if last is not None and last[0] == count:
            return last[1]
        frame = sse.json_event("presence", {"room": room, "count": count})
        self._frames[room] = (count, frame)
        return frame

    def _pause(self, room: str, now: float) -> float:
        """How long ``room`` must wait before its streams are told again (0: now)."""
        streams = self._streams_of(room)
        if not streams:
            self._told_at.pop(room, None)
            return 0.0
        told = self._told_at.get(room)
        if told is None:
            return 0.0
        return told + len(streams) / TELL_PER_SECOND - now

    async def refresh(self, room: str, write: bool) -> None:
        """Record this node's clients of ``room`` (when they changed), then read the cluster's
        and tell the room's streams when the count moved."""
        if write:
            streams = self._streams_of(room)
            nicks = Counter(s.nick for s in streams) if streams else Counter()
            await self._broker.set_presence(room, nicks)
            if nicks:
                self._written[room] = nicks
            else:
                self._written.pop(room, None)
                self._counts.pop(room, None)
                self._told_at.pop(room, None)
                self._frames.pop(room, None)
        streams = self._streams_of(room)
        if not streams:
            return
        presence = await self._broker.presence(room)
        if presence.count == self._counts.get(room, -1):
            return
        self._counts[room] = presence.count
        self._told_at[room] = asyncio.get_running_loop().time()
        frame = self.frame(room, presence.count)
        for stream in tuple(streams):
            if stream.rooms:
                stream.push(frame)  # one count per room: no single "last told"
            elif stream.presence_count != presence.count:  # told on join already
                stream.presence_count = presence.count
                stream.push(frame)
