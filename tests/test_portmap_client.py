"""The PCP and NAT-PMP mappers as pure state machines on a fake clock: retransmission,
grant, renewal between 1/2 and 5/8 of the lifetime, loss, gateway reboot, delete; and
address classes."""

from __future__ import annotations

import ipaddress
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.protocol import natpmp, pcp
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.portmap_client import (
    ExternalAddress,
    MapperState,
    MappingDeleted,
    MappingFailed,
    MappingGranted,
    NatpmpMapper,
    PcpMapper,
    PortmapEvent,
    address_class,
    behind_another_nat,
    retransmit_waits,
)

CLIENT = ipaddress.ip_address("192.168.1.20")
EXTERNAL = ipaddress.ip_address("203.0.113.9")
NONCE = b"0123456789ab"


def events(mapper: PcpMapper | NatpmpMapper) -> list[PortmapEvent]:
    out = []
    while (event := mapper.next_event()) is not None:
        out.append(event)
    return out


def send_times(mapper: PcpMapper | NatpmpMapper, until: float) -> list[tuple[float, bytes]]:
    """Run the timers alone up to ``until``: when each datagram would go."""
    sent = [(0.0, d) for d in mapper.datagrams_to_send(0.0)]
    while (timer := mapper.get_timer()) is not None and timer <= until:
        mapper.handle_timer(timer)
        sent += [(timer, d) for d in mapper.datagrams_to_send(timer)]
    return sent


def pcp_answer(request: bytes, *, lifetime: Optional[int] = None, result: int = 0, epoch: int = 1000,
               external_port: int = 40000) -> bytes:
    """What a PCP gateway answers to ``request`` (built with the server side of the codec)."""
    req = pcp.parse_request(request)
    assert req.map is not None
    granted = req.lifetime if lifetime is None else lifetime
    data = pcp.MapData(req.map.nonce, req.map.protocol, req.map.internal_port,
                       external_port if result == 0 else req.map.external_port, EXTERNAL)
    return pcp.Response(pcp.Opcode.MAP, result, granted, epoch, data).to_wire()


# --------------------------------------------------------------------------- schedule


def test_retransmit_waits_double_and_end_at_the_bound() -> None:
    assert retransmit_waits(0.25, 1.0) == [0.25, 0.5, 0.25]
    assert retransmit_waits(0.25, 1.75) == [0.25, 0.5, 1.0]
    assert retransmit_waits(1.0, 200.0, cap=60.0) == [1, 2, 4, 8, 16, 32, 60, 60, 17]
    assert sum(retransmit_waits(0.25, 0.1)) == pytest.approx(0.1)


def test_first_request_retransmits_from_250ms_doubling_within_the_timeout() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0, timeout=1.75)
    sent = send_times(mapper, 10.0)
    assert [t for t, _ in sent] == [0.0, 0.25, 0.75]  # RFC 6886's 250 ms, doubling
    assert len({d for _, d in sent}) == 1  # the same request each time (same nonce)
    assert events(mapper) == [MappingFailed("pcp", None, "no PCP answer from the gateway")]
    assert mapper.state == MapperState.FAILED and mapper.get_timer() is None


# --------------------------------------------------------------------------- PCP


def test_pcp_grant_then_renewal_between_half_and_five_eighths() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0, lifetime=3600)
    request = mapper.datagrams_to_send(0.0)[0]
    mapper.receive_datagram(pcp_answer(request), 0.1)
    assert events(mapper) == [MappingGranted("pcp", 5000, Endpoint(EXTERNAL, 40000), 3600)]
    assert mapper.state == MapperState.MAPPED
    renew_at = mapper.get_timer()
    assert renew_at is not None and 0.1 + 1800 <= renew_at <= 0.1 + 2250
    mapper.handle_timer(renew_at)
    renewal = mapper.datagrams_to_send(renew_at)
    assert len(renewal) == 1
    req = pcp.parse_request(renewal[0])
    # A renewal carries the same nonce and suggests what it holds.
    assert req.map is not None and req.map.nonce == NONCE and req.map.external_port == 40000
    assert req.map.external_address == EXTERNAL and req.lifetime == 3600
    mapper.receive_datagram(pcp_answer(renewal[0], epoch=1000 + int(renew_at)), renew_at + 0.05)
    assert events(mapper) == [MappingGranted("pcp", 5000, Endpoint(EXTERNAL, 40000), 3600, renewal=True)]


