"""Registry rules and reply building: pure, the clock passed in."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Container

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.errors import LimitError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.limits import reply_budget
from nattool.protocol.text import MalformedRequest, MemberList, RegisterRequest, parse_request
from nattool.store.base import Member, Registration, StoreLimits
from nattool.store.memory import SMALL_GROUP, MemberIndex, MemoryStore
from nattool.tracker.registry import build_member_reply, member_from_request


def ep(text: str) -> Endpoint:
    return Endpoint.from_text(text)


def register(index: MemberIndex, raw: bytes, src: str, now: float, offset: int = 0, limit: int = 128) -> bytes:
    req = parse_request(raw)
    assert isinstance(req, RegisterRequest)
    member = member_from_request(req, ep(src), now)
    index.upsert(member, now)
    view = index.view(member, offset, limit, now)
    return build_member_reply(view, reply_budget(len(raw)), req.wants_paging, offset)


def test_seed_example_reply() -> None:
    """PROTOCOL.md's example: the requester first with its LAN list, a member behind
    another IP without LAN, a member behind the same IP with its LAN list."""
    index = MemberIndex(StoreLimits())
    g = "46D0F69E-E347-47A7-8E95-43E5BAA95348"
    register(index, f"//51pwn/P2P&E2E/{g}/0/192.168.0.57/aa:aa:aa:aa:aa:01".encode(), "122.44.78.33:1998", 1.0)
    register(index, f"//51pwn/P2P&E2E/{g}/0/10.9.9.9/aa:aa:aa:aa:aa:02".encode(), "22.144.178.133:1998", 2.0)
    reply = register(
        index,
        f"//51pwn/P2P&E2E/{g}/0/192.168.0.56,172.66.0.10/77:5b:67:a5:87:66".encode(),
        "122.44.78.33:998",
        3.0,
    )
    assert reply == b"122.44.78.33:998;192.168.0.56,172.66.0.10\n22.144.178.133:1998\n122.44.78.33:1998;192.168.0.57"


def test_same_identity_replaces_and_moves_to_newest() -> None:
    index = MemberIndex(StoreLimits())
    register(index, b"//51pwn/P2P&E2E/g/0/0/aa:aa:aa:aa:aa:01", "203.0.113.1:1000", 1.0)
    register(index, b"//51pwn/P2P&E2E/g/0/0/aa:aa:aa:aa:aa:02", "203.0.113.2:1000", 2.0)
    register(index, b"//51pwn/P2P&E2E/g/0/0/AA-AA-AA-AA-AA-01", "203.0.113.1:2000", 3.0)  # new NAT port
    reply = register(index, b"//51pwn/P2P&E2E/g/0/0/aa:aa:aa:aa:aa:03", "203.0.113.3:1000", 4.0)
    assert reply.split(b"\n") == [b"203.0.113.3:1000", b"203.0.113.1:2000", b"203.0.113.2:1000"]
    assert len(index) == 3


def test_without_identity_the_endpoint_is_the_identity() -> None:
    index = MemberIndex(StoreLimits())
    register(index, b"//51pwn/P2P&E2E/g/0/0/0", "203.0.113.1:1000", 1.0)
    register(index, b"//51pwn/P2P&E2E/g/0/0/0", "203.0.113.1:1000", 2.0)
    register(index, b"//51pwn/P2P&E2E/g/0/0/0", "203.0.113.1:1001", 3.0)
    assert len(index) == 2


def test_ipv6_lan_visibility_by_slash64() -> None:
    index = MemberIndex(StoreLimits())
    register(index, b"//51pwn/P2P&E2E/g/0/fd00::5/0", "[2001:db8:0:1::aaaa]:5000", 1.0)
    register(index, b"//51pwn/P2P&E2E/g/0/fd00::9/0", "[2001:db8:0:2::1]:5000", 2.0)
    reply = register(index, b"//51pwn/P2P&E2E/g/0/fd00::6/0", "[2001:db8:0:1::bbbb]:6000", 3.0)
    assert reply.split(b"\n") == [
        b"[2001:db8:0:1::bbbb]:6000;fd00::6",
        b"[2001:db8:0:2::1]:5000",
        b"[2001:db8:0:1::aaaa]:5000;fd00::5",
    ]


def test_explicit_public_must_match_source_ip() -> None:
    req = parse_request(b"//51pwn/P2P&E2E/g/198.51.100.7:5000/0/0")
    assert isinstance(req, RegisterRequest)
    with pytest.raises(MalformedRequest):
        member_from_request(req, ep("203.0.113.1:1000"), 0.0)
    member = member_from_request(req, ep("198.51.100.7:1234"), 0.0)
    assert member.endpoint == ep("198.51.100.7:5000")


def test_ttl_expiry() -> None:
    index = MemberIndex(StoreLimits(ttl=120))
    register(index, b"//51pwn/P2P&E2E/g/0/0/aa:aa:aa:aa:aa:01", "203.0.113.1:1000", 0.0)
    register(index, b"//51pwn/P2P&E2E/g/0/0/aa:aa:aa:aa:aa:02", "203.0.113.2:1000", 100.0)
    # At 121 s the first is expired even before a sweep: never listed.
    reply = register(index, b"//51pwn/P2P&E2E/g/0/0/aa:aa:aa:aa:aa:03", "203.0.113.3:1000", 121.0)
    assert reply.split(b"\n") == [b"203.0.113.3:1000", b"203.0.113.2:1000"]
    assert [m.identity for m in index.expire(121.0)] == ["aa:aa:aa:aa:aa:01"]
    assert len(index) == 2
    assert index.expire(1000.0) and len(index) == 0 and index.group_count == 0


def test_caps() -> None:
    index = MemberIndex(StoreLimits(max_members_per_group=3, max_groups_per_source=2, max_members=6))
    for i in range(4):
        register(index, f"//51pwn/P2P&E2E/g/0/0/aa:aa:aa:aa:aa:0{i}".encode(), f"203.0.113.{i + 1}:1000", float(i))
    # A full group evicts its least recently seen member.
    assert len(index) == 3
    assert "aa:aa:aa:aa:aa:00" not in {m.identity for m in index.members()}
    register(index, b"//51pwn/P2P&E2E/h/0/0/0", "198.51.100.1:1", 10.0)
    register(index, b"//51pwn/P2P&E2E/i/0/0/0", "198.51.100.1:1", 10.0)
    with pytest.raises(LimitError, match="too many groups"):
        register(index, b"//51pwn/P2P&E2E/j/0/0/0", "198.51.100.1:1", 10.0)
    register(index, b"//51pwn/P2P&E2E/k/0/0/0", "198.51.100.2:1", 10.0)
    with pytest.raises(LimitError, match="tracker full"):
        register(index, b"//51pwn/P2P&E2E/l/0/0/0", "198.51.100.3:1", 10.0)
    assert len(index) == 6


def test_a_full_tracker_replaces_a_dead_member() -> None:
    index = MemberIndex(StoreLimits(ttl=100, max_members=4, max_groups_per_source=10))
    for i in range(4):
        register(index, f"//51pwn/P2P&E2E/g{i}/0/0/0".encode(), f"203.0.113.{i + 1}:1000", float(i))
    with pytest.raises(LimitError, match="tracker full"):
        register(index, b"//51pwn/P2P&E2E/new/0/0/0", "198.51.100.1:1", 50.0)
    # At 100.5 the first one is dead: the newcomer takes its place, nobody else goes.
    register(index, b"//51pwn/P2P&E2E/new/0/0/0", "198.51.100.1:1", 100.5)
    assert sorted(m.group for m in index.members()) == ["g1", "g2", "g3", "new"]


def test_paging() -> None:
    index = MemberIndex(StoreLimits())
    for i in range(60):
        register(index, f"//51pwn/P2P&E2E/g/0/0/aa:aa:aa:aa:00:{i:02x}".encode(), f"203.0.113.{i + 1}:40000", float(i))
    raw = b"//51pwn/P2P&E2E/g/0/0/aa:aa:aa:aa:ff:ff\noffset=0"
    first = MemberList.from_wire(register(index, raw, "198.51.100.1:1", 100.0))
    assert first.next_offset is not None and first.next_offset == len(first.entries) - 1
    seen = [e.endpoint for e in first.entries[1:]]
    offset = first.next_offset
    while offset is not None:
        raw = f"//51pwn/P2P&E2E/g/0/0/aa:aa:aa:aa:ff:ff\noffset={offset}".encode()
        page = MemberList.from_wire(register(index, raw, "198.51.100.1:1", 100.0, offset=offset))
        seen += [e.endpoint for e in page.entries[1:]]
        offset = page.next_offset
    assert len(seen) == 60 == len(set(seen))
    assert seen[0] == ep("203.0.113.60:40000")  # newest first


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 80),
    st.integers(0, 1400),
    st.lists(st.integers(0, 16), min_size=1, max_size=80),
    st.booleans(),
)
def test_every_reply_obeys_the_amplification_bound(members: int, padding: int, lan_sizes: list[int], v6: bool) -> None:
    index = MemberIndex(StoreLimits())
    for i in range(members):
        lan = ",".join(f"fd00::{j + 1:x}" if v6 else f"10.0.{j}.1" for j in range(lan_sizes[i % len(lan_sizes)])) or "0"
        src = f"[2001:db8::{i + 1:x}]:{1000 + i}" if v6 else f"203.0.113.{i % 3 + 1}:{1000 + i}"
        register(index, f"//51pwn/P2P&E2E/g/0/{lan}/0".encode(), src, float(i))
    lan = ",".join(f"10.1.{j}.1" for j in range(lan_sizes[0])) or "0"
    raw = f"//51pwn/P2P&E2E/g/0/{lan}/0".encode() + (b"\n" + b" " * padding if padding else b"")
    reply = register(index, raw, "203.0.113.1:9", 1000.0)
    assert len(reply) <= min(max(3 * len(raw), 128), 1200)
    parsed = MemberList.from_wire(reply)
    assert parsed.entries[0].endpoint == ep("203.0.113.1:9")


def test_memory_store_batch_results() -> None:
    store = MemoryStore(StoreLimits(max_groups_per_source=1))
    req = parse_request(b"//51pwn/P2P&E2E/a/0/0/0")
    req2 = parse_request(b"//51pwn/P2P&E2E/b/0/0/0")
    assert isinstance(req, RegisterRequest) and isinstance(req2, RegisterRequest)
    m1 = member_from_request(req, ep("203.0.113.1:1"), 1.0)
    m2 = member_from_request(req2, ep("203.0.113.1:1"), 1.0)
    results = asyncio.run(store.register([Registration(m1), Registration(m2)], 1.0))
    assert results[0].me == m1  # type: ignore[union-attr]
    assert isinstance(results[1], LimitError)
    assert ipaddress.ip_address("203.0.113.1") == m1.endpoint.ip


# --- the registration fast path decides exactly what the general path decides ------------

_fast_groups = st.text("abcdefXYZ0123456789._-", min_size=1, max_size=64) | st.uuids().map(lambda u: str(u).upper())
_fast_lans = st.lists(st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))), max_size=16, unique=True)
_fast_macs = st.none() | st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))


@settings(max_examples=300)
@given(_fast_groups, _fast_lans, _fast_macs, st.integers(0, 2**32 - 1), st.integers(1, 65535), st.integers(0, 400))
def test_fast_path_outcome_equals_the_general_path(group: str, lan: list[str], mac: str | None, ip: int, port: int, pad: int) -> None:
    from nattool.tracker.dispatch import TrackerCore
    from nattool.tracker.federation import Federation, FederationConfig

    core = TrackerCore(Federation(FederationConfig()))
    data = f"//51pwn/P2P&E2E/{group}/0/{','.join(lan) or '0'}/{mac or '0'}".encode() + b" " * pad
    host = str(ipaddress.IPv4Address(ip))
    fast = core.on_register_v4(data, (host, port), 1234.5)
    general = core.on_datagram(data, Endpoint.from_sockaddr((host, port)), 0.0, 1234.5)
    assert fast is not None  # every such request takes the fast path
    assert fast == general  # member, offset, page size, budget, paging: all equal
    assert fast.registration.member.group is general.registration.member.group  # interned alike
    # The same bytes again (a keepalive), now parsed from memory, from another port.
    other_port = port % 65535 + 1
    again = core.on_register_v4(data, (host, other_port), 1234.5)
    assert again == core.on_datagram(data, Endpoint.from_sockaddr((host, other_port)), 0.0, 1234.5)
    assert core.counters["register"] == 4


def test_remembered_registrations_stay_bounded_and_right(monkeypatch: pytest.MonkeyPatch) -> None:
    from nattool.tracker import dispatch
    from nattool.tracker.dispatch import PendingRegistration, TrackerCore
    from nattool.tracker.federation import Federation, FederationConfig

    monkeypatch.setattr(dispatch, "SEED_CACHE_MAX", 4)
    core = TrackerCore(Federation(FederationConfig()))
    requests = [f"//51pwn/P2P&E2E/g{k}/0/10.0.0.{k}/02:00:00:00:00:{k:02x}".encode() for k in range(10)]
    for _ in range(3):
        for k, data in enumerate(requests):
            pending = core.on_register_v4(data, ("198.51.100.1", 4000 + k), 1234.5)
            assert isinstance(pending, PendingRegistration)
            member = pending.registration.member
            assert (member.group, member.lan_text, member.identity) == (f"g{k}", f"10.0.0.{k}", f"02:00:00:00:00:{k:02x}")
            assert len(core._seed_parsed) <= 4


def test_expiry_sweeps_a_slice_of_the_groups_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call looks at a SWEEP_PARTS-th of the groups: every dead member is gone
    after SWEEP_PARTS calls, not before, and no live one ever goes."""
    import random

    from nattool.store import memory

    monkeypatch.setattr(memory, "SWEEP_MIN", 1)
    rng = random.Random(7)
    index = MemberIndex(StoreLimits(ttl=100, max_groups_per_source=10_000))
    groups = [f"g{n}" for n in range(memory.SWEEP_PARTS * 10)]
    for n in range(1000):
        source = f"203.0.113.{n % 250 + 1}"
        group = groups[n] if n < len(groups) else rng.choice(groups)  # every group has members
        index.upsert(Member(group, f"m{n}", f"{source}:{1000 + n}", "", source, float(n)), float(n))
    dead = {f"m{n}" for n in range(601)}  # at 700 the horizon is 600
    gone: list[str] = []
    for _ in range(memory.SWEEP_PARTS - 1):
        gone += [m.identity for m in index.expire(700.0)]
    assert set(gone) < dead and len(gone) == len(set(gone))
    gone += [m.identity for m in index.expire(700.0)]
    assert set(gone) == dead and len(gone) == len(dead)
    assert len(index) == 399 and index.expire(700.0) == []
    assert [m.identity for m in index.oldest_first()] == [f"m{n}" for n in range(601, 1000)]


