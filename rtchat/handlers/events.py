"""The SSE stream of one room: catch-up from history, then live, until either side goes.

Every await here is woken when the client goes (``on_connection_close``
closes the hub stream) or when the hub drops it (eviction, admin, drain).
"""

from __future__ import annotations

import time

from tornado.iostream import StreamClosedError

from rtchat import sse
from rtchat.broker.base import BrokerUnavailable
from rtchat.handlers.base import ApiHandler
from rtchat.hub import Stream
from rtchat.messages import valid_id, valid_room


class EventStreamHandler(ApiHandler):
    stream: Stream | None = None

    async def get(self, room: str) -> None:
        cfg = self.ctx.cfg
        hub = self.ctx.hub
        if not valid_room(room):
            raise self.reject(400, "bad_room", "room names are 1-64 of A-Z a-z 0-9 _ -")
        last_id = (self.request.headers.get("Last-Event-ID")
                   or self.get_query_argument("last_event_id", "")).strip()
        if last_id and not valid_id(last_id):
            raise self.reject(400, "bad_last_event_id", "Last-Event-ID must look like <ms>-<seq>")
        nick = self.get_query_argument("nick", "").strip()
        if len(nick) > cfg.limits.max_nick_chars or any(ord(c) < 32 for c in nick):
            raise self.reject(400, "bad_nick",
                              f"nick must be at most {cfg.limits.max_nick_chars} printable characters")
        if hub.draining:
            raise self.reject(503, "draining", "this node is shutting down", retry_after=1)
        if hub.client_count >= cfg.limits.max_clients:
            raise self.reject(503, "too_many_clients", "this node is full", retry_after=5)

        try:
            async with hub.connect(room, nick, self.client_address,
                                   self.request.headers.get("User-Agent", "")) as stream:
                self.stream = stream
                stream.abort = self._abort
                head = await self._catch_up(stream, room, last_id)
                self._start_stream(head)
                await self._pump(stream)
        except BrokerUnavailable as e:
            if self._headers_written:
                return  # the stream already started; the client reconnects and resumes
            raise self.reject(503, "broker_unavailable", e.reason, retry_after=e.retry_after) from None

    async def _catch_up(self, stream: Stream, room: str, last_id: str) -> bytes:
        """The frames a resuming client missed, with ``reset`` first if history has a gap."""
        if not last_id:
            return b""
        replay = await self.ctx.hub.broker.read_since(room, last_id)
        parts = []
        if replay.truncated:
            parts.append(sse.json_event(
                "reset", {"reason": "history_truncated", "oldest": replay.oldest}))
        for msg in replay.messages:
            parts.append(sse.message(msg.id, msg.public_json()))
        newest = replay.messages[-1].id if replay.messages else last_id
        stream.skip_through(newest)
        stream.last_event_id = newest
        return b"".join(parts)

    def _start_stream(self, head: bytes) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self.write(sse.retry(sse.jittered_retry(self.ctx.cfg.sse.retry_ms)))
        self.write(sse.comment(f"rtchat {self.ctx.hub.node_id} {time.time():.3f}"))
        if head:
            self.write(head)

    async def _pump(self, stream: Stream) -> None:
        try:
            await self.flush()
            while True:
                batch = await stream.next_batch()
                if batch is None:
                    return
                self.write(batch)
                await self.flush()
        except StreamClosedError:
            stream.close("client_gone")

    def _abort(self) -> None:
        """Drop the connection at once: the client is too slow to be sent a goodbye."""
        connection = self.request.connection
        iostream = getattr(connection, "stream", None)
        if iostream is not None:
            iostream.close()

    def on_connection_close(self) -> None:
        if self.stream is not None:
            self.stream.close("client_gone")
