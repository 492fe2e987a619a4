"""The `connect` session with a port mapping, driven with a fake clock and no sockets:
registering waits for the owner's mapping report, the mapped endpoint goes out as the
registration's <public>, a tracker that refuses it gets `0`, and a path the peer saw at
the mapped endpoint is of method PORTMAP."""

from __future__ import annotations

from typing import Optional

import pytest

from nattool.cli.connect_render import _human, event_fields
from nattool.diag.connect_portmap import worth_mapping
from nattool.protocol import connect_events as ev
from nattool.protocol.connect_events import MappingChange, PathMethod, PortMapped
from nattool.protocol.connect_options import RelayMode
from nattool.protocol.connect_session import FAST_REGISTER, PORTMAP_WAIT, UDP_GIVE_UP, ConnectSession
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.punch import Kind
from nattool.protocol.text import ErrorReply, RegisterRequest, parse_request
from tests.test_connect_session import LOCAL, PEER_NAT, PEER_PUB, T1, T2, drain, make, members, pings, wire

MAPPED = Endpoint.from_text("198.51.100.1:40001")  # the gateway's external endpoint for LOCAL
MAPPED2 = Endpoint.from_text("198.51.100.1:40002")
T6 = Endpoint.from_text("[2001:db8::10]:43283")


def granted(ext: Endpoint = MAPPED, change: MappingChange = MappingChange.GRANTED) -> PortMapped:
    return PortMapped(change, "pcp", ext, 7200.0)


def registrations(s: ConnectSession, now: float) -> dict[Endpoint, RegisterRequest]:
    """The registrations among what the session sends now, by tracker."""
    out = {}
    for data, dest in s.datagrams_to_send(now):
        if data.startswith(b"//"):
            req = parse_request(data)
            assert isinstance(req, RegisterRequest)
            out[dest] = req
    return out


def mapped_session(trackers: tuple[Endpoint, ...] = (T1, T2), **cfg: object) -> ConnectSession:
    """A session that asked for a mapping, got MAPPED at 0.3 s and sent its registrations."""
    s = make(0.0, trackers=trackers, portmap=True, **cfg)
    assert registrations(s, 0.0) == {}
    s.port_mapping(granted(), 0.3)
    regs = registrations(s, 0.3)
    assert set(regs) == set(trackers)
    return s


# --------------------------------------------------------------------------- waiting for the mapping


def test_registering_waits_for_the_mapping_report_at_most_portmap_wait() -> None:
    s = make(0.0, trackers=(T1, T2), portmap=True)
    assert registrations(s, 0.0) == {}
    assert s.get_timer() == pytest.approx(PORTMAP_WAIT)
    s.handle_timer(PORTMAP_WAIT - 0.01)
    assert registrations(s, PORTMAP_WAIT - 0.01) == {}
    s.handle_timer(PORTMAP_WAIT)
    regs = registrations(s, PORTMAP_WAIT)
    assert set(regs) == {T1, T2}
    assert all(r.public is None for r in regs.values())  # no report: `0`, as without a mapping
    # A mapping that comes late is offered at once, by a new registration everywhere.
    s.port_mapping(granted(), PORTMAP_WAIT + 0.2)
    assert {t: r.public for t, r in registrations(s, PORTMAP_WAIT + 0.2).items()} == {T1: MAPPED, T2: MAPPED}


def test_without_portmap_nothing_waits() -> None:
    s = make(0.0, trackers=(T1,))
    assert registrations(s, 0.0)[T1].public is None


def test_a_grant_ends_the_wait_and_the_mapped_endpoint_is_the_public_field() -> None:
    s = make(0.0, trackers=(T1, T2), portmap=True)
    s.port_mapping(granted(), 0.4)
    regs = registrations(s, 0.4)
    assert {t: r.public for t, r in regs.items()} == {T1: MAPPED, T2: MAPPED}
    assert drain(s) == [granted()]  # handed on as an event, in order
    # Later rounds keep offering it.
    s.receive_datagram(members(MAPPED, PEER_PUB), T1, 0.45)
    s.handle_timer(0.45 + FAST_REGISTER)
    assert registrations(s, 0.45 + FAST_REGISTER)[T1].public == MAPPED


def test_no_mapping_offered_registers_with_0_at_once() -> None:
    s = make(0.0, trackers=(T1,), portmap=True)
    none = PortMapped(MappingChange.NONE, reason="no gateway answered PCP, NAT-PMP or UPnP within 1 s")
    s.port_mapping(none, 0.9)
    assert registrations(s, 0.9)[T1].public is None
    assert drain(s) == [none]
    assert s.mapped is None


def test_tcp_fallback_counts_from_the_end_of_the_wait() -> None:
    s = make(0.0, trackers=(T1,), portmap=True, relay=RelayMode.AUTO, tracker_timeout=2.0)
    s.port_mapping(PortMapped(MappingChange.NONE), 0.25)
    registrations(s, 0.25)
    s.handle_timer(UDP_GIVE_UP + 0.125)  # 2.125 s after the start, 1.875 s of registering
    assert not [e for e in drain(s) if isinstance(e, ev.StreamWanted)]
    s.handle_timer(0.25 + UDP_GIVE_UP)
    assert [e.tracker for e in drain(s) if isinstance(e, ev.StreamWanted)] == [T1]


