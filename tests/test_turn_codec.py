"""The TURN codec (RFC 8656 attributes taught to the STUN codec, ChannelData): round
trips, wire layouts, and fuzzing that shows only our ProtocolError escapes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.errors import ProtocolError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.stun import (
    MsgClass,
    Nonce,
    RawAttribute,
    Realm,
    StunMessage,
    Username,
    binding_request,
    check_integrity,
    long_term_key,
    parse,
)
from nattool.protocol.turn import (
    AdditionalAddressFamily,
    AddressErrorCode,
    ChannelData,
    ChannelNumber,
    Data,
    DontFragment,
    EvenPort,
    Icmp,
    Lifetime,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    TurnAttr,
    TurnMethod,
    XorPeerAddress,
    XorRelayedAddress,
    channel_data_payload,
    encode_channel_data,
    is_channel_data,
    is_turn_message,
    parse_channel_data,
)

TXID = bytes(range(1, 13))
V4 = Endpoint.from_text("192.0.2.1:32853")
V6 = Endpoint.from_text("[2001:db8:1234:5678:11:2233:4455:6677]:32853")

ALL_ATTRS = [
    ChannelNumber(0x4001),
    Lifetime(600),
    XorPeerAddress(V4),
    XorPeerAddress(V6),
    Data(b"hello, peer"),
    Data(b""),
    XorRelayedAddress(V4),
    XorRelayedAddress(V6),
    RequestedAddressFamily(4),
    RequestedAddressFamily(6),
    AdditionalAddressFamily(6),
    EvenPort(True),
    EvenPort(False),
    RequestedTransport(17),
    DontFragment(),
    ReservationToken(b"\x01\x02\x03\x04\x05\x06\x07\x08"),
    AddressErrorCode(6, 440, "Address Family not Supported"),
    Icmp(3, 1, 0x01020304),
    Realm("example.org"),
    Nonce("f//499k954d6OL34oL9FSTvy64sA"),
]


@pytest.mark.parametrize("attr", ALL_ATTRS, ids=lambda a: type(a).__name__)
def test_every_attribute_round_trips(attr: object) -> None:
    msg = StunMessage(MsgClass.REQUEST, TurnMethod.ALLOCATE, TXID, (attr,))  # type: ignore[arg-type]
    wire = msg.to_wire(fingerprint=True)
    assert parse(wire).attributes[0] == attr


def test_wire_layouts_from_rfc_8656() -> None:
    def value_of(attr: object) -> bytes:
        wire = StunMessage(MsgClass.REQUEST, TurnMethod.ALLOCATE, TXID, (attr,)).to_wire()  # type: ignore[arg-type]
        t, n = struct.unpack_from("!HH", wire, 20)
        assert t == int(attr.TYPE)  # type: ignore[attr-defined]
        return wire[24 : 24 + n]

    assert value_of(RequestedTransport(17)) == b"\x11\x00\x00\x00"
    assert value_of(Lifetime(0x0258)) == b"\x00\x00\x02\x58"
    assert value_of(ChannelNumber(0x4000)) == b"\x40\x00\x00\x00"
    assert value_of(RequestedAddressFamily(6)) == b"\x02\x00\x00\x00"
    assert value_of(EvenPort(True)) == b"\x80"
    assert value_of(DontFragment()) == b""
    assert value_of(AddressErrorCode(6, 440, "x")) == b"\x02\x00\x04\x28x"
    # XOR-PEER-ADDRESS is XOR-MAPPED-ADDRESS's encoding: port ^ 0x2112, address ^ cookie.
    assert value_of(XorPeerAddress(V4)) == bytes.fromhex("0001a147e112a643")


def test_type_numbers() -> None:
    assert (TurnMethod.ALLOCATE, TurnMethod.REFRESH, TurnMethod.SEND, TurnMethod.DATA) == (3, 4, 6, 7)
    assert (TurnMethod.CREATE_PERMISSION, TurnMethod.CHANNEL_BIND) == (8, 9)
    assert TurnAttr.XOR_RELAYED_ADDRESS == 0x16 and TurnAttr.ICMP == 0x8004
    # Data indication: method 7, class indication -> message type 0x0017.
    wire = StunMessage(MsgClass.INDICATION, TurnMethod.DATA, TXID, ()).to_wire()
    assert wire[:2] == b"\x00\x17"


def test_long_term_integrity_over_a_turn_request() -> None:
    key = long_term_key("alice", "nattool", "secret")
    msg = StunMessage(
        MsgClass.REQUEST,
        TurnMethod.ALLOCATE,
        TXID,
        (RequestedTransport(17), Username("alice"), Realm("nattool"), Nonce("abc")),
    )
    wire = msg.to_wire(integrity_key=key, fingerprint=True)
    assert check_integrity(wire, key) is True
    assert check_integrity(wire, long_term_key("alice", "nattool", "wrong")) is False


@pytest.mark.parametrize(
    "attr_type, value",
    [
        (TurnAttr.LIFETIME, b"\x00\x00\x02"),
        (TurnAttr.CHANNEL_NUMBER, b"\x40\x00"),
        (TurnAttr.REQUESTED_TRANSPORT, b"\x11"),
        (TurnAttr.REQUESTED_ADDRESS_FAMILY, b"\x03\x00\x00\x00"),
        (TurnAttr.EVEN_PORT, b""),
        (TurnAttr.DONT_FRAGMENT, b"\x00"),
        (TurnAttr.RESERVATION_TOKEN, b"\x01\x02"),
        (TurnAttr.ADDRESS_ERROR_CODE, b"\x01\x00\x04"),
        (TurnAttr.ADDRESS_ERROR_CODE, b"\x01\x00\x04\x63"),  # 463: fine; 4/99 ok
        (TurnAttr.ICMP, b"\x00\x00\x03"),
        (TurnAttr.XOR_PEER_ADDRESS, b"\x00\x01\x00"),
    ],
)
def test_malformed_attribute_values_are_protocol_errors(attr_type: int, value: bytes) -> None:
    wire = StunMessage(MsgClass.REQUEST, TurnMethod.ALLOCATE, TXID, (RawAttribute(attr_type, value),)).to_wire()
    if attr_type == TurnAttr.ADDRESS_ERROR_CODE and len(value) == 4:
        assert parse(wire).attributes[0] == AddressErrorCode(4, 499, "")
        return
    with pytest.raises(ProtocolError):
        parse(wire)


def test_xor_address_in_a_classic_message_is_refused_on_encode() -> None:
    with pytest.raises(ProtocolError):
        StunMessage(MsgClass.REQUEST, TurnMethod.ALLOCATE, bytes(16), (XorPeerAddress(V4),)).to_wire()


# --------------------------------------------------------------------------- demux


def test_demultiplexing() -> None:
    allocate = StunMessage(MsgClass.REQUEST, TurnMethod.ALLOCATE, TXID, (RequestedTransport(17),)).to_wire()
    assert is_turn_message(allocate)
    assert not is_turn_message(binding_request(TXID))
    assert not is_turn_message(allocate[:-4])  # length disagrees
    assert not is_turn_message(b"//nat" + bytes(40))
    assert is_channel_data(encode_channel_data(0x4000, b"x"))
    assert not is_channel_data(allocate)
    assert not is_channel_data(b"\x40\x00")


# --------------------------------------------------------------------------- ChannelData


def test_channel_data_layout_and_padding() -> None:
    assert encode_channel_data(0x4001, b"abcde") == b"\x40\x01\x00\x05abcde"
    assert encode_channel_data(0x4001, b"abcde", stream=True) == b"\x40\x01\x00\x05abcde\x00\x00\x00"
    assert encode_channel_data(0x4FFF, b"", stream=True) == b"\x4f\xff\x00\x00"
    assert encode_channel_data(0x7FFF, b"") == b"\x7f\xff\x00\x00"  # RFC 5766 range
    assert parse_channel_data(b"\x40\x01\x00\x05abcde\x00\x00\x00") == ChannelData(0x4001, b"abcde")
    assert parse_channel_data(b"\x40\x01\x00\x05abcde") == ChannelData(0x4001, b"abcde")
    for bad in (b"\x40\x01\x00\x05abc", b"\x40\x01\x00\x01abcde", b"\x80\x00\x00\x00", b"\x3f\xff\x00\x00", b"\x40"):
        with pytest.raises(ProtocolError):
            parse_channel_data(bad)
    for channel in (0x3FFF, 0x8000, 0xFFFF):
        with pytest.raises(ProtocolError):
            encode_channel_data(channel, b"x")


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=80))
def test_channel_data_fast_path_agrees_with_the_parser(data: bytes) -> None:
    fast = channel_data_payload(data)
    try:
        slow = parse_channel_data(data)
    except ProtocolError:
        assert fast is None
    else:
        assert fast == (slow.channel, slow.payload)


@settings(max_examples=500, deadline=None)
@given(st.integers(0x4000, 0x7FFF), st.binary(max_size=200), st.booleans())
def test_channel_data_round_trip(channel: int, payload: bytes, stream: bool) -> None:
    wire = encode_channel_data(channel, payload, stream=stream)
    assert parse_channel_data(wire) == ChannelData(channel, payload)
    assert len(wire) % 4 == 0 or not stream


# --------------------------------------------------------------------------- fuzzing

_TURN_SAMPLES = [
    StunMessage(MsgClass.REQUEST, TurnMethod.ALLOCATE, TXID, tuple(ALL_ATTRS)).to_wire(  # type: ignore[arg-type]
        integrity_key=b"k" * 16, fingerprint=True
    ),
    StunMessage(MsgClass.INDICATION, TurnMethod.SEND, TXID, (XorPeerAddress(V6), Data(b"x" * 33))).to_wire(),
]


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=20, max_size=200))
def test_random_bytes_with_a_turn_header_raise_only_protocol_error(tail: bytes) -> None:
    body = tail[20:]
    body = body[: len(body) - len(body) % 4]
    data = struct.pack("!HH", 0x0003, len(body)) + b"\x21\x12\xa4\x42" + tail[8:20] + body
    try:
        parse(data)
    except ProtocolError:
        pass


@settings(max_examples=2000, deadline=None)
@given(
    st.sampled_from(_TURN_SAMPLES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_mutated_turn_messages_raise_only_protocol_error(sample: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(sample)
    for pos, value in flips:
        data[pos % len(data)] = value
    for candidate in (bytes(data), bytes(data[: len(data) - 4])):
        try:
            parse(candidate)
        except ProtocolError:
            pass
        try:
            parse_channel_data(candidate)
        except ProtocolError:
            pass


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(_TURN_SAMPLES + [binding_request(TXID)]), st.integers(0, 3), st.integers(0, 255), st.booleans())
def test_is_turn_message_agrees_with_the_parser(sample: bytes, pos: int, value: int, cut: bool) -> None:
    data = bytearray(sample)
    data[pos] = value  # the message type's bytes (and length's first byte)
    data = data[:-4] if cut else data
    fast = is_turn_message(bytes(data))
    try:
        msg = parse(bytes(data))
    except ProtocolError:
        return  # a broken body is the parser's to find; the demux only looks at the header
    assert fast == (not msg.classic and msg.method in {int(m) for m in TurnMethod})


def test_the_stun_codec_knows_turn_attributes_whoever_imports_it_first() -> None:
    import subprocess
    import sys

    code = (
        "from nattool.protocol.stun import parse, StunMessage, MsgClass, RawAttribute\n"
        "wire = StunMessage(MsgClass.REQUEST, 3, bytes(12), (RawAttribute(0x000D, bytes(4)),)).to_wire()\n"
        "print(type(parse(wire).attributes[0]).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Lifetime"
