"""The admin page tells the cluster's truth: one verdict, shared history, rooms, layout.

Real redis-server processes (``redis_trio``: a master and two replicas) and
two nodes in the test's loop. The verdict must be the same on both nodes,
go degraded with the reason named when a replica is SIGKILLed, and come
back when it restarts; a failover one node saw must be listed by the other,
with a date; the rooms view sums both nodes. The browser test saves the
page healthy and degraded at desktop and phone width (also copied to
``SCREENSHOTS`` when that directory exists) and checks in the DOM that no
endpoint URL wraps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from browser import DESKTOP, PHONE, chromium
from probes import async_poll, require_tool
from redis_servers import FAST_HEALTH, redis_node_config
from sse_client import SSEClient

from rtchat.broker.activity import RoomActivity, rooms_view
from rtchat.broker.base import EndpointStatus
from rtchat.broker.verdict import judge, node_view, probe_slow_ms

SCREENSHOTS = Path("/work/screenshots")


async def status_of(node) -> dict:
    r = await node.fetch("/admin/api/status")
    assert r.code == 200, r.body
    return json.loads(r.body)


async def both_until(nodes, check, what: str, timeout: float = 15.0) -> list[dict]:
    """Poll every node's status until ``check`` holds for the list of them."""
    async def fetch() -> list[dict]:
        return [await status_of(n) for n in nodes]

    return await async_poll(fetch, check, timeout, what,
                            describe=lambda sts: f"verdicts {[s['verdict'] for s in sts]}")


def verdicts(sts: list[dict]) -> list[dict]:
    return [s["verdict"] for s in sts]


def same(state: str):
    def check(sts: list[dict]) -> bool:
        vs = verdicts(sts)
        return all(v == vs[0] for v in vs) and vs[0]["state"] == state
    return check


def host_port(url: str) -> str:
    return url.removeprefix("redis://").removesuffix("/0")


# --- the verdict, judged from shared views (pure) -----------------------------------------------


def ep(url: str, role: str, **kw) -> EndpointStatus:
    base = {"url": url, "configured_role": role, "reachable": True, "role": role,
            "master_link_status": "up" if role == "replica" else None, "lag_bytes": 0,
            "lag_seconds": 0.0, "ping_ms": 0.2, "probe_ms": 1.0, "last_error": None,
            "healthy": True, "subscribed": False}
    base.update(kw)
    return EndpointStatus(**base)


M, R1, R2 = "redis://m:1/0", "redis://r:2/0", "redis://r:3/0"


def view(*eps: EndpointStatus, not_ready=()) -> dict:
    return node_view(eps, list(not_ready))


def heartbeat(node_id: str, v: dict, age: float = 0.0, now: float = 1000.0) -> dict:
    return {"id": node_id, "last_seen": now - age, "view": v}


