"""A reconnect storm: one of two nodes dies under load and its clients move to the other.

Starts a Redis master (conf/master.conf, on a free port), two rtchat nodes on
it (conf/cluster-node.yaml, as the container runs them) and nginx in front
(the shipped conf/nginx.conf with only ports and paths changed), all on
loopback. N ``rtchat bench`` clients connect through nginx (least_conn
spreads them over both nodes) with ``--reconnect`` semantics: a stream that
ends is reopened with its Last-Event-ID after the last ``retry:`` it was
given (the node's jittered sse.retry_ms, or nginx's "come back later"), as
EventSource does. Messages are published through nginx at a steady rate;
KILL_AFTER seconds into sending, node A gets SIGKILL. Measured:

- per client of A: seconds from the kill until its stream is reopened on B,
  and until its first delivery there (the catch-up of what it missed);
- loss and duplicates over the whole run (acknowledged messages only);
- the delivery latency of B's own clients in the storm window (the kill
  until the last client of A reopened) against the same length of time
  just before the kill, twice: for the bench's clients of B (timed by the
  bench, one Python process holding every stream, whose own loop lag is in
  each figure), and for a probe: PROBE_CLIENTS streams opened straight on B
  by a separate light process that sends PROBE_RATE messages a second to
  its own room, from the start of sending to its end;
- how often nginx took a node out of rotation, and answered "no live
  upstreams" (its error log).

``target`` holds the goal as booleans with their numbers: every client of A
reopened on B within sse.retry_ms x 1.5 + 5 s of the kill, 0 lost, 0
duplicated (the probe's included), B's own clients' p99 at most 250 ms in
the storm window, judged on the probe (the bench's figure is beside it);
``target.pass`` is all of them. ``capacity`` says how many clients the
file-descriptor limits allow (one socket per client in the bench, every
client on the survivor after the kill, two per client in an nginx worker);
more --clients than that is refused before anything starts.

Prints one JSON object. Run by hand (not collected by pytest):

    python tests/perf/storm.py --clients 2000

Needs redis-server and nginx (/usr/sbin/nginx). Every process it starts is
stopped by its own PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from conf_templates import CONF  # noqa: E402
from lb_processes import (  # noqa: E402
    ClusterNode,
    RedisServer,
    start_ready,
    two_nodes_behind_nginx,
)
from probes import http_get  # noqa: E402

from rtchat import config as config_mod  # noqa: E402
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
PUBLISHERS = 4
BENCH_SPARE_FDS = 64  # as rtchat.bench.cli: the publisher pool, stdio, the loop
NODE_SPARE_FDS = 200  # a node's own: listening sockets, Redis pool, logs, imports
B_P99_TARGET_MS = 250.0
PROBE_CLIENTS = 20
PROBE_RATE = 20.0


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

    def __init__(self, opts: Any, victim: ClusterNode, kill_after: float,
                 probe_argv: list[str] | None = None) -> None:
        super().__init__(opts, lambda line: print(f"storm: {line}", file=sys.stderr, flush=True))
        self.victim = victim
        self.kill_after = kill_after
        self.killed_at = 0.0
        self.before_kill: dict[str, int] = {}
        self.probe_argv = probe_argv
        self.probe: asyncio.subprocess.Process | None = None

    async def _publish_all(self, pool: list[Any], targets: list[list[Target]]
                           ) -> tuple[float, float]:
        if self.probe_argv is not None:  # B's own light clients, timed by their own process
            self.probe = await asyncio.create_subprocess_exec(
                sys.executable, __file__, *self.probe_argv, stdout=subprocess.PIPE)
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


class ProbeBench(Bench):
    subscriber_class = NodeSubscriber


def run_probe(url: str, seconds: float) -> int:
    """The probe's process: PROBE_CLIENTS streams on ``url``, PROBE_RATE messages a second
    for ``seconds``; prints its deliveries' (wall time, latency ms) and its loss."""
    opts = parse_args(["--url", url, "--clients", str(PROBE_CLIENTS),
                       "--messages", str(int(PROBE_RATE * seconds)), "--rate", str(PROBE_RATE),
                       "--publishers", "2", "--settle-seconds", "30",
                       "--room-prefix", "storm-probe-", "-q"])
    bench = ProbeBench(opts, lambda line: None)
    report = asyncio.run(bench.run())
    subs = [s for s in bench.subs if isinstance(s, NodeSubscriber)]
    print(json.dumps({
        "deliveries": [[t, ms] for s in subs
                       for t, ms in zip(s.delivery_times, s.delivery_ms, strict=True)],
        **{k: report[k] for k in ("sent", "acked", "expected", "delivered", "lost",
                                  "duplicates", "out_of_order", "connect_errors",
                                  "status_counts")}}))
    return 0


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
    return window_of([(t, ms) for s in subs
                      for t, ms in zip(s.delivery_times, s.delivery_ms, strict=True)],
                     start, end)