def test_a_late_no_mapping_report_changes_nothing() -> None:
    s = make(0.0, trackers=(T1,), portmap=True)
    s.handle_timer(PORTMAP_WAIT)
    assert registrations(s, PORTMAP_WAIT)[T1].public is None
    s.port_mapping(PortMapped(MappingChange.NONE), PORTMAP_WAIT + 0.01)  # before any retransmission
    assert registrations(s, PORTMAP_WAIT + 0.01) == {}  # the registration in flight goes on


# --------------------------------------------------------------------------- refusal (double NAT)


def test_a_tracker_refusing_the_mapped_endpoint_gets_0_at_once_and_from_then_on() -> None:
    s = mapped_session()
    drain(s)
    s.receive_datagram(ErrorReply("public ip differs from source ip").to_wire(), T1, 0.35)
    regs = registrations(s, 0.35)
    assert list(regs) == [T1] and regs[T1].public is None
    (refused,) = drain(s)
    assert refused == PortMapped(MappingChange.REFUSED, "pcp", MAPPED, None, "public ip differs from source ip", T1)
    # T1 answers `0` with the endpoint it sees; T2 takes the mapped endpoint.
    s.receive_datagram(members(Endpoint.from_text("100.64.0.2:6000")), T1, 0.36)
    s.receive_datagram(members(MAPPED), T2, 0.36)
    s.handle_timer(0.36 + FAST_REGISTER)
    regs = registrations(s, 0.36 + FAST_REGISTER)
    assert regs[T1].public is None and regs[T2].public == MAPPED
    # A new external endpoint is offered again, also to the tracker that refused the old one.
    s.port_mapping(granted(MAPPED2, MappingChange.RENEWED), 0.9)
    assert {t: r.public for t, r in registrations(s, 0.9).items()} == {T1: MAPPED2, T2: MAPPED2}


def test_a_refusal_of_a_registration_without_public_is_no_mapping_matter() -> None:
    s = make(0.0, trackers=(T1,))
    registrations(s, 0.0)
    s.receive_datagram(ErrorReply("tracker full").to_wire(), T1, 0.1)
    assert registrations(s, 0.1) == {}  # asked again next round, as before
    assert not [e for e in drain(s) if isinstance(e, PortMapped)]


def test_an_ipv4_mapping_is_not_offered_to_an_ipv6_tracker() -> None:
    s = make(0.0, trackers=(T1, T6), portmap=True)
    s.port_mapping(granted(), 0.2)
    assert {t: r.public for t, r in registrations(s, 0.2).items()} == {T1: MAPPED, T6: None}


# --------------------------------------------------------------------------- renewal and loss


def test_renewal_at_the_same_endpoint_registers_nothing_new() -> None:
    s = mapped_session()
    s.receive_datagram(members(MAPPED), T1, 0.35)
    s.receive_datagram(members(MAPPED), T2, 0.35)
    drain(s)
    s.port_mapping(granted(change=MappingChange.RENEWED), 0.6)
    assert registrations(s, 0.6) == {}  # the rounds go on at their pace (the next at 0.85 s)
    assert drain(s) == [granted(change=MappingChange.RENEWED)]


def test_a_moved_endpoint_restarts_the_registration_in_flight() -> None:
    s = mapped_session()
    s.port_mapping(granted(MAPPED2, MappingChange.RENEWED), 0.32)  # T1, T2 not answered yet
    assert {t: r.public for t, r in registrations(s, 0.32).items()} == {T1: MAPPED2, T2: MAPPED2}


def test_a_lost_mapping_is_withdrawn_at_once() -> None:
    s = mapped_session()
    s.receive_datagram(members(MAPPED), T1, 0.35)
    s.receive_datagram(members(MAPPED), T2, 0.35)
    lost = PortMapped(MappingChange.LOST, "pcp", MAPPED, None, "renewal unanswered")
    s.port_mapping(lost, 3.0)
    assert {t: r.public for t, r in registrations(s, 3.0).items()} == {T1: None, T2: None}
    assert s.mapped is None
    assert lost in drain(s)


def test_our_entry_from_before_the_mapping_is_no_member() -> None:
    # A late grant: registered with `0` first, then with the mapping; the tracker keeps the
    # old entry until its TTL and lists it among the members.
    s = make(0.0, trackers=(T1,), portmap=True)
    s.handle_timer(PORTMAP_WAIT)
    registrations(s, PORTMAP_WAIT)
    unmapped = Endpoint.from_text("198.51.100.1:61000")
    s.receive_datagram(members(unmapped), T1, 0.6)
    s.port_mapping(granted(), 0.7)
    assert registrations(s, 0.7)[T1].public == MAPPED
    s.receive_datagram(members(MAPPED, unmapped, PEER_PUB), T1, 0.71)
    assert [e.member for e in drain(s) if isinstance(e, ev.MemberSeen)] == [PEER_PUB]
    assert {d for _, d in pings(s, 0.71)} == {PEER_PUB}


