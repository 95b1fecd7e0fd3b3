"""The SSE stream of one room: catch-up from history, then live, until either side goes.

After the head, the hub writes frames straight to the connection and the
handler's ``get`` returns: no task waits on a live stream. Its end comes when
the client goes (``on_connection_close`` closes the hub stream) or when the
hub drops it (eviction, admin, drain); either way ``Stream.close`` calls
back, and the handler finishes the response.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import Future

from tornado.httputil import HTTPHeaders
from tornado.iostream import IOStream, StreamClosedError

from rtchat import cursor as cursor_mod
from rtchat import sse
from rtchat.handlers.base import ApiHandler
from rtchat.messages import normalize_nick, valid_id
from rtchat.stream import Stream


class SocketSink:
    """Writes SSE bytes to a client's socket: straight away while nothing is buffered,
    through the IOStream (which waits for the socket) otherwise.

    Returns None when everything went out at once, else the IOStream's write
    future. Raises StreamClosedError once the client is gone.
    """

    __slots__ = ("chunked", "iostream", "socket")

    # What the IOStream holds for this client is counted by the stream (its bytes in flight);
    # the kernel's socket buffer is not.

    def __init__(self, iostream: IOStream, chunked: bool) -> None:
        self.iostream = iostream
        self.socket = iostream.socket
        self.chunked = chunked

    def __call__(self, data: bytes) -> Future[None] | None:
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        iostream = self.iostream
        if iostream.closed():
            raise StreamClosedError()
        if not iostream.writing():
            try:
                sent = self.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                iostream.close()
                raise StreamClosedError() from None
            if sent == len(data):
                return None
            data = data[sent:]
        return iostream.write(data)

    def progress(self) -> int:
        """Bytes the socket has taken so far (the stream's stall check watches it move)."""
        return self.iostream._total_write_done_index


# A catch-up is written in pieces of about this size, each waited for, so a resuming
# client costs the node one piece of buffer however much it missed.
CATCH_UP_PIECE = 64 * 1024


async def _written(flushed: Future[None], timeout: float) -> None:
    """Wait for a write to leave, for at most ``timeout``: no timer when it left at once
    (a fresh stream's head nearly always does)."""
    if not flushed.done():
        await asyncio.wait_for(flushed, timeout)
    else:
        flushed.result()  # a failed write raises here


class EventStreamHandler(ApiHandler):
    """``GET /rooms/<room>/events``: one room; ``GET /events?rooms=a,b``: several on one
    connection, whose ids are resume cursors for the whole set."""

    stream: Stream | None = None
    cors = True

    async def get(self, room: str | None = None) -> None:
        cfg = self.ctx.cfg
        hub = self.ctx.hub
        rooms: tuple[str, ...] = ()
        if room is None:
            rooms = self._rooms()
        else:
            self.check_room(room)
        self.take_read_token()
        last_id = (self.request.headers.get("Last-Event-ID", "").strip()
                   or self.get_query_argument("last_event_id", "", strip=False))
        if rooms:
            if last_id and not cursor_mod.looks_like(last_id):
                last_id = ""  # an id from a one-room stream: the set starts live
        elif last_id and not valid_id(last_id):
            raise self.reject(400, "bad_last_event_id",
                              "Last-Event-ID must be <ms>-<seq>, two whole numbers below 2^64")
        nick = self.get_query_argument("nick", "", strip=False)
        if nick.strip():
            normalized = normalize_nick(nick, cfg.limits.max_nick_chars)
            if normalized is None:
                raise self.reject(400, "bad_nick",
                                  f"nick must be 1-{cfg.limits.max_nick_chars} characters with a "
                                  "visible one, and no control, format or separator characters")
            nick = normalized
        else:
            nick = ""
        if hub.draining:
            return await self._elsewhere("draining", "this node is shutting down", 1)
        if hub.client_count >= cfg.limits.max_clients:
            return await self._elsewhere("too_many_clients", "this node is full", 5)
        speaker = None
        for each in rooms or (room,):
            speaker = self.authorize_room(each)  # 401, or 403 for any room it may not enter
        if speaker is not None:
            nick = speaker.name
        if hub.streams_from(self.client_address) >= cfg.limits.max_streams_per_address:
            raise self.reject(429, "too_many_streams",
                              f"at most {cfg.limits.max_streams_per_address} streams per address",
                              retry_after=5)

        who = {"user": speaker.user if speaker is not None else "",
               "expires": speaker.expires if speaker is not None else None}
        agent = self.request.headers.get("User-Agent", "")
        try:
            if rooms:
                stream = await hub.open_rooms(rooms, nick, self.client_address, agent, last_id,
                                              **who)
            else:
                stream = await hub.open(room, nick, self.client_address, agent, last_id, **who)
        except cursor_mod.BadCursor as e:
            raise self.reject(400, "bad_last_event_id", f"not a cursor of these rooms: {e}") \
                from None
        # (A BrokerUnavailable from opening is a 503, from ApiHandler.write_error: nothing
        # is written before the head.)
        try:
            self.stream = stream
            stream.abort = self._abort
            self._start_stream()
            if await self._send_head(stream):
                self._go_live(stream)
        except BaseException:
            stream.close(stream.close_reason or "client_gone")
            raise

    def _rooms(self) -> tuple[str, ...]:
        """``?rooms=a,b,c``: 1 to ``limits.max_rooms_per_stream`` valid, distinct room names."""
        limit = self.ctx.cfg.limits.max_rooms_per_stream
        names = [r for r in self.get_query_argument("rooms", "", strip=False).split(",") if r]
        rooms = tuple(dict.fromkeys(names))
        if not rooms:
            raise self.reject(400, "bad_rooms", "name the rooms: /events?rooms=a,b,c")
        if len(rooms) > limit:
            raise self.reject(400, "too_many_rooms", f"at most {limit} rooms on one stream")
        for room in rooms:
            self.check_room(room)
        if len({cursor_mod.tag(r) for r in rooms}) < len(rooms):
            raise self.reject(400, "bad_rooms", "two of these room names share a cursor tag; "
                                                "stream them apart")
        return rooms

    async def _elsewhere(self, code: str, message: str, retry_after: int) -> None:
        """This node cannot take the stream: let it go elsewhere, and strand no client.

        Through a trusted load balancer: 503, so it tries another node at once (the
        shipped nginx answers ``retry:`` itself when none can). Otherwise: 200 with a
        ``retry:`` and an immediate end, because a standard EventSource gives up for
        good on any non-200 answer, but reconnects after a stream that ends.
        """
        if self.ctx.trust.trusts(self.peer_address):
            raise self.reject(503, code, message, retry_after=retry_after)
        self.ctx.metrics.rejected.labels(reason=code).inc()
        for name, value in sse.HEADERS:
            self.set_header(name, value)
        self.write(sse.retry(sse.jittered_retry(max(self.ctx.cfg.sse.retry_ms, retry_after * 1000)))
                   + sse.comment(f"{code}: {message}; come back later"))
        try:
            await self.flush()  # a stream's shape (chunked), then its end
        except StreamClosedError:
            return
        self.finish()

    def _start_stream(self) -> None:
        for name, value in sse.HEADERS:
            self.set_header(name, value)
        self.write(sse.retry(sse.jittered_retry(self.ctx.cfg.sse.retry_ms)))
        self.write(sse.comment(f"rtchat {self.ctx.hub.node_id} {time.time():.3f}"))

    async def _send_head(self, stream: Stream) -> bool:
        """Send the head and the catch-up, piece by piece. A piece not taken within
        ``sse.write_timeout_seconds`` ends the stream (the client resumes from what it
        got). False when the stream ended meanwhile."""
        timeout = self.ctx.cfg.sse.write_timeout_seconds
        pending = 0
        try:
            for frame in stream.head:
                self.write(frame)
                pending += len(frame)
                if pending >= CATCH_UP_PIECE:
                    await _written(self.flush(), timeout)
                    pending = 0
                if stream.closed:
                    return False
            await _written(self.flush(), timeout)
        except (StreamClosedError, asyncio.TimeoutError):
            stream.close("client_gone")
            self._abort()
            return False
        stream.head = []
        return not stream.closed

    def _go_live(self, stream: Stream) -> None:
        """From here on the hub writes to the socket itself (one chunk per batch), and no
        task waits for the stream: ``get`` returns, and the stream's close ends the
        response (``_end``). A live stream costs its connection and its Stream only."""
        self._auto_finish = False
        stream.end = self._end
        chunked = self._headers.get("Transfer-Encoding", "").lower() == "chunked"
        self._headers = HTTPHeaders()  # sent: nothing reads them again (0.8 KiB per stream)
        stream.attach(SocketSink(self.request.connection.stream, chunked))  # type: ignore[attr-defined]

    def _end(self) -> None:
        """The stream closed: end the response (its last chunk, and the access log line)."""
        if not self._finished:
            self.finish()

    def _abort(self) -> None:
        """Drop the connection at once: the client is too slow to be sent a goodbye."""
        connection = self.request.connection
        iostream = getattr(connection, "stream", None)
        if iostream is not None:
            iostream.close()

    def on_connection_close(self) -> None:
        if self.stream is not None:
            self.stream.close("client_gone")