def window_of(deliveries: Sequence[Sequence[float]], start: float, end: float
              ) -> dict[str, Any]:
    values = [ms for t, ms in deliveries if start <= t < end]
    return {"deliveries": len(values), **latency_summary(values)}


def analyse_probe(probe: dict[str, Any], kill: float, window: float) -> dict[str, Any]:
    deliveries = probe.pop("deliveries")
    return {**probe, "clients": PROBE_CLIENTS, "rate": PROBE_RATE,
            "latency_ms_storm_window": window_of(deliveries, kill, kill + window),
            "latency_ms_before_kill": window_of(deliveries, kill - window, kill)}


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
        # Whether the machine kept up: sends run late when the nodes (or the bench) are
        # saturated, and every latency above then includes that.
        "send_seconds": report["send_seconds"],
        "publish_ms": report["publish_ms"],
        "bench_send_cpu_percent": report["send_cpu_percent"],
        "duration_seconds": report["duration_seconds"],
    }


def target_check(result: dict[str, Any], retry_ms: int) -> dict[str, Any]:
    """The scenario's goal, each part a boolean beside the numbers it judged."""
    bound = round(retry_ms * 1.5 / 1000 + 5, 3)
    resumed = result["all_of_a_reopened_on_b_seconds"]
    not_resumed = result["clients_of_a_not_resumed_on_b"]
    probe = result["b_probe"]
    during = probe["latency_ms_storm_window"]["p99"]
    before = probe["latency_ms_before_kill"]["p99"]
    checks = {
        "all_of_a_resumed_in_time": {
            "ok": result["clients_of_a"] > 0 and not_resumed == 0 and resumed <= bound,
            "seconds": resumed, "bound_seconds": bound, "retry_ms": retry_ms,
            "clients_of_a": result["clients_of_a"], "not_resumed": not_resumed},
        "none_lost": {"ok": result["lost"] == 0 and probe["lost"] == 0,
                      "lost": result["lost"], "probe_lost": probe["lost"]},
        "none_duplicated": {"ok": result["duplicates"] == 0 and probe["duplicates"] == 0,
                            "duplicates": result["duplicates"],
                            "probe_duplicates": probe["duplicates"]},
        "b_p99_in_storm": {"ok": during is not None and during <= B_P99_TARGET_MS,
                           "p99_ms": during, "bound_ms": B_P99_TARGET_MS,
                           "p99_ms_before_kill": before,
                           "bench_clients_of_b_p99_ms":
                               result["b_clients_latency_ms_storm_window"]["p99"]},
    }
    return {"pass": all(c["ok"] for c in checks.values()), **checks}


def nginx_events(error_log: Path, ports: dict[int, str]) -> dict[str, Any]:
    """How often nginx disabled each node (max_fails reached) and found no live upstream."""
    try:
        text = error_log.read_text(errors="replace")
    except OSError:
        return {}
    disabled: dict[str, int] = {}
    for m in re.finditer(r"upstream server temporarily disabled.*?upstream: \"http://[^:]+:(\d+)",
                         text):
        name = ports.get(int(m.group(1)), m.group(1))
        disabled[name] = disabled.get(name, 0) + 1
    return {"node_disabled": disabled, "no_live_upstreams": text.count("no live upstreams")}


def rejected_by_reason(node: ClusterNode) -> dict[str, float]:
    """The node's refusals so far, by reason (its /metrics, asked directly)."""
    status, body = http_get(node.url + "/metrics", timeout=5)
    if status != 200:
        return {}
    found = re.findall(r'^rtchat_requests_rejected_total\{reason="([^"]+)"\} (\S+)$',
                       body.decode(errors="replace"), re.M)
    return {reason: float(value) for reason, value in found}


def code_version() -> dict[str, Any]:
    """The commit the nodes ran, and which of rtchat's files differed from it."""
    root = TESTS.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "rtchat").splitlines()]
    return {"head": git("rev-parse", "--short", "HEAD"), "rtchat_changed": changed}


