"""A reconnect storm: one of two nodes dies under load and its clients move to the other.

Starts a Redis master (conf/master.conf, on a free port), two rtchat nodes on
it (conf/cluster-node.yaml, as the container runs them) and nginx in front
(the shipped conf/nginx.conf with only ports and paths changed), all on
loopback. N ``rtchat bench`` clients connect through nginx (least_conn
spreads them over both nodes) with ``--reconnect`` semantics: a stream that
ends is reopened with its Last-Event-ID. Messages are published through
nginx at a steady rate; KILL_AFTER seconds into sending, node A gets
SIGKILL. Measured:

- per client of A: seconds from the kill until its stream is reopened on B,
  and until its first delivery there (the catch-up of what it missed);
- loss and duplicates over the whole run (acknowledged messages only);
- the delivery latency of B's own clients in the storm window (the kill
  until the last client of A reopened) against the same length of time
  just before the kill.

Prints one JSON object. Run by hand (not collected by pytest):

    python tests/perf/storm.py --clients 2000

Needs redis-server and nginx (/usr/sbin/nginx). Every process it starts is
stopped by its own PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from lb_processes import ClusterNode, NginxServer, RedisServer  # noqa: E402

from rtchat.bench.cli import raise_fd_limit  # noqa: E402
from rtchat.bench.clients import StreamProtocol, Subscriber  # noqa: E402
from rtchat.bench.options import parse_args  # noqa: E402
from rtchat.bench.report import latency_summary, percentile  # noqa: E402
from rtchat.bench.run import Bench  # noqa: E402
from rtchat.bench.wire import Target  # noqa: E402

NODE_ENV = {
    "RTCHAT_BROKER__BACKEND": "redis",
    "RTCHAT_BROKER__REDIS__REPLICAS": "[]",
    "RTCHAT_BROKER__REDIS__SUBSCRIBE_FROM": "master",
    "RTCHAT_SHUTDOWN__DRAIN_SECONDS": "0",
    "RTCHAT_LOGGING__LEVEL": "warning",
    # Every client is 127.0.0.1: lift the per-address limits a person's handful assumes.
    "RTCHAT_LIMITS__READ_RATE__BURST": "100000",
    "RTCHAT_LIMITS__READ_RATE__REQUESTS_PER_SECOND": "100000",
    "RTCHAT_LIMITS__MAX_STREAMS_PER_ADDRESS": "100000",
    "RTCHAT_LIMITS__MAX_CONNECTIONS_PER_ADDRESS": "100000",
    "RTCHAT_LIMITS__RATE__BURST": "1000000",
    "RTCHAT_LIMITS__RATE__MESSAGES_PER_SECOND": "1000000",
}
NODE_MARK = b": rtchat "  # the comment every rtchat stream starts with: ": rtchat <node> <time>"


class NodeSubscriber(Subscriber):
    """A bench client that also keeps which node served each of its streams, and when each
    delivery came."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nodes: list[tuple[float, str]] = []  # (wall time the stream opened, node id)
        self.delivery_times = array("d")
        self.delivery_ms = array("d")

    def on_event(self, event: Any, now: float) -> None:
        before = self.delivered
        super().on_event(event, now)
        if self.delivered != before:
            self.delivery_times.append(now)
            self.delivery_ms.append(self.latencies[-1])

    def node_at(self, when: float) -> str | None:
        node = None
        for at, name in self.nodes:
            if at > when:
                break
            node = name
        return node


