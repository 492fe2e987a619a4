"""PCP codec (RFC 6887): the figures of sections 7 and 11-13 built byte by byte, options
(parsed or skipped), IPv4-mapped addresses, error answers, round trips, fuzzing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nattool.errors import PortmapProtocolError
from nattool.protocol import natpmp, pcp
from nattool.protocol.pcp import (
    Filter,
    MapData,
    Opcode,
    PreferFailure,
    Request,
    Response,
    ResultCode,
    ThirdParty,
    UnknownOption,
)

CLIENT = ipaddress.ip_address("192.0.2.33")
CLIENT_WIRE = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 33])  # IPv4-mapped IPv6
EXTERNAL_WIRE = bytes(10) + b"\xff\xff" + bytes([203, 0, 113, 9])
NONCE = bytes(range(1, 13))


def map_request_wire(lifetime: bytes = bytes([0, 0, 0x1C, 0x20]), suggested: bytes = bytes(10) + b"\xff\xff" + bytes(4)) -> bytes:
    # Figure 2 (request header): | Version = 2 | R=0, Opcode = 1 | Reserved (16) |
    #   | Requested Lifetime (32) | PCP Client's IP Address (128) |
    # Figure 9 (MAP request):    | Mapping Nonce (96) | Protocol | Reserved (24) |
    #   | Internal Port | Suggested External Port | Suggested External IP Address (128) |
    return (bytes([2, 1, 0, 0]) + lifetime + CLIENT_WIRE
            + NONCE + bytes([17, 0, 0, 0]) + bytes([0x13, 0x88]) + bytes([0, 0]) + suggested)


# --------------------------------------------------------------------------- RFC layouts


def test_map_request_layout() -> None:
    wire = map_request_wire()
    assert len(wire) == 60
    request = pcp.map_request(CLIENT, NONCE, 5000, 7200)
    assert request.to_wire() == wire
    parsed = pcp.parse_request(wire)
    assert parsed == request
    assert parsed.map is not None and parsed.map.external_address == ipaddress.IPv4Address("0.0.0.0")


def test_map_response_layout() -> None:
    # Figure 3 (response header): | Version = 2 | R=1, Opcode | Reserved | Result Code |
    #   | Lifetime (32) | Epoch Time (32) | Reserved (96) |
    # Figure 10 (MAP response): nonce, protocol, reserved, internal port, assigned external
    #   port, assigned external IP address.
    wire = (bytes([2, 0x81, 0, 0]) + bytes([0, 0, 0x0E, 0x10]) + bytes([0, 0, 0x01, 0x00]) + bytes(12)
            + NONCE + bytes([17, 0, 0, 0]) + bytes([0x13, 0x88, 0xC3, 0x50]) + EXTERNAL_WIRE)
    response = pcp.parse_response(wire)
    assert response == Response(Opcode.MAP, ResultCode.SUCCESS, 3600, 256,
                                MapData(NONCE, pcp.PROTO_UDP, 5000, 50000, ipaddress.IPv4Address("203.0.113.9")))
    assert response.to_wire() == wire


def test_delete_is_a_map_with_lifetime_0() -> None:
    # Section 15: a MAP request with Requested Lifetime 0 deletes; the nonce must match.
    assert pcp.map_request(CLIENT, NONCE, 5000, 0).to_wire() == map_request_wire(lifetime=bytes(4))


def test_announce_request_and_response() -> None:
    # Section 14.1: ANNOUNCE (opcode 0) has no opcode data; lifetime 0.
    wire = bytes([2, 0, 0, 0]) + bytes(4) + CLIENT_WIRE
    assert pcp.announce_request(CLIENT).to_wire() == wire
    assert pcp.parse_request(wire) == Request(Opcode.ANNOUNCE, 0, CLIENT)
    answer = bytes([2, 0x80, 0, 0]) + bytes(4) + bytes([0, 0, 0, 7]) + bytes(12)
    assert pcp.parse_response(answer) == Response(Opcode.ANNOUNCE, ResultCode.SUCCESS, 0, 7)


def test_ipv6_client_and_suggested_address() -> None:
    v6 = ipaddress.ip_address("2001:db8::5")
    request = pcp.map_request(v6, NONCE, 5000, 60, suggested_address=ipaddress.ip_address("2001:db8::99"))
    wire = request.to_wire()
    assert wire[8:24] == v6.packed
    assert wire[44:60] == ipaddress.ip_address("2001:db8::99").packed
    assert pcp.parse_request(wire) == request
    # No preference for an IPv6 mapping is the IPv6 all-zeros address, not ::ffff:0.0.0.0.
    assert pcp.map_request(v6, NONCE, 5000, 60).to_wire()[44:60] == bytes(16)


def test_options_third_party_prefer_failure_filter() -> None:
    # Option header (Figure 4): | Option Code | Reserved | Option Length (16) | data, padded |
    third = bytes([1, 0, 0, 16]) + bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 99])
    prefer = bytes([2, 0, 0, 0])
    # FILTER (section 13.3): | Reserved | Prefix Length | Remote Peer Port | Remote Peer IP (128) |
    filt = bytes([3, 0, 0, 20]) + bytes([0, 120, 0x1F, 0x90]) + bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 0])
    wire = map_request_wire() + third + prefer + filt
    parsed = pcp.parse_request(wire)
    assert parsed.options == (
        ThirdParty(ipaddress.IPv4Address("192.0.2.99")),
        PreferFailure(),
        Filter(120, 8080, ipaddress.IPv4Address("198.51.100.0")),
    )
    assert parsed.to_wire() == wire


def test_unknown_options_are_kept_with_their_padding_skipped() -> None:
    optional = bytes([200, 0, 0, 3]) + b"abc" + b"\x00"  # padded to 4
    mandatory = bytes([99, 0, 0, 0])
    parsed = pcp.parse_request(map_request_wire() + optional + mandatory)
    assert parsed.options == (UnknownOption(200, b"abc"), UnknownOption(99, b""))
    assert not pcp.is_mandatory_option(200) and pcp.is_mandatory_option(99)
    assert parsed.to_wire() == map_request_wire() + optional + mandatory


@pytest.mark.parametrize("option", [
    bytes([1, 0, 0, 4, 1, 2, 3, 4]),  # THIRD_PARTY of 4 bytes
    bytes([2, 0, 0, 4, 0, 0, 0, 0]),  # PREFER_FAILURE with data
    bytes([3, 0, 0, 16]) + bytes(16),  # FILTER of 16 bytes
    bytes([200, 0, 0, 9]) + bytes(8),  # longer than the message
    bytes([2, 0, 0, 0, 2, 0, 0, 0]),  # PREFER_FAILURE twice
])
def test_malformed_options_say_malformed_option(option: bytes) -> None:
    with pytest.raises(PortmapProtocolError) as caught:
        pcp.parse_request(map_request_wire() + option)
    assert caught.value.result == ResultCode.MALFORMED_OPTION


def test_bad_requests_and_the_result_a_server_answers() -> None:
    with pytest.raises(PortmapProtocolError) as caught:
        pcp.parse_request(bytes([1, 1]) + map_request_wire()[2:])
    assert caught.value.result == ResultCode.UNSUPP_VERSION
    for bad in (map_request_wire()[:56], map_request_wire() + b"\x00", bytes(20)):
        with pytest.raises(PortmapProtocolError) as caught:
            pcp.parse_request(bad)
        assert caught.value.result == ResultCode.MALFORMED_REQUEST


def test_error_response_copies_the_request() -> None:
    # Section 7.2: an error response copies the request's opcode data and options.
    request = map_request_wire() + bytes([2, 0, 0, 0])
    answer = pcp.error_response(request, ResultCode.NOT_AUTHORIZED, epoch=11, lifetime=600)
    assert answer is not None
    assert answer[:24] == bytes([2, 0x81, 0, 2]) + bytes([0, 0, 2, 0x58]) + bytes([0, 0, 0, 11]) + bytes(12)
    assert answer[24:] == request[24:]
    parsed = pcp.parse_response(answer)
    assert parsed.result == ResultCode.NOT_AUTHORIZED and parsed.map is not None and parsed.map.nonce == NONCE
    assert parsed.options == (PreferFailure(),)


def test_unsupported_version_answer_and_silent_drops() -> None:
    answer = pcp.error_response(bytes([3, 1]) + bytes(58), ResultCode.UNSUPP_VERSION, epoch=1)
    assert answer == bytes([2, 0x81, 0, 1]) + bytes([0, 0, 0x07, 0x08]) + bytes([0, 0, 0, 1]) + bytes(12)
    parsed = pcp.parse_response(answer)
    assert parsed.result == ResultCode.UNSUPP_VERSION and parsed.map is None
    assert pcp.error_response(b"\x02", ResultCode.MALFORMED_REQUEST, 0) is None
    assert pcp.error_response(bytes([2, 0x81]) + bytes(58), ResultCode.MALFORMED_REQUEST, 0) is None


def test_an_older_servers_unsupp_version_answer_is_readable() -> None:
    # Section 9: the server answers in the highest version it speaks.
    answer = bytes([1, 0x81, 0, 1]) + bytes([0, 0, 0, 30]) + bytes([0, 0, 0, 5]) + bytes(12)
    parsed = pcp.parse_response(answer)
    assert (parsed.version, parsed.result) == (1, ResultCode.UNSUPP_VERSION)
    with pytest.raises(PortmapProtocolError):
        pcp.parse_response(bytes([1, 0x81, 0, 0]) + bytes(20))  # another version and not the error


def test_a_natpmp_gateways_answer_to_pcp_is_told_apart() -> None:
    natpmp_answer = natpmp.error_for_request(map_request_wire(), epoch=3)
    assert natpmp_answer is not None
    wire = natpmp_answer.to_wire()
    assert natpmp.is_natpmp_response(wire)
    assert pcp.response_version(wire) == 0


def test_unknown_opcode_payload_is_opaque_and_unsupp_opcode_answer() -> None:
    request = bytes([2, 2, 0, 0]) + bytes(4) + CLIENT_WIRE + bytes(56)  # PEER
    parsed = pcp.parse_request(request)
    assert parsed.opcode == Opcode.PEER and parsed.payload == bytes(56) and parsed.map is None
    answer = pcp.error_response(request, ResultCode.UNSUPP_OPCODE, epoch=2)
    assert answer is not None and pcp.parse_response(answer).payload == bytes(56)


def test_result_codes_are_the_rfc_values() -> None:
    assert {c.name: c.value for c in ResultCode}["EXCESSIVE_REMOTE_PEERS"] == 13
    assert [c.value for c in ResultCode] == list(range(14))
    assert pcp.result_name(12) == "ADDRESS_MISMATCH" and pcp.result_name(200) == "result 200"


def test_encoding_refuses_what_the_wire_cannot_carry() -> None:
    with pytest.raises(PortmapProtocolError):
        MapData(b"short", 17, 1, 1, pcp.IPV4_ANY)
    with pytest.raises(PortmapProtocolError):
        Request(Opcode.MAP, 1, CLIENT)  # MAP without its data
    with pytest.raises(PortmapProtocolError):
        Request(Opcode.ANNOUNCE, 0, CLIENT, payload=b"abcd")
    with pytest.raises(PortmapProtocolError):
        pcp.map_request(CLIENT, NONCE, 1, 1, options=(UnknownOption(200, bytes(1100)),)).to_wire()
    with pytest.raises(PortmapProtocolError):
        UnknownOption(1, b"")  # THIRD_PARTY has its own class
    with pytest.raises(PortmapProtocolError):
        pcp.map_request(CLIENT, NONCE, 1, 1, options=(PreferFailure(), PreferFailure())).to_wire()


# --------------------------------------------------------------------------- round trips

v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(lambda a: a.ipv4_mapped is None)
addresses = st.one_of(v4, v6)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
options = st.lists(st.one_of(
    addresses.map(ThirdParty),
    st.just(PreferFailure()),
    st.builds(Filter, st.integers(0, 128), u16, addresses),
    st.builds(UnknownOption, st.integers(4, 255), st.binary(max_size=40)),
), max_size=4).filter(lambda opts: sum(isinstance(o, ThirdParty) for o in opts) < 2
                       and sum(isinstance(o, PreferFailure) for o in opts) < 2).map(tuple)
map_data = st.builds(MapData, st.binary(min_size=12, max_size=12), st.sampled_from([0, 6, 17]), u16, u16, addresses)


@given(u32, addresses, map_data, options)
def test_map_request_round_trip(lifetime: int, client: pcp.IPAddress, data: MapData, opts: tuple) -> None:
    request = Request(Opcode.MAP, lifetime, client, data, opts)
    assert pcp.parse_request(request.to_wire()) == request


@given(st.integers(0, 13), u32, u32, map_data, options)
def test_map_response_round_trip(result: int, lifetime: int, epoch: int, data: MapData, opts: tuple) -> None:
    response = Response(Opcode.MAP, result, lifetime, epoch, data, opts)
    assert pcp.parse_response(response.to_wire()) == response


@given(addresses)
def test_addresses_round_trip_ipv4_as_mapped(address: pcp.IPAddress) -> None:
    wire = pcp.address_to_wire(address)
    assert len(wire) == 16
    assert pcp.address_from_wire(wire) == address
    assert (wire[:12] == bytes(10) + b"\xff\xff") == (address.version == 4)


# --------------------------------------------------------------------------- fuzzing


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_our_error(data: bytes) -> None:
    for parse in (pcp.parse_request, pcp.parse_response):
        try:
            parse(data)
        except PortmapProtocolError:
            pass
    pcp.error_response(data, ResultCode.MALFORMED_REQUEST, 0)


_SAMPLES = [
    map_request_wire() + bytes([1, 0, 0, 16]) + bytes(16) + bytes([3, 0, 0, 20]) + bytes(20),
    Response(Opcode.MAP, 0, 60, 5, MapData(NONCE, 17, 1, 2, pcp.IPV4_ANY), (PreferFailure(),)).to_wire(),
    pcp.announce_request(CLIENT).to_wire(),
]


@given(st.sampled_from(_SAMPLES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_messages_raise_only_our_error(sample: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(sample)
    for pos, value in flips:
        data[pos % len(data)] = value
    for parse in (pcp.parse_request, pcp.parse_response):
        try:
            message = parse(bytes(data))
        except PortmapProtocolError:
            continue
        assert parse(message.to_wire()) == message
