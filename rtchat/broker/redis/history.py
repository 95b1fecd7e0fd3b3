"""Reading the room streams: recent history, resume with gap detection, ranges for catch-up.

Owns the read commands and the order endpoints are tried in: the master,
then the subscription's endpoint (the master goes last while it is known to
be down, so reads do not wait on it first). Writes are ``publish``'s.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from rtchat.broker.base import Replay, replay_is_complete
from rtchat.broker.redis.endpoint import EndpointHealth, read_first
from rtchat.broker.redis.keys import Keys
from rtchat.messages import Message, valid_id


def read_order(master: EndpointHealth | None, subscribed: EndpointHealth | None
               ) -> list[EndpointHealth]:
    """Where to read: the master, then the subscription endpoint; a master known down last."""
    eps: list[EndpointHealth] = []
    if master is not None and master.reachable is not False:
        eps.append(master)
    if subscribed is not None and subscribed not in eps:
        eps.append(subscribed)
    if master is not None and master not in eps:
        eps.append(master)
    return eps


def to_message(room: str, entry: Any) -> Message:
    """A stream entry ``(id, fields)`` as a Message."""
    mid, fields = entry
    return Message(id=mid, room=room, nick=fields.get("nick", ""),
                   text=fields.get("text", ""), ts=float(fields.get("ts") or 0.0),
                   node=fields.get("node", ""), prev=fields.get("prev", ""),
                   user=fields.get("user", ""))


class History:
    """The reads on ``<prefix>room:<room>``; each tries ``eps`` in turn."""

    def __init__(self, keys: Keys) -> None:
        self._keys = keys

    async def last(self, eps: list[EndpointHealth], room: str, limit: int) -> list[Message]:
        """The last ``limit`` messages, oldest first."""
        if limit <= 0:
            return []
        key = self._keys.stream(room)
        entries = await read_first(eps, lambda c: c.xrevrange(key, "+", "-", count=limit))
        return [to_message(room, e) for e in reversed(entries)]

    async def read_since(self, eps: list[EndpointHealth], room: str, last_id: str) -> Replay:
        """Every message after ``last_id``; ``truncated`` unless the ``prev`` chain proves no gap.

        ``ValueError`` for a malformed id.
        """
        if not valid_id(last_id):
            raise ValueError(f"not a message id: {last_id!r}")
        key = self._keys.stream(room)

        async def read(client: aioredis.Redis) -> list[Any]:
            # One MULTI, so the three reads see the same stream.
            async with client.pipeline(transaction=True) as pipe:
                pipe.xrange(key, "(" + last_id, "+")
                pipe.xrange(key, "-", "+", count=1)
                pipe.xrevrange(key, "+", "-", count=1)
                return await pipe.execute()

        after, first, newest = await read_first(eps, read)
        msgs = [to_message(room, e) for e in after]
        oldest = first[0][0] if first else ""
        ok = replay_is_complete(last_id, msgs[0].prev if msgs else None,
                                newest[0][0] if newest else None)
        return Replay(msgs, truncated=not ok, oldest=oldest)

    async def newest_id(self, eps: list[EndpointHealth], room: str) -> str:
        """The id of the room's newest message; "" when the stream is empty."""
        key = self._keys.stream(room)
        newest = await read_first(eps, lambda c: c.xrevrange(key, "+", "-", count=1))
        return newest[0][0] if newest else ""

    async def range(self, eps: list[EndpointHealth], room: str, after: str, until: str
                    ) -> list[Message]:
        """Messages with ids above ``after`` ("" = all) up to ``until`` ("+" = the end)."""
        key = self._keys.stream(room)
        start = "(" + after if after else "-"
        entries = await read_first(eps, lambda c: c.xrange(key, start, until))
        return [to_message(room, e) for e in entries]
