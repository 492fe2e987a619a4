"""Bounded coalescing of wake-ups: how long `nattool serve` waits before its next drain.

At tens of thousands of requests a second the cost of a request is set by wake-ups
(the kernel waking the process, the event loop's turn), not by parsing. A server
that, after answering what it read, waits a little before reading again answers the
next requests in one batch: interrupt moderation, as network cards and NAPI do it.
The wait comes after a drain, so the request that woke the server is never the one
that waits.

Pure: the shell passes the drains' times and counts and the measured lateness of its
sleeps; nothing here reads a clock or sleeps. The rules:

- never longer than the bound (``--coalesce-us``; 0 turns coalescing off);
- no wait when the arrival rate over the last drains would bring fewer than
  MIN_BATCH datagrams within the bound: idle, or a trickle, is answered at once;
- no wait when the drain just read TARGET_BATCH or more: the datagrams already come
  in batches (a backlog, or clients that wait for their answers), and a sleep would
  idle a busy server;
- no wait right after another socket's wait: one loop turn waits once;
- no wait when the loop has work due at once (``urgent``: a store's write, whose
  registrations are answered when it commits);
- otherwise wait as long as TARGET_BATCH datagrams take at that rate, at most the
  bound, less what the shell's sleeps overshoot.
"""

from __future__ import annotations

from typing import Hashable

HISTORY = 16  # drains the arrival rate is measured over
MIN_BATCH = 4.0  # datagrams a wait must be expected to gather to be worth a sleep
TARGET_BATCH = 32  # datagrams per drain at which wake-ups no longer matter
LATENESS_WEIGHT = 1 / 16  # of each new sample in the sleeps' average lateness
# A sleep shorter than this is not worth its wake-up, nor can it end on time.
MIN_SLEEP = 5e-6


class Coalescer:
    """The wait after each drain, from the last HISTORY drains of one server."""

    __slots__ = ("bound", "_times", "_counts", "_at", "_sum", "_filled", "lateness", "_waiter", "_waited_until", "_expected", "waits", "waited")

    def __init__(self, bound: float) -> None:
        if bound < 0:
            raise ValueError("bound must be >= 0")
        self.bound = bound  # seconds
        self._times = [0.0] * HISTORY  # a ring: when each drain began
        self._counts = [0] * HISTORY  # and how many datagrams it read
        self._at = 0  # the ring slot the next drain goes into
        self._sum = 0  # the counts in the ring
        self._filled = 0  # slots written so far (at most HISTORY)
        self.lateness = 0.0  # seconds the shell's sleeps overshoot, on average
        self._waiter: Hashable = None  # the socket whose drain last waited
        self._waited_until = float("-inf")
        self._expected = 0.0  # datagrams the wait just decided should gather
        self.waits = 0  # waits decided so far
        self.waited = 0.0  # seconds the shell slept, in all

    def after_drain(self, count: int | None, now: float, source: Hashable = None, urgent: bool = False) -> float:
        """Seconds to sleep now, after a drain of ``source`` that began at ``now`` and
        read ``count`` datagrams (0: do not sleep). A drain that does not count
        (None) is taken to have read the one datagram that woke it and what the last
        wait was expected to gather. ``urgent``: the loop has work due at once."""
        if count is None:
            count = 1 + int(self._expected)
        at = self._at
        times, counts = self._times, self._counts
        self._sum += count - counts[at]
        times[at] = now
        counts[at] = count
        at = self._at = (at + 1) % HISTORY
        if self._filled < HISTORY:
            self._filled += 1
            at = 0  # the oldest drain is still in the first slot
        bound = self.bound
        self._expected = 0.0
        if count >= TARGET_BATCH or bound <= 0 or urgent or self._filled < 2:
            return 0.0
        if source != self._waiter and now - self._waited_until < bound:
            return 0.0
        span = now - times[at]
        if span <= 0:
            return 0.0
        # The oldest drain's datagrams arrived before the span began.
        rate = (self._sum - counts[at]) / span
        if rate * bound < MIN_BATCH:
            return 0.0
        wait = TARGET_BATCH / rate
        if wait > bound:
            wait = bound
        asked = wait - self.lateness
        if asked < MIN_SLEEP:
            return 0.0
        self._waiter = source
        self._expected = rate * wait
        self.waits += 1
        return asked

    def slept(self, asked: float, took: float, end: float) -> None:
        """The shell asked to sleep ``asked`` seconds, slept ``took``, woke at ``end``."""
        self._waited_until = end
        self.waited += took
        late = took - asked
        late = 0.0 if late < 0 else min(late, self.bound)  # a preemption is no timer's lateness
        self.lateness += (late - self.lateness) * LATENESS_WEIGHT
