"""What a resuming stream missed: the replay, and ``reset`` where history has a gap.

A single-room stream resumes after a message id; a multi-room stream after
a cursor (rtchat.cursor) naming each room's position. Live messages that
arrive meanwhile are queued (single room: skipped up to the replay's end;
multi-room: held until ``start_live``), so nothing is lost or sent twice.
Knows the Broker protocol and the stream, nothing of HTTP.
"""

from __future__ import annotations

import asyncio

from rtchat import cursor as cursor_mod
from rtchat import sse
from rtchat.broker.base import Broker
from rtchat.stream import Stream


async def catch_up(broker: Broker, stream: Stream, last_id: str) -> list[bytes]:
    """The frames a client resuming after ``last_id`` missed, ``reset`` first on a gap; the
    stream then skips live messages the replay already covered."""
    replay = await broker.read_since(stream.room, last_id)
    frames = []
    if replay.truncated:
        frames.append(sse.json_event(
            "reset", {"reason": "history_truncated", "oldest": replay.oldest}))
    frames += [sse.message(msg.id, msg.public_json()) for msg in replay.messages]
    newest = replay.messages[-1].id if replay.messages else last_id
    stream.skip_through(newest)
    stream.last_event_id = newest
    return frames


async def catch_up_rooms(broker: Broker, stream: Stream, resumed: dict[str, cursor_mod.Key]
                         ) -> list[bytes]:
    """Replay what the resumed rooms missed; the others start from their newest id."""
    fresh = [r for r in stream.rooms if r not in resumed]
    newest = await asyncio.gather(*(broker.history(r, 1) for r in fresh))
    start = {r: (h[-1].key if h else (0, 0)) for r, h in zip(fresh, newest, strict=True)}
    encoder = cursor_mod.Encoder({r: resumed.get(r) or start[r] for r in stream.rooms})
    frames = []
    for room, key in resumed.items():
        replay = await broker.read_since(room, cursor_mod.id_of(key))
        if replay.truncated:
            frames.append(sse.json_event("reset", {"reason": "history_truncated",
                                                   "oldest": replay.oldest, "room": room}))
        for msg in replay.messages:
            frames.append(sse.message(encoder.advance(room, msg.key), msg.public_json()))
    stream.start_live(encoder)
    return frames
