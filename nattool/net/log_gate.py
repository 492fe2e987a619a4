"""A gate for log lines that can come fast and alike (a store outage, a junk flood):
the first goes out at once, then at most one per interval, saying how many were
held back meanwhile. Time comes in as an argument."""

from __future__ import annotations

_NEVER = float("-inf")


class LogGate:
    __slots__ = ("interval", "_open_at", "_held")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._open_at = _NEVER  # monotonic time from which the next line goes out
        self._held = 0

    def admit(self, now: float) -> int | None:
        """None: hold this line back (it is counted). Otherwise log it, with the
        number held back since the last line that went out."""
        if now < self._open_at:
            self._held += 1
            return None
        held, self._held = self._held, 0
        self._open_at = now + self.interval
        return held

    @property
    def active(self) -> bool:
        """A line went out since the last :meth:`settle`."""
        return self._open_at != _NEVER

    def settle(self) -> int:
        """The lines held back since the last one that went out; the next goes out
        at once (the trouble is over: its next occurrence is news)."""
        held, self._held = self._held, 0
        self._open_at = _NEVER
        return held


__all__ = ["LogGate"]
