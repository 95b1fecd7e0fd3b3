"""The SSE clients people use, against real rtchat processes: none sees an empty event,
each resumes exactly, and no standard EventSource is stranded by a draining or full node.

- httpx-sse, sseclient-py and the npm ``eventsource`` package: with heartbeats
  every 0.1 s, every event they surface is JSON (the opening ``retry:`` and the
  ``: ping`` lines never become events), and a reconnect with Last-Event-ID
  gets exactly the messages missed, in order, then live ones.
- npm ``eventsource`` and Chromium's EventSource (a spec-following client
  gives up for good on any non-200): a node's SIGTERM drain and its restart on
  the same port, and a full node whose slot frees later; they come back and
  get every message, never once CLOSED.
- Behind the shipped nginx.conf with two nodes: while node A drains, a new
  stream through nginx is served by node B at once (200, real messages), not
  the come-back answer.

Node.js and the npm package (tests/js, ``npm ci --prefix tests/js``), chromium,
redis-server and nginx: skipped locally when missing, failing in CI.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
from browser import chromium
from lb_processes import RedisServer, log_tail, start_ready, two_nodes_behind_nginx
from playwright.async_api import Page
from probes import async_poll, http_get, require_tool, wait_for
from sse_clients import (
    Ev,
    NodeEventSource,
    RawStream,
    assert_clean,
    env_for_tests,
    history,
    hold_streams,
    post,
    python_client,
    read_until,
)

HEARTBEATS = {"RTCHAT_SSE__HEARTBEAT_SECONDS": "0.1"}


def events_url(base_url: str, room: str, last_event_id: str | None = None) -> str:
    url = f"{base_url}/rooms/{room}/events"
    return url + (f"?last_event_id={last_event_id}" if last_event_id else "")


def redis_env(master_url: str, **extra: str) -> dict[str, str]:
    return env_for_tests(RTCHAT_BROKER__BACKEND="redis", RTCHAT_BROKER__REDIS__MASTER=master_url,
                         RTCHAT_BROKER__REDIS__SUBSCRIBE_FROM="master", **extra)


def wait_exit(node: Any, timeout: float = 30) -> int:
    wait_for(lambda: node.proc.poll() is not None, timeout, f"node {node.port} to drain and exit")
    return node.proc.returncode


# -- no empty events, exact resume: the Python clients --------------------------------


@pytest.mark.parametrize("kind", ["httpx-sse", "sseclient-py"])
def test_python_clients_see_no_empty_events_and_resume_exactly(spawn_node, kind: str) -> None:
    node = spawn_node(env=env_for_tests(**HEARTBEATS))
    room = f"py-{kind}"
    tap = RawStream(node.url, f"/rooms/{room}/events")  # sees the heartbeats the client gets
    try:
        tap.wait(lambda t: t.status == 200, 10, "the tap's stream")
        seen: list[Ev] = []
        with python_client(kind, events_url(node.url, room)) as events:
            one = post(node.url, room, "one")
            read_until(events, seen, one)
            # Heartbeats go to every stream of the node at once: three more on the tap
            # means three more reached this client too, after an id was seen.
            pings = tap.pings
            tap.wait(lambda t: t.pings >= pings + 3, 10, "three heartbeats")
            two = post(node.url, room, "two")
            read_until(events, seen, two)
        assert_clean(seen)
        assert seen[0].event == "presence"  # right after the head
        assert [json.loads(e.data)["text"] for e in seen if e.event == "message"] == ["one", "two"]

        # Gone for a while; back with Last-Event-ID: exactly what was missed, then live.
        missed = [post(node.url, room, f"missed {i}") for i in range(5)]
        resumed: list[Ev] = []
        with python_client(kind, events_url(node.url, room), last_event_id=two) as events:
            live = post(node.url, room, "live")
            read_until(events, resumed, live)
        assert_clean(resumed)
        assert [e.id for e in resumed if e.event == "message"] == [*missed, live]
    finally:
        tap.close()


# -- no empty events, exact resume: npm eventsource -------------------------------------


def test_npm_eventsource_sees_no_empty_events_and_resumes_exactly(spawn_node) -> None:
    # A reconnect 0.75-2.25 s after a dropped stream: time to miss messages.
    node = spawn_node(env=env_for_tests(RTCHAT_SSE__RETRY_MS="1500", **HEARTBEATS))
    room = "npm-resume"
    es = NodeEventSource(events_url(node.url, room))  # first: it skips when npm is missing
    tap = RawStream(node.url, f"/rooms/{room}/events")
    try:
        tap.wait(lambda t: t.status == 200, 10, "the tap's stream")
        es.wait(lambda s: s.events(), 10, "the presence event after the head")
        one = post(node.url, room, "one")
        es.wait_message(one)
        pings = tap.pings
        tap.wait(lambda t: t.pings >= pings + 3, 10, "three heartbeats")
        two = post(node.url, room, "two")
        es.wait_message(two)

        # The node ends the client's stream (the admin's disconnect): it reconnects by itself.
        status, body = http_get(node.url + "/admin/api/status")
        assert status == 200
        ids = [c["id"] for c in json.loads(body)["clients"]["listed"]
               if c["room"] == room and c["user_agent"] != "rtchat-test-raw-stream"]
        assert len(ids) == 1, body
        requests = len(es.of("request"))
        kicked = json.loads(post_admin(node.url, f"/admin/api/clients/{ids[0]}/disconnect"))
        assert kicked == {"disconnected": ids[0]}
        missed = [post(node.url, room, f"missed {i}") for i in range(5)]
        es.wait(lambda s: len(s.of("request")) > requests and len(s.of("open")) >= 2, 20,
                what="the reconnect")
        assert es.of("request")[-1]["lastEventId"] == two
        live = post(node.url, room, "live")
        es.wait_message(live)
        assert es.message_ids() == [one, two, *missed, live]
        assert_clean(es.events())
        assert es.never_closed()
    finally:
        es.close()
        tap.close()


def post_admin(base_url: str, path: str) -> bytes:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(base_url + path, method="POST", data=b""), timeout=10) as r:
        assert r.status == 200
        return r.read()


# -- not stranded: npm eventsource ---------------------------------------------------------


def test_npm_eventsource_survives_a_drain_and_a_restart_on_the_same_port(spawn_node, start_redis) -> None:
    redis = start_redis()
    env = redis_env(redis.url, RTCHAT_SHUTDOWN__DRAIN_SECONDS="4", RTCHAT_SSE__RETRY_MS="300")
    node = spawn_node(env=env)
    other = spawn_node(env=env)  # on the same Redis: takes the sends while `node` is away
    room = "npm-drain"
    before = [post(node.url, room, f"before {i}") for i in range(2)]
    following = NodeEventSource(events_url(node.url, room, before[0]))
    late: NodeEventSource | None = None
    held = hold_streams(node.url)
    try:
        following.wait_message(before[1])
        node.signal(signal.SIGTERM)
        wait_for(lambda: http_get(node.url + "/readyz")[0] == 503, 10, "the node to drain")
        # A client arriving now is told to come back: it opens, the stream ends, and it
        # tries again (a 503 here would leave it CLOSED for good).
        late = NodeEventSource(events_url(node.url, room, before[1]))
        late.wait(lambda s: s.of("open") and s.of("error"), 10, "the come-back answer")
        assert late.never_closed(), late.lines
        assert wait_exit(node) == 0, node.log()

        away = [post(other.url, room, f"while away {i}") for i in range(3)]
        restarted = spawn_node(env=env, port=node.port)
        after = [post(restarted.url, room, f"after {i}") for i in range(2)]
        for es in (following, late):
            es.wait_message(after[-1], timeout=30)
            assert_clean(es.events())
            assert es.never_closed(), es.lines
        assert following.message_ids() == [before[1], *away, *after]
        assert late.message_ids() == [*away, *after]
        assert [m["id"] for m in history(restarted.url, room)] == [*before, *away, *after]
    finally:
        following.close()
        if late is not None:
            late.close()
        for stream in held:
            stream.close()


def test_npm_eventsource_waits_out_a_full_node(spawn_node) -> None:
    node = spawn_node(env=env_for_tests(RTCHAT_LIMITS__MAX_CLIENTS="1"))
    room = "npm-full"
    start = post(node.url, room, "start")
    blocker = RawStream(node.url, f"/rooms/{room}/events")  # the node's only slot
    es: NodeEventSource | None = None
    try:
        blocker.wait(lambda b: b.status == 200 and b.has("presence"), 10, "the blocker's stream")
        es = NodeEventSource(events_url(node.url, room, start))
        es.wait(lambda s: s.of("open") and s.of("error"), 10, "the come-back answer")
        assert es.events() == []
        waiting = [post(node.url, room, f"waiting {i}") for i in range(3)]
        blocker.close()  # a slot frees
        es.wait_message(waiting[-1], timeout=30)
        live = [post(node.url, room, f"live {i}") for i in range(2)]
        es.wait_message(live[-1])
        assert es.message_ids() == [*waiting, *live]
        assert_clean(es.events())
        assert es.never_closed(), es.lines
    finally:
        if es is not None:
            es.close()
        blocker.close()


# -- not stranded: Chromium's EventSource ----------------------------------------------

FOLLOW = """url => {
  window.__sse = {opens: 0, errors: [], events: []};
  const es = new EventSource(url);
  es.onopen = () => { window.__sse.opens += 1; };
  es.onerror = () => { window.__sse.errors.push(es.readyState); };
  for (const name of ["message", "presence", "reset"]) {
    es.addEventListener(name, e => window.__sse.events.push(
      {event: name, id: e.lastEventId, data: e.data}));
  }
}"""


async def sse_state(page: Page) -> dict[str, Any]:
    return await page.evaluate("window.__sse")


async def until_page(page: Page, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
    return await async_poll(lambda: sse_state(page), predicate, timeout,
                            f"Chromium EventSource: {what}", interval=0.05)


def message_ids(state: dict[str, Any]) -> list[str]:
    return [e["id"] for e in state["events"] if e["event"] == "message"]


async def follow_in_chromium(browser: Any, page_url: str, url: str) -> Page:
    """A page of the node's origin whose own EventSource follows ``url``."""
    page = await browser.new_page(bypass_csp=True)
    await page.goto(page_url)
    await page.evaluate(FOLLOW, url)
    return page


