"""Prometheus metrics, one registry per node (no process-global state).

Owns the metric names (all ``rtchat_``) and a collector that reads the
broker's ``status()`` at scrape time, so the broker needs no metrics code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rtchat.broker.base import BrokerStatus
from rtchat.broker.verdict import STATES as VERDICT_STATES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.clients = Gauge("rtchat_clients_connected", "Open SSE streams on this node", registry=r)
        self.published = Counter(
            "rtchat_messages_published", "Messages stored through this node", registry=r)
        self.delivered = Counter(
            "rtchat_messages_delivered", "Message frames queued to this node's streams", registry=r)
        self.fanout_latency = Histogram(
            "rtchat_fanout_latency_seconds", "Publish to fan-out on this node",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r)
        self.evicted = Counter(
            "rtchat_slow_clients_evicted", "Streams closed because their backlog overflowed",
            registry=r)
        self.rejected = Counter(
            "rtchat_requests_rejected", "Requests refused, by reason", ["reason"], registry=r)

    def watch_broker(self, status: Callable[[], BrokerStatus]) -> None:
        self.registry.register(_BrokerCollector(status))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BrokerCollector(Collector):
    """Redis endpoint health and the cluster verdict as gauges, read from ``broker.status()``
    at scrape time."""

    def __init__(self, status: Callable[[], BrokerStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        st = self._status()
        labels = ["endpoint", "role"]
        up = GaugeMetricFamily("rtchat_redis_endpoint_up", "Endpoint reachable", labels=labels)
        healthy = GaugeMetricFamily("rtchat_redis_endpoint_healthy", "Endpoint healthy",
                                    labels=labels)
        subscribed = GaugeMetricFamily(
            "rtchat_redis_endpoint_subscribed", "This node's subscription is on it", labels=labels)
        lag_b = GaugeMetricFamily("rtchat_redis_replication_lag_bytes", "Replica lag in bytes",
                                  labels=labels)
        lag_s = GaugeMetricFamily("rtchat_redis_replication_lag_seconds",
                                  "Replica lag in seconds", labels=labels)
        ping = GaugeMetricFamily("rtchat_redis_ping_seconds", "PING round trip", labels=labels)
        probe = GaugeMetricFamily("rtchat_redis_probe_seconds",
                                  "Master publish to own subscription delivery", labels=labels)
        for ep in st.endpoints:
            lv = [ep.url, ep.configured_role or ""]
            up.add_metric(lv, 1.0 if ep.reachable else 0.0)
            healthy.add_metric(lv, 1.0 if ep.healthy else 0.0)
            subscribed.add_metric(lv, 1.0 if ep.subscribed else 0.0)
            if ep.lag_bytes is not None:
                lag_b.add_metric(lv, float(ep.lag_bytes))
            if ep.lag_seconds is not None:
                lag_s.add_metric(lv, float(ep.lag_seconds))
            if ep.ping_ms is not None:
                ping.add_metric(lv, ep.ping_ms / 1000.0)
            if ep.probe_ms is not None:
                probe.add_metric(lv, ep.probe_ms / 1000.0)
        failovers = CounterMetricFamily("rtchat_redis_failovers", "Subscription endpoint switches")
        failovers.add_metric([], float(st.failover_count))
        # One series per state, 1 for the current one: alert on state!="healthy" == 1.
        verdict = GaugeMetricFamily(
            "rtchat_cluster_verdict", "The cluster verdict (1 = the current state), the same on "
            "every node", labels=["state"])
        for state in VERDICT_STATES:
            verdict.add_metric([state], 1.0 if st.verdict.state == state else 0.0)
        reasons = GaugeMetricFamily("rtchat_cluster_verdict_reasons",
                                    "How many reasons the cluster verdict gives")
        reasons.add_metric([], float(len(st.verdict.reasons)))
        yield from (up, healthy, subscribed, lag_b, lag_s, ping, probe, failovers, verdict,
                    reasons)
