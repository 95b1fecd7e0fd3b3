#!/usr/bin/env python3
"""Redis Cluster mode next to single-master mode: the same ``rtchat bench`` runs, one sitting.

Targets, each started here on free loopback ports and stopped at the end:

- ``single-master``: one redis-server master (conf/master.conf) and one
  replica, two rtchat nodes subscribing from the replica;
- ``cluster``: 3 masters + 3 replicas from conf/redis-cluster.conf joined by
  ``redis-cli --cluster create``, two rtchat nodes in cluster mode.

Scenarios: ``fanout`` (many streams over a few rooms, sends as fast as they
go: deliveries/s) and ``publish`` (few streams, many rooms, 16 publish
connections: acknowledged sends/s and publish latency). Prints a Markdown
table; the machine's cores are shared by Redis, both nodes and the bench.

Usage::

    python tests/perf/cluster_vs_master.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from probes import free_port, http_get, wait_for  # noqa: E402
from redis_cluster_servers import CONF, RedisCluster, cluster_port  # noqa: E402
from redis_servers import RedisServer  # noqa: E402

REPO = HERE.parent.parent
SCENARIOS = {
    "fanout": ["--clients", "600", "--rooms", "6", "--messages", "3000", "--rate", "0"],
    "publish": ["--clients", "24", "--rooms", "24", "--messages", "6000", "--rate", "0",
                "--publishers", "16"],
}


def start_server(directory: Path, args: list[str]) -> RedisServer:
    port = cluster_port()
    server = RedisServer("redis-server", directory, port,
                         [*args, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                          str(directory), "--logfile", str(directory / "redis.log"),
                          "--daemonize", "no", "--save", ""])
    server.start()
    return server


def start_nodes(work: Path, broker_yaml: str) -> list[subprocess.Popen[bytes]]:
    procs = []
    urls = []
    for name in ("node-a", "node-b"):
        port = free_port()
        cfg = work / f"{name}.yaml"
        cfg.write_text(f"node: {{id: {name}}}\nlogging: {{level: warning}}\n"
                       "limits: {rate: {messages_per_second: 100000, burst: 100000},\n"
                       "         read_rate: {requests_per_second: 100000, burst: 100000},\n"
                       "         max_streams_per_address: 100000,\n"
                       "         max_connections_per_address: 100000}\n" + broker_yaml)
        proc = subprocess.Popen([sys.executable, "-m", "rtchat", "--config", str(cfg),
                                 "--host", "127.0.0.1", "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda u=url: http_get(u + "/readyz")[0] == 200, 30, f"{name} ready")
        urls.append(url)
    return procs, urls  # type: ignore[return-value]


def bench(urls: list[str], args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "rtchat", "bench", *(a for u in urls for a in ("--url", u)),
           *args, "-q"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout)


def run_target(name: str, work: Path) -> dict[str, dict]:
    servers: list[RedisServer] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if name == "single-master":
            master = start_server(Path(tempfile.mkdtemp(dir=work)), [str(REPO / "conf/master.conf")])
            servers.append(master)
            replica = start_server(Path(tempfile.mkdtemp(dir=work)),
                                   [str(REPO / "conf/master.conf"), "--replicaof", "127.0.0.1",
                                    str(master.port)])
            servers.append(replica)
            broker = (f"broker: {{backend: redis, redis: {{master: '{master.url}', "
                      f"replicas: ['{replica.url}']}}}}\n")
        else:
            for _ in range(6):
                servers.append(start_server(Path(tempfile.mkdtemp(dir=work)), [
                    str(CONF), "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000"]))
            subprocess.run(["redis-cli", "--cluster", "create",
                            *(f"127.0.0.1:{s.port}" for s in servers),
                            "--cluster-replicas", "1", "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            RedisCluster(servers).wait_healthy()
            nodes = ", ".join(f"'{s.url}'" for s in servers[:3])
            broker = f"broker: {{backend: redis, redis: {{cluster: {{nodes: [{nodes}]}}}}}}\n"
        procs, urls = start_nodes(work, broker)
        return {scenario: bench(urls, args) for scenario, args in SCENARIOS.items()}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=15)
        for server in servers:
            server.kill()


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("single-master", "cluster"):
            results[name] = run_target(name, Path(tmp))
            time.sleep(0.5)
    print("| | single master (1 + 1 replica) | Redis Cluster (3 + 3) |")
    print("|---|---|---|")
    rows = [("fanout", "deliveries/s", "deliveries_per_second"),
            ("fanout", "p99 publish→delivery ms", ("latency_ms", "p99")),
            ("fanout", "lost / duplicates", None),
            ("publish", "acknowledged sends/s", "publish_per_second"),
            ("publish", "p50 / p99 publish ms", ("publish_ms", "p50", "p99")),
            ("publish", "lost / duplicates", None)]
    for scenario, label, key in rows:
        cells = []
        for name in ("single-master", "cluster"):
            rep = results[name][scenario]
            if key is None:
                cells.append(f"{rep['lost']} / {rep['duplicates']}")
            elif isinstance(key, tuple) and len(key) == 3:
                cells.append(f"{rep[key[0]][key[1]]} / {rep[key[0]][key[2]]}")
            elif isinstance(key, tuple):
                cells.append(str(rep[key[0]][key[1]]))
            else:
                cells.append(str(rep[key]))
        print(f"| {scenario}: {label} | {cells[0]} | {cells[1]} |")
    json.dump(results, sys.stderr, indent=1)


if __name__ == "__main__":
    main()
