"""Per-room activity on this node, for the cluster's rooms view: clients and messages.

Owns a one-minute window of the messages stored through this node, per room
(one bucket per second, so a busy room costs 60 counters), and the shape
each broker puts in its heartbeat: ``{room: {"clients": n, "per_minute": m}}``
for this node's busiest rooms. Summed over every node's heartbeat, that is
the cluster's rooms view: each message is stored by exactly one node, and
each client streams from exactly one. Pure: no I/O.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

WINDOW = 60  # seconds of message counts kept per room
ROOMS_IN_HEARTBEAT = 200  # a node's busiest rooms; the rest are left out of the view


class RoomActivity:
    """Messages stored through this node per room over the last ``WINDOW`` seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, deque[list[int]]] = {}  # room -> [[second, count], ...]

    def note(self, room: str) -> None:
        """One message stored in ``room``."""
        now = int(self._clock())
        buckets = self._buckets.get(room)
        if buckets is None:
            buckets = self._buckets[room] = deque()
        if buckets and buckets[-1][0] == now:
            buckets[-1][1] += 1
        else:
            buckets.append([now, 1])
            while buckets[0][0] <= now - WINDOW:
                buckets.popleft()

    def per_minute(self) -> dict[str, int]:
        """Messages per room over the last minute; rooms silent that long are dropped."""
        horizon = int(self._clock()) - WINDOW
        out = {}
        for room in list(self._buckets):
            buckets = self._buckets[room]
            while buckets and buckets[0][0] <= horizon:
                buckets.popleft()
            if buckets:
                out[room] = sum(c for _, c in buckets)
            else:
                del self._buckets[room]
        return out

    def rooms(self, clients: Mapping[str, int], limit: int = ROOMS_IN_HEARTBEAT
              ) -> dict[str, dict[str, Any]]:
        """This node's share of the rooms view: its busiest ``limit`` rooms by clients, then
        by messages."""
        rates = self.per_minute()
        names = set(rates) | {r for r, c in clients.items() if c > 0}
        ranked = sorted(names, key=lambda r: (-clients.get(r, 0), -rates.get(r, 0), r))[:limit]
        return {r: {"clients": int(clients.get(r, 0)), "per_minute": rates.get(r, 0)}
                for r in ranked}


def rooms_view(nodes: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The cluster's rooms from every live node's heartbeat: clients and messages per minute
    summed over nodes, busiest first."""
    total: dict[str, dict[str, Any]] = {}
    for n in nodes:
        if n.get("missing"):
            continue
        rooms = n.get("room_stats")
        if not isinstance(rooms, Mapping):
            continue
        for room, st in rooms.items():
            if not isinstance(st, Mapping):
                continue
            t = total.setdefault(str(room), {"room": str(room), "clients": 0, "per_minute": 0,
                                             "nodes": 0})
            t["clients"] += int(st.get("clients") or 0)
            t["per_minute"] += int(st.get("per_minute") or 0)
            t["nodes"] += 1 if st.get("clients") else 0
    return sorted(total.values(), key=lambda t: (-t["clients"], -t["per_minute"], t["room"]))