def test_verdict_rules() -> None:
    ok = view(ep(M, "master"), ep(R1, "replica", subscribed=True), ep(R2, "replica"))
    args = {"now": 1000.0, "late_after": 2.0, "slow_ms": 500.0}
    assert judge([heartbeat("b", ok)], "a", ok, **args).state == "healthy"

    # A replica down, seen by one node only: degraded, named, and no spare left.
    dead = view(ep(M, "master"), ep(R1, "replica", subscribed=True),
                ep(R2, "replica", reachable=False, healthy=False, last_error="refused"))
    v = judge([heartbeat("b", ok)], "a", dead, **args)
    assert v.state == "degraded"
    assert v.reasons == ("replica r:3 unhealthy: unreachable (seen by a)",
                         "no spare replica left: 1 of 2 replicas healthy")
    # Seen by both: the same words on both, whatever each node's error text.
    dead_b = view(ep(M, "master"), ep(R1, "replica", subscribed=True),
                  ep(R2, "replica", reachable=False, healthy=False, last_error="timeout!"))
    on_a = judge([heartbeat("a", dead), heartbeat("b", dead_b)], "a", dead, **args)
    on_b = judge([heartbeat("a", dead), heartbeat("b", dead_b)], "b", dead_b, **args)
    assert on_a == on_b and on_a.reasons[0] == "replica r:3 unhealthy: unreachable"

    # One replica configured and healthy: nothing spare to ask for.
    single = view(ep(M, "master"), ep(R1, "replica", subscribed=True))
    assert judge([], "a", single, **args).state == "healthy"

    # The master out of reach: down, and heartbeat ages are not judged meanwhile.
    no_master = view(ep(M, "master", reachable=False, healthy=False), ep(R1, "replica"),
                     ep(R2, "replica"), not_ready=["master unreachable"])
    v = judge([heartbeat("b", ok, age=30)], "a", no_master, **args)
    assert v.state == "down" and v.reasons[0] == "master unreachable"
    assert not any("heartbeat" in r for r in v.reasons)

    # A node that cannot deliver while the master is up: down, naming the node.
    deaf = view(ep(M, "master"), ep(R1, "replica"), ep(R2, "replica"),
                not_ready=["no endpoint delivers"])
    v = judge([heartbeat("b", ok)], "a", deaf, **args)
    assert v == judge([heartbeat("a", deaf)], "b", ok, **args)
    assert v.state == "down" and v.reasons == ("no endpoint delivers (a)",)

    # A late heartbeat, a node gone without leaving, a slow probe: degraded.
    v = judge([heartbeat("b", ok, age=5)], "a", ok, **args)
    assert v.state == "degraded" and v.reasons[0].startswith("node b heartbeat late (last seen ")
    v = judge([{"id": "c", "last_seen": 900.0, "missing": True}], "a", ok, **args)
    assert v.reasons == ("node c missing heartbeats (last seen 1970-01-01 00:15:00 UTC)",)
    slow = view(ep(M, "master"), ep(R1, "replica", subscribed=True, probe_ms=900.0),
                ep(R2, "replica"))
    v = judge([], "a", slow, **args)
    assert v.reasons == ("a: delivery probe over 500 ms on r:2",)
    assert probe_slow_ms(5) == 500 and probe_slow_ms(0.4) == 200


def test_rooms_view_sums_nodes_and_activity_keeps_one_minute() -> None:
    now = [100.0]
    act = RoomActivity(clock=lambda: now[0])
    for _ in range(3):
        act.note("alpha")
    now[0] += 30
    act.note("alpha")
    act.note("beta")
    assert act.per_minute() == {"alpha": 4, "beta": 1}
    now[0] += 45  # the first three are over a minute old
    assert act.rooms({"gamma": 2}) == {"gamma": {"clients": 2, "per_minute": 0},
                                       "alpha": {"clients": 0, "per_minute": 1},
                                       "beta": {"clients": 0, "per_minute": 1}}
    nodes = [{"id": "a", "room_stats": {"alpha": {"clients": 2, "per_minute": 3}}},
             {"id": "b", "room_stats": {"alpha": {"clients": 1, "per_minute": 2},
                                        "beta": {"clients": 1, "per_minute": 0}}},
             {"id": "c", "missing": True, "room_stats": {"alpha": {"clients": 9}}}]
    assert rooms_view(nodes) == [
        {"room": "alpha", "clients": 3, "per_minute": 5, "nodes": 2},
        {"room": "beta", "clients": 1, "per_minute": 0, "nodes": 1}]


