"""Per-source token buckets: a flood from one source is dropped cheaply and counted,
and never spends the budget of anyone else."""

from __future__ import annotations


class SourceRateLimiter:
    """A token bucket per source key (IPv4 address or IPv6 /64).

    ``rate`` tokens per second, at most ``burst`` stored. ``rate == 0`` turns the
    limiter off. The table of sources is bounded: when it is full, sources whose
    bucket has refilled (idle ones) are forgotten first, and if none are, the new
    source is refused rather than growing memory without bound.
    """

    __slots__ = ("rate", "burst", "max_sources", "_buckets", "dropped")

    def __init__(self, rate: float, burst: float | None = None, max_sources: int = 200_000) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2.0 * rate)
        self.max_sources = max_sources
        self._buckets: dict[str, list[float]] = {}
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, key: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self.sweep(now)
                if len(self._buckets) >= self.max_sources:
                    self.dropped += 1
                    return False
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            self.dropped += 1
            return False
        bucket[0] = tokens - 1.0
        return True

    def sweep(self, now: float) -> int:
        """Forget sources whose bucket is full again: they cost nothing to recreate."""
        full_after = self.burst / self.rate if self.rate > 0 else 0.0
        stale = [k for k, (tokens, last) in self._buckets.items() if now - last >= full_after]
        for key in stale:
            del self._buckets[key]
        return len(stale)

    def __len__(self) -> int:
        return len(self._buckets)
