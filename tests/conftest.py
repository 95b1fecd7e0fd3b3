"""Shared fixtures: real rtchat nodes (in-process or as processes) on free ports.

Fixtures are factories: ``start_node(**config)`` in a test's own loop,
``spawn_node(env=...)`` for the real ``rtchat`` command.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import tornado.httpclient
import tornado.ioloop
from probes import free_port, http_get, wait_for
from tornado.httpserver import HTTPServer

from rtchat import config as config_mod
from rtchat.hub import Hub
from rtchat.node import build_node

pytest_plugins = ["redis_servers", "redis_cluster_servers"]

# tests/perf holds the side-by-side benchmark, run by hand (python tests/perf/compare.py).
collect_ignore = ["perf"]

@pytest.fixture
def io_loop() -> Iterator[tornado.ioloop.IOLoop]:
    """The loop ``@pytest.mark.gen_test`` runs on (overrides pytest-tornado's).

    pytest-tornado's own fixture makes its loop current the tornado-5 way, which
    leaves a default asyncio loop behind that nobody closes. This one is set as
    the asyncio loop (the plugin schedules the test on the current loop), then
    unset and closed with everything it opened.
    """
    loop = tornado.ioloop.IOLoop(make_current=False)
    asyncio.set_event_loop(loop.asyncio_loop)  # type: ignore[attr-defined]
    yield loop
    asyncio.set_event_loop(None)
    loop.close(all_fds=True)


def make_config(**overrides: Any) -> config_mod.Config:
    """A Config from dotted-key overrides, e.g. ``make_config(**{"sse.max_queue": 10})``."""
    base = {"node.id": "test-node", "logging.level": "warning"}
    base.update(overrides)
    return config_mod.load(None, {}, base)


@dataclass
class Node:
    """An in-process rtchat node on a free port."""

    cfg: config_mod.Config
    hub: Hub
    server: HTTPServer
    port: int
    http: tornado.httpclient.AsyncHTTPClient = field(
        default_factory=lambda: tornado.httpclient.AsyncHTTPClient(force_instance=True))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def fetch(self, path: str, method: str = "GET", body: Any = None,
                    headers: dict[str, str] | None = None) -> tornado.httpclient.HTTPResponse:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers = {"Content-Type": "application/json", **(headers or {})}
        return await self.http.fetch(self.url + path, method=method, body=body, headers=headers,
                                     raise_error=False, request_timeout=10)

    async def post(self, room: str, text: str, nick: str = "tester",
                   headers: dict[str, str] | None = None) -> tornado.httpclient.HTTPResponse:
        return await self.fetch(f"/rooms/{room}/messages", "POST", {"nick": nick, "text": text},
                                headers)

    async def stop(self) -> None:
        self.server.stop()
        await self.hub.close()
        await self.server.close_all_connections()
        self.http.close()


@pytest.fixture
def start_node(io_loop: Any) -> Iterator[Callable[..., Any]]:
    """``node = await start_node(**{"sse.max_queue": 50})``: a memory-broker node in this loop."""
    nodes: list[Node] = []

    async def start(**overrides: Any) -> Node:
        cfg = make_config(**overrides)
        built = build_node(cfg)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        sock.setblocking(False)
        await built.start([sock])
        node = Node(cfg, built.hub, built.server, sock.getsockname()[1])
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        io_loop.run_sync(node.stop, timeout=10)


@dataclass
class NodeProcess:
    """A real ``rtchat`` process."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)


@pytest.fixture
def spawn_node(tmp_path: Any) -> Iterator[Callable[..., NodeProcess]]:
    """``spawn_node(env={...}, args=[...])``: run ``python -m rtchat`` on a free port, wait for /healthz.

    ``port=`` starts it on a given port instead: a node restarted where its clients
    left it (spawn again with ``port=node.port`` once the old process has exited).
    """
    procs: list[NodeProcess] = []

    def spawn(env: dict[str, str] | None = None, args: list[str] | None = None,
              wait: bool = True, cwd: str | None = None, python: str = sys.executable,
              extra_path: str | None = None, port: int | None = None) -> NodeProcess:
        port = port or free_port()
        log_path = str(tmp_path / f"node-{port}-{len(procs)}.log")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RTCHAT_")}
        full_env.update({"RTCHAT_NODE__ID": f"node-{port}", "RTCHAT_LOGGING__LEVEL": "info"})
        if extra_path is not None:
            full_env["PYTHONPATH"] = extra_path
        full_env.update(env or {})
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [python, "-m", "rtchat", "--host", "127.0.0.1", "--port", str(port), *(args or [])],
                stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd or str(tmp_path))
        node = NodeProcess(proc, port, log_path)
        procs.append(node)
        if wait:
            wait_for(lambda: proc.poll() is not None or http_get(node.url + "/healthz")[0] == 200,
                     timeout=20, what=f"rtchat on port {port} to serve")
            assert proc.poll() is None, f"rtchat exited early:\n{node.log()}"
        return node

    yield spawn
    for node in procs:
        if node.proc.poll() is None:
            node.proc.kill()
        node.proc.wait(timeout=10)
