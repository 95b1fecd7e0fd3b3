"""SSE streams through a real node: headers, fan-out, order, resume, reset, slow clients."""

import asyncio
import gc
import time

import pytest
from probes import async_wait_for
from sse_client import SSEClient

from rtchat.handlers.events import EventStreamHandler
from rtchat.server import _GuardedStream
from rtchat.stream import Stream

FAST = {"limits.rate.burst": 100000, "limits.rate.messages_per_second": 100000}


@pytest.mark.gen_test
async def test_stream_headers_retry_and_first_comment(start_node) -> None:
    node = await start_node(**{"sse.retry_ms": 1000})
    client = await SSEClient.open(node.url, "lobby")
    try:
        assert client.status == 200
        assert client.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert client.headers["cache-control"] == "no-cache"
        assert client.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in client.headers
        raw = b""
        while raw.count(b"\n") < 2:  # the retry line and the comment arrive at once
            await asyncio.wait_for(client._read_more(), 5)
            raw = client._buf
        retry_line, rest = raw.split(b"\n", 1)
        assert retry_line.startswith(b"retry: ")
        assert 500 <= int(retry_line[7:]) <= 1500
        # A comment line, and no blank line: nothing a client could take for an empty event.
        assert rest.startswith(b": ")
        assert b"\n\n" not in raw.split(b"event:")[0]
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_every_subscriber_of_the_room_gets_each_message_once_in_order(start_node) -> None:
    node = await start_node(**FAST)
    clients = [await SSEClient.open(node.url, "fan") for _ in range(3)]
    other = await SSEClient.open(node.url, "elsewhere")
    try:
        await async_wait_for(lambda: node.hub.client_count == 4, what="4 streams")
        ids = []
        for i in range(200):
            r = await node.post("fan", f"message {i}")
            assert r.code == 201
            ids.append(r.body)
        got = await asyncio.gather(*(c.messages(200, timeout=20) for c in clients))
        for messages in got:
            assert [m["text"] for m in messages] == [f"message {i}" for i in range(200)]
            assert len({m["id"] for m in messages}) == 200
            assert all(m["room"] == "fan" for m in messages)
        # The other room's stream saw none of it: its next message is its own.
        await node.post("elsewhere", "only here")
        (mine,) = await other.messages(1)
        assert mine["text"] == "only here"
    finally:
        for c in [*clients, other]:
            await c.aclose()


