"""Birthday punching and port prediction for `connect` (pure).

A NAT with endpoint-dependent mapping and random ports (Linux ``masquerade random``)
gives a member a fresh public port for every destination, so the port the trackers saw
says nothing about the port toward us; and a peer whose NAT filters by port drops
whatever that member sends first. The birthday technique makes the two meet anyway:

* the *hard* side (our mapping endpoint-dependent, the member's independent) opens
  :data:`HARD_SOCKETS` extra sockets and pings the member's public endpoint from each:
  its NAT now holds that many mappings toward the member, at random ports;
* the *easy* side (ours independent, the member's dependent) pings random ports of the
  member's public IP from its one socket, each port once. A ping that lands on one of
  the hard side's mappings passes its NAT (a reply to a mapping it holds) and opens our
  own filter for the answer; the hard side answers from that socket and the path lives
  there.

With ``k`` of the ``N`` = 64,512 ports (1024..65535, masquerade's range) open, ``n``
distinct probes miss every time with probability ``C(N-k, n) / C(N, n)``, at most
``(1 - k/N)**n`` (:func:`hit_probability`). Pings are paced by one :class:`Pacer` per
session (a rate cap and a total budget): every probe leaves a conntrack entry in both
NATs for the UDP timeout, and small routers have small tables.

Where the trackers saw the member's (or our) ports close together, the NAT allocates
sequentially (or keeps the local port, then counts up): the next ports are predicted
(:func:`port_pattern`, :func:`predicted_ports`) and probed first; if that does not open
a path within :data:`PREDICT_GRACE` s both sides go on with the birthday technique,
each deciding alone from the same data.

No randomness here: the order of the probed ports is a keyed permutation of the port
range (a small Feistel network over BLAKE2b), keyed by secret bytes from the caller.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, Sequence

from nattool.errors import UsageError
from nattool.protocol.connect_events import PathMethod
from nattool.protocol.connect_options import BIRTHDAY_BUDGET, BIRTHDAY_RATE
from nattool.protocol.connect_rules import ED, EI
from nattool.protocol.endpoint import Endpoint

HARD_SOCKETS = 256  # extra sockets the endpoint-dependent side opens
PORT_FIRST, PORT_LAST = 1024, 65535  # the ports a NAT picks from (Linux: 1024..65535 for an unprivileged source)
PORT_SPACE = PORT_LAST - PORT_FIRST + 1  # 64,512
DEFAULT_RATE = BIRTHDAY_RATE  # probes per second (both sides, every ping of the technique counted)
#: Probes in all: a hit with probability 1 - 3e-4 (1 - (1 - 256/64512)**2048), spent in
#: 20.5 s at the default rate, which leaves room within a 30 s window for the
#: registrations and the hard side's 2.6 s of opening its sockets.
DEFAULT_BUDGET = BIRTHDAY_BUDGET
MAX_RATE = 10000.0
MAX_BUDGET = 100000
BIRTHDAY_AFTER = 1.0  # s plain punching gets first (where it works it opens in one round trip)
REFRESH_EVERY = 15.0  # s between the hard side's rounds (an unanswered UDP mapping lives 30 s in Linux)
BURST = 0.05  # s of the rate that may go out at once (a late timer does not make a flood)
SEQUENTIAL_SPREAD = 32  # ports: the trackers' ports this close together mean a counting NAT
PREDICT_WINDOW = 64  # predicted ports above the highest one seen
PREDICT_GRACE = 3.0  # s prediction has before the hard side opens its sockets after all
PREDICT_CYCLE = 1.0  # s between passes over the predicted ports (the mapping may not be there yet)


class Role(str, Enum):
    """Our part in the technique (the JSON ``role`` field)."""

    OPEN_PORTS = "open-ports"  # our mapping is endpoint-dependent: many sockets ping the member
    PROBE = "probe"  # the member's is: ping its ports from our one socket


class PortPattern(str, Enum):
    """How the endpoint-dependent NAT picks its ports, from what the trackers saw."""

    RANDOM = "random"
    SEQUENTIAL = "sequential"
    PRESERVING = "port-preserving"  # the local port first, then counting up


@dataclass(frozen=True, slots=True)
class Plan:
    role: Role
    method: PathMethod  # BIRTHDAY or PREDICT
    pattern: PortPattern
    reason: str
    predicted: tuple[int, ...] = ()  # PREDICT, probe role: the ports to try first


def check_limits(rate: float, budget: int) -> None:
    """UsageError unless the rate and the budget are usable (budget 0: technique off)."""
    if not (0 < rate <= MAX_RATE) or math.isnan(rate):
        raise UsageError(f"birthday rate must be in (0, {MAX_RATE:g}] probes/s")
    if not 0 <= budget <= MAX_BUDGET:
        raise UsageError(f"birthday budget must be in 0..{MAX_BUDGET} probes (0: off)")


def hit_probability(probes: int, open_ports: int = HARD_SOCKETS, space: int = PORT_SPACE) -> float:
    """The chance that ``probes`` distinct random ports hit one of ``open_ports`` random
    ports of ``space`` (1 - C(space-open, probes) / C(space, probes))."""
    probes = max(0, min(probes, space))
    if probes > space - open_ports:
        return 1.0
    miss = 1.0
    for i in range(probes):
        miss *= (space - open_ports - i) / (space - i)
    return 1.0 - miss


def probes_for(probability: float, open_ports: int = HARD_SOCKETS, space: int = PORT_SPACE) -> int:
    """The fewest distinct probes that hit with at least ``probability``."""
    miss, n = 1.0, 0
    while 1.0 - miss < probability and n < space:
        miss *= (space - open_ports - n) / (space - n)
        n += 1
    return n


def port_pattern(seen: Sequence[int], local_port: Optional[int] = None) -> PortPattern:
    """Sequential when every port the trackers saw lies within SEQUENTIAL_SPREAD (a NAT
    counting up), port-preserving when one of them is also the local port (known for
    our own side only); random otherwise."""
    ports = set(seen)
    if len(ports) < 2 or max(ports) - min(ports) > SEQUENTIAL_SPREAD:
        return PortPattern.RANDOM
    if local_port is not None and local_port in ports:
        return PortPattern.PRESERVING
    return PortPattern.SEQUENTIAL


def predicted_ports(seen: Sequence[int], window: int = PREDICT_WINDOW) -> tuple[int, ...]:
    """The ports a counting NAT gives next: up from the highest one seen, nearest first."""
    top = max(seen)
    return tuple(p for p in range(top + 1, top + 1 + window) if PORT_FIRST <= p <= PORT_LAST)


def plan(mine: Optional[str], theirs: Optional[str], own_ports: Sequence[int], local_port: Optional[int],
         member_ports: Sequence[int]) -> Optional[Plan]:
    """Our part against one member, from the mappings (``connect_rules.EI`` / ``ED``)
    and the ports the trackers saw; None where the technique has nothing to do (both
    sides alike, or a side unknown). Both sides reach the same conclusion alone."""
    if mine == ED and theirs == EI:
        role, pattern = Role.OPEN_PORTS, port_pattern(own_ports, local_port)
        whose, ports = "our", own_ports
    elif mine == EI and theirs == ED:
        role, pattern = Role.PROBE, port_pattern(member_ports)
        whose, ports = "the member's", member_ports
    else:
        return None
    seen = ", ".join(str(p) for p in sorted(set(ports)))
    if pattern is PortPattern.RANDOM:
        return Plan(role, PathMethod.BIRTHDAY, pattern,
                    f"{whose} NAT maps per destination at random ports (trackers saw {seen}): birthday punching")
    predicted = predicted_ports(ports) if role is Role.PROBE else ()
    how = "keeps the local port, then counts up" if pattern is PortPattern.PRESERVING else "counts up"
    return Plan(role, PathMethod.PREDICT, pattern,
                f"{whose} NAT maps per destination but {how} (trackers saw {seen}): predicting the next ports",
                predicted)


class Pacer:
    """A token bucket: at most ``rate`` probes a second (BURST s worth at once), and
    ``budget`` in all."""

    def __init__(self, rate: float, budget: int, now: float) -> None:
        self.rate = rate
        self.budget = budget
        self.capacity = max(1.0, rate * BURST)
        self.tokens = 1.0
        self.last = now
        self.spent = 0

    def take(self, now: float, want: int) -> int:
        """How many of ``want`` probes may go now (and count them)."""
        if now > self.last:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
        # The epsilon: a token refilled to 0.9999999 by float rounding is a token, else
        # next_at() would name a moment at which nothing may go (a spinning timer).
        granted = max(0, min(want, int(self.tokens + 1e-9), self.budget - self.spent))
        self.tokens -= granted
        self.spent += granted
        return granted

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.budget

    def next_at(self) -> Optional[float]:
        """When the next probe may go; None once the budget is spent."""
        if self.exhausted:
            return None
        return self.last + max(0.0, 1.0 - self.tokens) / self.rate


class PortOrder:
    """The ports of PORT_FIRST..PORT_LAST in a secret random order, each once: ``first``
    (predicted ports) before the rest. A keyed Feistel permutation of 16 bits, walked
    until it lands in the range (cycle walking keeps it a permutation)."""

    ROUNDS = 4

    def __init__(self, seed: bytes, first: Sequence[int] = (), skip: Sequence[int] = ()) -> None:
        self.key = hashlib.blake2b(seed, digest_size=32).digest()
        self.first = [p for p in dict.fromkeys(first) if PORT_FIRST <= p <= PORT_LAST]
        self.skip = set(self.first) | set(skip)
        self.index = 0  # next index into the permutation
        self.taken = 0

    def _feistel(self, x: int) -> int:
        left, right = x >> 8, x & 0xFF
        for r in range(self.ROUNDS):
            f = hashlib.blake2b(bytes((r, right)), key=self.key, digest_size=1).digest()[0]
            left, right = right, left ^ f
        return (left << 8) | right

    def permuted(self, i: int) -> int:
        """The i-th port of the permutation (0 <= i < PORT_SPACE)."""
        x = self._feistel(i)
        while x >= PORT_SPACE:
            x = self._feistel(x)
        return PORT_FIRST + x

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n and self.taken < len(self.first):
            out.append(self.first[self.taken])
            self.taken += 1
        while len(out) < n and self.index < PORT_SPACE:
            port = self.permuted(self.index)
            self.index += 1
            if port not in self.skip:
                out.append(port)
                self.taken += 1
        return out

    @property
    def exhausted(self) -> bool:
        return self.taken >= len(self.first) and self.index >= PORT_SPACE


@dataclass
class BirthdayRun:
    """One side's attempt toward one member: what to send, from which socket, when.
    Socket 0 is the session's own socket; 1..``sockets`` the extra ones (hard side)."""

    plan: Plan
    target: Endpoint  # probe role: the member's IP (port 0); open role: its public endpoint
    member: Endpoint
    start: float
    seed: bytes
    sockets: int = HARD_SOCKETS
    sent: int = 0
    ended: bool = False
    opened: bool = False  # it ended with a direct path up
    lost_at: Optional[float] = None  # when no direct path was up any more, after it opened one
    probed: set[int] = field(default_factory=set)  # probe role: ports pinged so far
    cursor: int = 0  # open role: the next socket of the round
    round_at: float = 0.0  # open role: when the current round may start
    cycle_at: float = 0.0  # probe role, predicting: when the next pass over the predicted ports starts
    pcursor: int = 0  # ... and the next predicted port of the pass
    last_send: float = 0.0
    order: Optional[PortOrder] = None

    def __post_init__(self) -> None:
        if self.plan.role is Role.PROBE:
            # The predicted ports have their passes first; the random order skips them.
            self.order = PortOrder(self.seed + self.target.to_text().encode("ascii"), skip=self.plan.predicted)
            self.cycle_at = self.start
        else:
            self.round_at = self.opens_at

    @property
    def predicting_until(self) -> float:
        """Probe role: the end of the passes over the predicted ports (start: none)."""
        return self.start + PREDICT_GRACE if self.plan.predicted else self.start

    @property
    def opens_at(self) -> float:
        """Open role: when the extra sockets are wanted (prediction gets its grace first)."""
        return self.start + (PREDICT_GRACE if self.plan.method is PathMethod.PREDICT else 0.0)

    def sockets_wanted(self, now: float) -> int:
        if self.ended or self.plan.role is not Role.OPEN_PORTS or now < self.opens_at:
            return 0
        return self.sockets

    def next_at(self) -> Optional[float]:
        """When it next has something to send (pacing aside); None: nothing, ever."""
        if self.ended:
            return None
        if self.plan.role is Role.PROBE:
            assert self.order is not None
            if self.cycle_at < self.predicting_until:
                return self.cycle_at
            return None if self.order.exhausted else self.predicting_until
        return self.round_at

    def due(self, now: float) -> int:
        """How many pings it would send now, were the pacer to allow them all."""
        if self.ended or now < self.start:
            return 0
        if self.plan.role is Role.PROBE:
            assert self.order is not None
            if now < self.predicting_until:
                return len(self.plan.predicted) - self.pcursor if now >= self.cycle_at else 0
            return 0 if self.order.exhausted else PORT_SPACE
        return self.sockets - self.cursor if now >= self.round_at else 0

    def sends(self, now: float, allowed: int) -> list[tuple[int, Endpoint]]:
        """Up to ``allowed`` pings due now: (socket index, destination)."""
        if self.ended or allowed <= 0 or now < self.start:
            return []
        out: list[tuple[int, Endpoint]] = []
        if self.plan.role is Role.PROBE:
            assert self.order is not None
            if now < self.predicting_until:
                if now < self.cycle_at:
                    return []
                ports = list(self.plan.predicted[self.pcursor:self.pcursor + allowed])
                self.pcursor += len(ports)
                if self.pcursor >= len(self.plan.predicted):
                    self.pcursor = 0
                    self.cycle_at = max(now, self.cycle_at + PREDICT_CYCLE)
            else:
                ports = self.order.take(allowed)
            for port in ports:
                self.probed.add(port)
                out.append((0, Endpoint(self.target.ip, port)))
        elif now >= self.round_at:
            while len(out) < allowed and self.cursor < self.sockets:
                self.cursor += 1
                out.append((self.cursor, self.target))
            if self.cursor >= self.sockets:
                self.cursor = 0
                self.round_at = max(now, self.round_at + REFRESH_EVERY)
        self.sent += len(out)
        if out:
            self.last_send = now
        return out

    def method_of(self, dest: Endpoint, via_extra: bool) -> Optional[PathMethod]:
        """The method of a path to ``dest`` that just opened, if this run opened it."""
        if self.plan.role is Role.PROBE:
            if dest.ip != self.target.ip:
                return None
            if dest.port in self.probed:
                return PathMethod.PREDICT if dest.port in self.plan.predicted else PathMethod.BIRTHDAY
            # Another port of the member's IP opening while the run goes on (a port the
            # trackers listed, say) is one of the mappings the run made the member open:
            # masquerade random may well give a port twice, for different destinations.
            return None if self.ended else self.plan.method
        if dest != self.target:
            return None
        if via_extra:
            return PathMethod.BIRTHDAY
        return PathMethod.PREDICT if self.plan.method is PathMethod.PREDICT else None


__all__ = [
    "BIRTHDAY_AFTER",
    "DEFAULT_BUDGET",
    "DEFAULT_RATE",
    "HARD_SOCKETS",
    "PORT_SPACE",
    "PREDICT_GRACE",
    "BirthdayRun",
    "Pacer",
    "Plan",
    "PortOrder",
    "PortPattern",
    "Role",
    "check_limits",
    "hit_probability",
    "plan",
    "port_pattern",
    "predicted_ports",
    "probes_for",
]
