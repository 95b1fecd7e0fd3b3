"""The JSON report: its fields, and the statistics they are made of.

Owns the report's shape (one flat JSON object; the SPEC's fields first) and
the maths: nearest-rank percentiles, exact loss from per-message bitmaps.
Pure: everything comes in as arguments.
"""

from __future__ import annotations

import asyncio
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rtchat.bench.clients import Subscriber


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ascending values; None if empty."""
    n = len(sorted_values)
    if n == 0:
        return None
    if p <= 0:
        return sorted_values[0]
    rank = -(-p * n // 100)  # ceil(p/100 * n) without float drift for whole p
    return sorted_values[min(n, max(1, int(rank))) - 1]


def latency_summary(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max of ``values`` (any order), rounded to microseconds."""
    ordered = sorted(values)

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {"p50": r(percentile(ordered, 50)), "p90": r(percentile(ordered, 90)),
            "p99": r(percentile(ordered, 99)), "max": r(ordered[-1] if ordered else None)}



@dataclass(frozen=True, slots=True)
class Timings:
    """How long each phase took, and the bench's own CPU over the whole run."""

    connect_seconds: float
    sync_seconds: float
    send_seconds: float
    wall: float
    cpu: float


class Measured(Protocol):
    """What a finished run hands the report (``run.Bench`` has these)."""

    opts: Any  # .messages, .clients, .rooms_per_stream
    run_id: str
    rooms: list[str]
    subs: list[Subscriber]
    acked: list[bytearray]  # per room, one 0/1 byte per message: acknowledged by the server
    latencies: array  # publish -> delivery, ms, every delivery
    publish_ms: array  # POST round trips, ms
    statuses: Counter[str]
    connect_errors: Counter[str]
    sent: int
    first_send_wall: float
    send_cpu_percent: float


def build_report(run: Measured, t: Timings, synced: bool | None) -> dict[str, Any]:
    """The one JSON object ``rtchat bench`` prints (call from inside the event loop)."""
    acked_counts = [a.count(1) for a in run.acked]
    acked_ints = [int.from_bytes(a, "little") for a in run.acked]
    subscribers = [0] * len(run.rooms)  # per room: the streams carrying it
    delivered = lost = connected = 0
    for s in run.subs:
        if not s.connected:
            continue
        connected += 1
        delivered += s.delivered
        for room, seen in zip(s.rooms, s.seen, strict=True):
            subscribers[room] += 1
            # seen and acked hold one 0/1 byte per message: AND them as big
            # integers and count bits = acked messages this stream received.
            got = (int.from_bytes(seen, "little") & acked_ints[room]).bit_count()
            lost += acked_counts[room] - got
    expected = sum(a * n for a, n in zip(acked_counts, subscribers, strict=True))
    last_delivery = max((s.last_delivery for s in run.subs), default=0.0)
    delivery_span = last_delivery - run.first_send_wall

    def total(attr: str) -> int:
        return sum(getattr(s, attr) for s in run.subs)

    acked = sum(acked_counts)
    report: dict[str, Any] = {
        "sent": run.sent,
        "unsent": run.opts.messages - run.sent,
        "acked": acked,
        "delivered": delivered,
        "expected": expected,
        "lost": lost,
        "duplicates": total("duplicates"),
        "out_of_order": total("out_of_order"),
        "latency_ms": latency_summary(run.latencies),
        "deliveries_per_second": round(delivered / delivery_span, 1)
        if delivered and delivery_span > 0 else 0.0,
        "connect_errors": sum(run.connect_errors.values()),
        "connect_error_kinds": dict(run.connect_errors),
        "connect_seconds": round(t.connect_seconds, 3),
        "cpu_seconds": round(t.cpu, 3),
        "cpu_percent": round(100.0 * t.cpu / t.wall, 1) if t.wall > 0 else 0.0,
        "send_cpu_percent": run.send_cpu_percent,
        "clients": run.opts.clients,
        "connected": connected,
        "rooms": len(run.rooms),
        "send_errors": run.sent - acked,
        "status_counts": dict(sorted(run.statuses.items())),
        "publish_ms": latency_summary(run.publish_ms),
        "publish_per_second": round(acked / t.send_seconds, 1) if t.send_seconds > 0 else 0.0,
        "send_seconds": round(t.send_seconds, 3),
        "sync_seconds": round(t.sync_seconds, 3),
        "synced": synced,
        "disconnects": total("disconnects"),
        "reconnects": total("reconnects"),
        "resets": total("resets"),
        "misrouted": total("misrouted"),
        "foreign": total("foreign"),
        "duration_seconds": round(t.wall, 3),
        "event_loop": loop_name(),
        "run_id": run.run_id,
    }
    if run.opts.rooms_per_stream > 1:  # a one-room run's report keeps its exact shape
        report["rooms_per_stream"] = run.opts.rooms_per_stream
    return report


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: which event loop runs this (call from inside it)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
