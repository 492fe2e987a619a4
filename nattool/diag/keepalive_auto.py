"""`--keepalive auto` for `register` and `connect`: the interval from this network's
cached mapping lifetime, and, when none is cached, a measurement in the background.

The measurement is `probe --lifetime`'s (:func:`nattool.diag.probe.measure_lifetime`)
against the first IPv4 tracker (its STUN with RESPONSE-PORT), from sockets of its own, in
a daemon thread: the run goes on at the safe default meanwhile, and switches when the
bracket is known (the ladder stops at the first mapping gone, so a short lifetime is
known soon: a 12-s router at about 21 s). The result is cached like probe's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from nattool.errors import NattoolError
from nattool.net.lifetime_cache import CachedLifetime, LifetimeCache, auto_plan
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.connect_events import ConnectEvent, KeepaliveSet, Registered
from nattool.protocol.keepalive_rules import (
    FRESH_FOR,
    TRACKER_TTL,
    KeepalivePlan,
    KeepaliveSource,
    LifetimeBracket,
    auto_keepalive,
    given_keepalive,
)

if TYPE_CHECKING:
    from nattool.diag.connect import OnEvent, Retune

BACKGROUND_LIFETIME_MAX = 120.0  # s, the longest idle wait of a background measurement


def remember_measurement(life: dict[str, object], wall_now: float, cache: LifetimeCache) -> Optional[CachedLifetime]:
    """Cache a lifetime test's result (probe's ``lifetime`` object) for the network it
    was made on; None when there is nothing to keep (untested, not IPv4) or the cache
    could not be written."""
    local, at_least, below = life.get("local"), life.get("at_least_s"), life.get("below_s")
    if not life.get("tested") or not isinstance(local, str) or ":" in local:
        return None
    if not isinstance(at_least, (int, float)) or not (below is None or isinstance(below, (int, float))):
        return None
    gateway = life.get("gateway")
    entry = CachedLifetime(local, gateway if isinstance(gateway, str) else None,
                           LifetimeBracket(float(at_least), None if below is None else float(below)),
                           wall_now, str(life.get("server") or ""))
    return entry if cache.remember(entry) else None


class AutoKeepalive:
    """One run's `--keepalive auto`: ``plan`` now, and :meth:`measure` for a better one."""

    def __init__(self, trackers: Sequence[Endpoint], *, cache: Optional[LifetimeCache] = None,
                 tracker_ttl: float = TRACKER_TTL, background: bool = True) -> None:
        self.cache = cache if cache is not None else LifetimeCache()
        self.tracker_ttl = tracker_ttl
        self.plan = auto_plan(trackers, time.time(), cache=self.cache, tracker_ttl=tracker_ttl)
        age = self.plan.age
        stale = self.plan.lifetime is not None and not (age is not None and 0 <= age <= FRESH_FOR)
        self.background = (background and (self.plan.lifetime is None or stale)
                           and any(t.ip.version == 4 for t in trackers))
        self._answered: Optional[asyncio.Future[Endpoint]] = None
        if self.background:
            again = "; measuring it again" if stale else " yet: measuring it"
            self.plan = KeepalivePlan(self.plan.interval, self.plan.register_every, self.plan.source,
                                      self.plan.lifetime, age, f"{self.plan.reason}{again} in the background")

    @property
    def wants_measurement(self) -> bool:
        return self.background

    def tracker_answered(self, tracker: Endpoint) -> None:
        """A tracker answered a registration: the measurement may start (against the
        first IPv4 one). Nothing is sent to a tracker before it answered."""
        if tracker.ip.version != 4:
            return
        if self._answered is None:
            self._answered = asyncio.get_running_loop().create_future()
        if not self._answered.done():
            self._answered.set_result(tracker)

    async def measure(self, apply: Callable[[KeepalivePlan], None],
                      lifetime_max: float = BACKGROUND_LIFETIME_MAX) -> None:
        """Once a tracker answered (:meth:`tracker_answered`), measure this network's
        mapping lifetime against it in the background, cache it, and hand the plan it
        gives to ``apply``. Cancelling stops the measurement (within a
        second); a failed one leaves the default in place (its reason is kept)."""
        if not self.background:
            return
        # Imported here: a run with a cached lifetime never loads the probe.
        from nattool.diag.probe import ProbeTarget, measure_lifetime

        if self._answered is None:
            self._answered = asyncio.get_running_loop().create_future()
        server = await self._answered
        target = ProbeTarget(server.to_text(), server, "tracker")
        life = await _in_daemon_thread(lambda stop: measure_lifetime(target, lifetime_max, stop=stop))
        if not life.get("tested"):
            self.plan = KeepalivePlan(self.plan.interval, self.plan.register_every, KeepaliveSource.DEFAULT,
                                      reason=f"the mapping lifetime could not be measured: {life.get('reason')}")
            apply(self.plan)
            return
        entry = remember_measurement(life, time.time(), self.cache)
        at_least, below = life["at_least_s"], life["below_s"]
        assert isinstance(at_least, (int, float)) and (below is None or isinstance(below, (int, float)))
        bracket = entry.lifetime if entry is not None else LifetimeBracket(float(at_least), below)
        self.plan = auto_keepalive(bracket, 0.0, tracker_ttl=self.tracker_ttl)
        apply(self.plan)


