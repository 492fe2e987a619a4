"""When CPython's cyclic garbage collector runs while a tracker serves.

Left to its own thresholds it ran seldom and long under a registration load. Each
keepalive stores a new member and frees the one it replaces, so the allocation count
that triggers a collection hardly moves while the young generation fills up with new
members: at 40,000 registrations a second a young collection walked 4,000-6,000
objects (0.5-0.9 ms, about ten a second) and every tenth one, which also walks the
middle generation, 1.8-2.3 ms. Those pauses were a good part of the registration p99.

So serving switches the automatic collector off and collects the young and middle
generations itself, every :data:`COLLECT_EVERY` registrations and at every
housekeeping tick: each collection then walks about that many objects. A full
collection walks every member stored since serving started (0.3 s with a million),
and serving makes next to no cyclic garbage (the young collections of a tracker
under a mixed text, STUN and registration load found none), so it runs only every
:data:`FULL_INTERVAL` seconds, for the cycles that outlive a young collection. What
exists when serving starts (modules, the loaded store) is frozen out of every walk.
"""

from __future__ import annotations

import gc

COLLECT_EVERY = 500  # registrations between two collections of the young generations
FULL_INTERVAL = 3600.0  # seconds between full collections


class ServingCollector:
    """The collection schedule of one serving process."""

    def __init__(self, every: int = COLLECT_EVERY, full_interval: float = FULL_INTERVAL) -> None:
        self.every = every
        self.full_interval = full_interval
        self.young = 0  # collections of the young and middle generations
        self.full = 0
        self.next_at = every  # the registration count that calls collect_young()
        self._full_at = float("inf")  # set by start()
        self._was_enabled: bool | None = None  # set by start()

    def start(self, now: float) -> None:
        """Collect and freeze what serving starts with; from here on, collect only
        when told to. ``now`` is a monotonic clock reading."""
        self._was_enabled = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()
        self._full_at = now + self.full_interval

    def collect_young(self, registrations: int) -> None:
        """Collect the young and middle generations; ``registrations`` is the count
        so far, from which the next call is due."""
        gc.collect(1)
        self.young += 1
        self.next_at = registrations + self.every

    def tick(self, registrations: int, now: float) -> None:
        """The housekeeping tick: the young generations, and a full collection when
        it is due."""
        if now >= self._full_at:
            gc.collect()
            self.full += 1
            self._full_at = now + self.full_interval
            self.next_at = registrations + self.every
        else:
            self.collect_young(registrations)

    def stop(self) -> None:
        """Give the process its collector back as it was."""
        if self._was_enabled:
            gc.enable()


__all__ = ["COLLECT_EVERY", "FULL_INTERVAL", "ServingCollector"]