def test_expiry_stops_at_its_budget_and_goes_on_where_it_stopped() -> None:
    index = MemberIndex(StoreLimits(ttl=10, max_groups_per_source=1000))
    for n in range(30):  # g0: m0..m9, g1: m10..m19, g2: m20..m29, all dead at 100
        index.upsert(Member(f"g{n // 10}", f"m{n}", f"203.0.113.1:{1000 + n}", "", "203.0.113.1", float(n)), float(n))
    first = [m.identity for m in index.expire(100.0, budget=15)]
    assert len(first) == 15 and len(index) == 15
    cut = first[-1]  # the group the budget cut short is looked at first next time
    cut_group = int(cut[1:]) // 10
    rest = [m.identity for m in index.expire(100.0)]
    assert rest[: 9 - int(cut[1:]) % 10] == [f"m{n}" for n in range(int(cut[1:]) + 1, cut_group * 10 + 10)]
    assert sorted(first + rest, key=lambda i: int(i[1:])) == [f"m{n}" for n in range(30)] and len(index) == 0


def test_mass_expiry_is_done_in_bounded_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    from nattool.store import memory

    monkeypatch.setattr(memory, "EXPIRE_STEP", 100)
    monkeypatch.setattr(memory, "EXPIRE_MAX", 300)
    index = MemberIndex(StoreLimits(ttl=10, max_groups_per_source=1000))
    for i in range(450):
        register(index, f"//51pwn/P2P&E2E/g{i % 40}/0/0/aa:aa:aa:aa:{i >> 8:02x}:{i & 255:02x}".encode(), "203.0.113.1:1000", 0.0)
    assert len(index) == 450
    assert asyncio.run(memory.expire_in_steps(index, 100.0)) == 300  # bounded per call
    assert asyncio.run(memory.expire_in_steps(index, 100.0)) == 150 and len(index) == 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 5), st.integers(0, 40)),  # group, identity, seconds later
        min_size=1,
        max_size=40,
    ),
    st.integers(0, 3),
)
def test_a_view_is_the_live_others_newest_first(steps: list[tuple[int, int, int]], offset: int) -> None:
    """The small-group view (with its shortcut for an all-live group whose newest
    member is the requester) against a model: every live member but the requester,
    newest registration first, then the page."""
    ttl = 30.0
    index = MemberIndex(StoreLimits(ttl=ttl))
    model: dict[tuple[int, int], tuple[int, Member]] = {}  # -> (registration number, member)
    now = 1000.0
    for n, (group, ident, later) in enumerate(steps):
        now += later
        member = Member(f"g{group}", f"id{ident}", f"203.0.113.{ident + 1}:{1000 + group}", "", f"203.0.113.{ident + 1}", now)
        index.upsert(member, now)
        model[(group, ident)] = (n, member)
        view = index.view(member, offset, 3, now)
        live = [
            m
            for (g, i), (_, m) in sorted(model.items(), key=lambda item: -item[1][0])
            if g == group and i != ident and m.seen > now - ttl
        ]
        assert view.me == member
        assert list(view.others) == live[offset : offset + 3]
        assert view.total_others == len(live)


