"""How often to keep a NAT mapping alive (pure): `--keepalive auto`.

From the mapping lifetime measured on this network (`probe --lifetime`, cached per local
address and gateway), its age, the tracker's TTL and a safe default, the interval between
keepalives on a path and between registrations at the trackers.

Why these numbers:

* The safe default, 20 s, is used until the lifetime is measured. RFC 4787 REQ-5 says a
  UDP mapping must not expire in less than 2 minutes, but many routers expire it much
  sooner: Linux conntrack forgets an unanswered-or-young UDP flow after 30 s
  (nf_conntrack_udp_timeout), Tailscale assumes 30 s, and WireGuard advises a persistent
  keepalive of 25 s for the same reason. 20 s stays under a 30-s timeout with a third to
  spare (scheduling delay, a slow answer) and is what nattool always did, so an
  unmeasured network behaves as before.
* A bracket without an upper end (alive at the longest wait tried) never goes below
  the default: nothing was seen to expire.
* The margin, one half: a bracket only says the mapping survived ``at_least`` seconds
  idle (and died before ``below``); its real lifetime may be anywhere in between, so the
  interval is taken from the lower end, and halved so that one lost keepalive (UDP) still
  leaves the mapping alive: two intervals fit in the proven lifetime.
* At most 60 s even when the mapping outlives every wait tried: a path's liveness is
  judged from its keepalives (down after three missed), so longer would leave a dead
  path unnoticed for minutes; at least 1 s, whatever the measurement says.
* Registrations also refresh the tracker's soft state: at most a quarter of its TTL
  (120 s by default, docs/PROTOCOL.md), so three registrations in a row may be lost.
* A measurement older than ``FRESH_FOR`` (or of unknown age) may describe another router
  behind the same addresses: it is trusted only to make the interval shorter than the
  default, never longer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

SAFE_DEFAULT = 20.0  # s, until the lifetime is measured
MARGIN = 0.5  # interval = MARGIN x the proven lifetime
MIN_INTERVAL = 1.0  # s
MAX_INTERVAL = 60.0  # s
TRACKER_TTL = 120.0  # s, the tracker's default --ttl (a client cannot ask it)
TTL_SHARE = 4  # registrations per tracker TTL, at least
FRESH_FOR = 7 * 86400.0  # s a measurement may lengthen the interval


class KeepaliveSource(str, Enum):
    """Where an interval came from (the JSON ``source`` field)."""

    MEASURED = "measured"  # from the lifetime measured on this network
    DEFAULT = "default"  # nothing (usable) measured: the safe default
    GIVEN = "given"  # --keepalive SECONDS


@dataclass(frozen=True, slots=True)
class LifetimeBracket:
    """A measured mapping lifetime: alive after ``at_least`` s idle, gone after ``below``
    s (None: still alive at the longest wait tried)."""

    at_least: float
    below: Optional[float] = None

    def to_text(self) -> str:
        if self.below is None:
            return f">= {self.at_least:g} s"
        return f"{self.at_least:g}..{self.below:g} s"


@dataclass(frozen=True, slots=True)
class KeepalivePlan:
    interval: float  # s between keepalives on a path
    register_every: float  # s between registrations at the trackers
    source: KeepaliveSource
    lifetime: Optional[LifetimeBracket] = None  # the measurement considered, if any
    age: Optional[float] = None  # s since it was made (None: unknown)
    reason: str = ""  # one line for people

    def to_json(self) -> dict[str, object]:
        return {
            "interval_s": round(self.interval, 3),
            "register_every_s": round(self.register_every, 3),
            "source": self.source.value,
            "lifetime": None
            if self.lifetime is None
            else {"at_least_s": self.lifetime.at_least, "below_s": self.lifetime.below},
            "age_s": None if self.age is None else round(self.age, 1),
            "reason": self.reason,
        }


def describe_age(age: Optional[float]) -> str:
    """``age`` seconds as people say it: "40 s", "3 min", "2 h", "5 days"."""
    if age is None or age < 0:
        return "an unknown time"
    if age < 120:
        return f"{age:.0f} s"
    if age < 7200:
        return f"{age / 60:.0f} min"
    if age < 2 * 86400:
        return f"{age / 3600:.0f} h"
    return f"{age / 86400:.0f} days"


def registration_interval(interval: float, tracker_ttl: float = TRACKER_TTL) -> float:
    """Registrations keep the tracker's mapping and its soft state: the keepalive
    interval, but at most a ``TTL_SHARE``-th of the TTL."""
    return min(interval, tracker_ttl / TTL_SHARE)


def auto_keepalive(
    lifetime: Optional[LifetimeBracket],
    age: Optional[float],
    *,
    tracker_ttl: float = TRACKER_TTL,
    default: float = SAFE_DEFAULT,
) -> KeepalivePlan:
    """The interval for `--keepalive auto` (see the module's docstring for the why)."""
    if lifetime is None:
        interval = min(default, MAX_INTERVAL)
        return KeepalivePlan(interval, registration_interval(interval, tracker_ttl), KeepaliveSource.DEFAULT,
                             reason="no mapping lifetime measured on this network")
    measured = min(max(lifetime.at_least * MARGIN, MIN_INTERVAL), MAX_INTERVAL)
    fresh = age is not None and 0 <= age <= FRESH_FOR
    when = f"measured {describe_age(age)} ago"
    if lifetime.below is None and measured <= default:
        # No expiry seen, but the waits tried were short: nothing speaks against the default.
        return KeepalivePlan(default, registration_interval(default, tracker_ttl), KeepaliveSource.DEFAULT,
                             lifetime, age, f"mapping lifetime {lifetime.to_text()} {when}: no expiry seen, "
                             "no reason to go below the default")
    if not fresh and measured >= default:
        return KeepalivePlan(default, registration_interval(default, tracker_ttl), KeepaliveSource.DEFAULT,
                             lifetime, age, f"mapping lifetime {lifetime.to_text()} {when}: too old to lengthen the interval")
    reason = f"mapping lifetime {lifetime.to_text()} {when}"
    if lifetime.at_least * MARGIN < MIN_INTERVAL:
        reason += f" (at least {MIN_INTERVAL:g} s between keepalives)"
    elif lifetime.at_least * MARGIN > MAX_INTERVAL:
        reason += f" (at most {MAX_INTERVAL:g} s between keepalives)"
    return KeepalivePlan(measured, registration_interval(measured, tracker_ttl), KeepaliveSource.MEASURED,
                         lifetime, age, reason)


def given_keepalive(seconds: float, register_every: float) -> KeepalivePlan:
    """``--keepalive SECONDS``: the user's interval, as it is."""
    return KeepalivePlan(seconds, register_every, KeepaliveSource.GIVEN, reason="--keepalive given")


__all__ = [
    "FRESH_FOR",
    "KeepalivePlan",
    "KeepaliveSource",
    "LifetimeBracket",
    "MARGIN",
    "MAX_INTERVAL",
    "MIN_INTERVAL",
    "SAFE_DEFAULT",
    "TRACKER_TTL",
    "auto_keepalive",
    "describe_age",
    "given_keepalive",
    "registration_interval",
]
