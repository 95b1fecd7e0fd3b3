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

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
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


class KeyConflict(Exception):
    """An idempotency key already used in this room for a message with other content."""


@dataclass(frozen=True, slots=True)
class Published:
    """A stored message. ``replicated`` is None when there is nothing to replicate to.

    ``duplicate`` is True when the send's idempotency key had already stored this
    message: nothing was stored or announced again.
    """

    message: Message
    replicated: bool | None = None
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Ban:
    """A user id (an address in anonymous mode) barred from sending and streaming until ``until``."""

    user: str
    until: float
    reason: str = ""
    by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user, "until": self.until, "reason": self.reason, "by": self.by}


def content_digest(nick: str, text: str, user: str = "") -> str:
    """What an idempotency key is bound to: the same key must carry the same message."""
    return hashlib.sha256(f"{user}\0{nick}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()


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


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """What the last health check saw of one Redis server. None = not known (yet)."""

    url: str  # credentials masked
    configured_role: str  # "master" | "replica": the part it plays for this node
    reachable: bool | None
    role: str | None  # what the server itself says it is
    master_link_status: str | None  # a replica's link to its master ("up", "down", ...)
    lag_bytes: int | None
    lag_seconds: float | None
    ping_ms: float | None
    probe_ms: float | None  # master publish -> this node's subscription on this endpoint
    last_error: str | None
    healthy: bool
    subscribed: bool  # this node's subscription is on it
    down_since: float | None = None  # unix time this node first saw it unhealthy; None = healthy
    problem: str | None = None  # why it is unhealthy now (None when healthy)


@dataclass(frozen=True, slots=True)
class Failover:
    """One move of the subscription. ``from_`` is ``"from"`` in JSON (a Python keyword)."""

    at: float  # unix time the switch began
    from_: str
    to: str
    reason: str
    recovered: int  # messages replayed from the streams after the switch
    node: str = ""  # the node whose subscription moved

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "from": self.from_, "to": self.to, "reason": self.reason,
                "recovered": self.recovered, "node": self.node}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Failover:
        return cls(at=float(d["at"]), from_=str(d.get("from") or ""), to=str(d.get("to") or ""),
                   reason=str(d.get("reason") or ""), recovered=int(d.get("recovered") or 0),
                   node=str(d.get("node") or ""))


@dataclass(frozen=True, slots=True)
class Verdict:
    """The cluster in one word, with the reasons: ``healthy``, ``degraded`` or ``down``.

    Judged by ``rtchat.broker.verdict.judge`` from what every node shares; the
    embedded broker is one node with nothing to go wrong between nodes: healthy.
    """

    state: str = "healthy"
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "reasons": list(self.reasons)}


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """One shard of a Redis Cluster: its slots, servers, health and what this node reads."""

    slots: tuple[tuple[int, int], ...]  # inclusive slot ranges
    master: str | None
    replicas: tuple[str, ...]
    healthy: bool  # its master takes writes and this node's subscription on it delivers
    reading: str | None  # the server this node's sharded subscription is on
    rooms: int  # this node's rooms in it
    endpoints: tuple[EndpointStatus, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"slots": [list(r) for r in self.slots], "master": self.master,
                "replicas": list(self.replicas), "healthy": self.healthy,
                "reading": self.reading, "rooms": self.rooms,
                "endpoints": [asdict(ep) for ep in self.endpoints]}


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    """Health of every endpoint, the subscription endpoint and the failover history.

    ``to_dict()`` is the JSON shape the admin page and its JavaScript read.
    """

    backend: str  # "memory" | "redis"
    master: str | None
    subscribed_endpoint: str | None
    endpoints: tuple[EndpointStatus, ...] = ()
    failovers: tuple[Failover, ...] = ()  # this node's, oldest first, the last FAILOVER_HISTORY
    failover_count: int = 0  # every switch of this node since start, not only those kept
    # Every node's switches, as kept in Redis (capped), oldest first: the same on every node.
    cluster_failovers: tuple[Failover, ...] = ()
    verdict: Verdict = field(default_factory=Verdict)
    # Nodes gone without leaving: ``{"id", "last_seen"}``, listed until forgotten.
    missing_nodes: tuple[Mapping[str, Any], ...] = ()
    shards: tuple[ShardStatus, ...] = ()  # Redis Cluster mode only

    def to_dict(self) -> dict[str, Any]:
        out = {"backend": self.backend, "master": self.master,
               "subscribed_endpoint": self.subscribed_endpoint,
               "endpoints": [asdict(ep) for ep in self.endpoints],
               "failovers": [f.to_dict() for f in self.failovers],
               "failover_count": self.failover_count,
               "cluster_failovers": [f.to_dict() for f in self.cluster_failovers],
               "verdict": self.verdict.to_dict(),
               "missing_nodes": [dict(n) for n in self.missing_nodes]}
        if self.shards:  # (absent otherwise: the single-master document is unchanged)
            out["shards"] = [s.to_dict() for s in self.shards]
        return out


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

    async def publish(self, room: str, nick: str, text: str, key: str | None = None,
                      user: str = "") -> Published:
        """Store a message (and announce it); returns only once it is in history.

        With ``key`` (an idempotency key), a second send with the same key in the
        same room within ``history.dedup_seconds`` of the first stores nothing and
        returns the first message with ``duplicate=True``; the check and the store
        are one atomic step. Raises KeyConflict when the key was used for other
        content, BrokerUnavailable when it cannot be stored.
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

    async def ban(self, ban: Ban) -> None:
        """Bar ``ban.user`` on every node until ``ban.until`` (BrokerUnavailable when it cannot)."""

    async def unban(self, user: str) -> bool:
        """Lift a ban; False when there was none."""

    def banned(self, user: str) -> Ban | None:
        """The ban on ``user`` as this node last saw it (never waits: sends check it)."""

    def bans(self) -> list[Ban]:
        """Every ban in force, as this node last saw them."""

    def readiness(self) -> list[str]:
        """Reasons this node cannot publish or receive now; empty when ready."""

    def status(self) -> BrokerStatus:
        """Health of every endpoint, the subscription endpoint and the failover history."""
