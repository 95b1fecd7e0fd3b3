"""One SSE client's outbox and the Sink it writes to.

Owns: the per-client queue of framed bytes, its bounds (``sse.max_queue``
frames, ``sse.max_buffer_bytes`` bytes counting the write in flight), the
skip of what a catch-up already sent, and the write loop to the sink. It
knows nothing of rooms, brokers or tornado: the web layer hands it a Sink.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from rtchat import sse
from rtchat.cursor import Encoder
from rtchat.messages import Message, id_key

log = logging.getLogger("rtchat.stream")


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
        "_dirty", "_end_when_sent", "_held", "_inflight", "_key_skip", "_on_closed", "_on_ready",
        "_progress", "_queue", "_queued_bytes", "_sink", "_writing", "abort", "close_reason",
        "closed", "connected_at", "cursor", "end", "expires", "head", "id", "last_event_id",
        "max_bytes", "max_queue", "nick", "presence_count", "remote", "room", "rooms", "user",
        "user_agent", "write_started",
    )

    def __init__(self, room: str, nick: str, remote: str, user_agent: str, max_queue: int,
                 on_ready: Callable[[Stream], None] | None = None,
                 max_bytes: int = 1 << 62, rooms: tuple[str, ...] = (),
                 on_closed: Callable[[Stream], None] | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.room = room
        # A multi-room stream's rooms (() for one room): its messages carry a resume cursor
        # for the whole set instead of the message id, so they are framed per stream.
        self.rooms = rooms
        self.cursor: Encoder | None = None
        self._held: list[tuple[Message, str]] | None = [] if rooms else None
        self.nick = nick
        self.remote = remote
        self.user_agent = user_agent
        self.connected_at = time.time()
        self.last_event_id = ""
        self.head: list[bytes] = []  # the catch-up frames, written before anything queued
        self.presence_count = -1  # the room count this client was last told
        self.user = remote  # who a ban names: the identity's user id, else the address
        self.expires = 0.0  # when the identity's token expires (0.0: never)
        self._end_when_sent = ""  # close with this reason once everything queued is written
        self.max_queue = max_queue
        self.max_bytes = max_bytes
        self.closed = False
        self.close_reason = ""
        # Called (once) when the stream must drop its connection without a goodbye.
        self.abort: Callable[[], None] | None = None
        # Called (once) when the stream closes, whoever closes it: the connection ends its
        # response. No task waits for the end of a live stream; this is how it hears of it.
        # Both are dropped at close: the handler holds the stream, and a kept callback would
        # be a cycle that only a full garbage collection frees.
        self.end: Callable[[], None] | None = None
        self._on_closed = on_closed  # the hub's: the stream leaves its rooms
        # A list, not a deque: it is emptied whole, never popped from the left, and an
        # empty deque costs ~760 bytes per idle stream where an empty list costs 56.
        self._queue: list[tuple[bytes, str | None]] = []
        self._queued_bytes = 0
        self._inflight = 0  # bytes handed to the sink and not yet written out
        self.write_started = 0.0  # when the write in flight last made progress (0.0: none)
        self._progress = -1  # the sink's progress marker when last looked at
        self._key_skip: tuple[int, int] | None = None
        self._sink: Sink | None = None
        self._writing = False
        self._dirty = False
        # Told when this stream has frames to write; the hub batches these per loop turn.
        self._on_ready = on_ready

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

    def push_message(self, msg: Message, json_data: str) -> None:
        """A message for a multi-room stream: framed with the cursor after it. Held while the
        stream catches up (``start_live`` sends on what is new); a position it has passed is
        a duplicate and dropped."""
        held = self._held
        if held is not None:
            held.append((msg, json_data))
            return
        cursor = self.cursor
        assert cursor is not None
        key = msg.key
        if key <= cursor.positions.get(msg.room, (0, -1)):
            return
        position = cursor.advance(msg.room, key)
        self.push(sse.message(position, json_data), position)

    def start_live(self, cursor: Encoder) -> None:
        """A multi-room stream has caught up to ``cursor``: live messages flow from here."""
        self.cursor = cursor
        self.last_event_id = cursor.cursor()
        held, self._held = self._held or [], None
        for msg, json_data in held:
            self.push_message(msg, json_data)

    def end_after(self, frame: bytes, reason: str) -> None:
        """Send ``frame`` (after what is queued), then close with ``reason``: a goodbye."""
        if self.closed or self._end_when_sent:
            return
        self._queue.append((frame, None))
        self._queued_bytes += len(frame)
        self._end_when_sent = reason
        self.write_pending()

    def skip_through(self, message_id: str) -> None:
        """Drop queued and future messages up to ``message_id``: the catch-up already sent them."""
        key = id_key(message_id)
        self._key_skip = key
        self._queue = [(f, mid) for f, mid in self._queue if mid is None or id_key(mid) > key]
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
            frame, mid = queue[0]
            queue.clear()
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
        if self.closed or self._writing or self._sink is None:
            return
        if not self._queue:
            if self._end_when_sent:
                self.close(self._end_when_sent)
            return
        chunk = self.take_pending()
        try:
            written = self._sink(chunk)
        except OSError as e:  # the client is gone (StreamClosedError is an OSError too)
            log.debug("stream %s: write failed: %s", self.id, e)
            self.close("client_gone")
            return
        if written is None and self._end_when_sent:
            self.close(self._end_when_sent)
        elif written is not None and not written.done():
            self._writing = True
            self._inflight = len(chunk)
            self.write_started = time.monotonic()
            written.add_done_callback(self._written)
        elif written is not None and (written.cancelled() or written.exception() is not None):
            self.close("client_gone")

    def stalled(self, now: float, timeout: float) -> bool:
        """Whether the socket has taken nothing of the write in flight for over ``timeout``.

        A sink with a ``progress()`` marker (bytes written so far) shows a slow reader
        that is still reading; without one, the write's age is all there is to go by.
        """
        if not self._writing:
            return False
        progress = getattr(self._sink, "progress", None)
        if progress is not None:
            marker = progress()
            if marker != self._progress:
                self._progress = marker
                self.write_started = now
                return False
        return now - self.write_started > timeout

    def _written(self, written: asyncio.Future[None]) -> None:
        self._writing = False
        self._inflight = 0
        self.write_started = 0.0
        if written.cancelled() or written.exception() is not None:
            self.close("client_gone")
        else:
            self.write_pending()

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
        # A close must complete whatever a callback does: it runs inside the hub's loops.
        if self._on_closed is not None:
            try:
                self._on_closed(self)
            except Exception:
                log.exception("stream %s: leaving its rooms failed", self.id)
        end, self.end, self.abort = self.end, None, None
        if end is not None:
            try:
                end()
            except Exception:
                log.exception("stream %s: ending its response failed", self.id)

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id, "room": ",".join(self.rooms) if self.rooms else self.room,
            "rooms": list(self.rooms) or [self.room], "nick": self.nick, "remote": self.remote,
            "user_agent": self.user_agent, "connected_at": self.connected_at,
            "last_event_id": self.last_event_id, "queue": len(self._queue),
            "buffered_bytes": self._queued_bytes + self._inflight,
        }
