"""The hub: rooms, their local streams, and the one fan-out path.

Owns: which rooms have local clients (subscribe on first, unsubscribe on
last after a short delay, roll back a failed subscribe), each client's
bounded outbox, slow-client eviction, heartbeats, presence, and the drain on
shutdown. The broker hands it messages through :meth:`Hub.deliver`; the SSE
handler drains a :class:`Stream`. It knows the Broker protocol, never
tornado or redis.

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
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from rtchat import sse
from rtchat.broker.base import Broker, Published
from rtchat.config import Config
from rtchat.messages import Message, id_key
from rtchat.metrics import Metrics

log = logging.getLogger("rtchat.hub")

UNSUBSCRIBE_DELAY = 2.0  # seconds an empty room stays subscribed, so reconnect churn stays local
PRESENCE_REFRESH = 2.0  # seconds between cluster-wide presence reads for local rooms
# Joins and leaves within this long are one presence update: a refresh costs O(room size),
# so a crowd reconnecting after a node restart must not cost O(room size) each.
PRESENCE_BATCH = 0.25


# Takes bytes; returns None when written at once, else a future done when written.
# Raises when the client is gone.
Sink = Callable[[bytes], "asyncio.Future[None] | None"]


class Stream:
    """One SSE client's outbox: the hub pushes frames, the stream writes them to its sink.

    ``push`` never blocks. Frames queue until the sink (the client's connection)
    has taken the previous write; everything queued by then goes out as one
    write, so bursts coalesce. A backlog past ``max_queue`` closes the stream.
    """

    __slots__ = (
        "_closed_waiter", "_dirty", "_inflight", "_key_skip", "_on_ready", "_queue",
        "_queued_bytes", "_sink", "_writing", "abort", "close_reason", "closed", "connected_at",
        "id", "last_event_id", "max_bytes", "max_queue", "nick", "remote", "room", "user_agent",
        "write_started",
    )

    def __init__(self, room: str, nick: str, remote: str, user_agent: str, max_queue: int,
                 on_ready: Callable[[Stream], None] | None = None,
                 max_bytes: int = 1 << 62) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.room = room
        self.nick = nick
        self.remote = remote
        self.user_agent = user_agent
        self.connected_at = time.time()
        self.last_event_id = ""
        self.max_queue = max_queue
        self.max_bytes = max_bytes
        self.closed = False
        self.close_reason = ""
        # Called (once) when the stream must drop its connection without a goodbye.
        self.abort: Callable[[], None] | None = None
        self._queue: deque[tuple[bytes, str | None]] = deque()
        self._queued_bytes = 0
        self._inflight = 0  # bytes handed to the sink and not yet written out
        self.write_started = 0.0  # monotonic time of the write in flight (0.0: none)
        self._key_skip: tuple[int, int] | None = None
        self._sink: Sink | None = None
        self._writing = False
        self._dirty = False
        # Told when this stream has frames to write; the hub batches these per loop turn.
        self._on_ready = on_ready
        self._closed_waiter: asyncio.Future[None] | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    def push(self, frame: bytes, message_id: str | None = None,
             key: tuple[int, int] | None = None) -> bool:
        """Queue a frame. Returns False when that overflowed the queue and closed the stream."""
        if self.closed:
            return True
        if key is not None and self._key_skip is not None:
            if key <= self._key_skip:
                return True  # already sent during catch-up
            self._key_skip = None
        if (len(self._queue) >= self.max_queue
                or self._queued_bytes + self._inflight + len(frame) > self.max_bytes):
            self.close("slow_client", abort=True)
            return False
        self._queue.append((frame, message_id))
        self._queued_bytes += len(frame)
        if not self._dirty and not self._writing and self._sink is not None:
            self._dirty = True
            if self._on_ready is not None:
                self._on_ready(self)
            else:
                self.write_pending()
        return True

    def skip_through(self, message_id: str) -> None:
        """Drop queued and future messages up to ``message_id``: the catch-up already sent them."""
        key = id_key(message_id)
        self._key_skip = key
        self._queue = deque(
            (f, mid) for f, mid in self._queue if mid is None or id_key(mid) > key)
        self._queued_bytes = sum(len(f) for f, _ in self._queue)
        if any(mid is not None for _, mid in self._queue):
            self._key_skip = None

    def attach(self, sink: Sink) -> None:
        """Start writing to ``sink``: it takes bytes and returns a future done once written."""
        self._sink = sink
        self.write_pending()

    def take_pending(self) -> bytes:
        """Everything queued, as one chunk (and the queue emptied)."""
        queue = self._queue
        self._queued_bytes = 0
        if len(queue) == 1:
            frame, mid = queue.popleft()
            if mid is not None:
                self.last_event_id = mid
            return frame
        frames = []
        for frame, mid in queue:
            frames.append(frame)
            if mid is not None:
                self.last_event_id = mid
        queue.clear()
        return b"".join(frames)

    def write_pending(self) -> None:
        """Hand what is queued to the sink, unless a write is still in flight."""
        self._dirty = False
        if self.closed or self._writing or not self._queue or self._sink is None:
            return
        chunk = self.take_pending()
        try:
            written = self._sink(chunk)
        except OSError as e:  # the client is gone (StreamClosedError is an OSError too)
            log.debug("stream %s: write failed: %s", self.id, e)
            self.close("client_gone")
            return
        if written is not None and not written.done():
            self._writing = True
            self._inflight = len(chunk)
            self.write_started = time.monotonic()
            written.add_done_callback(self._written)
        elif written is not None and (written.cancelled() or written.exception() is not None):
            self.close("client_gone")

    def stalled(self, now: float, timeout: float) -> bool:
        """Whether a write has been in flight (the socket taking nothing) for over ``timeout``."""
        return self._writing and now - self.write_started > timeout

    def _written(self, written: asyncio.Future[None]) -> None:
        self._writing = False
        self._inflight = 0
        self.write_started = 0.0
        if written.cancelled() or written.exception() is not None:
            self.close("client_gone")
        else:
            self.write_pending()

    async def wait_closed(self) -> None:
        """Returns once the stream is closed, by either side."""
        if self.closed:
            return
        self._closed_waiter = asyncio.get_running_loop().create_future()
        await self._closed_waiter

    def close(self, reason: str, abort: bool = False) -> None:
        """End the stream. ``abort`` also drops the connection (the client cannot keep up)."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._queue.clear()
        self._queued_bytes = 0
        if abort and self.abort is not None:
            self.abort()
        waiter = self._closed_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id, "room": self.room, "nick": self.nick, "remote": self.remote,
            "user_agent": self.user_agent, "connected_at": self.connected_at,
            "last_event_id": self.last_event_id, "queue": len(self._queue),
            "buffered_bytes": self._queued_bytes + self._inflight,
        }


