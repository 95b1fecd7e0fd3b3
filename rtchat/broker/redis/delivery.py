"""Live delivery in ``prev``-chain order: per room, the id last delivered, and the gap fill.

Owns ``RoomState`` (a subscribed room: the id this node last delivered and
when its subscription is confirmed) and the rules that keep delivery exact:

* a new room starts after the stream's current end;
* after a switch, everything stored since the last delivered id is replayed;
* a live message whose ``prev`` is not the last delivered id is preceded by
  the missing ones, read from the stream (the endpoint applied the ``XADD``
  before it passed on the ``PUBLISH``); anything at or below the last
  delivered id is a duplicate and dropped.

History is reached through a ``ReadRange`` function, so the rules can be
tested with a fake one; nothing here knows Redis or the subscription.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from rtchat.broker.base import BrokerUnavailable, Deliver
from rtchat.broker.redis.tasks import start
from rtchat.messages import Message, id_key

log = logging.getLogger("rtchat.broker.redis")

ZERO = (0, 0)

ReadRange = Callable[[str, str], Awaitable[list[Message]]]
"""``read(after, until)``: the room's stored messages with ids above ``after`` ("" = from
the start) up to and including ``until`` ("+" = the end), oldest first."""


@dataclass(eq=False)
class RoomState:
    """A subscribed room: the id this node last delivered ("" = the room was empty)."""

    room: str
    ready: asyncio.Future[None]  # done once the first subscription confirmed it
    last: str | None = None  # None until the first subscription confirmed it
    key: tuple[int, int] = ZERO
    sent_on: object | None = None  # the subscription its SUBSCRIBE went out on


async def wait_confirmed(state: RoomState, timeout: float, rooms: Mapping[str, RoomState],
                         unsubscribe: Callable[[str], Coroutine[Any, Any, None]],
                         background: set[asyncio.Future[None]]) -> None:
    """Wait until the room's subscription is confirmed. On a timeout, or a caller that
    gives up, the subscribe is rolled back: ``unsubscribe(room)`` runs in the background
    (kept in ``background``) unless another subscribe has replaced ``state`` in ``rooms``.
    BrokerUnavailable unless the caller was cancelled."""
    def roll_back() -> None:
        if rooms.get(state.room) is state and not state.ready.done():
            start(unsubscribe(state.room), f"redis-unsubscribe-{state.room}", background)

    try:
        await asyncio.wait_for(asyncio.shield(state.ready), timeout)
    except asyncio.CancelledError:
        if not state.ready.cancelled():
            roll_back()  # our caller gave up
            raise
        raise BrokerUnavailable("unsubscribed while subscribing") from None
    except asyncio.TimeoutError:
        roll_back()
        raise BrokerUnavailable("no Redis endpoint confirmed the subscription") from None


class Delivery:
    """Passes each room's messages to ``deliver`` once, in order, with no gap."""

    def __init__(self, deliver: Deliver | None = None) -> None:
        self.deliver = deliver

    def start_after(self, state: RoomState, newest: str) -> None:
        """A new room: everything after ``newest`` (its stream's end, "" if empty) is delivered."""
        state.last = newest
        state.key = id_key(newest) if newest else ZERO

    async def confirmed(self, state: RoomState, newest: Callable[[], Awaitable[str]],
                        read: ReadRange) -> int:
        """A (re)subscription of the room is confirmed: a new room starts after ``newest()``,
        a known one catches up from its last delivered id; then the room is ready. Returns
        how many messages the catch-up delivered."""
        replayed = 0
        if state.last is None:
            self.start_after(state, await newest())
        else:
            replayed = await self.catch_up(state, read)
        if not state.ready.done():
            state.ready.set_result(None)
        return replayed

    async def catch_up(self, state: RoomState, read: ReadRange) -> int:
        """After a switch: deliver what the room got since its last delivered id."""
        n = 0
        for m in await read(state.last or "", "+"):
            if m.key > state.key:
                self._emit(state, m)
                n += 1
        return n

    async def live(self, state: RoomState, data: str, read: ReadRange,
                   channel: str = "") -> None:
        """One message as published; fills a gap in the ``prev`` chain from ``read`` first."""
        try:
            mid, prev, body = data.split("\n", 2)
            key = id_key(mid)
            fields = json.loads(body)
            msg = Message(id=mid, room=state.room, nick=fields["nick"], text=fields["text"],
                          ts=float(fields["ts"]), node=fields["node"], prev=prev,
                          user=fields.get("user", ""))
        except (ValueError, KeyError, TypeError):
            # Not from our script: someone else publishes on our channel. Not a failover.
            log.warning("ignored a malformed message on %s", channel or state.room)
            return
        if key <= state.key:
            return  # a duplicate: delivered already (catch-up or gap fill)
        if prev != state.last:
            # Missed something: the stream has it (this endpoint applied the XADD
            # before it passed on the PUBLISH), so fill the gap up to this message.
            for m in await read(state.last or "", mid):
                if state.key < m.key < key:
                    self._emit(state, m)
        self._emit(state, msg, key)

    def _emit(self, state: RoomState, msg: Message, key: tuple[int, int] | None = None) -> None:
        state.last = msg.id
        state.key = key if key is not None else msg.key
        deliver = self.deliver
        if deliver is not None:
            try:
                deliver(msg)
            except Exception:
                log.exception("deliver callback failed for %s in %s", msg.id, msg.room)
