"""Birthday punching and port prediction (nattool.protocol.birthday): the arithmetic,
the pacing, the order of the probed ports, the prediction, the roles; then two whole
`connect` sessions through simulated NATs (a per-destination one, random, sequential or
port-preserving, against an endpoint-independent one that filters by port) and two
trackers, with a fake clock. The real NATs are in tests/test_connect_birthday_lab.py."""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.errors import UsageError
from nattool.protocol import connect_events as ev
from nattool.protocol.birthday import (
    BIRTHDAY_AFTER,
    DEFAULT_BUDGET,
    DEFAULT_RATE,
    HARD_SOCKETS,
    PORT_FIRST,
    PORT_LAST,
    PORT_SPACE,
    PREDICT_CYCLE,
    PREDICT_GRACE,
    PREDICT_WINDOW,
    REFRESH_EVERY,
    BirthdayRun,
    Pacer,
    PortOrder,
    PortPattern,
    Role,
    check_limits,
    hit_probability,
    plan,
    port_pattern,
    predicted_ports,
    probes_for,
)
from nattool.protocol.connect_options import RelayMode
from nattool.protocol.connect_rules import ED, EI
from nattool.protocol.connect_session import ConnectSession, SessionConfig
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.punch import Kind, PeerMessage, derive_key
from nattool.protocol.text import MemberEntry, MemberList, RegisterRequest, parse_request


def ep(text: str) -> Endpoint:
    return Endpoint.from_text(text)


# --------------------------------------------------------------------------- the arithmetic


def test_the_numbers_of_the_technique() -> None:
    """Tailscale's figures for 256 open ports: 50% after about 174 probes, 98% at 1024,
    99.9% at 2048; and the default budget is a 99.9% hit spent well within 30 s."""
    assert probes_for(0.5) in (174, 175)
    assert hit_probability(1024) >= 0.98
    assert hit_probability(2048) >= 0.999
    assert DEFAULT_BUDGET == 2048 and DEFAULT_RATE == 100.0
    hard_side_opening = HARD_SOCKETS / DEFAULT_RATE
    assert BIRTHDAY_AFTER + hard_side_opening + DEFAULT_BUDGET / DEFAULT_RATE < 25.0  # leaves the registrations room
    assert hit_probability(0) == 0.0 and hit_probability(PORT_SPACE) == 1.0


@given(st.integers(0, 6000), st.integers(1, 1024))
def test_probing_without_repeats_beats_probing_with_them(n: int, k: int) -> None:
    with_repeats = 1 - (1 - k / PORT_SPACE) ** n
    assert hit_probability(n, k) >= with_repeats - 1e-12
    assert hit_probability(n + 1, k) >= hit_probability(n, k)


@settings(max_examples=50)
@given(st.floats(0.01, 0.9999))
def test_probes_for_is_the_fewest_that_reach_the_probability(p: float) -> None:
    n = probes_for(p)
    assert hit_probability(n) >= p
    assert n == 0 or hit_probability(n - 1) < p


def test_limits_are_checked() -> None:
    check_limits(100.0, 0)
    for rate, budget in ((0.0, 10), (-1.0, 10), (float("nan"), 10), (1e9, 10), (100.0, -1), (100.0, 10**7)):
        with pytest.raises(UsageError):
            check_limits(rate, budget)


# --------------------------------------------------------------------------- pacing


@settings(max_examples=200, deadline=None)
@given(st.floats(1.0, 500.0), st.integers(0, 300),
       st.lists(st.tuples(st.floats(0.0, 0.2), st.integers(0, 50)), max_size=200))
