"""The wire: HTTP/1.1 and SSE as the bench speaks them, as pure functions and parsers.

Owns URL targets (``Target``, ``parse_target``, the ``{url}``/``{room}``/``{rooms}``
templates), the requests the bench sends (``build_get``, ``build_post``),
and the incremental decoders for what comes back: chunked transfer coding
and the ``text/event-stream`` line protocol. No sockets, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit


class UsageError(Exception):
    """A bad command line; reported on stderr with exit status 2."""


class ProtocolError(Exception):
    """The peer sent something that is not the HTTP/SSE we understand."""



class ChunkedDecoder:
    """Incremental decoder of HTTP/1.1 ``Transfer-Encoding: chunked``.

    ``feed`` takes whatever bytes arrived and returns the payload bytes they
    complete; partial chunk-size lines are kept for the next call. ``done``
    turns true after the last (zero-size) chunk and its trailer.
    """

    __slots__ = ("_buf", "_remaining", "_state", "done")

    _SIZE, _DATA, _CRLF, _TRAILER = range(4)

    def __init__(self) -> None:
        self._buf = b""
        self._remaining = 0
        self._state = self._SIZE
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if not self._buf and self._state == self._SIZE:
            # Fast path: the read is exactly one whole chunk (a server flushing
            # one event at a time), the usual case for a stream.
            eol = data.find(b"\r\n", 0, 10)
            if eol > 0:
                try:
                    size = int(data[:eol], 16)
                except ValueError:
                    size = 0
                end = eol + 2 + size
                if size and len(data) == end + 2 and data.endswith(b"\r\n"):
                    return data[eol + 2:end]
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos, n = 0, len(buf)
        while pos < n and not self.done:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._CRLF
            elif state == self._CRLF:
                if buf[pos:pos + 1] == b"\n":
                    pos += 1
                elif n - pos < 2:
                    break
                elif buf[pos:pos + 2] == b"\r\n":
                    pos += 2
                else:
                    raise ProtocolError("chunk not followed by CRLF")
                self._state = self._SIZE
            else:
                eol = buf.find(b"\n", pos)
                if eol < 0:
                    if n - pos > 1024:
                        raise ProtocolError("chunk-size line too long")
                    break
                line = buf[pos:eol].rstrip(b"\r")
                pos = eol + 1
                if state == self._TRAILER:
                    if not line:
                        self.done = True
                    continue
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {line[:40]!r}") from None
                if size == 0:
                    self._state = self._TRAILER
                else:
                    self._remaining = size
                    self._state = self._DATA
        self._buf = buf[pos:]
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event. ``id`` is the ``id:`` given in this event's block, or None."""

    type: bytes
    data: bytes
    id: bytes | None


class SseParser:
    """Incremental ``text/event-stream`` parser (the WHATWG line rules).

    Lines may end in LF, CR or CRLF, even split across reads; a leading BOM is
    dropped; comments (``:``...) are counted, not dispatched; ``data:`` lines
    of one block are joined with LF; a block with no data dispatches nothing.
    ``last_event_id`` is the stream's current id, as a client resumes with.
    """

    __slots__ = ("_buf", "_data", "_event", "_id", "_skip_lf", "_started", "comments",
                 "last_event_id", "retry_ms")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._event = b""
        self._id: bytes | None = None
        self._started = False
        self._skip_lf = False
        self.comments = 0
        self.last_event_id = b""
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buf = self._buf + chunk if self._buf else chunk
        if not self._started:
            if len(buf) < 3 and b"\xef\xbb\xbf".startswith(buf):
                self._buf = buf
                return []
            self._started = True
            if buf.startswith(b"\xef\xbb\xbf"):
                buf = buf[3:]
        if self._skip_lf:
            self._skip_lf = False
            if buf[:1] == b"\n":
                buf = buf[1:]
        if b"\r" in buf:
            # A CR ends its line at once; if it was the first half of a CRLF
            # split across reads, the LF that starts the next read is dropped.
            self._skip_lf = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        events: list[SseEvent] = []
        # The hot loop: state in locals, written back once at the end.
        data, event_type, event_id = self._data, self._event, self._id
        for line in lines:
            if not line:
                if data:
                    events.append(SseEvent(event_type or b"message", b"\n".join(data), event_id))
                    data = []
                event_type, event_id = b"", None
                continue
            if line[0] == 0x3A:  # ":"
                self.comments += 1
                continue
            field, sep, value = line.partition(b":")
            if sep and value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                event_type = value
            elif field == b"id":
                if b"\0" not in value:
                    self.last_event_id = event_id = value
            elif field == b"retry" and value.isdigit():
                self.retry_ms = int(value)
        self._data, self._event, self._id = data, event_type, event_id
        return events


@dataclass(frozen=True, slots=True)
class Target:
    """Where one HTTP request goes: connection address plus request path."""

    scheme: str
    host: str
    port: int
    path: str
    host_header: str

    @property
    def address(self) -> tuple[str, int, bool]:
        return self.host, self.port, self.scheme == "https"


def parse_target(url: str) -> Target:
    """Split an absolute http(s) URL; ``UsageError`` if it is not one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"not an http:// or https:// URL: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"bad port in URL: {url!r}") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host = parts.hostname
    default = 443 if parts.scheme == "https" else 80
    host_header = parts.netloc.rpartition("@")[2] if port != default else host
    if ":" in host and not host_header.startswith("["):  # a bare IPv6 literal
        host_header = f"[{host}]" + (f":{port}" if port != default else "")
    return Target(parts.scheme, host, port, path, host_header)


def fill(template: str, url: str, room: str, rooms: str | None = None) -> str:
    """A template with ``{url}``, ``{room}`` and ``{rooms}`` (the stream's rooms joined with
    commas; ``room`` alone when not given) filled in."""
    filled = template.replace("{url}", url.rstrip("/")).replace("{room}", room)
    return filled.replace("{rooms}", room if rooms is None else rooms)


def header_lines(headers: Sequence[str]) -> str:
    """``--header`` values as request lines (``Name: value``), checked for line breaks."""
    for h in headers:
        if "\r" in h or "\n" in h or ":" not in h:
            raise UsageError(f"--header {h!r}: give one 'Name: value'")
    return "".join(f"{h.strip()}\r\n" for h in headers)


def build_post(target: Target, body_format: str, text: str, headers: str = "") -> bytes:
    """A complete POST request carrying ``text`` in the chosen body format."""
    if body_format == "json":
        body = json.dumps({"nick": "bench", "text": text}, separators=(",", ":")).encode()
        content_type = "application/json"
    elif body_format == "form":
        body = urlencode({"nick": "bench", "text": text}).encode()
        content_type = "application/x-www-form-urlencoded"
    else:
        body = text.encode()
        content_type = "text/plain; charset=utf-8"
    head = (f"POST {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Accept: application/json\r\nUser-Agent: rtchat-bench\r\n{headers}\r\n")
    return head.encode("latin-1") + body


def build_get(target: Target, last_event_id: bytes = b"", headers: str = "") -> bytes:
    head = (f"GET {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: rtchat-bench\r\n"
            + headers)
    extra = b"Last-Event-ID: " + last_event_id + b"\r\n" if last_event_id else b""
    return head.encode("latin-1") + extra + b"\r\n"

