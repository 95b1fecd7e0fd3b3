"""The HTTP server and its door policy: time limits, per-address connection caps, fd exhaustion.

Tornado's ``HTTPServer`` does the HTTP; this subclass holds the door:
- a request head must arrive within ``http.header_timeout_seconds`` of the
  connection opening (of its first byte, on a keep-alive connection), a
  body within ``http.body_timeout_seconds``, else 408 and close; a
  keep-alive connection idle for ``http.idle_timeout_seconds`` is closed;
- a declared ``Content-Length`` over ``limits.max_body_bytes`` is answered
  413 before any of the body is read (a chunked body, once it passes the
  limit); a head over ``http.max_header_bytes`` gets 431 with a status line,
  not a silent drop;
- an answer the client does not read (no write progress for
  ``sse.write_timeout_seconds``) ends its connection;
- at most ``limits.max_connections_per_address`` connections per TCP peer
  (trusted proxies are exempt: they carry many clients);
- out of file descriptors, accepting pauses and backs off, one log line per
  interval, and ``/readyz`` says why, while open connections are served on.
These times are the sweeper's alone (one pass a second): tornado keeps no
timer per request.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import socket
import time
from collections import Counter
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, UnsatisfiableReadError

from rtchat.config import Config
from rtchat.proxies import ProxyTrust

log = logging.getLogger("rtchat.server")

SWEEP_INTERVAL = 0.25  # seconds between checks of connections waiting for a head or body
ACCEPT_BACKOFF = (0.05, 1.0)  # first and longest pause of accept when out of descriptors
FD_LOG_INTERVAL = 5.0  # at most one "out of file descriptors" line this often
_FD_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_LENGTH = re.compile(r"[0-9]{1,18}", re.ASCII)
STALL_CHECK_INTERVAL = 1.0  # seconds between looks at answers in flight
_ACCEPT_BATCH = 128


def raw_response(status: int, reason: str, code: str, message: str,
                 retry_after: int | None = None) -> bytes:
    """A whole ``Connection: close`` response with a JSON error body, for answers given
    before (or instead of) the application: the connection is closed right after."""
    body = json.dumps({"error": code, "message": message}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json; charset=utf-8",
            f"Content-Length: {len(body)}", "Connection: close", "X-Content-Type-Options: nosniff"]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _send(sock: socket.socket | None, data: bytes) -> None:
    """Best effort: one non-blocking send (these answers are small)."""
    if sock is None:
        return
    try:
        sock.send(data)
    except OSError:
        pass


class ServerState:
    """What the door has seen that makes the node not ready (read by ``/readyz``)."""

    def __init__(self) -> None:
        self.fd_exhausted_since: float | None = None

    def readiness(self) -> list[str]:
        if self.fd_exhausted_since is not None:
            return ["out of file descriptors: accepting is paused"]
        return []


class _Conn:
    """One client connection's place in the request cycle, for the sweeper."""

    __slots__ = ("first", "peer", "phase", "progress", "progress_at", "since", "stream")

    def __init__(self, stream: IOStream, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self.phase = "head"  # head | idle | body | busy
        self.since = time.monotonic()
        self.first = True
        self.progress = 0  # bytes the socket had taken at progress_at
        self.progress_at = self.since


class _ShortQueue(list):  # type: ignore[type-arg]
    """A deque's left end on a list, for queues that stay a few items long. An empty deque
    holds a 64-slot block (about 620 bytes), an empty list 56: an idle stream's
    connection has two such queues (a stream writes again only once its last write left)."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class _GuardedStream(IOStream):
    """An IOStream that answers 431 when the request head outgrows ``max_header_bytes``.

    Tornado closes such a connection silently; the client deserves a status line. Its
    write queues are short lists (``_ShortQueue``), not deques: 1.1 KiB less per stream.
    """

    conn: _Conn | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write_buffer._buffers = _ShortQueue()  # type: ignore[assignment]
        self._write_futures = _ShortQueue()  # type: ignore[assignment]

    def close(self, exc_info: Any = False) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else None
        if (isinstance(error, UnsatisfiableReadError) and not self.closed()
                and self.conn is not None and self.conn.phase in ("head", "idle")):
            _send(self.socket, raw_response(431, "Request Header Fields Too Large",
                                            "headers_too_large", "the request head is too large"))
        super().close(exc_info)
        self.conn = None  # no cycle with its _Conn: a closed connection is freed at once


class _Guard(httputil.HTTPMessageDelegate):
    """Sits in front of the application's delegate for one request: moves the connection
    through its phases and refuses an oversized declared body before it is read."""

    def __init__(self, server: GuardedHTTPServer, conn: _Conn,
                 request_conn: httputil.HTTPConnection, delegate: httputil.HTTPMessageDelegate) -> None:
        self.server = server
        self.conn = conn
        self.request_conn = request_conn
        self.delegate = delegate
        self.received = 0

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        conn = self.conn
        length = headers.get("Content-Length", "").strip()
        limit = self.server.cfg.limits.max_body_bytes
        valid = _LENGTH.fullmatch(length) is not None
        if length and (not valid or int(length) > limit):
            # Answer now: the client may be about to send megabytes, or nothing at all.
            stream = self.request_conn.detach()  # type: ignore[attr-defined]
            self.server.forget(conn)
            _send(stream.socket, self._too_large(limit) if valid else raw_response(
                400, "Bad Request", "bad_content_length", "Content-Length is not a number"))
            stream.close()
            return None
        if length not in ("", "0") or "chunked" in headers.get("Transfer-Encoding", "").lower():
            self.server.set_phase(conn, "body")
        else:
            self.server.set_phase(conn, "busy")
        return self.delegate.headers_received(start_line, headers)

    @staticmethod
    def _too_large(limit: int) -> bytes:
        return raw_response(413, "Payload Too Large", "body_too_large",
                            f"request body is larger than {limit} bytes")

    def data_received(self, chunk: bytes) -> Any:
        self.received += len(chunk)
        limit = self.server.cfg.limits.max_body_bytes
        if self.received > limit:  # a chunked body (a declared length was judged already)
            stream = self.conn.stream
            self.server.forget(self.conn)
            _send(stream.socket, self._too_large(limit))
            stream.close()  # tornado's next read finds it closed and ends the request quietly
            return None
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.server.set_phase(self.conn, "busy")
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()


class GuardedHTTPServer(HTTPServer):
    """``HTTPServer`` with the door policy of the module docstring. Plain HTTP only:
    TLS ends at the load balancer."""

    def initialize(self, app: Any, *, cfg: Config, state: ServerState, **kwargs: Any) -> None:  # type: ignore[override]
        http = cfg.http
        super().initialize(
            app,
            xheaders=False,  # the handlers judge forwarded headers themselves (rtchat.proxies)
            max_header_size=http.max_header_bytes,
            # The guard answers 413 at limits.max_body_bytes, declared or chunked; this
            # only keeps tornado from refusing a large chunk with a 400 first.
            max_body_size=1 << 40,
            **kwargs,
        )
        # No head or body timer per request from tornado (its gen.with_timeout cost a sixth
        # of a stream's connect, and a twentieth of a send): the sweeper below times heads,
        # bodies and idle connections in one pass, and answers 408 with a status line.
        self.conn_params.header_timeout = None
        self.cfg = cfg
        self.state = state
        self.trust = ProxyTrust.from_config(http.xheaders, http.trusted_proxies)
        self._per_peer: Counter[str] = Counter()
        self._waiting: dict[_Conn, None] = {}  # connections in the head, idle or body phase
        self._conns: dict[IOStream, _Conn] = {}
        self._sweeper: Any = None
        self._next_stall_check = 0.0
        self._fd_last_log = 0.0
        self._fd_paused = 0

    # -- accepting -------------------------------------------------------------

    def add_sockets(self, sockets: Any) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._accept_on(sock)
        if self._sweeper is None:
            self._sweeper = IOLoop.current().asyncio_loop.call_later(  # type: ignore[attr-defined]
                SWEEP_INTERVAL, self._sweep)

    def _accept_on(self, sock: socket.socket) -> Any:
        """Tornado's accept loop, minus its one flaw: out of descriptors it would spin,
        logging a traceback per attempt. Here it pauses and backs off instead."""
        loop = IOLoop.current()
        removed = [False]
        backoff = [ACCEPT_BACKOFF[0]]

        def resume() -> None:
            if not removed[0]:
                loop.add_handler(sock, accept, IOLoop.READ)

        def accept(fd: Any, events: int) -> None:
            for _ in range(_ACCEPT_BATCH):
                if removed[0]:
                    return
                try:
                    connection, address = sock.accept()
                except BlockingIOError:
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as e:
                    if e.errno not in _FD_ERRORS:
                        raise
                    loop.remove_handler(sock)
                    self._out_of_descriptors(e, backoff[0])
                    loop.call_later(backoff[0], resume)
                    backoff[0] = min(backoff[0] * 2, ACCEPT_BACKOFF[1])
                    return
                backoff[0] = ACCEPT_BACKOFF[0]
                if self.state.fd_exhausted_since is not None:
                    log.warning("file descriptors available again after %.1fs; accepting",
                                time.monotonic() - self.state.fd_exhausted_since)
                    self.state.fd_exhausted_since = None
                self._handle_connection(connection, address)

        def remove() -> None:
            removed[0] = True
            loop.remove_handler(sock)

        loop.add_handler(sock, accept, IOLoop.READ)
        return remove

    def _out_of_descriptors(self, e: OSError, pause: float) -> None:
        now = time.monotonic()
        if self.state.fd_exhausted_since is None:
            self.state.fd_exhausted_since = now
        self._fd_paused += 1
        if now - self._fd_last_log >= FD_LOG_INTERVAL:
            log.warning("out of file descriptors (%s) with %d connections open: accepting paused "
                        "(%d times since the last line), retrying in %.2fs",
                        e.strerror, len(self._conns), self._fd_paused, pause)
            self._fd_last_log = now
            self._fd_paused = 0

    def _handle_connection(self, connection: socket.socket, address: Any) -> None:
        peer = address[0] if isinstance(address, tuple) else ""
        cap = self.cfg.limits.max_connections_per_address
        if self._per_peer[peer] >= cap and not self.trust.trusts(peer):
            _send(connection, raw_response(
                429, "Too Many Requests", "too_many_connections",
                f"at most {cap} connections per address", retry_after=1))
            connection.close()
            return
        try:
            stream = _GuardedStream(connection, max_buffer_size=self.max_buffer_size,
                                    read_chunk_size=self.read_chunk_size)
        except OSError:
            connection.close()
            return
        conn = _Conn(stream, peer)
        stream.conn = conn
        self._conns[stream] = conn
        self._per_peer[peer] += 1
        self._waiting[conn] = None
        self.handle_stream(stream, address)

    # -- the request cycle -------------------------------------------------------

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection
                      ) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        conn = self._conns.get(request_conn.stream)  # type: ignore[attr-defined]
        if conn is None:
            return delegate
        if conn.first:
            conn.first = False  # the head deadline of the first request runs from connect
        else:
            self.set_phase(conn, "idle")
        return _Guard(self, conn, request_conn, delegate)

    def on_close(self, server_conn: object) -> None:
        super().on_close(server_conn)
        conn = self._conns.get(server_conn.stream)  # type: ignore[attr-defined]
        if conn is not None:
            self.forget(conn)

    def set_phase(self, conn: _Conn, phase: str) -> None:
        conn.phase = phase
        conn.since = time.monotonic()
        if phase == "busy":
            self._waiting.pop(conn, None)
        else:
            self._waiting[conn] = None

    def forget(self, conn: _Conn) -> None:
        if self._conns.pop(conn.stream, None) is None:
            return
        self._waiting.pop(conn, None)
        self._per_peer[conn.peer] -= 1
        if self._per_peer[conn.peer] <= 0:
            del self._per_peer[conn.peer]

    def _sweep(self) -> None:
        """Close connections past their head, idle or body deadline. Runs every SWEEP_INTERVAL."""
        http = self.cfg.http
        now = time.monotonic()
        for conn in list(self._waiting):
            stream = conn.stream
            if stream.closed():
                self.forget(conn)
                continue
            waited = now - conn.since
            if conn.phase == "idle":
                if getattr(stream, "_read_buffer_size", 0) > 0:
                    conn.phase, conn.since = "head", now  # the next head has begun
                elif waited > http.idle_timeout_seconds:
                    self._close(conn, None)
            elif conn.phase == "head" and waited > http.header_timeout_seconds:
                self._close(conn, "the request head did not arrive in time")
            elif conn.phase == "body" and waited > http.body_timeout_seconds:
                self._close(conn, "the request body did not arrive in time")
        if now >= self._next_stall_check:
            self._next_stall_check = now + STALL_CHECK_INTERVAL
            self._close_stalled(now)
        self._sweeper = IOLoop.current().asyncio_loop.call_later(  # type: ignore[attr-defined]
            SWEEP_INTERVAL, self._sweep)

    def _close_stalled(self, now: float) -> None:
        """End connections whose answer the client has taken nothing of for the write
        timeout (an event stream's own check usually comes first)."""
        timeout = self.cfg.sse.write_timeout_seconds
        for conn in list(self._conns.values()):
            stream = conn.stream
            done = stream._total_write_done_index
            if done != conn.progress or not stream.writing():
                conn.progress, conn.progress_at = done, now
            elif now - conn.progress_at > timeout:
                self._close(conn, None)

    def _close(self, conn: _Conn, timeout_message: str | None) -> None:
        self.forget(conn)
        stream = conn.stream
        if timeout_message is not None and not stream.writing():
            _send(stream.socket, raw_response(408, "Request Timeout", "request_timeout",
                                              timeout_message))
        stream.close()

    async def close_all_connections(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await super().close_all_connections()

    def open_connections(self) -> int:
        return len(self._conns)