def test_renewal_points_spread_over_the_window() -> None:
    points = []
    for i in range(200):
        mapper = PcpMapper(CLIENT, 5000, NONCE, bytes([i]) * 8, 0.0, lifetime=1000)
        mapper.receive_datagram(pcp_answer(mapper.datagrams_to_send(0.0)[0]), 0.0)
        points.append(mapper.renew_at)
    assert min(points) >= 500 and max(points) <= 625
    assert max(points) - min(points) > 100  # random, not one fixed point


def test_unanswered_renewals_lose_the_mapping_at_expiry() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0, lifetime=100)
    mapper.receive_datagram(pcp_answer(mapper.datagrams_to_send(0.0)[0]), 0.0)
    events(mapper)
    sent = send_times(mapper, 200.0)
    times = [t for t, _ in sent][1:]
    assert times[0] >= 50 and times[-1] < 100
    assert all(b - a <= 60 for a, b in zip(times, times[1:]))
    assert events(mapper) == [MappingFailed("pcp", None, "the mapping expired before a renewal was answered", lost=True)]
    assert mapper.external is None


def test_refused_renewal_loses_the_mapping() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0, lifetime=100)
    mapper.receive_datagram(pcp_answer(mapper.datagrams_to_send(0.0)[0]), 0.0)
    events(mapper)
    mapper.handle_timer(mapper.get_timer() or 0)
    renewal = mapper.datagrams_to_send(70.0)[0]
    mapper.receive_datagram(pcp_answer(renewal, result=pcp.ResultCode.NOT_AUTHORIZED, lifetime=600), 70.0)
    [event] = events(mapper)
    assert isinstance(event, MappingFailed) and event.lost and event.code == pcp.ResultCode.NOT_AUTHORIZED


def test_pcp_refusal_and_natpmp_gateway_answers() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0)
    request = mapper.datagrams_to_send(0.0)[0]
    mapper.receive_datagram(pcp_answer(request, result=pcp.ResultCode.NO_RESOURCES, lifetime=30), 0.1)
    assert events(mapper) == [MappingFailed("pcp", 8, "PCP NO_RESOURCES")]

    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0)
    request = mapper.datagrams_to_send(0.0)[0]
    natpmp_answer = natpmp.error_for_request(request, epoch=5)
    assert natpmp_answer is not None
    mapper.receive_datagram(natpmp_answer.to_wire(), 0.1)
    [event] = events(mapper)
    assert isinstance(event, MappingFailed) and event.unsupported and event.code == 1


def test_answers_for_other_mappings_and_junk_are_ignored() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0)
    request = mapper.datagrams_to_send(0.0)[0]
    other = pcp.map_request(CLIENT, b"x" * 12, 5000, 60).to_wire()
    mapper.receive_datagram(pcp_answer(other), 0.1)  # another nonce
    mapper.receive_datagram(b"\x02\x81junk", 0.1)
    mapper.receive_datagram(request, 0.1)  # our own request reflected
    assert events(mapper) == []
    assert mapper.counters["stale"] == 1 and mapper.counters["junk"] == 2
    mapper.receive_datagram(pcp_answer(request), 0.2)
    assert isinstance(events(mapper)[0], MappingGranted)


def test_delete_sends_lifetime_0_with_the_nonce_and_confirms() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0)
    mapper.receive_datagram(pcp_answer(mapper.datagrams_to_send(0.0)[0]), 0.0)
    events(mapper)
    mapper.delete(5.0)
    [delete] = mapper.datagrams_to_send(5.0)
    req = pcp.parse_request(delete)
    assert req.lifetime == 0 and req.map is not None and req.map.nonce == NONCE
    mapper.receive_datagram(pcp_answer(delete), 5.1)
    assert events(mapper) == [MappingDeleted("pcp", 5000, True)]
    assert mapper.state == MapperState.DELETED and mapper.get_timer() is None


def test_unanswered_delete_ends_within_the_delete_timeout() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0, delete_timeout=1.0)
    mapper.receive_datagram(pcp_answer(mapper.datagrams_to_send(0.0)[0]), 0.0)
    events(mapper)
    mapper.delete(10.0)
    mapper.datagrams_to_send(10.0)
    while (timer := mapper.get_timer()) is not None:
        mapper.handle_timer(timer)
        mapper.datagrams_to_send(timer)
        last = timer
    assert last == pytest.approx(11.0)
    assert events(mapper) == [MappingDeleted("pcp", 5000, False)]