def test_the_pacer_never_exceeds_its_rate_nor_its_budget(rate: float, budget: int,
                                                          steps: list[tuple[float, int]]) -> None:
    pacer = Pacer(rate, budget, 0.0)
    now, granted = 0.0, []
    for dt, want in steps:
        now += dt
        got = pacer.take(now, want)
        assert 0 <= got <= want
        granted.append((now, got))
    assert sum(g for _, g in granted) == pacer.spent <= budget
    # Over any window, at most the bucket (the first token, or BURST s of the rate) plus the rate.
    for i in range(len(granted)):
        total = 0
        for j in range(i, len(granted)):
            total += granted[j][1]
            assert total <= pacer.capacity + rate * (granted[j][0] - granted[i][0]) + 1e-6


def test_the_pacer_keeps_up_its_rate_and_says_when_the_next_probe_may_go() -> None:
    pacer = Pacer(100.0, 10_000, 0.0)
    sent, now, wakeups = 0, 0.0, 0
    while now < 10.0:
        sent += pacer.take(now, 1000)
        at = pacer.next_at()
        assert at is not None and at > now
        assert pacer.take(at - 1e-4, 1) == 0 or at - 1e-4 <= now  # nothing before it says
        now = at
        wakeups += 1
    assert 995 <= sent <= 1006
    assert wakeups <= 1010  # one wake-up per probe at most: no spinning
    spent = Pacer(100.0, 3, 0.0)
    assert spent.take(0.0, 10) == 1 and spent.take(1.0, 10) == 2 and spent.exhausted and spent.next_at() is None


# --------------------------------------------------------------------------- the ports


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=32), st.lists(st.integers(0, 70000), max_size=20),
       st.lists(st.integers(1, 400), min_size=1, max_size=20))
def test_probed_ports_never_repeat_and_predicted_ones_come_first(seed: bytes, first: list[int],
                                                                 chunks: list[int]) -> None:
    order = PortOrder(seed, first)
    got: list[int] = []
    for n in chunks:
        got += order.take(n)
    assert len(got) == len(set(got))
    assert all(PORT_FIRST <= p <= PORT_LAST for p in got)
    expected_first = [p for p in dict.fromkeys(first) if PORT_FIRST <= p <= PORT_LAST]
    assert got[: len(expected_first)] == expected_first[: len(got)]


def test_the_order_is_a_permutation_of_the_whole_range_and_depends_on_the_seed() -> None:
    order = PortOrder(b"seed one", [40000, 40001])
    every = order.take(PORT_SPACE + 10)
    assert sorted(every) == list(range(PORT_FIRST, PORT_LAST + 1)) and order.exhausted
    assert order.take(5) == []
    again, other = PortOrder(b"seed one").take(50), PortOrder(b"seed two").take(50)
    assert again == PortOrder(b"seed one").take(50) and again != other
    # Spread over the range, not counting up from somewhere.
    sample = PortOrder(b"spread").take(1000)
    assert min(sample) < PORT_FIRST + 2000 and max(sample) > PORT_LAST - 2000
    assert sum(1 for a, b in zip(sample, sample[1:]) if abs(a - b) == 1) < 10


# --------------------------------------------------------------------------- prediction and roles


def test_port_patterns_from_what_the_trackers_saw() -> None:
    assert port_pattern([40000, 51234]) is PortPattern.RANDOM
    assert port_pattern([40001, 40000]) is PortPattern.SEQUENTIAL
    assert port_pattern([43284, 43285], local_port=43284) is PortPattern.PRESERVING
    assert port_pattern([43284, 43285]) is PortPattern.SEQUENTIAL  # the member's local port is not known
    assert port_pattern([40000]) is PortPattern.RANDOM  # one view says nothing
    assert predicted_ports([40000, 40003]) == tuple(range(40004, 40004 + PREDICT_WINDOW))
    assert predicted_ports([65530, 65533]) == (65534, 65535)