class SessionKeepalive:
    """A `connect` session's keepalive: ``every`` seconds given, or (None) auto for a
    session with ``trackers`` (lifetimes cached in ``cache``)."""

    def __init__(self, every: Optional[float], trackers: Sequence[Endpoint], cache: Optional[LifetimeCache] = None) -> None:
        self.every = every
        self.auto = AutoKeepalive(trackers, cache=cache) if every is None else None
        self.plan = self.auto.plan if self.auto is not None else None

    @property
    def interval(self) -> float:
        """The keepalive interval to start with."""
        if self.auto is not None:
            return self.auto.plan.interval
        assert self.every is not None
        return self.every

    @property
    def retune(self) -> Optional[Retune]:
        """The background measurement to run alongside the session, if any."""
        return self.auto.measure if self.auto is not None and self.auto.wants_measurement else None

    def register_every(self, default: float) -> float:
        """The registration interval: auto's, or the session's ``default`` with a given one."""
        if self.plan is None:
            assert self.every is not None
            self.plan = given_keepalive(self.every, default)
        return self.plan.register_every

    def announcing(self, render: OnEvent) -> OnEvent:
        """``render``, plus the keepalive in force once a tracker answered (and the
        tracker handed to the background measurement)."""
        shown = False

        def emit(event: ConnectEvent) -> None:
            nonlocal shown
            render(event)
            if isinstance(event, Registered):
                if not shown and self.plan is not None:
                    render(KeepaliveSet(self.plan))
                shown = True
                if self.auto is not None:
                    self.auto.tracker_answered(event.tracker)

        return emit


async def _in_daemon_thread(work: Callable[[threading.Event], dict[str, object]]) -> dict[str, object]:
    """``work(stop)`` in a daemon thread (a measurement never holds up the exit); a
    cancelled wait sets ``stop``."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, object]] = loop.create_future()
    stop = threading.Event()

    def deliver(result: dict[str, object]) -> None:
        if not done.done():
            done.set_result(result)

    def run() -> None:
        try:
            result = work(stop)
        except (NattoolError, OSError) as exc:
            result = {"tested": False, "reason": str(exc)}
        try:
            loop.call_soon_threadsafe(deliver, result)
        except RuntimeError:
            pass  # the loop is gone: nobody waits any more

    threading.Thread(target=run, name="nattool-lifetime", daemon=True).start()
    try:
        return await done
    finally:
        stop.set()


__all__ = ["AutoKeepalive", "BACKGROUND_LIFETIME_MAX", "SessionKeepalive", "remember_measurement"]
