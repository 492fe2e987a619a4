"""When CPython's cyclic garbage collector runs while a tracker serves.

CPython starts a young collection when allocations minus deallocations of tracked
objects pass a threshold. Under a registration load that count hardly moves: each
keepalive stores a new member and frees the one it replaces. So the young generation
filled up with members between collections, which came seldom and walked thousands
of objects each: at 40,000 registrations a second, 4,000-6,000 (0.5-0.9 ms, about
ten a second), and every tenth one, which also walks the middle generation, 1.8-2.3
ms. Those pauses were a good part of the registration p99.

So serving also collects the young and middle generations itself every
:data:`COLLECT_EVERY` registrations: each collection then walks about that many
objects. CPython's own trigger stays on for what does grow the count (a flood from
new sources fills the rate limiter's table, say). A full collection walks every
member stored since serving started (0.3 s with a million), and serving makes next to
no cyclic garbage (the young collections of a tracker under a mixed text, STUN and
registration load found none), so CPython never starts one and serving runs one
every :data:`FULL_INTERVAL` seconds, for the cycles that outlive a young collection.
What exists when serving starts (modules, the loaded store) is frozen out of every
walk.
"""

from __future__ import annotations

import gc

COLLECT_EVERY = 500  # registrations between two collections of the young generations
FULL_INTERVAL = 3600.0  # seconds between full collections
NEVER = 2**31 - 1  # CPython's full-collection threshold while serving


class ServingCollector:
    """The collection schedule of one serving process."""

    def __init__(self, every: int = COLLECT_EVERY, full_interval: float = FULL_INTERVAL) -> None:
        self.every = every
        self.full_interval = full_interval
        self.young = 0  # our collections of the young and middle generations
        self.full = 0
        self.next_at = every  # the registration count that calls collect_young()
        self._full_at = float("inf")  # set by start()
        self._thresholds: tuple[int, int, int] | None = None  # CPython's, until stop()

    def start(self, now: float) -> None:
        """Collect and freeze what serving starts with, and take full collections
        over. ``now`` is a monotonic clock reading."""
        gc.collect()
        gc.freeze()
        self._thresholds = gc.get_threshold()
        young, middle, _ = self._thresholds
        gc.set_threshold(young, middle, NEVER)
        self._full_at = now + self.full_interval

    def collect_young(self, registrations: int) -> None:
        """Collect the young and middle generations; ``registrations`` is the count
        so far, from which the next call is due."""
        gc.collect(1)
        self.young += 1
        self.next_at = registrations + self.every

    def tick(self, now: float) -> None:
        """The housekeeping tick: a full collection when one is due."""
        if now >= self._full_at:
            gc.collect()
            self.full += 1
            self._full_at = now + self.full_interval

    def stop(self) -> None:
        """Give CPython its thresholds back."""
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None


__all__ = ["COLLECT_EVERY", "FULL_INTERVAL", "NEVER", "ServingCollector"]
