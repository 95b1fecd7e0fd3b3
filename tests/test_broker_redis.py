"""RedisBroker against real servers: a master, two replicas, Sentinels.

Faults are real: SIGKILL, ``CLIENT KILL TYPE pubsub``, ``CLIENT PAUSE``,
``FLUSHALL``, ``SENTINEL FAILOVER``, a node process killed mid-heartbeat.
Every wait is on a condition with a deadline; the only sleeps pace the
~50 msg/s publishers or poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from broker_inbox import Inbox
from probes import async_wait_for, require_tool
from redis_servers import PATIENT_ACKS, SERVICE, RedisServer

from rtchat import config
from rtchat.broker.base import BrokerUnavailable, EndpointStatus, Presence, Published
from rtchat.broker.redis import RedisBroker
from rtchat.messages import Message

INTERVAL = 0.2  # health_interval_seconds in these tests
MAX_LAG = 1.0  # max_replica_lag_seconds: also the probe timeout
PREFIX = "t:"
REPO = Path(__file__).resolve().parent.parent


def redis_config(master: RedisServer | None, replicas: Sequence[RedisServer] = (),
                 **extra: Any) -> config.Config:
    overrides: dict[str, Any] = {
        "node.id": "node-a", "broker.backend": "redis",
        "broker.redis.replicas": [r.url for r in replicas],
        "broker.redis.health_interval_seconds": INTERVAL,
        "broker.redis.max_replica_lag_seconds": MAX_LAG,
        "broker.redis.key_prefix": PREFIX,
    }
    if master is not None:
        overrides["broker.redis.master"] = master.url
    overrides.update(extra)
    return config.load(None, {}, overrides)


@contextlib.asynccontextmanager
async def running(cfg: config.Config, node_id: str = "node-a",
                  deliver: Callable[[Message], None] | None = None
                  ) -> AsyncIterator[tuple[RedisBroker, Inbox]]:
    """A started broker; it delivers into the Inbox unless ``deliver`` is given."""
    broker = RedisBroker(cfg, node_id)
    inbox = Inbox()
    await broker.start(deliver or inbox, lambda: {"clients": 0, "address": "127.0.0.1:0"})
    try:
        yield broker, inbox
    finally:
        await broker.close()


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    return await async_wait_for(predicate, timeout, what, interval=0.01)


class Publisher:
    """Publishes to one room at ``rate`` per second until stopped; keeps every outcome."""

    def __init__(self, broker: RedisBroker, room: str, rate: float = 50.0) -> None:
        self.broker = broker
        self.room = room
        self.rate = rate
        self.acked: list[Published] = []
        self.failed = 0
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.acked.append(await self.broker.publish(self.room, "load", f"m{i}"))
            except BrokerUnavailable:
                self.failed += 1
            i += 1
            await asyncio.sleep(1.0 / self.rate)

    async def wait_acked(self, n: int, timeout: float = 15.0) -> None:
        target = len(self.acked) + n
        await until(lambda: len(self.acked) >= target, f"{n} more acknowledged sends", timeout)

    async def stop(self) -> list[Published]:
        self._stop.set()
        await self._task
        return self.acked


def endpoint(broker: RedisBroker, server: RedisServer) -> EndpointStatus:
    """The server's row in ``broker.status().endpoints``."""
    return next(e for e in broker.status().endpoints if e.url == server.url)


def server_for(url: str | None, servers: Sequence[RedisServer]) -> RedisServer:
    (server,) = [s for s in servers if s.url == url]
    return server


async def assert_all_delivered(inbox: Inbox, room: str, acked: list[Published]) -> None:
    """Every acknowledged message exactly once, in order, nothing else."""
    want = [p.message.id for p in acked]
    await until(lambda: len(inbox.ids(room)) >= len(want), f"{len(want)} deliveries")
    assert inbox.ids(room) == want


@pytest.fixture
def cluster(start_redis: Callable[..., RedisServer]) -> tuple[RedisServer, ...]:
    """A master (AOF on) and two synced replicas."""
    master = start_redis()
    return master, start_redis(replica_of=master), start_redis(replica_of=master)


