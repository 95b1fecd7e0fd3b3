"""Idempotent sends: one key, one stored message, one delivery per client — on both brokers.

A retry with the same ``Idempotency-Key`` (or body ``key``) gets the first
answer again; a reused key with other content is 422; after
``history.dedup_seconds`` the key is free again. On Redis the check and the
store are one script, so a send that got 503 although the master stored it
is made safe by its retry.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from probes import async_wait_for
from sse_client import SSEClient

FAST = {"limits.rate.burst": 10000, "limits.rate.messages_per_second": 10000}


def body(response: Any) -> dict[str, Any]:
    return json.loads(response.body)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    server = request.getfixturevalue("start_redis")()
    return {"broker.backend": "redis", "broker.redis.master": server.url,
            "broker.redis.subscribe_from": "master", "broker.redis.health_interval_seconds": 0.2}


async def send(node: Any, room: str, text: str, key: str | None = None, nick: str = "ann",
               in_body: bool = False) -> Any:
    payload: dict[str, Any] = {"nick": nick, "text": text}
    headers = {}
    if key is not None and in_body:
        payload["key"] = key
    elif key is not None:
        headers["Idempotency-Key"] = key
    return await node.fetch(f"/rooms/{room}/messages", "POST", payload, headers)


async def texts_in(node: Any, room: str) -> list[str]:
    r = await node.fetch(f"/rooms/{room}/messages?limit=100")
    return [m["text"] for m in body(r)["messages"]]


@pytest.mark.gen_test(timeout=60)
async def test_the_same_key_twice_stores_once_and_answers_the_same_id(start_node, backend) -> None:
    node = await start_node(**FAST, **backend)
    client = await SSEClient.open(node.url, "idem")
    try:
        first = await send(node, "idem", "hello", key="k-1")
        again = await send(node, "idem", "hello", key="k-1")
        in_body = await send(node, "idem", "hello", key="k-1", in_body=True)
        assert first.code == again.code == in_body.code == 201
        assert body(first)["id"] == body(again)["id"] == body(in_body)["id"]
        assert "duplicate" not in body(first)
        assert body(again)["duplicate"] is True and body(in_body)["duplicate"] is True
        marker = await send(node, "idem", "after")
        assert marker.code == 201
        got = await client.messages(2, timeout=10)
        assert [m["text"] for m in got] == ["hello", "after"]  # one delivery of "hello"
        assert got[0]["id"] == body(first)["id"]
        assert await texts_in(node, "idem") == ["hello", "after"]
        # The same key in another room is another message.
        other = await send(node, "elsewhere", "hello", key="k-1")
        assert other.code == 201 and "duplicate" not in body(other)
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_a_key_reused_for_other_content_is_422(start_node, backend) -> None:
    node = await start_node(**FAST, **backend)
    assert (await send(node, "r", "one", key="same")).code == 201
    other_text = await send(node, "r", "two", key="same")
    assert other_text.code == 422 and body(other_text)["error"] == "idempotency_key_reused"
    other_nick = await send(node, "r", "one", key="same", nick="bob")
    assert other_nick.code == 422
    assert await texts_in(node, "r") == ["one"]


@pytest.mark.gen_test
async def test_malformed_keys_are_400(start_node) -> None:
    node = await start_node(**FAST)
    for key in ("has space", "x" * 65, "a/b", "a.b"):
        r = await send(node, "r", "x", key=key)
        assert r.code == 400 and body(r)["error"] == "bad_idempotency_key", key
    for key in ("naïve", "k\u0661", "k\n"):  # not even latin-1: in the body
        r = await send(node, "r", "x", key=key, in_body=True)
        assert r.code == 400 and body(r)["error"] == "bad_idempotency_key", key
    r = await node.fetch("/rooms/r/messages", "POST", {"nick": "a", "text": "x", "key": 5})
    assert r.code == 400 and body(r)["error"] == "bad_idempotency_key"
    assert await texts_in(node, "r") == []


@pytest.mark.gen_test(timeout=60)
async def test_a_key_is_free_again_after_the_dedup_window(start_node, backend) -> None:
    node = await start_node(**FAST, **backend, **{"history.dedup_seconds": 1})
    first = await send(node, "w", "tick", key="window")
    started = time.monotonic()
    assert first.code == 201
    # Within the window, even a retry late in it is the first answer (the window does not slide).
    await asyncio.sleep(0.5)
    assert body(await send(node, "w", "tick", key="window"))["duplicate"] is True

    async def fresh() -> bool:
        r = await send(node, "w", "tick", key="window")
        return r.code == 201 and "duplicate" not in body(r)

    deadline = started + 5
    while not await fresh():
        assert time.monotonic() < deadline, "the key never expired"
        await asyncio.sleep(0.1)
    assert time.monotonic() - started >= 1.0
    assert await texts_in(node, "w") == ["tick", "tick"]


@pytest.mark.gen_test(timeout=60)
async def test_a_send_that_got_503_while_the_master_slept_is_made_safe_by_its_retry(
        start_node, start_redis) -> None:
    """The master stores the message after the node gave up (503); the retry finds the key."""
    master = start_redis(extra_args=("--enable-debug-command", "local"))
    node = await start_node(**FAST, **{"broker.backend": "redis", "broker.redis.master": master.url,
                                      "broker.redis.subscribe_from": "master"})
    client = await SSEClient.open(node.url, "slept")
    try:
        # A first send loads the script: a master that has never seen it answers NOSCRIPT.
        assert (await send(node, "slept", "warm")).code == 201
        admin = master.client()
        sleeper = threading.Thread(target=lambda: admin.execute_command("DEBUG", "SLEEP", "2"))
        sleeper.start()
        await asyncio.sleep(0.1)  # the master is now asleep
        lost = await send(node, "slept", "typed once", key="keystroke-1")
        assert lost.code == 503  # the node gave up before the master answered
        await asyncio.to_thread(sleeper.join, 10)
        retry = None
        for _ in range(50):  # the client retries (the page does, with backoff)
            retry = await send(node, "slept", "typed once", key="keystroke-1")
            if retry.code == 201:
                break
            await asyncio.sleep(0.1)
        assert retry is not None and retry.code == 201
        assert body(retry)["duplicate"] is True  # the 503'd send had in fact been stored
        assert await texts_in(node, "slept") == ["warm", "typed once"]
        await send(node, "slept", "marker")
        got = await client.messages(3, timeout=10)
        assert [m["text"] for m in got] == ["warm", "typed once", "marker"]
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=90)
async def test_retries_across_a_master_restart_store_each_message_once(start_node, start_redis) -> None:
    master = start_redis()
    node = await start_node(**FAST, **{"broker.backend": "redis", "broker.redis.master": master.url,
                                      "broker.redis.subscribe_from": "master",
                                      "broker.redis.health_interval_seconds": 0.2})
    acked: dict[str, str] = {}

    async def sender(i: int) -> None:
        key = f"msg-{i}"
        for _ in range(200):
            r = await send(node, "kill", f"m{i}", key=key)
            if r.code == 201:
                acked[key] = body(r)["id"]
                return
            assert r.code == 503, r.body
            await asyncio.sleep(0.05)
        raise AssertionError(f"{key} never stored")

    async def traffic() -> None:
        for i in range(60):
            await sender(i)
            if i == 20:
                master.kill()
                master.start()  # AOF on: what was stored survives
            await asyncio.sleep(0.01)

    await traffic()
    await async_wait_for(lambda: len(acked) == 60, 30, "every send acknowledged")
    texts = await texts_in(node, "kill")
    assert sorted(texts, key=lambda t: int(t[1:])) == [f"m{i}" for i in range(60)]
    assert len(texts) == len(set(texts)) == 60  # none stored twice
