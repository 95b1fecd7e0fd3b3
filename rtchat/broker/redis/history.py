"""Reading the room streams: recent history, resume with gap detection, ranges for catch-up.

Owns the read commands and the order endpoints are tried in: the master,
then the subscription's endpoint (the master goes last while it is known to
be down, so reads do not wait on it first), and the batching of resumes:
clients of one room resuming in the same moment (a dead node's clients
arriving all at once) share one read. Writes are ``publish``'s.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from rtchat.broker.base import Replay, replay_is_complete
from rtchat.broker.redis.endpoint import EndpointHealth, read_first
from rtchat.broker.redis.keys import Keys
from rtchat.broker.redis.tasks import start
from rtchat.messages import Message, id_key, valid_id


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


@dataclass
class _Resumes:
    """Resumes of one room waiting for their shared read."""

    eps: list[EndpointHealth]
    waiting: list[tuple[str, asyncio.Future[Replay]]] = field(default_factory=list)


class History:
    """The reads on ``<prefix>room:<room>``; each tries ``eps`` in turn."""

    def __init__(self, keys: Keys) -> None:
        self._keys = keys
        self._resumes: dict[str, _Resumes] = {}  # per room: the batch not yet read
        self._reads: set[asyncio.Future[None]] = set()  # the batches being read

    async def last(self, eps: list[EndpointHealth], room: str, limit: int) -> list[Message]:
        """The last ``limit`` messages, oldest first."""
        if limit <= 0:
            return []
        key = self._keys.stream(room)
        entries = await read_first(eps, lambda c: c.xrevrange(key, "+", "-", count=limit))
        return [to_message(room, e) for e in reversed(entries)]

    async def read_since(self, eps: list[EndpointHealth], room: str, last_id: str) -> Replay:
        """Every message after ``last_id``; ``truncated`` unless the ``prev`` chain proves no gap.

        Resumes of one room asked in the same loop turn share one read, from the lowest
        of their ids. It starts after every one of them was asked, so after each joined
        the room: what it does not hold reaches them live. ``ValueError`` for a
        malformed id.
        """
        if not valid_id(last_id):
            raise ValueError(f"not a message id: {last_id!r}")
        batch = self._resumes.get(room)
        if batch is None:
            batch = self._resumes[room] = _Resumes(eps)
            start(self._read_batch(room), f"redis-resume-{room}", self._reads)
        answer: asyncio.Future[Replay] = asyncio.get_running_loop().create_future()
        batch.waiting.append((last_id, answer))
        return await answer

    async def _read_batch(self, room: str) -> None:
        batch = self._resumes.pop(room)  # later resumes start the next batch
        waiting = [(last_id, answer) for last_id, answer in batch.waiting if not answer.done()]
        if not waiting:
            return
        start = min((last_id for last_id, _ in waiting), key=id_key)
        key = self._keys.stream(room)

        async def read(client: aioredis.Redis) -> list[Any]:
            # One MULTI, so the three reads see the same stream.
            async with client.pipeline(transaction=True) as pipe:
                pipe.xrange(key, "(" + start, "+")
                pipe.xrange(key, "-", "+", count=1)
                pipe.xrevrange(key, "+", "-", count=1)
                return await pipe.execute()

        try:
            after, first, newest = await read_first(batch.eps, read)
        except asyncio.CancelledError:  # the broker is closing
            for _, answer in waiting:
                answer.cancel()
            raise
        except Exception as e:
            for _, answer in waiting:
                if not answer.done():
                    answer.set_exception(e)
            return
        msgs = [to_message(room, e) for e in after]
        keys = [id_key(m.id) for m in msgs]
        oldest = first[0][0] if first else ""
        newest_id = newest[0][0] if newest else None
        for last_id, answer in waiting:
            if answer.done():
                continue  # its client went away meanwhile
            mine = msgs[bisect.bisect_right(keys, id_key(last_id)):]
            ok = replay_is_complete(last_id, mine[0].prev if mine else None, newest_id)
            answer.set_result(Replay(mine, truncated=not ok, oldest=oldest))

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
