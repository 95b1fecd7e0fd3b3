"""What this node tells the cluster, and what it reads back: heartbeats, history, verdict.

Owns this node's share of the heartbeat (what it reads from, its view of
every endpoint, its rooms), the failover history (``failovers``), the room
activity (``rtchat.broker.activity``) and the cluster verdict judged at the
end of each health round from every node's heartbeat
(``rtchat.broker.verdict``). The heartbeat and presence records themselves
are ``cluster``'s; this module decides what goes in them and what to make
of what comes back. The broker hands it endpoints, never the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rtchat.broker.activity import RoomActivity
from rtchat.broker.base import EndpointStatus, Failover, Verdict
from rtchat.broker.redis.cluster import ClusterState
from rtchat.broker.redis.endpoint import EndpointHealth
from rtchat.broker.redis.failovers import FailoverLog
from rtchat.broker.redis.keys import Keys
from rtchat.broker.verdict import judge, node_view, probe_slow_ms


class ClusterView:
    """This node's heartbeat payload, the failover history and the cluster verdict."""

    def __init__(self, keys: Keys, heartbeat_ttl: int, check_timeout: float,
                 max_replica_lag_seconds: float) -> None:
        self.node_id = keys.node_id
        self.state = ClusterState(keys, heartbeat_ttl, check_timeout)
        self.failovers = FailoverLog(keys, check_timeout)
        self.activity = RoomActivity()
        self.verdict = Verdict()
        self.missing: list[dict[str, Any]] = []
        self._slow_ms = probe_slow_ms(max_replica_lag_seconds)
        self._late_after = heartbeat_ttl * 2 / 3  # two of three heartbeats missed, at least

    def share(self, endpoint: str | None, endpoints: Sequence[EndpointStatus],
              not_ready: Sequence[str]) -> dict[str, Any]:
        """This node's part of its heartbeat: what it reads from, its view, its rooms."""
        return {"endpoint": endpoint, "view": node_view(endpoints, not_ready),
                "room_stats": self.activity.rooms(self.state.local_clients())}

    def record(self, failover: Failover) -> Failover:
        return self.failovers.record(failover)

    async def beat(self, master: EndpointHealth, share: dict[str, Any]) -> None:
        """Write the heartbeat, then any failover not yet in Redis."""
        await self.state.heartbeat(master, share)
        await self.failovers.flush(master)

    async def observe(self, eps: list[EndpointHealth], master: EndpointHealth | None,
                      share: dict[str, Any]) -> None:
        """Read every heartbeat and the failover history back, and judge the cluster."""
        nodes, self.missing = await self.state.nodes(eps, master, share)
        await self.failovers.read(eps)
        self.verdict = judge([*nodes, *self.missing], self.node_id, share["view"], time.time(),
                             self._late_after, self._slow_ms)

    async def nodes(self, eps: list[EndpointHealth], master: EndpointHealth | None,
                    share: dict[str, Any]) -> list[dict[str, Any]]:
        """Every node with a live heartbeat (this node alone when Redis cannot answer)."""
        nodes, _ = await self.state.nodes(eps, master, share)
        return nodes

    def missing_nodes(self) -> tuple[dict[str, Any], ...]:
        return tuple({"id": n["id"], "last_seen": n["last_seen"]} for n in self.missing)
