"""The cluster verdict: healthy, degraded or down, with reasons, the same on every node.

Each node sees Redis from where it stands: its own checks of every endpoint,
its own subscription, its own delivery probe. None of that is shared by
itself, so each node publishes its **view** in its heartbeat
(``node_view``: every endpoint's health as this node sees it, its
subscription's probe time, and what stops it from serving), and the verdict
is judged over the views of every live node, read back from Redis. Every
node reads the same heartbeats, so every node reaches the same verdict; its
own entry is taken fresh rather than read back, so two nodes agree within one
health interval.

The rule (``judge``), worst first:

* **down** when any node cannot serve: the master unreachable or not a
  master, no master known, or no endpoint delivering to its subscription
  (the node's broker readiness reasons);
* **degraded** when any endpoint is unhealthy in any node's view; when no
  spare replica is left (fewer than two healthy replicas, or none of one);
  when a node misses heartbeats (a live one late, or one that vanished
  without leaving: it stays listed as missing for ``MISSING_KEPT_SECONDS``);
  when a node's delivery probe takes longer than ``probe_slow_ms``;
* **healthy** otherwise.

While this node cannot reach the master nobody can write a heartbeat, so
the others' views are stale: the verdict is then this node's own view alone
(every node that sees the master gone says the same "down: master
unreachable"), and heartbeat ages are not judged.
Reasons name endpoints and nodes, never measured numbers that differ from
node to node. Pure: no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from rtchat.broker.base import EndpointStatus, Verdict

HEALTHY, DEGRADED, DOWN = "healthy", "degraded", "down"
STATES = (HEALTHY, DEGRADED, DOWN)
MISSING_KEPT_SECONDS = 600  # a node gone without leaving is listed (and degrades) this long


def probe_slow_ms(max_replica_lag_seconds: float) -> float:
    """Delivery slower than this degrades the cluster: half a second, or half the probe timeout
    when that is shorter (the probe timeout itself makes the endpoint unhealthy)."""
    return min(500.0, max_replica_lag_seconds * 1000.0 / 2)


def short(url: str) -> str:
    """``host:port`` of a Redis URL, for reasons a person reads."""
    try:
        parts = urlsplit(url)
        if parts.hostname:
            return f"{parts.hostname}:{parts.port or 6379}"
    except ValueError:
        pass
    return url


def node_view(endpoints: Sequence[EndpointStatus], not_ready: Sequence[str]) -> dict[str, Any]:
    """What a node publishes of its own view in its heartbeat (JSON-ready)."""
    return {
        "endpoints": [{"url": ep.url, "role": ep.configured_role, "reachable": ep.reachable,
                       "healthy": ep.healthy, "problem": _problem(ep), "probe_ms": ep.probe_ms,
                       "subscribed": ep.subscribed} for ep in endpoints],
        "not_ready": list(not_ready),
    }


def _problem(ep: EndpointStatus) -> str | None:
    if ep.healthy:
        return None
    if ep.reachable is False:
        return "unreachable"
    if ep.reachable is None:
        return "not checked yet"
    return _kind(ep.problem or ep.last_error or "unhealthy")


def _kind(problem: str) -> str:
    """The same trouble in the same words on every node (lag and probe times vary by node)."""
    for stable in ("lagging", "delivery probe overdue", "timeout"):
        if problem.startswith(stable):
            return stable
    return problem


def judge(nodes: Sequence[Mapping[str, Any]], self_id: str, own_view: Mapping[str, Any],
          now: float, late_after: float, slow_ms: float) -> Verdict:
    """The verdict over every node's view.

    ``nodes`` are the heartbeats read back (each with ``id``, ``last_seen``,
    ``view``; ``missing: True`` for a node gone without leaving); this node's
    entry is replaced by ``own_view``. A live heartbeat older than ``late_after``
    seconds is late.
    """
    views: dict[str, Mapping[str, Any]] = {}
    for n in nodes:
        if not n.get("missing") and isinstance(n.get("view"), Mapping):
            views[str(n.get("id"))] = n["view"]
    views[self_id] = own_view
    cut_off = _master_unreachable(own_view)
    if cut_off:  # nobody can write a heartbeat now: the others' views are stale
        views = {self_id: own_view}
    down: list[str] = []
    degraded: list[str] = []

    # Down: a node that cannot serve (its own readiness reasons), grouped by reason.
    for reason, ids in _grouped((i, r) for i, v in views.items() for r in v.get("not_ready", ())):
        down.append(reason if len(views) == 1 else f"{reason} ({_nodes(ids, views)})")

    # Endpoints as the nodes see them.
    seen: dict[str, dict[str, Any]] = {}
    for node_id, view in sorted(views.items()):
        for ep in view.get("endpoints", ()):
            e = seen.setdefault(ep["url"], {"role": ep.get("role") or "replica", "bad": {},
                                            "slow": []})
            if ep.get("reachable") is not None and not ep.get("healthy"):
                e["bad"][node_id] = ep.get("problem") or "unhealthy"
            probe = ep.get("probe_ms")
            if ep.get("subscribed") and isinstance(probe, (int, float)) and probe > slow_ms:
                e["slow"].append(node_id)
    order = sorted(seen, key=lambda u: (seen[u]["role"] != "master", u))
    for url in order:
        e = seen[url]
        if e["bad"]:
            problems = "; ".join(sorted(set(e["bad"].values())))
            degraded.append(f"{e['role']} {short(url)} unhealthy: {problems}"
                            f"{_seen_by(list(e['bad']), views)}")
    replicas = [u for u in order if seen[u]["role"] != "master"]
    healthy_replicas = [u for u in replicas if not seen[u]["bad"]]
    if replicas and len(healthy_replicas) < min(2, len(replicas)):
        degraded.append(f"no spare replica left: {len(healthy_replicas)} of {len(replicas)} "
                        f"replica{'' if len(replicas) == 1 else 's'} healthy")
    for url in order:
        for node_id in seen[url]["slow"]:
            degraded.append(f"{node_id}: delivery probe over {slow_ms:g} ms on {short(url)}")

    # Heartbeats: unjudgeable while the master (where they are written) is out of reach.
    if not cut_off:
        for n in sorted(nodes, key=lambda n: str(n.get("id"))):
            node_id = str(n.get("id"))
            if node_id == self_id:
                continue
            last = n.get("last_seen")
            at = _clock(last) if isinstance(last, (int, float)) else "never"
            if n.get("missing"):
                degraded.append(f"node {node_id} missing heartbeats (last seen {at})")
            elif isinstance(last, (int, float)) and now - last > late_after:
                degraded.append(f"node {node_id} heartbeat late (last seen {at})")

    if down:
        return Verdict(DOWN, tuple(down + degraded))
    if degraded:
        return Verdict(DEGRADED, tuple(degraded))
    return Verdict(HEALTHY, ())


def _master_unreachable(view: Mapping[str, Any]) -> bool:
    masters = [ep for ep in view.get("endpoints", ()) if ep.get("role") == "master"]
    return not masters or any(ep.get("reachable") is False for ep in masters)


def _grouped(pairs: Any) -> list[tuple[str, list[str]]]:
    out: dict[str, list[str]] = {}
    for node_id, reason in sorted(pairs):
        out.setdefault(reason, []).append(node_id)
    return sorted(out.items())


def _nodes(ids: list[str], views: Mapping[str, Any]) -> str:
    return "every node" if len(views) > 1 and len(ids) == len(views) else ", ".join(sorted(ids))


def _seen_by(ids: list[str], views: Mapping[str, Any]) -> str:
    return "" if len(ids) == len(views) else f" (seen by {', '.join(sorted(ids))})"


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