@pytest.mark.browser
@pytest.mark.gen_test(timeout=120)
async def test_chromium_eventsource_survives_a_drain_and_a_restart_on_the_same_port(
        spawn_node, start_redis) -> None:
    exe = require_tool("chromium")
    redis = start_redis()
    env = redis_env(redis.url, RTCHAT_SHUTDOWN__DRAIN_SECONDS="4", RTCHAT_SSE__RETRY_MS="300")
    node = spawn_node(env=env)
    other = spawn_node(env=env)
    room = "chromium-drain"
    before = [post(node.url, room, f"before {i}") for i in range(2)]
    held = hold_streams(node.url)
    try:
        async with chromium(exe) as browser:
            following = await follow_in_chromium(browser, node.url + "/healthz",
                                                 events_url(node.url, room, before[0]))
            await until_page(following, lambda s: before[1] in message_ids(s), 10, "the first messages")
            node.signal(signal.SIGTERM)
            wait_for(lambda: http_get(node.url + "/readyz")[0] == 503, 10, "the node to drain")
            late = await browser.new_page(bypass_csp=True)
            await late.goto(node.url + "/healthz")  # the page itself, before the node stops
            await late.evaluate(FOLLOW, events_url(node.url, room, before[1]))
            await until_page(late, lambda s: s["opens"] and s["errors"], 10, "the come-back answer")
            assert wait_exit(node) == 0, node.log()

            away = [post(other.url, room, f"while away {i}") for i in range(3)]
            restarted = spawn_node(env=env, port=node.port)
            after = [post(restarted.url, room, f"after {i}") for i in range(2)]
            expected = {following: [before[1], *away, *after], late: [*away, *after]}
            for page, ids in expected.items():
                state = await until_page(page, lambda s, last=after[-1]: last in message_ids(s), 30,
                                         "every message after the restart")
                assert message_ids(state) == ids
                assert_clean(state["events"])
                assert 2 not in state["errors"], state  # never CLOSED
                assert await page.evaluate("window.__sse.opens") >= 2
    finally:
        for stream in held:
            stream.close()