def test_roles_from_the_two_mappings() -> None:
    random_ports, counting = [40000, 51234], [40000, 40001]
    hard = plan(ED, EI, random_ports, 43284, [43284])
    easy = plan(EI, ED, [43284], 43284, random_ports)
    assert hard is not None and easy is not None
    assert (hard.role, hard.method, easy.role, easy.method) == (
        Role.OPEN_PORTS, ev.PathMethod.BIRTHDAY, Role.PROBE, ev.PathMethod.BIRTHDAY)
    assert "51234" in easy.reason and "birthday" in easy.reason
    predicting = plan(EI, ED, [43284], 43284, counting)
    assert predicting is not None and predicting.method is ev.PathMethod.PREDICT
    assert predicting.predicted[:2] == (40002, 40003) and "counts up" in predicting.reason
    preserving = plan(ED, EI, [43284, 43285], 43284, [43284])
    assert preserving is not None and preserving.pattern is PortPattern.PRESERVING
    assert "keeps the local port" in preserving.reason and preserving.predicted == ()
    for mine, theirs in ((EI, EI), (ED, ED), (None, ED), (ED, None), (None, None)):
        assert plan(mine, theirs, random_ports, 43284, random_ports) is None


def test_the_hard_side_pings_from_every_socket_then_again_every_refresh() -> None:
    target = ep("198.51.100.2:43284")
    found = plan(ED, EI, [40000, 51234], 43284, [43284])
    assert found is not None
    run = BirthdayRun(found, target, target, 5.0, b"k")
    assert run.sockets_wanted(5.0) == HARD_SOCKETS
    first = run.sends(5.0, 100) + run.sends(6.0, 1000)
    assert [via for via, _ in first] == list(range(1, HARD_SOCKETS + 1))
    assert {dest for _, dest in first} == {target}
    assert run.due(7.0) == 0
    at = run.next_at()
    assert at is not None and at >= 6.0 + REFRESH_EVERY - 1.0
    assert run.sends(at - 0.5, 10) == [] and len(run.sends(at, 10)) == 10
    assert run.method_of(target, via_extra=True) is ev.PathMethod.BIRTHDAY
    assert run.method_of(target, via_extra=False) is None  # plain punching from the main socket
    predicting = plan(ED, EI, [40000, 40001], 43284, [43284])
    assert predicting is not None
    waits = BirthdayRun(predicting, target, target, 5.0, b"k")
    assert waits.sockets_wanted(5.0 + PREDICT_GRACE - 0.1) == 0 and waits.sends(6.0, 10) == []
    assert waits.sockets_wanted(5.0 + PREDICT_GRACE) == HARD_SOCKETS
    assert waits.method_of(target, via_extra=False) is ev.PathMethod.PREDICT


def test_the_easy_side_passes_over_the_predicted_ports_then_probes_at_random() -> None:
    found = plan(EI, ED, [43284], 43284, [40000, 40001])
    assert found is not None
    ip = ep("198.51.100.1:1").ip
    run = BirthdayRun(found, Endpoint(ip, 0), Endpoint(ip, 40000), 0.0, b"k")
    first = run.sends(0.0, PREDICT_WINDOW + 5)
    assert [d.port for _, d in first] == list(found.predicted)  # one pass, then the next one waits
    assert all(via == 0 and d.ip == ip for via, d in first)
    assert run.due(0.5) == 0 and run.next_at() == pytest.approx(PREDICT_CYCLE)
    second = run.sends(PREDICT_CYCLE, 1000)
    assert [d.port for _, d in second] == list(found.predicted)  # the mapping may have come since
    at = run.next_at()
    assert at is not None
    while at < PREDICT_GRACE:
        run.sends(at, 1000)
        at = run.next_at()
        assert at is not None
    assert at == pytest.approx(PREDICT_GRACE)
    randoms = run.sends(at, 50)
    assert len(randoms) == 50 and not {d.port for _, d in randoms} & set(found.predicted)
    assert run.method_of(ep("198.51.100.1:40002"), False) is ev.PathMethod.PREDICT
    assert run.method_of(randoms[0][1], False) is ev.PathMethod.BIRTHDAY
    assert run.method_of(ep("198.51.100.9:40002"), False) is None  # another IP
    # Any other port of the member opening while the run goes on is the run's doing.
    unprobed = next(p for p in range(PORT_FIRST, PORT_LAST) if p not in run.probed)
    assert run.method_of(Endpoint(ip, unprobed), False) is ev.PathMethod.PREDICT
    run.ended = True
    assert run.method_of(Endpoint(ip, unprobed), False) is None
    assert run.method_of(ep("198.51.100.1:40002"), False) is ev.PathMethod.PREDICT  # a late answer


