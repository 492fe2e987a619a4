"""TURN codec (RFC 8656) on top of the STUN codec: methods, attributes, ChannelData.

Pure. The TURN attributes are taught to :mod:`nattool.protocol.stun` (its
``register_attribute``; stun imports this module, so ``stun.parse`` always decodes
them); there is one STUN codec. ChannelData messages are not STUN and have their own
functions here. On any input bytes the decoders raise nothing but ProtocolError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional

from nattool.errors import ProtocolError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.stun import (
    HEADER_LEN,
    MAGIC_COOKIE,
    decode_xor_address,
    encode_xor_address,
    register_attribute,
)

_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")


class TurnMethod(IntEnum):
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


TURN_METHODS = frozenset(int(m) for m in TurnMethod)


class TurnAttr(IntEnum):
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    RESERVATION_TOKEN = 0x0022
    ADDITIONAL_ADDRESS_FAMILY = 0x8000
    ADDRESS_ERROR_CODE = 0x8001
    ICMP = 0x8004


class TurnError(IntEnum):
    """Error codes a TURN server answers with (RFC 8489 section 14.8, RFC 8656 section 19)."""

    BAD_REQUEST = 400
    UNAUTHENTICATED = 401
    FORBIDDEN = 403
    UNKNOWN_ATTRIBUTE = 420
    ALLOCATION_MISMATCH = 437
    STALE_NONCE = 438
    ADDRESS_FAMILY_NOT_SUPPORTED = 440
    WRONG_CREDENTIALS = 441
    UNSUPPORTED_TRANSPORT = 442
    PEER_ADDRESS_FAMILY_MISMATCH = 443
    ALLOCATION_QUOTA_REACHED = 486
    SERVER_ERROR = 500
    INSUFFICIENT_CAPACITY = 508


REASONS: dict[int, str] = {
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}

PROTO_UDP = 17
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02
# RFC 8656 section 12 narrowed channel numbers to 0x4000-0x4FFF; RFC 5766 allowed up to
# 0x7FFF and clients still use that range (coturn's turnutils_uclient picks channels at
# random in it), so the server accepts 0x4000-0x7FFF: first bytes 0x40-0x7F.
CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x7FFF
CHANNEL_HEADER = 4


# --------------------------------------------------------------------------- attributes


@dataclass(frozen=True, slots=True)
class ChannelNumber:
    number: int
    TYPE = TurnAttr.CHANNEL_NUMBER


@dataclass(frozen=True, slots=True)
class Lifetime:
    seconds: int
    TYPE = TurnAttr.LIFETIME


@dataclass(frozen=True, slots=True)
class XorPeerAddress:
    endpoint: Endpoint
    TYPE = TurnAttr.XOR_PEER_ADDRESS


@dataclass(frozen=True, slots=True)
class Data:
    payload: bytes
    TYPE = TurnAttr.DATA


@dataclass(frozen=True, slots=True)
class XorRelayedAddress:
    endpoint: Endpoint
    TYPE = TurnAttr.XOR_RELAYED_ADDRESS


@dataclass(frozen=True, slots=True)
class RequestedAddressFamily:
    family: int  # 4 or 6 (the IP version, not the wire code)
    TYPE = TurnAttr.REQUESTED_ADDRESS_FAMILY


@dataclass(frozen=True, slots=True)
class AdditionalAddressFamily:
    family: int  # 4 or 6; RFC 8656 allows only 6 here (the server checks, not the codec)
    TYPE = TurnAttr.ADDITIONAL_ADDRESS_FAMILY


@dataclass(frozen=True, slots=True)
class EvenPort:
    reserve_next: bool = False  # the R bit: also reserve the next-higher port
    TYPE = TurnAttr.EVEN_PORT


@dataclass(frozen=True, slots=True)
class RequestedTransport:
    protocol: int  # an IP protocol number: 17 is UDP
    TYPE = TurnAttr.REQUESTED_TRANSPORT


@dataclass(frozen=True, slots=True)
class DontFragment:
    TYPE = TurnAttr.DONT_FRAGMENT


@dataclass(frozen=True, slots=True)
class ReservationToken:
    token: bytes  # 8 bytes
    TYPE = TurnAttr.RESERVATION_TOKEN


@dataclass(frozen=True, slots=True)
class AddressErrorCode:
    family: int  # 4 or 6
    code: int
    reason: str = ""
    TYPE = TurnAttr.ADDRESS_ERROR_CODE


@dataclass(frozen=True, slots=True)
class Icmp:
    icmp_type: int
    icmp_code: int
    error_data: int = 0
    TYPE = TurnAttr.ICMP


_FAMILY_CODE = {4: FAMILY_IPV4, 6: FAMILY_IPV6}
_FAMILY_VERSION = {FAMILY_IPV4: 4, FAMILY_IPV6: 6}


def _family_value(family: int) -> bytes:
    code = _FAMILY_CODE.get(family)
    if code is None:
        raise ProtocolError(f"address family {family} is not 4 or 6")
    return bytes((code, 0, 0, 0))


def _family_of(value: bytes, name: str) -> int:
    if len(value) != 4:
        raise ProtocolError(f"{name} must have 4 bytes")
    family = _FAMILY_VERSION.get(value[0])
    if family is None:
        raise ProtocolError(f"{name}: unknown family {value[0]}")
    return family


def _exactly(value: bytes, n: int, name: str) -> bytes:
    if len(value) != n:
        raise ProtocolError(f"{name} must have {n} bytes")
    return value


def _error_code_parts(code: int, reason: str) -> bytes:
    if not 300 <= code <= 699:
        raise ProtocolError(f"error code {code} out of range 300..699")
    return struct.pack("!BB", code // 100, code % 100) + reason.encode("utf-8")


def _code_of(value: bytes) -> int:
    code = (value[0] & 0x7) * 100 + value[1]
    if not 300 <= code <= 699 or value[1] > 99:
        raise ProtocolError(f"bad error code {value[0] & 0x7}/{value[1]}")
    return code


def _decode_address_error(value: bytes, txid: bytes) -> AddressErrorCode:
    if len(value) < 4:
        raise ProtocolError("ADDRESS-ERROR-CODE too short")
    family = _FAMILY_VERSION.get(value[0])
    if family is None:
        raise ProtocolError(f"ADDRESS-ERROR-CODE: unknown family {value[0]}")
    return AddressErrorCode(family, _code_of(value[2:4]), value[4:].decode("utf-8", errors="replace"))


def _check_channel(number: int) -> int:
    if not 0 <= number <= 0xFFFF:
        raise ProtocolError(f"channel number {number} out of range")
    return number


def _register() -> None:
    register_attribute(
        ChannelNumber,
        lambda v, t: ChannelNumber(struct.unpack("!H", _exactly(v, 4, "CHANNEL-NUMBER")[:2])[0]),
        lambda a, t: struct.pack("!HH", _check_channel(a.number), 0),
    )
    register_attribute(
        Lifetime,
        lambda v, t: Lifetime(struct.unpack("!I", _exactly(v, 4, "LIFETIME"))[0]),
        lambda a, t: struct.pack("!I", min(max(a.seconds, 0), 0xFFFFFFFF)),
    )
    register_attribute(
        XorPeerAddress,
        lambda v, t: XorPeerAddress(decode_xor_address(v, t)),
        lambda a, t: encode_xor_address(a.endpoint, t),
    )
    register_attribute(Data, lambda v, t: Data(bytes(v)), lambda a, t: a.payload)
    register_attribute(
        XorRelayedAddress,
        lambda v, t: XorRelayedAddress(decode_xor_address(v, t)),
        lambda a, t: encode_xor_address(a.endpoint, t),
    )
    register_attribute(
        RequestedAddressFamily,
        lambda v, t: RequestedAddressFamily(_family_of(v, "REQUESTED-ADDRESS-FAMILY")),
        lambda a, t: _family_value(a.family),
    )
    register_attribute(
        AdditionalAddressFamily,
        lambda v, t: AdditionalAddressFamily(_family_of(v, "ADDITIONAL-ADDRESS-FAMILY")),
        lambda a, t: _family_value(a.family),
    )
    register_attribute(
        EvenPort,
        lambda v, t: EvenPort(bool(_exactly(v, 1, "EVEN-PORT")[0] & 0x80)),
        lambda a, t: b"\x80" if a.reserve_next else b"\x00",
    )
    register_attribute(
        RequestedTransport,
        lambda v, t: RequestedTransport(_exactly(v, 4, "REQUESTED-TRANSPORT")[0]),
        lambda a, t: bytes((a.protocol & 0xFF, 0, 0, 0)),
    )
    register_attribute(
        DontFragment,
        lambda v, t: DontFragment() if not v else _raise("DONT-FRAGMENT has no value"),
        lambda a, t: b"",
    )
    register_attribute(
        ReservationToken,
        lambda v, t: ReservationToken(bytes(_exactly(v, 8, "RESERVATION-TOKEN"))),
        lambda a, t: _exactly(a.token, 8, "RESERVATION-TOKEN"),
    )
    register_attribute(
        AddressErrorCode,
        _decode_address_error,
        lambda a, t: bytes((_FAMILY_CODE.get(a.family, 0), 0)) + _error_code_parts(a.code, a.reason),
    )
    register_attribute(
        Icmp,
        lambda v, t: Icmp(*struct.unpack("!xxBBI", _exactly(v, 8, "ICMP"))),
        lambda a, t: struct.pack("!HBBI", 0, a.icmp_type & 0xFF, a.icmp_code & 0xFF, a.error_data & 0xFFFFFFFF),
    )


def _raise(message: str) -> DontFragment:
    raise ProtocolError(message)


_register()


# --------------------------------------------------------------------------- demultiplexing


def is_channel_data(data: bytes) -> bool:
    """First byte 0x40-0x7F: a ChannelData message (RFC 8656 section 12, with RFC
    5766's wider channel range)."""
    return len(data) >= CHANNEL_HEADER and 0x40 <= data[0] <= 0x7F


def is_turn_message(data: bytes) -> bool:
    """A STUN-shaped message (cookie, length matching) whose method is a TURN method:
    what the server hands to the TURN core rather than the STUN responder."""
    if len(data) < HEADER_LEN or data[0] & 0xC0 or data[4:8] != _COOKIE:
        return False
    length = (data[2] << 8) | data[3]
    if length % 4 or HEADER_LEN + length != len(data):
        return False
    msg_type = (data[0] << 8) | data[1]
    method = ((msg_type & 0x3E00) >> 2) | ((msg_type & 0x00E0) >> 1) | (msg_type & 0x000F)
    return method in TURN_METHODS


# --------------------------------------------------------------------------- ChannelData


@dataclass(frozen=True, slots=True)
class ChannelData:
    channel: int
    payload: bytes


def encode_channel_data(channel: int, payload: bytes, *, stream: bool = False) -> bytes:
    """A ChannelData message; over a stream (TCP) padded to a multiple of 4 bytes
    (RFC 8656 section 12.5), over UDP not padded."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise ProtocolError(f"channel number {channel:#x} out of range 0x4000..0x7FFF")
    if len(payload) > 0xFFFF:
        raise ProtocolError("ChannelData payload longer than 65535 bytes")
    head = struct.pack("!HH", channel, len(payload))
    if stream and len(payload) % 4:
        return head + payload + bytes(-len(payload) % 4)
    return head + payload


def parse_channel_data(data: bytes) -> ChannelData:
    """Decode one ChannelData message (a whole datagram, or one frame of a stream).
    Up to 3 bytes of padding after the payload are accepted (always there over TCP,
    allowed over UDP); anything else that disagrees with the length is refused."""
    if len(data) < CHANNEL_HEADER:
        raise ProtocolError("shorter than a ChannelData header")
    channel, length = struct.unpack_from("!HH", data)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise ProtocolError(f"ChannelData channel {channel:#x} out of range")
    extra = len(data) - CHANNEL_HEADER - length
    if not 0 <= extra <= 3:
        raise ProtocolError("ChannelData length does not match the message")
    return ChannelData(channel, bytes(data[CHANNEL_HEADER : CHANNEL_HEADER + length]))


def channel_data_payload(data: bytes) -> Optional[tuple[int, bytes]]:
    """(channel, payload) of a ChannelData message, or None when it is not a valid
    one: the relay's per-packet path, no exception and no object. Same verdicts as
    :func:`parse_channel_data` (a test compares them)."""
    n = len(data)
    if n < CHANNEL_HEADER:
        return None
    channel = (data[0] << 8) | data[1]
    length = (data[2] << 8) | data[3]
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX or not 0 <= n - CHANNEL_HEADER - length <= 3:
        return None
    return channel, data[CHANNEL_HEADER : CHANNEL_HEADER + length]
