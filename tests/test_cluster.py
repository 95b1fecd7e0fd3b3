"""Two rtchat nodes on one Redis master and two replicas, through HTTP and SSE.

Real redis-server processes; the nodes run in the test's loop. Chaos here is
real too: SIGKILL of a replica, CLIENT KILL of the subscriber, a master down.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from probes import async_wait_for
from redis_servers import PATIENT_ACKS, redis_node_config
from sse_client import SSEClient


def pubsub_count(server) -> int:
    if not server.running:
        return 0
    with server.client() as c:
        return sum(1 for cl in c.client_list() if int(cl.get("sub", 0)) + int(cl.get("psub", 0)) > 0)


def endpoint_of(node, servers) -> Any:
    url = node.hub.broker.status().subscribed_endpoint
    return next((s for s in servers if s.url == url), None)


class Publisher:
    """Posts to several nodes in turn at ``rate`` messages/s; remembers what was acknowledged."""

    def __init__(self, nodes, room: str, rate: float) -> None:
        self.nodes = nodes
        self.room = room
        self.interval = 1.0 / rate
        self.acked: list[str] = []
        self.refused = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            node = self.nodes[i % len(self.nodes)]
            r = await node.post(self.room, f"m{i}")
            if r.code == 201:
                self.acked.append(json.loads(r.body)["id"])
            else:
                assert r.code == 503, r.body
                self.refused += 1
            i += 1
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def read_ids(client: SSEClient, into: list[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        ev = await client.next_event(timeout=30)
        assert ev is not None, "stream ended"
        if ev.event == "message":
            into.append(ev.id)
        assert ev.event != "reset", "no reset expected: nothing was lost"


async def assert_exactly_once_in_order(readers: list[list[str]], acked: list[str]) -> None:
    await async_wait_for(lambda: all(set(acked) <= set(r) for r in readers), timeout=20,
                         what="every acknowledged message at every client")
    for received in readers:
        assert len(received) == len(set(received)), "duplicates"
        keys = [tuple(map(int, i.split("-"))) for i in received]
        assert keys == sorted(keys), "out of order"
        assert received[: len(acked)] == acked or set(acked) <= set(received)


@pytest.mark.gen_test(timeout=60)
async def test_a_client_on_one_node_receives_what_is_posted_to_the_other(start_node, redis_trio) -> None:
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    b = await start_node(**redis_node_config(master, replicas, "node-b", **PATIENT_ACKS))
    client = await SSEClient.open(a.url, "x")
    try:
        await async_wait_for(lambda: a.hub.client_count == 1)
        r = await b.post("x", "from b")
        assert r.code == 201 and json.loads(r.body)["replicated"] is True
        (msg,) = await client.messages(1)
        assert msg["text"] == "from b" and msg["node"] == "node-b"
        # Each node's one subscriber connection is on a replica, none on the master.
        await async_wait_for(lambda: sum(pubsub_count(r) for r in replicas) == 2,
                             what="two subscriber connections on the replicas")
        assert pubsub_count(master) == 0
        for node in (a, b):
            assert endpoint_of(node, replicas) is not None
        ready = json.loads((await a.fetch("/readyz")).body)
        assert ready["status"] == "ready"
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=90)
@pytest.mark.parametrize("chaos", ["sigkill", "client_kill", "pause"])
async def test_subscription_failure_loses_nothing(start_node, redis_trio, chaos) -> None:
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    b = await start_node(**redis_node_config(master, replicas, "node-b"))
    clients = [await SSEClient.open(n.url, "chaos") for n in (a, a, b, b)]
    readers: list[list[str]] = [[] for _ in clients]
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(read_ids(c, r, stop)) for c, r in zip(clients, readers, strict=True)]
    publisher = Publisher([a, b], "chaos", rate=50)
    try:
        await async_wait_for(lambda: a.hub.client_count == 2 and b.hub.client_count == 2)
        publisher.start()
        await async_wait_for(lambda: len(publisher.acked) >= 25, what="traffic")
        victim = endpoint_of(a, replicas)
        assert victim is not None
        if chaos == "sigkill":
            victim.kill()
        elif chaos == "client_kill":
            with victim.client() as c:
                c.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        else:
            with victim.client() as c:  # the replica goes silent: connections open, nothing moves
                c.execute_command("CLIENT", "PAUSE", "4000", "ALL")
        await async_wait_for(
            lambda: a.hub.broker.status().failover_count >= 1, timeout=15,
            what="node A to switch its subscription")
        count = len(publisher.acked)
        await async_wait_for(lambda: len(publisher.acked) >= count + 50, timeout=20,
                             what="traffic after the switch")
        await publisher.stop()
        await assert_exactly_once_in_order(readers, publisher.acked)
        status = a.hub.broker.status()
        entry = status.failovers[-1]
        assert entry.from_ == victim.url
        assert entry.to != victim.url and entry.reason
        assert isinstance(entry.recovered, int) and entry.recovered >= 0
        if chaos == "sigkill":
            assert status.subscribed_endpoint != victim.url
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_resume_on_another_node_and_reset_after_history_is_lost(start_node, redis_trio) -> None:
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    b = await start_node(**redis_node_config(master, replicas, "node-b"))
    client = await SSEClient.open(a.url, "move")
    await async_wait_for(lambda: a.hub.client_count == 1)
    for i in range(3):
        await a.post("move", f"seen {i}")
    seen = await client.messages(3)
    await client.aclose()
    for i in range(10):
        await random.choice([a, b]).post("move", f"missed {i}")
    back = await SSEClient.open(b.url, "move", last_event_id=seen[-1]["id"])
    try:
        assert [m["text"] for m in await back.messages(10)] == [f"missed {i}" for i in range(10)]
        last = back.last_event_id
    finally:
        await back.aclose()
    with master.client() as c:
        c.flushall()
    lost = await SSEClient.open(a.url, "move", last_event_id=last)
    try:
        ev = await lost.next_event()
        while ev.event == "presence":
            ev = await lost.next_event()
        assert ev.event == "reset"
        assert ev.json()["reason"] == "history_truncated"
    finally:
        await lost.aclose()


@pytest.mark.gen_test(timeout=90)
async def test_master_down_refuses_sends_then_recovers_without_restart(start_node, redis_trio) -> None:
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    client = await SSEClient.open(a.url, "m")
    try:
        await async_wait_for(lambda: a.hub.client_count == 1)
        first = json.loads((await a.post("m", "before")).body)["id"]
        master.stop()
        r = await a.post("m", "while down")
        assert r.code == 503
        assert json.loads(r.body)["error"] == "broker_unavailable"
        assert int(r.headers["Retry-After"]) >= 1
        await async_wait_for(lambda: a.hub.broker.readiness(), what="readiness to fail")
        ready = await a.fetch("/readyz")
        assert ready.code == 503 and json.loads(ready.body)["reasons"]
        master.start()
        for replica in replicas:
            replica.wait_synced(20)

        async def sends_again() -> bool:
            return (await a.post("m", "after")).code == 201

        deadline = asyncio.get_running_loop().time() + 20
        while not await sends_again():
            assert asyncio.get_running_loop().time() < deadline, "sends never recovered"
            await asyncio.sleep(0.1)
        await async_wait_for(lambda: not a.hub.broker.readiness(), timeout=20, what="ready again")
        assert (await a.fetch("/readyz")).code == 200
        texts = [m["text"] for m in await client.messages(2, timeout=20)]
        assert texts[0] == "before" and texts[-1] == "after"
        assert first
    finally:
        await client.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_presence_spans_both_nodes(start_node, redis_trio) -> None:
    master, replicas = redis_trio
    a = await start_node(**redis_node_config(master, replicas, "node-a"))
    b = await start_node(**redis_node_config(master, replicas, "node-b"))
    ca = await SSEClient.open(a.url, "pr", nick="ann")
    cb = await SSEClient.open(b.url, "pr", nick="bob")
    try:
        async def both_seen() -> bool:
            p = json.loads((await a.fetch("/rooms/pr/presence")).body)
            return p["count"] == 2 and p["nicks"] == ["ann", "bob"]

        deadline = asyncio.get_running_loop().time() + 10
        while not await both_seen():
            assert asyncio.get_running_loop().time() < deadline, "presence never spanned nodes"
            await asyncio.sleep(0.05)
    finally:
        await ca.aclose()
        await cb.aclose()