def test_the_module_is_pure() -> None:
    import nattool.protocol.birthday as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"socket", "time", "random", "os", "asyncio", "secrets", "select", "threading"}


# --------------------------------------------------------------------------- two sessions, simulated NATs

GROUP = "birthday-test"
KEY = derive_key(GROUP)
T1, T2 = ep("203.0.113.10:43283"), ep("203.0.113.11:43283")
HARD_IP, EASY_IP = "198.51.100.1", "198.51.100.2"
HARD_LOCAL, EASY_LOCAL = ep("192.0.2.10:43284"), ep("192.0.2.40:43284")
EASY_PUB = ep(f"{EASY_IP}:43284")


class SimNet:
    """"hard" behind a NAT that maps per destination (ports: "random", "sequential" from
    40000, or "preserving": the local port, then counting up) and filters by port;
    "easy" behind one that maps endpoint-independently (keeping the port) and filters by
    address and port. Two trackers. Datagrams arrive at once; time jumps from timer to
    timer (so a spinning timer shows as a wake-up count)."""

    def __init__(self, ports: str = "random", seed: int = 7, anonymous: bool = False, **cfg: object) -> None:
        opts: dict[str, object] = {"timeout": 30.0, "relay": RelayMode.NEVER}
        opts.update(cfg)
        config = SessionConfig(GROUP, (T1, T2), **opts)  # type: ignore[arg-type]
        self.s = {"hard": ConnectSession(config, b"sessHARD", 0.0, HARD_LOCAL, seed=b"h" * 16),
                  "easy": ConnectSession(config, b"sessEASY", 0.0, EASY_LOCAL, seed=b"e" * 16)}
        self.ports = ports
        self.rng = random.Random(seed)
        self.next_port = {"sequential": 40000, "preserving": HARD_LOCAL.port}.get(ports, 0)
        self.hard_map: dict[tuple[int, Endpoint], int] = {}  # (socket, remote) -> public port
        self.hard_rev: dict[int, tuple[int, Endpoint]] = {}
        self.easy_sent_to: set[Endpoint] = set()
        self.extra_open: set[int] = set()
        self.extra_opened_ever: set[int] = set()
        # Who the trackers list: by name, or (``anonymous``: members without an identity,
        # as `connect` registers by default) by name and endpoint, so that a member that
        # re-registers from a new mapping is listed twice until the old one expires.
        self.anonymous = anonymous
        self.registered: dict[Endpoint, dict[tuple[str, Optional[Endpoint]], Endpoint]] = {T1: {}, T2: {}}
        self.events: dict[str, list[object]] = {"hard": [], "easy": []}
        self.technique_sends: dict[str, list[float]] = {"hard": [], "easy": []}
        self.technique_to: dict[str, list[tuple[float, Endpoint]]] = {"hard": [], "easy": []}  # (when, where)
        self.hard_cut = False  # the hard side's NAT lets nothing in
        self.now = 0.0
        self.wakeups = 0
        self.same_instant = 0

    def _hard_public(self, via: int, dest: Endpoint) -> Endpoint:
        key = (via, dest)
        if key not in self.hard_map:
            if self.ports == "random":
                port = self.rng.randrange(PORT_FIRST, PORT_LAST + 1)
                while port in self.hard_rev:
                    port = self.rng.randrange(PORT_FIRST, PORT_LAST + 1)
            else:
                port = self.next_port
                self.next_port += 1
            self.hard_map[key] = port
            self.hard_rev[port] = key
        return Endpoint.from_text(f"{HARD_IP}:{self.hard_map[key]}")

    def _send(self, name: str, via: int, data: bytes, dest: Endpoint) -> None:
        if name == "hard":
            if via and via not in self.extra_open:
                return  # a socket the shell closed
            src = self._hard_public(via, dest)
            if via and data.startswith(b"NtC1") and PeerMessage.from_wire(data, KEY).kind == Kind.PING:
                self.technique_sends["hard"].append(self.now)
                self.technique_to["hard"].append((self.now, dest))
        else:
            src = EASY_PUB
            self.easy_sent_to.add(dest)
            if str(dest.ip) == HARD_IP and dest.port not in self._listed_hard_ports():
                self.technique_sends["easy"].append(self.now)
                self.technique_to["easy"].append((self.now, dest))
        if dest in (T1, T2):
            self._tracker(dest, name, src, data)
        else:
            self._arrive(dest, src, data)

    def _listed_hard_ports(self) -> set[int]:
        return {e.port for reg in self.registered.values() for (n, _), e in reg.items() if n == "hard"}

    def _arrive(self, dest: Endpoint, src: Endpoint, data: bytes) -> None:
        """Inbound through the NAT of ``dest`` (its filter), to the session."""
        if str(dest.ip) == EASY_IP:
            if dest.port == EASY_PUB.port and src in self.easy_sent_to:
                self.s["easy"].receive_datagram(data, src, self.now)
        elif str(dest.ip) == HARD_IP and not self.hard_cut:
            owner = self.hard_rev.get(dest.port)
            if owner is not None and owner[1] == src:
                via = owner[0]
                if via == 0:
                    self.s["hard"].receive_datagram(data, src, self.now)
                elif via in self.extra_open:
                    self.s["hard"].receive_on_socket(via, data, src, self.now)

    def _tracker(self, tracker: Endpoint, name: str, src: Endpoint, data: bytes) -> None:
        if not isinstance(parse_request(data), RegisterRequest):
            return
        self.registered[tracker][(name, src if self.anonymous else None)] = src
        others = [e for (n, _), e in self.registered[tracker].items() if n != name]
        answer = MemberList((MemberEntry(src), *(MemberEntry(o) for o in others))).to_wire()
        self._arrive(src, tracker, answer)

    def flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for name, s in self.s.items():
                for data, dest in s.datagrams_to_send(self.now):
                    self._send(name, 0, data, dest)
                    moved = True
                for via, data, dest in s.datagrams_via(self.now):
                    self._send(name, via, data, dest)
                    moved = True
                while (event := s.next_event()) is not None:
                    self.events[name].append(event)
                    if isinstance(event, ev.ExtraSockets) and name == "hard":
                        self.extra_open = set(event.wanted)
                        self.extra_opened_ever |= self.extra_open
                    moved = True

    def run(self, until: float, stop_when_up: bool = True) -> None:
        self.flush()
        while self.now < until:
            timers = [(t, n) for n, s in self.s.items() if (t := s.get_timer()) is not None]
            if not timers:
                break
            at = max(self.now, min(t for t, _ in timers))
            self.same_instant = self.same_instant + 1 if at == self.now else 0
            assert self.same_instant < 50, f"a timer spins at {at}"
            self.now = at
            for t, name in timers:
                if t <= self.now:
                    self.s[name].handle_timer(self.now)
                    self.wakeups += 1
            self.flush()
            if stop_when_up and all(self.direct_up(n) for n in self.s):
                break

    def direct_up(self, name: str) -> Optional[ev.PathUp]:
        return next((e for e in self.events[name] if isinstance(e, ev.PathUp) and e.via == "direct"), None)

    def of(self, name: str, cls: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events[name] if isinstance(e, cls)]


