"""The HTTP API through a real node: sends, history, presence, health, and every error path.

Each error test ends with a successful request, to show the node still serves.
"""

import asyncio
import json

import pytest
from sse_client import SSEClient


def body(response) -> dict:
    return json.loads(response.body)


async def assert_still_serves(node) -> None:
    ok = await node.post("lobby", "still here")
    assert ok.code == 201, ok.body
    assert (await node.fetch("/healthz")).code == 200


@pytest.mark.gen_test
async def test_send_returns_201_with_the_stored_id(start_node) -> None:
    node = await start_node()
    r = await node.post("lobby", "hello")
    assert r.code == 201
    assert r.headers["Content-Type"].startswith("application/json")
    msg_id = body(r)["id"]
    ms, seq = msg_id.split("-")
    assert ms.isdigit() and seq.isdigit()
    assert "replicated" not in body(r)  # nothing to replicate to on the embedded broker
    history = body(await node.fetch("/rooms/lobby/messages?limit=5"))["messages"]
    assert [(m["id"], m["nick"], m["text"], m["room"], m["node"]) for m in history] == [
        (msg_id, "tester", "hello", "lobby", "test-node")]


@pytest.mark.gen_test
async def test_form_encoded_send(start_node) -> None:
    node = await start_node()
    r = await node.fetch("/rooms/lobby/messages", "POST", "nick=ann&text=hi+there",
                         {"Content-Type": "application/x-www-form-urlencoded"})
    assert r.code == 201, r.body
    history = body(await node.fetch("/rooms/lobby/messages"))["messages"]
    assert history[-1]["text"] == "hi there" and history[-1]["nick"] == "ann"


@pytest.mark.gen_test
async def test_history_is_oldest_first_and_limited(start_node) -> None:
    node = await start_node(**{"limits.rate.burst": 100})
    ids = [body(await node.post("r1", f"m{i}"))["id"] for i in range(8)]
    history = body(await node.fetch("/rooms/r1/messages?limit=3"))["messages"]
    assert [m["id"] for m in history] == ids[-3:]
    assert [m["text"] for m in history] == ["m5", "m6", "m7"]
    assert body(await node.fetch("/rooms/empty-room/messages"))["messages"] == []


