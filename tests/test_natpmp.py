"""NAT-PMP codec (RFC 6886): the packet layouts of sections 3.2-3.5 built byte by byte,
round trips, and fuzzing (only our errors)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nattool.errors import PortmapProtocolError
from nattool.protocol import natpmp
from nattool.protocol.natpmp import (
    ErrorResponse,
    ExternalAddressRequest,
    ExternalAddressResponse,
    MapRequest,
    MapResponse,
    ResultCode,
)

# --------------------------------------------------------------------------- RFC layouts


def test_external_address_request_is_two_bytes_version_0_opcode_0() -> None:
    # Section 3.2: | Vers = 0 | OP = 0 |
    assert ExternalAddressRequest().to_wire() == bytes([0, 0])
    assert natpmp.parse_request(bytes([0, 0])) == ExternalAddressRequest()


def test_external_address_response_layout() -> None:
    # Section 3.2: | Vers = 0 | OP = 128 + 0 | Result Code (16) | Seconds Since Start of Epoch (32) |
    #              | External IPv4 Address (a.b.c.d) (32) |
    wire = bytes([0, 128, 0, 0]) + bytes([0, 0, 0x0E, 0x10]) + bytes([203, 0, 113, 7])
    response = natpmp.parse_response(wire)
    assert response == ExternalAddressResponse(ResultCode.SUCCESS, 3600, ipaddress.IPv4Address("203.0.113.7"))
    assert response.to_wire() == wire


def test_map_request_layout() -> None:
    # Section 3.3: | Vers = 0 | OP = x | Reserved (16) | Internal Port | Suggested External Port |
    #              | Requested Port Mapping Lifetime in Seconds (32) |   (x = 1 UDP, 2 TCP)
    wire = bytes([0, 1, 0, 0]) + bytes([0x13, 0x88]) + bytes([0x13, 0x89]) + bytes([0, 0, 0x1C, 0x20])
    request = MapRequest(natpmp.OP_MAP_UDP, 5000, 5001, 7200)
    assert request.to_wire() == wire
    assert natpmp.parse_request(wire) == request
    tcp = bytes([0, 2, 0, 0, 0, 80, 0, 0, 0, 0, 0, 60])
    assert natpmp.parse_request(tcp) == MapRequest(natpmp.OP_MAP_TCP, 80, 0, 60)


def test_map_response_layout() -> None:
    # Section 3.3: | Vers = 0 | OP = 128 + x | Result Code | Seconds Since Start of Epoch |
    #              | Internal Port | Mapped External Port | Port Mapping Lifetime in Seconds |
    wire = (bytes([0, 129, 0, 0]) + bytes([0, 0, 0, 42]) + bytes([0x13, 0x88]) + bytes([0xC3, 0x50])
            + bytes([0, 0, 0x0E, 0x10]))
    response = natpmp.parse_response(wire)
    assert response == MapResponse(natpmp.OP_MAP_UDP, ResultCode.SUCCESS, 42, 5000, 50000, 3600)
    assert response.to_wire() == wire


def test_delete_is_a_map_request_with_lifetime_0() -> None:
    # Section 3.4: lifetime 0 (and suggested external port 0) destroys the mapping.
    assert MapRequest(natpmp.OP_MAP_UDP, 5000, 0, 0).to_wire() == bytes([0, 1, 0, 0, 0x13, 0x88, 0, 0, 0, 0, 0, 0])


def test_unsupported_version_answer_is_8_bytes_opcode_128_result_1() -> None:
    # Section 3.5 with erratum 3618: | Vers = 0 | OP = 128 | Result Code = 1 | Epoch |
    pcp_request = bytes([2, 1]) + bytes(58)
    answer = natpmp.error_for_request(pcp_request, epoch=99)
    assert answer == ErrorResponse(0, ResultCode.UNSUPPORTED_VERSION, 99)
    assert answer.to_wire() == bytes([0, 128, 0, 1, 0, 0, 0, 99])
    assert natpmp.parse_response(answer.to_wire()) == answer


def test_unsupported_opcode_answer_and_requests_needing_no_answer() -> None:
    answer = natpmp.error_for_request(bytes([0, 7]), epoch=5)
    assert answer == ErrorResponse(7, ResultCode.UNSUPPORTED_OPCODE, 5)
    assert answer.to_wire() == bytes([0, 135, 0, 5, 0, 0, 0, 5])
    assert natpmp.error_for_request(bytes([0, 1]) + bytes(10), epoch=5) is None  # a valid request
    assert natpmp.error_for_request(bytes([0, 129]) + bytes(14), epoch=5) is None  # a response: ignore
    assert natpmp.error_for_request(b"\x00", epoch=5) is None


def test_read_request_is_what_a_server_does_with_the_bytes() -> None:
    assert natpmp.read_request(bytes([0, 0]), epoch=1) == ExternalAddressRequest()
    assert natpmp.read_request(bytes([2, 1]) + bytes(58), epoch=1) == ErrorResponse(0, 1, 1)
    assert natpmp.read_request(bytes([0, 9]), epoch=1) == ErrorResponse(9, 5, 1)
    assert natpmp.read_request(bytes([0, 1, 0, 0]), epoch=1) is None  # a map request cut short
    assert natpmp.read_request(bytes([0, 129]) + bytes(14), epoch=1) is None


def test_result_codes_are_the_rfc_values() -> None:
    assert [c.value for c in ResultCode] == [0, 1, 2, 3, 4, 5]
    assert natpmp.result_name(2) == "NOT_AUTHORIZED"
    assert natpmp.result_name(77) == "result 77"


def test_error_map_response_keeps_its_full_layout() -> None:
    wire = MapResponse(natpmp.OP_MAP_UDP, ResultCode.OUT_OF_RESOURCES, 1, 5000, 0, 0).to_wire()
    assert len(wire) == 16
    assert natpmp.parse_response(wire).result == ResultCode.OUT_OF_RESOURCES


@pytest.mark.parametrize("wire, why", [
    (bytes([0, 128, 0, 0, 0, 0, 0, 1]), "success without an address"),
    (bytes([1, 128, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4]), "version 1"),
    (bytes([0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4]), "a request"),
    (bytes([0, 128, 1, 0, 0, 0, 0, 1, 1, 2, 3, 4]), "result 256"),
    (bytes(7), "too short"),
])
def test_bad_responses_raise_our_error(wire: bytes, why: str) -> None:
    with pytest.raises(PortmapProtocolError):
        natpmp.parse_response(wire)


def test_bad_requests_raise_our_error() -> None:
    for wire in (b"", b"\x00", bytes([1, 0]), bytes([0, 128]), bytes([0, 1, 0, 0]), bytes([0, 9])):
        with pytest.raises(PortmapProtocolError):
            natpmp.parse_request(wire)


def test_out_of_range_fields_are_refused_when_encoding() -> None:
    with pytest.raises(PortmapProtocolError):
        MapRequest(natpmp.OP_MAP_UDP, 70000, 0, 1)
    with pytest.raises(PortmapProtocolError):
        MapRequest(3, 1, 0, 1)
    with pytest.raises(PortmapProtocolError):
        MapResponse(natpmp.OP_MAP_UDP, 0, -1, 1, 1, 1)
    with pytest.raises(PortmapProtocolError):
        ErrorResponse(129, 1, 0)


def test_is_natpmp_response() -> None:
    assert natpmp.is_natpmp_response(bytes([0, 128, 0, 1, 0, 0, 0, 0]))
    assert not natpmp.is_natpmp_response(bytes([2, 129]))
    assert not natpmp.is_natpmp_response(bytes([0, 1]))


# --------------------------------------------------------------------------- round trips

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
map_ops = st.sampled_from([natpmp.OP_MAP_UDP, natpmp.OP_MAP_TCP])


@given(map_ops, u16, u16, u32)
def test_map_request_round_trip(op: int, internal: int, suggested: int, lifetime: int) -> None:
    request = MapRequest(op, internal, suggested, lifetime)
    assert natpmp.parse_request(request.to_wire()) == request


@given(map_ops, st.integers(0, 255), u32, u16, u16, u32)
def test_map_response_round_trip(op: int, result: int, epoch: int, internal: int, external: int, lifetime: int) -> None:
    response = MapResponse(op, result, epoch, internal, external, lifetime)
    assert natpmp.parse_response(response.to_wire()) == response


@given(st.integers(0, 255), u32, st.integers(0, 2**32 - 1))
def test_external_address_response_round_trip(result: int, epoch: int, address: int) -> None:
    response = ExternalAddressResponse(result, epoch, ipaddress.IPv4Address(address))
    assert natpmp.parse_response(response.to_wire()) == response


@given(st.integers(0, 127), st.integers(1, 255), u32)
def test_error_response_round_trip(op: int, result: int, epoch: int) -> None:
    response = ErrorResponse(op, result, epoch)
    parsed = natpmp.parse_response(response.to_wire())
    assert parsed == response


# --------------------------------------------------------------------------- fuzzing


@given(st.binary(max_size=64))
def test_random_bytes_raise_only_our_error(data: bytes) -> None:
    for parse in (natpmp.parse_request, natpmp.parse_response):
        try:
            parse(data)
        except PortmapProtocolError:
            pass
    natpmp.error_for_request(data, 0)
    natpmp.read_request(data, 0)


@given(st.binary(min_size=6, max_size=20), st.integers(0, 3))
def test_version_0_bytes_with_any_opcode_raise_only_our_error(tail: bytes, op: int) -> None:
    for first in (bytes([0, op]), bytes([0, 128 | op])):
        data = first + tail
        for parse in (natpmp.parse_request, natpmp.parse_response):
            try:
                message = parse(data)
            except PortmapProtocolError:
                continue
            # What parses must survive re-encoding (and a response must be reread as itself).
            wire = message.to_wire()
            assert parse(wire) == message
            assert wire == data[: len(wire)] or struct.unpack_from("!H", data, 2)[0] != 0
