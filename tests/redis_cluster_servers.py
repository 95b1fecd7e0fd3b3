"""A real Redis Cluster for tests: 3 masters + 3 replicas, a pytest plugin fixture.

``redis_cluster`` starts six ``redis-server`` processes from the shipped
``conf/redis-cluster.conf`` (a short ``cluster-node-timeout``) on free
loopback ports, joins them with ``redis-cli --cluster create
--cluster-replicas 1`` and returns once every shard has a master and a synced
replica. Every process is stopped by its PID at teardown.

Load it with ``pytest_plugins = ["redis_cluster_servers"]`` (tests/ on sys.path).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from probes import free_port, require_tool, wait_for
from redis.crc import key_slot
from redis_servers import RedisServer, redis_server_path

CONF = Path(__file__).resolve().parent.parent / "conf" / "redis-cluster.conf"
NODE_TIMEOUT_MS = 1000


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair for a cluster node")


def as_dict(value: Any) -> dict[str, Any]:
    """A RESP2 ``[key, value, ...]`` reply (or a dict already) as a dict."""
    return value if isinstance(value, dict) else dict(zip(value[0::2], value[1::2], strict=True))


@dataclass
class ShardView:
    slots: list[tuple[int, int]]
    master: RedisServer | None
    replicas: list[RedisServer]


class RedisCluster:
    """Six cluster nodes and ways to look at them."""

    def __init__(self, servers: list[RedisServer]) -> None:
        self.servers = servers

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def at(self, port: int) -> RedisServer:
        (server,) = [s for s in self.servers if s.port == port]
        return server

    def any_running(self) -> RedisServer:
        return next(s for s in self.servers if s.running)

    def shards(self) -> list[ShardView]:
        """``CLUSTER SHARDS`` as one running node sees it (failed nodes left out)."""
        with self.any_running().client() as c:
            reply = c.execute_command("CLUSTER", "SHARDS")
        views = []
        for raw in reply:
            entry = as_dict(raw)
            slots = [int(x) for x in entry["slots"]]
            if not slots:
                continue
            master, replicas = None, []
            for node in map(as_dict, entry["nodes"]):
                if node["health"] == "fail":
                    continue
                server = self.at(int(node["port"]))
                if node["role"] == "master":
                    master = server
                else:
                    replicas.append(server)
            views.append(ShardView(list(zip(slots[0::2], slots[1::2], strict=True)), master,
                                   replicas))
        return views

    def shard_of(self, key: str) -> ShardView:
        slot = key_slot(key.encode())
        (view,) = [v for v in self.shards() if any(lo <= slot <= hi for lo, hi in v.slots)]
        return view

    def healthy(self) -> bool:
        """Every running node says ``cluster_state:ok`` and agrees: 3 shards, each with a
        master and an online, synced replica."""
        for server in self.servers:
            if not server.running:
                continue
            with server.client(socket_timeout=1) as c:
                if c.cluster("info").get("cluster_state") != "ok":
                    return False
        views = self.shards()
        if len(views) != 3 or sum(hi - lo + 1 for v in views for lo, hi in v.slots) != 16384:
            return False
        for view in views:
            if view.master is None or not view.replicas:
                return False
            for replica in view.replicas:
                with replica.client(socket_timeout=1) as c:
                    if c.info("replication").get("master_link_status") != "up":
                        return False
        return True

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_for(self.healthy, timeout, "the Redis Cluster to be healthy",
                 interval=0.1, ignore=(redis.RedisError, OSError, KeyError, ValueError))

    def client(self) -> Any:
        """A synchronous ``RedisCluster`` client (decoded strings); close it when done."""
        from redis.cluster import ClusterNode
        from redis.cluster import RedisCluster as SyncCluster

        return SyncCluster(startup_nodes=[ClusterNode("127.0.0.1", s.port)
                                          for s in self.servers if s.running],
                           decode_responses=True, socket_timeout=5)


@pytest.fixture
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """3 masters + 3 replicas, joined, healthy."""
    binary = redis_server_path()
    cli = require_tool("redis-cli")
    servers: list[RedisServer] = []
    try:
        for _ in range(6):
            directory = tmp_path_factory.mktemp("cluster")
            for attempt in range(3):
                port = cluster_port()
                args = [str(CONF), "--port", str(port), "--bind", "127.0.0.1",
                        "--dir", str(directory), "--logfile", str(directory / "redis.log"),
                        "--daemonize", "no", "--cluster-config-file",
                        str(directory / "nodes.conf"),
                        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                        "--save", "", "--repl-diskless-sync-delay", "0",
                        "--repl-ping-replica-period", "1"]
                server = RedisServer(binary, directory, port, args)
                try:
                    server.start()
                except RuntimeError:
                    if attempt == 2:
                        raise
                    continue
                servers.append(server)
                break
        out = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"redis-cli --cluster create failed:\n{out.stdout}{out.stderr}"
        cluster = RedisCluster(servers)
        cluster.wait_healthy()
        yield cluster
    finally:
        for server in reversed(servers):
            server.kill()