# --- the keepalive lane does what the general path does ----------------------------------------

_lane_steps = st.lists(
    st.tuples(
        st.integers(0, 2),  # group
        st.integers(0, 6),  # identity (MAC)
        st.integers(0, 3),  # source IP: a few, so that some members share one
        st.integers(0, 2),  # port
        st.integers(0, 2),  # LAN list
        st.integers(0, 40),  # seconds later
        st.integers(0, 300),  # padding: the reply budget (cuts included)
    ),
    min_size=1,
    max_size=60,
)


@st.composite
def _keepalive_rounds(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int, int, int, int]], set[int]]:
    """Keepalives as they usually come: everyone joins, then rounds in which each
    member re-registers in turn, so the one that comes is the group's oldest, with
    now and then a member that skips its turn, moves to another port, changes its
    LAN list, comes after a pause that lets others expire, or a newcomer (a
    thirteenth member evicts). Members 0 and 1 share a source; the others have
    their own. Also the steps before which dead members are swept (between sweeps
    they are there, only not listed)."""
    size = {0: draw(st.integers(1, 10)), 1: draw(st.integers(1, 10))}
    port = [0] * 13
    lan = [draw(st.integers(0, 2)) for _ in range(13)]
    steps = []

    def step(group: int, ident: int, later: int) -> None:
        ip = 0 if ident < 2 else ident + 1
        steps.append((group, ident, ip, port[ident], lan[ident], later, draw(st.integers(0, 60))))

    for group, n in size.items():
        for ident in range(n):
            step(group, ident, 1)
    for _ in range(draw(st.integers(1, 5))):
        for group in (0, 1):
            for ident in range(size[group]):
                what = draw(st.sampled_from(("turn",) * 12 + ("skip", "move", "lan", "pause", "newcomer")))
                if what == "skip":
                    continue
                if what == "move":
                    port[ident] ^= 1
                elif what == "lan":
                    lan[ident] = (lan[ident] + 1) % 3
                elif what == "newcomer" and size[group] < 13:
                    step(group, size[group], 1)
                    size[group] += 1
                step(group, ident, 25 if what == "pause" else 1)
    sweeps = {n for n in range(len(steps)) if draw(st.integers(0, 3)) == 0}
    return steps, sweeps


