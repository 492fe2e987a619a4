"""STUN codec (RFC 8489 / RFC 5389, RFC 3489 "classic" messages, RFC 5780 attributes).

Pure: bytes in, frozen dataclasses out, and back. No sockets, clocks or randomness
(transaction ids are passed in). On any input bytes :func:`parse` raises nothing but
:class:`~nattool.errors.ProtocolError`.

A message with the magic cookie has a 12-byte transaction id; an RFC 3489 message
(no cookie) is represented with a 16-byte transaction id -- the four bytes where the
cookie would be belong to it -- so replies echo it exactly.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Iterable, Optional, Union

from nattool.errors import ProtocolError
from nattool.protocol.endpoint import Endpoint

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LEN = 20
FINGERPRINT_XOR = 0x5354554E
DEFAULT_STUN_PORT = 3478
# A STUN message over UDP never needs more; bigger inputs are refused before any work.
MAX_MESSAGE = 65535 + HEADER_LEN


class MsgClass(IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Method(IntEnum):
    BINDING = 0x001


class AttrType(IntEnum):
    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002  # RFC 3489; deliberately not supported (reflection)
    CHANGE_REQUEST = 0x0003
    SOURCE_ADDRESS = 0x0004
    CHANGED_ADDRESS = 0x0005
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    XOR_MAPPED_ADDRESS = 0x0020
    PADDING = 0x0026
    RESPONSE_PORT = 0x0027
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C


def is_comprehension_required(attr_type: int) -> bool:
    return attr_type < 0x8000


# --------------------------------------------------------------------------- attributes


@dataclass(frozen=True, slots=True)
class _AddressAttr:
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class MappedAddress(_AddressAttr):
    TYPE = AttrType.MAPPED_ADDRESS


@dataclass(frozen=True, slots=True)
class XorMappedAddress(_AddressAttr):
    TYPE = AttrType.XOR_MAPPED_ADDRESS


@dataclass(frozen=True, slots=True)
class SourceAddress(_AddressAttr):
    TYPE = AttrType.SOURCE_ADDRESS


@dataclass(frozen=True, slots=True)
class ChangedAddress(_AddressAttr):
    TYPE = AttrType.CHANGED_ADDRESS


@dataclass(frozen=True, slots=True)
class ResponseOrigin(_AddressAttr):
    TYPE = AttrType.RESPONSE_ORIGIN


@dataclass(frozen=True, slots=True)
class OtherAddress(_AddressAttr):
    TYPE = AttrType.OTHER_ADDRESS


@dataclass(frozen=True, slots=True)
class ChangeRequest:
    change_ip: bool = False
    change_port: bool = False
    TYPE = AttrType.CHANGE_REQUEST


@dataclass(frozen=True, slots=True)
class ResponsePort:
    port: int
    TYPE = AttrType.RESPONSE_PORT


@dataclass(frozen=True, slots=True)
class Padding:
    length: int
    TYPE = AttrType.PADDING


@dataclass(frozen=True, slots=True)
class Software:
    text: str
    TYPE = AttrType.SOFTWARE


@dataclass(frozen=True, slots=True)
class Username:
    name: str
    TYPE = AttrType.USERNAME


@dataclass(frozen=True, slots=True)
class Realm:
    text: str
    TYPE = AttrType.REALM


@dataclass(frozen=True, slots=True)
class Nonce:
    text: str
    TYPE = AttrType.NONCE


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: int
    reason: str = ""
    TYPE = AttrType.ERROR_CODE


@dataclass(frozen=True, slots=True)
class UnknownAttributes:
    types: tuple[int, ...]
    TYPE = AttrType.UNKNOWN_ATTRIBUTES


@dataclass(frozen=True, slots=True)
class MessageIntegrity:
    """HMAC-SHA1 as received; :meth:`StunMessage.to_wire` computes a fresh one."""

    mac: bytes
    TYPE = AttrType.MESSAGE_INTEGRITY


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """CRC as received (parse has already verified it); to_wire computes a fresh one."""

    crc: int
    TYPE = AttrType.FINGERPRINT


@dataclass(frozen=True, slots=True)
class RawAttribute:
    """An attribute this codec does not interpret (kept so it can be reported/echoed)."""

    type: int
    value: bytes


Attribute = Union[
    MappedAddress,
    XorMappedAddress,
    SourceAddress,
    ChangedAddress,
    ResponseOrigin,
    OtherAddress,
    ChangeRequest,
    ResponsePort,
    Padding,
    Software,
    Username,
    Realm,
    Nonce,
    ErrorCode,
    UnknownAttributes,
    MessageIntegrity,
    Fingerprint,
    RawAttribute,
]

_ADDRESS_TYPES: dict[int, type[_AddressAttr]] = {
    int(c.TYPE): c
    for c in (MappedAddress, XorMappedAddress, SourceAddress, ChangedAddress, ResponseOrigin, OtherAddress)
}


# Attributes of protocols built on STUN (TURN): type -> decode(value, txid), class ->
# encode(attr, txid) -> value. Filled by those modules (nattool.protocol.turn) so this
# codec stays the only one.
_EXTENSION_DECODERS: dict[int, Callable[[bytes, bytes], Any]] = {}
_EXTENSION_ENCODERS: dict[type, Callable[[Any, bytes], bytes]] = {}


def register_attribute(cls: type, decode: Callable[[bytes, bytes], Any], encode: Callable[[Any, bytes], bytes]) -> None:
    """Teach the codec one more attribute class (``cls.TYPE`` is its type number).
    ``decode`` raises only ProtocolError."""
    _EXTENSION_DECODERS[int(cls.TYPE)] = decode  # type: ignore[attr-defined]
    _EXTENSION_ENCODERS[cls] = encode


def attr_type(attr: Attribute) -> int:
    return attr.type if isinstance(attr, RawAttribute) else int(attr.TYPE)


# --------------------------------------------------------------------------- message


def _message_type(method: int, msg_class: int) -> int:
    return (
        ((method & 0xF80) << 2)
        | ((method & 0x070) << 1)
        | (method & 0x00F)
        | ((msg_class & 0b10) << 7)
        | ((msg_class & 0b01) << 4)
    )


def _split_type(msg_type: int) -> tuple[int, MsgClass]:
    method = ((msg_type & 0x3E00) >> 2) | ((msg_type & 0x00E0) >> 1) | (msg_type & 0x000F)
    cls = MsgClass(((msg_type & 0x0100) >> 7) | ((msg_type & 0x0010) >> 4))
    return method, cls


@dataclass(frozen=True, slots=True)
class StunMessage:
    msg_class: MsgClass
    method: int
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()
    # Set by parse(): None when the message has no MESSAGE-INTEGRITY. Excluded from
    # equality so a parsed message equals the one it was built from.
    integrity_offset: Optional[int] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.transaction_id) not in (12, 16):
            raise ProtocolError("a STUN transaction id has 12 bytes (16 for RFC 3489)")
        if not 0 <= self.method <= 0xFFF:
            raise ProtocolError(f"STUN method {self.method} out of range")

    @property
    def classic(self) -> bool:
        """An RFC 3489 message: no magic cookie."""
        return len(self.transaction_id) == 16

    def get(self, cls: type) -> Optional[Attribute]:
        """The first attribute of a given class (RFC 8489: later duplicates are ignored)."""
        for attr in self.attributes:
            if type(attr) is cls:
                return attr
        return None

    def get_all(self, cls: type) -> list[Attribute]:
        return [a for a in self.attributes if type(a) is cls]

    def endpoint_of(self, cls: type[_AddressAttr]) -> Optional[Endpoint]:
        attr = self.get(cls)
        return attr.endpoint if isinstance(attr, _AddressAttr) else None

    @property
    def has_fingerprint(self) -> bool:
        return self.get(Fingerprint) is not None

    def to_wire(
        self,
        *,
        fingerprint: bool = False,
        integrity_key: Optional[bytes] = None,
        pad_byte: int = 0,
    ) -> bytes:
        """Encode. MESSAGE-INTEGRITY and FINGERPRINT in ``attributes`` are ignored; they
        are computed here when asked for. ``pad_byte`` fills attribute padding (RFC 5769
        vectors use 0x20; the value is meaningless to receivers)."""
        txid = self.transaction_id
        body = bytearray()
        for attr in self.attributes:
            if isinstance(attr, (MessageIntegrity, Fingerprint)):
                continue
            body += _encode_attr(attr, txid, pad_byte)
        head_tail = txid if self.classic else _COOKIE_BYTES + txid
        msg_type = _message_type(self.method, self.msg_class)
        if integrity_key is not None:
            length = len(body) + 24
            header = struct.pack("!HH", msg_type, length) + head_tail
            mac = hmac.new(integrity_key, header + bytes(body), hashlib.sha1).digest()
            body += struct.pack("!HH", AttrType.MESSAGE_INTEGRITY, 20) + mac
        if fingerprint:
            length = len(body) + 8
            header = struct.pack("!HH", msg_type, length) + head_tail
            crc = (zlib.crc32(header + bytes(body)) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            body += struct.pack("!HHI", AttrType.FINGERPRINT, 4, crc)
        if len(body) > 0xFFFF:
            raise ProtocolError("STUN message too long")
        return struct.pack("!HH", msg_type, len(body)) + head_tail + bytes(body)


# --------------------------------------------------------------------------- encoding


def _pad(value: bytes, pad_byte: int) -> bytes:
    return value + bytes([pad_byte]) * (-len(value) % 4)


def _encode_address(ep: Endpoint, xor_with: Optional[bytes]) -> bytes:
    family = 0x01 if ep.ip.version == 4 else 0x02
    port = ep.port
    addr = ep.ip.packed
    if xor_with is not None:
        port ^= MAGIC_COOKIE >> 16
        addr = bytes(a ^ b for a, b in zip(addr, xor_with))
    return struct.pack("!BBH", 0, family, port) + addr


def encode_xor_address(ep: Endpoint, txid: bytes) -> bytes:
    """The value of an XOR address attribute (XOR-MAPPED-ADDRESS and TURN's kin)."""
    if len(txid) != 12:
        raise ProtocolError("an XOR address needs the magic cookie (RFC 3489 message)")
    return _encode_address(ep, _COOKIE_BYTES + txid)


def decode_xor_address(value: bytes, txid: bytes) -> Endpoint:
    if len(txid) != 12:
        raise ProtocolError("an XOR address needs the magic cookie (RFC 3489 message)")
    return _decode_address(value, _COOKIE_BYTES + txid)


def _encode_attr(attr: Attribute, txid: bytes, pad_byte: int) -> bytes:
    t = attr_type(attr)
    if isinstance(attr, XorMappedAddress):
        if len(txid) != 12:
            raise ProtocolError("XOR-MAPPED-ADDRESS needs the magic cookie (RFC 3489 message)")
        value = _encode_address(attr.endpoint, _COOKIE_BYTES + txid)
    elif isinstance(attr, _AddressAttr):
        value = _encode_address(attr.endpoint, None)
    elif isinstance(attr, ChangeRequest):
        value = struct.pack("!I", (0x4 if attr.change_ip else 0) | (0x2 if attr.change_port else 0))
    elif isinstance(attr, ResponsePort):
        value = struct.pack("!HH", attr.port, 0)
    elif isinstance(attr, Padding):
        value = bytes(attr.length)
    elif isinstance(attr, Software):
        value = attr.text.encode("utf-8")
    elif isinstance(attr, Username):
        value = attr.name.encode("utf-8")
    elif isinstance(attr, (Realm, Nonce)):
        value = attr.text.encode("utf-8")
    elif isinstance(attr, ErrorCode):
        if not 300 <= attr.code <= 699:
            raise ProtocolError(f"STUN error code {attr.code} out of range 300..699")
        value = struct.pack("!HBB", 0, attr.code // 100, attr.code % 100) + attr.reason.encode("utf-8")
    elif isinstance(attr, UnknownAttributes):
        value = b"".join(struct.pack("!H", x) for x in attr.types)
    elif isinstance(attr, RawAttribute):
        value = attr.value
    elif type(attr) in _EXTENSION_ENCODERS:
        value = _EXTENSION_ENCODERS[type(attr)](attr, txid)
    else:  # MessageIntegrity / Fingerprint are skipped by the caller
        raise ProtocolError(f"cannot encode {attr!r}")
    if len(value) > 0xFFFF:
        raise ProtocolError("STUN attribute too long")
    return struct.pack("!HH", t, len(value)) + _pad(value, pad_byte)


# --------------------------------------------------------------------------- decoding


def _decode_address(value: bytes, xor_with: Optional[bytes]) -> Endpoint:
    if len(value) < 4:
        raise ProtocolError("STUN address attribute too short")
    family = value[1]
    port = struct.unpack_from("!H", value, 2)[0]
    addr = value[4:]
    if family == 0x01 and len(addr) == 4:
        pass
    elif family == 0x02 and len(addr) == 16:
        pass
    else:
        raise ProtocolError(f"STUN address family {family} with {len(addr)} address bytes")
    if xor_with is not None:
        port ^= MAGIC_COOKIE >> 16
        addr = bytes(a ^ b for a, b in zip(addr, xor_with))
    ip = ipaddress.IPv4Address(addr) if family == 0x01 else ipaddress.IPv6Address(addr)
    return Endpoint(ip, port)


def _decode_attr(t: int, value: bytes, txid: bytes) -> Attribute:
    if t == AttrType.XOR_MAPPED_ADDRESS:
        if len(txid) != 12:
            return RawAttribute(t, value)  # meaningless without the cookie
        return XorMappedAddress(_decode_address(value, _COOKIE_BYTES + txid))
    cls = _ADDRESS_TYPES.get(t)
    if cls is not None:
        return cls(_decode_address(value, None))
    if t == AttrType.CHANGE_REQUEST:
        if len(value) != 4:
            raise ProtocolError("CHANGE-REQUEST must have 4 bytes")
        flags = struct.unpack("!I", value)[0]
        return ChangeRequest(bool(flags & 0x4), bool(flags & 0x2))
    if t == AttrType.RESPONSE_PORT:
        if len(value) != 4:
            raise ProtocolError("RESPONSE-PORT must have 4 bytes")
        return ResponsePort(struct.unpack_from("!H", value)[0])
    if t == AttrType.PADDING:
        return Padding(len(value))
    if t == AttrType.SOFTWARE:
        # Informational only: a bad encoding must not cost the whole message.
        return Software(value.decode("utf-8", errors="replace"))
    if t == AttrType.USERNAME:
        try:
            return Username(value.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError("USERNAME is not UTF-8") from None
    if t == AttrType.REALM or t == AttrType.NONCE:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("REALM / NONCE is not UTF-8") from None
        return Realm(text) if t == AttrType.REALM else Nonce(text)
    if t == AttrType.ERROR_CODE:
        if len(value) < 4:
            raise ProtocolError("ERROR-CODE too short")
        code = (value[2] & 0x7) * 100 + value[3]
        if not 300 <= code <= 699 or value[3] > 99:
            raise ProtocolError(f"bad STUN error code {value[2] & 0x7}/{value[3]}")
        return ErrorCode(code, value[4:].decode("utf-8", errors="replace"))
    if t == AttrType.UNKNOWN_ATTRIBUTES:
        if len(value) % 2:
            raise ProtocolError("UNKNOWN-ATTRIBUTES has an odd length")
        return UnknownAttributes(tuple(struct.unpack(f"!{len(value) // 2}H", value)))
    if t == AttrType.MESSAGE_INTEGRITY:
        if len(value) != 20:
            raise ProtocolError("MESSAGE-INTEGRITY must have 20 bytes")
        return MessageIntegrity(value)
    if t == AttrType.FINGERPRINT:
        if len(value) != 4:
            raise ProtocolError("FINGERPRINT must have 4 bytes")
        return Fingerprint(struct.unpack("!I", value)[0])
    decode = _EXTENSION_DECODERS.get(t)
    if decode is not None:
        return decode(value, txid)  # type: ignore[no-any-return]
    return RawAttribute(t, value)


def _header(data: bytes) -> tuple[int, int, bytes]:
    """(message type, body length, transaction id) after the framing checks."""
    if len(data) < HEADER_LEN:
        raise ProtocolError("shorter than a STUN header")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("longer than any STUN message")
    msg_type, length = struct.unpack_from("!HH", data)
    if msg_type & 0xC000:
        raise ProtocolError("first two bits of a STUN message must be zero")
    if length % 4:
        raise ProtocolError("STUN length not a multiple of 4")
    if HEADER_LEN + length != len(data):
        raise ProtocolError("STUN length does not match the datagram")
    txid = data[8:20] if data[4:8] == _COOKIE_BYTES else data[4:20]
    return msg_type, length, bytes(txid)


def is_stun(data: bytes) -> bool:
    """Fast demultiplexing test: could this datagram be STUN rather than our text
    protocol? Text requests start with ``//`` and so never carry the cookie nor the
    type 0x0001 of an RFC 3489 Binding request."""
    if len(data) < HEADER_LEN or data[0] & 0xC0:
        return False
    length = (data[2] << 8) | data[3]
    if length % 4 or HEADER_LEN + length != len(data):
        return False
    if data[4:8] == _COOKIE_BYTES:
        return True
    return data[0] == 0x00 and data[1] == 0x01


def parse(data: bytes) -> StunMessage:
    """Decode one STUN message (the whole datagram).

    FINGERPRINT, when present, is verified here (a mismatch means "not STUN").
    Attributes after MESSAGE-INTEGRITY (other than FINGERPRINT) and after FINGERPRINT
    are ignored, as RFC 8489 section 14 requires.
    """
    data = bytes(data)
    msg_type, length, txid = _header(data)
    method, cls = _split_type(msg_type)
    attrs: list[Attribute] = []
    pos = HEADER_LEN
    end = HEADER_LEN + length
    integrity_offset: Optional[int] = None
    after_integrity = False
    while pos < end:
        if end - pos < 4:
            raise ProtocolError("truncated STUN attribute header")
        t, alen = struct.unpack_from("!HH", data, pos)
        vstart = pos + 4
        vend = vstart + alen
        if vend > end:
            raise ProtocolError("STUN attribute overruns the message")
        value = data[vstart:vend]
        next_pos = vstart + alen + (-alen % 4)
        if next_pos > end:
            raise ProtocolError("STUN attribute padding overruns the message")
        if t == AttrType.FINGERPRINT:
            fp = _decode_attr(t, value, txid)
            assert isinstance(fp, Fingerprint)
            if not fingerprint_matches(data, pos, fp.crc):
                raise ProtocolError("STUN FINGERPRINT mismatch")
            attrs.append(fp)
            break  # nothing may follow FINGERPRINT
        if not after_integrity:
            attrs.append(_decode_attr(t, value, txid))
            if t == AttrType.MESSAGE_INTEGRITY:
                integrity_offset = pos
                after_integrity = True
        pos = next_pos
    return StunMessage(cls, method, txid, tuple(attrs), integrity_offset)


def fingerprint_matches(data: bytes, pos: int, crc: int) -> bool:
    """Does ``crc`` (the value of a FINGERPRINT attribute at offset ``pos``) match the
    message before it, with the length field as the attribute's end makes it?"""
    covered = data[:2] + (pos + 8 - HEADER_LEN).to_bytes(2, "big") + data[4:pos]
    return (zlib.crc32(covered) ^ FINGERPRINT_XOR) & 0xFFFFFFFF == crc


def check_integrity(data: bytes, key: bytes) -> Optional[bool]:
    """Verify MESSAGE-INTEGRITY (HMAC-SHA1) of a raw message with ``key`` (the password
    for short-term credentials, MD5(user:realm:pass) for long-term). None when the
    message carries no MESSAGE-INTEGRITY."""
    return integrity_matches(data, parse(data).integrity_offset, key)


def integrity_matches(data: bytes, off: Optional[int], key: bytes) -> Optional[bool]:
    """:func:`check_integrity` for a message already parsed (``off`` is its
    ``integrity_offset``): no second parse."""
    if off is None:
        return None
    msg_type = struct.unpack_from("!H", data)[0]
    covered = struct.pack("!HH", msg_type, off + 24 - HEADER_LEN) + bytes(data[4:off])
    want = hmac.new(key, covered, hashlib.sha1).digest()
    got = bytes(data[off + 4 : off + 24])
    return hmac.compare_digest(want, got)


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 5389 long-term credential key (the caller applies SASLprep / OpaqueString)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode("utf-8")).digest()


# --------------------------------------------------------------------------- helpers


def binding_request(
    txid: bytes,
    *,
    change_ip: bool = False,
    change_port: bool = False,
    padding: int = 0,
    software: Optional[str] = None,
    response_port: Optional[int] = None,
    fingerprint: bool = True,
) -> bytes:
    """A Binding request. ``padding`` adds a PADDING attribute of that many bytes
    (rounded up to a multiple of 4) so a server's amplification budget has room."""
    attrs: list[Attribute] = []
    if change_ip or change_port:
        attrs.append(ChangeRequest(change_ip, change_port))
    if response_port is not None:
        attrs.append(ResponsePort(response_port))
    if software is not None:
        attrs.append(Software(software))
    if padding > 0:
        attrs.append(Padding(padding + (-padding % 4)))
    msg = StunMessage(MsgClass.REQUEST, Method.BINDING, txid, tuple(attrs))
    return msg.to_wire(fingerprint=fingerprint)


def encode_attrs_len(attrs: Iterable[Attribute], txid: bytes) -> int:
    """Bytes these attributes take on the wire (for fitting a size budget)."""
    return sum(len(_encode_attr(a, txid, 0)) for a in attrs)


# TURN's attributes register themselves with this codec; importing them here makes
# parse() decode them whatever the caller imported first (at the end: turn imports
# names from this module).
from nattool.protocol import turn as _turn  # noqa: E402,F401