def max_in_any_second(times: list[float]) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_symmetric_random_against_port_restricted_opens_by_birthday(seed: int) -> None:
    net = SimNet("random", seed)
    net.run(40.0)
    hard_up, easy_up = net.direct_up("hard"), net.direct_up("easy")
    assert hard_up is not None and easy_up is not None, net.events
    assert hard_up.method is easy_up.method is ev.PathMethod.BIRTHDAY
    assert hard_up.endpoint == EASY_PUB and str(easy_up.endpoint.ip) == HARD_IP
    # Each side chose its part alone, from the two trackers' views.
    (hard_start,), (easy_start,) = net.of("hard", ev.BirthdayStarted), net.of("easy", ev.BirthdayStarted)
    assert (hard_start.role, easy_start.role) == ("open-ports", "probe")
    assert hard_start.pattern == easy_start.pattern == "random"
    # The path lives on the extra socket the probe landed on; the others are closed.
    hard = net.s["hard"]
    via = hard.socket_of[EASY_PUB]
    assert net.hard_rev[easy_up.endpoint.port] == (via, EASY_PUB)
    assert net.extra_open == {via} and net.extra_opened_ever == set(range(1, HARD_SOCKETS + 1))
    # Within the rate cap and the budget.
    for name in ("hard", "easy"):
        assert max_in_any_second(net.technique_sends[name]) <= DEFAULT_RATE + DEFAULT_RATE * 0.05 + 1
        (end,) = net.of(name, ev.BirthdayEnded)
        assert end.up and end.probes <= DEFAULT_BUDGET
    assert len(net.technique_sends["easy"]) <= DEFAULT_BUDGET
    assert easy_up.since_start < 30.0
    assert net.wakeups < 6000  # about one per probe, no spinning
    # The path carries data, from that socket.
    net.s["hard"].send(b"over the birthday path", net.now)
    net.flush()
    got = [e for e in net.events["easy"] if isinstance(e, ev.MessageReceived)]
    assert [m.data for m in got] == [b"over the birthday path"]