@pytest.mark.gen_test
async def test_message_event_fields(start_node) -> None:
    node = await start_node()
    client = await SSEClient.open(node.url, "lobby")
    try:
        await async_wait_for(lambda: node.hub.client_count == 1)
        before = time.time()
        await node.post("lobby", "line one\nline two", nick="zoë")
        ev = await client.next_event()
        while ev.event != "message":
            ev = await client.next_event()
        data = ev.json()
        assert ev.id == data["id"]
        assert set(data) == {"id", "room", "nick", "text", "ts", "node"}
        assert data["text"] == "line one\nline two" and data["nick"] == "zoë"
        assert data["node"] == "test-node" and before - 1 <= data["ts"] <= time.time() + 1
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_resume_with_last_event_id_gets_exactly_the_missed(start_node) -> None:
    node = await start_node(**FAST)
    client = await SSEClient.open(node.url, "resume")
    await async_wait_for(lambda: node.hub.client_count == 1)
    for i in range(5):
        await node.post("resume", f"seen {i}")
    seen = await client.messages(5)
    await client.aclose()
    await async_wait_for(lambda: node.hub.client_count == 0, what="stream gone")
    for i in range(10):
        await node.post("resume", f"missed {i}")
    back = await SSEClient.open(node.url, "resume", last_event_id=seen[-1]["id"])
    try:
        missed = await back.messages(10)
        assert [m["text"] for m in missed] == [f"missed {i}" for i in range(10)]
        await node.post("resume", "live")
        (live,) = await back.messages(1)
        assert live["text"] == "live"  # no duplicate between replay and live
    finally:
        await back.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_resume_by_query_parameter_on_first_connect(start_node) -> None:
    node = await start_node(**FAST)
    first = (await node.post("q", "one")).body
    import json
    first_id = json.loads(first)["id"]
    await node.post("q", "two")
    await node.post("q", "three")
    client = await SSEClient.open(node.url, "q", query_last_event_id=first_id)
    try:
        assert [m["text"] for m in await client.messages(2)] == ["two", "three"]
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_resume_from_an_id_older_than_history_sends_reset_first(start_node) -> None:
    node = await start_node(**{**FAST, "history.size": 5})
    import json
    first_id = json.loads((await node.post("trim", "gone 0")).body)["id"]
    for i in range(1, 10):
        await node.post("trim", f"m {i}")
    client = await SSEClient.open(node.url, "trim", last_event_id=first_id)
    try:
        ev = await client.next_event()
        assert ev.event == "reset"
        reset = ev.json()
        assert reset["reason"] == "history_truncated"
        history = json.loads((await node.fetch("/rooms/trim/messages?limit=5")).body)["messages"]
        assert reset["oldest"] == history[0]["id"]
        assert ev.id is None
        rest = await client.messages(5)
        assert [m["text"] for m in rest] == [f"m {i}" for i in range(5, 10)]
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_resume_from_an_unknown_id_in_an_empty_room_sends_reset(start_node) -> None:
    node = await start_node()
    client = await SSEClient.open(node.url, "never-used", last_event_id="1700000000000-0")
    try:
        ev = await client.next_event()
        assert ev.event == "reset" and ev.json() == {"reason": "history_truncated", "oldest": ""}
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_a_client_that_never_reads_is_evicted_and_others_do_not_stall(start_node) -> None:
    node = await start_node(**{**FAST, "sse.max_queue": 200, "history.size": 5000})
    reader = await SSEClient.open(node.url, "slow")
    stuck = await SSEClient.open(node.url, "slow", rcvbuf=4096)  # never reads a byte
    await async_wait_for(lambda: node.hub.client_count == 2, what="both streams")
    total, text = 2000, "x" * 2048
    received: list[dict] = []
    gaps: list[float] = []

    async def read_all() -> None:
        last = time.monotonic()
        while len(received) < total:
            ev = await reader.next_event(timeout=20)
            assert ev is not None, "the reading client's stream ended"
            if ev.event == "message":
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                received.append(ev.json())

    reading = asyncio.ensure_future(read_all())
    ids = []
    for i in range(total):
        r = await node.post("slow", f"{i} {text}")
        assert r.code == 201
        ids.append(r.body)
    await asyncio.wait_for(reading, 30)
    assert [int(m["text"].split()[0]) for m in received] == list(range(total))
    assert max(gaps) < 5.0, f"the reading client stalled for {max(gaps):.2f}s"
    await async_wait_for(lambda: node.hub.client_count == 1, what="the stuck client's eviction")
    assert node.hub.metrics.registry.get_sample_value("rtchat_slow_clients_evicted_total") == 1
    await stuck.aclose()

    # The evicted client resumes from the last id it really got, and misses nothing.
    back = await SSEClient.open(node.url, "slow", last_event_id=received[99]["id"])
    try:
        first = await back.next_event()
        while first.event == "presence":
            first = await back.next_event()
        assert first.event == "message", "no reset: history still covers the evicted client"
        rest = [first.json(), *await back.messages(total - 101, timeout=30)]
        assert [int(m["text"].split()[0]) for m in rest] == list(range(100, total))
    finally:
        await back.aclose()
        await reader.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_heartbeat_comments(start_node) -> None:
    node = await start_node(**{"sse.heartbeat_seconds": 0.2})
    client = await SSEClient.open(node.url, "hb")
    try:
        async def pings() -> None:
            while client.comments.count("ping") < 2:
                assert await client._read_more()
                while b"\n" in client._buf:
                    raw, client._buf = client._buf.split(b"\n", 1)
                    client._feed_line(raw.decode())
        await asyncio.wait_for(pings(), 10)
        assert client.comments.count("ping") >= 2
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_presence_events_follow_the_room_count(start_node) -> None:
    node = await start_node()
    a = await SSEClient.open(node.url, "p", nick="ann")

    async def next_presence(client: SSEClient) -> int:
        while True:
            ev = await client.next_event()
            if ev.event == "presence":
                return ev.json()["count"]

    try:
        assert await next_presence(a) == 1
        b = await SSEClient.open(node.url, "p", nick="bob")
        assert await next_presence(a) == 2
        assert await next_presence(b) == 2
        await b.aclose()
        assert await next_presence(a) == 1
    finally:
        await a.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_drain_closes_streams_and_refuses_new_ones(start_node) -> None:
    node = await start_node(**{"shutdown.drain_seconds": 0.5})
    clients = [await SSEClient.open(node.url, "d") for _ in range(5)]
    await async_wait_for(lambda: node.hub.client_count == 5)
    drain = asyncio.ensure_future(node.hub.drain(0.5))
    await async_wait_for(lambda: node.hub.draining)
    ready = await node.fetch("/readyz")
    assert ready.code == 503 and b"draining" in ready.body
    # A direct client is told to come back (a standard EventSource gives up on a 503) ...
    late = await SSEClient.open(node.url, "d")
    assert late.status == 200
    assert await late.until_closed(timeout=5) == []  # retry: and a comment, no event
    assert late.retry is not None and late.retry >= 500
    assert any("draining" in c for c in late.comments)
    assert node.hub.client_count <= 5
    await asyncio.wait_for(drain, 5)
    for c in clients:
        await c.until_closed(timeout=5)  # each stream ended cleanly
        await c.aclose()
    await late.aclose()
    assert node.hub.client_count == 0


