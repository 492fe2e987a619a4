"""PCP codec (RFC 6887): requests and responses, client and server side.

Pure: bytes in, frozen dataclasses out, and back. On any input bytes the parsers raise
nothing but :class:`~nattool.errors.PortmapProtocolError` (whose ``result`` says which
result code a server answers with).

Layouts (big-endian; every message a multiple of 4 bytes, at most 1100)::

    request header   version 2 | R=0,opcode | reserved (2) | requested lifetime (4) |
                     PCP client's IP address (16)                              24 bytes
    response header  version 2 | R=1,opcode | reserved | result code | lifetime (4) |
                     epoch time (4) | reserved (12)                            24 bytes
    MAP data         mapping nonce (12) | protocol | reserved (3) | internal port (2) |
                     suggested/assigned external port (2) |
                     suggested/assigned external IP address (16)               36 bytes
    option           code | reserved | length (2) | data, padded to 4 bytes

Every address is 16 bytes: an IPv4 address as IPv4-mapped IPv6 (``::ffff:a.b.c.d``).
Here addresses are :mod:`ipaddress` objects; an IPv4-mapped one decodes to IPv4.
ANNOUNCE (opcode 0) has no opcode data. PEER and other opcodes are carried as opaque
``payload`` bytes, so a server can answer UNSUPP_OPCODE with the request copied.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional, Union

from nattool.errors import PortmapProtocolError
from nattool.protocol.natpmp import check_uint

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

VERSION = 2
SERVER_PORT = 5351
CLIENT_PORT = 5350  # unsolicited ANNOUNCEs go to 224.0.0.1 / ff02::1 on this port
MAX_MESSAGE = 1100
HEADER_LEN = 24
MAP_DATA_LEN = 36
NONCE_LEN = 12
RESPONSE_BIT = 0x80

PROTO_ALL = 0
PROTO_TCP = 6
PROTO_UDP = 17

# RFC 6887 section 8.1.1: IRT 3 s, MRT 1024 s, retransmit forever (MRC 0, MRD 0).
INITIAL_RETRANSMIT = 3.0
MAX_RETRANSMIT = 1024.0

IPV4_ANY = ipaddress.IPv4Address("0.0.0.0")  # "no preference" for an IPv4 external address
IPV6_ANY = ipaddress.IPv6Address("::")


class Opcode(IntEnum):
    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class ResultCode(IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


# Section 7.4: the server's lifetime on these tells how long the error holds; the
# short ones are worth retrying soon, the long ones not for a long while.
SHORT_LIFETIME_ERRORS = frozenset({
    ResultCode.NETWORK_FAILURE, ResultCode.NO_RESOURCES, ResultCode.USER_EX_QUOTA,
    ResultCode.CANNOT_PROVIDE_EXTERNAL, ResultCode.EXCESSIVE_REMOTE_PEERS,
})


def result_name(code: int) -> str:
    try:
        return ResultCode(code).name
    except ValueError:
        return f"result {code}"


class OptionCode(IntEnum):
    THIRD_PARTY = 1
    PREFER_FAILURE = 2
    FILTER = 3


def is_mandatory_option(code: int) -> bool:
    """Codes 0-127 must be understood (else UNSUPP_OPTION); 128-255 may be skipped."""
    return code < 128


# --------------------------------------------------------------------------- addresses


def address_to_wire(address: IPAddress) -> bytes:
    """16 bytes; IPv4 as IPv4-mapped IPv6."""
    if isinstance(address, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + address.packed
    if isinstance(address, ipaddress.IPv6Address):
        return address.packed
    raise PortmapProtocolError(f"PCP address {address!r} is not an IP address")


def address_from_wire(data: bytes) -> IPAddress:
    address = ipaddress.IPv6Address(bytes(data))
    return address.ipv4_mapped if address.ipv4_mapped is not None else address


def any_address(family_of: IPAddress) -> IPAddress:
    """The all-zeros address of the family of ``family_of`` ("no preference")."""
    return IPV4_ANY if family_of.version == 4 else IPV6_ANY


# --------------------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class ThirdParty:
    """The mapping is for ``address``, not for the client sending the request."""

    address: IPAddress
    CODE = OptionCode.THIRD_PARTY


@dataclass(frozen=True, slots=True)
class PreferFailure:
    """Fail (CANNOT_PROVIDE_EXTERNAL) rather than map another port than suggested."""

    CODE = OptionCode.PREFER_FAILURE


@dataclass(frozen=True, slots=True)
class Filter:
    """Let in only traffic from ``remote_address/prefix_length`` (port 0: any port)."""

    prefix_length: int
    remote_port: int
    remote_address: IPAddress
    CODE = OptionCode.FILTER

    def __post_init__(self) -> None:
        check_uint(self.prefix_length, 8, "PCP FILTER prefix length")
        check_uint(self.remote_port, 16, "PCP FILTER remote port")


@dataclass(frozen=True, slots=True)
class UnknownOption:
    """An option this codec does not interpret, kept as it came."""

    code: int
    data: bytes

    def __post_init__(self) -> None:
        check_uint(self.code, 8, "PCP option code")
        if self.code in tuple(OptionCode) or len(self.data) > MAX_MESSAGE:
            raise PortmapProtocolError(f"PCP option {self.code} given as unknown", result=ResultCode.MALFORMED_OPTION)


Option = Union[ThirdParty, PreferFailure, Filter, UnknownOption]


def _option_to_wire(option: Option) -> bytes:
    if isinstance(option, ThirdParty):
        code, data = OptionCode.THIRD_PARTY, address_to_wire(option.address)
    elif isinstance(option, PreferFailure):
        code, data = OptionCode.PREFER_FAILURE, b""
    elif isinstance(option, Filter):
        code = OptionCode.FILTER
        data = struct.pack("!BBH", 0, option.prefix_length, option.remote_port) + address_to_wire(option.remote_address)
    elif isinstance(option, UnknownOption):
        code, data = option.code, option.data
    else:
        raise PortmapProtocolError(f"not a PCP option: {option!r}")
    padding = b"\x00" * (-len(data) % 4)
    return struct.pack("!BBH", code, 0, len(data)) + data + padding


def _options_to_wire(options: tuple[Option, ...]) -> bytes:
    once = [type(o) for o in options if isinstance(o, (ThirdParty, PreferFailure))]
    if len(once) != len(set(once)):
        raise PortmapProtocolError("PCP THIRD_PARTY and PREFER_FAILURE may appear once each")
    return b"".join(_option_to_wire(o) for o in options)


def _parse_options(data: bytes, offset: int) -> tuple[Option, ...]:
    options: list[Option] = []
    seen: set[int] = set()
    while offset < len(data):
        if len(data) - offset < 4:
            raise PortmapProtocolError("PCP option header cut short", result=ResultCode.MALFORMED_OPTION)
        code, _reserved, length = struct.unpack_from("!BBH", data, offset)
        start = offset + 4
        end = start + length
        if end > len(data):
            raise PortmapProtocolError(f"PCP option {code} longer than the message", result=ResultCode.MALFORMED_OPTION)
        body = data[start:end]
        offset = end + (-length % 4)
        if code in (OptionCode.THIRD_PARTY, OptionCode.PREFER_FAILURE) and code in seen:
            raise PortmapProtocolError(f"PCP option {code} more than once", result=ResultCode.MALFORMED_OPTION)
        seen.add(code)
        options.append(_decode_option(code, body))
    if offset != len(data):
        raise PortmapProtocolError("PCP option padding beyond the message", result=ResultCode.MALFORMED_OPTION)
    return tuple(options)


_OPTION_LENGTHS: dict[int, int] = {OptionCode.THIRD_PARTY: 16, OptionCode.PREFER_FAILURE: 0, OptionCode.FILTER: 20}


def _decode_option(code: int, body: bytes) -> Option:
    want = _OPTION_LENGTHS.get(code)
    if want is not None and len(body) != want:
        raise PortmapProtocolError(f"PCP option {code} of {len(body)} bytes, want {want}",
                                   result=ResultCode.MALFORMED_OPTION)
    if code == OptionCode.THIRD_PARTY:
        return ThirdParty(address_from_wire(body))
    if code == OptionCode.PREFER_FAILURE:
        return PreferFailure()
    if code == OptionCode.FILTER:
        return Filter(body[1], struct.unpack_from("!H", body, 2)[0], address_from_wire(body[4:20]))
    return UnknownOption(code, bytes(body))


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class MapData:
    """The MAP opcode's data: suggested (request) or assigned (response) mapping."""

    nonce: bytes  # 12 random bytes; the responses to this mapping carry the same
    protocol: int  # PROTO_UDP, PROTO_TCP, PROTO_ALL
    internal_port: int  # 0 with protocol 0: all ports
    external_port: int  # suggested (0: no preference) or assigned
    external_address: IPAddress  # suggested (all-zeros: no preference) or assigned

    def __post_init__(self) -> None:
        if not isinstance(self.nonce, bytes) or len(self.nonce) != NONCE_LEN:
            raise PortmapProtocolError("PCP mapping nonce must be 12 bytes")
        check_uint(self.protocol, 8, "PCP protocol")
        check_uint(self.internal_port, 16, "PCP internal port")
        check_uint(self.external_port, 16, "PCP external port")

    def to_wire(self) -> bytes:
        return (self.nonce + struct.pack("!B3xHH", self.protocol, self.internal_port, self.external_port)
                + address_to_wire(self.external_address))

    @classmethod
    def from_wire(cls, data: bytes) -> "MapData":
        protocol, internal, external = struct.unpack_from("!B3xHH", data, NONCE_LEN)
        return cls(bytes(data[:NONCE_LEN]), protocol, internal, external, address_from_wire(data[20:36]))


