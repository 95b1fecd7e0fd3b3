"""One contract for every broker: the memory broker and the Redis broker must pass the same tests.

Each test runs against both (``broker`` is parametrized); the Redis one
talks to a real redis-server on a free port. The delivery contract is
``rtchat.broker.base``'s: after ``subscribe(room)`` returns, every message
stored in the room reaches ``deliver`` exactly once, in id order.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from broker_inbox import Inbox
from probes import async_wait_for

from rtchat import config
from rtchat.broker.base import Broker, BrokerStatus, EndpointStatus, Failover, Presence

ID_RE = re.compile(r"^\d+-\d+$")
BrokerFactory = Callable[..., contextlib.AbstractAsyncContextManager[tuple[Broker, "Inbox"]]]


async def until(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    await async_wait_for(predicate, timeout, what, interval=0.01)


@pytest.fixture(params=["memory", "redis"])
def broker(request: pytest.FixtureRequest) -> BrokerFactory:
    """``async with broker(**{"history.size": 10}) as (b, inbox)``: a started broker."""
    overrides: dict[str, Any] = {"node.id": "contract-node"}
    if request.param == "redis":
        server = request.getfixturevalue("start_redis")()
        overrides.update({"broker.backend": "redis", "broker.redis.master": server.url,
                          "broker.redis.health_interval_seconds": 0.2})

    @contextlib.asynccontextmanager
    async def open_broker(**extra: Any) -> AsyncIterator[tuple[Broker, Inbox]]:
        from rtchat.broker import make_broker

        cfg = config.load(None, {}, {**overrides, **extra})
        b = make_broker(cfg, cfg.node_id)
        assert b.kind == request.param
        inbox = Inbox()
        await b.start(inbox, lambda: {"clients": 0})
        try:
            yield b, inbox
        finally:
            await b.close()

    return open_broker


def test_ids_are_stream_ids_strictly_increasing_and_chained(broker: BrokerFactory) -> None:
    async def scenario() -> None:
        async with broker() as (b, _):
            msgs = [(await b.publish("lobby", "ann", f"m{i}")).message for i in range(25)]
            assert all(ID_RE.match(m.id) for m in msgs)
            keys = [m.key for m in msgs]
            assert keys == sorted(keys) and len(set(keys)) == len(keys)
            assert [m.prev for m in msgs] == ["", *[m.id for m in msgs[:-1]]]
            assert all(m.room == "lobby" and m.nick == "ann" and m.node == "contract-node"
                       for m in msgs)
            other = (await b.publish("other", "ann", "x")).message
            assert other.prev == ""  # chains are per room

    asyncio.run(scenario())


def test_history_is_oldest_first_and_limited(broker: BrokerFactory) -> None:
    async def scenario() -> None:
        async with broker() as (b, _):
            msgs = [(await b.publish("lobby", "ann", f"m{i}")).message for i in range(12)]
            assert await b.history("lobby", 5) == msgs[-5:]
            assert await b.history("lobby", 100) == msgs
            assert await b.history("lobby", 0) == []
            assert await b.history("empty", 10) == []

    asyncio.run(scenario())


def test_read_since_returns_exactly_what_follows(broker: BrokerFactory) -> None:
    async def scenario() -> None:
        async with broker() as (b, _):
            msgs = [(await b.publish("lobby", "ann", f"m{i}")).message for i in range(10)]
            for k, m in enumerate(msgs):
                replay = await b.read_since("lobby", m.id)
                assert replay.messages == msgs[k + 1:]
                assert not replay.truncated
            replay = await b.read_since("lobby", "1-0")  # older than anything held
            assert replay.truncated and replay.oldest == msgs[0].id
            assert replay.messages == msgs
            replay = await b.read_since("empty", "1-0")
            assert replay.truncated and replay.oldest == "" and replay.messages == []

    asyncio.run(scenario())


def test_read_since_is_truncated_after_trimming(broker: BrokerFactory) -> None:
    async def scenario() -> None:
        async with broker(**{"history.size": 10}) as (b, _):
            msgs = [(await b.publish("lobby", "ann", f"m{i}")).message for i in range(250)]
            held = await b.history("lobby", 1000)
            assert 10 <= len(held) < 250  # Redis trims with MAXLEN ~: at least size are kept
            assert held == msgs[-len(held):]
            replay = await b.read_since("lobby", msgs[0].id)
            assert replay.truncated and replay.oldest == held[0].id
            assert replay.messages == held
            replay = await b.read_since("lobby", held[0].id)
            assert not replay.truncated and replay.messages == held[1:]

    asyncio.run(scenario())


def test_resumes_asked_together_each_get_their_own_replay(broker: BrokerFactory) -> None:
    """A crowd resuming one room at once (a dead node's clients) gets what each missed, and
    each its own verdict on gaps, however the broker serves them together."""
    async def scenario() -> None:
        async with broker(**{"history.size": 10}) as (b, _):
            msgs = [(await b.publish("lobby", "ann", f"m{i}")).message for i in range(250)]
            held = await b.history("lobby", 1000)  # Redis trims with MAXLEN ~: not all 250
            assert len(held) < 250
            ids = [m.id for m in held] + [msgs[0].id, "1-0", held[-1].id]
            alone = [await b.read_since("lobby", i) for i in ids]
            together = await asyncio.gather(*(b.read_since("lobby", i) for i in ids))
            assert together == alone
            assert together[0].messages == held[1:] and not together[0].truncated
            assert together[-3].truncated and together[-3].messages == held  # trimmed past it
            assert together[-1].messages == [] and not together[-1].truncated

    asyncio.run(scenario())


def test_subscribed_room_gets_each_message_once_in_order(broker: BrokerFactory) -> None:
    async def scenario() -> None:
        async with broker() as (b, inbox):
            await b.subscribe("lobby")
            sent = [(await b.publish("lobby", "ann", f"m{i}")).message for i in range(30)]
            await b.publish("elsewhere", "ann", "not subscribed")
            await until(lambda: len(inbox.ids("lobby")) >= 30, "30 deliveries")
            assert inbox.ids("lobby") == [m.id for m in sent]
            assert [m.text for m in inbox.messages if m.room == "lobby"] == [m.text for m in sent]
            assert inbox.ids("elsewhere") == []

    asyncio.run(scenario())


def test_nothing_is_delivered_after_unsubscribe(broker: BrokerFactory) -> None:
    async def scenario() -> None:
        async with broker() as (b, inbox):
            await b.subscribe("lobby")
            first = (await b.publish("lobby", "ann", "before")).message
            await until(lambda: inbox.ids("lobby") == [first.id], "the first delivery")
            await b.unsubscribe("lobby")
            for i in range(5):
                await b.publish("lobby", "ann", f"after {i}")
            # A marker in another room travels the same path after them: once it is
            # here, anything still coming for "lobby" would have come.
            await b.subscribe("marker")
            marker = (await b.publish("marker", "ann", "marker")).message
            await until(lambda: inbox.ids("marker") == [marker.id], "the marker")
            assert inbox.ids("lobby") == [first.id]

    asyncio.run(scenario())


def test_presence_counts_streams_and_lists_nicks(broker: BrokerFactory) -> None:
    async def scenario() -> None:
        async with broker() as (b, _):
            assert await b.presence("lobby") == Presence(0, [])
            await b.set_presence("lobby", {"bob": 1, "alice": 2, "": 1})
            assert await b.presence("lobby") == Presence(4, ["alice", "bob"])
            assert await b.presence("other") == Presence(0, [])
            await b.set_presence("lobby", {})
            assert await b.presence("lobby") == Presence(0, [])

    asyncio.run(scenario())


def test_ready_and_reports_itself(broker: BrokerFactory) -> None:
    async def scenario() -> None:
        async with broker() as (b, _):
            assert b.readiness() == []
            status = b.status()
            assert isinstance(status, BrokerStatus)
            assert status.backend == b.kind
            # The JSON shape the admin page and its JavaScript read.
            assert set(status.to_dict()) == {"backend", "master", "subscribed_endpoint",
                                             "endpoints", "failovers", "failover_count",
                                             "cluster_failovers", "verdict", "missing_nodes"}
            assert status.verdict.state == "healthy"
            nodes = await b.cluster_nodes()
            assert [n["id"] for n in nodes] == ["contract-node"]
        assert b.readiness() != []  # closed
        await b.close()  # twice is fine

    asyncio.run(scenario())


def test_status_json_keeps_the_admin_page_shape() -> None:
    ep = EndpointStatus(url="redis://h:1/0", configured_role="replica", reachable=True,
                        role="replica", master_link_status="up", lag_bytes=0, lag_seconds=0.0,
                        ping_ms=0.1, probe_ms=0.5, last_error=None, healthy=True, subscribed=True)
    f = Failover(at=1.5, from_="redis://h:1/0", to="redis://h:2/0", reason="lost", recovered=3)
    status = BrokerStatus(backend="redis", master="redis://h:0/0",
                          subscribed_endpoint="redis://h:1/0", endpoints=(ep,), failovers=(f,),
                          failover_count=4)
    assert status.to_dict() == {
        "backend": "redis", "master": "redis://h:0/0", "subscribed_endpoint": "redis://h:1/0",
        "endpoints": [{"url": "redis://h:1/0", "configured_role": "replica", "reachable": True,
                       "role": "replica", "master_link_status": "up", "lag_bytes": 0,
                       "lag_seconds": 0.0, "ping_ms": 0.1, "probe_ms": 0.5, "last_error": None,
                       "healthy": True, "subscribed": True, "down_since": None,
                       "problem": None}],
        "failovers": [{"at": 1.5, "from": "redis://h:1/0", "to": "redis://h:2/0",
                       "reason": "lost", "recovered": 3, "node": ""}],
        "failover_count": 4, "cluster_failovers": [],
        "verdict": {"state": "healthy", "reasons": []}, "missing_nodes": []}
    # Key order too: the page lists fields as they come.
    assert list(status.to_dict()["endpoints"][0]) == [
        "url", "configured_role", "reachable", "role", "master_link_status", "lag_bytes",
        "lag_seconds", "ping_ms", "probe_ms", "last_error", "healthy", "subscribed",
        "down_since", "problem"]
