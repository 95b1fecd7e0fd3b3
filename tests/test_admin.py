"""The admin pages through a real node: who gets in, what the status says, the disconnect action.

Also the admin package's pure parts: Basic credentials, the loopback rule, the
login throttle, the topology layout and the sparkline.
"""

import base64
import json
import os

import pytest
from probes import async_wait_for
from sse_client import SSEClient

from rtchat.admin.access import LoginThrottle, basic_credentials, credentials_match, is_loopback
from rtchat.admin.pictures import sparkline, topology
from rtchat.broker.base import BrokerStatus, EndpointStatus

PASSWORD = {"admin.password": "s3cret-pw"}
XSS = "<script>alert(1)</script>"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def body(response) -> dict:
    return json.loads(response.body)


async def admin_status(node, headers=None) -> dict:
    r = await node.fetch("/admin/api/status", headers=headers)
    assert r.code == 200, r.body
    return body(r)


# --- who gets in ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_basic_auth_matrix(start_node) -> None:
    node = await start_node(**PASSWORD)
    for path, kind in (("/admin", "text/html"), ("/admin/api/status", "application/json")):
        missing = await node.fetch(path)
        assert missing.code == 401, path
        assert missing.headers["WWW-Authenticate"].startswith('Basic realm="rtchat admin"')
        assert missing.headers["Content-Type"].startswith(kind)
        for wrong in (basic("admin", "nope"), basic("root", "s3cret-pw"), basic("admin", ""),
                      {"Authorization": "Basic !!!notbase64"}, {"Authorization": "Bearer x"}):
            r = await node.fetch(path, headers=wrong)
            assert r.code == 401, (path, wrong)
            assert "WWW-Authenticate" in r.headers
        ok = await node.fetch(path, headers=basic("admin", "s3cret-pw"))
        assert ok.code == 200, path
        assert ok.headers["Content-Type"].startswith(kind)
        assert ok.headers["Cache-Control"] == "no-store"
    api = await node.fetch("/admin/api/status")
    assert body(api)["error"] == "unauthorized"
    # A password also guards loopback clients: the password is the rule when there is one.
    assert (await node.fetch("/admin/api/clients/x/disconnect", "POST", b"")).code == 401


@pytest.mark.gen_test
async def test_no_password_means_direct_loopback_only(start_node) -> None:
    node = await start_node(**{"http.xheaders": True})
    remote = {"X-Forwarded-For": "203.0.113.9"}
    for path in ("/admin", "/admin/api/status", "/admin/api/events"):
        r = await node.fetch(path, headers=remote)
        assert r.code == 403, path
    r = await node.fetch("/admin/api/status", headers=remote)
    assert body(r)["error"] == "admin_loopback_only"
    r = await node.fetch("/admin/api/clients/abc/disconnect", "POST", b"", headers=remote)
    assert r.code == 403
    # Credentials do not help when no password is configured.
    r = await node.fetch("/admin", headers={**remote, **basic("admin", "")})
    assert r.code == 403
    assert (await node.fetch("/admin")).code == 200  # loopback
    # A request through a proxy is refused even when the proxy forwards a loopback address:
    # a proxy on the same host makes every client look local.
    for header in ({"X-Forwarded-For": "::1"}, {"X-Real-IP": "127.0.0.1"},
                   {"Forwarded": "for=127.0.0.1"}):
        assert (await node.fetch("/admin", headers=header)).code == 403, header
    assert (await node.fetch("/admin/api/status")).code == 200


@pytest.mark.gen_test
async def test_disabled_admin_is_404(start_node) -> None:
    node = await start_node(**{"admin.enabled": False, **PASSWORD})
    page = await node.fetch("/admin", headers=basic("admin", "s3cret-pw"))
    assert page.code == 404 and b"<html" in page.body
    for path in ("/admin/api/status", "/admin/api/events"):
        r = await node.fetch(path, headers=basic("admin", "s3cret-pw"))
        assert r.code == 404 and body(r)["error"] == "not_found", path
    r = await node.fetch("/admin/api/clients/x/disconnect", "POST", b"")
    assert r.code == 404
    assert (await node.fetch("/healthz")).code == 200


