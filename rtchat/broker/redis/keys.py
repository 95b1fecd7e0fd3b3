"""Every Redis key and pub/sub channel rtchat uses, named in one place.

All names start with ``redis.key_prefix``:

* ``<prefix>room:<room>``     the room's stream (history; the ``prev`` chain)
* ``<prefix>ch:<room>``       the room's channel (the stored entry, published)
* ``<prefix>probe:<node>``    a node's private delivery-probe channel
* ``<prefix>node:<node>``     a node's heartbeat (TTL'd JSON)
* ``<prefix>presence:<room>`` per-room presence hash (field = node id)
* ``<prefix>idem:<room>:<key>`` an idempotency key's first answer (TTL'd hash)
* ``<prefix>bans``            banned users (hash: user -> JSON with until, reason, by)
* ``<prefix>members``         node id -> its last heartbeat time: who should be alive
* ``<prefix>failovers``       every node's subscription switches (a capped list, newest first)

In cluster mode (``ClusterKeys``) every name of a room carries the room as
its hash tag, so a room's stream, channel, idempotency keys and presence
live in one slot (one shard, one atomic script):

* ``<prefix>{<room>}:room``, ``<prefix>{<room>}:ch``, ``<prefix>{<room>}:idem:<key>``,
  ``<prefix>{<room>}:presence``
* ``<prefix>{nodes}:node:<node>`` and ``<prefix>{bans}:bans``: global, each under its own tag
* ``<prefix>{probe:<node>:<n>}:probe``: a probe channel whose tag lands on a given shard

Pure: no I/O, no redis import.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """The names for one node under one prefix."""

    prefix: str
    node_id: str

    def stream(self, room: str) -> str:
        return f"{self.prefix}room:{room}"

    @property
    def channel_prefix(self) -> str:
        return f"{self.prefix}ch:"

    def channel(self, room: str) -> str:
        return self.channel_prefix + room

    def room_of(self, channel: str) -> str:
        """The room of a channel made by ``channel`` (only those are ever subscribed)."""
        return channel[len(self.channel_prefix):]

    @property
    def probe_channel(self) -> str:
        return f"{self.prefix}probe:{self.node_id}"

    def node(self, node_id: str) -> str:
        """A node's heartbeat key; ``node("*")`` is the pattern that finds them all."""
        return f"{self.prefix}node:{node_id}"

    @property
    def own_node(self) -> str:
        return self.node(self.node_id)

    @property
    def node_pattern(self) -> str:
        return self.node("*")

    def presence(self, room: str) -> str:
        return f"{self.prefix}presence:{room}"

    @property
    def bans(self) -> str:
        return f"{self.prefix}bans"

    def idempotency(self, room: str, key: str) -> str:
        return f"{self.prefix}idem:{room}:{key}"

    @property
    def members(self) -> str:
        return f"{self.prefix}members"

    @property
    def failovers(self) -> str:
        return f"{self.prefix}failovers"

@dataclass(frozen=True, slots=True)
class ClusterKeys(Keys):
    """The names in cluster mode: a room's names share the hash tag ``{<room>}``.

    Room names never hold ``{`` or ``}`` (``messages.ROOM_RE``), so the tag is the room.
    """

    def stream(self, room: str) -> str:
        return f"{self.prefix}{{{room}}}:room"

    @property
    def channel_prefix(self) -> str:
        return f"{self.prefix}{{"

    def channel(self, room: str) -> str:
        return f"{self.prefix}{{{room}}}:ch"

    def room_of(self, channel: str) -> str:
        return channel[len(self.channel_prefix):-len("}:ch")]

    def probe_for(self, n: int) -> str:
        """This node's ``n``-th candidate probe channel (the shard picks one of its slots)."""
        return f"{self.prefix}{{probe:{self.node_id}:{n}}}:probe"

    @property
    def probe_channel(self) -> str:
        return self.probe_for(0)

    def node(self, node_id: str) -> str:
        return f"{self.prefix}{{nodes}}:node:{node_id}"

    def presence(self, room: str) -> str:
        return f"{self.prefix}{{{room}}}:presence"

    @property
    def bans(self) -> str:
        return f"{self.prefix}{{bans}}:bans"

    @property
    def members(self) -> str:
        return f"{self.prefix}{{nodes}}:members"

    @property
    def failovers(self) -> str:
        return f"{self.prefix}{{failovers}}:failovers"

    def idempotency(self, room: str, key: str) -> str:
        return f"{self.prefix}{{{room}}}:idem:{key}"
