"""Hostile clients, one friendly bystander, and what a test reads of a node process.

Everything here targets 127.0.0.1 only and stops by itself. Attackers speak
from other loopback source addresses (127.0.<g>.<h>: Linux routes all of
127/8 over lo), so per-address caps judge them apart from the bystander,
which stays on 127.0.0.1.

Slow clients announce a small receive buffer AND an Internet-sized MSS
before they connect: on loopback (MSS 64 KiB) the kernel would autotune the
node's send buffer to 4 MiB per socket and swallow every byte a never-reading
client is sent, which no real client over a real network gets.

Process figures come from /proc, never from guesses: ``rss_kib``,
``cpu_seconds``, ``fd_count`` and ``node_peers`` (which of our sockets the
node still holds).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from probes import async_wait_for
from sse_client import SSEClient

HOST = "127.0.0.1"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
INTERNET_MSS = 1460


# -- the node process, read from /proc -------------------------------------------------------------

def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def node_peers(pid: int) -> set[tuple[str, int]]:
    """The remote (address, port) of every TCP connection ``pid`` holds a descriptor for."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    peers = set()
    with open(f"/proc/{pid}/net/tcp", encoding="ascii") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[9] not in inodes or parts[3] == "0A":  # 0A: LISTEN
                continue
            ip_hex, port_hex = parts[2].split(":")
            peers.add((socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]), int(port_hex, 16)))
    return peers


class RssSampler:
    """Samples VmRSS of ``pid`` every ``interval`` in a thread; ``peak_kib`` is the highest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline_kib = rss_kib(pid)
        self.peak_kib = self.baseline_kib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
            except (OSError, AssertionError):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth_mib(self) -> float:
        return (self.peak_kib - self.baseline_kib) / 1024


def mib(n_bytes: float) -> float:
    return n_bytes / (1 << 20)


# -- raw sockets -------------------------------------------------------------------------------------

def attacker_address(group: int) -> str:
    """The source address of attacker group ``group``: 127.0.<1+g//250>.<1+g%250> (never 127.0.0.1)."""
    return f"127.0.{1 + group // 250}.{1 + group % 250}"


