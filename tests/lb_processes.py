"""Real processes for the load-balancer tests: Redis, rtchat nodes, nginx.

Each runs from the shipped conf/ files with only ports and paths changed
(see conf_templates), on free loopback ports, logging to files under the
test's tmp dir. Every process is stopped by its own PID; nothing here
signals anything it did not start. Waits poll a condition with a deadline,
never a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TypeVar

from conf_templates import CONF, ROOT, nginx_conf, redis_args
from probes import free_port, http_get, port_open, require_tool, wait_for


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A child process writing stdout and stderr to ``log_path``; stopped by PID."""

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 stdout_path: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.stdout_path = stdout_path or log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        # The child gets its own copies of these descriptors; ours close at once.
        with open(self.log_path, "ab") as err, open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=self.env, cwd=self.cwd)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.running():
            rc = self.proc.returncode if self.proc else None
            raise AssertionError(f"{self.name} exited (rc={rc}):\n{log_tail(self.log_path)}")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the process, wait for it, SIGKILL it if it outlives ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


class RedisServer(ManagedProcess):
    """``redis-server`` on conf/master.conf or conf/replica.conf (AOF on), on a free port."""

    def __init__(self, workdir: Path, role: str, master_port: int | None = None) -> None:
        self.port = free_port()
        self.role = role
        datadir = workdir / f"redis-{role}-{self.port}"
        datadir.mkdir(parents=True)
        super().__init__(f"redis {role} :{self.port}",
                         [require_tool("redis-server"),
                          *redis_args(role, self.port, datadir, master_port)],
                         datadir / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def info(self, section: str) -> dict[str, str]:
        import redis  # a runtime dependency of rtchat; only this helper needs it here

        client = redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)
        try:
            return {k: str(v) for k, v in client.info(section).items()}
        finally:
            client.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        def ready() -> bool:
            self.check_alive()
            if not port_open(self.port):
                return False
            if self.role == "replica":
                return self.info("replication").get("master_link_status") == "up"
            return True

        wait_for(ready, timeout, f"{self.name} to serve")


LOAD_TEST_LIMITS = {
    "RTCHAT_LIMITS__MAX_STREAMS_PER_ADDRESS": "100000",
    "RTCHAT_LIMITS__READ_RATE__BURST": "100000",
    "RTCHAT_LIMITS__READ_RATE__REQUESTS_PER_SECOND": "100000",
}


class ClusterNode(ManagedProcess):
    """``python -m rtchat --config conf/cluster-node.yaml`` with RTCHAT_* overrides.

    This is what the container runs: the shipped node config, the
    environment (as compose sets it) beating the file. Restartable on the
    same port.
    """

    def __init__(self, workdir: Path, node_id: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.node_id = node_id
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RTCHAT_")}
        # Every test client comes from 127.0.0.1: one address with hundreds of streams,
        # where the per-address caps assume a person's handful.
        full_env.update(LOAD_TEST_LIMITS)
        full_env.update(env)
        full_env.update({
            "RTCHAT_NODE__ID": node_id,
            "RTCHAT_HTTP__HOST": "127.0.0.1",
            "RTCHAT_HTTP__PORT": str(self.port),
        })
        super().__init__(f"rtchat {node_id} :{self.port}",
                         [sys.executable, "-m", "rtchat", "--config",
                          str(CONF / "cluster-node.yaml")],
                         workdir / f"{node_id}.log", env=full_env, cwd=ROOT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            self.check_alive()
            return http_get(self.url + "/readyz")[0] == 200

        wait_for(ready, timeout, f"{self.name} /readyz to answer 200")


class NginxServer(ManagedProcess):
    """nginx running the templated conf/nginx.conf in front of two nodes, in the foreground."""

    def __init__(self, workdir: Path, node_ports: tuple[int, int],
                 connections_per_address: int = 60000) -> None:
        self.port = free_port()
        self.workdir = workdir / "nginx"
        self.workdir.mkdir(parents=True)
        self.conf_path = self.workdir / "nginx.conf"
        # By default every test client (all 127.0.0.1) fits under nginx's per-address cap.
        self.conf_path.write_text(nginx_conf(self.port, node_ports, self.workdir,
                                             connections_per_address))
        # access_log goes to /dev/stdout, error_log to /dev/stderr, as in a container.
        super().__init__(f"nginx :{self.port}",
                         [require_tool("nginx"), "-p", str(self.workdir), "-e", "stderr",
                          "-c", str(self.conf_path), "-g", "daemon off;"],
                         self.workdir / "error.log",
                         stdout_path=self.workdir / "access.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.stdout_path

    def wait_ready(self, timeout: float = 10.0) -> None:
        def ready() -> bool:
            self.check_alive()
            return port_open(self.port)

        wait_for(ready, timeout, f"{self.name} to listen")


P = TypeVar("P", bound=ManagedProcess)


def start_ready(started: list[ManagedProcess], proc: P) -> P:
    """Start ``proc`` and wait until it serves; it goes into ``started`` first, so the
    caller stops it even when starting fails."""
    started.append(proc)
    proc.start()
    proc.wait_ready()  # type: ignore[attr-defined]
    return proc


def two_nodes_behind_nginx(workdir: Path, env: dict[str, str], started: list[ManagedProcess]
                           ) -> tuple[tuple[ClusterNode, ClusterNode], NginxServer]:
    """Nodes ``node-a`` and ``node-b`` on ``env`` (started together, then waited for) and
    nginx on the shipped conf in front; each goes into ``started`` for the caller to stop."""
    nodes = (ClusterNode(workdir, "node-a", env), ClusterNode(workdir, "node-b", env))
    for node in nodes:
        started.append(node)
        node.start()
    for node in nodes:
        node.wait_ready()
    nginx = start_ready(started, NginxServer(workdir, (nodes[0].port, nodes[1].port)))
    return nodes, nginx