# --- a real cluster -----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_verdict_goes_degraded_on_both_nodes_when_a_replica_dies_and_back(
        start_node, redis_trio) -> None:
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    b = await start_node(**redis_node_config(master, replicas, "node-b"))
    sts = await both_until([a, b], lambda s: same("healthy")(s) and all(
        sorted(n["id"] for n in st["cluster"]["nodes"]) == ["node-a", "node-b"] for st in s),
        "both nodes healthy, each seeing the other")
    assert sts[0]["verdict"] == {"state": "healthy", "reasons": []}
    metrics = (await a.fetch("/metrics")).body.decode()
    assert 'rtchat_cluster_verdict{state="healthy"} 1.0' in metrics
    assert 'rtchat_cluster_verdict{state="degraded"} 0.0' in metrics

    victim = replicas[0]
    victim.kill()
    # Each node finds the dead replica on its own health round: until both have, the
    # reason ends in "(seen by ...)", on both nodes alike.
    dead = f"replica {host_port(victim.url)} unhealthy: unreachable"
    sts = await both_until([a, b], lambda s: same("degraded")(s) and dead in verdicts(s)[0]["reasons"],
                           "both nodes degraded, with the same reasons, each seeing the dead replica")
    reasons = sts[0]["verdict"]["reasons"]
    assert "no spare replica left: 1 of 2 replicas healthy" in reasons
    for st in sts:
        row = next(e for e in st["redis"]["endpoints"] if e["url"] == victim.url)
        assert row["down_since"] is not None and time.time() - 30 < row["down_since"] <= time.time()
        assert row["problem"] == "unreachable"
    metrics = (await b.fetch("/metrics")).body.decode()
    assert 'rtchat_cluster_verdict{state="degraded"} 1.0' in metrics
    assert 'rtchat_cluster_verdict{state="healthy"} 0.0' in metrics

    victim.start()
    sts = await both_until([a, b], same("healthy"), "both nodes healthy again", timeout=20)
    row = next(e for e in sts[0]["redis"]["endpoints"] if e["url"] == victim.url)
    assert row["down_since"] is None and row["healthy"]


@pytest.mark.gen_test(timeout=90)
async def test_verdict_is_down_on_both_nodes_while_the_master_is_gone(start_node, redis_trio) -> None:
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    b = await start_node(**redis_node_config(master, replicas, "node-b"))
    await both_until([a, b], same("healthy"), "a healthy cluster")
    master.kill()
    sts = await both_until([a, b], same("down"), "both nodes down, for the same reason")
    assert sts[0]["verdict"]["reasons"][0] == "master unreachable"
    metrics = (await a.fetch("/metrics")).body.decode()
    assert 'rtchat_cluster_verdict{state="down"} 1.0' in metrics
    master.start()
    await both_until([a, b], same("healthy"), "both nodes healthy once the master is back",
                     timeout=30)


@pytest.mark.gen_test(timeout=90)
async def test_a_failover_seen_by_one_node_is_listed_by_the_other_with_a_date(
        start_node, redis_trio) -> None:
    master, replicas = redis_trio
    # node-b reads from the master, so only node-a's subscription moves.
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    b = await start_node(**redis_node_config(master, replicas, "node-b",
                                             **{"broker.redis.subscribe_from": "master"}))
    st = (await both_until([a, b], same("healthy"), "a healthy cluster"))[0]
    on = st["redis"]["subscribed_endpoint"]
    victim = next(r for r in replicas if r.url == on)
    before = time.time()
    victim.kill()

    def listed(sts: list[dict]) -> bool:
        return all(any(f["node"] == "node-a" for f in s["redis"]["cluster_failovers"])
                   for s in sts)

    sa, sb = await both_until([a, b], listed, "node-a's failover listed on both nodes")
    (record,) = [f for f in sb["redis"]["cluster_failovers"] if f["node"] == "node-a"]
    assert record["from"] == victim.url and record["to"] in {master.url, replicas[1].url,
                                                             replicas[0].url}
    assert record["reason"] and before - 1 <= record["at"] <= time.time()
    assert sb["redis"]["failover_count"] == 0  # node-b itself never switched
    assert sa["redis"]["cluster_failovers"] == sb["redis"]["cluster_failovers"]
    with master.client() as r:  # kept in Redis, capped
        assert r.llen("rtchat:failovers") >= 1
        assert json.loads(r.lindex("rtchat:failovers", 0))["node"] == "node-a"