@pytest.mark.gen_test(timeout=30)
async def test_the_page_of_an_empty_room_misses_nothing_posted_before_its_stream(start_node) -> None:
    node = await start_node()
    page = (await node.fetch("/rooms/fresh")).body.decode()
    assert 'var lastId = "0-0";' in page  # the page resumes an empty room from the start
    await node.post("fresh", "posted between page and stream")
    client = await SSEClient.open(node.url, "fresh", query_last_event_id="0-0")
    try:
        ev = await client.next_event()
        while ev.event == "presence":
            ev = await client.next_event()
        assert ev.event == "message" and ev.json()["text"] == "posted between page and stream"
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_live_stream_keeps_no_task_and_still_ends_cleanly(start_node) -> None:
    """Past its head a stream is written by the hub and no handler task waits on it (one
    per stream cost memory and a task switch per close). Its end, from either side, still
    finishes the response with the last chunk and takes it out of the room."""
    node = await start_node()

    def handler_tasks() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if "_execute" in t.get_coro().__qualname__]

    clients = [await SSEClient.open(node.url, "idle", nick=f"c{i}") for i in range(10)]
    await async_wait_for(lambda: node.hub.client_count == 10)
    for c in clients:  # each is live: it got its presence event
        assert (await c.next_event(timeout=5)).event == "presence"
    assert handler_tasks() == []
    # The hub ends one (as an admin disconnect or a drain does): a clean end of response.
    victim = next(s for s in node.hub.streams() if s.nick == "c3")
    assert node.hub.disconnect(victim.id)
    assert await clients[3].until_closed(timeout=5) == []
    assert clients[3].ended_cleanly
    # A client that goes is forgotten by the hub.
    await clients[5].aclose()
    await async_wait_for(lambda: node.hub.client_count == 8)
    assert sorted(s.nick for s in node.hub.streams()) == [
        f"c{i}" for i in range(10) if i not in (3, 5)]
    # The rest still get messages.
    resp = await node.post("idle", "still here")
    assert resp.code == 201
    for i, c in enumerate(clients):
        if i not in (3, 5):
            assert [m["text"] for m in await c.messages(1, timeout=5)] == ["still here"]
        await c.aclose()
    await async_wait_for(lambda: node.hub.client_count == 0)


@pytest.mark.gen_test(timeout=30)
async def test_a_closed_stream_and_its_connection_are_freed_without_the_collector(start_node) -> None:
    """Neither a stream nor its connection is held in a reference cycle, so both are freed
    the moment they close, by either side: thousands of open streams make each full pass
    of the garbage collector long, and the node runs it rarely (``rtchat.__main__``)."""
    node = await start_node()

    def alive() -> int:
        return sum(isinstance(o, (Stream, EventStreamHandler, _GuardedStream))
                   for o in gc.get_objects())

    gc.collect()
    assert alive() == 0
    gc.disable()
    try:
        clients = [await SSEClient.open(node.url, "gc", nick=f"c{i}") for i in range(4)]
        for c in clients:
            assert (await c.next_event(timeout=5)).event == "presence"
        assert alive() == 3 * 4
        assert (await node.post("gc", "one")).code == 201
        for c in clients:
            assert [m["text"] for m in await c.messages(1, timeout=5)] == ["one"]
        assert node.hub.disconnect(next(s for s in node.hub.streams() if s.nick == "c0").id)
        assert await clients[0].until_closed(timeout=5) == []
        for c in clients:
            await c.aclose()
        await async_wait_for(lambda: node.hub.client_count == 0)
        await async_wait_for(lambda: alive() == 0, timeout=5)
    finally:
        gc.enable()