@pytest.mark.browser
@pytest.mark.gen_test(timeout=90)
async def test_chromium_eventsource_waits_out_a_full_node(spawn_node) -> None:
    exe = require_tool("chromium")
    node = spawn_node(env=env_for_tests(RTCHAT_LIMITS__MAX_CLIENTS="1"))
    room = "chromium-full"
    start = post(node.url, room, "start")
    blocker = RawStream(node.url, f"/rooms/{room}/events")
    try:
        blocker.wait(lambda b: b.status == 200 and b.has("presence"), 10, "the blocker's stream")
        async with chromium(exe) as browser:
            page = await follow_in_chromium(browser, node.url + "/healthz",
                                            events_url(node.url, room, start))
            await until_page(page, lambda s: s["opens"] and s["errors"], 15, "the come-back answer")
            waiting = [post(node.url, room, f"waiting {i}") for i in range(3)]
            blocker.close()
            await until_page(page, lambda s: waiting[-1] in message_ids(s), 30, "the waiting messages")
            live = [post(node.url, room, f"live {i}") for i in range(2)]
            state = await until_page(page, lambda s: live[-1] in message_ids(s), 10, "live messages")
            assert message_ids(state) == [*waiting, *live]
            assert_clean(state["events"])
            assert 2 not in state["errors"], state
    finally:
        blocker.close()