def test_a_missing_tool_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-redis-server is not installed"):
        require_tool("no-such-redis-server")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-redis-server is not installed"):
        require_tool("no-such-redis-server")


# -- storing and reading -----------------------------------------------------------------


def test_publish_history_and_gap_rules(cluster: tuple[RedisServer, ...]) -> None:
    master, r1, r2 = cluster

    async def scenario() -> None:
        async with running(redis_config(master, [r1, r2], **PATIENT_ACKS)) as (b, inbox):
            await b.subscribe("room")
            pubs = [await b.publish("room", "ann", f"m{i}") for i in range(6)]
            assert all(p.replicated is True for p in pubs)
            ids = [p.message.id for p in pubs]
            with master.client() as c:
                entry = c.xrange(f"{PREFIX}room:room", ids[2], ids[2])[0][1]
                assert entry == {"nick": "ann", "text": "m2", "ts": entry["ts"], "node": "node-a",
                                 "prev": ids[1]}
                assert 0 < c.ttl(f"{PREFIX}room:room") <= 86400
            assert [m.id for m in await b.history("room", 4)] == ids[-4:]
            replay = await b.read_since("room", ids[1])
            assert [m.id for m in replay.messages] == ids[2:] and not replay.truncated
            assert (await b.read_since("room", ids[-1])).truncated is False

            # A hole in the chain: the first message after the id does not name it as prev.
            with master.client() as c:
                c.xdel(f"{PREFIX}room:room", ids[2])
            replay = await b.read_since("room", ids[1])
            assert replay.truncated and replay.oldest == ids[0]
            assert [m.id for m in replay.messages] == ids[3:]  # still sent, after the reset

            # An id newer than anything held (history lost) is truncated too.
            replay = await b.read_since("room", "99999999999999-0")
            assert replay.truncated and replay.messages == []

            # FLUSHALL: nothing held, then a new message with an empty prev.
            with master.client() as c:
                c.flushall()
            replay = await b.read_since("room", ids[-1])
            assert replay.truncated and replay.oldest == "" and replay.messages == []
            fresh = await b.publish("room", "ann", "after flush")
            assert fresh.message.prev == ""
            replay = await b.read_since("room", ids[-1])
            assert replay.truncated and replay.oldest == fresh.message.id
            assert [m.id for m in replay.messages] == [fresh.message.id]
            # Live delivery noticed the broken chain and still delivered it once.
            await until(lambda: fresh.message.id in inbox.ids("room"), "the post-flush message")
            assert inbox.ids("room") == [*ids, fresh.message.id]

    asyncio.run(scenario())


