"""The hub's stream outbox and room bookkeeping, with the embedded broker."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from conftest import make_config
from probes import async_wait_for

from rtchat import hub as hub_mod
from rtchat.broker.base import replay_is_complete
from rtchat.broker.memory import MemoryBroker
from rtchat.hub import Hub
from rtchat.metrics import Metrics
from rtchat.stream import Stream


@contextlib.asynccontextmanager
async def running_hub(broker_class: type[MemoryBroker] = MemoryBroker) -> AsyncIterator[Hub]:
    """A started hub on an embedded broker (or a subclass of it), closed on exit."""
    cfg = make_config()
    hub = Hub(cfg, broker_class(cfg, "n"), Metrics(), "n")
    await hub.start()
    try:
        yield hub
    finally:
        await hub.close()


@contextlib.asynccontextmanager
async def connected(hub: Hub, room: str, nick: str) -> AsyncIterator[Stream]:
    """A stream opened in ``room`` (``Hub.open``), closed on leaving the block."""
    stream = await hub.open(room, nick, "ip", "ua")
    try:
        yield stream
    finally:
        stream.close("client_gone")


def make_stream(max_queue: int = 3) -> Stream:
    return Stream("r", "n", "127.0.0.1", "ua", max_queue)


class RecordingSink:
    """Takes writes like a connection: done at once, or held open to act like a full socket."""

    def __init__(self, hold: bool = False) -> None:
        self.writes: list[bytes] = []
        self.hold = hold
        self.pending: list[asyncio.Future] = []

    def __call__(self, data: bytes):
        self.writes.append(data)
        fut = asyncio.get_running_loop().create_future()
        if self.hold:
            self.pending.append(fut)
        else:
            fut.set_result(None)
        return fut


def test_queued_frames_coalesce_into_one_write_and_track_the_last_id() -> None:
    async def go() -> None:
        s = make_stream(10)
        s.push(b"a", "1-0", (1, 0))
        s.push(b": ping\n\n")
        s.push(b"b", "1-1", (1, 1))
        assert s.depth == 3
        sink = RecordingSink()
        s.attach(sink)
        assert sink.writes == [b"a: ping\n\nb"]
        assert s.last_event_id == "1-1" and s.depth == 0
    asyncio.run(go())


def test_frames_wait_while_a_write_is_in_flight() -> None:
    async def go() -> None:
        s = make_stream(10)
        sink = RecordingSink(hold=True)
        s.attach(sink)
        s.push(b"1")
        s.push(b"2")
        s.push(b"3")
        assert sink.writes == [b"1"] and s.depth == 2
        sink.pending[0].set_result(None)
        await asyncio.sleep(0)
        assert sink.writes == [b"1", b"23"]
    asyncio.run(go())


def test_overflow_closes_the_stream_and_calls_abort() -> None:
    aborted = []
    s = make_stream(2)
    s.abort = lambda: aborted.append(True)
    assert s.push(b"1") and s.push(b"2")
    assert s.push(b"3") is False
    assert s.closed and s.close_reason == "slow_client" and aborted == [True]
    assert s.push(b"4")  # pushing into a closed stream is a no-op, never an error
    assert s.depth == 0


def test_skip_through_drops_what_catch_up_already_sent() -> None:
    async def go() -> None:
        s = make_stream(10)
        s.push(b"a", "5-0", (5, 0))  # queued live while the replay was read
        s.push(b"p", None, None)  # non-message frames are never dropped
        s.skip_through("6-0")  # the replay went up to 6-0
        s.push(b"b", "6-0", (6, 0))  # live copy of a replayed message
        s.push(b"d", "7-0", (7, 0))
        s.push(b"e", "8-0", (8, 0))
        sink = RecordingSink()
        s.attach(sink)
        assert sink.writes == [b"pde"]
    asyncio.run(go())


def test_a_failed_write_closes_the_stream() -> None:
    async def go() -> None:
        s = make_stream(10)
        sink = RecordingSink(hold=True)
        s.attach(sink)
        s.push(b"1")
        sink.pending[0].set_exception(ConnectionResetError())
        await asyncio.sleep(0)
        assert s.closed and s.close_reason == "client_gone"
    asyncio.run(go())


def test_close_tells_whoever_waits_for_the_end_once() -> None:
    s = make_stream()
    ended: list[str] = []
    s.end = lambda: ended.append(s.close_reason)
    s.close("admin_disconnect")
    s.close("client_gone")
    assert ended == ["admin_disconnect"]
    assert s.close_reason == "admin_disconnect"


def test_rooms_subscribe_on_first_and_unsubscribe_on_last_after_a_delay(monkeypatch) -> None:
    monkeypatch.setattr(hub_mod, "UNSUBSCRIBE_DELAY", 0.05)

    async def go() -> None:
        async with running_hub() as hub:
            broker = hub.broker
            async with connected(hub, "room", "a") as s1:
                assert broker._subscribed == {"room"}
                async with connected(hub, "room", "b"):
                    assert hub.client_count == 2
                sink = RecordingSink()
                s1.attach(sink)
                await hub.publish("room", "x", "hello")
                await asyncio.sleep(0)  # writes go out at the end of the loop turn
                assert b"hello" in b"".join(sink.writes)
            assert hub.client_count == 0
            assert broker._subscribed == {"room"}  # kept a moment for reconnects
            for _ in range(100):
                if not broker._subscribed:
                    break
                await asyncio.sleep(0.01)
            assert broker._subscribed == set()
    asyncio.run(go())


def test_a_failed_subscribe_rolls_back_so_the_next_client_retries() -> None:
    class FlakyBroker(MemoryBroker):
        fail = True

        async def subscribe(self, room: str) -> None:
            if self.fail:
                self.fail = False
                raise ConnectionError("boom")
            await super().subscribe(room)

    async def go() -> None:
        async with running_hub(FlakyBroker) as hub:
            broker = hub.broker
            with pytest.raises(ConnectionError):
                async with connected(hub, "room", "a"):
                    pass
            assert hub.client_count == 0
            async with connected(hub, "room", "a"):
                assert broker._subscribed == {"room"}
    asyncio.run(go())


def test_a_join_while_the_rooms_unsubscribe_is_in_flight_ends_subscribed() -> None:
    async def go() -> None:
        async with running_hub() as hub:
            broker = hub.broker
            async with connected(hub, "room", "a"):
                pass
            hub._unsubscribe_if_empty("room")  # the delayed unsubscribe fires...
            async with connected(hub, "room", "b") as s:  # ...as a client arrives
                await asyncio.sleep(0.01)
                assert broker._subscribed == {"room"}
                sink = RecordingSink()
                s.attach(sink)
                await hub.publish("room", "x", "still delivered")
                await asyncio.sleep(0)
                assert b"still delivered" in b"".join(sink.writes)
    asyncio.run(go())


@pytest.mark.parametrize(("last_id", "first_prev", "newest", "complete"), [
    ("5-0", "5-0", "9-0", True),  # the next message follows the client's
    ("5-0", "4-0", "9-0", False),  # something between was trimmed
    ("5-0", None, "5-0", True),  # nothing newer, and the client has the newest
    ("5-0", None, "3-0", False),  # the stream went back in time: lost in a restart
    ("5-0", None, None, False),  # the room's history is gone
    ("0-0", None, None, True),  # from the start, in an empty room
    ("0-0", "", "2-0", True),  # from the start: the first message ever
    ("0-0", "1-0", "2-0", False),  # from the start, but the oldest were trimmed
])
def test_the_prev_chain_decides_whether_a_replay_is_complete(last_id, first_prev, newest,
                                                              complete) -> None:
    assert replay_is_complete(last_id, first_prev, newest) is complete


def test_a_big_rooms_presence_is_told_at_a_paced_rate(monkeypatch) -> None:
    """Joins into a crowded room are told to its streams at most TELL_PER_SECOND frames a
    second: a burst of joins costs one broadcast per pause, never one per batch; each new
    stream is still told the count at once, and the last count always arrives."""
    from rtchat import presence

    monkeypatch.setattr(presence, "TELL_PER_SECOND", 10)  # 5 streams: one broadcast per 0.5 s

    def counts(sink: RecordingSink) -> list[int]:
        text = b"".join(sink.writes).decode()
        return [int(line.split('"count":')[1].split("}")[0])
                for line in text.splitlines() if line.startswith("data:") and '"count"' in line]

    async def go() -> None:
        async with running_hub() as hub, contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(connected(hub, "room", "a"))
            assert first.head and b'"count":1' in first.head[-1]  # told on join
            sink = RecordingSink()
            first.attach(sink)
            for i in range(4):  # a crowd: 5 streams
                joined = await stack.enter_async_context(connected(hub, "room", f"n{i}"))
                assert f'"count":{i + 2}'.encode() in joined.head[-1]
            await async_wait_for(lambda: counts(sink)[-1:] == [5], 5, "the count of 5",
                                 interval=0.01)
            told = len(counts(sink))
            # Five more join over a second: unpaced, that is a broadcast per 0.25 s batch;
            # paced (a 0.6-1 s pause at 6-10 streams), at most two. The last count told
            # is the room's.
            for i in range(5):
                await stack.enter_async_context(connected(hub, "room", f"m{i}"))
                await asyncio.sleep(0.2)
            await async_wait_for(lambda: counts(sink)[-1:] == [10], 5, "the count of 10",
                                 interval=0.01)
            assert len(counts(sink)) - told <= 2, counts(sink)
    asyncio.run(go())
