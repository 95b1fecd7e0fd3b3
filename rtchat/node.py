"""One node's object graph: config -> broker -> hub -> app -> server. The one wiring.

``build_node(cfg)`` is used by ``rtchat`` itself and by the tests, so both run
the same server with the same limits. Nothing starts until ``start``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from rtchat.app import make_app
from rtchat.broker import make_broker
from rtchat.config import Config
from rtchat.hub import Hub
from rtchat.metrics import Metrics
from rtchat.server import GuardedHTTPServer, ServerState


@dataclass
class Node:
    cfg: Config
    metrics: Metrics
    hub: Hub
    server: GuardedHTTPServer
    state: ServerState

    async def start(self, sockets: list[socket.socket]) -> None:
        """Start the hub (its broker connects), then accept on ``sockets``."""
        await self.hub.start()
        self.server.add_sockets(sockets)

    async def stop(self) -> None:
        """Stop accepting, close every connection, close the hub and its broker."""
        self.server.stop()
        await self.hub.close()
        await self.server.close_all_connections()


def build_node(cfg: Config, node_id: str | None = None) -> Node:
    node_id = node_id or cfg.node_id
    metrics = Metrics()
    broker = make_broker(cfg, node_id)
    metrics.watch_broker(broker.status)
    hub = Hub(cfg, broker, metrics, node_id)
    state = ServerState()
    app = make_app(cfg, hub, metrics, state)
    server = GuardedHTTPServer(app, cfg=cfg, state=state)
    return Node(cfg, metrics, hub, server, state)
