"""The bench's two kinds of client, and the token they share.

Owns ``Subscriber`` (one SSE client of one room or several: what it
received, judged per room for loss, duplicates, order and latency), ``StreamProtocol`` (one HTTP GET of
an event stream on a raw asyncio transport), ``PublishConnection`` (one
keep-alive connection for POSTs), and the token every message's text starts
with, ``rtb:<run>:<room>:<seq>:<publish unix time>:``, which survives any
server's JSON or raw framing.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from array import array
from collections.abc import Callable, Sequence
from typing import cast

from rtchat.bench.wire import ChunkedDecoder, ProtocolError, SseEvent, SseParser, Target

# The token every bench message's text starts with: run id, room index,
# sequence number in that room (or "s" for a sync message) and publish time.
PAYLOAD_RE = re.compile(rb"rtb:([0-9a-f]{8}):(\d+):(\d+|s):(\d+\.\d+):")
_DIGITS = re.compile(rb"\d+")


def make_text(run_id: str, room: int, seq: int | str, body_bytes: int, now: float) -> str:
    """A message text: the bench token, padded with ``x`` to ``body_bytes`` characters."""
    head = f"rtb:{run_id}:{room}:{seq}:{now:.6f}:"
    return head + "x" * max(0, body_bytes - len(head))


def id_order_key(event_id: bytes) -> tuple[int, ...]:
    """A comparable form of a server's event id: its digit runs as integers.

    ``1700000000000-3`` (rtchat, Redis streams) and ``1700000000:3`` (nchan)
    both order correctly; an id with no digits gives ``()``.
    """
    ms, sep, seq = event_id.partition(b"-")
    if sep and ms.isdigit() and seq.isdigit():  # the common case, made cheap
        return int(ms), int(seq)
    return tuple(int(d) for d in _DIGITS.findall(event_id))



class Subscriber:
    """One SSE client, of one room or several on one stream, and what it received. Never blocks.

    ``seen`` holds, per room of the stream, a byte per sequence number of that
    room, so loss and duplicates are exact per (stream, room). Order is judged
    per room: by the server's event ids when ``order_by_ids`` (a one-room
    stream whose ids are the order the server stored messages in), else by our
    sequence numbers (a many-room stream's id is an opaque resume cursor).
    """

    __slots__ = ("connected", "delivered", "disconnects", "duplicates", "error", "foreign",
                 "index", "last_delivery", "last_event_id", "latencies", "max_key", "max_seq",
                 "misrouted", "order_by_ids", "other_events", "out_of_order", "protocol",
                 "reconnects", "resets", "retry_ms", "rooms", "run_id", "seen", "slots",
                 "target", "unsynced")

    def __init__(self, index: int, rooms: Sequence[int], target: Target,
                 room_messages: Sequence[int], run_id: bytes, latencies: array,
                 order_by_ids: bool = True) -> None:
        self.index = index
        self.rooms = tuple(rooms)
        self.slots = {room: slot for slot, room in enumerate(self.rooms)}
        self.target = target
        self.run_id = run_id
        self.latencies = latencies
        self.order_by_ids = order_by_ids
        self.seen = [bytearray(room_messages[room]) for room in self.rooms]
        self.connected = False  # ever got a 200 event stream: it counts as a subscriber
        self.unsynced = set(self.rooms)  # rooms whose sync message has not come yet
        self.protocol: StreamProtocol | None = None
        self.error: str | None = None
        self.last_event_id = b""
        # The last valid ``retry:`` any of its streams gave (ms), as EventSource keeps its
        # reconnection time across connections; None until a server sends one.
        self.retry_ms: int | None = None
        self.delivered = self.duplicates = self.out_of_order = 0
        self.misrouted = self.foreign = self.resets = self.other_events = 0
        self.disconnects = self.reconnects = 0
        self.max_key: tuple[int, ...] = ()
        self.max_seq = [-1] * len(self.rooms)
        self.last_delivery = 0.0

    @property
    def synced(self) -> bool:
        """A sync message of every room of the stream has arrived."""
        return not self.unsynced

    def on_event(self, event: SseEvent, now: float) -> None:
        m = PAYLOAD_RE.search(event.data)
        if m is None:
            if event.type == b"reset":
                self.resets += 1
            else:
                self.other_events += 1
            return
        run_id, room_field, seq_field, sent_at = m.groups()
        if run_id != self.run_id:
            self.foreign += 1
            return
        slot = self.slots.get(int(room_field))
        if seq_field == b"s":
            if slot is not None:
                self.unsynced.discard(self.rooms[slot])
            return
        seq = int(seq_field)
        if slot is None:
            self.misrouted += 1
            return
        seen = self.seen[slot]
        if seq >= len(seen):
            self.misrouted += 1
            return
        if seen[seq]:
            self.duplicates += 1
            return
        seen[seq] = 1
        self.delivered += 1
        self.last_delivery = now
        self.latencies.append((now - float(sent_at)) * 1000.0)
        key = id_order_key(event.id) if event.id and self.order_by_ids else ()
        if key:
            if key < self.max_key:
                self.out_of_order += 1
            else:
                self.max_key = key
        elif seq < self.max_seq[slot]:
            self.out_of_order += 1
        else:
            self.max_seq[slot] = seq


class StreamProtocol(asyncio.Protocol):
    """One HTTP/1.1 GET of an event stream: status, headers, then chunked SSE."""

    def __init__(self, sub: Subscriber, request: bytes, on_lost: Callable[[StreamProtocol], None],
                 on_activity: Callable[[], None]) -> None:
        self.sub = sub
        self.request = request
        self.on_lost = on_lost
        self.on_activity = on_activity
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.headers_done: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.closing = False  # we closed it on purpose
        self._head = b""
        self._chunked: ChunkedDecoder | None = None
        # A body with a Content-Length ends after it, though the connection may stay open
        # (a proxy's short "come back later" answer on a keep-alive connection).
        self._body_left: int | None = None
        self._sse = SseParser()
        # As EventSource does: the last event ID outlives a connection, so a stream that
        # resumes and then sees only id-less events resumes from the same place next time.
        self._sse.last_event_id = sub.last_event_id
        self._sse.retry_ms = sub.retry_ms

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.headers_done.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 65536:
                    self._fail("response headers too long")
                return
            head, data = self._head[:end], self._head[end + 4:]
            self._head = b""
            problem = self._check_head(head)
            if problem:
                self._fail(problem)
                return
            self.headers_done.set_result(None)
            if self._body_left == 0:
                self.transport.close()  # type: ignore[union-attr]
                return
            if not data:
                return
        try:
            if self._chunked is not None:
                data = self._chunked.feed(data)
                if self._chunked.done:
                    self.transport.close()  # type: ignore[union-attr]
            elif self._body_left is not None:
                data = data[:self._body_left]
                self._body_left -= len(data)
                if self._body_left == 0:
                    self.transport.close()  # type: ignore[union-attr]
            events = self._sse.feed(data)
        except ProtocolError as e:
            self.sub.error = f"protocol: {e}"
            self.transport.close()  # type: ignore[union-attr]
            return
        # A ``retry:`` comes in a stream's head or its "come back later" answer, usually with
        # no event: keep it whether or not anything was dispatched.
        self.sub.retry_ms = self._sse.retry_ms
        if events:
            now = time.time()
            on_event = self.sub.on_event
            for ev in events:
                on_event(ev, now)
            self.sub.last_event_id = self._sse.last_event_id
            self.on_activity()

    def _check_head(self, head: bytes) -> str | None:
        lines = head.split(b"\r\n")
        status = lines[0].split(None, 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/"):
            return "not an HTTP response"
        if status[1] != b"200":
            return f"http_{status[1].decode('latin-1')}"
        content_type = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = ChunkedDecoder()
            elif name == b"content-length" and value.strip().isdigit():
                self._body_left = int(value)
            elif name == b"content-type":
                content_type = value.strip().lower()
        if not content_type.startswith(b"text/event-stream"):
            return "not_event_stream"
        return None

    def _fail(self, reason: str) -> None:
        if not self.headers_done.done():
            self.headers_done.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.headers_done.done():
            self.headers_done.set_exception(ConnectionError("closed before response headers"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.on_lost(self)


# --------------------------------------------------------------------------
# Publishing: a keep-alive HTTP/1.1 connection, used by one worker at a time.
# --------------------------------------------------------------------------


class PublishConnection:
    """One keep-alive HTTP/1.1 connection for POSTs; reconnects when the server closes it."""

    def __init__(self, address: tuple[str, int, bool], timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> int:
        """Send one complete request; return the response status. Raises on transport errors.

        A request on a reused connection that dies before any response byte is
        retried once on a fresh one (the server closed an idle keep-alive).
        """
        reused = self._writer is not None
        try:
            return await asyncio.wait_for(self._exchange(request), self.timeout)
        except (OSError, asyncio.IncompleteReadError, ConnectionError) as e:
            await self.close()
            if reused and isinstance(e, asyncio.IncompleteReadError) and not e.partial:
                return await asyncio.wait_for(self._exchange(request), self.timeout)
            raise
        except BaseException:
            await self.close()
            raise

    async def _exchange(self, request: bytes) -> int:
        if self._writer is None:
            host, port, use_ssl = self.address
            self._reader, self._writer = await asyncio.open_connection(
                host, port, ssl=ssl.create_default_context() if use_ssl else None)
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status_parts = lines[0].split(None, 2)
        if len(status_parts) < 2 or not status_parts[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0][:60]!r}")
        status = int(status_parts[1])
        length: int | None = None
        chunked = close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection" and b"close" in value:
                close = True
        if lines[0].startswith(b"HTTP/1.0"):
            close = True
        if status in (204, 304) or 100 <= status < 200:
            pass
        elif chunked:
            while True:
                size = int((await reader.readline()).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                await reader.readexactly(size + 2)
        elif length is not None:
            await reader.readexactly(length)
        else:
            await reader.read()
            close = True
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ConnectionError):
                pass

