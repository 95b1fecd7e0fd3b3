"""Which shards a Redis Cluster has, which slots each serves, and a client for all of them.

Owns the ``Shard`` objects (see ``shard``) and keeps them in step with
``CLUSTER SHARDS``, asked of the servers it knows (then the configured seed
nodes): slot ranges, the master, the replicas not marked failed. A shard
keeps its identity through a failover (it is matched by the cluster node
ids it holds), so its subscription and health record survive a promotion.
Also owns ``ClusterReader``: redis-py's ``RedisCluster``, which routes
every other command (history, presence, heartbeats, bans) to its slot and
follows ``MOVED``/``ASK``, wrapped to look like one endpoint to the readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError

from rtchat.broker.redis.endpoint import SOCKET_TIMEOUT, EndpointHealth, error_text
from rtchat.broker.redis.shard import Shard

log = logging.getLogger("rtchat.broker.redis")


class ClusterReader:
    """The whole cluster as one endpoint (duck-typed ``EndpointHealth``: ``client``,
    ``reachable``, ``note_failure``): ``RedisCluster`` picks each command's master."""

    label = "cluster"

    def __init__(self, seeds: list[str], node_id: str) -> None:
        self.url = seeds[0]
        nodes = []
        for url in seeds:
            parts = urlsplit(url)
            nodes.append(ClusterNode(parts.hostname or "127.0.0.1", parts.port or 6379))
        parts = urlsplit(seeds[0])
        self.client = RedisCluster(
            startup_nodes=nodes, username=parts.username, password=parts.password,
            decode_responses=True, protocol=2, socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT, retry=Retry(NoBackoff(), 2),
            client_name=f"rtchat:{node_id}", driver_info=None)
        self.reachable: bool | None = True
        self.last_error: str | None = None

    def note_failure(self, e: BaseException) -> None:
        self.last_error = error_text(e)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()


@dataclass
class ShardInfo:
    """One entry of ``CLUSTER SHARDS``."""

    ranges: list[tuple[int, int]]
    master: tuple[str, int] | None = None
    replicas: list[tuple[str, int]] = field(default_factory=list)
    node_ids: set[str] = field(default_factory=set)


def _as_dict(value: Any) -> dict[str, Any]:
    """A RESP2 flat ``[key, value, ...]`` list (or a dict already) as a dict."""
    if isinstance(value, dict):
        return value
    return dict(zip(value[0::2], value[1::2], strict=False))


def parse_shards(reply: Any) -> list[ShardInfo]:
    """``CLUSTER SHARDS`` (parsed into dicts or raw RESP2 lists) -> ShardInfos."""
    shards = []
    for raw in reply:
        entry = _as_dict(raw)
        slots = [int(x) for x in entry.get("slots", [])]
        info = ShardInfo(ranges=sorted(zip(slots[0::2], slots[1::2], strict=False)))
        for node in map(_as_dict, entry.get("nodes", [])):
            host = str(node.get("endpoint") or "")
            if host in ("", "?"):
                host = str(node.get("ip", "127.0.0.1"))
            addr = (host, int(node.get("port") or 0))
            info.node_ids.add(str(node.get("id", "")))
            if node.get("health") == "fail":
                continue
            if node.get("role") == "master":
                info.master = addr
            else:
                info.replicas.append(addr)
        shards.append(info)
    return shards


class ShardMap:
    """The cluster's shards as this node knows them, refreshed from ``CLUSTER SHARDS``."""

    def __init__(self, seeds: list[str], node_id: str, make_shard: Callable[[], Shard],
                 check_timeout: float) -> None:
        self._template = seeds[0]
        self._node_id = node_id
        self._make_shard = make_shard
        self._check_timeout = check_timeout
        self._seeds = [EndpointHealth(u, "seed", node_id, cluster=True) for u in seeds]
        self.shards: list[Shard] = []
        self.retired: list[Shard] = []  # shards gone from the cluster: the broker closes them
        self.error: str | None = "not discovered yet"

    def shard_for(self, room_key: str) -> Shard | None:
        """The shard serving the slot of ``room_key`` (any key of the room)."""
        slot = key_slot(room_key.encode())
        for shard in self.shards:
            if shard.serves(slot):
                return shard
        return None

    def endpoint_at(self, host: str, port: int) -> EndpointHealth | None:
        for shard in self.shards:
            for ep in shard.endpoints():
                if ep.host == host and ep.port == port:
                    return ep
        return None

    def _known(self) -> Iterable[EndpointHealth]:
        masters = [s.topology.master for s in self.shards if s.topology.master is not None]
        yield from (m for m in masters if m.reachable is not False)
        for s in self.shards:
            yield from s.topology.replicas
        yield from self._seeds

    async def refresh(self) -> bool:
        """Ask the servers for ``CLUSTER SHARDS``; update every shard. False if none answered."""
        errors = []
        for ep in self._known():
            try:
                reply = await asyncio.wait_for(ep.client.execute_command("CLUSTER SHARDS"),
                                               self._check_timeout)
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                errors.append(error_text(e))
                continue
            infos = [i for i in parse_shards(reply) if i.ranges or i.master]
            if infos:
                self._apply(infos)
                self.error = None
                return True
        self.error = "no cluster node answered CLUSTER SHARDS" + (
            f" ({errors[-1]})" if errors else "")
        return False

    def _apply(self, infos: list[ShardInfo]) -> None:
        remaining = list(self.shards)
        shards = []
        for info in infos:
            match = max(remaining, key=lambda s: len(s.node_ids & info.node_ids), default=None)
            if match is None or not match.node_ids & info.node_ids:
                match = self._make_shard()
            else:
                remaining.remove(match)
            self._update(match, info)
            shards.append(match)
        self.shards = shards
        self.retired.extend(remaining)

    def _endpoint(self, shard: Shard, addr: tuple[str, int], role: str) -> EndpointHealth:
        for ep in shard.endpoints():
            if (ep.host, ep.port) == addr:
                return ep
        base = urlsplit(self._template)
        userinfo = base.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{addr[0]}:{addr[1]}" if userinfo else f"{addr[0]}:{addr[1]}"
        url = urlunsplit((base.scheme, netloc, base.path, base.query, ""))
        return EndpointHealth(url, role, self._node_id, cluster=True)

    def _update(self, shard: Shard, info: ShardInfo) -> None:
        shard.node_ids |= info.node_ids
        topology = shard.topology
        before = shard.endpoints()
        if info.master is not None:
            master = self._endpoint(shard, info.master, "master")
            if topology.master is not master:
                if topology.master is None:
                    topology.master = master
                    master.configured_role = "master"
                else:
                    topology.set_master(master, "the cluster promoted it")
        replicas = [self._endpoint(shard, a, "replica") for a in info.replicas
                    if a != info.master]
        for ep in replicas:
            ep.configured_role = "replica"
        topology.replicas = replicas
        shard.set_ranges(info.ranges)
        reading = shard.reading
        for ep in before:
            if ep not in shard.endpoints() and ep is not reading:
                task = asyncio.ensure_future(ep.aclose())
                task.add_done_callback(lambda t: t.exception())

    async def aclose(self) -> None:
        for ep in self._seeds:
            await ep.aclose()