# --------------------------------------------------------------------------- the path's method


def path_up(s: ConnectSession, now: float, observed_as: Endpoint) -> ev.PathUp:
    """The member PEER_PUB listed by T1, pinged; its pong says it saw us at ``observed_as``."""
    s.receive_datagram(members(MAPPED, PEER_PUB), T1, now)
    ((seq, dest),) = [(q, d) for q, d in pings(s, now) if d == PEER_PUB]
    s.receive_datagram(wire(Kind.PONG, 1, seq, observed_as.to_text().encode()), dest, now + 0.02)
    (up,) = [e for e in drain(s) if isinstance(e, ev.PathUp)]
    return up


def test_a_path_the_peer_saw_at_the_mapped_endpoint_is_portmap() -> None:
    up = path_up(mapped_session(), 0.4, MAPPED)
    assert (up.via, up.method, up.observed_as) == ("direct", PathMethod.PORTMAP, MAPPED.to_text())


def test_a_path_the_peer_saw_elsewhere_is_a_punch() -> None:
    # E.g. a gateway that maps inbound only: our pings left by another port.
    up = path_up(mapped_session(), 0.4, Endpoint.from_text("198.51.100.1:51000"))
    assert up.method == PathMethod.PUNCH


def test_without_a_mapping_the_same_pong_is_a_punch() -> None:
    s = make(0.0, trackers=(T1,))
    up = path_up(s, 0.1, MAPPED)
    assert up.method == PathMethod.PUNCH


def test_a_peer_reflexive_path_through_the_mapping_is_portmap() -> None:
    # The symmetric peer pings our mapped endpoint from a fresh port; we ping it back.
    s = mapped_session()
    s.receive_datagram(members(MAPPED, PEER_PUB), T1, 0.4)
    pings(s, 0.4)
    s.receive_datagram(wire(Kind.PING, 1), PEER_NAT, 0.5)
    ((seq, dest),) = [(q, d) for q, d in pings(s, 0.5) if d == PEER_NAT]
    s.receive_datagram(wire(Kind.PONG, 2, seq, MAPPED.to_text().encode()), PEER_NAT, 0.52)
    (up,) = [e for e in drain(s) if isinstance(e, ev.PathUp)]
    assert (up.endpoint, up.source, up.method) == (PEER_NAT, ev.CandidateSource.PEER_REFLEXIVE, PathMethod.PORTMAP)


def test_a_lost_mapping_makes_later_paths_punches() -> None:
    s = mapped_session()
    s.port_mapping(PortMapped(MappingChange.LOST, "pcp", MAPPED, None, "gone"), 0.35)
    assert path_up(s, 0.4, MAPPED).method == PathMethod.PUNCH


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    "event,fields,text",
    [
        (granted(), {"change": "granted", "protocol": "pcp", "external": "198.51.100.1:40001", "lifetime_s": 7200.0},
         "port mapping granted by PCP: 198.51.100.1:40001 for 7200 s, offered to the peers"),
        (PortMapped(MappingChange.REFUSED, "natpmp", MAPPED, None, "public ip differs from source ip", T1),
         {"change": "refused", "protocol": "natpmp", "tracker": T1.to_text()},
         "tracker 203.0.113.10:43283 refused the mapped endpoint 198.51.100.1:40001 (public ip differs from "
         "source ip): registered there with the endpoint it sees"),
        (PortMapped(MappingChange.LOST, "upnp", MAPPED, None, "renewal refused"),
         {"change": "lost", "reason": "renewal refused"},
         "port mapping 198.51.100.1:40001 lost (renewal refused): the peers get the endpoint the trackers see"),
        (PortMapped(MappingChange.NONE, reason="no gateway answered"), {"change": "none", "external": None},
         "no port mapping (no gateway answered)"),
    ],
    ids=["granted", "refused", "lost", "none"],
)
def test_the_event_as_json_and_text(event: PortMapped, fields: dict[str, object], text: str) -> None:
    out: Optional[dict[str, object]] = event_fields(event)
    assert out is not None and out["event"] == "portmap"
    assert {k: out.get(k) for k in fields} == fields
    assert _human(out) == text


# --------------------------------------------------------------------------- the shell's choice


@pytest.mark.parametrize(
    "trackers,bind,worth",
    [
        ((T1,), None, True),
        ((Endpoint.from_text("127.0.0.1:43283"),), None, False),  # no gateway on the way to loopback
        ((Endpoint.from_text("127.0.0.1:43283"), T1), None, True),
        ((T1,), "127.0.0.2", False),
        ((T1,), "192.0.2.10", True),
        ((Endpoint.from_text("[::1]:43283"),), None, False),
    ],
)
def test_a_mapping_is_asked_for_only_beyond_loopback(trackers: tuple[Endpoint, ...], bind: Optional[str],
                                                     worth: bool) -> None:
    assert worth_mapping(trackers, bind) is worth
