"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from rtchat.handlers.base import ApiHandler
from rtchat.metrics import CONTENT_TYPE


class HealthHandler(ApiHandler):
    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(ApiHandler):
    def get(self) -> None:
        hub = self.ctx.hub
        reasons = self.ctx.server.readiness() + hub.readiness()
        if reasons:
            self.write_json({"status": "not_ready", "reasons": reasons}, status=503)
        else:
            self.write_json({"status": "ready", "node": self.ctx.hub.node_id,
                             "broker": hub.broker_kind, "clients": hub.client_count})


class MetricsHandler(ApiHandler):
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(self.ctx.metrics.render())
