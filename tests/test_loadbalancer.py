"""Two rtchat nodes on Redis (master + replica) behind the shipped nginx.conf.

Real processes only: redis-server on conf/master.conf and conf/replica.conf,
two ``rtchat --config conf/cluster-node.yaml`` nodes configured through
RTCHAT_* like the compose file does, nginx on conf/nginx.conf with only
ports and paths templated. 200 SSE clients follow one room through nginx
while a publisher posts through nginx at ~50 msg/s:

- steady state: every client receives every stored message exactly once,
  in order, and the streams are spread over both nodes;
- rolling restart: SIGTERM node A (it drains and exits 0), start it again,
  then node B; clients reconnect through nginx with Last-Event-ID, honoring
  the server's ``retry:``, and still lose, duplicate and reorder nothing.
  The worst delivery gap a client saw is reported, not asserted.

The check is against the room's history: every client's ids must equal the
ids stored after the starting marker, and every 201-acknowledged id must be
among them (a POST that failed in flight may still have been stored; then
every client must have it too).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lb_processes import (
    ClusterNode,
    NginxServer,
    RedisServer,
    log_tail,
    start_ready,
    two_nodes_behind_nginx,
)
from probes import async_wait_for, require_tool, wait_for

CLIENTS = 200
RATE = 50.0  # messages per second, through nginx
DRAIN_SECONDS = 2.0
RETRY_MS = 1000  # the server jitters it +-50% per connection
NODE_ENV = {
    "RTCHAT_BROKER__BACKEND": "redis",
    "RTCHAT_SHUTDOWN__DRAIN_SECONDS": str(DRAIN_SECONDS),
    "RTCHAT_SSE__RETRY_MS": str(RETRY_MS),
    # One publisher, one address (X-Real-IP from nginx): lift the per-client rate limit.
    "RTCHAT_LIMITS__RATE__MESSAGES_PER_SECOND": "1000",
    "RTCHAT_LIMITS__RATE__BURST": "1000",
    # Keep every message of the test in history, to compare clients against it.
    "RTCHAT_HISTORY__SIZE": "100000",
    "RTCHAT_ADMIN__PASSWORD": "lb-test-admin",
}


def id_key(message_id: str) -> tuple[int, int]:
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq)


# --- a lean HTTP/1.1 + SSE client over asyncio streams ----------------------


def dechunk(payload: bytes) -> bytes:
    out = bytearray()
    while payload:
        size_line, _, rest = payload.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        payload = rest[size + 2:]
    return bytes(out)


async def http_request(port: int, method: str, path: str, body: Any = None,
                       timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on its own connection: (status, body); status 0 when the connection fails."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, asyncio.TimeoutError):
        return 0, b""
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        data = b""
        if body is not None:
            data = json.dumps(body).encode()
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        writer.write(head.encode() + b"\r\n" + data)
        raw = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, asyncio.TimeoutError):
        return 0, b""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    if not head_bytes.startswith(b"HTTP/"):
        return 0, b""
    if b"\r\ntransfer-encoding: chunked" in head_bytes.lower():
        payload = dechunk(payload)
    return int(head_bytes.split(b" ", 2)[1]), payload


class FollowingClient:
    """Follows one room's SSE stream like a browser's EventSource does.

    On end of stream or error it waits the server's ``retry:`` and
    reconnects with ``Last-Event-ID``. Records every message id with its
    receipt time, and flags any duplicate, reordering or ``reset`` at once.
    """

    def __init__(self, port: int, room: str, last_event_id: str) -> None:
        self.port = port
        self.room = room
        self.last_event_id = last_event_id
        self.retry_ms = 3000  # EventSource's default until the server says otherwise
        self.ids: list[str] = []
        self.received_at: list[float] = []  # monotonic
        self.max_latency = 0.0  # receipt minus the message's ts (same host clock)
        self.connects = 0
        self.refusals: list[str] = []  # non-200 answers and failed connections
        self.problems: list[str] = []
        self.connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._last_key = id_key(last_event_id)

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._stream_once()
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                self.refusals.append(type(e).__name__)
            if self._stop.is_set():
                return
            try:
                await asyncio.wait_for(self._stop.wait(), self.retry_ms / 1000)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.close()

    async def _stream_once(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer = writer
        try:
            writer.write((
                f"GET /rooms/{self.room}/events HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n"
                f"Last-Event-ID: {self.last_event_id}\r\n\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                self.refusals.append(str(status))
                return
            self.connects += 1
            self.connected.set()
            await self._read_stream(reader, b"\r\ntransfer-encoding: chunked" in head.lower())
        finally:
            self._writer = None
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _read_stream(self, reader: asyncio.StreamReader, chunked: bool) -> None:
        raw = bytearray()
        body = bytearray()
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if chunked:
                raw += data
                while (end := raw.find(b"\r\n")) >= 0:
                    size = int(bytes(raw[:end]).split(b";")[0], 16)
                    if size == 0:
                        return  # the server ended the stream
                    if len(raw) < end + 2 + size + 2:
                        break
                    body += raw[end + 2:end + 2 + size]
                    del raw[:end + 2 + size + 2]
            else:
                body += data
            while (end := body.find(b"\n\n")) >= 0:
                block = bytes(body[:end])
                del body[:end + 2]
                self._on_block(block.decode("utf-8"))

    def _on_block(self, block: str) -> None:
        event, event_id, data = "message", None, []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
            elif name == "event":
                event = value
            elif name == "retry":
                self.retry_ms = int(value)
        if not data:
            return
        if event_id is not None:
            self.last_event_id = event_id
        if event == "message":
            self._on_message(event_id, "\n".join(data))
        elif event == "reset":
            self.problems.append(f"reset after {self.ids[-1:] or 'start'}: {data}")

    def _on_message(self, event_id: str | None, data: str) -> None:
        now = time.monotonic()
        message = json.loads(data)
        if event_id != message["id"]:
            self.problems.append(f"id field {event_id!r} != message id {message['id']!r}")
            return
        key = id_key(event_id)
        if key <= self._last_key:
            kind = "duplicate" if event_id in self.ids else "out of order"
            self.problems.append(f"{kind}: {event_id} after {self.ids[-1:]}")
        self._last_key = max(key, self._last_key)
        self.ids.append(event_id)
        self.received_at.append(now)
        self.max_latency = max(self.max_latency, time.time() - float(message["ts"]))

    @property
    def worst_gap(self) -> float:
        """Longest time between two consecutive messages at this client."""
        times = self.received_at
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@dataclass
class Publisher:
    """Posts through nginx at ``rate`` messages per second, one at a time (so in order)."""

    port: int
    room: str
    rate: float = RATE
    acked: list[str] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        next_at = time.monotonic()
        n = 0
        while not self._stop.is_set():
            n += 1
            status, body = await http_request(
                self.port, "POST", f"/rooms/{self.room}/messages",
                {"nick": "publisher", "text": f"message {n} of {self.room}"})
            if status == 201:
                self.acked.append(json.loads(body)["id"])
            else:
                self.failures.append(status)
            next_at += 1 / self.rate
            delay = next_at - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass

    def stop(self) -> None:
        self._stop.set()




async def until_async(predicate: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


# --- the cluster ------------------------------------------------------------


@dataclass
class Cluster:
    master: RedisServer
    replica: RedisServer
    nodes: tuple[ClusterNode, ClusterNode]
    nginx: NginxServer

    def logs(self) -> str:
        parts = [f"--- {p.name} ---\n{log_tail(p.log_path, 25)}"
                 for p in (*self.nodes, self.nginx)]
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tool("redis-server")
    require_tool("nginx")
    workdir = tmp_path_factory.mktemp("lb")
    started: list[Any] = []
    try:
        master = start_ready(started, RedisServer(workdir, "master"))
        replica = start_ready(started, RedisServer(workdir, "replica", master_port=master.port))
        assert master.info("persistence")["aof_enabled"] == "1"
        env = {**NODE_ENV, "RTCHAT_BROKER__REDIS__MASTER": master.url,
               "RTCHAT_BROKER__REDIS__REPLICAS": f"[{replica.url}]"}
        nodes, nginx = two_nodes_behind_nginx(workdir, env, started)
        yield Cluster(master, replica, nodes, nginx)
    finally:
        for proc in reversed(started):
            proc.stop()


# --- the scenarios ----------------------------------------------------------


@dataclass
class Outcome:
    clients: list[FollowingClient]
    publisher: Publisher
    history: list[str]
    seconds: float


async def post_marker(cluster: Cluster, room: str) -> str:
    status, body = await http_request(cluster.nginx.port, "POST", f"/rooms/{room}/messages",
                                      {"nick": "publisher", "text": "marker"})
    assert status == 201, (status, body, cluster.logs())
    return json.loads(body)["id"]


async def history_after(cluster: Cluster, room: str, marker: str, limit: int) -> list[str]:
    status, body = await http_request(cluster.nginx.port, "GET",
                                      f"/rooms/{room}/messages?limit={limit}")
    assert status == 200, (status, body)
    ids = [m["id"] for m in json.loads(body)["messages"]]
    assert marker in ids, f"history of {room} no longer reaches the marker {marker}"
    return ids[ids.index(marker) + 1:]


async def follow_and_publish(cluster: Cluster, room: str,
                             during: Callable[[Publisher], Awaitable[None]]) -> Outcome:
    """200 clients follow ``room`` through nginx while ``during`` runs under publishing load."""
    started = time.monotonic()
    port = cluster.nginx.port
    marker = await post_marker(cluster, room)
    clients = [FollowingClient(port, room, marker) for _ in range(CLIENTS)]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    publisher = Publisher(port, room)
    publishing: asyncio.Task[None] | None = None
    try:
        await async_wait_for(lambda: all(c.connected.is_set() for c in clients), 30,
                             what=f"{CLIENTS} clients to connect through nginx")
        publishing = asyncio.create_task(publisher.run())
        await during(publisher)
        publisher.stop()
        await publishing
        sent = len(publisher.acked) + len(publisher.failures)
        history = await history_after(cluster, room, marker, sent + 10)
        assert history, "nothing was stored"
        last = history[-1]
        await async_wait_for(lambda: all(c.ids[-1:] == [last] for c in clients), 30,
                             what="every client to receive the last stored message")
    finally:
        publisher.stop()
        for c in clients:
            c.stop()
        await asyncio.gather(*tasks, *([publishing] if publishing else []))
    return Outcome(clients, publisher, history, time.monotonic() - started)


def check_exactly_once_in_order(outcome: Outcome) -> None:
    history = outcome.history
    acked = outcome.publisher.acked
    assert not set(acked) - set(history), "acknowledged messages missing from history"
    acked_set = set(acked)
    assert [i for i in history if i in acked_set] == acked, "history order differs from send order"
    for n, client in enumerate(outcome.clients):
        assert client.problems == [], f"client {n}: {client.problems[:5]}"
        if client.ids != history:
            missing = sorted(set(history) - set(client.ids), key=id_key)
            dups = [i for i, k in Counter(client.ids).items() if k > 1]
            raise AssertionError(f"client {n}: {len(missing)} lost (first {missing[:5]}), "
                                 f"{len(dups)} duplicated, {len(client.ids)} received "
                                 f"of {len(history)}")


def report(capsys: pytest.CaptureFixture[str], name: str, outcome: Outcome,
           **extra: Any) -> dict[str, Any]:
    gaps = sorted(c.worst_gap for c in outcome.clients)
    stats = {
        "clients": len(outcome.clients),
        "stored": len(outcome.history),
        "acknowledged": len(outcome.publisher.acked),
        "failed_posts": dict(Counter(outcome.publisher.failures)),
        "deliveries": sum(len(c.ids) for c in outcome.clients),
        "reconnects": sum(c.connects - 1 for c in outcome.clients),
        "refused_connects": dict(Counter(r for c in outcome.clients for r in c.refusals)),
        "worst_delivery_gap_s": round(gaps[-1], 3),
        "median_worst_gap_s": round(gaps[len(gaps) // 2], 3),
        "worst_latency_s": round(max(c.max_latency for c in outcome.clients), 3),
        "seconds": round(outcome.seconds, 1),
        **extra,
    }
    with capsys.disabled():
        print(f"\n[{name}] {json.dumps(stats)}")
    return stats


def nginx_upstreams(access_log: Path, room: str) -> Counter[str]:
    """Which node served each finished stream of ``room`` (the last one nginx tried)."""
    pattern = re.compile(rf'"GET /rooms/{room}/events HTTP/1\.1" 200 .* upstream=(\S+(?:, \S+)*) ')
    served: Counter[str] = Counter()
    for line in access_log.read_text(errors="replace").splitlines():
        if m := pattern.search(line):
            served[m.group(1).split(", ")[-1]] += 1
    return served


def test_every_client_gets_every_message_once_in_order_across_two_nodes(
        cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    async def steady(publisher: Publisher) -> None:
        await async_wait_for(lambda: len(publisher.acked) + len(publisher.failures) >= 5 * RATE,
                             30, what="5 s worth of messages")

    outcome = asyncio.run(follow_and_publish(cluster, "lb-steady", steady))
    # Streams end (and are logged by nginx, with the node) when the clients close them.
    served = wait_for_log(lambda: nginx_upstreams(cluster.nginx.access_log, "lb-steady"),
                          CLIENTS)
    stats = report(capsys, "steady", outcome, streams_per_node=dict(served))

    assert outcome.publisher.failures == [], stats
    assert outcome.history == outcome.publisher.acked
    check_exactly_once_in_order(outcome)
    assert set(served) == {f"127.0.0.1:{n.port}" for n in cluster.nodes}, served
    assert min(served.values()) >= CLIENTS // 5, f"streams not spread over both nodes: {served}"


def wait_for_log(read: Callable[[], Counter[str]], total: int) -> Counter[str]:
    def enough() -> Counter[str] | None:
        served = read()
        return served if sum(served.values()) >= total else None

    return wait_for(enough, 10, f"nginx to log {total} finished streams")


def test_rolling_restart_under_load_loses_duplicates_and_reorders_nothing(
        cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    nginx = cluster.nginx
    exit_codes: dict[str, int] = {}

    def node_serves_through_nginx(node: ClusterNode, since: int) -> bool:
        new = nginx.access_log.read_bytes()[since:].decode(errors="replace")
        return f"upstream=127.0.0.1:{node.port} ustatus=201" in new

    async def roll(publisher: Publisher) -> None:
        await async_wait_for(lambda: len(publisher.acked) >= RATE, 30,
                             what="1 s of messages before the restart")
        for node in cluster.nodes:
            node.send_signal(signal.SIGTERM)
            await async_wait_for(lambda n=node: not n.running(), DRAIN_SECONDS + 15,
                                 what=f"{node.name} to drain and exit")
            assert node.proc is not None
            exit_codes[node.node_id] = node.proc.returncode
            log_mark = nginx.access_log.stat().st_size
            node.start()
            await until_async(lambda n=node: readyz(n), 20, f"{node.name} to be ready again")
            # Serving through nginx again before the next node goes.
            await async_wait_for(lambda n=node, m=log_mark: node_serves_through_nginx(n, m), 20,
                                 interval=0.1, what=f"nginx to send {node.name} traffic again")
        acked = len(publisher.acked)
        await async_wait_for(lambda: len(publisher.acked) >= acked + RATE, 30,
                             what="1 s of messages after the restarts")

    async def readyz(node: ClusterNode) -> bool:
        node.check_alive()
        return (await http_request(node.port, "GET", "/readyz", timeout=2))[0] == 200

    outcome = asyncio.run(follow_and_publish(cluster, "lb-rolling", roll))
    stats = report(capsys, "rolling restart", outcome)

    assert exit_codes == {"node-a": 0, "node-b": 0}, cluster.logs()
    check_exactly_once_in_order(outcome)
    # Both nodes went away once while serving: every client had to come back.
    assert min(c.connects for c in outcome.clients) >= 2, stats
    # A POST in flight on a node as it exits may fail (nginx never re-sends a POST that
    # reached a node); such a message may still be stored, and then everyone got it above.
    assert len(outcome.publisher.acked) >= len(outcome.history) * 0.9, stats