@pytest.mark.gen_test(timeout=60)
async def test_rooms_view_counts_clients_and_messages_across_two_nodes(start_node, redis_trio) -> None:
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    b = await start_node(**redis_node_config(master, replicas, "node-b"))
    clients = [await SSEClient.open(a.url, "alpha", nick="ann"),
               await SSEClient.open(a.url, "alpha", nick="amy"),
               await SSEClient.open(b.url, "alpha", nick="bob"),
               await SSEClient.open(b.url, "beta", nick="ben")]
    try:
        for i in range(3):
            assert (await a.post("alpha", f"from a {i}")).code == 201
        for i in range(2):
            assert (await b.post("alpha", f"from b {i}")).code == 201
        assert (await b.post("gamma", "nobody listens")).code == 201
        want = [{"room": "alpha", "clients": 3, "per_minute": 5, "nodes": 2},
                {"room": "beta", "clients": 1, "per_minute": 0, "nodes": 1},
                {"room": "gamma", "clients": 0, "per_minute": 1, "nodes": 0}]
        sts = await both_until([a, b], lambda s: all(st["rooms"]["listed"] == want for st in s),
                               "the same rooms view on both nodes")
        assert sts[0]["rooms"]["count"] == 3
    finally:
        for c in clients:
            await c.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_a_node_killed_without_leaving_is_missing_and_degrades(
        start_node, spawn_node, redis_trio) -> None:
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    env = {"RTCHAT_BROKER__BACKEND": "redis", "RTCHAT_BROKER__REDIS__MASTER": master.url,
           "RTCHAT_BROKER__REDIS__REPLICAS": json.dumps([r.url for r in replicas]),
           "RTCHAT_NODE__ID": "node-k",
           **{"RTCHAT_" + k.upper().replace(".", "__"): str(v) for k, v in FAST_HEALTH.items()}}
    other = spawn_node(env=env)
    await both_until([a], lambda s: any(n["id"] == "node-k" for n in s[0]["cluster"]["nodes"])
                     and s[0]["verdict"]["state"] == "healthy", "node-k in a healthy cluster")
    other.signal(signal.SIGKILL)
    other.proc.wait(timeout=10)
    (st,) = await both_until(
        [a], lambda s: [m["id"] for m in s[0]["cluster"]["missing"]] == ["node-k"]
        and s[0]["verdict"]["state"] == "degraded", "node-k listed missing", timeout=15)
    assert any(r.startswith("node node-k missing heartbeats (last seen ")
               for r in st["verdict"]["reasons"])
    assert [n["id"] for n in st["cluster"]["nodes"]] == ["node-a"]


@pytest.mark.gen_test
async def test_memory_broker_single_node_is_healthy(start_node) -> None:
    node = await start_node()
    client = await SSEClient.open(node.url, "solo", nick="sam")
    try:
        assert (await node.post("solo", "hello")).code == 201
        (st,) = await both_until([node], lambda s: s[0]["rooms"]["listed"] == [
            {"room": "solo", "clients": 1, "per_minute": 1, "nodes": 1}], "the solo room")
        assert st["verdict"] == {"state": "healthy", "reasons": []}
        metrics = (await node.fetch("/metrics")).body.decode()
        assert 'rtchat_cluster_verdict{state="healthy"} 1.0' in metrics
        assert 'rtchat_cluster_verdict{state="down"} 0.0' in metrics
    finally:
        await client.aclose()


# --- the page, in a browser ------------------------------------------------------------------------

# Every endpoint URL (and failover from/to) cell's text: one line box each, at any width.
URLS_ON_ONE_LINE = """() => {
  const spans = [...document.querySelectorAll(
      '#endpoint-rows span.url, #failover-rows span.url, #cluster-rows span.url')];
  return spans.map(s => ({text: s.textContent, lines: s.getClientRects().length,
                          height: s.getBoundingClientRect().height,
                          line: parseFloat(getComputedStyle(s).lineHeight) ||
                                parseFloat(getComputedStyle(s).fontSize) * 1.6}));
}"""


async def assert_urls_whole(page, at: str) -> None:
    spans = await page.evaluate(URLS_ON_ONE_LINE)
    assert len(spans) >= 3, spans
    for s in spans:
        assert s["lines"] == 1 and s["height"] <= s["line"] * 1.5, (at, s)


def keep(tmp_path: Path, name: str) -> str:
    return str(tmp_path / name)


def publish_screenshots(tmp_path: Path) -> None:
    if SCREENSHOTS.is_dir() or os.access(SCREENSHOTS.parent, os.W_OK):
        SCREENSHOTS.mkdir(exist_ok=True)
        for png in tmp_path.glob("admin-ops-*.png"):
            shutil.copy(png, SCREENSHOTS / png.name)


