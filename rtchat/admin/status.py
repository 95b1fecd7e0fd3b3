"""The admin status snapshot: one JSON document the admin page renders from.

Owns the shape of ``GET /admin/api/status`` (and of each ``/admin/api/events``
snapshot): ``verdict`` (the cluster in one word, with reasons: the same on
every node), ``node``, ``cluster`` (live nodes, and ``missing`` ones gone
without leaving), ``rooms`` (across the cluster), ``clients``, ``redis``
(with ``cluster_failovers``, every node's switches), ``ready`` and the
``topology`` layout. The page's one script (``admin/static/admin.js``)
renders all of it. It reads the hub and the broker through their public
methods and knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from rtchat.admin.pictures import sparkline, topology
from rtchat.admin.sampler import ThroughputSampler
from rtchat.broker.activity import rooms_view
from rtchat.hub import Hub

log = logging.getLogger("rtchat.admin")

MAX_CLIENTS_LISTED = 1000  # a full node has 20000; the page lists the oldest this many
MAX_ROOMS_LISTED = 200  # the cluster's busiest rooms
EMBEDDED_NOTE = "embedded broker: history and delivery live in this process; no Redis is configured"


async def build_status(hub: Hub, sampler: ThroughputSampler, version: str) -> dict[str, Any]:
    """A consistent-enough snapshot of this node and the cluster it sees. Never raises for a
    broker outage: an unreadable cluster shows this node alone, with the error."""
    now = time.time()
    broker = hub.broker
    rates = sampler.snapshot()
    stats = dict(hub.node_stats())
    node = {
        "id": hub.node_id,
        "version": version,
        "pid": os.getpid(),
        "started_at": hub.started_at,
        "uptime_seconds": round(now - hub.started_at, 1),
        "clients": hub.client_count,
        "rooms": stats.get("rooms"),
        "messages_in": hub.messages_in,
        "messages_out": hub.messages_out,
        "draining": hub.draining,
        "broker": broker.kind,
        **rates,
    }
    node["sparkline"] = sparkline(rates["series"]["in"], rates["series"]["out"], sampler.slots,
                                  sampler.interval)

    cluster_error = None
    try:
        nodes = [dict(n) for n in await broker.cluster_nodes()]
    except Exception as e:  # the broker owns retries; the page shows what it can
        log.debug("cluster view unavailable: %s", e)
        cluster_error = str(e) or type(e).__name__
        nodes = [{**stats, "last_seen": now, "endpoint": None}]
    for n in nodes:
        n["self"] = n.get("id") == hub.node_id
        if n["self"]:
            n.setdefault("pid", node["pid"])
        last_seen = n.get("last_seen")
        n["seen_seconds_ago"] = round(max(0.0, now - last_seen), 1) if isinstance(
            last_seen, (int, float)) else None

    streams = sorted(hub.streams(), key=lambda s: s.connected_at)
    clients = [s.info() for s in streams[:MAX_CLIENTS_LISTED]]

    broker_status = broker.status()
    redis = broker_status.to_dict()
    redis["embedded"] = broker.kind == "memory"
    if redis["embedded"]:
        redis["note"] = EMBEDDED_NOTE

    reasons = (["draining"] if hub.draining else []) + list(broker.readiness())
    rooms = rooms_view(nodes)
    for n in nodes:  # what the verdict and the rooms view are made of, not shown per node
        n.pop("view", None)
        n.pop("room_stats", None)
    return {
        "generated_at": now,
        "verdict": broker_status.verdict.to_dict(),
        "node": node,
        "cluster": {"nodes": nodes, "error": cluster_error,
                    "missing": [dict(n) for n in broker_status.missing_nodes]},
        "rooms": {"count": len(rooms), "listed": rooms[:MAX_ROOMS_LISTED]},
        "clients": {"count": len(streams), "listed": clients,
                    "truncated": len(streams) > len(clients)},
        "redis": redis,
        "ready": {"ready": not reasons, "reasons": reasons},
        "topology": topology(nodes, broker_status, hub.node_id),
    }
