"""Real ``redis-server`` processes for tests: a pytest plugin of factory fixtures.

``start_redis(replica_of=None, appendonly=True)`` and
``start_sentinel(master_port, ...)`` start servers on free loopback ports,
each in its own temporary directory, and return only once they answer (a
replica: once its link to the master is up). Every process is stopped by
its PID at teardown. Without ``redis-server`` the tests skip locally and
fail in CI (``CI=true``), where everything must run.

Load it with ``pytest_plugins = ["redis_servers"]`` (tests/ on sys.path).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from probes import free_port, require_tool, wait_for

SERVICE = "mymaster"


def redis_server_path() -> str:
    """The redis-server binary; skip locally when it is missing, but fail in CI."""
    return require_tool("redis-server")


class RedisServer:
    """One redis-server (or Sentinel) process on a loopback port."""

    def __init__(self, binary: str, directory: Path, port: int, args: list[str],
                 replica_of: RedisServer | None = None, sentinel: bool = False) -> None:
        self.binary = binary
        self.dir = directory
        self.port = port
        self.args = args
        self.replica_of = replica_of
        self.sentinel = sentinel
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.dir / ("sentinel.log" if self.sentinel else "redis.log")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous client (decoded strings, RESP2); close it when done."""
        options: dict[str, Any] = {"decode_responses": True, "socket_timeout": 5,
                                   "socket_connect_timeout": 2, "protocol": 2}
        options.update(kwargs)
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def _ping(self) -> bool:
        with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as c:
            return bool(c.ping())

    def start(self, timeout: float = 10.0) -> None:
        """Start the process and wait until it answers (and a replica has synced)."""
        assert not self.running, "already running"
        self.proc = subprocess.Popen([self.binary, *self.args], cwd=self.dir,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited "
                                   f"({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if self._ping():
                    break
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server on port {self.port} did not answer "
                                     f"within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.01)
        if self.replica_of is not None and self.replica_of.running:
            self.wait_synced(timeout)

    def wait_synced(self, timeout: float = 10.0) -> None:
        """Wait for ``master_link_status:up`` (replicas only)."""
        def up() -> bool:
            with self.client() as c:
                return c.info("replication").get("master_link_status") == "up"

        wait_for(up, timeout, f"replica on port {self.port} to sync", ignore=(redis.RedisError, OSError))

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it does not exit in ``timeout``."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop if running, then start again on the same port with the same data directory."""
        self.stop()
        self.start(timeout)

    def __repr__(self) -> str:
        kind = "sentinel" if self.sentinel else ("replica" if self.replica_of else "master")
        return f"<RedisServer {kind} :{self.port}>"


@pytest.fixture
def start_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """``start_redis(replica_of=None, appendonly=True, extra_args=())`` -> a running server."""
    binary = redis_server_path()
    servers: list[RedisServer] = []

    def start(replica_of: RedisServer | None = None, appendonly: bool = True,
              extra_args: tuple[str, ...] = (), timeout: float = 10.0) -> RedisServer:
        directory = tmp_path_factory.mktemp("redis")
        for attempt in range(3):
            port = free_port()
            args = [
                "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                "--logfile", str(directory / "redis.log"), "--daemonize", "no",
                "--save", "", "--appendonly", "yes" if appendonly else "no",
                "--protected-mode", "no",
                # Sync new replicas at once (7.0 waits 5 s by default for more to come).
                "--repl-diskless-sync-delay", "0",
                # Replicas report their state often, so WAIT and failover tests run fast.
                "--repl-ping-replica-period", "1",
                *extra_args,
            ]
            if replica_of is not None:
                args += ["--replicaof", "127.0.0.1", str(replica_of.port)]
            server = RedisServer(binary, directory, port, args, replica_of)
            try:
                server.start(timeout)
            except RuntimeError:
                if attempt == 2:  # the free port was taken meanwhile, three times over
                    raise
                continue
            servers.append(server)
            return server
        raise AssertionError("unreachable")

    yield start
    for server in reversed(servers):
        server.kill()


@pytest.fixture
def start_sentinel(tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Callable[..., RedisServer]]:
    """``start_sentinel(master_port, quorum=2, down_after_ms=1000)`` -> a running Sentinel.

    It monitors the master as ``mymaster``; ``replicas=N`` waits until it knows N replicas.
    """
    binary = redis_server_path()
    servers: list[RedisServer] = []

    def start(master_port: int, quorum: int = 2, down_after_ms: int = 1000,
              failover_timeout_ms: int = 10000, replicas: int = 0,
              timeout: float = 15.0) -> RedisServer:
        directory = tmp_path_factory.mktemp("sentinel")
        port = free_port()
        conf = directory / "sentinel.conf"
        conf.write_text("\n".join([
            f"port {port}", "bind 127.0.0.1", "daemonize no", f"dir {directory}",
            f"logfile {directory / 'sentinel.log'}", "protected-mode no",
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} {quorum}",
            f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
            f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}",
            f"sentinel parallel-syncs {SERVICE} 2",
        ]) + "\n")
        server = RedisServer(binary, directory, port, [str(conf), "--sentinel"], sentinel=True)
        server.start(timeout)
        servers.append(server)

        def knows_topology() -> bool:
            with server.client() as c:
                addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                if not addr or int(addr[1]) != master_port:
                    return False
                return len(c.execute_command("SENTINEL", "REPLICAS", SERVICE)) >= replicas

        wait_for(knows_topology, timeout, f"sentinel :{port} to see the master and "
                                            f"{replicas} replicas", ignore=(redis.RedisError, OSError))
        return server

    yield start
    for server in reversed(servers):
        server.kill()


# A node config on a master and replicas, with health checks fast enough for tests.
FAST_HEALTH = {
    "broker.redis.health_interval_seconds": 0.2,
    "broker.redis.max_replica_lag_seconds": 1.0,
    "limits.rate.burst": 100000,
    "limits.rate.messages_per_second": 100000,
}

# For tests that assert ``replicated is True``: the default 50 ms WAIT can run out on a
# loaded machine (a fsync with appendfsync always, a replica's turn on a busy core), which
# says nothing about whether the write reached a replica.
PATIENT_ACKS = {"broker.redis.replica_ack_timeout_ms": 3000}


def redis_node_config(master: RedisServer, replicas: list[RedisServer], node_id: str,
                      **extra: Any) -> dict[str, Any]:
    """Dotted config overrides (for ``start_node``) of a node on these servers."""
    return {"node.id": node_id, "broker.backend": "redis", "broker.redis.master": master.url,
            "broker.redis.replicas": [r.url for r in replicas], **FAST_HEALTH, **extra}


@pytest.fixture
def redis_trio(start_redis: Callable[..., RedisServer]) -> tuple[RedisServer, list[RedisServer]]:
    """A master and two synced replicas."""
    master = start_redis()
    return master, [start_redis(replica_of=master), start_redis(replica_of=master)]
