"""A small, strict SSE client over raw asyncio sockets, for tests.

It speaks HTTP/1.1 (chunked), parses events exactly as the SSE spec says,
and can behave like a slow client (``read=False`` with a tiny receive buffer).
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)


class SSEClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""  # the body when the answer was not a stream
        self.retry: int | None = None
        self.comments: list[str] = []
        self.last_event_id: str | None = None
        self._buf = b""
        self._chunked = False
        self._eof = False
        self.ended_cleanly = False
        self._pending = Event()
        self._data_lines: list[str] = []
        self._has_fields = False

    @classmethod
    async def open(cls, base_url: str, room: str, *, last_event_id: str | None = None,
                   query_last_event_id: str | None = None, nick: str | None = None,
                   headers: dict[str, str] | None = None, rcvbuf: int | None = None,
                   path: str | None = None) -> SSEClient:
        parts = urlsplit(base_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        limit = rcvbuf if rcvbuf is not None else 2**16
        reader, writer = await asyncio.open_connection(sock=sock, limit=max(limit, 4096))
        if rcvbuf is not None:
            writer.transport.pause_reading()
        client = cls(reader, writer)
        query = {}
        if query_last_event_id is not None:
            query["last_event_id"] = query_last_event_id
        if nick is not None:
            query["nick"] = nick
        target = path or f"/rooms/{room}/events"
        if query:
            target += "?" + urlencode(query)
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
        if last_event_id is not None:
            lines.append(f"Last-Event-ID: {last_event_id}")
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        if rcvbuf is None:
            await client._read_head()
        return client

    async def _read_head(self) -> None:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                self.headers[k.strip().lower()] = v.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        if "text/event-stream" not in self.headers.get("content-type", ""):
            if "content-length" in self.headers:
                self.body = await self.reader.readexactly(int(self.headers["content-length"]))
            self._eof = True

    async def _read_more(self) -> bool:
        """Append body bytes to the buffer; False at end of stream."""
        if self._eof:
            return False
        try:
            if self._chunked:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.strip().split(b";")[0], 16)
                if size == 0:
                    self._eof = True
                    self.ended_cleanly = True  # the last chunk: the server finished the response
                    return False
                data = await self.reader.readexactly(size + 2)
                self._buf += data[:-2]
            else:
                data = await self.reader.read(65536)
                if not data:
                    self._eof = True
                    return False
                self._buf += data
        except (asyncio.IncompleteReadError, ConnectionError):
            self._eof = True
            return False
        return True

    async def next_event(self, timeout: float = 10.0) -> Event | None:
        """The next dispatched event (comments attached to it); None at end of stream."""
        return await asyncio.wait_for(self._next_event(), timeout)

    async def _next_event(self) -> Event | None:
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                line = raw.decode("utf-8").rstrip("\r")
                event = self._feed_line(line)
                if event is not None:
                    return event
            if not await self._read_more():
                return None

    def _feed_line(self, line: str) -> Event | None:
        ev = self._pending
        if line == "":
            if not self._has_fields:
                return None
            had_data = bool(self._data_lines)
            ev.data = "\n".join(self._data_lines)
            self._pending, self._data_lines, self._has_fields = Event(), [], False
            if ev.id is not None:
                self.last_event_id = ev.id
            if not had_data:
                return None  # a block without data dispatches nothing (e.g. a bare retry:)
            return ev
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        self._has_fields = True
        if name == "data":
            self._data_lines.append(value)
        elif name == "event":
            ev.event = value
        elif name == "id":
            ev.id = value
        elif name == "retry":
            ev.retry = self.retry = int(value)
        return None

    async def messages(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The next ``n`` chat messages (other events skipped)."""
        out: list[dict[str, Any]] = []

        async def collect() -> None:
            while len(out) < n:
                ev = await self._next_event()
                if ev is None:
                    raise AssertionError(f"stream ended after {len(out)} of {n} messages")
                if ev.event == "message":
                    out.append(ev.json())

        await asyncio.wait_for(collect(), timeout)
        return out

    async def until_closed(self, timeout: float = 10.0) -> list[Event]:
        """Every event until the server ends the stream."""
        events: list[Event] = []

        async def collect() -> None:
            while (ev := await self._next_event()) is not None:
                events.append(ev)

        await asyncio.wait_for(collect(), timeout)
        return events

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    async def aclose(self) -> None:
        self.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