def connect(port: int, src: str | None = None, rcvbuf: int | None = None,
            mss: int | None = None, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from ``src``; returned non-blocking.

    ``rcvbuf`` and ``mss`` are set before connecting, as they must be to count.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if mss is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        if src is not None:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src, 0))
        sock.settimeout(timeout)
        sock.connect((HOST, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class RawConn:
    """One hostile connection: what it received, and when the node closed it."""

    sock: socket.socket
    opened_at: float = field(default_factory=time.monotonic)
    received: bytearray = field(default_factory=bytearray)
    closed_at: float | None = None  # when we saw the node's FIN or RST
    reset: bool = False
    local: tuple[str, int] = ("", 0)  # our end's address, as the node sees its peer

    def __post_init__(self) -> None:
        self.local = self.sock.getsockname()

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    @property
    def status(self) -> int | None:
        """The status of the first response received, if any."""
        if not self.received.startswith(b"HTTP/1."):
            return None
        try:
            return int(self.received.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return None

    def head(self) -> bytes:
        return bytes(self.received.split(b"\r\n\r\n", 1)[0])

    def poll(self, max_bytes: int = 1 << 20) -> bool:
        """Read what is there (up to ``max_bytes``) without blocking; True once the node closed it."""
        if self.closed:
            return True
        try:
            while max_bytes > 0:
                data = self.sock.recv(min(65536, max_bytes))
                if not data:
                    self.closed_at = time.monotonic()
                    break
                self.received += data
                max_bytes -= len(data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.closed_at = time.monotonic()
            self.reset = True
        return self.closed

    def send(self, data: bytes) -> bool:
        """Send without blocking; False when the node has closed the connection."""
        try:
            self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            if self.closed_at is None:
                self.closed_at = time.monotonic()
                self.reset = True
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def open_many(port: int, n: int, *, per_address: int = 50, first_group: int = 0,
              rcvbuf: int | None = None, mss: int | None = None,
              request: bytes | None = None) -> list[RawConn]:
    """``n`` connections, ``per_address`` per source address; each sends ``request`` at once."""
    conns = []
    try:
        for i in range(n):
            conn = RawConn(connect(port, attacker_address(first_group + i // per_address),
                                   rcvbuf=rcvbuf, mss=mss))
            conns.append(conn)
            if request is not None:
                conn.sock.setblocking(True)
                conn.sock.sendall(request)
                conn.sock.setblocking(False)
    except BaseException:
        close_all(conns)
        raise
    return conns


def close_all(conns: Iterable[RawConn]) -> None:
    for conn in conns:
        conn.close()


def stream_request(room: str, query: str = "", last_event_id: str | None = None) -> bytes:
    lines = [f"GET /rooms/{room}/events{'?' + query if query else ''} HTTP/1.1", f"Host: {HOST}",
             "Accept: text/event-stream"]
    if last_event_id is not None:
        lines.append(f"Last-Event-ID: {last_event_id}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def open_slow_stream(port: int, room: str, *, src: str | None = None, rcvbuf: int = 4096,
                     mss: int = INTERNET_MSS) -> RawConn:
    """An SSE stream on a socket with a small receive buffer; it reads only when told to."""
    conn = RawConn(connect(port, src, rcvbuf=rcvbuf, mss=mss))
    conn.sock.setblocking(True)
    conn.sock.sendall(stream_request(room))
    conn.sock.setblocking(False)
    return conn


def open_slow_streams(port: int, room: str, n: int, *, per_address: int = 50, first_group: int = 0,
                      rcvbuf: int = 4096, mss: int = INTERNET_MSS) -> list[RawConn]:
    return open_many(port, n, per_address=per_address, first_group=first_group, rcvbuf=rcvbuf,
                     mss=mss, request=stream_request(room))


def slowloris(port: int, n: int, *, per_address: int = 100, first_group: int = 0) -> list[RawConn]:
    """``n`` connections that sent a request line and one header byte; ``trickle`` adds one more."""
    return open_many(port, n, per_address=per_address, first_group=first_group,
                     request=b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")


def trickle(conns: Iterable[RawConn], byte: bytes = b"a") -> None:
    """One more header byte on each connection the node has not closed."""
    for conn in conns:
        if not conn.poll():
            conn.send(byte)


def poll_all(conns: Iterable[RawConn]) -> int:
    """Poll every connection; how many the node has closed."""
    return sum(conn.poll() for conn in conns)


def wait_all_closed(conns: list[RawConn], timeout: float, *, tick: float = 0.05,
                    trickle_every: float | None = None,
                    trickle_to: list[RawConn] | None = None) -> float:
    """Poll until the node closed every connection or ``timeout``; returns the time waited.

    With ``trickle_every``, one more byte goes every that many seconds to ``trickle_to``
    (default: all of ``conns``).
    """
    start = time.monotonic()
    next_trickle = start + (trickle_every or 0)
    while time.monotonic() - start < timeout:
        if poll_all(conns) == len(conns):
            break
        if trickle_every is not None and time.monotonic() >= next_trickle:
            trickle(conns if trickle_to is None else trickle_to)
            next_trickle += trickle_every
        time.sleep(tick)
    return time.monotonic() - start


def close_times(conns: Iterable[RawConn]) -> list[float]:
    """Seconds from connect to close, for the closed ones."""
    return sorted(c.closed_at - c.opened_at for c in conns if c.closed_at is not None)


# -- HTTP/1.1 over asyncio, keep-alive -------------------------------------------------------------

@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    size: int  # bytes on the wire, head included

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    status = int(status_line.split()[1])
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        body = b"".join(parts)
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        body = await reader.read()
    return Response(status, headers, body, len(head) + len(body))


class HttpConn:
    """One keep-alive HTTP/1.1 connection from ``src``; reopened when the node closed it."""

    def __init__(self, port: int, src: str | None = None) -> None:
        self.port = port
        self.src = src
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.opened = 0

    async def open(self) -> None:
        sock = await asyncio.to_thread(connect, self.port, self.src)
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        self.opened += 1

    async def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                      body: bytes | dict[str, Any] | None = None, timeout: float = 10.0,
                      reopen: bool = True) -> Response:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
        for attempt in (1, 2):
            if self.writer is None or self.writer.is_closing() or self.reader.at_eof():
                await self.open()
            try:
                self.writer.write(raw)
                return await asyncio.wait_for(read_response(self.reader), timeout)
            except (asyncio.IncompleteReadError, ConnectionError):
                # The node closed an idle keep-alive connection as we sent: the request was
                # never read, so sending it again on a new connection is safe.
                self.close()
                if attempt == 2 or not reopen:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = None


async def http_once(port: int, method: str, path: str, *, src: str | None = None,
                    headers: dict[str, str] | None = None, body: bytes | dict[str, Any] | None = None,
                    timeout: float = 10.0) -> Response:
    conn = HttpConn(port, src)
    try:
        return await conn.request(method, path, headers=headers, body=body, timeout=timeout,
                                  reopen=False)
    finally:
        conn.close()


def basic_auth(user: str, password: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# -- SSE bytes as a slow client received them ------------------------------------------------------

def sse_messages(raw: bytes) -> tuple[int | None, list[dict[str, Any]]]:
    """The status and the complete ``message`` events in the raw bytes of a (chunked) SSE response.

    A cut-off chunk or event at the end (the node closed the stream mid-write) is ignored.
    """
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None, []
    status = int(head.split(b" ", 2)[1])
    body = rest
    if b"transfer-encoding: chunked" in head.lower():
        parts, pos = [], 0
        while True:
            end = rest.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(rest[pos:end].split(b";")[0], 16)
            if size == 0 or end + 2 + size + 2 > len(rest):
                break
            parts.append(rest[end + 2:end + 2 + size])
            pos = end + 2 + size + 2
        body = b"".join(parts)
    messages = []
    blocks = body.split(b"\n\n")
    for block in blocks[:-1]:  # the last one is unterminated
        fields: dict[str, str] = {}
        for line in block.decode("utf-8").split("\n"):
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if fields.get("event") == "message" and "data" in fields:
            messages.append(json.loads(fields["data"]))
    return status, messages


# -- the bystander ---------------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class BystanderReport:
    posted: list[str]
    received: list[str]
    post_failures: list[str]
    reconnects: int
    latencies_ms: list[float]
    error: str | None = None

    @property
    def lost(self) -> list[str]:
        got = set(self.received)
        return [i for i in self.posted if i not in got]

    @property
    def duplicates(self) -> int:
        return len(self.received) - len(set(self.received))

    @property
    def in_order(self) -> bool:
        rank = {i: n for n, i in enumerate(self.posted)}
        seen = [rank[i] for i in self.received if i in rank]
        return seen == sorted(seen)

    def summary(self) -> str:
        lat = self.latencies_ms
        return (f"bystander: posted {len(self.posted)}, received {len(self.received)}, "
                f"lost {len(self.lost)}, duplicates {self.duplicates}, "
                f"in order {self.in_order}, "
                f"reconnects {self.reconnects}, post failures {len(self.post_failures)}; "
                f"latency p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms, "
                f"max {max(lat, default=math.nan):.1f} ms")

    def check(self) -> None:
        """Every message posted during the probe arrived once, in order, on one stream."""
        assert self.error is None, f"bystander failed: {self.error}"
        assert self.posted, "the bystander posted nothing"
        assert not self.post_failures, f"bystander sends failed: {self.post_failures[:5]}"
        extra = [i for i in self.received if i not in set(self.posted)]
        assert self.received == self.posted, (
            f"bystander stream: lost {self.lost[:5]} ({len(self.lost)}), "
            f"duplicates {self.duplicates}, extra {extra[:5]}, in order {self.in_order}")
        assert self.reconnects == 0, f"the bystander's stream was closed {self.reconnects} time(s)"


class Bystander:
    """A normal client of ``room`` on 127.0.0.1: one SSE stream that reads everything, and a
    sender posting ``rate`` messages a second of ``text_bytes`` each, in its own thread and loop
    (so the attack's own work in the test does not delay it).

    ``with Bystander(port) as b: ...`` then ``b.report`` (after the block) and ``report.check()``.
    """

    def __init__(self, port: int, room: str = "bystander", rate: float = 5.0,
                 text_bytes: int = 64, start_timeout: float = 10.0) -> None:
        self.port = port
        self.room = room
        self.rate = rate
        self.text_bytes = max(text_bytes, 16)
        self.start_timeout = start_timeout
        self._drain_timeout = 15.0
        self.report: BystanderReport | None = None
        self._posted: list[tuple[str, float]] = []
        self._received: list[tuple[str, float]] = []
        self._failures: list[str] = []
        self._reconnects = 0
        self._error: str | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)

    @property
    def posted_ids(self) -> list[str]:
        return [i for i, _ in list(self._posted)]

    def __enter__(self) -> Bystander:
        self._thread.start()
        if not self._ready.wait(self.start_timeout) or self._error:
            self._stop.set()
            self._thread.join(10)
            raise AssertionError(f"the bystander could not start: {self._error or 'timed out'}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, drain_timeout: float = 15.0) -> BystanderReport:
        if self.report is None:
            self._drain_timeout = drain_timeout
            self._stop.set()
            self._thread.join(drain_timeout + 10)
            sent = dict(self._posted)
            latencies = [(at - sent[i]) * 1000 for i, at in self._received if i in sent]
            self.report = BystanderReport(
                posted=[i for i, _ in self._posted], received=[i for i, _ in self._received],
                post_failures=list(self._failures), reconnects=self._reconnects,
                latencies_ms=latencies,
                error=self._error or ("still running" if self._thread.is_alive() else None))
            print(self.report.summary())
        return self.report

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by check()
            self._error = f"{type(e).__name__}: {e}"
            self._ready.set()

    async def _main(self) -> None:
        url = f"http://{HOST}:{self.port}"
        client = await SSEClient.open(url, self.room)
        if client.status != 200:
            await client.aclose()
            raise AssertionError(f"bystander stream answered {client.status}")
        reading = asyncio.ensure_future(self._read(url, client))
        sender = HttpConn(self.port)
        try:
            # The first message proves the stream is live before the probe starts.
            await self._post_one(sender, 0)
            await self._wait_received(len(self._posted), 10)
            self._ready.set()
            await self._post_loop(sender)
            await self._wait_received(len(self._posted), self._drain_timeout)
        finally:
            reading.cancel()
            sender.close()

    async def _wait_received(self, n: int, timeout: float) -> None:
        try:
            await async_wait_for(lambda: len(self._received) >= n, timeout, "", interval=0.02)
        except AssertionError:
            pass  # the report tells what was lost

    async def _read(self, url: str, client: SSEClient) -> None:
        try:
            while True:
                ev = await client._next_event()
                if ev is None:  # closed under us: resume as EventSource would (and count it)
                    await client.aclose()
                    self._reconnects += 1
                    client = await SSEClient.open(url, self.room, last_event_id=client.last_event_id)
                    continue
                if ev.event == "message":
                    self._received.append((ev.json()["id"], time.time()))
        finally:
            client.close()

    async def _post_one(self, sender: HttpConn, seq: int) -> None:
        text = f"{seq:08d} " + "b" * (self.text_bytes - 9)
        sent_at = time.time()
        try:
            r = await sender.request("POST", f"/rooms/{self.room}/messages",
                                     body={"nick": "bystander", "text": text}, timeout=10)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            self._failures.append(f"#{seq}: {type(e).__name__} {e}")
            sender.close()
            return
        if r.status == 201:
            self._posted.append((r.json()["id"], sent_at))
        else:
            self._failures.append(f"#{seq}: {r.status} {r.body[:200]!r}")

    async def _post_loop(self, sender: HttpConn) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        seq = 1
        while not self._stop.is_set():
            await self._post_one(sender, seq)
            seq += 1
            next_at += interval
            now = time.monotonic()
            if next_at < now - interval:  # fell behind: keep the rate, do not burst
                next_at = now
            await asyncio.sleep(max(0.0, next_at - now))