def test_delete_while_still_asking_deletes_what_may_have_been_granted() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0)
    mapper.datagrams_to_send(0.0)
    mapper.delete(0.1)
    [delete] = mapper.datagrams_to_send(0.1)
    assert pcp.parse_request(delete).lifetime == 0


def test_delete_after_an_unanswered_request_still_goes() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0, timeout=1.0)
    send_times(mapper, 5.0)
    assert mapper.state == MapperState.FAILED
    events(mapper)
    mapper.delete(5.0)  # the gateway may have mapped it and lost every answer
    [delete] = mapper.datagrams_to_send(5.0)
    assert pcp.parse_request(delete).lifetime == 0
    # A refusal is an answer: nothing can have been granted, nothing to delete.
    refused = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0)
    refused.receive_datagram(pcp_answer(refused.datagrams_to_send(0.0)[0], result=2), 0.1)
    refused.delete(0.2)
    assert refused.datagrams_to_send(0.2) == []
    # An address-only NAT-PMP query maps nothing: its delete would be "all of this client's".
    query = NatpmpMapper(None, b"seed", 0.0)
    send_times(query, 5.0)
    query.delete(5.0)
    assert query.datagrams_to_send(5.0) == []


def test_gateway_reboot_seen_in_the_epoch_remaps_at_once() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0, lifetime=3600)
    mapper.receive_datagram(pcp_answer(mapper.datagrams_to_send(0.0)[0], epoch=5000), 0.0)
    events(mapper)
    # An ANNOUNCE 100 s later whose epoch went back to 3: the gateway lost its mappings.
    announce = pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, 3).to_wire()
    mapper.receive_datagram(announce, 100.0)
    [again] = mapper.datagrams_to_send(100.0)
    assert pcp.parse_request(again).lifetime == 3600
    mapper.receive_datagram(pcp_answer(again, epoch=4), 100.1)
    [event] = events(mapper)
    assert isinstance(event, MappingGranted) and not event.renewal  # a fresh grant
    # An ANNOUNCE with a consistent epoch changes nothing.
    mapper.receive_datagram(pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, 14).to_wire(), 110.1)
    assert mapper.datagrams_to_send(110.1) == []
    assert mapper.counters["epoch_resets"] == 1


def test_zero_lifetime_grant_is_a_failure() -> None:
    mapper = PcpMapper(CLIENT, 5000, NONCE, b"seed", 0.0)
    mapper.receive_datagram(pcp_answer(mapper.datagrams_to_send(0.0)[0], lifetime=0), 0.1)
    [event] = events(mapper)
    assert isinstance(event, MappingFailed) and event.code == 0


# --------------------------------------------------------------------------- NAT-PMP


def natpmp_answers(requests: list[bytes], *, epoch: int = 50, external_port: int = 40000, lifetime: Optional[int] = None,
                   address: str = "203.0.113.9") -> list[bytes]:
    out = []
    for data in requests:
        req = natpmp.parse_request(data)
        if isinstance(req, natpmp.ExternalAddressRequest):
            out.append(natpmp.ExternalAddressResponse(0, epoch, ipaddress.IPv4Address(address)).to_wire())
        else:
            granted = req.lifetime if lifetime is None else lifetime
            port = external_port if req.lifetime else 0
            out.append(natpmp.MapResponse(req.opcode, 0, epoch, req.internal_port, port, granted).to_wire())
    return out


def test_natpmp_asks_address_and_mapping_together_and_grants_when_both_answered() -> None:
    mapper = NatpmpMapper(5000, b"seed", 0.0, lifetime=7200)
    requests = mapper.datagrams_to_send(0.0)
    assert requests == [bytes([0, 0]), natpmp.MapRequest(1, 5000, 0, 7200).to_wire()]
    address, mapping = natpmp_answers(requests)
    mapper.receive_datagram(mapping, 0.05)  # the order does not matter
    assert events(mapper) == []
    mapper.receive_datagram(address, 0.06)
    assert events(mapper) == [MappingGranted("natpmp", 5000, Endpoint(EXTERNAL, 40000), 7200)]