@pytest.mark.parametrize("ports,pattern", [("sequential", "sequential"), ("preserving", "port-preserving")])
def test_a_counting_nat_is_predicted_without_extra_sockets(ports: str, pattern: str) -> None:
    net = SimNet(ports)
    net.run(20.0)
    hard_up, easy_up = net.direct_up("hard"), net.direct_up("easy")
    assert hard_up is not None and easy_up is not None
    assert hard_up.method is easy_up.method is ev.PathMethod.PREDICT
    (hard_start,), (easy_start,) = net.of("hard", ev.BirthdayStarted), net.of("easy", ev.BirthdayStarted)
    assert hard_start.method is easy_start.method is ev.PathMethod.PREDICT
    assert hard_start.pattern == pattern and easy_start.pattern == "sequential"  # the easy side cannot see the local port
    assert net.extra_opened_ever == set()  # found within the grace: no extra socket
    (end,) = net.of("easy", ev.BirthdayEnded)
    assert end.up and end.probes <= PREDICT_WINDOW


def test_budget_zero_turns_the_technique_off() -> None:
    net = SimNet("random", 1, birthday_budget=0, timeout=8.0)
    net.run(12.0)
    assert net.of("hard", ev.BirthdayStarted) == net.of("easy", ev.BirthdayStarted) == []
    assert net.direct_up("hard") is None and net.extra_opened_ever == set()
    assert net.technique_sends["easy"] == []


def test_a_small_budget_ends_the_run_and_closes_the_sockets() -> None:
    net = SimNet("random", 1, birthday_budget=40, timeout=40.0)
    net.run(40.0, stop_when_up=False)
    (end,) = net.of("easy", ev.BirthdayEnded)
    assert not end.up and end.probes == 40 and "budget" in end.reason
    assert len(net.technique_sends["easy"]) == 40
    (hard_end,) = net.of("hard", ev.BirthdayEnded)
    assert not hard_end.up and hard_end.probes == 40  # the hard side's pings count too
    assert net.extra_open == set()