def test_a_crowd_resuming_one_room_shares_one_read_and_one_presence_read(
        start_redis: Callable[..., RedisServer]) -> None:
    """200 clients resuming one room at once (a dead node's clients arriving) cost one
    MULTI of range reads and one presence read, not 200 of each: a storm must not queue
    for the connection pool until its wait runs out (503 to everyone)."""
    master = start_redis()

    def calls(command: str) -> int:
        with master.client() as c:
            return int(c.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    async def scenario() -> None:
        async with running(redis_config(master)) as (b, _):
            ids = [(await b.publish("room", "ann", f"m{i}")).message.id for i in range(20)]
            ranges, hashes = calls("xrange"), calls("hgetall")
            replays, presences = await asyncio.gather(
                asyncio.gather(*(b.read_since("room", ids[i % 20]) for i in range(200))),
                asyncio.gather(*(b.presence("room") for _ in range(200))))
            assert [len(r.messages) for r in replays] == [19 - i % 20 for i in range(200)]
            assert not any(r.truncated for r in replays)
            assert len(presences) == 200
            assert calls("xrange") - ranges == 2  # one MULTI: the range and the oldest entry
            assert calls("hgetall") - hashes == 1

    asyncio.run(scenario())


def test_replicated_is_none_without_replicas_and_acks_with_them(
        start_redis: Callable[..., RedisServer]) -> None:
    master = start_redis()

    async def scenario() -> None:
        async with running(redis_config(master)) as (b, _):
            assert (await b.publish("room", "ann", "x")).replicated is None
            assert b.status().subscribed_endpoint == master.url  # no replica: the master
        replica = start_redis(replica_of=master)
        async with running(redis_config(master, [replica], **PATIENT_ACKS)) as (b, _):
            assert (await b.publish("room", "ann", "y")).replicated is True
        async with running(redis_config(master, [replica], **{
                "broker.redis.replica_ack_timeout_ms": 0})) as (b, _):
            assert (await b.publish("room", "ann", "z")).replicated is None

    asyncio.run(scenario())


# -- where the subscription lives ------------------------------------------------------------


def test_subscription_is_on_a_replica_and_only_for_rooms_asked(
        cluster: tuple[RedisServer, ...]) -> None:
    master, r1, r2 = cluster

    def pubsub_clients(server: RedisServer) -> list[dict[str, Any]]:
        with server.client() as c:
            return c.client_list(_type="pubsub")

    def channels(server: RedisServer) -> set[str]:
        with server.client() as c:
            return set(c.pubsub_channels())

    async def scenario() -> None:
        async with running(redis_config(master, [r1, r2])) as (b, _):
            await b.subscribe("room1")
            status = b.status()
            sub = server_for(status.subscribed_endpoint, (r1, r2))
            assert pubsub_clients(master) == []
            (client,) = pubsub_clients(sub)
            assert client["name"] == "rtchat-sub:node-a"
            assert [c for c in pubsub_clients(r1 if sub is r2 else r2)] == []
            assert channels(sub) == {f"{PREFIX}probe:node-a", f"{PREFIX}ch:room1"}
            assert [e.subscribed for e in status.endpoints] == [
                e.url == sub.url for e in status.endpoints]
            assert [(e.url, e.configured_role) for e in status.endpoints] == [
                (master.url, "master"), (r1.url, "replica"), (r2.url, "replica")]
            for row in status.to_dict()["endpoints"]:
                assert set(row) == {"url", "configured_role", "reachable", "role",
                                    "master_link_status", "lag_bytes", "lag_seconds", "ping_ms",
                                    "probe_ms", "last_error", "healthy", "subscribed",
                                    "down_since", "problem"}
                assert row["reachable"] and row["healthy"] and row["ping_ms"] is not None
                assert row["down_since"] is None and row["problem"] is None

            # Publishing goes to the master only.
            await b.publish("room1", "ann", "hi")
            with master.client() as c:
                assert any(x["name"] == "rtchat-pub:node-a" for x in c.client_list())
            for replica in (r1, r2):
                with replica.client() as c:
                    assert not any(x["name"] == "rtchat-pub:node-a" for x in c.client_list())

            await b.subscribe("room2")
            assert channels(sub) == {f"{PREFIX}probe:node-a", f"{PREFIX}ch:room1",
                                     f"{PREFIX}ch:room2"}
            await b.unsubscribe("room1")
            await until(lambda: channels(sub) == {f"{PREFIX}probe:node-a", f"{PREFIX}ch:room2"},
                        "room1 to be unsubscribed")
            # The delivery probe comes back through the subscription.
            await until(lambda: any(e.probe_ms is not None for e in b.status().endpoints
                                    if e.subscribed), "a probe time")

    asyncio.run(scenario())


def test_subscribe_from_master(cluster: tuple[RedisServer, ...]) -> None:
    master, r1, r2 = cluster

    async def scenario() -> None:
        cfg = redis_config(master, [r1, r2], **{"broker.redis.subscribe_from": "master"})
        async with running(cfg) as (b, inbox):
            await b.subscribe("room")
            assert b.status().subscribed_endpoint == master.url
            p = await b.publish("room", "ann", "x")
            await until(lambda: inbox.ids("room") == [p.message.id], "the delivery")

    asyncio.run(scenario())


def test_live_gap_is_filled_from_history(cluster: tuple[RedisServer, ...]) -> None:
    master, r1, r2 = cluster

    async def scenario() -> None:
        async with running(redis_config(master, [r1, r2])) as (b, inbox):
            await b.subscribe("room")
            first = await b.publish("room", "ann", "first")
            # A message whose announcement never came (stored, not published) ...
            with master.client() as c:
                silent = c.xadd(f"{PREFIX}room:room", {
                    "nick": "bob", "text": "silent", "ts": "1.5", "node": "elsewhere",
                    "prev": first.message.id})
            # ... is delivered before the next one, whose prev names it.
            last = await b.publish("room", "ann", "last")
            assert last.message.prev == silent
            await until(lambda: len(inbox.ids("room")) >= 3, "three deliveries")
            assert inbox.ids("room") == [first.message.id, silent, last.message.id]
            assert [(m.nick, m.text, m.ts, m.node) for m in inbox.messages][1] == (
                "bob", "silent", 1.5, "elsewhere")

    asyncio.run(scenario())


# -- failover -----------------------------------------------------------------------------------


def test_sigkill_of_the_subscribed_replica_under_load(cluster: tuple[RedisServer, ...]) -> None:
    master, r1, r2 = cluster

    async def scenario() -> None:
        async with running(redis_config(master, [r1, r2])) as (b, inbox):
            await b.subscribe("room")
            victim = server_for(b.status().subscribed_endpoint, (r1, r2))
            survivor = r2 if victim is r1 else r1
            load = Publisher(b, "room")
            await load.wait_acked(25)
            victim.kill()
            await until(lambda: b.status().subscribed_endpoint == survivor.url,
                        "the move to the other replica")
            await load.wait_acked(25)
            acked = await load.stop()
            assert load.failed == 0  # the master never went away
            await assert_all_delivered(inbox, "room", acked)
            (record,) = b.status().failovers
            assert record.from_ == victim.url and record.to == survivor.url
            assert "connection" in record.reason or "Connection" in record.reason
            assert isinstance(record.recovered, int) and record.recovered >= 0
            assert b.status().failover_count == 1
            await until(lambda: endpoint(b, victim).reachable is False,
                        "the dead replica to show as unreachable")
            assert endpoint(b, victim).subscribed is False
            assert endpoint(b, victim).healthy is False

    asyncio.run(scenario())


def test_client_kill_type_pubsub_moves_the_subscription(cluster: tuple[RedisServer, ...]) -> None:
    master, r1, r2 = cluster

    async def scenario() -> None:
        async with running(redis_config(master, [r1, r2])) as (b, inbox):
            await b.subscribe("room")
            victim = server_for(b.status().subscribed_endpoint, (r1, r2))
            load = Publisher(b, "room")
            await load.wait_acked(25)
            with victim.client() as c:
                assert c.client_kill_filter(_type="pubsub") == 1
            await until(lambda: b.status().failover_count == 1, "the switch")
            await load.wait_acked(25)
            acked = await load.stop()
            await assert_all_delivered(inbox, "room", acked)
            (record,) = b.status().failovers
            assert record.from_ == victim.url and record.to != victim.url
            assert b.readiness() == []

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["ALL", "WRITE"])
def test_client_pause_is_caught_by_health_and_probe(cluster: tuple[RedisServer, ...],
                                                    mode: str) -> None:
    """ALL: health checks time out too. WRITE: the replica answers PING and INFO and says its
    link is up, but applies (and delivers) nothing: only lag and the probe can tell."""
    master, r1, r2 = cluster

    async def scenario() -> None:
        async with running(redis_config(master, [r1, r2])) as (b, inbox):
            await b.subscribe("room")
            victim = server_for(b.status().subscribed_endpoint, (r1, r2))
            load = Publisher(b, "room")
            await load.wait_acked(25)
            # The connection stays open and silent: only health checks and the probe see it.
            with victim.client() as c:
                c.execute_command("CLIENT", "PAUSE", 4000, mode)
            await until(lambda: b.status().failover_count == 1, "the switch", timeout=6)
            await load.wait_acked(25)
            acked = await load.stop()
            await assert_all_delivered(inbox, "room", acked)
            (record,) = b.status().failovers
            assert record.from_ == victim.url and record.to != victim.url
            assert record.recovered > 0  # what the stalled replica held back came from history

    asyncio.run(scenario())