@dataclass(frozen=True, slots=True)
class Request:
    """A PCP request. MAP: ``map`` set; ANNOUNCE: neither; other opcodes: ``payload``."""

    opcode: int
    lifetime: int  # s requested; 0 deletes a mapping (and is always 0 for ANNOUNCE)
    client_address: IPAddress  # the client's own address; the server checks the source
    map: Optional[MapData] = None
    options: tuple[Option, ...] = ()
    payload: bytes = b""  # the opcode data of opcodes other than MAP and ANNOUNCE

    def __post_init__(self) -> None:
        _check_opcode_body(self.opcode, self.map, self.payload)
        check_uint(self.lifetime, 32, "PCP lifetime")
        address_to_wire(self.client_address)

    def to_wire(self) -> bytes:
        body = self.map.to_wire() if self.map is not None else self.payload
        wire = (struct.pack("!BBHI", VERSION, self.opcode, 0, self.lifetime) + address_to_wire(self.client_address)
                + body + _options_to_wire(self.options))
        return _checked_size(wire)


@dataclass(frozen=True, slots=True)
class Response:
    """A PCP response. MAP: ``map`` set (the assigned mapping, or the request's on error)."""

    opcode: int
    result: int
    lifetime: int  # s granted (0: deleted); on an error, how long the error holds
    epoch: int  # the server's epoch time: s since its mapping state began
    map: Optional[MapData] = None  # None only in an error without the request's data
    options: tuple[Option, ...] = ()
    payload: bytes = b""
    version: int = VERSION  # another only in an UNSUPP_VERSION answer: the server's version

    def __post_init__(self) -> None:
        _check_opcode_body(self.opcode, self.map, self.payload, need_map=self.result == ResultCode.SUCCESS)
        check_uint(self.version, 8, "PCP version")
        check_uint(self.result, 8, "PCP result code")
        check_uint(self.lifetime, 32, "PCP lifetime")
        check_uint(self.epoch, 32, "PCP epoch")

    def to_wire(self) -> bytes:
        body = self.map.to_wire() if self.map is not None else self.payload
        header = struct.pack("!BBBBII12x", self.version, RESPONSE_BIT | self.opcode, 0, self.result,
                             self.lifetime, self.epoch)
        wire = header + body + _options_to_wire(self.options)
        return _checked_size(wire)