# -- behind nginx: a drain moves new streams to the other node at once -----------------


@pytest.mark.nginx
def test_behind_nginx_a_draining_node_sends_new_streams_to_the_other_at_once(tmp_path) -> None:
    require_tool("nginx")
    require_tool("redis-server")
    started: list[Any] = []
    streams: list[RawStream] = []
    try:
        master = start_ready(started, RedisServer(tmp_path, "master"))
        env = env_for_tests(RTCHAT_BROKER__REDIS__MASTER=master.url, RTCHAT_BROKER__REDIS__REPLICAS="[]",
                            RTCHAT_BROKER__REDIS__SUBSCRIBE_FROM="master",
                            RTCHAT_SHUTDOWN__DRAIN_SECONDS="60")
        (a, _b), nginx = two_nodes_behind_nginx(tmp_path, env, started)

        streams.extend(hold_streams(a.url))  # A drains for most of the minute
        a.send_signal(signal.SIGTERM)  # drains: still up, taking no new streams
        wait_for(lambda: http_get(a.url + "/readyz")[0] == 503, 10, "node A to drain")
        room = "lb-drain"
        through_nginx: list[RawStream] = []
        for _ in range(4):
            stream = RawStream(nginx.url, f"/rooms/{room}/events")
            streams.append(stream)
            through_nginx.append(stream)
            stream.wait(lambda s: s.status and s.has("presence"), 10, "a stream through nginx")
            assert stream.status == 200
            assert stream.node_id() == "node-b", stream.data
        text = "served by node B"
        post(nginx.url, room, text)
        for stream in through_nginx:
            stream.wait(lambda s: s.has(text), 10, "the message on every stream")
            assert not stream.has("come back later")
        a.check_alive()  # still draining, not gone: nginx moved the streams itself
        for stream in through_nginx:
            stream.close()
        # nginx logs a stream when it ends: at least one went to A first, got 503, then B.
        def moved() -> bool:
            log = nginx.access_log.read_text(errors="replace")
            return any(f"/rooms/{room}/events" in line and "ustatus=503, 200" in line
                       for line in log.splitlines())

        wait_for(moved, 10, "a stream nginx moved from node A to node B, in its access log")
    except AssertionError:
        print("\n".join(f"--- {p.name} ---\n{log_tail(p.log_path, 25)}" for p in started))
        raise
    finally:
        for stream in streams:
            stream.close()
        for proc in reversed(started):
            proc.stop()

