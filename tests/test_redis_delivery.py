"""rtchat/broker/redis/delivery.py: the prev-chain rules, with a fake stream instead of Redis."""

from __future__ import annotations

import asyncio
import json

from rtchat.broker.redis.delivery import Delivery, RoomState
from rtchat.messages import Message, id_key


def stored(n: int, room: str = "r") -> list[Message]:
    """A stream of ``n`` messages with ids 1-0 .. n-0, each naming the one before."""
    msgs = []
    prev = ""
    for i in range(1, n + 1):
        msgs.append(Message(id=f"{i}-0", room=room, nick="ann", text=f"m{i}", ts=float(i),
                            node="n", prev=prev))
        prev = f"{i}-0"
    return msgs


def payload(m: Message) -> str:
    """What publish.lua PUBLISHes for a stored message."""
    body = json.dumps({"nick": m.nick, "text": m.text, "ts": m.ts, "node": m.node})
    return f"{m.id}\n{m.prev}\n{body}"


class FakeStream:
    """A ReadRange over a list, recording every read."""

    def __init__(self, msgs: list[Message]) -> None:
        self.msgs = msgs
        self.reads: list[tuple[str, str]] = []

    async def __call__(self, after: str, until: str) -> list[Message]:
        self.reads.append((after, until))
        lo = id_key(after) if after else (0, 0)
        hi = None if until == "+" else id_key(until)
        return [m for m in self.msgs if m.key > lo and (hi is None or m.key <= hi)]


def room_state() -> RoomState:
    return RoomState("r", asyncio.get_running_loop().create_future())


def test_in_order_messages_need_no_read() -> None:
    async def scenario() -> None:
        got: list[Message] = []
        d, stream = Delivery(got.append), FakeStream(stored(3))
        state = room_state()
        d.start_after(state, "1-0")
        for m in stream.msgs[1:]:
            await d.live(state, payload(m), stream)
        assert [m.id for m in got] == ["2-0", "3-0"] and stream.reads == []
        assert got[0] == stream.msgs[1]

    asyncio.run(scenario())


def test_a_gap_is_filled_from_the_stream_before_the_live_message() -> None:
    async def scenario() -> None:
        got: list[Message] = []
        d, stream = Delivery(got.append), FakeStream(stored(5))
        state = room_state()
        d.start_after(state, "1-0")
        await d.live(state, payload(stream.msgs[4]), stream)  # 2..4 never arrived live
        assert [m.id for m in got] == ["2-0", "3-0", "4-0", "5-0"]
        assert stream.reads == [("1-0", "5-0")]
        for m in stream.msgs[1:]:  # late or repeated: duplicates, dropped
            await d.live(state, payload(m), stream)
        assert len(got) == 4 and state.last == "5-0"

    asyncio.run(scenario())


def test_an_empty_room_starts_from_the_beginning() -> None:
    async def scenario() -> None:
        got: list[Message] = []
        d, stream = Delivery(got.append), FakeStream(stored(2))
        state = room_state()
        d.start_after(state, "")
        await d.live(state, payload(stream.msgs[1]), stream)
        assert [m.id for m in got] == ["1-0", "2-0"] and stream.reads == [("", "2-0")]

    asyncio.run(scenario())


def test_catch_up_replays_what_was_missed_and_counts_it() -> None:
    async def scenario() -> None:
        got: list[Message] = []
        d, stream = Delivery(got.append), FakeStream(stored(4))
        state = room_state()
        d.start_after(state, "2-0")
        assert await d.catch_up(state, stream) == 2
        assert [m.id for m in got] == ["3-0", "4-0"] and stream.reads == [("2-0", "+")]
        assert await d.catch_up(state, stream) == 0

    asyncio.run(scenario())


def test_a_malformed_payload_is_ignored_and_a_failing_callback_does_not_stop_delivery() -> None:
    async def scenario() -> None:
        calls: list[str] = []

        def deliver(m: Message) -> None:
            calls.append(m.id)
            raise RuntimeError("a broken hub")

        d, stream = Delivery(deliver), FakeStream(stored(2))
        state = room_state()
        d.start_after(state, "")
        await d.live(state, "not ours", stream)
        await d.live(state, "1-0\n\n{}", stream)  # no fields
        assert calls == [] and state.last == ""
        for m in stream.msgs:
            await d.live(state, payload(m), stream)
        assert calls == ["1-0", "2-0"] and state.last == "2-0"

    asyncio.run(scenario())
