"""Standard SSE clients for tests: the ones applications use, driven against real nodes.

- ``python_client(kind, url, last_event_id)``: httpx-sse or sseclient-py, as
  their documentation shows them used; yields ``Ev`` records.
- ``NodeEventSource(url)``: the npm ``eventsource`` package in a Node process
  (tests/js/sse_client.mjs) printing what it sees as JSON lines.
- ``RawStream(url, path)``: a plain socket holding one stream open, keeping
  every byte it got (to count heartbeats, hold a node's only slot, or see
  which node answered through a load balancer).

Waits take a condition and a deadline; nothing here sleeps and hopes.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from httpx_sse import connect_sse
from probes import missing, require_tool
from sseclient import SSEClient as SSEClientPy

JS_DIR = Path(__file__).parent / "js"


@dataclass
class Ev:
    event: str
    data: str
    id: str | None


# -- sending and reading history through the API ----------------------------------


def post(base_url: str, room: str, text: str, nick: str = "tester") -> str:
    """Send through the node's API; the stored message's id."""
    request = urllib.request.Request(
        f"{base_url}/rooms/{room}/messages", method="POST",
        data=json.dumps({"nick": nick, "text": text}).encode(),
        headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as r:
        assert r.status == 201, r.status
        return json.loads(r.read())["id"]


def history(base_url: str, room: str) -> list[dict[str, Any]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{base_url}/rooms/{room}/messages?limit=1000", timeout=10) as r:
        return json.loads(r.read())["messages"]


# -- the Python clients --------------------------------------------------------------


@contextlib.contextmanager
def python_client(kind: str, url: str, last_event_id: str | None = None) -> Iterator[Iterator[Ev]]:
    """One stream read by httpx-sse (``"httpx-sse"``) or sseclient-py (``"sseclient-py"``).

    Entered once the answer's head arrived (the node has the stream); any read
    waits at most 10 s, so a stalled stream fails the test instead of hanging it.
    """
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with httpx.Client(timeout=10, trust_env=False) as http:
        if kind == "httpx-sse":
            with connect_sse(http, "GET", url, headers=headers) as source:
                assert source.response.status_code == 200
                yield (Ev(e.event, e.data, e.id) for e in source.iter_sse())
        elif kind == "sseclient-py":
            headers["Accept"] = "text/event-stream"
            with http.stream("GET", url, headers=headers) as response:
                assert response.status_code == 200
                client = SSEClientPy(response.iter_bytes())
                yield (Ev(e.event, e.data, e.id) for e in client.events())
        else:
            raise ValueError(kind)


def read_until(events: Iterator[Ev], seen: list[Ev], last_id: str, limit: int = 1000) -> None:
    """Append events to ``seen`` up to and including the one with id ``last_id``."""
    for _ in range(limit):
        ev = next(events)
        seen.append(ev)
        if ev.id == last_id:
            return
    raise AssertionError(f"no event {last_id} within {limit} events")


def assert_clean(events: list[Any]) -> None:
    """Every event a client surfaced carries JSON data: no empty event from a heartbeat,
    the opening retry or a come-back answer."""
    for ev in events:
        event, data = (ev["event"], ev["data"]) if isinstance(ev, dict) else (ev.event, ev.data)
        assert data != "", f"an empty {event!r} event: {events}"
        json.loads(data)
        assert event in ("message", "presence"), events


# -- the npm eventsource package ------------------------------------------------------


def node_client_command() -> list[str]:
    """``node tests/js/sse_client.mjs``; skip locally (fail in CI) when Node or the package is missing."""
    node = require_tool("node")
    if not (JS_DIR / "node_modules" / "eventsource" / "package.json").exists():
        missing("the npm eventsource package is not installed (.ci/run runs npm ci --prefix tests/js)")
    return [node, str(JS_DIR / "sse_client.mjs")]


class NodeEventSource:
    """tests/js/sse_client.mjs on one stream URL; its JSON lines collected as they come."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        command = node_client_command()  # first: a skip must not leave the file open
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen([*command, url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, cwd=JS_DIR)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(json.loads(raw))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [line for line in self.lines if line["type"] == kind]

    def events(self) -> list[dict[str, Any]]:
        return self.of("event")

    def message_ids(self) -> list[str]:
        return [e["id"] for e in self.events() if e["event"] == "message"]

    def wait(self, predicate: Callable[[NodeEventSource], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"npm eventsource: timed out waiting for {what} "
                                         f"(exit {self.proc.poll()}); saw {self.lines}; "
                                         f"stderr: {self.stderr()}")
                self._cond.wait(min(left, 0.2))

    def wait_message(self, message_id: str, timeout: float = 20) -> None:
        self.wait(lambda s: message_id in s.message_ids(), timeout, f"message {message_id}")

    def never_closed(self) -> bool:
        """Never in readyState CLOSED: it would have given up on the stream for good."""
        return all(e["readyState"] != 2 for e in self.of("error"))

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout, self._stderr):
            f.close()


# -- a raw stream ---------------------------------------------------------------------


class RawStream:
    """One GET of an event stream over a plain socket, every byte kept as it arrives."""

    def __init__(self, base_url: str, path: str) -> None:
        parts = urlsplit(base_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.settimeout(None)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
                          "User-Agent: rtchat-test-raw-stream\r\n\r\n".encode())
        self.data = b""
        self.eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self.eof = True
                    self._cond.notify_all()
                    return
                self.data += chunk
                self._cond.notify_all()

    @property
    def status(self) -> int:
        with self._cond:
            line = self.data.split(b"\r\n", 1)[0].split()
            return int(line[1]) if len(line) > 1 else 0

    @property
    def pings(self) -> int:
        with self._cond:
            return self.data.count(b": ping\n")

    def node_id(self) -> str:
        """The node named in the stream's opening comment (": rtchat <node id> <time>")."""
        with self._cond:
            _, _, rest = self.data.partition(b"\n: rtchat ")
            return rest.split(b" ", 1)[0].decode()

    def wait(self, predicate: Callable[[RawStream], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"raw stream: timed out waiting for {what}; got {self.data!r}")
                self._cond.wait(min(left, 0.2))

    def has(self, text: str) -> bool:
        return text.encode() in self.data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(timeout=5)


def env_for_tests(**extra: str) -> dict[str, str]:
    """RTCHAT_* for a node many test clients reach from one address, plus ``extra``."""
    env = {
        "RTCHAT_LIMITS__RATE__MESSAGES_PER_SECOND": "1000",
        "RTCHAT_LIMITS__RATE__BURST": "1000",
        "RTCHAT_LIMITS__READ_RATE__REQUESTS_PER_SECOND": "1000",
        "RTCHAT_LIMITS__READ_RATE__BURST": "1000",
        "RTCHAT_LIMITS__MAX_STREAMS_PER_ADDRESS": "1000",
    }
    env.update(extra)
    return env



def hold_streams(base_url: str, n: int = 10) -> list[RawStream]:
    """``n`` open streams on a node, to keep its drain going: each is closed at a random
    moment within shutdown.drain_seconds and the node exits when the last one is (with
    none, at once); with ten, it runs nearly the whole time."""
    held = [RawStream(base_url, "/rooms/held/events") for _ in range(n)]
    for stream in held:
        stream.wait(lambda s: s.status == 200, 10, "a held stream")
    return held