def test_a_stray_or_replayed_message_on_an_extra_socket_routes_nothing() -> None:
    net = SimNet("random", 1, birthday_rate=1.0)  # slow: no probe lands in these 3 s
    net.run(3.0, stop_when_up=False)
    hard = net.s["hard"]
    assert len(hard.sockets_open) == HARD_SOCKETS and hard.socket_of == {}
    via = hard.sockets_open[0]
    hard.receive_on_socket(via, b"junk", EASY_PUB, net.now)
    hard.receive_on_socket(via, PeerMessage(Kind.PING, b"stranger", 1).to_wire(derive_key("other")), EASY_PUB, net.now)
    assert hard.socket_of == {}
    ping = PeerMessage(Kind.PING, b"sessEASY", 10**6).to_wire(KEY)
    hard.receive_on_socket(via, ping, EASY_PUB, net.now)
    assert hard.socket_of == {EASY_PUB: via}
    other = hard.sockets_open[1]
    hard.socket_of.clear()
    hard.receive_on_socket(other, ping, EASY_PUB, net.now)  # the same message again
    assert hard.socket_of == {}


# --------------------------------------------------------------------------- the shell's sockets and the options


def test_the_socket_set_opens_reads_sends_and_closes_real_sockets() -> None:
    import asyncio

    from nattool.net.socket_set import SocketSet

    async def main() -> None:
        got: list[tuple[int, bytes, Endpoint]] = []
        arrived = asyncio.Event()

        def on_datagram(index: int, data: bytes, src: Endpoint) -> None:
            got.append((index, data, src))
            arrived.set()

        sockets = SocketSet(on_datagram, "127.0.0.1")
        sockets.keep_only([1, 2, 3])
        assert len(sockets) == 3
        ports = {i: s.getsockname()[1] for i, s in sockets.sockets.items()}
        assert sockets.send(1, b"one to two", ep(f"127.0.0.1:{ports[2]}"))
        await asyncio.wait_for(arrived.wait(), 5)
        assert got == [(2, b"one to two", ep(f"127.0.0.1:{ports[1]}"))]
        closed = [sockets.sockets[1], sockets.sockets[3]]
        sockets.keep_only([2])
        assert list(sockets.sockets) == [2] and all(s.fileno() == -1 for s in closed)
        assert not sockets.send(1, b"from a closed socket", ep(f"127.0.0.1:{ports[2]}"))
        sockets.close()
        assert len(sockets) == 0

    asyncio.run(main())