@pytest.mark.gen_test
async def test_failed_logins_are_rate_limited_per_client(start_node) -> None:
    node = await start_node(**{"http.xheaders": True, **PASSWORD})
    attacker = {"X-Forwarded-For": "198.51.100.7"}
    codes = [(await node.fetch("/admin/api/status", headers={**attacker, **basic("admin", f"guess{i}")})).code
             for i in range(10)]
    assert codes == [401] * 10
    r = await node.fetch("/admin/api/status", headers={**attacker, **basic("admin", "guess10")})
    assert r.code == 429 and body(r)["error"] == "admin_login_rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    # Shut out means shut out: the right password from that client is refused too...
    r = await node.fetch("/admin", headers={**attacker, **basic("admin", "s3cret-pw")})
    assert r.code == 429 and int(r.headers["Retry-After"]) >= 1
    # ...while another client is not affected.
    other = {"X-Forwarded-For": "198.51.100.8"}
    assert (await node.fetch("/admin", headers={**other, **basic("admin", "s3cret-pw")})).code == 200
    # Asking without credentials (the browser's first request) is not a failed login.
    for _ in range(15):
        assert (await node.fetch("/admin/api/status", headers=other)).code == 401


def test_basic_credentials_parsing_and_comparison() -> None:
    token = base64.b64encode("admin:pa:ss wörd".encode()).decode()
    assert basic_credentials(f"Basic {token}") == ("admin", "pa:ss wörd")
    assert basic_credentials(f"basic  {token} ") == ("admin", "pa:ss wörd")
    for bad in (None, "", "Basic", "Basic ", "Bearer abc", "Basic %%%",
                "Basic " + base64.b64encode(b"no-colon").decode(),
                "Basic " + base64.b64encode(b"\xff\xfe:x").decode()):
        assert basic_credentials(bad) is None, bad
    assert credentials_match(("admin", "pw"), "admin", "pw")
    assert not credentials_match(("admin", "pw "), "admin", "pw")
    assert not credentials_match(("Admin", "pw"), "admin", "pw")
    assert credentials_match(("admin", "wörd"), "admin", "wörd")


def test_loopback_rule() -> None:
    for addr in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(addr), addr
    for addr in ("203.0.113.9", "10.0.0.1", "::ffff:10.0.0.1", "0.0.0.0", "", "localhost", "fe80::1%eth0"):
        assert not is_loopback(addr), addr