def test_back_to_a_replica_after_a_spell_on_the_master(
        start_redis: Callable[..., RedisServer]) -> None:
    master = start_redis()
    replica = start_redis(replica_of=master)

    async def scenario() -> None:
        async with running(redis_config(master, [replica])) as (b, inbox):
            await b.subscribe("room")
            assert b.status().subscribed_endpoint == replica.url
            load = Publisher(b, "room")
            await load.wait_acked(10)
            with replica.client() as c:  # the only replica: the master must stand in
                c.client_kill_filter(_type="pubsub")
            await until(lambda: b.status().subscribed_endpoint == master.url, "the master")
            # Once the replica has held steady for a few checks, the subscription goes back.
            await until(lambda: b.status().subscribed_endpoint == replica.url, "the replica")
            await load.wait_acked(25)  # ...and stays there: no flapping
            acked = await load.stop()
            await assert_all_delivered(inbox, "room", acked)
            moves = [(f.from_, f.to) for f in b.status().failovers]
            assert moves == [(replica.url, master.url), (master.url, replica.url)]
            assert b.status().failovers[1].reason == "a replica is healthy again"
        # close() ends every task it started
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(scenario())


def test_master_only_outage_and_recovery(start_redis: Callable[..., RedisServer]) -> None:
    master = start_redis()

    async def scenario() -> None:
        async with running(redis_config(master)) as (b, inbox):
            await b.subscribe("room")
            before = await b.publish("room", "ann", "before")
            master.kill()
            await until(lambda: {"master unreachable", "no endpoint delivers"}
                        <= set(b.readiness()), "both readiness reasons")
            with pytest.raises(BrokerUnavailable):
                await b.history("room", 10)  # nothing left to read from
            master.start()
            await until(lambda: b.readiness() == [], "readiness to recover")
            after = await b.publish("room", "ann", "after")
            await until(lambda: len(inbox.ids("room")) >= 2, "both deliveries")
            assert inbox.ids("room") == [before.message.id, after.message.id]
            (record,) = b.status().failovers
            assert record.from_ == record.to == master.url

    asyncio.run(scenario())


