"""Redis Cluster mode against a real cluster: 3 masters + 3 replicas (``redis_cluster``).

Rooms are picked so that every shard holds one. Faults are real: SIGKILL of
the replica a node reads a shard from, SIGKILL of a shard's master (the
cluster promotes its replica), and a slot moved to another shard by hand
(``SETSLOT IMPORTING/MIGRATING``, ``MIGRATE``, ``SETSLOT NODE``) while
messages flow. Every wait is on a condition with a deadline; the only
sleeps pace the ~30 msg/s publishers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from broker_inbox import Inbox
from browser import DESKTOP, chromium
from probes import async_wait_for, require_tool
from redis.crc import key_slot
from redis_cluster_servers import RedisCluster
from redis_servers import PATIENT_ACKS, RedisServer
from sse_client import SSEClient

from rtchat import config
from rtchat.broker.base import BrokerUnavailable, Published
from rtchat.broker.redis import ClusterBroker

INTERVAL = 0.2
MAX_LAG = 1.0


def cluster_overrides(cluster: RedisCluster, node_id: str, **extra: Any) -> dict[str, Any]:
    return {"node.id": node_id, "broker.backend": "redis",
            "broker.redis.cluster.nodes": cluster.urls[:2],
            "broker.redis.health_interval_seconds": INTERVAL,
            "broker.redis.max_replica_lag_seconds": MAX_LAG,
            "limits.rate.burst": 100000, "limits.rate.messages_per_second": 100000, **extra}


def rooms_on_every_shard(cluster: RedisCluster) -> list[str]:
    """One room per shard (the room is its keys' hash tag, so its slot is the room's)."""
    shards = cluster.shards()
    rooms: dict[int, str] = {}
    for i in range(10000):
        room = f"room{i}"
        slot = key_slot(room.encode())
        for n, view in enumerate(shards):
            if n not in rooms and any(lo <= slot <= hi for lo, hi in view.slots):
                rooms[n] = room
        if len(rooms) == len(shards):
            return [rooms[n] for n in sorted(rooms)]
    raise AssertionError("no room found for some shard")


def shard_numsub(server: RedisServer, channel: str) -> int:
    if not server.running:
        return 0
    with server.client() as c:
        reply = c.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


async def until(predicate: Any, what: str, timeout: float = 15.0) -> Any:
    return await async_wait_for(predicate, timeout, what, interval=0.02)


@contextlib.asynccontextmanager
async def brokers(cluster: RedisCluster, n: int = 2
                  ) -> AsyncIterator[list[tuple[ClusterBroker, Inbox]]]:
    started: list[tuple[ClusterBroker, Inbox]] = []
    try:
        for i in range(n):
            node_id = f"node-{'ab'[i]}"
            cfg = config.load(None, {}, cluster_overrides(cluster, node_id))
            broker, inbox = ClusterBroker(cfg, node_id), Inbox()
            await broker.start(inbox, lambda: {"clients": 0})
            started.append((broker, inbox))
        yield started
    finally:
        for broker, _ in started:
            await broker.close()


class Load:
    """Publishes to one room at ``rate``/s through the brokers in turn; keeps every outcome."""

    def __init__(self, brokers: Sequence[ClusterBroker], room: str, rate: float = 10.0) -> None:
        self.brokers = brokers
        self.room = room
        self.rate = rate
        self.acked: list[Published] = []
        self.failed = 0
        self.failed_at: list[float] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            broker = self.brokers[i % len(self.brokers)]
            try:
                self.acked.append(await broker.publish(self.room, "load", f"m{i}"))
            except BrokerUnavailable:
                self.failed += 1
                self.failed_at.append(time.monotonic())
            i += 1
            await asyncio.sleep(1.0 / self.rate)

    async def wait_acked(self, n: int, timeout: float = 20.0) -> None:
        target = len(self.acked) + n
        await until(lambda: len(self.acked) >= target, f"{n} more sends to {self.room}", timeout)

    async def stop(self) -> list[Published]:
        self._stop.set()
        await self._task
        return self.acked


def assert_exact(inbox: Inbox, room: str, acked: list[Published]) -> None:
    got = inbox.ids(room)
    assert got == [p.message.id for p in acked], f"{room}: delivered != acknowledged"


async def until_exact(inbox: Inbox, room: str, acked: list[Published]) -> None:
    """Wait until ``inbox`` holds as many of ``room``'s messages as were acknowledged; then
    they must be exactly those."""
    await until(lambda: len(inbox.ids(room)) >= len(acked), f"every message of {room}")
    assert_exact(inbox, room, acked)


async def loads_on(started: list[tuple[ClusterBroker, Inbox]], rooms: list[str]) -> list[Load]:
    """Every broker subscribed to every room, and a Load (over the first two) sending to
    each room that has had 10 sends acknowledged."""
    for broker, _ in started:
        for room in rooms:
            await broker.subscribe(room)
    loads = [Load([started[0][0], started[1][0]], room) for room in rooms]  # 10 msg/s each
    for load in loads:
        await load.wait_acked(10)
    return loads


def assert_in_order(inbox: Inbox, room: str) -> list[str]:
    got = inbox.ids(room)
    keys = [tuple(map(int, i.split("-"))) for i in got]
    assert len(set(got)) == len(got), f"{room}: duplicates"
    assert keys == sorted(keys), f"{room}: out of order"
    return got


def reading(broker: ClusterBroker, room: str) -> str | None:
    """The server ``broker`` reads ``room``'s shard from."""
    slot = key_slot(room.encode())
    for shard in broker.status().shards:
        if any(lo <= slot <= hi for lo, hi in shard.slots):
            return shard.reading
    return None


