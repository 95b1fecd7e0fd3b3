"""Per-client token buckets for sends. Pure: the clock is a parameter."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RateLimiter:
    """``rate`` tokens per second, up to ``burst``, per client key.

    ``take(key)`` returns 0.0 when allowed, else the seconds until a token is due.
    Idle full buckets are forgotten, so memory follows active clients only.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._next_sweep = clock() + 60.0

    def take(self, key: str) -> float:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> int:
        """A ``Retry-After`` header value: whole seconds, at least 1."""
        return max(1, math.ceil(wait))

    def _sweep(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        self._next_sweep = now + 60.0