def _check_opcode_body(opcode: int, map_data: Optional[MapData], payload: bytes, *, need_map: bool = True) -> None:
    check_uint(opcode, 7, "PCP opcode")
    if map_data is not None and opcode != Opcode.MAP:
        raise PortmapProtocolError("only PCP MAP has MAP data")
    if map_data is None and opcode == Opcode.MAP and need_map:
        raise PortmapProtocolError("PCP MAP needs its opcode data")
    if payload and opcode in (Opcode.MAP, Opcode.ANNOUNCE):
        raise PortmapProtocolError(f"PCP opcode {opcode} takes no opaque payload")
    if len(payload) % 4 or len(payload) > MAX_MESSAGE:
        raise PortmapProtocolError("PCP opcode payload must be a multiple of 4 bytes")


def _checked_size(wire: bytes) -> bytes:
    if len(wire) > MAX_MESSAGE:
        raise PortmapProtocolError(f"PCP message of {len(wire)} bytes exceeds {MAX_MESSAGE}")
    return wire


def map_request(client_address: IPAddress, nonce: bytes, internal_port: int, lifetime: int, *,
                protocol: int = PROTO_UDP, suggested_port: int = 0,
                suggested_address: Optional[IPAddress] = None, options: tuple[Option, ...] = ()) -> Request:
    """MAP ``internal_port`` (lifetime 0: delete the mapping with this nonce)."""
    external = suggested_address if suggested_address is not None else any_address(client_address)
    return Request(Opcode.MAP, lifetime, client_address,
                   MapData(nonce, protocol, internal_port, suggested_port, external), options)


def announce_request(client_address: IPAddress) -> Request:
    return Request(Opcode.ANNOUNCE, 0, client_address)


# --------------------------------------------------------------------------- parsing


def _split(data: bytes, what: str) -> None:
    if len(data) < HEADER_LEN or len(data) > MAX_MESSAGE or len(data) % 4:
        raise PortmapProtocolError(f"PCP {what} of {len(data)} bytes")


