"""The STUN codec against the RFC 5769 test vectors, byte for byte, and under fuzzing."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.errors import NattoolError, ProtocolError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.turn import TurnAttr
from nattool.protocol.stun import (
    MAGIC_COOKIE,
    ChangedAddress,
    ChangeRequest,
    ErrorCode,
    Fingerprint,
    MappedAddress,
    MessageIntegrity,
    Method,
    MsgClass,
    Nonce,
    OtherAddress,
    Padding,
    RawAttribute,
    Realm,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    StunMessage,
    UnknownAttributes,
    Username,
    XorMappedAddress,
    binding_request,
    check_integrity,
    is_stun,
    long_term_key,
    parse,
)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


TXID = h("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
SHORT_TERM = b"VOkJxbRl1RmTxUk/WvJxBt"

# RFC 5769 section 2.1 (SOFTWARE/USERNAME padding is 0x20 in the RFC, on purpose).
SAMPLE_REQUEST = h(
    """
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
    """
)
# Section 2.2.
SAMPLE_IPV4_RESPONSE = h(
    """
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
    """
)
# Section 2.3.
SAMPLE_IPV6_RESPONSE = h(
    """
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
    """
)
# Section 2.4 (long-term credentials, no FINGERPRINT, zero padding).
SAMPLE_LONG_TERM = h(
    """
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
    """
)

VECTORS = [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE, SAMPLE_LONG_TERM]


def test_sample_request() -> None:
    msg = parse(SAMPLE_REQUEST)
    assert msg.msg_class == MsgClass.REQUEST and msg.method == Method.BINDING
    assert msg.transaction_id == TXID and not msg.classic
    assert msg.get(Software) == Software("STUN test client")
    assert msg.get(Username) == Username("evtj:h6vY")
    assert RawAttribute(0x0024, h("6e 00 01 ff")) in msg.attributes  # PRIORITY, kept raw
    assert RawAttribute(0x8029, h("93 2f f9 b1 51 26 3b 36")) in msg.attributes  # ICE-CONTROLLED
    assert msg.has_fingerprint
    assert check_integrity(SAMPLE_REQUEST, SHORT_TERM) is True
    assert check_integrity(SAMPLE_REQUEST, b"wrong password") is False
    assert is_stun(SAMPLE_REQUEST)


@pytest.mark.parametrize(
    "data, mapped",
    [
        (SAMPLE_IPV4_RESPONSE, "192.0.2.1:32853"),
        (SAMPLE_IPV6_RESPONSE, "[2001:db8:1234:5678:11:2233:4455:6677]:32853"),
    ],
)
def test_sample_responses(data: bytes, mapped: str) -> None:
    msg = parse(data)
    assert msg.msg_class == MsgClass.SUCCESS
    assert msg.endpoint_of(XorMappedAddress) == Endpoint.from_text(mapped)
    assert msg.get(Software) == Software("test vector")
    assert check_integrity(data, SHORT_TERM) is True


@pytest.mark.parametrize("data", [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE])
def test_short_term_vectors_reencode_byte_for_byte(data: bytes) -> None:
    msg = parse(data)
    assert msg.to_wire(fingerprint=True, integrity_key=SHORT_TERM, pad_byte=0x20) == data


def test_xor_mapped_address_built_from_scratch() -> None:
    built = StunMessage(
        MsgClass.SUCCESS,
        Method.BINDING,
        TXID,
        (Software("test vector"), XorMappedAddress(Endpoint.from_text("192.0.2.1:32853"))),
    ).to_wire(fingerprint=True, integrity_key=SHORT_TERM, pad_byte=0x20)
    assert built == SAMPLE_IPV4_RESPONSE


def test_long_term_vector() -> None:
    msg = parse(SAMPLE_LONG_TERM)
    assert msg.get(Username) == Username("\u30de\u30c8\u30ea\u30c3\u30af\u30b9")
    assert msg.get(Nonce) == Nonce("f//499k954d6OL34oL9FSTvy64sA")
    assert msg.get(Realm) == Realm("example.org")
    assert not msg.has_fingerprint
    key = long_term_key("\u30de\u30c8\u30ea\u30c3\u30af\u30b9", "example.org", "TheMatrIX")
    assert check_integrity(SAMPLE_LONG_TERM, key) is True
    assert check_integrity(SAMPLE_LONG_TERM, long_term_key("x", "example.org", "TheMatrIX")) is False
    assert msg.to_wire(integrity_key=key) == SAMPLE_LONG_TERM


def test_bad_fingerprint_is_refused() -> None:
    bad = bytearray(SAMPLE_IPV4_RESPONSE)
    bad[-1] ^= 0x01
    with pytest.raises(ProtocolError):
        parse(bytes(bad))


def test_integrity_detects_tampering() -> None:
    bad = bytearray(SAMPLE_REQUEST)
    bad[24] ^= 0x01  # inside SOFTWARE; FINGERPRINT recomputed so only the HMAC catches it
    msg = parse(SAMPLE_REQUEST)
    tampered = StunMessage(msg.msg_class, msg.method, msg.transaction_id, (Software("STUN test clienu"),))
    assert check_integrity(tampered.to_wire(integrity_key=SHORT_TERM), SHORT_TERM) is True
    with pytest.raises(ProtocolError):
        parse(bytes(bad))  # the FINGERPRINT no longer matches
    assert check_integrity(binding_request(TXID), SHORT_TERM) is None


def test_attributes_after_integrity_are_ignored() -> None:
    signed = StunMessage(MsgClass.REQUEST, Method.BINDING, TXID, (Software("x"),)).to_wire(integrity_key=b"k")
    extra = struct.pack("!HH", 0x0003, 4) + b"\x00\x00\x00\x06"
    tampered = bytearray(signed + extra)
    struct.pack_into("!H", tampered, 2, len(tampered) - 20)
    msg = parse(bytes(tampered))
    assert msg.get(ChangeRequest) is None
    assert isinstance(msg.attributes[-1], MessageIntegrity)


def test_is_stun_demultiplexing() -> None:
    assert not is_stun(b"//nat")
    assert not is_stun(b"//51pwn/P2P&E2E/46D0F69E-E347-47A7-8E95-43E5BAA95348/0/0/0")
    # A text request that happens to be 20 bytes long and a multiple of 4 is still text.
    assert not is_stun(b"//nat\n" + b"x" * 14)
    assert not is_stun(b"")
    assert is_stun(binding_request(TXID))
    classic = struct.pack("!HH", 0x0001, 0) + bytes(range(16))
    assert is_stun(classic)
    assert not is_stun(struct.pack("!HH", 0x0101, 0) + bytes(range(16)))  # classic response
    assert not is_stun(binding_request(TXID) + b"\x00")
    assert not is_stun(b"\x80" + binding_request(TXID)[1:])


def test_classic_rfc3489_messages() -> None:
    txid16 = bytes(range(1, 17))
    req = StunMessage(MsgClass.REQUEST, Method.BINDING, txid16, (ChangeRequest(True, False),))
    wire = req.to_wire()
    assert wire[4:20] == txid16
    back = parse(wire)
    assert back.classic and back == req
    resp = StunMessage(
        MsgClass.SUCCESS,
        Method.BINDING,
        txid16,
        (
            MappedAddress(Endpoint.from_text("198.51.100.7:4000")),
            SourceAddress(Endpoint.from_text("203.0.113.1:3478")),
            ChangedAddress(Endpoint.from_text("203.0.113.2:3479")),
        ),
    )
    assert parse(resp.to_wire()) == resp
    with pytest.raises(ProtocolError):
        StunMessage(MsgClass.SUCCESS, 1, txid16, (XorMappedAddress(Endpoint.from_text("1.2.3.4:5")),)).to_wire()


def test_binding_request_helper() -> None:
    wire = binding_request(TXID, change_ip=True, change_port=True, padding=101, software="nattool/test")
    msg = parse(wire)
    assert msg.get(ChangeRequest) == ChangeRequest(True, True)
    assert msg.get(Padding) == Padding(104)
    assert msg.get(Software) == Software("nattool/test")
    assert msg.has_fingerprint
    assert struct.unpack_from("!I", wire, 4)[0] == MAGIC_COOKIE
    assert parse(binding_request(TXID, change_port=True)).get(ChangeRequest) == ChangeRequest(False, True)


def test_error_code_and_unknown_attributes() -> None:
    msg = StunMessage(
        MsgClass.ERROR, Method.BINDING, TXID, (ErrorCode(420, "Unknown Attribute"), UnknownAttributes((0x0024, 0x7777, 3)))
    )
    back = parse(msg.to_wire(fingerprint=True))
    assert back.get(ErrorCode) == ErrorCode(420, "Unknown Attribute")
    assert back.get(UnknownAttributes) == UnknownAttributes((0x0024, 0x7777, 3))
    with pytest.raises(ProtocolError):
        StunMessage(MsgClass.ERROR, 1, TXID, (ErrorCode(200),)).to_wire()


endpoints = st.one_of(
    st.builds(lambda i, p: Endpoint(ipaddress.IPv4Address(i), p), st.integers(0, 2**32 - 1), st.integers(0, 65535)),
    st.builds(lambda i, p: Endpoint(ipaddress.IPv6Address(i), p), st.integers(0, 2**128 - 1), st.integers(0, 65535)),
)
attributes = st.one_of(
    st.builds(MappedAddress, endpoints),
    st.builds(XorMappedAddress, endpoints),
    st.builds(OtherAddress, endpoints),
    st.builds(ResponseOrigin, endpoints),
    st.builds(SourceAddress, endpoints),
    st.builds(ChangedAddress, endpoints),
    st.builds(ChangeRequest, st.booleans(), st.booleans()),
    st.builds(ResponsePort, st.integers(0, 65535)),
    st.builds(Padding, st.integers(0, 64)),
    st.builds(Software, st.text(max_size=40)),
    st.builds(Username, st.text(max_size=40)),
    st.builds(ErrorCode, st.integers(300, 699), st.text(max_size=20)),
    st.builds(UnknownAttributes, st.lists(st.integers(0, 0xFFFF), max_size=6).map(tuple)),
    st.builds(
        RawAttribute,
        # Types the codec decodes into their own classes (TURN's included) are not raw.
        st.integers(0, 0xFFFF).filter(
            lambda t: t not in {1, 3, 4, 5, 6, 8, 9, 10, 0x14, 0x15, 0x20, 0x26, 0x27, 0x8022, 0x8028, 0x802B, 0x802C}
            and t not in set(TurnAttr)
        ),
        st.binary(max_size=30),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    cls=st.sampled_from(list(MsgClass)),
    method=st.integers(0, 0xFFF),
    txid=st.binary(min_size=12, max_size=12),
    attrs=st.lists(attributes, max_size=8),
    fingerprint=st.booleans(),
    key=st.one_of(st.none(), st.binary(min_size=1, max_size=20)),
)
def test_round_trip(cls: MsgClass, method: int, txid: bytes, attrs: list, fingerprint: bool, key: bytes | None) -> None:
    msg = StunMessage(cls, method, txid, tuple(attrs))
    wire = msg.to_wire(fingerprint=fingerprint, integrity_key=key)
    assert is_stun(wire)
    back = parse(wire)
    core = tuple(a for a in back.attributes if not isinstance(a, (MessageIntegrity, Fingerprint)))
    assert StunMessage(back.msg_class, back.method, back.transaction_id, core) == msg
    assert back.has_fingerprint == fingerprint
    if key is not None:
        assert check_integrity(wire, key) is True


def _only_our_errors(data: bytes) -> None:
    try:
        msg = parse(data)
    except NattoolError:
        return
    assert isinstance(msg, StunMessage)
    # A message that parses must also survive the integrity check and re-encoding.
    try:
        check_integrity(data, b"key")
        msg.to_wire(fingerprint=True)
    except NattoolError:
        pass


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_our_error(data: bytes) -> None:
    is_stun(data)
    _only_our_errors(data)


@settings(max_examples=2000, deadline=None)
@given(
    base=st.sampled_from(VECTORS + [binding_request(TXID, change_ip=True, padding=8)]),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 200),
)
def test_mutated_vectors_raise_only_our_error(base: bytes, flips: list, cut: int) -> None:
    data = bytearray(base)
    for pos, val in flips:
        data[pos % len(data)] = val
    _only_our_errors(bytes(data[: max(cut, 20)]))
    _only_our_errors(bytes(data))


@settings(max_examples=1000, deadline=None)
@given(body=st.binary(max_size=120).map(lambda b: b[: len(b) - len(b) % 4]), txid=st.binary(min_size=12, max_size=12))
def test_valid_header_random_tlvs(body: bytes, txid: bytes) -> None:
    data = struct.pack("!HHI", 0x0001, len(body), MAGIC_COOKIE) + txid + body
    _only_our_errors(data)