@pytest.mark.gen_test
async def test_ids_strictly_increase_within_a_room(start_node) -> None:
    node = await start_node(**{"limits.rate.burst": 1000, "limits.rate.messages_per_second": 1000})
    ids = [body(await node.post("burst", f"m{i}"))["id"] for i in range(200)]
    keys = [tuple(map(int, i.split("-"))) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


@pytest.mark.gen_test
async def test_presence_counts_streams_and_lists_nicks(start_node) -> None:
    node = await start_node()
    a = await SSEClient.open(node.url, "pres", nick="ann")
    b = await SSEClient.open(node.url, "pres", nick="bob")
    c = await SSEClient.open(node.url, "pres")  # anonymous: counted, not named
    try:
        expected = {"room": "pres", "count": 3, "nicks": ["ann", "bob"]}
        for _ in range(200):  # presence is batched: it settles within a fraction of a second
            p = body(await node.fetch("/rooms/pres/presence"))
            if p == expected:
                break
            await asyncio.sleep(0.02)
        assert p == expected
    finally:
        for client in (a, b, c):
            await client.aclose()


@pytest.mark.gen_test
async def test_health_ready_and_metrics(start_node) -> None:
    node = await start_node()
    assert body(await node.fetch("/healthz")) == {"status": "ok"}
    ready = await node.fetch("/readyz")
    assert ready.code == 200 and body(ready)["status"] == "ready"
    await node.post("lobby", "counted")
    metrics = (await node.fetch("/metrics")).body.decode()
    assert "rtchat_messages_published_total 1.0" in metrics
    for name in ("rtchat_clients_connected", "rtchat_messages_delivered_total",
                 "rtchat_fanout_latency_seconds_bucket", "rtchat_slow_clients_evicted_total"):
        assert name in metrics


@pytest.mark.gen_test
async def test_chat_page_renders_history_as_text(start_node) -> None:
    node = await start_node()
    await node.post("lobby", "<script>alert(1)</script>", nick="<b>eve</b>")
    for path in ("/", "/rooms/lobby"):
        r = await node.fetch(path)
        assert r.code == 200
        html = r.body.decode()
        assert "<script>alert(1)</script>" not in html
        assert "EventSource" in html and "fetch(" in html
        assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in html  # JSON-escaped data


# --- error paths -------------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize(("payload", "ctype", "code"), [
    (b"{not json", "application/json", "bad_json"),
    (b"[1, 2]", "application/json", "bad_json"),
    (b'{"nick": "ann"}', "application/json", "missing_text"),
    (b'{"nick": "ann", "text": "   "}', "application/json", "empty_text"),
    (b'{"nick": "ann", "text": 5}', "application/json", "bad_text"),
    (b'{"nick": "' + b"n" * 40 + b'", "text": "hi"}', "application/json", "bad_nick"),
    (b'{"nick": "a\\u0000b", "text": "hi"}', "application/json", "bad_nick"),
    (b"text=", "application/x-www-form-urlencoded", "empty_text"),
])
async def test_bad_sends_are_400(start_node, payload, ctype, code) -> None:
    node = await start_node()
    r = await node.fetch("/rooms/lobby/messages", "POST", payload, {"Content-Type": ctype})
    assert r.code == 400
    assert body(r)["error"] == code and body(r)["message"]
    assert body(await node.fetch("/rooms/lobby/messages"))["messages"] == []  # nothing stored
    await assert_still_serves(node)


@pytest.mark.gen_test
async def test_text_over_max_message_bytes_is_413(start_node) -> None:
    node = await start_node(**{"limits.max_message_bytes": 10})
    assert (await node.post("lobby", "0123456789")).code == 201  # exactly the limit
    r = await node.post("lobby", "é" * 6)  # 6 characters, 12 UTF-8 bytes
    assert r.code == 413 and body(r)["error"] == "message_too_large"
    r = await node.post("lobby", "x" * 11)
    assert r.code == 413
    ok = await node.post("lobby", "short")
    assert ok.code == 201


@pytest.mark.gen_test
async def test_body_over_max_body_bytes_is_413(start_node) -> None:
    node = await start_node(**{"limits.max_body_bytes": 100})
    r = await node.fetch("/rooms/lobby/messages", "POST",
                         json.dumps({"text": "x", "pad": "p" * 200}),
                         {"Content-Type": "application/json"})
    assert r.code == 413 and body(r)["error"] == "body_too_large"
    await assert_still_serves(node)


@pytest.mark.gen_test
async def test_cross_origin_send_is_403(start_node) -> None:
    node = await start_node(**{"http.allowed_origins": ["https://chat.example.com"]})
    r = await node.post("lobby", "csrf", headers={"Origin": "https://evil.example"})
    assert r.code == 403 and body(r)["error"] == "forbidden_origin"
    same = await node.post("lobby", "same", headers={"Origin": node.url})
    assert same.code == 201
    listed = await node.post("lobby", "listed", headers={"Origin": "https://chat.example.com"})
    assert listed.code == 201
    await assert_still_serves(node)