def test_natpmp_retransmits_both_until_answered() -> None:
    mapper = NatpmpMapper(5000, b"seed", 0.0, timeout=1.75)
    sent = send_times(mapper, 5.0)
    assert [t for t, _ in sent] == [0.0, 0.0, 0.25, 0.25, 0.75, 0.75]
    [event] = events(mapper)
    assert isinstance(event, MappingFailed) and event.code is None


def test_natpmp_address_only() -> None:
    mapper = NatpmpMapper(None, b"seed", 0.0)
    assert mapper.datagrams_to_send(0.0) == [bytes([0, 0])]
    mapper.receive_datagram(natpmp_answers([bytes([0, 0])], address="100.64.0.2", epoch=7)[0], 0.1)
    assert events(mapper) == [ExternalAddress("natpmp", ipaddress.IPv4Address("100.64.0.2"), 7)]
    assert mapper.get_timer() is None


def test_natpmp_refusal_and_unsupported_version() -> None:
    mapper = NatpmpMapper(5000, b"seed", 0.0)
    requests = mapper.datagrams_to_send(0.0)
    mapper.receive_datagram(natpmp.MapResponse(1, natpmp.ResultCode.NOT_AUTHORIZED, 5, 5000, 0, 0).to_wire(), 0.1)
    assert events(mapper) == [MappingFailed("natpmp", 2, "NAT-PMP NOT_AUTHORIZED")]
    assert requests

    mapper = NatpmpMapper(5000, b"seed", 0.0)
    mapper.datagrams_to_send(0.0)
    mapper.receive_datagram(natpmp.ErrorResponse(0, 1, 5).to_wire(), 0.1)
    [event] = events(mapper)
    assert event.unsupported  # type: ignore[union-attr]


def test_natpmp_renewal_and_delete() -> None:
    mapper = NatpmpMapper(5000, b"seed", 0.0, lifetime=1000)
    for answer in natpmp_answers(mapper.datagrams_to_send(0.0)):
        mapper.receive_datagram(answer, 0.0)
    events(mapper)
    renew_at = mapper.get_timer()
    assert renew_at is not None and 500 <= renew_at <= 625
    mapper.handle_timer(renew_at)
    renewal = mapper.datagrams_to_send(renew_at)
    assert natpmp.parse_request(renewal[1]) == natpmp.MapRequest(1, 5000, 40000, 1000)  # suggests what it has
    for answer in natpmp_answers(renewal, epoch=50 + int(renew_at), external_port=40002):
        mapper.receive_datagram(answer, renew_at)
    assert events(mapper) == [MappingGranted("natpmp", 5000, Endpoint(EXTERNAL, 40002), 1000, renewal=True)]
    mapper.delete(700.0)
    [delete] = mapper.datagrams_to_send(700.0)
    assert delete == natpmp.MapRequest(1, 5000, 0, 0).to_wire()
    for answer in natpmp_answers([delete], epoch=800):
        mapper.receive_datagram(answer, 700.1)
    assert events(mapper) == [MappingDeleted("natpmp", 5000, True)]


def test_natpmp_epoch_reset_remaps() -> None:
    mapper = NatpmpMapper(5000, b"seed", 0.0, lifetime=1000)
    for answer in natpmp_answers(mapper.datagrams_to_send(0.0), epoch=9000):
        mapper.receive_datagram(answer, 0.0)
    events(mapper)
    # A stray answer 10 s later with epoch 2: the gateway restarted.
    mapper.receive_datagram(natpmp.ExternalAddressResponse(0, 2, EXTERNAL).to_wire(), 10.0)
    assert len(mapper.datagrams_to_send(10.0)) == 2


# --------------------------------------------------------------------------- properties


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(0, 5000), st.binary(max_size=80)), max_size=20), st.booleans())
def test_any_datagram_sequence_keeps_the_mapper_sane(datagrams: list[tuple[float, bytes]], use_pcp: bool) -> None:
    mapper: PcpMapper | NatpmpMapper = (PcpMapper(CLIENT, 5000, NONCE, b"s", 0.0) if use_pcp
                                        else NatpmpMapper(5000, b"s", 0.0))
    now = 0.0
    for delay, data in sorted(datagrams):
        now = max(now, delay)
        mapper.receive_datagram(data, now)
        mapper.handle_timer(now)
        mapper.datagrams_to_send(now)
    events(mapper)
    timer = mapper.get_timer()
    assert timer is None or timer >= 0


# --------------------------------------------------------------------------- address classes