@pytest.mark.browser
@pytest.mark.gen_test(timeout=120)
async def test_admin_page_healthy_and_degraded_at_desktop_and_phone_width(
        start_node, redis_trio, tmp_path) -> None:
    exe = require_tool("chromium")
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    b = await start_node(**redis_node_config(master, replicas, "node-b"))
    clients = [await SSEClient.open(a.url, "lobby", nick="ann"),
               await SSEClient.open(a.url, "ops", nick="olga"),
               await SSEClient.open(b.url, "lobby", nick="bob")]
    try:
        await both_until([a, b], same("healthy"), "a healthy cluster")
        async with chromium(exe) as browser:
            page = await browser.new_page(viewport=DESKTOP, bypass_csp=True)
            try:
                await page.goto(a.url + "/admin")
                await page.wait_for_function(
                    "document.getElementById('live').dataset.mode === 'live' && "
                    "document.getElementById('verdict').dataset.state === 'healthy' && "
                    "document.querySelectorAll('#endpoint-rows tr').length === 3 && "
                    "document.querySelectorAll('#room-rows tr').length === 2", timeout=15000)
                assert await page.locator("#verdict").text_content() == "cluster healthy"
                assert await page.locator("#verdict-reasons li").count() == 0
                lobby = page.locator("#room-rows tr[data-room=lobby] td")
                assert [await lobby.nth(i).text_content() for i in range(4)] == ["lobby", "2", "0", "2"]
                assert await page.locator("#spark-axis .tick").count() == 3
                await assert_urls_whole(page, "healthy desktop")
                await page.screenshot(path=keep(tmp_path, "admin-ops-healthy-1280.png"), full_page=True)
                await page.set_viewport_size(PHONE)
                await assert_urls_whole(page, "healthy phone")
                await page.screenshot(path=keep(tmp_path, "admin-ops-healthy-390.png"), full_page=True)

                # The client filter: by room, by nick, by address.
                await page.fill("#client-filter", "ops")
                await page.wait_for_function(
                    "document.querySelectorAll('#client-rows tr').length === 1", timeout=5000)
                assert await page.locator("#client-rows td[data-label=nick]").text_content() == "olga"
                await page.fill("#client-filter", "ann 127.0.0.1")
                await page.wait_for_function(
                    "document.querySelectorAll('#client-rows tr').length === 1 && "
                    "document.querySelector('#client-rows td[data-label=nick]').textContent === 'ann'",
                    timeout=5000)
                await page.fill("#client-filter", "")
                await page.set_viewport_size(DESKTOP)

                on = (await status_of(a))["redis"]["subscribed_endpoint"]
                victim = next(r for r in replicas if r.url == on)
                victim.kill()
                await page.wait_for_function(
                    "document.getElementById('verdict').dataset.state === 'degraded' && "
                    "document.querySelectorAll('#failover-rows tr').length >= 1 && "
                    "[...document.querySelectorAll('#endpoint-rows td[data-label=\"last error\"]')]"
                    ".some(td => td.textContent !== '\u2014')", timeout=15000)
                # Each node finds the dead replica on its own health round; the
                # reason drops its "(seen by ...)" once both have.
                reason = f"replica {host_port(victim.url)} unhealthy: unreachable"
                await page.wait_for_function(
                    "r => [...document.querySelectorAll('#verdict-reasons li')]"
                    ".some(li => li.textContent === r)", arg=reason, timeout=15000)
                when = await page.locator("#failover-rows td[data-label=when]").first.text_content()
                assert when is not None and len(when) == 19 and when[4] == "-" and when[13] == ":"
                row = page.locator("#endpoint-rows tr", has_text=host_port(victim.url))
                assert (await row.locator("td[data-label='down since']").text_content() or "")[:2] == "20"
                await assert_urls_whole(page, "degraded desktop")
                await page.screenshot(path=keep(tmp_path, "admin-ops-degraded-1280.png"), full_page=True)
                await page.set_viewport_size(PHONE)
                await assert_urls_whole(page, "degraded phone")
                await page.screenshot(path=keep(tmp_path, "admin-ops-degraded-390.png"), full_page=True)
            finally:
                await page.close()
    finally:
        for c in clients:
            await c.aclose()
    publish_screenshots(tmp_path)
    assert len(list(tmp_path.glob("admin-ops-*.png"))) == 4
