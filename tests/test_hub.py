"""The hub's stream outbox and room bookkeeping, with the embedded broker."""

import asyncio

import pytest
from conftest import make_config

from rtchat import hub as hub_mod
from rtchat.broker.memory import MemoryBroker
from rtchat.hub import Hub, Stream
from rtchat.metrics import Metrics


def make_stream(max_queue: int = 3) -> Stream:
    return Stream("r", "n", "127.0.0.1", "ua", max_queue)


def test_push_coalesces_into_one_batch_and_tracks_the_last_id() -> None:
    async def go() -> None:
        s = make_stream(10)
        s.push(b"a", "1-0", (1, 0))
        s.push(b": ping\n\n")
        s.push(b"b", "1-1", (1, 1))
        assert s.depth == 3
        assert await s.next_batch() == b"a: ping\n\nb"
        assert s.last_event_id == "1-1" and s.depth == 0
    asyncio.run(go())


def test_overflow_closes_the_stream_and_calls_abort() -> None:
    aborted = []
    s = make_stream(2)
    s.abort = lambda: aborted.append(True)
    assert s.push(b"1") and s.push(b"2")
    assert s.push(b"3") is False
    assert s.closed and s.close_reason == "slow_client" and aborted == [True]
    assert s.push(b"4")  # pushing into a closed stream is a no-op, never an error
    assert asyncio.run(s.next_batch()) is None


def test_skip_through_drops_what_catch_up_already_sent() -> None:
    s = make_stream(10)
    s.push(b"a", "5-0", (5, 0))  # queued live while the replay was read
    s.push(b"p", None, None)  # non-message frames are never dropped
    s.skip_through("6-0")  # the replay went up to 6-0
    s.push(b"b", "6-0", (6, 0))  # live copy of a replayed message
    s.push(b"d", "7-0", (7, 0))
    s.push(b"e", "8-0", (8, 0))
    assert asyncio.run(s.next_batch()) == b"pde"


def test_close_wakes_a_waiting_reader() -> None:
    async def go() -> None:
        s = make_stream()
        waiting = asyncio.ensure_future(s.next_batch())
        await asyncio.sleep(0)
        s.close("admin_disconnect")
        assert await asyncio.wait_for(waiting, 1) is None
    asyncio.run(go())


def test_rooms_subscribe_on_first_and_unsubscribe_on_last_after_a_delay(monkeypatch) -> None:
    monkeypatch.setattr(hub_mod, "UNSUBSCRIBE_DELAY", 0.05)

    async def go() -> None:
        cfg = make_config()
        broker = MemoryBroker(cfg, "n")
        hub = Hub(cfg, broker, Metrics(), "n")
        await hub.start()
        try:
            async with hub.connect("room", "a", "ip", "ua") as s1:
                assert broker._subscribed == {"room"}
                async with hub.connect("room", "b", "ip", "ua"):
                    assert hub.client_count == 2
                await hub.publish("room", "x", "hello")
                assert b"hello" in await s1.next_batch()
            assert hub.client_count == 0
            assert broker._subscribed == {"room"}  # kept a moment for reconnects
            for _ in range(100):
                if not broker._subscribed:
                    break
                await asyncio.sleep(0.01)
            assert broker._subscribed == set()
        finally:
            await hub.close()
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
        cfg = make_config()
        broker = FlakyBroker(cfg, "n")
        hub = Hub(cfg, broker, Metrics(), "n")
        await hub.start()
        try:
            with pytest.raises(ConnectionError):
                async with hub.connect("room", "a", "ip", "ua"):
                    pass
            assert hub.client_count == 0
            async with hub.connect("room", "a", "ip", "ua"):
                assert broker._subscribed == {"room"}
        finally:
            await hub.close()
    asyncio.run(go())
