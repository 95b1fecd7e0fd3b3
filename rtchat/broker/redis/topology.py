"""Which server is the master, which are replicas, and which of them are healthy.

Owns the master and the replica list, the master's recent replication
offsets (to turn a replica's byte lag into seconds), the replica count
``WAIT`` must hear from, and the verdict on each endpoint: a lost connection
is down at once; lag, a broken link, a wrong master or an overdue probe must
hold for two checks a health interval apart. It also picks the endpoint to
subscribe on.

It does not ask Sentinel (``sentinel`` feeds it) and does not hold the
subscription: the broker says which endpoint that is and whether its probe is
overdue.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

from rtchat.broker.redis.endpoint import EndpointHealth

log = logging.getLogger("rtchat.broker.redis")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def same_host(a: str, b: str) -> bool:
    # A hostname and an address cannot be compared without resolving; assume a match.
    return a == b or not (_is_ip(a) and _is_ip(b))


def promoted_from(new: EndpointHealth, old: EndpointHealth) -> bool:
    """``new`` is a master promoted from a replica of ``old`` (it carries old's replication id)."""
    return (new.role == "master" and bool(old.replid) and new.replid2 == old.replid
            and new.second_offset > 0 and new.replid != old.replid)


SWITCH_BACK_CHECKS = 3  # clean checks in a row before leaving the master for a replica


async def health_rounds(wakeup: asyncio.Event, interval: float, closed: Callable[[], bool],
                        tick: Callable[[], Awaitable[None]], what: str) -> None:
    """Run ``tick`` every ``interval`` until ``closed()``, and soon after a ``wakeup``
    (a short pause first, so a burst of wake-ups is one round). A round that fails is
    logged and the next one runs as planned."""
    loop = asyncio.get_running_loop()
    next_at = loop.time() + interval
    while not closed():
        try:
            await asyncio.wait_for(wakeup.wait(), max(0.0, next_at - loop.time()))
            await asyncio.sleep(min(0.05, interval / 4))
        except asyncio.TimeoutError:
            pass
        wakeup.clear()
        next_at = loop.time() + interval
        try:
            await tick()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s health check failed", what)


class Topology:
    """The master, the replicas and the verdict on each. Never awaits except in ``check``.

    ``wake`` is called when the verdict wants another check soon (a replica
    left the master, a replica was promoted).
    """

    def __init__(self, max_lag: float, interval: float, wake: Callable[[], None]) -> None:
        self.max_lag = max_lag
        self.interval = interval
        self._wake = wake
        self.master: EndpointHealth | None = None
        self.replicas: list[EndpointHealth] = []
        self.dirty = False  # the topology may have changed: ask Sentinel at the next check
        self.expected_replicas: int | None = None
        self._replica_drop_seen = False
        self._master_samples: deque[tuple[float, int]] = deque(maxlen=256)
        self._master_down_logged = False

    def endpoints(self, subscribed: EndpointHealth | None = None) -> list[EndpointHealth]:
        """The master, the replicas, then ``subscribed`` if the topology has dropped it."""
        eps = [self.master] if self.master is not None else []
        eps += [r for r in self.replicas if r is not self.master]
        if subscribed is not None and subscribed not in eps:
            eps.append(subscribed)
        return eps

    def master_problems(self, sentinel_error: str | None) -> list[str]:
        """Why the master cannot take writes now (readiness reasons); empty when it can."""
        master = self.master
        if master is None:
            return [f"master unknown: {sentinel_error or 'not discovered yet'}"]
        if not master.reachable:
            return ["master unreachable"]
        if master.bad_checks >= 2:
            return [f"master not responding ({master.problem})"]
        if master.role == "replica":
            return ["master is a replica (read-only)"]
        return []

    def acks_to_wait(self, all_online: bool) -> int:
        """How many replicas ``WAIT`` must hear from: 0 without replicas, else 1.

        With ``all_online`` (Sentinel): every replica the master had online at the
        last check. Sentinel may promote any of them, and a manual failover of a live
        master can promote one that has not applied a write another replica already
        acknowledged.
        """
        if not self.replicas:
            return 0
        return max(1, self.expected_replicas or 1) if all_online else 1

    async def check(self, eps: list[EndpointHealth], timeout: float) -> float:
        """Check ``eps`` at once and record every result; returns the loop time of the round."""
        results = await asyncio.gather(*(ep.check(timeout) for ep in eps))
        # Apply every result at once, with no await in between, so publishes never see
        # a master's replica count from a different moment than the replicas' roles.
        now = asyncio.get_running_loop().time()
        for ep, res in zip(eps, results, strict=True):
            ep.apply(res)
        return now

    def judge(self, now: float, eps: list[EndpointHealth],
              probe_overdue_on: EndpointHealth | None) -> None:
        """Turn this round's raw results into health, lag and the replica count to expect.

        ``probe_overdue_on`` is the subscription's endpoint when its delivery probe is overdue.
        """
        master = self.master
        max_lag = self.max_lag
        if master is not None and master.reachable and master.role == "master" \
                and master.offset is not None:
            self._master_samples.append((now, master.offset))
            # How many replicas WAIT must hear from (with Sentinel). Fewer online than
            # before must be seen twice: the one that left may be being promoted.
            count = master.connected_replicas or 0
            expected = self.expected_replicas
            if expected is None or count >= expected or self._replica_drop_seen:
                self.expected_replicas = count
                self._replica_drop_seen = False
            else:
                self._replica_drop_seen = True
                self.dirty = True
                self._wake()
            if self._master_down_logged:
                log.warning("Redis master %s reachable again", master.label)
                self._master_down_logged = False
        elif master is not None and master.checked and not master.reachable \
                and not self._master_down_logged:
            log.warning("Redis master %s unreachable: %s", master.label, master.last_error)
            self._master_down_logged = True
        for ep in eps:
            if not ep.reachable:
                ep.bad_checks = ep.good_checks = 0
                ep.soft_down = False
                continue
            problem = ep.problem
            if problem is None and ep is not master:
                problem = self._replica_problem(ep, master, now, max_lag)
            if problem is None and ep is master and ep.role != "master":
                problem = "the master is a replica"
            if problem is None and ep is probe_overdue_on:
                problem = f"delivery probe overdue (> {max_lag:g}s)"
            if problem is None:
                ep.bad_checks = 0
                ep.soft_down = False
                ep.good_checks += 1
            else:
                if ep.bad_checks == 0:
                    ep.bad_since = now
                ep.bad_checks += 1
                ep.good_checks = 0
                ep.problem = problem
                # Two checks in a row, and a health interval apart: extra checks that a
                # wake-up brought on must not make a blip look lasting.
                ep.soft_down = ep.bad_checks >= 2 and now - ep.bad_since >= self.interval * 0.9
        wall = time.time()
        for ep in eps:
            ep.track_down(wall)

    def _replica_problem(self, ep: EndpointHealth, master: EndpointHealth | None, now: float,
                         max_lag: float) -> str | None:
        if ep.role == "master":
            ep.lag_bytes = ep.lag_seconds = None
            return "not a replica (role: master)"
        if ep.master_link_status != "up":
            return f"master_link_status: {ep.master_link_status}"
        if master is not None and master.reachable and master.role == "master":
            if ep.master_port != master.port or not same_host(ep.master_host or "", master.host):
                return f"replicates {ep.master_host}:{ep.master_port}, not the master"
            newest = master.offset or 0
            ep.lag_bytes = max(0, newest - (ep.offset or 0))
            # Lag in seconds: since when has the master held data this replica lacks?
            lag = 0.0
            if ep.offset is not None and ep.offset < newest:
                for t, off in self._master_samples:
                    if off > ep.offset:
                        lag = now - t
                        break
            ep.lag_seconds = lag
        else:
            ep.lag_bytes = None
            ep.lag_seconds = None
        if ep.lag_seconds is not None and ep.lag_seconds > max_lag:
            return f"lagging {ep.lag_seconds:.1f}s (> {max_lag:g}s)"
        return None

    def move_from(self, ep: EndpointHealth, prefer_replica: bool
                  ) -> tuple[EndpointHealth, str] | None:
        """Where a live subscription on ``ep`` should move, and why; None to stay.

        Off an unhealthy endpoint at once; back to a replica (or, with ``subscribe_from:
        master``, to the master) only once it has held steady for SWITCH_BACK_CHECKS."""
        if not ep.healthy:
            target = self.choose(ep, prefer_replica)
            return (target, ep.problem or "unhealthy") if target not in (None, ep) else None
        master = self.master
        if prefer_replica:
            # On the master only for want of a replica: go back once one holds steady.
            if ep is master or ep.role == "master":
                best = self.choose(ep, prefer_replica)
                if best is not None and best is not master \
                        and best.good_checks >= SWITCH_BACK_CHECKS:
                    return best, "a replica is healthy again"
        elif master is not None and ep is not master and master.healthy \
                and master.good_checks >= SWITCH_BACK_CHECKS:
            return master, "the master is healthy again"
        return None

    def choose(self, exclude: EndpointHealth | None, prefer_replica: bool
               ) -> EndpointHealth | None:
        """The endpoint to subscribe on: the least-lagged healthy replica, else the master
        (the master first unless ``prefer_replica``)."""
        master = self.master
        replicas = [r for r in self.replicas
                    if r is not master and r is not exclude and r.healthy
                    and r.role == "replica" and r.bad_checks == 0]
        replicas.sort(key=lambda r: (r.lag_seconds or 0.0, r.lag_bytes or 0,
                                     r.ping_ms if r.ping_ms is not None else math.inf))
        master_ok = master is not None and master is not exclude and master.healthy
        if prefer_replica:
            if replicas:
                return replicas[0]
            if master_ok:
                return master
        else:
            if master_ok:
                return master
            if replicas:
                return replicas[0]
        if exclude is not None and exclude.healthy and exclude.bad_checks == 0:
            return exclude  # nothing else: the same endpoint again beats no endpoint
        return None

    def follow_promotion(self) -> None:
        """A replica promoted from our master takes over at once: writes to the old one die."""
        current = self.master
        if current is None:
            return
        for ep in self.replicas:
            if ep.reachable and ep.role == "master" and promoted_from(ep, current):
                self.set_master(ep, "replica promoted")
                self.dirty = True
                self._wake()
                return

    def set_master(self, ep: EndpointHealth, reason: str) -> None:
        old = self.master
        if old is ep:
            return
        self.master = ep
        ep.configured_role = "master"
        self.replicas = [r for r in self.replicas if r is not ep]
        if old is not None:
            old.configured_role = "replica"
            self.replicas.append(old)
        self._master_samples.clear()
        self.expected_replicas = None
        self._replica_drop_seen = False
        log.warning("Redis master is now %s (was %s): %s", ep.label,
                    old.label if old is not None else "unknown", reason)