def test_master_down_then_back(start_redis: Callable[..., RedisServer]) -> None:
    # fsync every write: with the default everysec, Redis may postpone the AOF write while a
    # slow fsync runs, still answering, and a SIGKILL then loses what it acknowledged.
    master = start_redis(extra_args=("--appendfsync", "always"))
    r1, r2 = start_redis(replica_of=master), start_redis(replica_of=master)

    async def scenario() -> None:
        async with running(redis_config(master, [r1, r2], **PATIENT_ACKS)) as (b, inbox):
            await b.subscribe("room")
            before = await b.publish("room", "ann", "before")
            assert before.replicated is True  # (on one replica: wait for the other too)

            def on_both_replicas() -> bool:
                for replica in (r1, r2):
                    with replica.client() as c:
                        if c.xlen(f"{PREFIX}room:room") != 1:
                            return False
                return True

            await until(on_both_replicas, "both replicas to hold it")
            master.kill()
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await b.publish("room", "ann", "lost?")
            assert time.monotonic() - started < 2.5  # fails fast, never hangs a request
            await until(lambda: "master unreachable" in b.readiness(), "readiness to fail")
            # History is still served, from the subscription's replica.
            assert [m.id for m in await b.history("room", 10)] == [before.message.id]
            assert (await b.read_since("room", before.message.id)).truncated is False

            master.start()  # same port, same AOF
            acked = [before]

            async def try_publish() -> bool:
                try:
                    acked.append(await b.publish("room", "ann", "after"))
                except BrokerUnavailable:
                    return False
                return True

            deadline = time.monotonic() + 10
            while not await try_publish():
                assert time.monotonic() < deadline, "publishing did not recover"
                await asyncio.sleep(0.05)
            for i in range(5):
                acked.append(await b.publish("room", "ann", f"later {i}"))
            await until(lambda: b.readiness() == [], "readiness to recover")
            await assert_all_delivered(inbox, "room", acked)
            # The restarted master kept the history (AOF).
            assert [m.id for m in await b.history("room", 100)] == [p.message.id for p in acked]

    asyncio.run(scenario())