@settings(max_examples=300, deadline=None)
@given(_lane_steps, st.integers(2, 70))
def test_the_keepalive_lane_replies_and_stores_what_the_general_path_does(
    steps: list[tuple[int, int, int, int, int, int, int]], per_group: int
) -> None:
    """Two trackers take the same registrations, one with its store's keepalive lane
    and one without: every reply, every counter and the stored groups are equal.
    Small caps make groups outgrow the lane (over 64 members) and evict."""
    _lane_against_general_path(steps, per_group)


@settings(max_examples=300, deadline=None)
@given(_keepalive_rounds())
def test_the_keepalive_lanes_endpoint_lines_are_what_the_general_path_lists(
    rounds: tuple[list[tuple[int, int, int, int, int, int, int]], set[int]]
) -> None:
    """The same for keepalives in turn, where the lane answers from the endpoint
    lines it keeps per group, and for what breaks the turn: members out of turn,
    moves, new LAN lists, newcomers, evictions, members expiring and swept, two
    members behind one source, cut replies."""
    steps, sweeps = rounds
    _lane_against_general_path(steps, 12, sweeps)


def _lane_against_general_path(
    steps: list[tuple[int, int, int, int, int, int, int]], per_group: int, sweeps: Container[int] = ()
) -> None:
    from nattool.tracker.dispatch import HELD, PendingRegistration, TrackerCore
    from nattool.tracker.federation import Federation, FederationConfig

    limits = StoreLimits(ttl=30.0, max_members_per_group=per_group)
    stores = [MemoryStore(limits), MemoryStore(limits)]
    cores = [TrackerCore(Federation(FederationConfig())), TrackerCore(Federation(FederationConfig()))]
    cores[0].keepalive_lane = stores[0].keepalive_lane()
    now = 1000.0
    for n, (group, ident, ip, port, lan, later, pad) in enumerate(steps):
        now += later
        if n in sweeps:
            assert stores[0].index.expire(now) == stores[1].index.expire(now)
        lan_text = ["0", "10.0.0.1", "192.168.1.2,10.0.0.9"][lan]
        mac = f"02:00:00:00:00:{ident:02x}"
        data = f"//51pwn/P2P&E2E/g{group}/0/{lan_text}/{mac}".encode() + b" " * pad
        host, sport = f"203.0.113.{ip + 1}", 1000 + port
        known = stores[1].index._groups.get(f"g{group}", {})
        # The lane's whole domain: a known member, the same source, a small group.
        eligible = mac in known and known[mac].source == host and len(known) <= SMALL_GROUP
        replies = []
        outcomes = []
        for store, core in zip(stores, cores):
            held: list[tuple[bytes, tuple[str, int]]] = []
            outcome = core.on_register_v4(data, (host, sport), now, held)
            outcomes.append(outcome)
            if outcome is HELD:
                [(reply, to)] = held
                assert to == (host, sport)
                replies.append(reply)
                continue
            assert not held
            assert isinstance(outcome, PendingRegistration)
            [result] = store.register_now([outcome.registration], now)
            replies.append(core.finish_registration(outcome, result))
        assert (outcomes[0] is HELD) == eligible
        assert isinstance(outcomes[1], PendingRegistration)  # no lane: always the batch
        assert replies[0] == replies[1]
        assert cores[0].counters == cores[1].counters
        assert [list(g.items()) for g in stores[0].index._groups.values()] == [
            list(g.items()) for g in stores[1].index._groups.values()
        ]
        assert list(stores[0].index.oldest_first()) == list(stores[1].index.oldest_first())
        index = stores[0].index
        for key, lines in index._endpoint_lines.items():  # the lane's memo is the group's
            assert lines == "\n".join(m.endpoint_text for m in reversed(index._groups[key].values()))


