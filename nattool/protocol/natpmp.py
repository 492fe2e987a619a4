"""NAT-PMP codec (RFC 6886): requests and responses, client and server side.

Pure: bytes in, frozen dataclasses out, and back. On any input bytes the parsers raise
nothing but :class:`~nattool.errors.PortmapProtocolError`.

Messages (all integers big-endian)::

    request   external address   0 | op 0                                          (2 bytes)
    request   map                0 | op 1 (UDP) or 2 (TCP) | 0 0 | internal port |
                                 suggested external port | requested lifetime       (12 bytes)
    response  external address   0 | 128 | result | epoch s | external IPv4          (12 bytes)
    response  map                0 | 128+op | result | epoch s | internal port |
                                 mapped external port | lifetime                    (16 bytes)
    response  bare error         0 | 128+op | result | epoch s                      (8 bytes)

The bare error is what a server sends for a request it cannot read: an unsupported
version (RFC 6886 section 3.5 with erratum 3618: opcode 128, result 1) -- the answer a
PCP client gets from a NAT-PMP-only gateway -- or an unsupported opcode.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Union

from nattool.errors import PortmapProtocolError

SERVER_PORT = 5351  # the gateway listens here (shared with PCP)
CLIENT_PORT = 5350  # the gateway announces address changes to 224.0.0.1 on this port
VERSION = 0
RESPONSE_BIT = 0x80
MAX_MESSAGE = 1100  # a datagram longer than any NAT-PMP (or PCP) message is not ours

OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2

# RFC 6886 section 3.3: a client retransmits from 250 ms, doubling, at most 9 times.
INITIAL_RETRANSMIT = 0.25
MAX_RETRANSMITS = 9
RECOMMENDED_LIFETIME = 7200  # s, section 3.3


class ResultCode(IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2  # "refused": the box supports mapping, the user turned it off
    NETWORK_FAILURE = 3  # e.g. no DHCP lease on the WAN side yet
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


def result_name(code: int) -> str:
    try:
        return ResultCode(code).name
    except ValueError:
        return f"result {code}"


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class ExternalAddressRequest:
    def to_wire(self) -> bytes:
        return bytes((VERSION, OP_EXTERNAL_ADDRESS))


@dataclass(frozen=True, slots=True)
class MapRequest:
    """Map (lifetime > 0) or delete (lifetime 0) the mapping of ``internal_port``.

    A delete with internal port 0 and suggested port 0 deletes every mapping of the
    client for that protocol (section 3.4).
    """

    opcode: int  # OP_MAP_UDP or OP_MAP_TCP
    internal_port: int
    suggested_external_port: int
    lifetime: int  # s; 0 deletes

    def __post_init__(self) -> None:
        _check_map_opcode(self.opcode)
        _check_u16(self.internal_port, "internal port")
        _check_u16(self.suggested_external_port, "suggested external port")
        _check_u32(self.lifetime, "lifetime")

    def to_wire(self) -> bytes:
        return struct.pack("!BBHHHI", VERSION, self.opcode, 0, self.internal_port,
                           self.suggested_external_port, self.lifetime)


@dataclass(frozen=True, slots=True)
class ExternalAddressResponse:
    result: int
    epoch: int  # seconds since the gateway's mapping table was (re)started
    address: ipaddress.IPv4Address  # undefined (usually 0.0.0.0) unless result is SUCCESS

    def __post_init__(self) -> None:
        _check_u8(self.result, "result code")
        _check_u32(self.epoch, "epoch")

    def to_wire(self) -> bytes:
        header = struct.pack("!BBHI", VERSION, RESPONSE_BIT | OP_EXTERNAL_ADDRESS, self.result, self.epoch)
        return header + self.address.packed


@dataclass(frozen=True, slots=True)
class MapResponse:
    opcode: int  # OP_MAP_UDP or OP_MAP_TCP (without the response bit)
    result: int
    epoch: int
    internal_port: int
    external_port: int  # the port the gateway mapped, maybe not the one suggested
    lifetime: int  # s granted; 0 answers a delete

    def __post_init__(self) -> None:
        _check_map_opcode(self.opcode)
        _check_u8(self.result, "result code")
        _check_u32(self.epoch, "epoch")
        _check_u16(self.internal_port, "internal port")
        _check_u16(self.external_port, "external port")
        _check_u32(self.lifetime, "lifetime")

    def to_wire(self) -> bytes:
        return struct.pack("!BBHIHHI", VERSION, RESPONSE_BIT | self.opcode, self.result, self.epoch,
                           self.internal_port, self.external_port, self.lifetime)


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """The 8-byte answer to a request the server cannot read (version or opcode)."""

    opcode: int  # the request's opcode, without the response bit (0 for a bad version)
    result: int
    epoch: int

    def __post_init__(self) -> None:
        _check_u8(self.opcode, "opcode")
        if self.opcode & RESPONSE_BIT:
            raise PortmapProtocolError("NAT-PMP opcode with the response bit set")
        _check_u8(self.result, "result code")
        _check_u32(self.epoch, "epoch")

    def to_wire(self) -> bytes:
        return struct.pack("!BBHI", VERSION, RESPONSE_BIT | self.opcode, self.result, self.epoch)


Request = Union[ExternalAddressRequest, MapRequest]
Response = Union[ExternalAddressResponse, MapResponse, ErrorResponse]


# --------------------------------------------------------------------------- parsing


def parse_request(data: bytes) -> Request:
    """A NAT-PMP request, as a server reads it.

    Raises :class:`PortmapProtocolError` for anything else; a server answers an
    unreadable version or opcode with :func:`error_for_request`.
    """
    if len(data) < 2 or len(data) > MAX_MESSAGE:
        raise PortmapProtocolError(f"NAT-PMP request of {len(data)} bytes")
    version, opcode = data[0], data[1]
    if version != VERSION:
        raise PortmapProtocolError(f"NAT-PMP version {version}")
    if opcode & RESPONSE_BIT:
        raise PortmapProtocolError("a NAT-PMP response, not a request")
    if opcode == OP_EXTERNAL_ADDRESS:
        return ExternalAddressRequest()
    if opcode in (OP_MAP_UDP, OP_MAP_TCP):
        if len(data) < 12:
            raise PortmapProtocolError(f"NAT-PMP map request of {len(data)} bytes, want 12")
        _, _, _reserved, internal, suggested, lifetime = struct.unpack_from("!BBHHHI", data)
        return MapRequest(opcode, internal, suggested, lifetime)
    raise PortmapProtocolError(f"NAT-PMP opcode {opcode}")


def error_for_request(data: bytes, epoch: int) -> ErrorResponse | None:
    """The bare error a server sends for request bytes it cannot serve, else None.

    None also for bytes no answer is due to: shorter than 2 bytes, or a response.
    """
    if len(data) < 2 or data[1] & RESPONSE_BIT:
        return None
    if data[0] != VERSION:
        return ErrorResponse(0, ResultCode.UNSUPPORTED_VERSION, epoch)
    if data[1] not in (OP_EXTERNAL_ADDRESS, OP_MAP_UDP, OP_MAP_TCP):
        return ErrorResponse(data[1], ResultCode.UNSUPPORTED_OPCODE, epoch)
    return None


def read_request(data: bytes, epoch: int) -> Request | ErrorResponse | None:
    """What a server makes of request bytes: the request to serve, the error to answer
    with (unsupported version or opcode), or None (drop them: not a request at all)."""
    error = error_for_request(data, epoch)
    if error is not None:
        return error
    try:
        return parse_request(data)
    except PortmapProtocolError:
        return None


def parse_response(data: bytes) -> Response:
    """A NAT-PMP response, as a client reads it."""
    if len(data) < 8 or len(data) > MAX_MESSAGE:
        raise PortmapProtocolError(f"NAT-PMP response of {len(data)} bytes")
    version, op_byte, result, epoch = struct.unpack_from("!BBHI", data)
    if version != VERSION:
        raise PortmapProtocolError(f"NAT-PMP version {version}")
    if not op_byte & RESPONSE_BIT:
        raise PortmapProtocolError("a NAT-PMP request, not a response")
    if result > 0xFF:
        # The field is 16 bits on the wire; every defined code fits in 8.
        raise PortmapProtocolError(f"NAT-PMP result code {result}")
    opcode = op_byte & ~RESPONSE_BIT
    if opcode == OP_EXTERNAL_ADDRESS and len(data) >= 12:
        return ExternalAddressResponse(result, epoch, ipaddress.IPv4Address(data[8:12]))
    if opcode in (OP_MAP_UDP, OP_MAP_TCP) and len(data) >= 16:
        internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
        return MapResponse(opcode, result, epoch, internal, external, lifetime)
    if result == ResultCode.SUCCESS:
        raise PortmapProtocolError(f"NAT-PMP success for opcode {opcode} in {len(data)} bytes")
    return ErrorResponse(opcode, result, epoch)


def is_natpmp_response(data: bytes) -> bool:
    """Cheap check on the first bytes (PCP and NAT-PMP share a port): version 0, response."""
    return len(data) >= 2 and data[0] == VERSION and bool(data[1] & RESPONSE_BIT)


# --------------------------------------------------------------------------- checks


def _check_map_opcode(opcode: int) -> None:
    if opcode not in (OP_MAP_UDP, OP_MAP_TCP):
        raise PortmapProtocolError(f"NAT-PMP map opcode {opcode}")


def check_uint(value: int, bits: int, what: str) -> None:
    """A field's value must fit its width (PCP uses it too)."""
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise PortmapProtocolError(f"{what} {value!r} out of range for {bits} bits")


def _check_u8(value: int, what: str) -> None:
    check_uint(value, 8, f"NAT-PMP {what}")


def _check_u16(value: int, what: str) -> None:
    check_uint(value, 16, f"NAT-PMP {what}")


def _check_u32(value: int, what: str) -> None:
    check_uint(value, 32, f"NAT-PMP {what}")


__all__ = [
    "CLIENT_PORT", "ErrorResponse", "ExternalAddressRequest", "ExternalAddressResponse",
    "INITIAL_RETRANSMIT", "MAX_RETRANSMITS", "MapRequest", "MapResponse", "OP_EXTERNAL_ADDRESS",
    "OP_MAP_TCP", "OP_MAP_UDP", "RECOMMENDED_LIFETIME", "Request", "Response", "ResultCode",
    "SERVER_PORT", "check_uint", "error_for_request", "is_natpmp_response", "parse_request", "parse_response",
    "read_request", "result_name",
]
