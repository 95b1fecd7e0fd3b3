"""Sentinel: where the master and the replicas are, asked rather than configured.

Owns the Sentinel connections and the last answer's trouble, and decides
whether an address Sentinel names supersedes the current master (a
replica promoted from it does; a stale master Sentinel has not demoted yet
does not). It writes its findings into the ``Topology``; everything else
about health is the topology's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from rtchat.broker.redis.endpoint import SOCKET_TIMEOUT, EndpointHealth, error_text
from rtchat.broker.redis.topology import Topology, promoted_from
from rtchat.config import SentinelConfig

REFRESH_CHECKS = 3  # re-read the topology every this many health checks


class SentinelWatch:
    """Reads the master and replicas of one Sentinel service into a ``Topology``."""

    def __init__(self, sc: SentinelConfig, url_template: str, node_id: str,
                 check_timeout: float) -> None:
        """``url_template`` (the configured master URL) gives scheme, credentials and db
        for the endpoints Sentinel names."""
        self._service = sc.service
        self._template = url_template
        self._node_id = node_id
        self._check_timeout = check_timeout
        self.error: str | None = None  # why no master is known, when none is
        hosts = []
        for hp in sc.hosts:
            host, _, port = hp.rpartition(":")
            hosts.append((host, int(port)))
        self._sentinel = Sentinel(hosts, sentinel_kwargs={
            "socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": SOCKET_TIMEOUT,
            "password": sc.password, "decode_responses": True, "protocol": 2,
            "retry": Retry(NoBackoff(), 0), "driver_info": None})

    @staticmethod
    def due(topology: Topology, checks: int) -> bool:
        """Ask this round: no master yet, a hint of change, a bad master, or every few checks."""
        master = topology.master
        return (master is None or topology.dirty or checks % REFRESH_CHECKS == 1
                or not (master.reachable and master.role == "master"))

    def _endpoint_for(self, topology: Topology, subscribed: EndpointHealth | None, host: str,
                      port: int, role: str) -> EndpointHealth:
        for ep in topology.endpoints(subscribed):
            if ep.port == port and ep.host == host:
                return ep
        base = urlsplit(self._template)
        userinfo = base.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
        url = urlunsplit((base.scheme, netloc, base.path, base.query, ""))
        return EndpointHealth(url, role, self._node_id)

    async def refresh(self, topology: Topology, subscribed: EndpointHealth | None) -> None:
        """Ask every Sentinel for the master and its replicas; follow a promotion.

        ``subscribed`` (the subscription's endpoint) is never closed here.
        """
        topology.dirty = False
        service = self._service

        async def ask(s: aioredis.Redis) -> tuple[Any, Any]:
            # All Sentinels at once, so unreachable ones cost one timeout, not one each.
            addr = await asyncio.wait_for(s.sentinel_get_master_addr_by_name(service),
                                          self._check_timeout)
            found = await asyncio.wait_for(s.sentinel_slaves(service), self._check_timeout)
            return addr, found

        answers: list[tuple[str, int]] = []
        replicas: list[dict[str, Any]] | None = None
        errors = []
        results = await asyncio.gather(*(ask(s) for s in self._sentinel.sentinels),
                                       return_exceptions=True)
        for res in results:
            if isinstance(res, (RedisError, OSError, asyncio.TimeoutError)):
                errors.append(error_text(res))
            elif isinstance(res, BaseException):
                raise res
            else:
                addr, found = res
                if addr:
                    answers.append((str(addr[0]), int(addr[1])))
                if replicas is None:
                    replicas = list(found)
        if not answers:
            self.error = "no Sentinel knows the master" + (f" ({errors[0]})" if errors else "")
            return
        self.error = None
        votes = Counter(answers)
        majority = votes.most_common(1)[0][0]
        for addr in sorted(votes, key=lambda a: a != majority):
            if await self._consider_master(topology, subscribed, addr, addr == majority):
                break
        if replicas is None:
            return  # no Sentinel listed the replicas this time: keep what we know
        master = topology.master
        keep: list[EndpointHealth] = []
        for r in replicas:
            host, port = str(r.get("ip")), int(r.get("port") or 0)
            if master is not None and master.host == host and master.port == port:
                continue
            keep.append(self._endpoint_for(topology, subscribed, host, port, "replica"))
        for ep in keep:
            ep.configured_role = "replica"
        old = [r for r in topology.replicas if r not in keep and r is not master]
        topology.replicas = keep
        for ep in old:
            if ep is not subscribed:
                await ep.aclose()

    async def _consider_master(self, topology: Topology, subscribed: EndpointHealth | None,
                               addr: tuple[str, int], majority: bool) -> bool:
        """Switch the master to ``addr`` if it is one and supersedes the current master."""
        current = topology.master
        if current is not None and (current.host, current.port) == addr:
            return True
        ep = self._endpoint_for(topology, subscribed, addr[0], addr[1], "master")
        try:
            return await self._decide_master(topology, ep, current, majority)
        finally:
            if ep not in topology.endpoints(subscribed):
                await ep.aclose()  # made just for this look and not taken on

    async def _decide_master(self, topology: Topology, ep: EndpointHealth,
                             current: EndpointHealth | None, majority: bool) -> bool:
        res = await ep.check(self._check_timeout)
        if not res.ok or res.info.get("role") != "master":
            return False
        ep.apply(res)
        if current is None:
            topology.set_master(ep, "discovered through Sentinel")
            return True
        if promoted_from(ep, current):
            topology.set_master(ep, "replica promoted (Sentinel)")
            return True
        if promoted_from(current, ep):
            return False  # a stale master that Sentinel has not demoted yet
        if not (current.reachable and current.role == "master") or majority:
            topology.set_master(ep, "Sentinel reports a new master")
            return True
        return False

    async def aclose(self) -> None:
        for s in self._sentinel.sentinels:
            with contextlib.suppress(Exception):
                await s.aclose()
