"""The hub: rooms, their local streams, and the one fan-out path; the handlers' only door.

Owns: which rooms have local clients (subscribe on first, unsubscribe on
last after a short delay, roll back a failed subscribe), the catch-up of a
resuming stream, slow-client eviction, heartbeats, presence (rtchat.presence), and the drain
on shutdown. The broker hands it messages through :meth:`Hub.deliver`; the
SSE handler attaches a sink to a :class:`~rtchat.stream.Stream`. Handlers ask
the hub (``connect``, ``publish``, ``history``, ``presence``, ``readiness``),
never the broker. It knows the Broker protocol, never tornado or redis.

The fan-out never awaits: each message is framed once, and the same bytes
are appended to every stream of the room. A stream whose backlog passes
``sse.max_queue`` frames or ``sse.max_buffer_bytes`` bytes (its queue plus
the write in flight), or whose write makes no progress for
``sse.write_timeout_seconds``, is closed; its client resumes with
Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rtchat import cursor as cursor_mod
from rtchat import sse
from rtchat.broker.base import Ban, Broker, Presence, Published
from rtchat.catchup import catch_up, catch_up_rooms
from rtchat.config import Config
from rtchat.messages import Message
from rtchat.metrics import Metrics
from rtchat.presence import PresenceTracker
from rtchat.stream import Sink, Stream

__all__ = ["Hub", "Sink", "Stream"]

log = logging.getLogger("rtchat.hub")

UNSUBSCRIBE_DELAY = 2.0  # seconds an empty room stays subscribed, so reconnect churn stays local


@dataclass
class _Room:
    ready: asyncio.Future[None]
    streams: set[Stream] = field(default_factory=set)
    unsubscribe_timer: asyncio.TimerHandle | None = None
    # The multi-room streams among ``streams``: framed per stream (with their cursor).
    multi: set[Stream] = field(default_factory=set)


class Hub:
    """Rooms with local clients, fed by the broker. Build one per node in ``main()``."""

    def __init__(self, cfg: Config, broker: Broker, metrics: Metrics, node_id: str) -> None:
        self.cfg = cfg
        self.broker = broker
        self.metrics = metrics
        self.node_id = node_id
        self.started_at = time.time()
        self.draining = False
        # Where other nodes' admins can reach this one; set by main() once the socket is bound.
        self.address = f"{cfg.http.host}:{cfg.http.port}"
        self._closing = False
        self.messages_in = 0  # messages this node stored for its clients' POSTs
        self.messages_out = 0  # message frames queued to this node's streams
        self._rooms: dict[str, _Room] = {}
        self._streams: dict[str, Stream] = {}
        self._per_address: Counter[str] = Counter()  # open streams by client address
        self._tasks: list[asyncio.Task[None]] = []
        self._presence = PresenceTracker(broker, self._room_streams, lambda: list(self._rooms))
        self._all_gone = asyncio.Event()
        self._ready: list[Stream] = []
        # Unsubscribes in flight, by room: a join waits for its room's before subscribing,
        # so the broker always sees subscribe and unsubscribe in the hub's order.
        self._unsubscribing: dict[str, asyncio.Task[None]] = {}
        self._write_scheduled = False

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self.deliver, self.node_stats)
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="hub-heartbeat"),
            asyncio.create_task(self._presence.run(lambda: self._closing), name="hub-presence"),
            asyncio.create_task(self._stall_loop(), name="hub-stalls"),
        ]

    async def close(self) -> None:
        # The flag ends the loops even where a library swallowed the cancellation
        # (asyncio.wait_for can, on Python < 3.12).
        self._closing = True
        self._presence.wake()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        self._tasks = []
        for stream in list(self._streams.values()):
            stream.close("shutdown")
        await self.broker.close()

    async def drain(self, seconds: float) -> None:
        """Close every stream at a random moment within ``seconds``; return when all are gone."""
        self.draining = True
        loop = asyncio.get_running_loop()
        for stream in list(self._streams.values()):
            loop.call_later(random.uniform(0, seconds), stream.close, "shutdown")
        if self._streams:
            self._all_gone.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_gone.wait(), seconds + 2.0)

    # -- streams -------------------------------------------------------------

    @property
    def client_count(self) -> int:
        return len(self._streams)

    def streams(self) -> list[Stream]:
        return list(self._streams.values())

    def streams_from(self, address: str) -> int:
        """Open streams of one client address on this node."""
        return self._per_address.get(address, 0)

    def disconnect(self, client_id: str) -> bool:
        stream = self._streams.get(client_id)
        if stream is None:
            return False
        stream.close("admin_disconnect")
        return True

    def kick(self, client_id: str, reason: str) -> bool:
        """End one stream with ``event: kicked`` (the client should not come back by itself)."""
        stream = self._streams.get(client_id)
        if stream is None:
            return False
        stream.end_after(sse.json_event("kicked", {"reason": reason}), "kicked")
        return True

    async def ban(self, ban: Ban) -> int:
        """Bar a user cluster-wide (BrokerUnavailable when it cannot be stored); returns how
        many of their streams here were kicked. Other nodes kick theirs within a second."""
        await self.broker.ban(ban)
        return self._kick_banned()

    async def unban(self, user: str) -> bool:
        return await self.broker.unban(user)

    def banned(self, user: str) -> Ban | None:
        return self.broker.banned(user)

    def bans(self) -> list[Ban]:
        return self.broker.bans()

    def _kick_banned(self) -> int:
        kicked = 0
        for stream in tuple(self._streams.values()):
            ban = self.broker.banned(stream.user)
            if ban is not None and not stream.closed:
                stream.end_after(sse.json_event("kicked", {"reason": ban.reason or "banned"}),
                                 "banned")
                kicked += 1
        return kicked

    def _new_stream(self, room: str, rooms: tuple[str, ...], nick: str, remote: str,
                    user_agent: str, user: str, expires: float | None) -> Stream:
        stream = Stream(room, nick, remote, user_agent, self.cfg.sse.max_queue, self._stream_ready,
                        max_bytes=self.cfg.sse.max_buffer_bytes, rooms=rooms,
                        on_closed=self._leave)
        if user:
            stream.user = user  # a ban names the identity, not the address
        if expires:
            stream.expires = expires
        return stream

    async def open(self, room: str, nick: str, remote: str, user_agent: str,
                   last_event_id: str = "", user: str = "",
                   expires: float | None = None) -> Stream:
        """Register a stream in ``room``; live messages queue from the moment this starts.

        With ``last_event_id`` the stream's ``head`` holds the frames the client
        missed (``reset`` first when history has a gap), and live messages it
        already covers are skipped. Raises BrokerUnavailable when the room cannot
        be subscribed or its history read. The stream leaves the hub when it
        closes, whoever closes it (``Stream.close``).
        """
        stream = self._new_stream(room, (), nick, remote, user_agent, user, expires)
        await self._join(stream)
        try:
            if last_event_id:
                stream.head = await catch_up(self.broker, stream, last_event_id)
            count = await self._presence.count_now(stream.room)
            if count is not None:
                stream.presence_count = count
                stream.head.append(self._presence.frame(stream.room, count))
        except BaseException:
            stream.close(stream.close_reason or "client_gone")
            raise
        return stream

    async def open_rooms(self, rooms: tuple[str, ...], nick: str, remote: str,
                         user_agent: str, last_event_id: str = "", user: str = "",
                         expires: float | None = None) -> Stream:
        """One stream over several rooms; its ids are resume cursors for the whole set.

        ``last_event_id`` (a cursor) resumes every room it names (``reset`` with the
        room where its history has a gap); the other rooms start live. BadCursor for a
        cursor this server did not write; BrokerUnavailable as for ``open``.
        """
        resumed = cursor_mod.decode(last_event_id, rooms) if last_event_id else {}
        stream = self._new_stream(rooms[0], rooms, nick, remote, user_agent, user, expires)
        await self._join(stream)
        try:
            stream.head = await catch_up_rooms(self.broker, stream, resumed)
            # The first presence event carries the cursor, so a client has a resume point for
            # every room before any message arrives.
            cursor: str | None = stream.last_event_id
            for room in rooms:
                count = await self._presence.count_now(room)
                if count is not None:
                    stream.head.append(sse.json_event("presence", {"room": room, "count": count},
                                                      id=cursor))
                    cursor = None
        except BaseException:
            stream.close(stream.close_reason or "client_gone")
            raise
        return stream

    # -- what handlers may ask ----------------------------------------------------

    @property
    def broker_kind(self) -> str:
        return self.broker.kind

    async def history(self, room: str, limit: int) -> list[Message]:
        """The last ``limit`` messages of ``room``, oldest first. BrokerUnavailable when down."""
        return await self.broker.history(room, limit)

    async def presence(self, room: str) -> Presence:
        return await self.broker.presence(room)

    def readiness(self) -> list[str]:
        """Why this node should not get new traffic now; empty when ready."""
        return (["draining"] if self.draining else []) + self.broker.readiness()

    async def _join(self, stream: Stream) -> None:
        """Register ``stream`` in each of its rooms (subscribing where it is the first);
        on a failure, leave the rooms already joined and raise."""
        joined: list[str] = []
        try:
            for room in stream.rooms or (stream.room,):
                await self._join_room(stream, room)
                joined.append(room)
        except BaseException:
            for room in joined:
                self._leave_room(stream, room)
            raise
        self._streams[stream.id] = stream
        self._per_address[stream.remote] += 1
        self.metrics.clients.set(len(self._streams))

    async def _join_room(self, stream: Stream, room: str) -> None:
        state = self._rooms.get(room)
        if state is None:
            state = _Room(ready=asyncio.get_running_loop().create_future())
            self._rooms[room] = state
            try:
                pending = self._unsubscribing.get(room)
                if pending is not None:
                    await asyncio.wait([pending])  # its outcome is logged by _unsubscribed
                await self.broker.subscribe(room)
            except BaseException as e:
                # Roll back: the next client tries again from scratch.
                del self._rooms[room]
                state.ready.set_exception(e)
                state.ready.exception()  # mark retrieved; waiters re-raise it themselves
                raise
            state.ready.set_result(None)
        else:
            if state.unsubscribe_timer is not None:
                state.unsubscribe_timer.cancel()
                state.unsubscribe_timer = None
            await asyncio.shield(state.ready)
        state.streams.add(stream)
        if stream.rooms:
            state.multi.add(stream)
        self._presence.mark(room)

    def _leave(self, stream: Stream) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        self._per_address[stream.remote] -= 1
        if self._per_address[stream.remote] <= 0:
            del self._per_address[stream.remote]
        if not self._streams:
            self._all_gone.set()
        self.metrics.clients.set(len(self._streams))
        if stream.close_reason == "slow_client":
            self.metrics.evicted.inc()
        for room in stream.rooms or (stream.room,):
            self._leave_room(stream, room)

    def _leave_room(self, stream: Stream, room: str) -> None:
        state = self._rooms.get(room)
        if state is None:
            return
        state.streams.discard(stream)
        state.multi.discard(stream)
        self._presence.mark(room)
        if not state.streams and state.unsubscribe_timer is None:
            state.unsubscribe_timer = asyncio.get_running_loop().call_later(
                UNSUBSCRIBE_DELAY, self._unsubscribe_if_empty, room)

    def _unsubscribe_if_empty(self, room: str) -> None:
        state = self._rooms.get(room)
        if state is None or state.streams:
            return
        del self._rooms[room]
        task = asyncio.create_task(self.broker.unsubscribe(room), name=f"unsubscribe-{room}")
        self._unsubscribing[room] = task
        task.add_done_callback(lambda t: self._unsubscribed(room, t))

    def _unsubscribed(self, room: str, task: asyncio.Task[None]) -> None:
        if self._unsubscribing.get(room) is task:
            del self._unsubscribing[room]
        _log_failure(task)

    # -- fan-out ---------------------------------------------------------------

    def _stream_ready(self, stream: Stream) -> None:
        """A stream has frames to write: write them at the end of this loop turn, with the rest."""
        self._ready.append(stream)
        if not self._write_scheduled:
            self._write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_ready)

    def _write_ready(self) -> None:
        self._write_scheduled = False
        ready, self._ready = self._ready, []
        for stream in ready:
            stream.write_pending()

    def deliver(self, msg: Message) -> None:
        """Called by the broker for each message of a subscribed room, in order. Never awaits."""
        state = self._rooms.get(msg.room)
        if state is None or not state.streams:
            return
        json_data = msg.public_json()
        frame = sse.message(msg.id, json_data)  # framed once for every single-room stream
        mid = msg.id
        key = msg.key
        streams = tuple(state.streams)
        if state.multi:
            for stream in streams:
                if stream.rooms:
                    stream.push_message(msg, json_data)
                else:
                    stream.push(frame, mid, key)
        else:
            for stream in streams:
                stream.push(frame, mid, key)
        self.messages_out += len(streams)
        self.metrics.delivered.inc(len(streams))
        self.metrics.fanout_latency.observe(max(0.0, time.time() - msg.ts))

    async def publish(self, room: str, nick: str, text: str, key: str | None = None,
                      user: str = "") -> Published:
        """Store a message (KeyConflict, BrokerUnavailable: see Broker.publish)."""
        published = await self.broker.publish(room, nick, text, key, user)
        if not published.duplicate:
            self.messages_in += 1
            self.metrics.published.inc()
        return published

    # -- heartbeats and presence ---------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.cfg.sse.heartbeat_seconds
        while not self._closing:
            await asyncio.sleep(interval)
            for stream in tuple(self._streams.values()):
                stream.push(sse.PING)

    async def _stall_loop(self) -> None:
        """Once a second or so: close streams whose socket has taken nothing for
        ``sse.write_timeout_seconds``, whose token expired, or whose user is banned."""
        timeout = self.cfg.sse.write_timeout_seconds
        interval = min(1.0, timeout / 4)
        while not self._closing:
            await asyncio.sleep(interval)
            now, wall = time.monotonic(), time.time()
            for stream in tuple(self._streams.values()):
                if stream.stalled(now, timeout):
                    stream.close("slow_client", abort=True)
                elif stream.expires and stream.expires <= wall:
                    stream.close("token_expired")  # it reconnects with a new token, losing nothing
            self._kick_banned()

    def _room_streams(self, room: str) -> set[Stream] | None:
        state = self._rooms.get(room)
        return state.streams if state is not None else None

    # -- node view -----------------------------------------------------------------------

    def node_stats(self) -> dict[str, Any]:
        """This node's heartbeat payload, shown on every node's admin page."""
        return {
            "id": self.node_id,
            "address": self.address,
            "clients": len(self._streams),
            "rooms": len(self._rooms),
            "started_at": self.started_at,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "draining": self.draining,
        }


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s failed: %s", task.get_name(), task.exception())