@pytest.mark.parametrize("ip, cls", [
    ("8.8.8.8", "public"), ("192.168.1.1", "private"), ("10.1.2.3", "private"), ("172.31.0.1", "private"),
    ("172.32.0.1", "public"), ("100.64.0.2", "cgnat"), ("100.127.255.254", "cgnat"), ("100.128.0.1", "public"),
    ("169.254.3.4", "link-local"), ("127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"),
    ("203.0.113.20", "documentation"), ("198.51.100.2", "documentation"), ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"), ("fd00::1", "private"), ("fe80::1", "link-local"), ("2001:db8::1", "documentation"),
    ("2a00:1450::1", "public"), ("::ffff:100.64.1.1", "cgnat"), ("::1", "loopback"),
])
def test_address_class(ip: str, cls: str) -> None:
    assert address_class(ip) == cls
    assert address_class(ipaddress.ip_address(ip)) == cls


def test_behind_another_nat_only_for_private_and_cgnat() -> None:
    assert behind_another_nat("100.64.0.2") and behind_another_nat("192.168.0.2") and behind_another_nat("fd00::2")
    assert not behind_another_nat("203.0.113.20") and not behind_another_nat("8.8.8.8")


_pcp_replies = st.one_of(
    st.builds(lambda r, life, ep, port: pcp.Response(pcp.Opcode.MAP, r, life, ep, pcp.MapData(
        NONCE, pcp.PROTO_UDP, 5000, port, EXTERNAL)).to_wire(),
        st.sampled_from([0, 0, 0, 1, 2, 8, 11]), st.integers(0, 10_000), st.integers(0, 20_000), st.integers(0, 65535)),
    st.builds(lambda ep: pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, ep).to_wire(), st.integers(0, 20_000)),
    st.builds(lambda ep: natpmp.ErrorResponse(0, 1, ep).to_wire(), st.integers(0, 20_000)),
)
_natpmp_replies = st.one_of(
    st.builds(lambda r, ep: natpmp.ExternalAddressResponse(r, ep, EXTERNAL).to_wire(),  # type: ignore[arg-type]
              st.sampled_from([0, 0, 3]), st.integers(0, 20_000)),
    st.builds(lambda r, ep, port, life: natpmp.MapResponse(1, r, ep, 5000, port, life).to_wire(),
              st.sampled_from([0, 0, 0, 2, 4]), st.integers(0, 20_000), st.integers(0, 65535), st.integers(0, 10_000)),
    st.builds(lambda r, ep: natpmp.ErrorResponse(1, r, ep).to_wire(), st.integers(1, 5), st.integers(0, 20_000)),
)


@settings(max_examples=150, deadline=None)
@given(st.booleans(), st.lists(st.tuples(st.floats(0, 3, allow_nan=False), st.integers(0, 1), st.data()), max_size=25),
       st.booleans())
def test_well_formed_answers_in_any_order_keep_the_invariants(use_pcp: bool, steps: list, delete_at_end: bool) -> None:
    mapper: PcpMapper | NatpmpMapper = (PcpMapper(CLIENT, 5000, NONCE, b"s", 0.0, lifetime=600) if use_pcp
                                        else NatpmpMapper(5000, b"s", 0.0, lifetime=600))
    now = 0.0
    for gap, kind, data in steps:
        now += gap * (100 if kind else 1)
        timer = mapper.get_timer()
        if timer is not None and timer <= now:
            mapper.handle_timer(now)
        reply = data.draw(_pcp_replies if use_pcp else _natpmp_replies)
        mapper.receive_datagram(reply, now)
        mapper.datagrams_to_send(now)
        for event in events(mapper):
            if isinstance(event, MappingGranted):
                assert event.lifetime > 0 and event.external.ip == EXTERNAL
        if mapper.state == MapperState.MAPPED:
            assert mapper.external is not None and mapper.expires_at is not None and mapper.renew_at is not None
            assert mapper.renew_at < mapper.expires_at
        if mapper.state in (MapperState.FAILED, MapperState.DELETED):
            assert mapper.get_timer() is None
    if delete_at_end:
        mapper.delete(now)
        for _ in range(10):
            timer = mapper.get_timer()
            if timer is None:
                break
            mapper.handle_timer(timer)
            mapper.datagrams_to_send(timer)
        assert mapper.state in (MapperState.DELETED, MapperState.FAILED)
        assert mapper.get_timer() is None