@pytest.mark.gen_test
async def test_rate_limit_is_429_with_retry_after(start_node) -> None:
    node = await start_node(**{"limits.rate.burst": 3, "limits.rate.messages_per_second": 0.5})
    codes = [(await node.post("lobby", f"m{i}")).code for i in range(3)]
    assert codes == [201, 201, 201]
    r = await node.post("lobby", "one too many")
    assert r.code == 429 and body(r)["error"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    # Another client (by forwarded address) is not affected.
    other = await start_node(**{"limits.rate.burst": 1, "http.xheaders": True})
    assert (await other.post("lobby", "a", headers={"X-Forwarded-For": "203.0.113.1"})).code == 201
    assert (await other.post("lobby", "b", headers={"X-Forwarded-For": "203.0.113.1"})).code == 429
    assert (await other.post("lobby", "c", headers={"X-Forwarded-For": "203.0.113.2"})).code == 201
    assert (await node.fetch("/healthz")).code == 200


@pytest.mark.gen_test
async def test_bad_room_names(start_node) -> None:
    node = await start_node()
    long_room = "r" * 65
    for path in (f"/rooms/{long_room}/messages", "/rooms/bad.room/messages",
                 "/rooms/bad%20room/presence", f"/rooms/{long_room}/events"):
        r = await node.fetch(path)
        assert r.code == 400, path
        assert body(r)["error"] == "bad_room"
    page = await node.fetch("/rooms/bad.room")
    assert page.code == 404 and b"<html" in page.body
    missing = await node.fetch("/no/such/thing")
    assert missing.code == 404
    api_missing = await node.fetch("/rooms/lobby/nope/messages")
    assert api_missing.code == 404 and body(api_missing)["error"] == "not_found"
    await assert_still_serves(node)


@pytest.mark.gen_test
async def test_bad_history_limit_is_400(start_node) -> None:
    node = await start_node()
    for limit in ("0", "-1", "abc", "1e3", "\u0661", "10%0A", "9" * 30):
        r = await node.fetch(f"/rooms/lobby/messages?limit={limit}")
        assert r.code == 400 and body(r)["error"] == "bad_limit"
    await assert_still_serves(node)


@pytest.mark.gen_test
async def test_bad_stream_parameters_are_400(start_node) -> None:
    node = await start_node()
    bad_id = await SSEClient.open(node.url, "lobby", last_event_id="yesterday")
    assert bad_id.status == 400 and json.loads(bad_id.body)["error"] == "bad_last_event_id"
    bad_nick = await SSEClient.open(node.url, "lobby", nick="n" * 100)
    assert bad_nick.status == 400 and json.loads(bad_nick.body)["error"] == "bad_nick"
    for c in (bad_id, bad_nick):
        await c.aclose()
    await assert_still_serves(node)


@pytest.mark.gen_test
async def test_over_max_clients_through_a_trusted_proxy_is_503_with_retry_after(start_node) -> None:
    # The load balancer (loopback, trusted with xheaders on) tries another node on a 503.
    node = await start_node(**{"limits.max_clients": 2, "http.xheaders": True})
    a = await SSEClient.open(node.url, "lobby")
    b = await SSEClient.open(node.url, "lobby")
    c = await SSEClient.open(node.url, "lobby")
    try:
        assert (a.status, b.status) == (200, 200)
        assert c.status == 503
        assert json.loads(c.body)["error"] == "too_many_clients"
        assert int(c.headers["retry-after"]) >= 1
        await assert_still_serves(node)
    finally:
        for client in (a, b, c):
            await client.aclose()


@pytest.mark.gen_test
async def test_over_max_clients_a_direct_client_is_told_to_come_back(start_node) -> None:
    # A standard EventSource gives up for good on a 503: it gets a retry: and an end instead.
    node = await start_node(**{"limits.max_clients": 1})
    a = await SSEClient.open(node.url, "lobby")
    b = await SSEClient.open(node.url, "lobby")
    try:
        assert a.status == 200 and b.status == 200
        assert await b.until_closed(timeout=5) == []
        assert b.retry is not None and b.retry >= 2500  # at least Retry-After's 5 s, jittered
        assert node.hub.client_count == 1
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.gen_test
async def test_errors_never_show_a_traceback(start_node) -> None:
    node = await start_node()
    r = await node.fetch("/rooms/lobby/messages", "PUT", "x")
    assert r.code == 405
    assert b"Traceback" not in r.body
    assert body(r)["error"] == "method_not_allowed"
    await assert_still_serves(node)
