"""The `connect` session's decisions, driven with a fake clock and no sockets: bytes in
(tracker answers and peer messages built with the real codecs), datagrams and typed
events out."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.exit_codes import ExitCode
from nattool.protocol import connect_events as ev
from nattool.protocol.connect_options import DEFAULT_CONNECT_PORT, RelayMode
from nattool.protocol.connect_rules import (
    ED,
    EI,
    RELAY_AFTER,
    lan_candidates,
    mapping_of,
    verdict,
)
from nattool.protocol.connect_session import (
    DATA_RETRIES,
    FAST_REGISTER,
    IMPOSSIBLE_GRACE,
    LINGER,
    PROBE_FIRST,
    PROBE_MAX,
    RELAY_LEAVE_GRACE,
    UDP_GIVE_UP,
    UPGRADE_PROBE_MAX,
    ConnectSession,
    SessionConfig,
)
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.punch import Kind, PeerMessage, derive_key
from nattool.protocol.retransmit import backoff_schedule
from nattool.protocol.text import (
    ErrorReply,
    MemberEntry,
    MemberList,
    RegisterRequest,
    RelayGrant,
    RelayRequest,
    parse_request,
)
from nattool.protocol.stun import parse as parse_turn
from nattool.protocol.turn import TurnMethod, is_turn_message
from tests.relay_world import RelayWorld

GROUP = "session-test"
KEY = derive_key(GROUP)
ME = b"mine0001"
PEER = b"peer0001"
T1 = Endpoint.from_text("203.0.113.10:43283")
T2 = Endpoint.from_text("203.0.113.11:43283")
LOCAL = Endpoint.from_text("192.0.2.10:43284")
ME_PUB = Endpoint.from_text("198.51.100.1:43284")
PEER_PUB = Endpoint.from_text("198.51.100.2:43284")
PEER_NAT = Endpoint.from_text("198.51.100.2:50000")  # the peer's NAT toward us, a fresh port


def ep(text: str) -> Endpoint:
    return Endpoint.from_text(text)


def make(now: float = 0.0, trackers: tuple[Endpoint, ...] = (T1,), **cfg: object) -> ConnectSession:
    opts: dict[str, object] = {"timeout": 10.0, "keepalive": 1.0, "dead_after": 3.0, "register_every": 20.0}
    opts.update(cfg)
    return ConnectSession(SessionConfig(GROUP, trackers, **opts), ME, now, LOCAL)  # type: ignore[arg-type]


def drain(s: ConnectSession) -> list[object]:
    out = []
    while (event := s.next_event()) is not None:
        out.append(event)
    return out


def peer_msgs(s: ConnectSession, now: float) -> list[tuple[PeerMessage, Endpoint]]:
    """The peer messages among what the session sends now (registrations skipped)."""
    out = []
    for data, dest in s.datagrams_to_send(now):
        if data.startswith(b"NtC1"):
            out.append((PeerMessage.from_wire(data, KEY), dest))
    return out


def pings(s: ConnectSession, now: float) -> list[tuple[int, Endpoint]]:
    return [(m.seq, dest) for m, dest in peer_msgs(s, now) if m.kind == Kind.PING]


def wire(kind: Kind, seq: int, echo: int = 0, body: bytes = b"", sender: bytes = PEER) -> bytes:
    return PeerMessage(kind, sender, seq, echo, body).to_wire(KEY)


def members(me: Endpoint, *others: Endpoint, lan: tuple[str, ...] = ()) -> bytes:
    return MemberList((MemberEntry(me), *(MemberEntry(o, lan) for o in others))).to_wire()


def joined(now: float = 0.0, **cfg: object) -> ConnectSession:
    """A session that registered at T1 and learnt one member, PEER_PUB."""
    s = make(now, **cfg)
    s.datagrams_to_send(now)
    s.receive_datagram(members(ME_PUB, PEER_PUB), T1, now)
    return s


def connected(now: float = 0.0, **cfg: object) -> ConnectSession:
    """A session with a path up to PEER at PEER_PUB (pong at now + 0.02), that registered
    again FAST_REGISTER s later (the next registration is register_every s away)."""
    s = joined(now, **cfg)
    ((seq, dest),) = pings(s, now)
    s.receive_datagram(wire(Kind.PONG, 1, seq, ME_PUB.to_text().encode()), dest, now + 0.02)
    s.handle_timer(now + FAST_REGISTER)
    assert [d for _, d in s.datagrams_to_send(now + FAST_REGISTER)] == [T1]
    s.receive_datagram(members(ME_PUB, PEER_PUB), T1, now + FAST_REGISTER)
    drain(s)
    return s


# --------------------------------------------------------------------------- registration


def test_registers_at_once_and_retransmits_with_doubling_backoff_then_tries_the_original_form() -> None:
    s = make(trackers=(T1,), tracker_timeout=2.0, retries=3)
    seed = RegisterRequest(GROUP, form="seed").to_wire()
    original = RegisterRequest(GROUP, form="original").to_wire()
    assert s.datagrams_to_send(0.0) == [(seed, T1)]
    # An unknown dialect gets half the tracker timeout per form: 1/15, 2/15, 4/15, 8/15 s.
    assert backoff_schedule(1.0, 3) == pytest.approx([1 / 15, 2 / 15, 4 / 15, 8 / 15])
    sends = []
    now = 0.0
    while len(sends) < 8:
        now = s.get_timer()
        assert now is not None
        s.handle_timer(now)
        sends += [(now, data) for data, _ in s.datagrams_to_send(now)]
    assert [t for t, _ in sends] == pytest.approx([1 / 15, 3 / 15, 7 / 15, 1.0, 16 / 15, 18 / 15, 22 / 15, 2.5])
    # Silent to the seed form for 1 s: the original client's form (4 sends), then a new
    # round FAST_REGISTER after that one expired, in the seed form again (nothing learnt).
    assert [d for _, d in sends] == [seed] * 3 + [original] * 4 + [seed]


def test_retries_zero_sends_each_form_once() -> None:
    s = make(tracker_timeout=2.0, retries=0)
    assert len(s.datagrams_to_send(0.0)) == 1
    assert s.get_timer() == pytest.approx(1.0)
    s.handle_timer(1.0)
    assert [d for d, _ in s.datagrams_to_send(1.0)] == [RegisterRequest(GROUP, form="original").to_wire()]


def expire_seed(s: ConnectSession, now: float) -> tuple[float, bytes]:
    """Drive the timer until the registration switches to the original form."""
    for _ in range(20):
        now = s.get_timer()  # type: ignore[assignment]
        s.handle_timer(now)
        sent = [d for d, dest in s.datagrams_to_send(now) if dest == T1]
        if sent == [RegisterRequest(GROUP, form="original").to_wire()]:
            return now, sent[0]
    raise AssertionError("never tried the original form")


def test_the_original_form_is_remembered_after_two_rounds_and_carries_no_lan_without_an_id() -> None:
    s = make(lan=("10.0.0.5",), tracker_timeout=2.0, retries=0)
    (seed, _), = s.datagrams_to_send(0.0)
    assert seed == RegisterRequest(GROUP, lan=("10.0.0.5",)).to_wire()
    now, original = expire_seed(s, 0.0)
    # No all-zero MAC in front of our LAN address: every such member would be one to the tracker.
    assert original == RegisterRequest(GROUP, form="original").to_wire()
    s.receive_datagram(members(ME_PUB), T1, now + 0.01)
    assert s.registrations[T1].form is None  # one answer might be a late one to the seed form
    assert drain(s) == [ev.Registered(T1, ME_PUB, "original")]
    now, _ = expire_seed(s, now)  # the next round asks in the seed form first again
    s.receive_datagram(members(ME_PUB), T1, now + 0.01)
    assert s.registrations[T1].form == "original"
    s.handle_timer(now + 0.01 + FAST_REGISTER)
    assert [d for d, _ in s.datagrams_to_send(now + 0.6)] == [original]  # straight to the original form


def test_with_an_id_the_original_form_carries_the_lan_list() -> None:
    s = make(lan=("10.0.0.5",), identity="aa:bb:cc:dd:ee:ff", tracker_timeout=2.0, retries=0)
    s.datagrams_to_send(0.0)
    s.handle_timer(1.0)
    assert [d for d, _ in s.datagrams_to_send(1.0)] == [
        RegisterRequest(GROUP, lan=("10.0.0.5",), identity="aa:bb:cc:dd:ee:ff", form="original").to_wire()
    ]
    assert b"aa:bb:cc:dd:ee:ff-10.0.0.5" in RegisterRequest(GROUP, lan=("10.0.0.5",), identity="aa:bb:cc:dd:ee:ff",
                                                           form="original").to_wire()


def test_answer_registers_learns_member_and_pings_it_then_registers_again_fast() -> None:
    s = make()
    s.datagrams_to_send(0.0)
    s.receive_datagram(members(ME_PUB, PEER_PUB, lan=("10.0.0.7",)), T1, 0.2)
    assert drain(s) == [ev.Registered(T1, ME_PUB, "seed"), ev.MemberSeen(PEER_PUB, ("10.0.0.7",), T1)]
    sent = pings(s, 0.2)
    # Its public endpoint, and its LAN address at its public port (= our port = the default here).
    assert [dest for _, dest in sent] == [PEER_PUB, ep("10.0.0.7:43284")]
    # No path yet: the next registration comes FAST_REGISTER after the answer, in the known form.
    s.handle_timer(0.2 + FAST_REGISTER)
    assert [d for d, dest in s.datagrams_to_send(0.7) if dest == T1] == [RegisterRequest(GROUP).to_wire()]


def test_a_refusal_ends_the_registration_and_junk_does_not() -> None:
    s = make()
    s.datagrams_to_send(0.0)
    s.receive_datagram(b"\x00junk", T1, 0.01)
    assert s.registrations[T1].trying == "seed"
    s.receive_datagram(ErrorReply("group full").to_wire(), T1, 0.02)
    assert s.registrations[T1].trying is None
    assert s.registrations[T1].next_round == pytest.approx(0.02 + FAST_REGISTER)
    assert drain(s) == []


# --------------------------------------------------------------------------- probing and paths


def test_probes_back_off_from_probe_first_to_probe_max() -> None:
    s = joined()
    times = [0.0]
    pings(s, 0.0)
    now = 0.0
    while now < 6.0:
        now = s.get_timer()
        assert now is not None and now > times[-1] - 1e-9
        s.handle_timer(now)
        if any(dest == PEER_PUB for _, dest in pings(s, now)):
            times.append(now)
    gaps = [round(b - a, 6) for a, b in zip(times, times[1:])]
    assert gaps[:4] == pytest.approx([PROBE_FIRST, 0.15, 0.225, 0.3375])
    assert max(gaps) == pytest.approx(PROBE_MAX)


def test_path_is_up_only_for_a_pong_from_the_very_endpoint_pinged() -> None:
    s = joined()
    ((seq, dest),) = pings(s, 0.0)
    assert dest == PEER_PUB
    # The pong comes back from another port: a candidate, not a path.
    s.receive_datagram(wire(Kind.PONG, 1, seq, b"198.51.100.1:43284"), PEER_NAT, 0.05)
    assert [e for e in drain(s) if isinstance(e, ev.PathUp)] == []
    assert s.cands[PEER_NAT].source == ev.CandidateSource.PEER_REFLEXIVE
    assert s.connected_peers() == []
    # A pong for a ping we never sent is counted and ignored.
    s.receive_datagram(wire(Kind.PONG, 2, 999), PEER_PUB, 0.06)
    assert s.counters["stale_pong"] == 1
    s.handle_timer(0.1)
    ((seq2, dest2),) = [p for p in pings(s, 0.1) if p[1] == PEER_PUB]
    s.receive_datagram(wire(Kind.PONG, 3, seq2, b"198.51.100.1:43284"), PEER_PUB, 0.13)
    ups = [e for e in drain(s) if isinstance(e, ev.PathUp)]
    assert len(ups) == 1
    up = ups[0]
    assert (up.peer_id, up.endpoint, up.kind, up.source, up.observed_as) == (
        PEER.hex(), PEER_PUB, ev.PathKind.INTERNET, ev.CandidateSource.TRACKER, "198.51.100.1:43284"
    )
    assert (up.rtt, up.open_time, up.since_start) == pytest.approx((0.03, 0.13, 0.13))
    assert s.connected_peers() == [PEER.hex()]


def test_a_wrong_key_or_a_replay_is_dropped() -> None:
    s = joined()
    ((seq, dest),) = pings(s, 0.0)
    s.receive_datagram(PeerMessage(Kind.PONG, PEER, 1, seq).to_wire(derive_key("other")), dest, 0.01)
    assert s.counters["bad_mac"] == 1 and s.connected_peers() == []
    good = wire(Kind.PING, 5)
    s.receive_datagram(good, PEER_PUB, 0.02)
    s.receive_datagram(good, PEER_PUB, 0.03)
    assert s.counters["replayed"] == 1


def test_peer_reflexive_ping_is_answered_and_pinged_back_at_once() -> None:
    s = joined()
    pings(s, 0.0)
    s.receive_datagram(wire(Kind.PING, 1), PEER_NAT, 0.3)
    sent = peer_msgs(s, 0.3)
    pong = [(m, d) for m, d in sent if m.kind == Kind.PONG]
    assert [(m.echo, m.body, d) for m, d in pong] == [(1, PEER_NAT.to_text().encode(), PEER_NAT)]
    assert PEER_NAT in [d for m, d in sent if m.kind == Kind.PING]
    assert s.cands[PEER_NAT].source == ev.CandidateSource.PEER_REFLEXIVE
    assert s.cands[PEER_NAT].peer == PEER


def test_keepalive_then_dead_after_gives_path_down_and_probing_again() -> None:
    s = connected(keepalive=1.0, dead_after=3.0)
    assert s.get_timer() == pytest.approx(1.02)  # the keepalive
    s.handle_timer(1.02)
    assert [d for _, d in pings(s, 1.02)] == [PEER_PUB]
    now = 1.02
    while True:
        now = s.get_timer()  # type: ignore[assignment]
        s.handle_timer(now)
        downs = [e for e in drain(s) if isinstance(e, ev.PathDown)]
        if downs:
            break
        s.datagrams_to_send(now)
    assert now == pytest.approx(3.02)
    assert downs == [ev.PathDown(PEER.hex(), PEER_PUB, ev.PathKind.INTERNET, "no answer for 3.0s")]
    assert s.connected_peers() == []
    # Probed again at once, and registered again at once (the peer may have moved).
    out = s.datagrams_to_send(now)
    assert PEER_PUB in [d for data, d in out if data.startswith(b"NtC1")]
    assert T1 in [d for _, d in out]


def test_an_answer_keeps_the_path_up() -> None:
    s = connected(keepalive=1.0, dead_after=3.0)
    for t in (1.02, 2.02, 3.02, 4.02):
        s.handle_timer(t)
        for seq, dest in pings(s, t):
            s.receive_datagram(wire(Kind.PONG, int(t * 100), seq), dest, t + 0.01)
    assert [e for e in drain(s) if isinstance(e, ev.PathDown)] == []
    assert s.connected_peers() == [PEER.hex()]


def test_bye_takes_the_path_down_at_once() -> None:
    s = connected()
    s.receive_datagram(wire(Kind.BYE, 10), PEER_PUB, 0.5)
    assert drain(s) == [ev.PathDown(PEER.hex(), PEER_PUB, ev.PathKind.INTERNET, "the peer left")]


def test_a_lan_path_is_preferred_over_an_internet_one() -> None:
    s = make(lan=("10.0.0.5",))
    s.datagrams_to_send(0.0)
    s.receive_datagram(members(ME_PUB, PEER_PUB, lan=("10.0.0.7",)), T1, 0.0)
    sent = dict((d, seq) for seq, d in pings(s, 0.0))
    lan_ep = ep("10.0.0.7:43284")
    s.receive_datagram(wire(Kind.PONG, 1, sent[PEER_PUB]), PEER_PUB, 0.01)
    s.receive_datagram(wire(Kind.PONG, 2, sent[lan_ep]), lan_ep, 0.02)
    ups = [e for e in drain(s) if isinstance(e, ev.PathUp)]
    assert [(u.endpoint, u.kind, u.source) for u in ups] == [
        (PEER_PUB, ev.PathKind.INTERNET, ev.CandidateSource.TRACKER),
        (lan_ep, ev.PathKind.LAN, ev.CandidateSource.LAN_GUESS),
    ]
    assert s.peers[PEER].active == lan_ep


# --------------------------------------------------------------------------- data


def test_data_is_retransmitted_until_acked() -> None:
    s = connected(keepalive=100.0, dead_after=200.0)
    assert s.send(b"hello", 1.0) == 1
    ((msg, dest),) = peer_msgs(s, 1.0)
    assert (msg.kind, msg.body, dest) == (Kind.DATA, b"hello", PEER_PUB)
    assert s.get_timer() == pytest.approx(1.0 + DATA_RETRIES[0])
    s.handle_timer(1.3)
    ((again, _),) = peer_msgs(s, 1.3)
    assert (again.kind, again.echo) == (Kind.DATA, msg.echo)
    s.receive_datagram(wire(Kind.ACK, 20, msg.echo), PEER_PUB, 1.35)
    assert s.outgoing == []
    s.handle_timer(5.0)
    assert [m for m, _ in peer_msgs(s, 5.0) if m.kind == Kind.DATA] == []


def test_data_without_ack_is_given_up_after_every_retry() -> None:
    s = connected(keepalive=100.0, dead_after=200.0)
    s.send(b"lost", 1.0)
    sends = [1.0]
    peer_msgs(s, 1.0)
    undelivered: list[object] = []
    now = 1.0
    while not undelivered:
        now = s.get_timer()  # type: ignore[assignment]
        s.handle_timer(now)
        if [m for m, _ in peer_msgs(s, now) if m.kind == Kind.DATA]:
            sends.append(now)
        undelivered = [e for e in drain(s) if isinstance(e, ev.Undelivered)]
    gaps = [round(b - a, 6) for a, b in zip(sends, sends[1:])]
    assert gaps == pytest.approx(list(DATA_RETRIES))
    assert undelivered == [ev.Undelivered(PEER.hex(), PEER_PUB, "no ack")]


def test_received_data_is_acked_every_time_and_delivered_once() -> None:
    s = connected()
    for seq in (30, 31):
        s.receive_datagram(wire(Kind.DATA, seq, 7, b"hi"), PEER_PUB, 0.5)
        acks = [(m.kind, m.echo) for m, _ in peer_msgs(s, 0.5)]
        assert acks == [(Kind.ACK, 7)]
    assert drain(s) == [ev.MessageReceived(PEER.hex(), PEER_PUB, b"hi")]


def test_a_message_sent_before_any_path_waits_for_the_first() -> None:
    s = joined()
    pings(s, 0.0)
    drain(s)
    assert s.send(b"early", 0.0) == 0
    assert drain(s) == [ev.Queued()]
    s.receive_datagram(wire(Kind.PONG, 1, 1), PEER_PUB, 0.1)  # our first ping had seq 1
    assert [(m.kind, m.body) for m, _ in peer_msgs(s, 0.1) if m.kind == Kind.DATA] == [(Kind.DATA, b"early")]


def test_input_end_leaves_once_delivered() -> None:
    s = connected()
    s.send(b"last", 1.0)
    ((msg, _),) = peer_msgs(s, 1.0)
    s.close_when_delivered(1.0)
    assert s.ended is None  # not acknowledged yet
    s.receive_datagram(wire(Kind.ACK, 40, msg.echo), PEER_PUB, 1.01)
    assert [m.kind for m, _ in peer_msgs(s, 1.01)] == [Kind.BYE]
    assert drain(s)[-1] == ev.SessionEnded(ExitCode.OK, "input ended and every line was delivered")


def test_once_ends_linger_seconds_after_the_path_is_up() -> None:
    s = connected(once=True)
    end, seen = run_until_end(s)
    assert end == pytest.approx(0.02 + LINGER)
    assert seen == [ev.SessionEnded(ExitCode.OK, "a path was up")]
    assert s.get_timer() is None
    s.receive_datagram(wire(Kind.PING, 50), PEER_PUB, 2.0)
    assert s.datagrams_to_send(2.0) == []  # an ended session answers nothing


# --------------------------------------------------------------------------- giving up


def run_until_end(s: ConnectSession, limit: float = 100.0) -> tuple[float, list[object]]:
    seen: list[object] = []
    now = 0.0
    while s.ended is None:
        when = s.get_timer()
        assert when is not None and when >= now and when < limit
        now = when
        s.handle_timer(now)
        s.datagrams_to_send(now)
        seen += drain(s)
    return now, seen


def test_no_tracker_answering_gives_up_after_timeout_with_exit_3() -> None:
    end, seen = run_until_end(make(timeout=4.0))
    assert end == pytest.approx(4.0)
    assert [type(e) for e in seen] == [ev.GaveUp, ev.SessionEnded]
    assert "no tracker answered within 4s" in seen[0].reason  # type: ignore[attr-defined]
    assert seen[-1].exit_code == ExitCode.TIMEOUT  # type: ignore[attr-defined]


def test_alone_in_the_group_gives_up_with_exit_3() -> None:
    s = make(timeout=4.0)
    s.datagrams_to_send(0.0)
    s.receive_datagram(members(ME_PUB), T1, 0.1)
    end, seen = run_until_end(s)
    assert end == pytest.approx(4.0)
    gave_up = [e for e in seen if isinstance(e, ev.GaveUp)]
    assert [g.reason for g in gave_up] == ["no other member joined the group within 4s"]
    assert seen[-1] == ev.SessionEnded(ExitCode.TIMEOUT, "no other member joined the group within 4s")


def test_member_never_answering_is_given_up_at_timeout_with_exit_1() -> None:
    s = joined(timeout=4.0)
    end, seen = run_until_end(s)
    assert end == pytest.approx(4.0)
    (gave_up,) = [e for e in seen if isinstance(e, ev.GaveUp)]
    assert gave_up.member == PEER_PUB and not gave_up.impossible and gave_up.tried == pytest.approx(4.0)
    assert gave_up.verdict is not None and gave_up.verdict.mine is None  # one tracker: unknown
    assert seen[-1].exit_code == ExitCode.FAILURE  # type: ignore[attr-defined]


def test_both_symmetric_is_impossible_after_the_grace_not_the_timeout() -> None:
    s = make(trackers=(T1, T2), timeout=30.0)
    s.datagrams_to_send(0.0)
    # Each tracker sees us, and the member, at another port: both map per destination.
    s.receive_datagram(members(ep("198.51.100.1:1001"), ep("198.51.100.2:2001")), T1, 0.1)
    s.receive_datagram(members(ep("198.51.100.1:1002"), ep("198.51.100.2:2002")), T2, 0.1)
    end, seen = run_until_end(s)
    assert end == pytest.approx(0.1 + IMPOSSIBLE_GRACE)
    gave_up = [e for e in seen if isinstance(e, ev.GaveUp)]
    assert {g.member for g in gave_up} == {ep("198.51.100.2:2001"), ep("198.51.100.2:2002")}
    assert all(g.impossible and "relay" in g.reason for g in gave_up)
    assert gave_up[0].verdict.mine == gave_up[0].verdict.theirs == ED  # type: ignore[union-attr]
    assert seen[-1].exit_code == ExitCode.FAILURE  # type: ignore[attr-defined]


def test_no_tracker_reachable_ends_as_unreachable_not_timeout() -> None:
    s = make(trackers=(T1, T2))
    s.datagrams_to_send(0.0)
    s.send_failed(T1, "cannot send to T1: Network is unreachable", 0.0)
    assert s.ended is None  # T2 may still work
    s.send_failed(PEER_PUB, "a candidate", 0.0)
    s.send_failed(T2, "cannot send to T2: Network is unreachable", 0.0)
    assert drain(s) == [ev.SessionEnded(ExitCode.UNREACHABLE, "cannot send to T2: Network is unreachable")]


def test_the_timer_never_spins() -> None:
    """Every timer fires into work that moves it on: driving a whole session to its end
    takes a bounded number of wake-ups."""
    s = joined(timeout=6.0)
    wakeups = 0
    while s.ended is None:
        now = s.get_timer()
        assert now is not None
        s.handle_timer(now)
        s.datagrams_to_send(now)
        wakeups += 1
        assert wakeups < 200
    assert s.ended.exit_code == ExitCode.FAILURE


# --------------------------------------------------------------------------- verdicts


def test_lan_candidates_guess_the_ports_a_member_listens_on() -> None:
    got = [e.to_text() for e in lan_candidates(("192.0.2.11", "bad"), 5000, 6000)]
    assert got == ["192.0.2.11:5000", "192.0.2.11:6000", f"192.0.2.11:{DEFAULT_CONNECT_PORT}"]


def test_mapping_of_needs_two_trackers_and_tells_ei_from_ed() -> None:
    same = ep("198.51.100.2:43284")
    assert mapping_of({T1: same}, LOCAL)[0] is None
    assert mapping_of({T1: same, T2: same}, LOCAL)[0] == EI
    kind, why = mapping_of({T1: same, T2: ep("198.51.100.2:999")}, LOCAL)
    assert kind == ED and "203.0.113.10:43283 saw 198.51.100.2:43284" in why


def test_verdict_is_impossible_only_when_both_map_per_destination() -> None:
    assert verdict(ED, ED)[0] is True
    assert [verdict(m, t)[0] for m, t in ((ED, EI), (EI, ED), (EI, EI), (None, None), (None, ED))] == [False] * 5
    assert "your NAT" in verdict(ED, None)[1] and "the peer's NAT" in verdict(EI, ED)[1]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([T1, PEER_PUB, PEER_NAT]))
def test_random_bytes_never_raise(data: bytes, src: Endpoint) -> None:
    s = joined()
    s.receive_datagram(data, src, 0.5)
    s.receive_datagram(b"NtC1" + data, src, 0.5)
    assert s.connected_peers() == []


def test_the_session_modules_are_pure() -> None:
    """No socket, clock, randomness, OS or event loop in the session: what it needs comes
    in as arguments (the house rule for nattool/protocol)."""
    import ast
    from pathlib import Path

    import nattool.protocol

    forbidden = {"socket", "time", "random", "os", "asyncio", "secrets", "select", "threading"}
    root = Path(nattool.protocol.__file__).parent
    for name in ("connect_session.py", "connect_events.py", "connect_rules.py", "turn_client.py",
                 "natpmp.py", "pcp.py", "upnp_igd.py", "portmap_client.py"):
        tree = ast.parse((root / name).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
        assert imported, name
        assert not imported & forbidden, (name, imported & forbidden)


def test_a_peer_reflexive_path_counts_for_the_member_the_tracker_listed() -> None:
    """A symmetric NAT reaches us from a fresh port: the path is up there, and the member
    the tracker listed at that IP is this peer, not one to give up on."""
    s = joined(timeout=4.0)
    pings(s, 0.0)
    s.receive_datagram(wire(Kind.PING, 1), PEER_NAT, 0.2)
    (seq,) = [m.seq for m, d in peer_msgs(s, 0.2) if m.kind == Kind.PING and d == PEER_NAT]
    s.receive_datagram(wire(Kind.PONG, 2, seq, b"198.51.100.1:43284"), PEER_NAT, 0.25)
    (up,) = [e for e in drain(s) if isinstance(e, ev.PathUp)]
    assert (up.endpoint, up.kind, up.source) == (PEER_NAT, ev.PathKind.INTERNET, ev.CandidateSource.PEER_REFLEXIVE)
    assert s.members[PEER_PUB].peer == PEER
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):  # keep the path alive past the timeout
        s.handle_timer(t)
        for seq, dest in pings(s, t):
            s.receive_datagram(wire(Kind.PONG, int(t * 10), seq), dest, t)
    assert [e for e in drain(s) if isinstance(e, ev.GaveUp)] == []
    assert s.ended is None


# --------------------------------------------------------------------------- the relay


class MiniNet:
    """Two sessions, one tracker T1 that relays (RelayWorld: the project's TurnCore),
    and a switch for the direct path between the two public endpoints (off: two
    symmetric NATs; on: punching works). Public endpoints are the sessions' own."""

    def __init__(self, relay: RelayMode = RelayMode.AUTO, *, relay_on: bool = True, relay_answers: bool = True,
                 direct: bool = False, **cfg: object) -> None:
        self.world = RelayWorld(T1, relay_groups=True)
        self.relay_on = relay_on
        self.relay_answers = relay_answers
        self.direct = direct
        self.now = 0.0
        opts: dict[str, object] = {"timeout": 30.0, "keepalive": 1.0, "dead_after": 3.0, "relay": relay}
        opts.update(cfg)
        self.pub = {"a": ep("198.51.100.1:43284"), "b": ep("198.51.100.2:43284")}
        self.sessions = {
            name: ConnectSession(SessionConfig(GROUP, (T1,), **opts), sender, 0.0, ep(f"192.0.2.{i}:43284"))  # type: ignore[arg-type]
            for i, (name, sender) in enumerate((("a", b"sessionA"), ("b", b"sessionB")), start=10)
        }
        self.registered: list[str] = []
        self.events: dict[str, list[object]] = {"a": [], "b": []}
        self.sent: dict[str, list[tuple[bytes, Endpoint]]] = {"a": [], "b": []}

    def by_pub(self, endpoint: Endpoint) -> str:
        return next(n for n, p in self.pub.items() if p == endpoint)

    def to_tracker(self, name: str, data: bytes) -> None:
        s, me = self.sessions[name], self.pub[name]
        if is_turn_message(data):
            for client, reply in self.world.deliver(data, me, self.now):
                self.sessions[self.by_pub(client)].receive_datagram(reply, T1, self.now)
            return
        request = parse_request(data)
        if isinstance(request, RegisterRequest):
            if name not in self.registered:
                self.registered.append(name)
            others = [self.pub[n] for n in self.registered if n != name]
            s.receive_datagram(members(me, *others), T1, self.now)
        elif isinstance(request, RelayRequest) and self.relay_answers:
            if not self.relay_on:
                s.receive_datagram(ErrorReply("relay off").to_wire(), T1, self.now)
                return
            g = self.world.grant(GROUP, self.now)
            grant = RelayGrant(g.username, g.password, g.lifetime, g.realm, g.relayed)
            s.receive_datagram(grant.to_wire(), T1, self.now)

    def step(self, until: float) -> None:
        while self.now < until:
            for name, s in self.sessions.items():
                timer = s.get_timer()
                if timer is not None and timer <= self.now:
                    s.handle_timer(self.now)
                for data, dest in s.datagrams_to_send(self.now):
                    self.sent[name].append((data, dest))
                    if dest == T1:
                        self.to_tracker(name, data)
                    elif self.direct and dest in self.pub.values():
                        self.sessions[self.by_pub(dest)].receive_datagram(data, self.pub[name], self.now)
                self.events[name] += drain(s)
            self.now = round(self.now + 0.01, 6)

    def ups(self, name: str) -> list[ev.PathUp]:
        return [e for e in self.events[name] if isinstance(e, ev.PathUp)]


def test_a_pair_punching_cannot_join_is_relayed_after_relay_after() -> None:
    net = MiniNet()
    net.step(RELAY_AFTER + 1.0)
    for name in "ab":
        [up] = net.ups(name)
        assert up.kind == ev.PathKind.RELAY and up.via == "relay"
        assert up.endpoint in net.world.sockets  # the other's relayed endpoint
        assert up.since_start == pytest.approx(RELAY_AFTER, abs=0.3)
        assert [e for e in net.events[name] if isinstance(e, ev.RelayAllocated)]
        assert not [e for e in net.events[name] if isinstance(e, ev.GaveUp)]
    a, b = net.sessions["a"], net.sessions["b"]
    a.send(b"across the relay", net.now)
    net.step(net.now + 0.5)
    got = [e for e in net.events["b"] if isinstance(e, ev.MessageReceived)]
    assert [m.data for m in got] == [b"across the relay"]
    # The relay saw the peer message inside a Send indication, byte for byte as a direct
    # path would carry it: authenticated end to end with the group key.
    assert got[0].peer_id == b"sessionA".hex()
    assert not net.world.outside
    # The member the tracker listed is this peer: not given up while relayed.
    net.step(40.0)
    assert not [e for e in net.events["a"] + net.events["b"] if isinstance(e, (ev.GaveUp, ev.PathDown))]
    # Direct probing goes on (for an upgrade), after `timeout` s slowly.
    mark = len(net.sent["a"])
    net.step(70.0)
    direct = [d for d, dest in net.sent["a"][mark:] if dest == net.pub["b"]]
    assert 2 <= len(direct) <= 30 / UPGRADE_PROBE_MAX + 1


def test_a_direct_path_takes_over_from_the_relay() -> None:
    net = MiniNet()
    net.step(RELAY_AFTER + 1.0)
    assert [u.via for u in net.ups("a")] == ["relay"]
    net.direct = True  # e.g. a NAT's filtering let go: direct probing is still on
    net.step(net.now + 2.0)
    for name, other in (("a", "b"), ("b", "a")):
        relayed, direct = net.ups(name)
        assert (relayed.via, direct.via) == ("relay", "direct")
        assert relayed.peer_id == direct.peer_id and direct.endpoint == net.pub[other]
        assert not [e for e in net.events[name] if isinstance(e, ev.PathDown)]
    mark = len(net.sent["a"])
    net.sessions["a"].send(b"now direct", net.now)
    net.step(net.now + 0.2)
    data = [(PeerMessage.from_wire(d, KEY), dest) for d, dest in net.sent["a"][mark:] if d.startswith(b"NtC1")]
    assert [dest for m, dest in data if m.kind == Kind.DATA] == [net.pub["b"]]


def test_a_direct_path_first_means_no_relay_pings() -> None:
    net = MiniNet(direct=True)
    net.step(RELAY_AFTER + 2.0)
    assert [u.via for u in net.ups("a")] == ["direct"]
    relayed_sends = [d for d, dest in net.sent["a"] if dest == T1 and is_turn_message(d) and d[1] == 0x16]
    assert not relayed_sends  # no Send indication: the relay was allocated, never used


def test_relay_never_is_todays_behaviour_no_relay_request_at_all() -> None:
    net = MiniNet(RelayMode.NEVER, timeout=6.0)
    net.step(8.0)
    for name in "ab":
        assert not [d for d, _ in net.sent[name] if d.startswith(b"//relay/") or is_turn_message(d)]
        assert not net.ups(name)
        assert net.sessions[name].ended is not None and net.sessions[name].ended.exit_code == ExitCode.FAILURE
        assert not [e for e in net.events[name] if isinstance(e, (ev.RelayLost, ev.StreamWanted))]


@pytest.mark.parametrize("relay_on,answers", [(False, True), (True, False)], ids=["relay-off", "old-tracker"])
def test_without_a_relay_auto_ends_as_never_does(relay_on: bool, answers: bool) -> None:
    ends = {}
    for mode in (RelayMode.AUTO, RelayMode.NEVER):
        net = MiniNet(mode, relay_on=relay_on, relay_answers=answers, timeout=6.0)
        net.step(8.0)
        ends[mode] = [(s.ended.exit_code, round(net.now, 0)) for s in net.sessions.values() if s.ended]
        assert not net.ups("a") and not net.ups("b")
        if mode == RelayMode.AUTO:
            assert [e.server for e in net.events["a"] if isinstance(e, ev.RelayLost)] == [None]
    assert ends[RelayMode.AUTO] == ends[RelayMode.NEVER]


def test_impossible_with_a_silent_old_tracker_still_gives_up_after_the_grace() -> None:
    s = make(trackers=(T1, T2), timeout=30.0, relay=RelayMode.AUTO)
    s.datagrams_to_send(0.0)
    s.receive_datagram(members(ep("198.51.100.1:1001"), ep("198.51.100.2:2001")), T1, 0.1)
    s.receive_datagram(members(ep("198.51.100.1:1002"), ep("198.51.100.2:2002")), T2, 0.1)
    end, seen = run_until_end(s)
    assert end == pytest.approx(0.1 + IMPOSSIBLE_GRACE)
    assert seen[-1].exit_code == ExitCode.FAILURE  # type: ignore[attr-defined]
    assert all(g.impossible for g in seen if isinstance(g, ev.GaveUp))


def test_relay_only_probes_no_direct_candidate_and_ignores_direct_messages() -> None:
    net = MiniNet(RelayMode.ONLY, direct=True)
    net.step(1.5)
    for name in "ab":
        [up] = net.ups(name)
        assert up.via == "relay" and up.since_start < 1.0  # no wait for RELAY_AFTER
        assert not [dest for d, dest in net.sent[name] if d.startswith(b"NtC1")]  # nothing direct
    s = net.sessions["a"]
    s.receive_datagram(wire(Kind.PING, 77, sender=b"sessionB"), net.pub["b"], net.now)
    assert s.counters["not_relayed"] == 1 and not peer_msgs(s, net.now)


def test_no_udp_answer_asks_for_tcp_streams_then_registers_over_them_at_once() -> None:
    s = make(trackers=(T1, T2), relay=RelayMode.AUTO)
    now = 0.0
    while now < UDP_GIVE_UP:
        now = s.get_timer()  # type: ignore[assignment]
        s.handle_timer(now)
        s.datagrams_to_send(now)
    assert now == pytest.approx(UDP_GIVE_UP)
    wanted = [e for e in drain(s) if isinstance(e, ev.StreamWanted)]
    assert [w.tracker for w in wanted] == [T1, T2]
    # Nothing more over UDP while the streams open.
    s.handle_timer(now + 0.5)
    assert s.datagrams_to_send(now + 0.5) == []
    s.stream_opened(T1, now + 0.6)
    sent = s.datagrams_to_send(now + 0.6)
    assert [dest for _, dest in sent] == [T1] and sent[0][0].startswith(b"//51pwn")
    s.stream_failed(T2, "connection refused", now + 0.7)
    assert T2 in [dest for _, dest in s.datagrams_to_send(now + 0.7)]  # back to UDP


def test_tcp_flag_asks_for_streams_at_once_and_never_does_not_fall_back() -> None:
    s = make(trackers=(T1,), relay=RelayMode.AUTO, tcp=True)
    assert [type(e) for e in drain(s)] == [ev.StreamWanted]
    assert s.datagrams_to_send(0.0) == []
    quiet = make(trackers=(T1,), relay=RelayMode.NEVER, timeout=5.0)
    _, seen = run_until_end(quiet)
    assert not [e for e in seen if isinstance(e, ev.StreamWanted)]


def test_via_is_direct_lan_or_relay() -> None:
    assert [k.via for k in ev.PathKind] == ["direct", "lan", "relay"]
    assert sorted(ev.PathKind, key=lambda k: k.rank) == [ev.PathKind.LAN, ev.PathKind.INTERNET, ev.PathKind.RELAY]


GRANT = RelayGrant("1800003600:g:0123456789abcdef", "cGFzc3dvcmQ=", 3600, "nattool").to_wire()


def turn_to(s: ConnectSession, now: float) -> list[Endpoint]:
    return [dest for data, dest in s.datagrams_to_send(now) if is_turn_message(data)]


def test_the_relay_is_the_first_tracker_in_order_that_grants_one() -> None:
    s = make(trackers=(T1, T2), relay=RelayMode.AUTO)
    s.datagrams_to_send(0.0)
    s.receive_datagram(members(ME_PUB, PEER_PUB), T2, 0.1)
    assert [d[:8] for d, dest in s.datagrams_to_send(0.1) if dest == T2] == [b"//relay/"]
    s.receive_datagram(GRANT, T2, 0.15)
    assert turn_to(s, 0.15) == []  # T1 comes first and has not said yet: the other member may pick it
    s.receive_datagram(members(ME_PUB, PEER_PUB), T1, 0.2)
    s.datagrams_to_send(0.2)
    s.receive_datagram(GRANT, T1, 0.25)
    assert turn_to(s, 0.25) == [T1]  # the Allocate


def test_a_silent_earlier_tracker_is_not_waited_for_beyond_one_registration() -> None:
    s = make(trackers=(T1, T2), relay=RelayMode.AUTO)
    s.datagrams_to_send(0.0)
    s.receive_datagram(members(ME_PUB, PEER_PUB), T2, 0.1)
    s.datagrams_to_send(0.1)
    s.receive_datagram(GRANT, T2, 0.15)
    now, allocate_at = 0.15, None
    while allocate_at is None and now < 5.0:
        now = s.get_timer()  # type: ignore[assignment]
        s.handle_timer(now)
        if T2 in turn_to(s, now):
            allocate_at = now
    assert allocate_at == pytest.approx(s.config.tracker_timeout, abs=0.1)  # T1's seed and original forms, unanswered


def test_relay_only_without_a_relay_ends_at_once_saying_so() -> None:
    net = MiniNet(RelayMode.ONLY, relay_on=False)
    net.step(1.0)
    for s in net.sessions.values():
        assert s.ended == ev.SessionEnded(ExitCode.FAILURE, "--relay only, and no tracker offers a relay")


def test_relay_only_ends_when_the_allocation_is_refused() -> None:
    net = MiniNet(RelayMode.ONLY)
    net.world.core.config = dataclasses.replace(net.world.core.config, max_allocations=0)  # the server is full
    net.step(1.0)
    for name, s in net.sessions.items():
        assert s.ended is not None and s.ended.exit_code == ExitCode.FAILURE
        assert [e.server for e in net.events[name] if isinstance(e, ev.RelayLost)] == [T1]


def test_leaving_through_the_relay_gives_the_allocation_back_a_moment_after_the_bye() -> None:
    net = MiniNet()
    net.step(RELAY_AFTER + 1.0)
    a = net.sessions["a"]
    mark, left_at = len(net.sent["a"]), net.now

    def turn_methods() -> list[int]:
        return [parse_turn(d).method for d, _ in net.sent["a"][mark:] if is_turn_message(d)]

    a.close_when_delivered(net.now)
    net.step(left_at + RELAY_LEAVE_GRACE / 2)
    assert set(turn_methods()) == {TurnMethod.SEND}  # the BYE (and what else was due), through the relay
    assert a.ended is None and net.world.core.live == 2
    assert [e.reason for e in net.events["b"] if isinstance(e, ev.PathDown)] == ["the peer left"]
    net.step(left_at + RELAY_LEAVE_GRACE + 0.05)
    methods = turn_methods()
    assert methods[-1] == TurnMethod.REFRESH and methods.count(TurnMethod.REFRESH) == 1  # then the allocation goes back
    assert a.ended == ev.SessionEnded(ExitCode.OK, "input ended and every line was delivered")
    assert net.world.core.live == 1
