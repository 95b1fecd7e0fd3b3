"""The load generator behind ``rtchat bench``: N SSE streams, M paced POSTs, one JSON report.

Owns: opening many event streams with a lean hand-written HTTP/1.1 client
(one socket per stream, incremental chunked and SSE parsers), publishing at a
fixed rate over a small pool of keep-alive connections, and measuring what
every stream received: loss, duplicates, order and publish-to-delivery
latency per stream and room.

It must not know rtchat's internals: it speaks HTTP/1.1 and SSE only, so
``--sub-url``/``--pub-url`` point it at any SSE server (nchan, flask-sse) for
side-by-side numbers. Each message's text carries a token
``rtb:<run>:<room>:<seq>:<publish unix time>:`` that survives any JSON or raw
framing, so no server-specific parsing is needed.

Only the JSON report goes to stdout; progress goes to stderr. Exit 0 on a
completed run (losses are reported, not fatal), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import secrets
import ssl
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

DEFAULT_SUB_URL = "{url}/rooms/{room}/events"
DEFAULT_PUB_URL = "{url}/rooms/{room}/messages"

# The token every bench message's text starts with: run id, room index,
# sequence number in that room (or "s" for a sync message) and publish time.
PAYLOAD_RE = re.compile(rb"rtb:([0-9a-f]{8}):(\d+):(\d+|s):(\d+\.\d+):")
_DIGITS = re.compile(rb"\d+")
# File descriptors kept free for the publisher pool, stdio and the loop itself.
_SPARE_FDS = 64


class UsageError(Exception):
    """A bad command line; reported on stderr with exit status 2."""


class ProtocolError(Exception):
    """The peer sent something that is not the HTTP/SSE we understand."""


# --------------------------------------------------------------------------
# Pure parts: percentiles, chunked transfer coding, the SSE line protocol.
# --------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ascending values; None if empty."""
    n = len(sorted_values)
    if n == 0:
        return None
    if p <= 0:
        return sorted_values[0]
    rank = -(-p * n // 100)  # ceil(p/100 * n) without float drift for whole p
    return sorted_values[min(n, max(1, int(rank))) - 1]


def latency_summary(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max of ``values`` (any order), rounded to microseconds."""
    ordered = sorted(values)

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {"p50": r(percentile(ordered, 50)), "p90": r(percentile(ordered, 90)),
            "p99": r(percentile(ordered, 99)), "max": r(ordered[-1] if ordered else None)}


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


# --------------------------------------------------------------------------
# Targets and options.
# --------------------------------------------------------------------------


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


def fill(template: str, url: str, room: str) -> str:
    return template.replace("{url}", url.rstrip("/")).replace("{room}", room)


@dataclass(frozen=True)
class Options:
    urls: tuple[str, ...]
    clients: int
    messages: int
    rate: float
    rooms: int
    sub_url: str
    pub_url: str
    pub_format: str
    body_bytes: int
    connect_timeout: float
    connect_concurrency: int
    settle_seconds: float
    sync_timeout: float
    publishers: int
    request_timeout: float
    hold_seconds: float
    max_send_seconds: float
    reconnect: bool
    reconnect_delay: float
    room_prefix: str
    quiet: bool


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser(prog: str = "rtchat bench") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Open N SSE clients, post M messages at R/s, print one JSON report.",
        epilog="Against another server: --sub-url '{url}/sub/{room}' --pub-url '{url}/pub/{room}' "
               "--pub-format raw (nchan). Only the JSON report goes to stdout.",
    )
    p.add_argument("--url", action="append", default=[], metavar="URL",
                   help="server base URL; repeat to spread clients round-robin over several")
    p.add_argument("--clients", type=int, default=10, metavar="N", help="SSE streams (default 10)")
    p.add_argument("--messages", type=int, default=100, metavar="M",
                   help="messages in total, across rooms (default 100)")
    p.add_argument("--rate", type=float, default=50.0, metavar="R",
                   help="messages per second; 0 = as fast as the publishers go (default 50)")
    p.add_argument("--rooms", type=int, default=1, metavar="K", help="rooms (default 1)")
    p.add_argument("--sub-url", default=DEFAULT_SUB_URL, metavar="TEMPLATE",
                   help="stream URL template with {url} and {room} "
                        f"(default {DEFAULT_SUB_URL})")
    p.add_argument("--pub-url", default=DEFAULT_PUB_URL, metavar="TEMPLATE",
                   help=f"publish URL template (default {DEFAULT_PUB_URL})")
    p.add_argument("--pub-format", choices=("json", "form", "raw"), default="json",
                   help="POST body: JSON {nick,text}, form-encoded, or the bare text "
                        "(default json)")
    p.add_argument("--body-bytes", type=int, default=100, metavar="B",
                   help="message text size in bytes (default 100)")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="per stream: connect and response headers (default 10)")
    p.add_argument("--connect-concurrency", type=int, default=100, metavar="C",
                   help="streams being opened at once (default 100)")
    p.add_argument("--settle-seconds", type=float, default=5.0, metavar="S",
                   help="after the last send, wait at most this long for stragglers (default 5)")
    p.add_argument("--sync-timeout", type=float, default=10.0, metavar="S",
                   help="before measuring, publish a sync message per room until every stream "
                        "has one, for at most S seconds; 0 skips it (default 10)")
    p.add_argument("--publishers", type=int, default=8, metavar="P",
                   help="keep-alive publish connections (default 8)")
    p.add_argument("--request-timeout", type=float, default=10.0, metavar="S",
                   help="per publish request (default 10)")
    p.add_argument("--hold-seconds", type=float, default=0.0, metavar="S",
                   help="keep the streams open and idle this long before publishing (default 0)")
    p.add_argument("--max-send-seconds", type=float, default=0.0, metavar="S",
                   help="stop starting new sends S seconds after the first; the rest are "
                        "reported as unsent (default 0: no limit)")
    p.add_argument("--reconnect", action="store_true",
                   help="reopen a stream the server closed, with Last-Event-ID, "
                        "as EventSource does")
    p.add_argument("--reconnect-delay", type=float, default=0.1, metavar="S",
                   help="delay before a reconnect (default 0.1)")
    p.add_argument("--room-prefix", default=None, metavar="P",
                   help="room names are P0, P1, ... (default bench-<random run id>-)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def parse_args(argv: Sequence[str]) -> Options:
    ns = build_parser().parse_args(list(argv))
    checks = [
        (ns.clients >= 0, "--clients must be 0 or more"),
        (ns.messages >= 0, "--messages must be 0 or more"),
        (ns.rate >= 0, "--rate must be 0 (unpaced) or more"),
        (ns.rooms >= 1, "--rooms must be at least 1"),
        (ns.body_bytes >= 0, "--body-bytes must be 0 or more"),
        (ns.connect_timeout > 0, "--connect-timeout must be greater than 0"),
        (ns.connect_concurrency >= 1, "--connect-concurrency must be at least 1"),
        (ns.settle_seconds >= 0, "--settle-seconds must be 0 or more"),
        (ns.sync_timeout >= 0, "--sync-timeout must be 0 or more"),
        (ns.publishers >= 1, "--publishers must be at least 1"),
        (ns.request_timeout > 0, "--request-timeout must be greater than 0"),
        (ns.hold_seconds >= 0, "--hold-seconds must be 0 or more"),
        (ns.max_send_seconds >= 0, "--max-send-seconds must be 0 or more"),
        (ns.reconnect_delay >= 0, "--reconnect-delay must be 0 or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    for name, template in (("--sub-url", ns.sub_url), ("--pub-url", ns.pub_url)):
        if "{url}" in template and not ns.url:
            raise UsageError(f"--url is required: {name} {template!r} uses {{url}}")
    if ns.room_prefix is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", ns.room_prefix):
        raise UsageError("--room-prefix must be 1-40 characters of letters, digits, '_' and '-'")
    urls = tuple(ns.url) or ("",)
    for url in ns.url:
        parse_target(url)
    # Every template must give a valid URL for every base URL.
    for url in urls:
        parse_target(fill(ns.sub_url, url, "room"))
        parse_target(fill(ns.pub_url, url, "room"))
    return Options(
        urls=urls, clients=ns.clients, messages=ns.messages, rate=ns.rate, rooms=ns.rooms,
        sub_url=ns.sub_url, pub_url=ns.pub_url, pub_format=ns.pub_format,
        body_bytes=ns.body_bytes, connect_timeout=ns.connect_timeout,
        connect_concurrency=ns.connect_concurrency, settle_seconds=ns.settle_seconds,
        sync_timeout=ns.sync_timeout, publishers=ns.publishers,
        request_timeout=ns.request_timeout, hold_seconds=ns.hold_seconds,
        max_send_seconds=ns.max_send_seconds,
        reconnect=ns.reconnect, reconnect_delay=ns.reconnect_delay,
        room_prefix=ns.room_prefix or "", quiet=ns.quiet,
    )


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE as far as allowed; ``UsageError`` if ``needed`` won't fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and needed > soft:
        raise UsageError(f"{needed} file descriptors are needed but the limit is {soft} "
                         "(raise it with ulimit -n, or use fewer --clients)")
    return soft


# --------------------------------------------------------------------------
# Subscribers: one per SSE client; a _StreamProtocol per connection of it.
# --------------------------------------------------------------------------


class Subscriber:
    """One SSE client of one room and what it received. Never blocks.

    ``seen`` holds a byte per sequence number of the room, so loss and
    duplicates are exact; order is judged by the server's event ids when the
    stream carries them (the order the server stored messages in), by our
    sequence numbers otherwise.
    """

    __slots__ = ("connected", "delivered", "disconnects", "duplicates", "error", "foreign",
                 "index", "last_delivery", "last_event_id", "latencies", "max_key", "max_seq",
                 "misrouted", "other_events", "out_of_order", "protocol", "reconnects", "resets",
                 "room", "run_id", "seen", "synced", "target")

    def __init__(self, index: int, room: int, target: Target, room_messages: int,
                 run_id: bytes, latencies: array) -> None:
        self.index = index
        self.room = room
        self.target = target
        self.run_id = run_id
        self.latencies = latencies
        self.seen = bytearray(room_messages)
        self.connected = False  # ever got a 200 event stream: it counts as a subscriber
        self.synced = False
        self.protocol: _StreamProtocol | None = None
        self.error: str | None = None
        self.last_event_id = b""
        self.delivered = self.duplicates = self.out_of_order = 0
        self.misrouted = self.foreign = self.resets = self.other_events = 0
        self.disconnects = self.reconnects = 0
        self.max_key: tuple[int, ...] = ()
        self.max_seq = -1
        self.last_delivery = 0.0

    def on_event(self, event: SseEvent, now: float) -> None:
        m = PAYLOAD_RE.search(event.data)
        if m is None:
            if event.type == b"reset":
                self.resets += 1
            else:
                self.other_events += 1
            return
        run_id, room, seq_field, sent_at = m.groups()
        if run_id != self.run_id:
            self.foreign += 1
            return
        if seq_field == b"s":
            self.synced = True
            return
        seq = int(seq_field)
        if int(room) != self.room or seq >= len(self.seen):
            self.misrouted += 1
            return
        if self.seen[seq]:
            self.duplicates += 1
            return
        self.seen[seq] = 1
        self.delivered += 1
        self.last_delivery = now
        self.latencies.append((now - float(sent_at)) * 1000.0)
        key = id_order_key(event.id) if event.id else ()
        if key:
            if key < self.max_key:
                self.out_of_order += 1
            else:
                self.max_key = key
        elif seq < self.max_seq:
            self.out_of_order += 1
        else:
            self.max_seq = seq


class _StreamProtocol(asyncio.Protocol):
    """One HTTP/1.1 GET of an event stream: status, headers, then chunked SSE."""

    def __init__(self, sub: Subscriber, request: bytes, on_lost: Callable[[_StreamProtocol], None],
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
        self._sse = SseParser()

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
            if not data:
                return
        try:
            if self._chunked is not None:
                data = self._chunked.feed(data)
                if self._chunked.done:
                    self.transport.close()  # type: ignore[union-attr]
            events = self._sse.feed(data)
        except ProtocolError as e:
            self.sub.error = f"protocol: {e}"
            self.transport.close()  # type: ignore[union-attr]
            return
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


def build_post(target: Target, body_format: str, text: str) -> bytes:
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
            "Accept: application/json\r\nUser-Agent: rtchat-bench\r\n\r\n")
    return head.encode("latin-1") + body


def build_get(target: Target, last_event_id: bytes = b"") -> bytes:
    head = (f"GET {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: rtchat-bench\r\n")
    extra = b"Last-Event-ID: " + last_event_id + b"\r\n" if last_event_id else b""
    return head.encode("latin-1") + extra + b"\r\n"


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


class Bench:
    """One benchmark run; ``await run()`` returns the report dict."""

    def __init__(self, opts: Options, log: Callable[[str], None]) -> None:
        self.opts = opts
        self.log = log
        self.run_id = secrets.token_hex(4)
        prefix = opts.room_prefix or f"bench-{self.run_id}-"
        self.rooms = [f"{prefix}{k}" for k in range(opts.rooms)]
        # Messages j = 0..M-1 go to room j % K as that room's sequence number j // K.
        self.room_messages = [len(range(k, opts.messages, opts.rooms)) for k in range(opts.rooms)]
        self.acked = [bytearray(n) for n in self.room_messages]
        self.latencies = array("d")
        self.publish_ms = array("d")
        self.statuses: Counter[str] = Counter()
        self.sent = 0
        self.subs: list[Subscriber] = []
        self.open_streams: set[_StreamProtocol] = set()
        self.connect_errors: Counter[str] = Counter()
        self.stopping = False
        self.reconnect_tasks: set[asyncio.Task[None]] = set()
        self.last_send_done = 0.0
        self.first_send_wall = 0.0
        self.activity = asyncio.Event()  # set whenever a stream receives events or closes
        self._goal: list[int] = []
        self._settle_cursor = 0
        self._ssl_context: ssl.SSLContext | None = None
        self.send_cpu_percent = 0.0  # the bench's CPU while sending and settling

    # -- streams ----------------------------------------------------------

    def _make_subscribers(self) -> None:
        n_urls = len(self.opts.urls)
        run = self.run_id.encode()
        for i in range(self.opts.clients):
            room = i % self.opts.rooms
            url = self.opts.urls[(i // self.opts.rooms) % n_urls]
            target = parse_target(fill(self.opts.sub_url, url, self.rooms[room]))
            self.subs.append(Subscriber(i, room, target, self.room_messages[room], run,
                                        self.latencies))

    async def _open(self, sub: Subscriber, timeout: float) -> str | None:
        """Open one stream for ``sub``; returns None or the error kind."""
        loop = asyncio.get_running_loop()
        host, port, use_ssl = sub.target.address
        proto = _StreamProtocol(sub, build_get(sub.target, sub.last_event_id), self._on_lost,
                                self.activity.set)
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(loop.create_connection(
                lambda: proto, host, port, ssl=self._ssl() if use_ssl else None), timeout)
            self.open_streams.add(proto)
            await asyncio.wait_for(proto.headers_done, max(0.001, deadline - loop.time()))
        except (TimeoutError, asyncio.TimeoutError):
            self._drop(proto)
            return "timeout"
        except ConnectionError as e:
            self._drop(proto)
            return str(e) if str(e).startswith(("http_", "not_")) else type(e).__name__
        except OSError as e:
            self._drop(proto)
            return type(e).__name__
        sub.protocol = proto
        sub.connected = True
        if proto.closed.done():  # it ended between its headers and now: count that drop
            self._on_lost(proto)
        return None

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _drop(self, proto: _StreamProtocol) -> None:
        """Abandon a stream that failed to open; its future must not log an unretrieved error."""
        proto.closing = True
        if proto.transport is not None:
            proto.transport.close()
        if not proto.headers_done.done():
            proto.headers_done.cancel()

    def _on_lost(self, proto: _StreamProtocol) -> None:
        self.open_streams.discard(proto)
        self.activity.set()
        sub = proto.sub
        if proto.closing or self.stopping or sub.protocol is not proto:
            return
        sub.protocol = None
        sub.disconnects += 1
        if self.opts.reconnect:
            task = asyncio.get_running_loop().create_task(self._reconnect(sub))
            self.reconnect_tasks.add(task)
            task.add_done_callback(self.reconnect_tasks.discard)

    async def _reconnect(self, sub: Subscriber) -> None:
        while not self.stopping:
            await asyncio.sleep(self.opts.reconnect_delay)
            if self.stopping:
                return
            if await self._open(sub, self.opts.connect_timeout) is None:
                sub.reconnects += 1
                return

    async def _connect_all(self) -> float:
        self._make_subscribers()
        gate = asyncio.Semaphore(self.opts.connect_concurrency)
        done = 0
        last_log = time.monotonic()

        async def one(sub: Subscriber) -> None:
            nonlocal done, last_log
            async with gate:
                error = await self._open(sub, self.opts.connect_timeout)
            if error is not None:
                sub.error = error
                self.connect_errors[error] += 1
            done += 1
            if time.monotonic() - last_log > 2:
                last_log = time.monotonic()
                self.log(f"{done}/{len(self.subs)} streams opened")

        t0 = time.monotonic()
        if self.subs:
            self.log(f"opening {len(self.subs)} streams over {len(self.opts.urls)} URL(s), "
                     f"{self.opts.rooms} room(s)")
            await asyncio.gather(*(one(s) for s in self.subs))
        elapsed = time.monotonic() - t0
        connected = sum(s.connected for s in self.subs)
        errors = ", ".join(f"{k}: {v}" for k, v in self.connect_errors.most_common(5))
        self.log(f"{connected}/{len(self.subs)} streams open in {elapsed:.2f}s"
                 + (f" (errors: {errors})" if errors else ""))
        return elapsed

    # -- publishing ---------------------------------------------------------

    def _pub_targets(self) -> list[list[Target]]:
        return [[parse_target(fill(self.opts.pub_url, url, room)) for room in self.rooms]
                for url in self.opts.urls]

    async def _sync(self, pool: list[PublishConnection], targets: list[list[Target]]) -> bool:
        """Publish a sync message per room until every open stream has one (or time is up)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.sync_timeout
        attempt = 0
        while True:
            waiting = {s.room for s in self.subs if s.protocol is not None and not s.synced}
            if not waiting:
                return True
            if loop.time() >= deadline:
                return False
            attempt += 1
            rooms = sorted(waiting)
            for i in range(0, len(rooms), len(pool)):
                batch = rooms[i:i + len(pool)]
                await asyncio.gather(*(self._send_sync(pool[j], targets[j % len(targets)][room],
                                                       room) for j, room in enumerate(batch)))
            wake = min(deadline, loop.time() + min(1.0, 0.1 * attempt))
            while loop.time() < wake:
                if all(s.synced for s in self.subs if s.protocol is not None and s.room in waiting):
                    break
                await asyncio.sleep(0.02)

    async def _send_sync(self, conn: PublishConnection, target: Target, room: int) -> None:
        text = make_text(self.run_id, room, "s", self.opts.body_bytes, time.time())
        try:
            await conn.post(build_post(target, self.opts.pub_format, text))
        except Exception:  # a failed sync send is simply sent again on the next round
            pass

    async def _publish_all(self, pool: list[PublishConnection],
                           targets: list[list[Target]]) -> tuple[float, float]:
        """Send every message on schedule; returns (first send start, last ack) loop times."""
        loop = asyncio.get_running_loop()
        opts = self.opts
        t0 = loop.time()
        cutoff = t0 + opts.max_send_seconds if opts.max_send_seconds > 0 else None
        self.first_send_wall = time.time()
        next_index = 0

        async def worker(w: int) -> None:
            nonlocal next_index
            conn = pool[w]
            row = targets[w % len(targets)]
            while next_index < opts.messages:
                if cutoff is not None and loop.time() >= cutoff:
                    return
                j = next_index
                next_index += 1
                if opts.rate > 0:
                    delay = t0 + j / opts.rate - loop.time()
                    if cutoff is not None:
                        delay = min(delay, cutoff - loop.time())
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if cutoff is not None and loop.time() >= cutoff:
                        return
                room, seq = j % opts.rooms, j // opts.rooms
                started = time.time()
                request = build_post(row[room], opts.pub_format,
                                     make_text(self.run_id, room, seq, opts.body_bytes, started))
                self.sent += 1
                try:
                    status = await conn.post(request)
                except (TimeoutError, asyncio.TimeoutError):
                    self.statuses["timeout"] += 1
                    continue
                except Exception as e:  # any failed send is counted by kind, never fatal
                    self.statuses[type(e).__name__] += 1
                    continue
                self.publish_ms.append((time.time() - started) * 1000.0)
                self.statuses[str(status)] += 1
                if 200 <= status < 300:
                    self.acked[room][seq] = 1
                self.last_send_done = loop.time()

        workers = min(opts.publishers, max(1, opts.messages))
        if opts.messages:
            rate = f"{opts.rate:g}/s" if opts.rate else "full speed"
            self.log(f"sending {opts.messages} messages at {rate} over {workers} connection(s)")
        await asyncio.gather(*(worker(w) for w in range(workers)))
        return t0, loop.time()

    async def _settle(self) -> None:
        """Wait until every stream has every acknowledged message of its room, or the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.settle_seconds
        self._goal = [a.count(1) for a in self.acked]
        self._settle_cursor = 0
        while not self._settled():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self.activity.clear()
            try:
                await asyncio.wait_for(self.activity.wait(), remaining)
            except (TimeoutError, asyncio.TimeoutError):
                return

    def _settled(self) -> bool:
        """Amortised O(1): a stream once complete stays complete (deliveries only grow)."""
        subs, goal, reconnect = self.subs, self._goal, self.opts.reconnect
        while self._settle_cursor < len(subs):
            s = subs[self._settle_cursor]
            if (s.connected and s.delivered < goal[s.room]
                    and (s.protocol is not None or reconnect)):
                return False
            self._settle_cursor += 1
        return True

    async def _progress(self, total: int) -> None:
        while True:
            await asyncio.sleep(2)
            delivered = sum(s.delivered for s in self.subs)
            open_now = sum(s.protocol is not None for s in self.subs)
            self.log(f"sent {self.sent}/{total}, delivered {delivered}, {open_now} streams open")

    # -- the whole run ------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        wall0, cpu0 = time.monotonic(), os.times()
        loop = asyncio.get_running_loop()
        pool = [PublishConnection(parse_target(fill(opts.pub_url, opts.urls[w % len(opts.urls)],
                                                    self.rooms[0])).address, opts.request_timeout)
                for w in range(opts.publishers)]
        targets = self._pub_targets()
        progress: asyncio.Task[None] | None = None
        synced: bool | None = None
        sync_seconds = send_seconds = 0.0
        try:
            connect_seconds = await self._connect_all()
            if opts.sync_timeout > 0 and any(s.connected for s in self.subs):
                t = time.monotonic()
                synced = await self._sync(pool, targets)
                sync_seconds = time.monotonic() - t
                self.log(f"sync {'done' if synced else 'TIMED OUT'} in {sync_seconds:.2f}s")
            if opts.hold_seconds > 0:
                open_now = sum(s.protocol is not None for s in self.subs)
                self.log(f"holding {open_now} streams for {opts.hold_seconds:g}s")
                await asyncio.sleep(opts.hold_seconds)
            progress = loop.create_task(self._progress(opts.messages))
            send_wall0, send_cpu0 = time.monotonic(), os.times()
            first_send, last_ack = await self._publish_all(pool, targets)
            send_seconds = last_ack - first_send
            if opts.messages:
                self.log(f"sent {self.sent} in {send_seconds:.2f}s; settling")
            await self._settle()
            if opts.messages:
                self.log("done: settled")
            send_cpu1 = os.times()
            send_cpu = ((send_cpu1.user - send_cpu0.user) + (send_cpu1.system - send_cpu0.system))
            send_wall = time.monotonic() - send_wall0
            self.send_cpu_percent = round(100.0 * send_cpu / send_wall, 1) if send_wall else 0.0
        finally:
            if progress is not None:
                progress.cancel()
                try:
                    await progress
                except asyncio.CancelledError:
                    pass
            await self._shutdown(pool)
        cpu1 = os.times()
        wall = time.monotonic() - wall0
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return self._report(connect_seconds, sync_seconds, synced, send_seconds, wall, cpu)

    async def _shutdown(self, pool: list[PublishConnection]) -> None:
        self.stopping = True
        for task in list(self.reconnect_tasks):
            task.cancel()
        if self.reconnect_tasks:
            await asyncio.gather(*self.reconnect_tasks, return_exceptions=True)
        streams = list(self.open_streams)
        for proto in streams:
            proto.closing = True
            if proto.transport is not None:
                proto.transport.close()
        if streams:
            await asyncio.wait([p.closed for p in streams], timeout=10)
        await asyncio.gather(*(c.close() for c in pool), return_exceptions=True)

    def _report(self, connect_seconds: float, sync_seconds: float, synced: bool | None,
                send_seconds: float, wall: float, cpu: float) -> dict[str, Any]:
        acked_counts = [a.count(1) for a in self.acked]
        acked_ints = [int.from_bytes(a, "little") for a in self.acked]
        subscribers = [0] * len(self.rooms)
        delivered = lost = 0
        for s in self.subs:
            if not s.connected:
                continue
            subscribers[s.room] += 1
            delivered += s.delivered
            # seen and acked hold one 0/1 byte per message: AND them as big
            # integers and count bits = acked messages this client received.
            got = (int.from_bytes(s.seen, "little") & acked_ints[s.room]).bit_count()
            lost += acked_counts[s.room] - got
        expected = sum(a * n for a, n in zip(acked_counts, subscribers, strict=True))
        last_delivery = max((s.last_delivery for s in self.subs), default=0.0)
        delivery_span = last_delivery - self.first_send_wall
        connected = sum(subscribers)

        def total(attr: str) -> int:
            return sum(getattr(s, attr) for s in self.subs)

        acked = sum(acked_counts)
        return {
            "sent": self.sent,
            "unsent": self.opts.messages - self.sent,
            "acked": acked,
            "delivered": delivered,
            "expected": expected,
            "lost": lost,
            "duplicates": total("duplicates"),
            "out_of_order": total("out_of_order"),
            "latency_ms": latency_summary(self.latencies),
            "deliveries_per_second": round(delivered / delivery_span, 1)
            if delivered and delivery_span > 0 else 0.0,
            "connect_errors": sum(self.connect_errors.values()),
            "connect_error_kinds": dict(self.connect_errors),
            "connect_seconds": round(connect_seconds, 3),
            "cpu_seconds": round(cpu, 3),
            "cpu_percent": round(100.0 * cpu / wall, 1) if wall > 0 else 0.0,
            "send_cpu_percent": self.send_cpu_percent,
            "clients": self.opts.clients,
            "connected": connected,
            "rooms": len(self.rooms),
            "send_errors": self.sent - acked,
            "status_counts": dict(sorted(self.statuses.items())),
            "publish_ms": latency_summary(self.publish_ms),
            "publish_per_second": round(acked / send_seconds, 1) if send_seconds > 0 else 0.0,
            "send_seconds": round(send_seconds, 3),
            "sync_seconds": round(sync_seconds, 3),
            "synced": synced,
            "disconnects": total("disconnects"),
            "reconnects": total("reconnects"),
            "resets": total("resets"),
            "misrouted": total("misrouted"),
            "foreign": total("foreign"),
            "duration_seconds": round(wall, 3),
            "event_loop": _loop_name(),
            "run_id": self.run_id,
        }


def _loop_name() -> str:
    """``uvloop`` or ``asyncio``: which event loop runs this (call from inside it)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def main(argv: Sequence[str] | None = None) -> int:
    """``rtchat bench ARGS``: run one benchmark, print its JSON report; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(args)
        raise_fd_limit(opts.clients + opts.publishers + _SPARE_FDS)
    except UsageError as e:
        build_parser().print_usage(sys.stderr)
        print(f"rtchat bench: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    def log(line: str) -> None:
        if not opts.quiet:
            print(f"bench: {line}", file=sys.stderr, flush=True)

    async def go() -> dict[str, Any]:
        return await Bench(opts, log).run()

    try:
        try:
            import uvloop
        except ImportError:
            report = asyncio.run(go())
        else:
            report = uvloop.run(go())
    except KeyboardInterrupt:
        print("rtchat bench: interrupted", file=sys.stderr)
        return 130
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