class NodeStreamProtocol(StreamProtocol):
    """Notes the node named by the stream's first comment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._node_seen = False

    def data_received(self, data: bytes) -> None:
        if not self._node_seen:
            at = data.find(NODE_MARK)
            if at >= 0:
                self._node_seen = True
                name = data[at + len(NODE_MARK):].split(b" ", 1)[0].decode("latin-1")
                sub = self.sub
                assert isinstance(sub, NodeSubscriber)
                sub.nodes.append((time.time(), name))
        super().data_received(data)


class StormBench(Bench):
    subscriber_class = NodeSubscriber
    stream_protocol = NodeStreamProtocol

    def __init__(self, opts: Any, victim: ClusterNode, kill_after: float) -> None:
        super().__init__(opts, lambda line: print(f"storm: {line}", file=sys.stderr, flush=True))
        self.victim = victim
        self.kill_after = kill_after
        self.killed_at = 0.0
        self.before_kill: dict[str, int] = {}

    async def _publish_all(self, pool: list[Any], targets: list[list[Target]]
                           ) -> tuple[float, float]:
        async def kill() -> None:
            await asyncio.sleep(self.kill_after)
            self.before_kill = streams_per_node(self.subs, time.time())
            self.killed_at = time.time()
            self.victim.send_signal(signal.SIGKILL)
            self.log(f"SIGKILL {self.victim.name} with {self.before_kill} streams open")

        killer = asyncio.get_running_loop().create_task(kill())
        try:
            return await super()._publish_all(pool, targets)
        finally:
            await killer


def streams_per_node(subs: Sequence[Subscriber], when: float) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in subs:
        assert isinstance(s, NodeSubscriber)
        node = s.node_at(when)
        counts[str(node)] = counts.get(str(node), 0) + 1
    return counts


def seconds_summary(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {name: None if v is None else round(v, 3) for name, v in
            (("p50", percentile(ordered, 50)), ("p99", percentile(ordered, 99)),
             ("max", ordered[-1] if ordered else None))}


def window_latency(subs: list[NodeSubscriber], start: float, end: float) -> dict[str, Any]:
    values = [ms for s in subs for t, ms in zip(s.delivery_times, s.delivery_ms, strict=True)
              if start <= t < end]
    return {"deliveries": len(values), **latency_summary(values)}


def analyse(bench: StormBench, report: dict[str, Any]) -> dict[str, Any]:
    kill = bench.killed_at
    subs = [s for s in bench.subs if isinstance(s, NodeSubscriber)]
    victim, survivor = "node-a", "node-b"
    of_a = [s for s in subs if s.node_at(kill) == victim]
    of_b = [s for s in subs if s.node_at(kill) == survivor]
    reopened, first_delivery, stranded = [], [], 0
    for s in of_a:
        moved = next((at for at, node in s.nodes if at > kill and node == survivor), None)
        if moved is None:
            stranded += 1
            continue
        reopened.append(moved - kill)
        got = next((t for t in s.delivery_times if t >= moved), None)
        if got is not None:
            first_delivery.append(got - kill)
    window = max(reopened, default=0.0)
    return {
        "clients": len(subs),
        "streams_at_kill": bench.before_kill,
        "clients_of_a": len(of_a),
        "clients_of_a_not_resumed_on_b": stranded,
        "all_of_a_reopened_on_b_seconds": round(window, 3),
        "a_client_reopened_on_b_seconds": seconds_summary(reopened),
        "a_client_first_delivery_on_b_seconds": seconds_summary(first_delivery),
        "b_clients_latency_ms_storm_window": window_latency(of_b, kill, kill + window),
        "b_clients_latency_ms_before_kill": window_latency(of_b, kill - window, kill),
        "acked": report["acked"],
        "sent": report["sent"],
        "expected": report["expected"],
        "delivered": report["delivered"],
        "lost": report["lost"],
        "duplicates": report["duplicates"],
        "out_of_order": report["out_of_order"],
        "resets": report["resets"],
        "disconnects": report["disconnects"],
        "reconnects": report["reconnects"],
        "connect_errors": report["connect_errors"],
        "send_errors": report["send_errors"],
        "status_counts": report["status_counts"],
        "latency_ms_whole_run": report["latency_ms"],
        "duration_seconds": report["duration_seconds"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--rate", type=float, default=50.0, help="messages per second, one room")
    p.add_argument("--kill-after", type=float, default=3.0,
                   help="seconds into sending when node A is killed")
    p.add_argument("--send-seconds", type=float, default=15.0, help="how long messages are sent")
    p.add_argument("--reconnect-delay", type=float, default=0.1,
                   help="a client's wait before it reopens a stream (the same for all: a storm)")
    args = p.parse_args(argv)
    if not 0 < args.kill_after < args.send_seconds:
        p.error("--kill-after must be inside the sending time")
    messages = int(args.rate * args.send_seconds)

    workdir = Path(tempfile.mkdtemp(prefix="rtchat-storm-"))
    started: list[Any] = []
    try:
        redis = RedisServer(workdir, "master")
        started.append(redis)
        redis.start()
        redis.wait_ready()
        env = {**NODE_ENV, "RTCHAT_BROKER__REDIS__MASTER": redis.url}
        nodes = (ClusterNode(workdir, "node-a", env), ClusterNode(workdir, "node-b", env))
        for node in nodes:
            started.append(node)
            node.start()
        for node in nodes:
            node.wait_ready()
        nginx = NginxServer(workdir, (nodes[0].port, nodes[1].port))
        started.append(nginx)
        nginx.start()
        nginx.wait_ready()

        opts = parse_args(["--url", nginx.url, "--clients", str(args.clients),
                           "--messages", str(messages), "--rate", str(args.rate),
                           "--reconnect", "--reconnect-delay", str(args.reconnect_delay),
                           "--settle-seconds", "30", "--connect-timeout", "30",
                           "--publishers", "4", "--room-prefix", "storm-"])
        raise_fd_limit(opts.clients + opts.publishers + 64)

        async def go() -> dict[str, Any]:
            bench = StormBench(opts, nodes[0], args.kill_after)
            report = await bench.run()
            return analyse(bench, report)

        try:
            import uvloop
        except ImportError:
            result = asyncio.run(go())
        else:
            result = uvloop.run(go())
        result["workdir"] = str(workdir)
        print(json.dumps(result))
        return 0
    finally:
        for proc in reversed(started):
            proc.stop()


if __name__ == "__main__":
    sys.exit(main())
