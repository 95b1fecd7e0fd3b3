"""Message throughput for the admin page: a per-second sample of the hub's counters.

Owns one timer per node that reads ``hub.messages_in``/``messages_out`` once a
second and keeps the last ``SAMPLES`` rates in a ring buffer (the sparkline).
It reads two integers per tick and never awaits. Nothing runs until
:meth:`ThroughputSampler.start` is called from a running event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rtchat.hub import Hub

SAMPLES = 60  # one minute of history for the sparkline
INTERVAL = 1.0  # seconds between samples


class ThroughputSampler:
    """Messages in/out per second, sampled every ``interval`` seconds into a short ring buffer."""

    def __init__(self, hub: Hub, interval: float = INTERVAL, size: int = SAMPLES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hub = hub
        self.interval = interval
        self._clock = clock
        self._rates: deque[tuple[float, float]] = deque(maxlen=size)
        self._last: tuple[float, int, int] | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def slots(self) -> int:
        """How many samples the ring buffer holds."""
        return self._rates.maxlen or 0

    @property
    def running(self) -> bool:
        return self._timer is not None

    def start(self) -> None:
        """Begin sampling on the running loop. Idempotent; a no-op when no loop runs (yet)."""
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # make_app outside a loop: the first admin request starts it
        self._last = (self._clock(), self.hub.messages_in, self.hub.messages_out)
        self._timer = loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self.sample()
        # A timer, not a task: a loop closed under it has nothing pending to complain about.
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def sample(self) -> None:
        """Record the rates since the previous sample. Never blocks."""
        now, msg_in, msg_out = self._clock(), self.hub.messages_in, self.hub.messages_out
        if self._last is not None:
            then, prev_in, prev_out = self._last
            elapsed = now - then
            if elapsed > 0:
                self._rates.append((max(0, msg_in - prev_in) / elapsed,
                                    max(0, msg_out - prev_out) / elapsed))
        self._last = (now, msg_in, msg_out)

    def snapshot(self) -> dict[str, Any]:
        """Current rates (the latest sample) and the series, oldest first, rounded for JSON."""
        rates = list(self._rates)
        latest = rates[-1] if rates else (0.0, 0.0)
        return {
            "in_per_second": round(latest[0], 2),
            "out_per_second": round(latest[1], 2),
            "series": {
                "interval_seconds": self.interval,
                "in": [round(r[0], 2) for r in rates],
                "out": [round(r[1], 2) for r in rates],
            },
        }