@dataclass
class _Room:
    ready: asyncio.Future[None]
    streams: set[Stream] = field(default_factory=set)
    unsubscribe_timer: asyncio.TimerHandle | None = None
    presence_count: int = -1


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
        self._presence_dirty: set[str] = set()
        self._presence_wakeup = asyncio.Event()
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
            asyncio.create_task(self._presence_loop(), name="hub-presence"),
            asyncio.create_task(self._stall_loop(), name="hub-stalls"),
        ]

    async def close(self) -> None:
        # The flag ends the loops even where a library swallowed the cancellation
        # (asyncio.wait_for can, on Python < 3.12).
        self._closing = True
        self._presence_wakeup.set()
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

    @contextlib.asynccontextmanager
    async def connect(self, room: str, nick: str, remote: str, user_agent: str
                      ) -> AsyncIterator[Stream]:
        """Register a stream in ``room``; live messages queue from the moment this enters.

        Raises BrokerUnavailable when the room cannot be subscribed.
        """
        stream = Stream(room, nick, remote, user_agent, self.cfg.sse.max_queue, self._stream_ready,
                        max_bytes=self.cfg.sse.max_buffer_bytes)
        await self._join(stream)
        try:
            yield stream
        finally:
            stream.close(stream.close_reason or "client_gone")
            self._leave(stream)

    async def _join(self, stream: Stream) -> None:
        state = self._rooms.get(stream.room)
        if state is None:
            state = _Room(ready=asyncio.get_running_loop().create_future())
            self._rooms[stream.room] = state
            try:
                pending = self._unsubscribing.get(stream.room)
                if pending is not None:
                    await asyncio.wait([pending])  # its outcome is logged by _unsubscribed
                await self.broker.subscribe(stream.room)
            except BaseException as e:
                # Roll back: the next client tries again from scratch.
                del self._rooms[stream.room]
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
        self._streams[stream.id] = stream
        self._per_address[stream.remote] += 1
        self.metrics.clients.set(len(self._streams))
        self._mark_presence(stream.room)

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
        state = self._rooms.get(stream.room)
        if state is None:
            return
        state.streams.discard(stream)
        self._mark_presence(stream.room)
        if not state.streams and state.unsubscribe_timer is None:
            state.unsubscribe_timer = asyncio.get_running_loop().call_later(
                UNSUBSCRIBE_DELAY, self._unsubscribe_if_empty, stream.room)

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
        frame = sse.message(msg.id, msg.public_json())
        mid = msg.id
        key = msg.key
        streams = tuple(state.streams)
        for stream in streams:
            stream.push(frame, mid, key)
        self.messages_out += len(streams)
        self.metrics.delivered.inc(len(streams))
        self.metrics.fanout_latency.observe(max(0.0, time.time() - msg.ts))

    async def publish(self, room: str, nick: str, text: str) -> Published:
        published = await self.broker.publish(room, nick, text)
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
        """Close streams whose socket has taken nothing for ``sse.write_timeout_seconds``."""
        timeout = self.cfg.sse.write_timeout_seconds
        interval = min(1.0, timeout / 4)
        while not self._closing:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for stream in tuple(self._streams.values()):
                if stream.stalled(now, timeout):
                    stream.close("slow_client", abort=True)

    def _mark_presence(self, room: str) -> None:
        self._presence_dirty.add(room)
        self._presence_wakeup.set()

    async def _presence_loop(self) -> None:
        """Refresh presence for rooms that changed here at once, and for every room now and then."""
        loop = asyncio.get_running_loop()
        next_full = loop.time() + PRESENCE_REFRESH
        while not self._closing:
            timer = loop.call_at(next_full, self._presence_wakeup.set)
            try:
                await self._presence_wakeup.wait()
            finally:
                timer.cancel()
            self._presence_wakeup.clear()
            changed, self._presence_dirty = self._presence_dirty, set()
            rooms = set(changed)
            if loop.time() >= next_full:  # other nodes' clients come and go too
                next_full = loop.time() + PRESENCE_REFRESH
                rooms |= set(self._rooms)
            for room in rooms:
                if self._closing:
                    return
                try:
                    await self._refresh_presence(room, write=room in changed)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the broker is down: presence waits for it
                    log.debug("presence refresh for %s failed: %s", room, e)
                    if room in changed:
                        self._presence_dirty.add(room)  # write it on the next round
            await asyncio.sleep(PRESENCE_BATCH)

    async def _refresh_presence(self, room: str, write: bool) -> None:
        """Record this node's clients of ``room`` (when they changed), then read the cluster's."""
        if write:
            state = self._rooms.get(room)
            nicks = Counter(s.nick for s in state.streams) if state is not None else Counter()
            await self.broker.set_presence(room, nicks)
        state = self._rooms.get(room)
        if state is None or not state.streams:
            return
        presence = await self.broker.presence(room)
        if presence.count != state.presence_count:
            state.presence_count = presence.count
            frame = sse.json_event("presence", {"room": room, "count": presence.count})
            for stream in tuple(state.streams):
                stream.push(frame)

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