def test_login_throttle_shuts_out_then_lets_back_in() -> None:
    now = [1000.0]
    throttle = LoginThrottle(per_minute=3, clock=lambda: now[0])
    assert [throttle.failed("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert throttle.wait("a") == 0.0
    shut = throttle.failed("a")
    assert shut == pytest.approx(20.0)  # one attempt per 20 s at 3 a minute
    assert throttle.wait("a") == pytest.approx(20.0)
    assert throttle.wait("b") == 0.0
    now[0] += 20.5
    assert throttle.wait("a") == 0.0
    assert throttle.failed("a") == 0.0  # one attempt was due again


# --- what the status says -------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_status_on_the_memory_broker_lists_this_node_and_its_clients(start_node) -> None:
    node = await start_node(**{"node.id": "alpha"})
    a = await SSEClient.open(node.url, "room-a", nick="ann", headers={"User-Agent": "agent-ann/1.0"})
    b = await SSEClient.open(node.url, "room-b", nick="bob")
    try:
        st = await admin_status(node)
        assert set(st) >= {"node", "cluster", "clients", "redis", "ready", "topology"}
        n = st["node"]
        assert (n["id"], n["version"], n["pid"], n["clients"], n["broker"]) == (
            "alpha", "0.1.0", os.getpid(), 2, "memory")
        assert 0 <= n["uptime_seconds"] < 60
        assert [x["id"] for x in st["cluster"]["nodes"]] == ["alpha"]
        (me,) = st["cluster"]["nodes"]
        assert me["self"] and me["clients"] == 2 and me["endpoint"] == "embedded"
        assert me["seen_seconds_ago"] is not None and me["seen_seconds_ago"] < 5
        listed = {c["nick"]: c for c in st["clients"]["listed"]}
        assert st["clients"]["count"] == 2 and set(listed) == {"ann", "bob"}
        assert listed["ann"]["room"] == "room-a" and listed["bob"]["room"] == "room-b"
        assert listed["ann"]["user_agent"] == "agent-ann/1.0"
        assert listed["ann"]["remote"] == "127.0.0.1"
        assert {"id", "connected_at", "last_event_id", "queue"} <= set(listed["ann"])
        redis = st["redis"]
        assert redis["embedded"] is True and "embedded broker" in redis["note"]
        assert redis["backend"] == "memory" and redis["endpoints"] == [] and redis["failovers"] == []
        assert st["ready"] == {"ready": True, "reasons": []}
        kinds = [box["kind"] for box in st["topology"]["boxes"]]
        assert kinds == ["node", "embedded"] and len(st["topology"]["links"]) == 1

    finally:
        await a.aclose()
        await b.aclose()


async def next_status(events: SSEClient, timeout: float = 10.0) -> dict:
    while True:
        ev = await events.next_event(timeout)
        assert ev is not None, "the admin event stream ended"
        if ev.event == "status":
            return ev.json()


async def status_until(events: SSEClient, check, what: str, timeout: float = 10.0) -> dict:
    """Read status snapshots until ``check(snapshot)`` holds (one arrives every second)."""
    seen = []
    for _ in range(int(timeout) + 2):
        st = await next_status(events, timeout)
        if check(st):
            return st
        seen.append(st)
    raise AssertionError(f"no status snapshot with {what} in {len(seen)} snapshots")


@pytest.mark.gen_test(timeout=30)
async def test_event_stream_sends_a_snapshot_every_second_with_live_rates(start_node) -> None:
    node = await start_node(**{"limits.rate.burst": 100})
    events = await SSEClient.open(node.url, "", path="/admin/api/events")
    listener = None
    try:
        assert events.status == 200
        assert events.headers["content-type"] == "text/event-stream; charset=utf-8"
        first = await next_status(events)
        assert first["node"]["id"] == "test-node" and first["node"]["clients"] == 0
        second = await next_status(events)
        assert 0.5 < second["generated_at"] - first["generated_at"] < 2.5
        listener = await SSEClient.open(node.url, "rates", nick="lis")
        st = await status_until(events, lambda s: s["node"]["clients"] == 1, "one client")
        assert st["clients"]["listed"][0]["nick"] == "lis"
        for i in range(20):
            assert (await node.post("rates", f"m{i}")).code == 201
        await listener.messages(20)
        st = await status_until(events, lambda s: s["node"]["in_per_second"] > 0, "a send rate")
        assert st["node"]["out_per_second"] > 0
        assert st["node"]["messages_in"] == 20 and st["node"]["messages_out"] == 20
        assert sum(st["node"]["series"]["in"]) > 0
        assert st["node"]["sparkline"]["in"].count(",") == len(st["node"]["series"]["in"])
    finally:
        await events.aclose()
        if listener is not None:
            await listener.aclose()
    assert (await node.fetch("/healthz")).code == 200


# --- the disconnect action --------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_disconnect_closes_exactly_that_stream_and_it_resumes_losing_nothing(start_node) -> None:
    node = await start_node(**{"limits.rate.burst": 100})
    kicked = await SSEClient.open(node.url, "kick", nick="kicked")
    stays = await SSEClient.open(node.url, "kick", nick="stays")
    back = None
    try:
        first = body(await node.post("kick", "before"))["id"]
        assert [m["id"] for m in await kicked.messages(1)] == [first]
        assert [m["id"] for m in await stays.messages(1)] == [first]
        ids = {c["nick"]: c["id"] for c in (await admin_status(node))["clients"]["listed"]}

        unknown = await node.fetch("/admin/api/clients/nope/disconnect", "POST", b"")
        assert unknown.code == 404 and body(unknown)["error"] == "unknown_client"
        cross = await node.fetch(f"/admin/api/clients/{ids['kicked']}/disconnect", "POST", b"",
                                 headers={"Origin": "https://evil.example"})
        assert cross.code == 403 and body(cross)["error"] == "forbidden_origin"
        assert node.hub.client_count == 2  # the refused request closed nothing

        r = await node.fetch(f"/admin/api/clients/{ids['kicked']}/disconnect", "POST", b"",
                             headers={"Origin": node.url})
        assert r.code == 200 and body(r) == {"disconnected": ids["kicked"]}
        leftover = await kicked.until_closed()
        assert [e for e in leftover if e.event == "message"] == []
        await async_wait_for(lambda: node.hub.client_count == 1, what="one stream left")
        assert [c["nick"] for c in (await admin_status(node))["clients"]["listed"]] == ["stays"]

        missed = [body(await node.post("kick", f"while away {i}"))["id"] for i in range(3)]
        assert [m["id"] for m in await stays.messages(3)] == missed  # the other never noticed

        back = await SSEClient.open(node.url, "kick", nick="kicked", last_event_id=kicked.last_event_id)
        assert kicked.last_event_id == first
        assert [m["id"] for m in await back.messages(3)] == missed
        after = body(await node.post("kick", "after"))["id"]
        assert [m["id"] for m in await back.messages(1)] == [after]  # no duplicates, no gap
        assert [m["id"] for m in await stays.messages(1)] == [after]
        gone_again = await node.fetch(f"/admin/api/clients/{ids['kicked']}/disconnect", "POST", b"")
        assert gone_again.code == 404  # the old id is gone; the reconnect is a new client
    finally:
        for c in (kicked, stays, back):
            if c is not None:
                await c.aclose()


# --- user-controlled text is text ---------------------------------------------------------------


@pytest.mark.gen_test
async def test_markup_in_nick_and_user_agent_is_escaped_in_the_page(start_node) -> None:
    node = await start_node()
    ua = '<img src=x onerror="alert(2)">'
    client = await SSEClient.open(node.url, "lobby", nick=XSS, headers={"User-Agent": ua})
    try:
        r = await node.fetch("/admin")
        assert r.code == 200
        html = r.body.decode()
        assert XSS not in html and ua not in html
        # One render path: the server sends the shell and the snapshot as JSON, no tables.
        assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in html  # the embedded JSON
        assert "\\u003cimg src=x onerror=\\\"alert(2)\\\"\\u003e" in html
        assert html.count("<script") == 2  # the page's own two: the JSON and the code
        assert '<script src="/static/admin.js"' in html
        assert "<td" not in html  # every cell is drawn by the script, from the JSON
        script = await node.fetch("/static/admin.js")
        assert script.code == 200
        assert script.headers["Content-Type"].startswith("text/javascript")
        assert script.headers["X-Content-Type-Options"] == "nosniff"
        code = script.body.decode()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in code and sink not in html, sink
        assert "textContent" in code
    finally:
        await client.aclose()


# --- the pictures ---------------------------------------------------------------------------------


def endpoint(url: str, configured: str, **kw) -> EndpointStatus:
    ep = {"url": url, "configured_role": configured, "reachable": True, "role": configured,
          "master_link_status": "up" if configured == "replica" else None, "lag_bytes": 0,
          "lag_seconds": 0.0, "ping_ms": 0.2, "probe_ms": 1.0, "last_error": None,
          "healthy": True, "subscribed": False}
    ep.update(kw)
    return EndpointStatus(**ep)


def redis_status(*endpoints: EndpointStatus) -> BrokerStatus:
    return BrokerStatus(backend="redis", master=None, subscribed_endpoint=None,
                        endpoints=endpoints)


def test_topology_links_nodes_to_their_endpoint_and_replicas_to_the_master() -> None:
    master = endpoint("redis://127.0.0.1:7000/0", "master")
    r1 = endpoint("redis://127.0.0.1:7001/0", "replica", subscribed=True)
    r2 = endpoint("redis://127.0.0.1:7002/0", "replica", reachable=False, healthy=False,
                  master_link_status=None, last_error="Connection refused")
    r3 = endpoint("redis://127.0.0.1:7003/0", "replica", master_link_status="down", healthy=False)
    nodes = [{"id": "n1", "clients": 1, "endpoint": r1.url},
             {"id": "n2", "clients": 0, "endpoint": r2.url},
             {"id": "n3", "clients": 4, "endpoint": master.url},
             {"id": "n4", "clients": 2, "endpoint": None}]
    t = topology(nodes, redis_status(master, r1, r2, r3), "n1")
    boxes = {b["id"]: b for b in t["boxes"]}
    assert [b["kind"] for b in t["boxes"]] == ["node"] * 4 + ["replica"] * 3 + ["master"]
    assert boxes["node:n1"]["self"] and boxes["node:n1"]["detail"] == "1 client · this node"
    assert boxes["ep:redis://127.0.0.1:7001/0"]["label"] == "127.0.0.1:7001"
    assert "★" in boxes["ep:redis://127.0.0.1:7001/0"]["detail"]
    assert boxes["ep:redis://127.0.0.1:7002/0"]["state"] == "bad"
    assert boxes["ep:redis://127.0.0.1:7002/0"]["detail"] == "unreachable"
    assert boxes["node:n4"]["state"] == "bad"  # reads from nothing
    # Columns left to right: nodes, replicas, master; every box inside the canvas.
    xs = sorted({b["x"] for b in t["boxes"]})
    assert len(xs) == 3 and boxes["ep:redis://127.0.0.1:7000/0"]["x"] == xs[2]
    for b in t["boxes"]:
        assert b["x"] >= 0 and b["x"] + b["w"] <= t["width"]
        assert b["y"] >= 0 and b["y"] + b["h"] <= t["height"]

    def link(kind: str, a: dict, z: dict) -> dict:
        (found,) = [lk for lk in t["links"] if lk["kind"] == kind
                    and lk["y1"] == a["y"] + a["h"] / 2 and lk["y2"] == z["y"] + z["h"] / 2
                    and lk["x1"] == a["x"] + a["w"] and lk["x2"] == z["x"]]
        return found

    b = boxes
    assert link("subscribe", b["node:n1"], b["ep:redis://127.0.0.1:7001/0"])["state"] == "ok"
    assert link("subscribe", b["node:n2"], b["ep:redis://127.0.0.1:7002/0"])["state"] == "bad"
    assert link("subscribe", b["node:n3"], b["ep:redis://127.0.0.1:7000/0"])["state"] == "ok"
    m = b["ep:redis://127.0.0.1:7000/0"]
    assert link("replication", b["ep:redis://127.0.0.1:7001/0"], m)["state"] == "ok"
    assert link("replication", b["ep:redis://127.0.0.1:7002/0"], m)["state"] == "bad"
    assert link("replication", b["ep:redis://127.0.0.1:7003/0"], m)["state"] == "bad"  # link down
    assert len(t["links"]) == 3 + 3  # n4 has none
    assert all(lk["d"].startswith("M") for lk in t["links"])


def test_topology_of_an_unchecked_replica_and_of_a_dead_master() -> None:
    master = endpoint("redis://h:1/0", "master")
    fresh = endpoint("redis://h:2/0", "replica", reachable=None, healthy=False, role=None)
    nodes = [{"id": "n", "clients": 0, "endpoint": "redis://h:2/0"}]
    t = topology(nodes, redis_status(master, fresh), "n")
    assert {lk["kind"]: lk["state"] for lk in t["links"]} == {"subscribe": "warn", "replication": "warn"}
    dead = endpoint("redis://h:1/0", "master", reachable=False, healthy=False, role=None)
    t = topology(nodes, redis_status(dead, fresh), "n")
    assert {lk["kind"]: lk["state"] for lk in t["links"]} == {"subscribe": "warn", "replication": "bad"}
    assert [b["state"] for b in t["boxes"] if b["kind"] == "master"] == ["bad"]


def test_sparkline_shares_one_scale_and_grows_from_the_right() -> None:
    s = sparkline([0.0, 5.0, 10.0], [20.0, 0.0, 0.0], slots=5)
    assert s["peak"] == 20.0
    ins = [tuple(map(float, p.split(","))) for p in s["in"].split()]
    outs = [tuple(map(float, p.split(","))) for p in s["out"].split()]
    assert [x for x, _ in ins] == [120.0, 180.0, 240.0]  # 5 slots over 240 px, newest at the right
    assert outs[0][1] == 2.0 and ins[0][1] == s["height"] - 2  # the peak at the top, 0 at the bottom
    assert ins[2][1] == pytest.approx((2.0 + s["height"] - 2) / 2)  # 10 is half of the peak
    empty = sparkline([], [], slots=60)
    assert empty["in"] == "" and empty["peak"] == 1.0