@pytest.mark.gen_test(timeout=90)
async def test_two_nodes_rooms_on_every_shard(start_node, redis_cluster) -> None:
    cluster = redis_cluster
    rooms = rooms_on_every_shard(cluster)
    a = await start_node(**cluster_overrides(cluster, "node-a", **PATIENT_ACKS,
                                             **{"admin.password": "s3cret-pw"}))
    b = await start_node(**cluster_overrides(cluster, "node-b", **PATIENT_ACKS))
    clients = {(node.port, room): await SSEClient.open(node.url, room)
               for node in (a, b) for room in rooms}
    try:
        await until(lambda: a.hub.client_count == 3 and b.hub.client_count == 3,
                    "every client connected")
        posted: dict[str, list[str]] = {room: [] for room in rooms}
        for i in range(4):
            for room in rooms:
                for node in (a, b):
                    r = await node.post(room, f"{room} {i} via {node.cfg.node.id}")
                    assert r.code == 201, r.body
                    body = json.loads(r.body)
                    assert body["replicated"] is True
                    posted[room].append(body["id"])
        for (_, room), client in clients.items():
            got = [m["id"] for m in await client.messages(len(posted[room]))]
            assert got == posted[room]

        # Every key and channel of a room carries its hash tag.
        with cluster.client() as c:
            keys = set(c.scan_iter(match="rtchat:*", target_nodes=c.PRIMARIES))
        for room in rooms:
            assert f"rtchat:{{{room}}}:room" in keys
        assert all("{" in k for k in keys), keys

        # One sharded subscription per node per shard, on the shard's replica.
        for room in rooms:
            view = cluster.shard_of(room)
            channel = f"rtchat:{{{room}}}:ch"
            await until(lambda v=view, ch=channel: sum(shard_numsub(r, ch) for r in v.replicas)
                        == 2, f"both nodes' SSUBSCRIBE of {channel} on a replica")
            assert view.master is not None and shard_numsub(view.master, channel) == 0
            with view.master.client() as c:
                assert channel not in c.execute_command("PUBSUB", "SHARDCHANNELS")
        status = a.hub.broker.status().to_dict()
        assert len(status["shards"]) == 3
        replica_urls = {r.url for v in cluster.shards() for r in v.replicas}
        for shard in status["shards"]:
            assert shard["reading"] in replica_urls and shard["healthy"] is True
            assert shard["master"] and shard["slots"]
        assert (await a.fetch("/readyz")).code == 200
        auth = base64.b64encode(b"admin:s3cret-pw").decode()
        r = await a.fetch("/admin/api/status", headers={"Authorization": f"Basic {auth}"})
        assert r.code == 200, r.body
        shown = json.loads(r.body)["redis"]["shards"]
        assert [s["reading"] for s in shown] == [s["reading"] for s in status["shards"]]
        # The admin page draws one row a shard, with the server this node reads marked.
        async with chromium(require_tool("chromium")) as browser:
            context = await browser.new_context(
                viewport=DESKTOP, http_credentials={"username": "admin", "password": "s3cret-pw"})
            page = await context.new_page()
            try:
                await page.goto(a.url + "/admin")
                rows = page.locator("#shard-rows tr")
                await rows.nth(2).wait_for(timeout=10000)
                assert await rows.count() == 3
                assert await page.locator("#shards").is_visible()
                texts = [await rows.nth(i).text_content() or "" for i in range(3)]
                for shard in shown:
                    assert any(shard["reading"] in t for t in texts), (shard["reading"], texts)
            finally:
                await context.close()
    finally:
        for client in clients.values():
            await client.aclose()