def test_the_keepalive_lane_takes_only_known_members_from_the_same_source_in_small_groups() -> None:
    index = MemberIndex(StoreLimits(ttl=30.0))
    assert index.keepalive("g", "m1", "203.0.113.1:1", "", "203.0.113.1", 1.0) is None  # unknown group
    index.upsert(Member("g", "m1", "203.0.113.1:1", "", "203.0.113.1", 1.0), 1.0)
    index.upsert(Member("g", "m2", "203.0.113.2:1", "", "203.0.113.2", 2.0), 2.0)
    assert index.keepalive("g", "m3", "203.0.113.3:1", "", "203.0.113.3", 3.0) is None  # unknown member
    assert index.keepalive("g", "m1", "203.0.113.9:1", "", "203.0.113.9", 3.0) is None  # another source
    assert [m.identity for m in index._groups["g"].values()] == ["m1", "m2"]  # nothing changed
    m2 = index._groups["g"]["m2"]
    # All live, nobody else behind 203.0.113.1: the others as members and as their endpoint lines.
    assert index.keepalive("g", "m1", "203.0.113.1:7", "10.0.0.1", "203.0.113.1", 3.0) == ([m2], "203.0.113.2:1", 0)
    moved = index._groups["g"]["m1"]
    assert (moved.endpoint_text, moved.lan_text, moved.seen) == ("203.0.113.1:7", "10.0.0.1", 3.0)
    assert list(index._groups["g"]) == ["m2", "m1"] and list(index.oldest_first())[-1] is moved
    # In turn, each the oldest when it comes: the lines kept for the group are enough, no members.
    assert index.keepalive("g", "m2", "203.0.113.2:1", "", "203.0.113.2", 4.0) == (None, "203.0.113.1:7", 0)
    assert index.keepalive("g", "m1", "203.0.113.1:7", "10.0.0.1", "203.0.113.1", 5.0) == (None, "203.0.113.2:1", 0)
    # m3 behind m1's source: the lane lists the others as members too, and says so.
    index.upsert(Member("g", "m3", "203.0.113.1:8", "", "203.0.113.1", 6.0), 6.0)
    m3 = index._groups["g"]["m3"]
    assert index.keepalive("g", "m1", "203.0.113.1:7", "10.0.0.1", "203.0.113.1", 7.0) == (
        [m3, index._groups["g"]["m2"]], "203.0.113.1:8\n203.0.113.2:1", 1
    )
    index.remove("g", "m3")
    # m2 has expired (not yet swept): not listed, and no lines at hand
    assert index.keepalive("g", "m1", "203.0.113.1:7", "", "203.0.113.1", 40.0) == ([], None, 0)
    for i in range(70):
        index.upsert(Member("big", f"b{i}", f"203.0.113.{i % 50 + 1}:2", "", f"203.0.113.{i % 50 + 1}", 41.0), 41.0)
    assert index.keepalive("big", "b0", "203.0.113.1:2", "", "203.0.113.1", 42.0) is None  # a big group
