"""Many rooms on one connection: ``GET /events?rooms=a,b,c`` and its resume cursor.

The cursor is the stream's ``id:``: a plain EventSource that reconnects with
it gets exactly what it missed in every room, on any node.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from probes import async_wait_for
from sse_client import SSEClient

from rtchat import cursor

FAST = {"limits.rate.burst": 100000, "limits.rate.messages_per_second": 100000}


def body(r: Any) -> dict[str, Any]:
    return json.loads(r.body)


async def open_rooms(node: Any, rooms: list[str], last_event_id: str | None = None,
                     query: str = "") -> SSEClient:
    return await SSEClient.open(node.url, rooms[0], last_event_id=last_event_id,
                                path=f"/events?rooms={','.join(rooms)}{query}")


async def messages(client: SSEClient, n: int) -> list[tuple[str, str, str]]:
    """The next n chat messages as (room, text, the event's id)."""
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        ev = await client.next_event(timeout=10)
        assert ev is not None, f"stream ended after {len(out)} of {n}"
        if ev.event == "message":
            m = ev.json()
            out.append((m["room"], m["text"], ev.id or ""))
    return out


# -- the cursor, pure ------------------------------------------------------------------


def test_cursor_round_trips_and_stays_compact_at_32_rooms() -> None:
    rooms = [f"team-room-{i:02d}" for i in range(32)]
    base = 1_796_000_000_000
    positions = {r: (base + i * 3_600_000 + 17, i % 3) for i, r in enumerate(rooms)}  # a day apart
    enc = cursor.Encoder(positions)
    text = enc.cursor()
    print(f"cursor for 32 rooms spread over 31 hours: {len(text)} bytes")
    assert len(text) <= 400
    assert cursor.decode(text, rooms) == positions
    moved = enc.advance(rooms[5], (base + 200_000_000, 4))
    assert cursor.decode(moved, rooms)[rooms[5]] == (base + 200_000_000, 4)
    # A room at the very start is its tag alone; unknown rooms are ignored on decode.
    fresh = cursor.Encoder({"a": (0, 0), "b": (base, 1)}).cursor()
    assert cursor.decode(fresh, ["a", "b", "c"]) == {"a": (0, 0), "b": (base, 1)}
    assert cursor.decode(fresh, ["b"]) == {"b": (base, 1)}


@pytest.mark.parametrize("bad", ["m", "x1.abcd", "m1.ab", "m1.abcd1_", "m!.abcd", "m1." + "a" * 3000,
                                 "m1.abcd" + "z" * 13 + "_1"])
def test_bad_cursors_are_refused(bad: str) -> None:
    with pytest.raises(cursor.BadCursor):
        cursor.decode(bad, ["a"])


# -- through a node -------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_one_stream_carries_every_listed_room_and_resumes_each_exactly(start_node) -> None:
    node = await start_node(**FAST)
    client = await open_rooms(node, ["a", "b", "c"])
    assert client.status == 200
    await async_wait_for(lambda: node.hub.client_count == 1)
    assert [s.info()["rooms"] for s in node.hub.streams()] == [["a", "b", "c"]]  # one client
    for room, text in (("a", "a1"), ("b", "b1"), ("elsewhere", "x"), ("c", "c1"), ("a", "a2")):
        assert (await node.post(room, text)).code == 201
    got = await messages(client, 4)
    assert [(r, t) for r, t, _ in got] == [("a", "a1"), ("b", "b1"), ("c", "c1"), ("a", "a2")]
    last = got[-1][2]
    assert cursor.looks_like(last)
    await client.aclose()

    for room, text in (("b", "b2"), ("a", "a3"), ("c", "c2"), ("b", "b3")):
        assert (await node.post(room, text)).code == 201
    again = await open_rooms(node, ["a", "b", "c"], last_event_id=last)
    try:
        got = await messages(again, 4)
        per_room = {r: [t for rr, t, _ in got if rr == r] for r in "abc"}
        assert per_room == {"a": ["a3"], "b": ["b2", "b3"], "c": ["c2"]}
        assert (await node.post("c", "live")).code == 201
        assert [(r, t) for r, t, _ in await messages(again, 1)] == [("c", "live")]
    finally:
        await again.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_gap_in_one_room_resets_that_room_only(start_node) -> None:
    node = await start_node(**FAST, **{"history.size": 3})
    client = await open_rooms(node, ["quiet", "busy"])
    await node.post("quiet", "q1")
    await node.post("busy", "b1")
    last = (await messages(client, 2))[-1][2]
    await client.aclose()
    for i in range(6):  # more than history keeps
        await node.post("busy", f"b{i + 2}")
    await node.post("quiet", "q2")
    again = await open_rooms(node, ["quiet", "busy"], last_event_id=last)
    try:
        events = []
        while sum(1 for e in events if e.event == "message") < 4:
            ev = await again.next_event(timeout=10)
            assert ev is not None
            events.append(ev)
        resets = [e.json() for e in events if e.event == "reset"]
        assert [r["room"] for r in resets] == ["busy"]
        texts = [e.json()["text"] for e in events if e.event == "message"]
        assert "q2" in texts and texts.count("q2") == 1
    finally:
        await again.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_cursor_resumed_with_another_room_list(start_node) -> None:
    node = await start_node(**FAST)
    client = await open_rooms(node, ["a", "b"])
    await node.post("a", "a1")
    await node.post("b", "b1")
    last = (await messages(client, 2))[-1][2]
    await client.aclose()
    await node.post("a", "a2")  # missed: resumed
    await node.post("b", "b2")  # b is no longer listed
    await node.post("c", "c-before")  # c is new: starts live, so not this
    again = await open_rooms(node, ["a", "c"], last_event_id=last)
    try:
        assert [(r, t) for r, t, _ in await messages(again, 1)] == [("a", "a2")]
        await node.post("c", "c-live")
        assert [(r, t) for r, t, _ in await messages(again, 1)] == [("c", "c-live")]
    finally:
        await again.aclose()


@pytest.mark.gen_test
async def test_room_list_limits_and_bad_cursors_are_400(start_node) -> None:
    node = await start_node()
    too_many = await open_rooms(node, [f"r{i}" for i in range(33)])
    await too_many.aclose()
    assert too_many.status == 400 and json.loads(too_many.body)["error"] == "too_many_rooms"
    for query in ("/events", "/events?rooms=", "/events?rooms=a,b%0A", "/events?rooms=a,%2F"):
        c = await SSEClient.open(node.url, "x", path=query)
        assert c.status == 400, query
        await c.aclose()
    bad = await open_rooms(node, ["a", "b"], last_event_id="m1.zz")
    await bad.aclose()
    assert bad.status == 400 and json.loads(bad.body)["error"] == "bad_last_event_id"
    ok = await open_rooms(node, [f"r{i}" for i in range(32)])
    assert ok.status == 200
    await ok.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_the_cursor_comes_before_any_message(start_node) -> None:
    """The first presence event carries the cursor: a client that reconnects before any
    message arrived still gets what was posted while it was away."""
    node = await start_node(**FAST)
    client = await open_rooms(node, ["p", "q"])
    first = await client.next_event(timeout=5)
    assert first is not None and first.event == "presence" and cursor.looks_like(first.id or "")
    await client.aclose()
    await node.post("q", "while away")
    again = await open_rooms(node, ["p", "q"], last_event_id=first.id)
    try:
        assert [(r, t) for r, t, _ in await messages(again, 1)] == [("q", "while away")]
    finally:
        await again.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_presence_per_room_on_join(start_node) -> None:
    node = await start_node()
    other = await SSEClient.open(node.url, "b", nick="bob")
    client = await open_rooms(node, ["a", "b"], query="&nick=ann")
    try:
        seen: dict[str, int] = {}
        while len(seen) < 2:
            ev = await client.next_event(timeout=5)
            assert ev is not None
            if ev.event == "presence":
                seen[ev.json()["room"]] = ev.json()["count"]
        assert seen == {"a": 1, "b": 2}
    finally:
        await client.aclose()
        await other.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_resume_on_another_node_over_redis(start_node, start_redis) -> None:
    redis = start_redis()
    shared = {**FAST, "broker.backend": "redis", "broker.redis.master": redis.url,
              "broker.redis.subscribe_from": "master"}
    a = await start_node(**shared, **{"node.id": "node-a"})
    b = await start_node(**shared, **{"node.id": "node-b"})
    client = await open_rooms(a, ["x", "y"])
    await a.post("x", "x1")
    await b.post("y", "y1")
    last = (await messages(client, 2))[-1][2]
    await client.aclose()
    for room, text in (("y", "y2"), ("x", "x2"), ("y", "y3")):
        await a.post(room, text)
    again = await open_rooms(b, ["x", "y"], last_event_id=last)
    try:
        got = await messages(again, 3)
        assert [t for r, t, _ in got if r == "x"] == ["x2"]
        assert [t for r, t, _ in got if r == "y"] == ["y2", "y3"]
    finally:
        await again.aclose()