@pytest.mark.gen_test(timeout=90)
async def test_killing_the_replica_a_node_reads_from_loses_nothing(redis_cluster) -> None:
    cluster = redis_cluster
    rooms = rooms_on_every_shard(cluster)
    async with brokers(cluster) as started:
        (a, _), (b, _) = started
        loads = await loads_on(started, rooms)  # 3 x 10 msg/s
        victim_url = reading(a, rooms[0])
        assert victim_url is not None
        (victim,) = [s for s in cluster.servers if s.url == victim_url]
        victim.kill()
        await until(lambda: reading(a, rooms[0]) not in (None, victim_url)
                    and reading(b, rooms[0]) not in (None, victim_url),
                    "both nodes reading the shard elsewhere")
        for load in loads:
            await load.wait_acked(15)
        acked = [await load.stop() for load in loads]
        assert all(load.failed == 0 for load in loads)
        for _, inbox in started:
            for room, sent in zip(rooms, acked, strict=True):
                await until_exact(inbox, room, sent)
        assert a.status().failover_count >= 1


@pytest.mark.gen_test(timeout=120)
async def test_killing_a_shard_master_stops_only_that_shard_until_promotion(redis_cluster) -> None:
    cluster = redis_cluster
    rooms = rooms_on_every_shard(cluster)
    async with brokers(cluster) as started:
        loads = await loads_on(started, rooms)
        view = cluster.shard_of(rooms[0])
        assert view.master is not None
        view.master.kill()
        await until(lambda: loads[0].failed > 0, "sends to the shard to fail (503)")
        # The cluster promotes the replica; sends resume.
        await loads[0].wait_acked(20, timeout=30)
        for load in loads[1:]:
            await load.wait_acked(5)
        acked = [await load.stop() for load in loads]
        assert [load.failed for load in loads[1:]] == [0, 0], "other shards were affected"
        for _, inbox in started:
            for room, sent in zip(rooms[1:], acked[1:], strict=True):
                await until_exact(inbox, room, sent)
            got = assert_in_order(inbox, rooms[0])
            replicated = [p.message.id for p in acked[0] if p.replicated]
            # Sent after the promotion: delivered; replicated before it: never lost.
            await until(lambda i=inbox, r=replicated: set(r) <= set(i.ids(rooms[0])),
                        "every replicated message of the failed-over shard delivered")
            assert got is not None
        with cluster.client() as c:
            stored = {e[0] for e in c.xrange(f"rtchat:{{{rooms[0]}}}:room", "-", "+")}
        assert {p.message.id for p in acked[0] if p.replicated} <= stored


def migrate_slot(cluster: RedisCluster, slot: int, src: RedisServer, dst: RedisServer,
                 pause: float = 0.5) -> None:
    """Move ``slot`` from ``src`` to ``dst`` by hand, the way ``redis-cli --cluster reshard``
    does; ``pause`` keeps the slot half-migrated a while (sends get ASK meanwhile)."""
    with src.client() as s, dst.client() as d:
        src_id = s.execute_command("CLUSTER", "MYID")
        dst_id = d.execute_command("CLUSTER", "MYID")
        d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        for _ in range(1000):
            keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
        time.sleep(pause)
        d.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    for view in cluster.shards():
        if view.master is not None and view.master not in (src, dst):
            with view.master.client() as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


@pytest.mark.gen_test(timeout=90)
async def test_a_slot_moved_under_load_loses_nothing(redis_cluster) -> None:
    cluster = redis_cluster
    rooms = rooms_on_every_shard(cluster)
    room = rooms[0]
    slot = key_slot(room.encode())
    async with brokers(cluster) as started:
        (a, _), (b, _) = started
        loads = await loads_on(started, rooms)
        src = cluster.shard_of(room)
        dst = cluster.shard_of(rooms[1])
        assert src.master is not None and dst.master is not None
        await asyncio.to_thread(migrate_slot, cluster, slot, src.master, dst.master)
        dst_replicas = {r.url for r in dst.replicas}
        await until(lambda: reading(a, room) in dst_replicas and reading(b, room) in dst_replicas,
                    "both nodes reading the room from its new shard's replica")
        for load in loads:
            await load.wait_acked(15)
        acked = [await load.stop() for load in loads]
        assert [load.failed for load in loads] == [0, 0, 0]
        # Sends met the half-moved slot (ASK) and the moved one (MOVED), and followed both.
        assert a.redirects["ask"] + b.redirects["ask"] >= 1, (a.redirects, b.redirects)
        for _, inbox in started:
            for r, sent in zip(rooms, acked, strict=True):
                await until_exact(inbox, r, sent)