def capacity(clients: int) -> dict[str, Any]:
    """The most clients this machine's file-descriptor limits hold, and where they bind."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    nginx_text = (CONF / "nginx.conf").read_text()
    per_worker = re.search(r"^\s*worker_connections (\d+);", nginx_text, re.M)
    assert per_worker, "conf/nginx.conf sets worker_connections"
    node_max = config_mod.load(CONF / "cluster-node.yaml", environ={}).limits.max_clients
    fits = {
        "bench": limit - PUBLISHERS - BENCH_SPARE_FDS,  # one socket per client
        "survivor_node": min(limit - NODE_SPARE_FDS, node_max),  # every client, after the kill
        # Two sockets per client (client side, node side); the workers share the clients but
        # not evenly, so the worst case is one worker holding all of them. A worker's
        # worker_rlimit_nofile may be refused (no CAP_SYS_RESOURCE): then it has our limit.
        "nginx_one_worker": min(int(per_worker.group(1)), limit) // 2,
    }
    return {"fd_hard_limit": hard, "max_clients": min(fits.values()), "per_process": fits,
            "clients": clients}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--rate", type=float, default=50.0, help="messages per second, one room")
    p.add_argument("--kill-after", type=float, default=3.0,
                   help="seconds into sending when node A is killed")
    p.add_argument("--send-seconds", type=float, default=15.0, help="how long messages are sent")
    p.add_argument("--reconnect-delay", type=float, default=0.1,
                   help="a client's wait before it reopens a stream while it has had no "
                        "retry: (every rtchat stream and nginx's come-back answer send one)")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="give up on the run after this long (default 300)")
    p.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)  # the probe's process
    args = p.parse_args(argv)
    if args.probe:
        return run_probe(args.probe, args.send_seconds)
    if not 0 < args.kill_after < args.send_seconds:
        p.error("--kill-after must be inside the sending time")
    messages = int(args.rate * args.send_seconds)
    fits = capacity(args.clients)
    if args.clients > fits["max_clients"]:
        p.error(f"--clients {args.clients} does not fit this machine's limits: {fits}")
    # Before any process starts, so the nodes and nginx inherit the raised soft limit too.
    raise_fd_limit(args.clients + PUBLISHERS + BENCH_SPARE_FDS)

    load_before = os.getloadavg()
    code = code_version()  # what the nodes about to start will import
    workdir = Path(tempfile.mkdtemp(prefix="rtchat-storm-"))
    started: list[Any] = []
    try:
        redis = start_ready(started, RedisServer(workdir, "master"))
        env = {**NODE_ENV, "RTCHAT_BROKER__REDIS__MASTER": redis.url}
        nodes, nginx = two_nodes_behind_nginx(workdir, env, started)
        # What the nodes run with: the shipped file, then their environment.
        retry_ms = config_mod.load(CONF / "cluster-node.yaml", environ=nodes[0].env).sse.retry_ms

        opts = parse_args(["--url", nginx.url, "--clients", str(args.clients),
                           "--messages", str(messages), "--rate", str(args.rate),
                           "--reconnect", "--reconnect-delay", str(args.reconnect_delay),
                           "--settle-seconds", "30", "--connect-timeout", "30",
                           "--publishers", str(PUBLISHERS), "--room-prefix", "storm-"])

        async def go() -> dict[str, Any]:
            bench = StormBench(opts, nodes[0], args.kill_after,
                               ["--probe", nodes[1].url, "--send-seconds", str(args.send_seconds)])
            report = await asyncio.wait_for(bench.run(), args.max_seconds)
            result = analyse(bench, report)
            assert bench.probe is not None
            out, _ = await asyncio.wait_for(bench.probe.communicate(), args.max_seconds)
            result["b_probe"] = analyse_probe(json.loads(out), bench.killed_at,
                                              result["all_of_a_reopened_on_b_seconds"])
            result["nginx"] = nginx_events(nginx.log_path,
                                           {node.port: node.node_id for node in nodes})
            # Why the survivor refused streams during the storm (a 503 sends nginx on).
            result["b_rejected_by_reason"] = rejected_by_reason(nodes[1])
            result["capacity"] = fits
            return {"target": target_check(result, retry_ms), **result}

        try:
            import uvloop
        except ImportError:
            result = asyncio.run(go())
        else:
            result = uvloop.run(go())
        # The machine is shared: its load says how much else ran beside the storm.
        result["loadavg_1min_before_after"] = [round(load_before[0], 2),
                                               round(os.getloadavg()[0], 2)]
        result["code"] = code
        result["workdir"] = str(workdir)
        print(json.dumps(result))
        return 0
    finally:
        for proc in reversed(started):
            proc.stop()


if __name__ == "__main__":
    sys.exit(main())