def test_sentinel_failover_under_load(cluster: tuple[RedisServer, ...],
                                      start_sentinel: Callable[..., RedisServer]) -> None:
    master, r1, r2 = cluster
    sentinels = [start_sentinel(master.port, replicas=2) for _ in range(3)]
    servers = (master, r1, r2)
    cfg = redis_config(None, **{
        "broker.redis.sentinel.hosts": [f"127.0.0.1:{s.port}" for s in sentinels],
        "broker.redis.sentinel.service": SERVICE})

    async def scenario() -> None:
        async with running(cfg) as (b, inbox):
            assert b.status().master == master.url
            assert {e.url for e in b.status().endpoints} == {s.url for s in servers}
            await b.subscribe("room")
            load = Publisher(b, "room")
            await load.wait_acked(25)

            def failover() -> bool:
                with sentinels[0].client() as c:
                    try:
                        return bool(c.execute_command("SENTINEL", "FAILOVER", SERVICE))
                    except Exception as e:  # NOGOODSLAVE/INPROG until Sentinel is ready
                        if "NOGOODSLAVE" in str(e) or "INPROG" in str(e):
                            return False
                        raise

            await until(failover, "Sentinel to start the failover")
            await until(lambda: b.status().master != master.url, "the new master", 15)
            promoted = server_for(b.status().master, (r1, r2))
            with promoted.client() as c:
                assert c.info("replication")["role"] == "master"
            await load.wait_acked(50)
            acked = await load.stop()

            with promoted.client() as c:
                held = {e[0] for e in c.xrange(f"{PREFIX}room:room")}
            lost_replicated = [p.message.id for p in acked
                               if p.replicated and p.message.id not in held]
            lost_other = [p.message.id for p in acked
                          if not p.replicated and p.message.id not in held]
            print(f"sentinel failover: {len(acked)} acknowledged, {load.failed} refused, "
                  f"{sum(1 for p in acked if p.replicated)} replicated, "
                  f"{len(lost_other)} unreplicated lost")
            assert lost_replicated == []
            assert sum(1 for p in acked if p.replicated) >= 25  # the check above is not vacuous
            # Delivery: in order, no duplicates, and everything the new master holds.
            await until(lambda: held <= set(inbox.ids("room")), "delivery of the held messages")
            got = inbox.ids("room")
            assert len(got) == len(set(got))
            keys = [tuple(map(int, i.split("-"))) for i in got]
            assert keys == sorted(keys)
            assert b.readiness() == [] or await until(lambda: b.readiness() == [], "readiness")

    asyncio.run(scenario())


# -- cluster state --------------------------------------------------------------------------


