"""The admin view of a real cluster: two nodes on a Redis master and two replicas.

Real redis-server processes (``start_redis`` from the redis_servers plugin);
the nodes run in the test's loop. The chaos is a SIGKILL of the replica a
node subscribes on; the page must show it red within seconds.
"""

from __future__ import annotations

import json

import pytest
from browser import DESKTOP, PHONE, chromium
from probes import async_poll, require_tool
from redis_servers import redis_node_config
from sse_client import SSEClient


async def status_of(node) -> dict:
    r = await node.fetch("/admin/api/status")
    assert r.code == 200, r.body
    return json.loads(r.body)


async def status_until(node, check, what: str, timeout: float = 10.0) -> dict:
    """Ask for the status until ``check(status)`` holds; fail naming ``what`` on timeout."""
    return await async_poll(
        lambda: status_of(node), check, timeout, what,
        describe=lambda st: f"\n{json.dumps(st['redis'], indent=1)}\n{st['cluster']}")


def node_ids(st: dict) -> list[str]:
    return sorted(n["id"] for n in st["cluster"]["nodes"])


def endpoints(st: dict) -> dict[str, dict]:
    return {ep["url"]: ep for ep in st["redis"]["endpoints"]}


def all_healthy(st: dict) -> bool:
    return len(st["redis"]["endpoints"]) == 3 and all(ep["healthy"] for ep in st["redis"]["endpoints"])


@pytest.mark.gen_test(timeout=60)
async def test_status_shows_both_nodes_every_endpoint_and_a_dead_replica(start_node, redis_trio) -> None:
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    b = await start_node(**redis_node_config(master, replicas, "node-b"))
    on_a = await SSEClient.open(a.url, "ops", nick="ann")
    on_b = await SSEClient.open(b.url, "ops", nick="bob")
    try:
        def settled(s: dict) -> bool:
            # Heartbeats carry each node's client count, so wait for bob to be in b's.
            return (node_ids(s) == ["node-a", "node-b"] and all_healthy(s)
                    and s["redis"]["subscribed_endpoint"] is not None
                    and all(n["clients"] == 1 for n in s["cluster"]["nodes"]))

        st = await status_until(a, settled, "both nodes, one client each, three healthy endpoints")
        assert st["node"]["id"] == "node-a" and st["node"]["broker"] == "redis"
        assert st["redis"]["embedded"] is False and "note" not in st["redis"]
        assert st["ready"] == {"ready": True, "reasons": []}
        # This node's clients only; the other node's show up as its count.
        assert [c["nick"] for c in st["clients"]["listed"]] == ["ann"]
        by_id = {n["id"]: n for n in st["cluster"]["nodes"]}
        assert by_id["node-a"]["self"] and not by_id["node-b"]["self"]
        assert by_id["node-b"]["clients"] == 1
        for n in by_id.values():
            assert n["endpoint"] in {r.url for r in replicas}  # both read from a replica
            assert n["seen_seconds_ago"] is not None and n["seen_seconds_ago"] < 5

        eps = endpoints(st)
        assert set(eps) == {master.url, *(r.url for r in replicas)}
        assert (eps[master.url]["configured_role"], eps[master.url]["role"]) == ("master", "master")
        for r in replicas:
            ep = eps[r.url]
            assert (ep["configured_role"], ep["role"], ep["master_link_status"]) == (
                "replica", "replica", "up")
            assert ep["reachable"] is True and ep["lag_bytes"] is not None
            assert ep["ping_ms"] is not None and ep["last_error"] is None
        subscribed = [url for url, ep in eps.items() if ep["subscribed"]]
        assert subscribed == [st["redis"]["subscribed_endpoint"]] == [by_id["node-a"]["endpoint"]]
        assert st["redis"]["failovers"] == []
        t = st["topology"]
        assert sorted(box["kind"] for box in t["boxes"]) == ["master", "node", "node", "replica", "replica"]
        assert {lk["state"] for lk in t["links"]} == {"ok"} and len(t["links"]) == 4

        # SIGKILL the replica node-a reads from: its row goes unreachable, a failover is recorded.
        victim = next(r for r in replicas if r.url == subscribed[0])
        survivor = next(r for r in replicas if r is not victim)
        victim.kill()
        st = await status_until(
            a, lambda s: endpoints(s)[victim.url]["reachable"] is False and s["redis"]["failovers"],
            "the killed replica shown unreachable and a failover recorded", timeout=8)
        dead = endpoints(st)[victim.url]
        assert dead["healthy"] is False and dead["subscribed"] is False and dead["last_error"]
        (failover,) = st["redis"]["failovers"]
        assert failover["from"] == victim.url and failover["to"] in {survivor.url, master.url}
        assert failover["reason"] and failover["recovered"] >= 0
        assert st["redis"]["failover_count"] == 1
        red = [lk for lk in st["topology"]["links"] if lk["state"] == "bad"]
        assert {lk["kind"] for lk in red} == {"replication"}  # its link to the master is red
        assert next(b for b in st["topology"]["boxes"] if b["id"] == f"ep:{victim.url}")["state"] == "bad"

        # And the clients noticed nothing: a message still reaches both nodes.
        r = await a.post("ops", "after the failover")
        assert r.code == 201
        assert [m["text"] for m in await on_a.messages(1)] == ["after the failover"]
        assert [m["text"] for m in await on_b.messages(1)] == ["after the failover"]
    finally:
        await on_a.aclose()
        await on_b.aclose()


@pytest.mark.browser
@pytest.mark.gen_test(timeout=90)
async def test_admin_page_draws_the_cluster_and_marks_the_dead_replica_red(
        start_node, redis_trio, tmp_path) -> None:
    exe = require_tool("chromium")
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    await start_node(**redis_node_config(master, replicas, "node-b"))
    client = await SSEClient.open(a.url, "ops", nick="ann")
    try:
        st = await status_until(a, lambda s: node_ids(s) == ["node-a", "node-b"] and all_healthy(s)
                                and s["redis"]["subscribed_endpoint"], "a healthy cluster")
        async with chromium(exe) as browser:
            page = await browser.new_page(viewport=DESKTOP, bypass_csp=True)
            try:
                await page.goto(a.url + "/admin")
                await page.wait_for_function(
                    "document.getElementById('live').dataset.mode === 'live' && "
                    "document.querySelectorAll('#topology g.box').length === 5 && "
                    "document.querySelectorAll('#topology path.ok').length === 4", timeout=10000)
                assert await page.locator("#endpoint-rows tr").count() == 3
                assert await page.locator("#redis-embedded").is_hidden()
                await page.screenshot(path=str(tmp_path / "admin-cluster-healthy.png"), full_page=True)

                victim = next(r for r in replicas if r.url == st["redis"]["subscribed_endpoint"])
                victim.kill()
                await page.wait_for_function(
                    "document.querySelectorAll('#topology path.bad').length >= 1 && "
                    "[...document.querySelectorAll('#failover-rows td[data-label=node]')]"
                    ".some(td => td.textContent === 'node-a')", timeout=10000)
                row = page.locator("#endpoint-rows tr", has_text=victim.url.removeprefix("redis://"))
                assert await row.locator("td[data-label=reachable]").text_content() == "no"
                await page.screenshot(path=str(tmp_path / "admin-cluster-replica-down.png"),
                                      full_page=True)
                await page.set_viewport_size(PHONE)
                await page.screenshot(path=str(tmp_path / "admin-cluster-phone.png"), full_page=True)
            finally:
                await page.close()
    finally:
        await client.aclose()
