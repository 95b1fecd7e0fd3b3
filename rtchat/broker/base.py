"""The Broker protocol: what the hub and the handlers may ask of a message bus.

Two implementations stand behind it: ``memory.MemoryBroker`` (the embedded,
single-node default) and ``redis.RedisBroker`` (master publisher, replica
subscriber, health, probe, failover). The hub and the web layer know only
this module; nothing here imports tornado or redis.

Delivery contract: once ``subscribe(room)`` has returned, every message
stored in that room afterwards is passed to the ``deliver`` callback given
to ``start`` exactly once, in id order, with no gap (a broker that notices a
gap in the ``prev`` chain fills it from history before delivering). The
callback is called from the event loop and never blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from rtchat.messages import Message

Deliver = Callable[[Message], None]
NodeStats = Callable[[], Mapping[str, Any]]


class BrokerUnavailable(Exception):
    """The broker cannot store or read now (e.g. the Redis master is down).

    Handlers answer 503 with ``Retry-After: retry_after``. Never a user error.
    """

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Published:
    """A stored message. ``replicated`` is None when there is nothing to replicate to."""

    message: Message
    replicated: bool | None = None


@dataclass(frozen=True, slots=True)
class Replay:
    """What history holds after a client's last id.

    ``truncated`` is True when history no longer covers everything after
    that id (trimmed, expired, lost in a restart); ``oldest`` is then the
    oldest id still held ("" if the room's history is empty).
    """

    messages: list[Message]
    truncated: bool = False
    oldest: str = ""


@dataclass(frozen=True, slots=True)
class Presence:
    """Who is in a room across the whole cluster."""

    count: int
    nicks: list[str] = field(default_factory=list)


FROM_START = "0-0"  # a resume id meaning "everything the room holds": no message has this id


def replay_is_complete(last_id: str, first_prev: str | None, newest: str | None) -> bool:
    """Whether history holds every message after ``last_id`` (the ``prev`` chain decides).

    ``first_prev`` is the ``prev`` of the first message after ``last_id`` (None if
    there is none), ``newest`` the newest id held (None if the room is empty).
    """
    if last_id == FROM_START:
        return first_prev is None or first_prev == ""
    if first_prev is not None:
        return first_prev == last_id
    return newest == last_id


class Broker(Protocol):
    """A message bus with per-room history. See the module docstring for the delivery contract."""

    kind: str  # "memory" | "redis"

    async def start(self, deliver: Deliver, node_stats: NodeStats) -> None:
        """Connect and begin background work. ``node_stats()`` is this node's heartbeat payload."""

    async def close(self) -> None:
        """Stop background work and close connections. Safe to call twice."""

    async def publish(self, room: str, nick: str, text: str) -> Published:
        """Store a message (and announce it); returns only once it is in history.

        Raises BrokerUnavailable when it cannot be stored.
        """

    async def history(self, room: str, limit: int) -> list[Message]:
        """The last ``limit`` messages of a room, oldest first."""

    async def read_since(self, room: str, last_id: str) -> Replay:
        """Every message after ``last_id``, oldest first, with gap detection."""

    async def subscribe(self, room: str) -> None:
        """Start live delivery for ``room``; returns once delivery is guaranteed."""

    async def unsubscribe(self, room: str) -> None:
        """Stop live delivery for ``room``."""

    async def set_presence(self, room: str, nicks: Mapping[str, int]) -> None:
        """Record this node's clients in ``room`` (nick -> open streams; empty = none)."""

    async def presence(self, room: str) -> Presence:
        """Cluster-wide presence for ``room``."""

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        """Every live node's last heartbeat (``node_stats()`` plus ``last_seen``)."""

    def readiness(self) -> list[str]:
        """Reasons this node cannot publish or receive now; empty when ready."""

    def status(self) -> dict[str, Any]:
        """Health of every endpoint, the subscription endpoint and the failover history.

        Shape: ``{"backend", "master", "subscribed_endpoint", "endpoints": [
        {"url", "configured_role", "reachable", "role", "master_link_status",
        "lag_bytes", "lag_seconds", "ping_ms", "probe_ms", "last_error",
        "healthy", "subscribed"}], "failovers": [{"at", "from", "to",
        "reason", "recovered"}], "failover_count"}``.
        """