NODE_SCRIPT = """
import asyncio, sys
from rtchat import config
from rtchat.broker.redis import RedisBroker

async def main():
    cfg = config.load(None, {}, {"broker.backend": "redis", "broker.redis.master": sys.argv[1],
                                 "broker.redis.health_interval_seconds": 0.2,
                                 "broker.redis.key_prefix": sys.argv[2]})
    b = RedisBroker(cfg, "node-b")
    await b.start(lambda m: None, lambda: {"clients": 2})
    await b.set_presence("room", {"bob": 2})
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_presence_across_nodes_and_heartbeat_expiry(
        start_redis: Callable[..., RedisServer]) -> None:
    master = start_redis()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    other = subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, master.url, PREFIX],
                             stdout=subprocess.PIPE, env=env, cwd=str(REPO))
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == b"ready"

        async def scenario() -> None:
            async with running(redis_config(master), "node-a") as (a, _):
                await a.set_presence("room", {"alice": 1})
                assert await a.presence("room") == Presence(3, ["alice", "bob"])
                ids = {n["id"] for n in await a.cluster_nodes()}
                assert ids == {"node-a", "node-b"}
                node_b = next(n for n in await a.cluster_nodes() if n["id"] == "node-b")
                assert node_b["clients"] == 2 and node_b["endpoint"] == master.url
                assert node_b["last_seen"] > time.time() - 5

                # A third node leaving gracefully drops off at once.
                async with running(redis_config(master), "node-c") as (c, _):
                    await c.set_presence("room", {"carol": 1})
                    assert await a.presence("room") == Presence(4, ["alice", "bob", "carol"])
                assert await a.presence("room") == Presence(3, ["alice", "bob"])

                # A node that dies without a word drops off when its heartbeat expires.
                os.kill(other.pid, signal.SIGKILL)
                other.wait(timeout=10)
                killed_at = time.monotonic()
                while (await a.presence("room")) != Presence(1, ["alice"]):
                    assert time.monotonic() - killed_at < 10, "node-b's presence never expired"
                    await asyncio.sleep(0.1)
                assert {n["id"] for n in await a.cluster_nodes()} == {"node-a"}
                with master.client() as r:  # and its stale field was cleaned up
                    assert set(r.hkeys(f"{PREFIX}presence:room")) == {"node-a"}

        asyncio.run(scenario())
    finally:
        if other.poll() is None:
            other.kill()
        other.wait(timeout=10)
        if other.stdout is not None:
            other.stdout.close()


# -- memory ---------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_rss_stays_flat_over_100k_messages(start_redis: Callable[..., RedisServer]) -> None:
    master = start_redis(appendonly=False)
    replica = start_redis(replica_of=master, appendonly=False)
    total, warmup, batch = 100_000, 20_000, 50  # a batch fits the connection pool

    async def scenario() -> tuple[int, int, int]:
        cfg = redis_config(master, [replica], **{"broker.redis.replica_ack_timeout_ms": 0,
                                                  "history.size": 1000})
        count = 0
        last_key = (0, 0)
        in_order = True

        def deliver(msg: Message) -> None:  # counts without keeping anything
            nonlocal count, last_key, in_order
            count += 1
            in_order = in_order and msg.key > last_key
            last_key = msg.key

        async with running(cfg, deliver=deliver) as (b, _):
            await b.subscribe("soak")
            assert b.status().subscribed_endpoint == replica.url
            text = "x" * 200
            sent = 0
            before = 0
            while sent < total:
                await asyncio.gather(*(b.publish("soak", "soak", text) for _ in range(batch)))
                sent += batch
                if sent == warmup:
                    await until(lambda: count >= warmup, "the warm-up deliveries", 30)
                    before = rss_bytes()
            await until(lambda: count >= total, f"{total} deliveries", 60)
            after = rss_bytes()
            assert count == total and in_order
            return before, after, count

    before, after, count = asyncio.run(scenario())
    growth = after - before
    print(f"RSS after {warmup} messages: {before / 2**20:.1f} MiB; after {count}: "
          f"{after / 2**20:.1f} MiB; growth {growth / 2**20:+.2f} MiB")
    assert growth < 8 * 2**20


def test_concurrent_sends_share_a_batch_and_each_gets_its_own_answer(
        cluster: tuple[RedisServer, ...]) -> None:
    """Group commit: sends that arrive together go to the master in one pipeline with one
    WAIT, yet each has its own id, its own replicated answer, and one delivery."""
    master, replica, _ = cluster

    async def scenario() -> None:
        async with running(redis_config(master, [replica], **PATIENT_ACKS)) as (broker, inbox):
            await broker.subscribe("batch")
            results = await asyncio.gather(*(
                broker.publish("batch", "ann", f"m{i}") for i in range(200)))
            ids = [r.message.id for r in results]
            assert len(set(ids)) == 200
            assert all(r.replicated is True for r in results)
            publisher = broker._publisher
            assert publisher.sends == 200
            assert publisher.batches < 50, publisher.batches  # they did go together
            history = await broker.history("batch", 500)
            assert sorted(m.text for m in history) == sorted(f"m{i}" for i in range(200))
            await until(lambda: len(inbox.ids("batch")) == 200, "every send delivered")
            assert sorted(inbox.ids("batch")) == sorted(ids)  # once each
            # The prev chain stays whole across a batch: each names the one stored before it.
            chain = [(m.id, m.prev) for m in history]
            assert all(prev == chain[i - 1][0] for i, (_, prev) in enumerate(chain) if i)

    asyncio.run(scenario())