def test_bad_rates_and_budgets_are_usage_errors_in_the_library_and_the_cli(tmp_path: Path) -> None:
    import asyncio
    import subprocess

    from nattool.diag.connect import connect
    from tests.conftest import nattool_env
    from tests.test_connect_loopback import connect_argv

    async def main() -> None:
        for kwargs in ({"birthday_rate": 0.0}, {"birthday_budget": -1}):
            with pytest.raises(UsageError):
                await connect("g", ["127.0.0.1:9"], **kwargs)  # type: ignore[arg-type]

    asyncio.run(main())
    for option, value in (("--birthday-rate", "0"), ("--birthday-budget", "-5")):
        proc = subprocess.run(connect_argv("g", "-t", "127.0.0.1:9", option, value), env=nattool_env(tmp_path),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, proc.stderr
        assert "birthday" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("anonymous", [False, True])
def test_a_lost_birthday_path_is_punched_again(anonymous: bool) -> None:
    """The hard side's NAT forgets every mapping (a rebinding, a reboot) after birthday
    punching opened the path: both sides see it go down, start a second run with a
    budget of its own, and open a direct path again the same way. Also when the
    trackers list the hard side twice (old and new mapping: no identity), and so can
    no longer tell its mapping: the run keeps its plan (the NAT lab found this)."""
    net = SimNet("random", 2, anonymous=anonymous, timeout=300.0)
    net.run(40.0)
    assert net.direct_up("hard") is not None and net.direct_up("easy") is not None
    lost = net.now
    net.hard_map.clear()
    net.hard_rev.clear()
    net.run(lost + 120.0, stop_when_up=False)
    for name in ("hard", "easy"):
        downs = [e for e in net.of(name, ev.PathDown)]
        assert downs, (name, net.events[name])
        starts = net.of(name, ev.BirthdayStarted)
        assert len(starts) == 2, (name, starts)
        assert "again" in starts[1].reason and "again" not in starts[0].reason
        ups = [e for e in net.of(name, ev.PathUp) if e.via == "direct"]
        assert len(ups) >= 2 and ups[-1].method is ev.PathMethod.BIRTHDAY, (name, ups)
    # Both runs kept to the rate cap. The easy side also pings the lost path's endpoint
    # again, as it does any candidate once a path is down: that is no probe.
    old_path = net.direct_up("easy").endpoint  # type: ignore[union-attr]
    for name in ("hard", "easy"):
        probes = [t for t, dest in net.technique_to[name] if dest != old_path or t < lost]
        assert max_in_any_second(probes) <= DEFAULT_RATE + DEFAULT_RATE * 0.05 + 1
        ends = net.of(name, ev.BirthdayEnded)
        assert [e.up for e in ends] == [True, True], ends


def _listed_before(net: SimNet, t1_port: int, t2_port: int) -> None:
    """The trackers still list an earlier "hard" (a run of `connect` without an identity
    that has since stopped), at these ports, until their TTL."""
    for tracker, port in ((T1, t1_port), (T2, t2_port)):
        earlier = Endpoint.from_text(f"{HARD_IP}:{port}")
        net.registered[tracker][("hard", earlier)] = earlier


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_earlier_listing_of_the_symmetric_side_does_not_hold_birthday_back(seed: int) -> None:
    """Two members behind the hard side's IP at each tracker, at four different ports:
    none maps endpoint-independently, so the NAT maps per destination, and the easy side
    probes as it would for one member."""
    net = SimNet("random", seed, anonymous=True)
    _listed_before(net, 30001, 30002)
    net.run(40.0)
    hard_up, easy_up = net.direct_up("hard"), net.direct_up("easy")
    assert hard_up is not None and easy_up is not None, net.events
    assert easy_up.method is ev.PathMethod.BIRTHDAY
    (easy_start,) = net.of("easy", ev.BirthdayStarted)
    assert easy_start.role == "probe"


def test_a_member_at_one_port_at_both_trackers_leaves_the_mapping_unknown() -> None:
    """One of the members behind that IP shows the same port to both trackers (its NAT
    maps endpoint-independently, or it is another host): which listing is which member
    cannot be told, so the easy side does not probe."""
    net = SimNet("random", 1, anonymous=True, timeout=10.0)
    _listed_before(net, 30001, 30001)
    net.run(12.0)
    assert not net.of("easy", ev.BirthdayStarted), net.events["easy"]


def test_a_second_run_has_a_budget_of_its_own() -> None:
    """After the path is lost, the hard side's NAT lets nothing in any more: the easy
    side's second run probes its whole budget, not what the first run left of it."""
    budget = 300
    net = SimNet("random", 2, timeout=300.0, birthday_budget=budget)
    net.run(40.0)
    assert net.direct_up("easy") is not None
    net.hard_map.clear()
    net.hard_rev.clear()
    net.hard_cut = True
    net.run(net.now + 120.0, stop_when_up=False)
    first, second = net.of("easy", ev.BirthdayEnded)
    assert first.up and 0 < first.probes < budget
    assert not second.up and second.probes == budget and "budget" in second.reason