def _opcode_body(opcode: int, data: bytes) -> tuple[Optional[MapData], bytes, int]:
    """The opcode data and where the options start. Unknown opcodes: all of it opaque."""
    if opcode == Opcode.MAP:
        if len(data) < HEADER_LEN + MAP_DATA_LEN:
            raise PortmapProtocolError(f"PCP MAP of {len(data)} bytes")
        return MapData.from_wire(data[HEADER_LEN:HEADER_LEN + MAP_DATA_LEN]), b"", HEADER_LEN + MAP_DATA_LEN
    if opcode == Opcode.ANNOUNCE:
        return None, b"", HEADER_LEN
    return None, bytes(data[HEADER_LEN:]), len(data)


def parse_request(data: bytes) -> Request:
    """A PCP request, as a server reads it (see :func:`error_response` for the answers)."""
    _split(data, "request")
    version, op_byte, _reserved, lifetime = struct.unpack_from("!BBHI", data)
    if version != VERSION:
        raise PortmapProtocolError(f"PCP version {version}", result=ResultCode.UNSUPP_VERSION)
    if op_byte & RESPONSE_BIT:
        raise PortmapProtocolError("a PCP response, not a request")
    opcode = op_byte
    map_data, payload, options_at = _opcode_body(opcode, data)
    return Request(opcode, lifetime, address_from_wire(data[8:24]), map_data,
                   _parse_options(data, options_at), payload)


def parse_response(data: bytes) -> Response:
    """A PCP response, as a client reads it.

    A NAT-PMP gateway answers a PCP request with a NAT-PMP error (version 0): check
    :func:`nattool.protocol.natpmp.is_natpmp_response` first.
    """
    _split(data, "response")
    version, op_byte, _reserved, result, lifetime, epoch = struct.unpack_from("!BBBBII", data)
    if not op_byte & RESPONSE_BIT:
        raise PortmapProtocolError("a PCP request, not a response")
    opcode = op_byte & ~RESPONSE_BIT
    if version != VERSION:
        if result != ResultCode.UNSUPP_VERSION:
            raise PortmapProtocolError(f"PCP version {version}")
        # The server speaks another version (its own, in the version field): no body to trust.
        return Response(opcode, result, lifetime, epoch, version=version)
    if result != ResultCode.SUCCESS and opcode == Opcode.MAP and len(data) < HEADER_LEN + MAP_DATA_LEN:
        return Response(opcode, result, lifetime, epoch)  # an error that did not copy the request
    map_data, payload, options_at = _opcode_body(opcode, data)
    return Response(opcode, result, lifetime, epoch, map_data, _parse_options(data, options_at), payload)


def response_version(data: bytes) -> Optional[int]:
    """The version byte of what looks like a PCP/NAT-PMP response on port 5351, else None."""
    if len(data) >= 2 and data[1] & RESPONSE_BIT:
        return data[0]
    return None


def error_response(request: bytes, result: int, epoch: int, lifetime: int = 1800) -> Optional[bytes]:
    """A server's error answer to ``request`` bytes (section 7.2), or None when none is due.

    The request is copied (up to 1100 bytes, cut to a multiple of 4) with the response
    header written over it; an UNSUPP_VERSION answer is the bare header. None for a
    message shorter than 2 bytes or with the R bit set (silently dropped).
    """
    check_uint(result, 8, "PCP result code")
    check_uint(epoch, 32, "PCP epoch")
    check_uint(lifetime, 32, "PCP lifetime")
    if len(request) < 2 or request[1] & RESPONSE_BIT:
        return None
    opcode = request[1]
    copied = b"" if result == ResultCode.UNSUPP_VERSION else bytes(request[HEADER_LEN:MAX_MESSAGE])
    copied = copied[: len(copied) - len(copied) % 4]
    return struct.pack("!BBBBII12x", VERSION, RESPONSE_BIT | opcode, 0, result, lifetime, epoch) + copied


__all__ = [
    "CLIENT_PORT", "Filter", "HEADER_LEN", "INITIAL_RETRANSMIT", "IPV4_ANY", "IPV6_ANY",
    "MAP_DATA_LEN", "MAX_MESSAGE", "MAX_RETRANSMIT", "MapData", "NONCE_LEN", "Opcode", "Option",
    "OptionCode", "PROTO_ALL", "PROTO_TCP", "PROTO_UDP", "PreferFailure", "Request", "Response",
    "ResultCode", "SERVER_PORT", "SHORT_LIFETIME_ERRORS", "ThirdParty", "UnknownOption", "VERSION",
    "address_from_wire", "address_to_wire", "announce_request", "any_address", "error_response",
    "is_mandatory_option", "map_request", "parse_request", "parse_response", "response_version",
    "result_name",
]
