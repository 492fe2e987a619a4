"""The tracker's STUN decisions (pure: no sockets)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.errors import ConfigError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.limits import reply_budget
from nattool.protocol.stun import (
    ChangedAddress,
    ErrorCode,
    Fingerprint,
    MappedAddress,
    Method,
    MsgClass,
    OtherAddress,
    Padding,
    RawAttribute,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    StunMessage,
    UnknownAttributes,
    XorMappedAddress,
    binding_request,
    parse,
)
from nattool.tracker.stun_responder import StunResponder

P = Endpoint.from_text("203.0.113.1:3478")
ALT_IP = ipaddress.ip_address("203.0.113.2")
ALT_PORT = 3479
PP, PA = P, Endpoint(P.ip, ALT_PORT)
AP, AA = Endpoint(ALT_IP, P.port), Endpoint(ALT_IP, ALT_PORT)
CLIENT = Endpoint.from_text("198.51.100.9:40000")
TXID = bytes(range(12))


def full() -> StunResponder:
    return StunResponder(P, alt_ip=ALT_IP, alt_port=ALT_PORT)


def test_socket_model() -> None:
    assert full().local_endpoints() == (PP, PA, AP, AA)
    assert StunResponder(P, alt_port=ALT_PORT).local_endpoints() == (PP, PA)
    assert StunResponder(P, alt_ip=ALT_IP).local_endpoints() == (PP, AP)
    assert StunResponder(P).local_endpoints() == (PP,)
    assert not StunResponder(P).rfc5780 and full().rfc5780


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alt_ip": ipaddress.ip_address("2001:db8::1")},
        {"alt_ip": P.ip},
        {"alt_port": P.port},
        {"alt_port": 0},
    ],
)
def test_bad_configuration(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        StunResponder(P, **kwargs)
    with pytest.raises(ConfigError):
        StunResponder(Endpoint.from_text("0.0.0.0:3478"), alt_port=3479)


def test_plain_binding() -> None:
    r = StunResponder(P)
    reply = r.respond(binding_request(TXID, fingerprint=False), CLIENT, P)
    assert reply is not None and reply.send_from == P and reply.dest == CLIENT
    msg = parse(reply.data)
    assert msg.msg_class == MsgClass.SUCCESS and msg.transaction_id == TXID
    assert msg.endpoint_of(XorMappedAddress) == CLIENT
    assert msg.endpoint_of(MappedAddress) == CLIENT
    assert msg.get(Software) is not None and msg.get(Software).text.startswith("nattool/")
    assert not msg.has_fingerprint  # the request had none
    assert msg.get(OtherAddress) is None and msg.get(ResponseOrigin) is None


def test_fingerprint_echoed_when_request_had_one() -> None:
    reply = StunResponder(P).respond(binding_request(TXID, fingerprint=True), CLIENT, P)
    assert reply is not None and parse(reply.data).has_fingerprint


def test_ipv6_client() -> None:
    p6 = Endpoint.from_text("[2001:db8::1]:3478")
    client = Endpoint.from_text("[2001:db8:1::99]:5000")
    r = StunResponder(p6, alt_ip=ipaddress.ip_address("2001:db8::2"), alt_port=3479)
    reply = r.respond(binding_request(TXID), client, p6)
    assert reply is not None
    msg = parse(reply.data)
    assert msg.endpoint_of(XorMappedAddress) == client
    assert msg.endpoint_of(OtherAddress) == Endpoint.from_text("[2001:db8::2]:3479")
    # A bare 20-byte request gets the whole RFC 5780 answer within the 128-byte floor;
    # only SOFTWARE may have been dropped.
    bare = StunMessage(MsgClass.REQUEST, Method.BINDING, TXID).to_wire()
    reply = r.respond(bare, client, p6)
    assert reply is not None and len(reply.data) <= 128
    got = parse(reply.data)
    for cls in (XorMappedAddress, MappedAddress, ResponseOrigin, OtherAddress):
        assert got.get(cls) is not None


@pytest.mark.parametrize(
    "local, change_ip, change_port, send_from, other",
    [
        (PP, False, False, PP, AA),
        (PP, True, False, AP, AA),
        (PP, False, True, PA, AA),
        (PP, True, True, AA, AA),
        (AA, False, False, AA, PP),
        (AA, True, True, PP, PP),
        (PA, True, False, AA, AP),
        (AP, False, True, AA, PA),
    ],
)
def test_change_request_rfc5780(local: Endpoint, change_ip: bool, change_port: bool, send_from: Endpoint, other: Endpoint) -> None:
    reply = full().respond(binding_request(TXID, change_ip=change_ip, change_port=change_port), CLIENT, local)
    assert reply is not None
    assert reply.send_from == send_from and reply.dest == CLIENT
    msg = parse(reply.data)
    assert msg.endpoint_of(ResponseOrigin) == send_from
    assert msg.endpoint_of(OtherAddress) == other
    assert msg.endpoint_of(XorMappedAddress) == CLIENT


def test_partial_rfc5780_alt_port_only() -> None:
    r = StunResponder(P, alt_port=ALT_PORT)
    reply = r.respond(binding_request(TXID, change_port=True), CLIENT, P)
    assert reply is not None and reply.send_from == PA
    assert parse(reply.data).endpoint_of(OtherAddress) == PA
    # Change IP cannot be honoured: 420 naming CHANGE-REQUEST, sent from where it arrived.
    reply = r.respond(binding_request(TXID, change_ip=True), CLIENT, P)
    assert reply is not None and reply.send_from == P
    msg = parse(reply.data)
    assert msg.msg_class == MsgClass.ERROR
    assert msg.get(ErrorCode).code == 420
    assert msg.get(UnknownAttributes) == UnknownAttributes((0x0003,))


def test_change_request_without_alternates_is_420_not_a_silent_fallback() -> None:
    for flags in ((True, False), (False, True), (True, True)):
        reply = StunResponder(P).respond(binding_request(TXID, change_ip=flags[0], change_port=flags[1]), CLIENT, P)
        assert reply is not None
        msg = parse(reply.data)
        assert msg.msg_class == MsgClass.ERROR and msg.get(ErrorCode).code == 420
    # CHANGE-REQUEST with no flag set asks for nothing: a normal answer.
    req = StunMessage(MsgClass.REQUEST, Method.BINDING, TXID, (RawAttribute(0x0003, bytes(4)),)).to_wire()
    reply = StunResponder(P).respond(req, CLIENT, P)
    assert reply is not None and parse(reply.data).msg_class == MsgClass.SUCCESS


def test_classic_rfc3489_client() -> None:
    txid16 = bytes(range(100, 116))
    req = StunMessage(MsgClass.REQUEST, Method.BINDING, txid16).to_wire()
    reply = full().respond(req, CLIENT, PP)
    assert reply is not None
    msg = parse(reply.data)
    assert msg.transaction_id == txid16 and msg.classic
    assert msg.endpoint_of(MappedAddress) == CLIENT
    assert msg.endpoint_of(ChangedAddress) == AA
    assert msg.endpoint_of(SourceAddress) == PP
    assert msg.get(XorMappedAddress) is None


def walk_without_padding(data: bytes) -> list[tuple[int, bytes]]:
    """The attributes as an RFC 3489 client reads them: each is 4 + its stated length
    long (no padding), and the walk must land exactly on the message's end."""
    length = struct.unpack_from("!H", data, 2)[0]
    assert len(data) == 20 + length
    out, at = [], 20
    while at < len(data):
        kind, size = struct.unpack_from("!HH", data, at)
        out.append((kind, data[at + 4 : at + 4 + size]))
        at += 4 + size
    assert at == len(data), "a classic client would read past the message"
    return out


def classic_request(*attrs: RawAttribute) -> bytes:
    return StunMessage(MsgClass.REQUEST, Method.BINDING, bytes(range(100, 116)), attrs).to_wire()


def change_request(change_ip: bool, change_port: bool) -> RawAttribute:
    return RawAttribute(0x0003, struct.pack("!I", change_ip << 2 | change_port << 1))


@pytest.mark.parametrize(
    ("responder", "attrs"),
    [
        (full(), ()),
        (full(), (change_request(False, True),)),
        (full(), (change_request(True, True),)),
        (full(), (RawAttribute(0x0024, bytes(4)),)),  # unknown: a 420 with one type listed
        (StunResponder(P), ()),
        (StunResponder(P), (RawAttribute(0x0024, bytes(4)), RawAttribute(0x7F00, b""))),
    ],
    ids=["rfc5780", "rfc5780-change-port", "rfc5780-change-both", "rfc5780-420", "one-address", "one-address-420"],
)
def test_classic_replies_need_no_padding(responder: StunResponder, attrs: tuple[RawAttribute, ...]) -> None:
    """Clients written before padding existed (pystun3, Debian's stun-client) read the
    next attribute from 4 + length: a classic reply carries nothing that needs padding
    (no SOFTWARE; a 420's reason phrase and its list of types a multiple of 4 long)."""
    req = classic_request(*attrs)
    assert responder.software  # the default; the same responder answers RFC 8489 with it
    reply = responder.respond(req, CLIENT, PP)
    assert reply is not None
    walked = walk_without_padding(reply.data)
    assert all(len(value) % 4 == 0 for _, value in walked)
    assert 0x8022 not in [kind for kind, _ in walked]  # SOFTWARE
    msg = parse(reply.data)
    unknown = {a.type for a in attrs if a.type != 0x0003}
    if unknown:
        assert msg.get(ErrorCode).code == 420 and set(msg.get(UnknownAttributes).types) == unknown
    else:
        assert msg.msg_class == MsgClass.SUCCESS and msg.endpoint_of(MappedAddress) == CLIENT
    modern = responder.respond(StunMessage(MsgClass.REQUEST, Method.BINDING, TXID).to_wire(), CLIENT, PP)
    assert modern is not None and parse(modern.data).get(Software) is not None


@pytest.mark.parametrize("responder", [StunResponder(P), StunResponder(P, alt_port=ALT_PORT)],
                         ids=["one-address", "alt-port-only"])
def test_classic_change_request_it_cannot_honour_gets_silence(responder: StunResponder) -> None:
    """RFC 3489 clients take any answer to a CHANGE-REQUEST as the NAT letting it in (a 420
    made stun-client report an independent filter, and pystun3 resend forever): for a
    classic request the server stays silent. RFC 5780 clients (magic cookie) get the 420."""
    for flags in ((True, False), (True, True)) + (((False, True),) if responder.alt_port is None else ()):
        assert responder.respond(classic_request(change_request(*flags)), CLIENT, P) is None
        modern = responder.respond(binding_request(TXID, change_ip=flags[0], change_port=flags[1]), CLIENT, P)
        assert modern is not None and parse(modern.data).get(ErrorCode).code == 420
    # A classic CHANGE-REQUEST that asks nothing impossible is answered.
    reply = responder.respond(classic_request(change_request(False, False)), CLIENT, P)
    assert reply is not None and parse(reply.data).msg_class == MsgClass.SUCCESS


def test_unknown_comprehension_required_gets_420() -> None:
    req = StunMessage(
        MsgClass.REQUEST,
        Method.BINDING,
        TXID,
        (RawAttribute(0x0024, b"\x00\x00\x00\x01"), RawAttribute(0x7F00, b""), RawAttribute(0x8F00, b"ok")),
    ).to_wire(fingerprint=True)
    reply = full().respond(req, CLIENT, PP)
    assert reply is not None and reply.dest == CLIENT and reply.send_from == PP
    msg = parse(reply.data)
    assert msg.msg_class == MsgClass.ERROR and msg.get(ErrorCode).code == 420
    assert msg.get(UnknownAttributes) == UnknownAttributes((0x0024, 0x7F00))  # 0x8F00 is optional
    assert msg.has_fingerprint
    assert len(reply.data) <= reply_budget(len(req))


def test_response_port() -> None:
    req = StunMessage(MsgClass.REQUEST, Method.BINDING, TXID, (ResponsePort(5555),)).to_wire()
    reply = full().respond(req, CLIENT, PP)
    assert reply is not None and reply.dest == Endpoint(CLIENT.ip, 5555)
    reply = StunResponder(P, allow_response_port=False).respond(req, CLIENT, PP)
    assert reply is not None and parse(reply.data).get(ErrorCode).code == 420


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"//nat",
        b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42",  # truncated header
        binding_request(TXID)[:-1],
        StunMessage(MsgClass.SUCCESS, Method.BINDING, TXID, (XorMappedAddress(CLIENT),)).to_wire(),
        StunMessage(MsgClass.INDICATION, Method.BINDING, TXID).to_wire(),
        StunMessage(MsgClass.ERROR, Method.BINDING, TXID, (ErrorCode(400),)).to_wire(),
        StunMessage(MsgClass.REQUEST, 0x003, TXID).to_wire(),  # TURN Allocate: not ours
        # Bad FINGERPRINT.
        binding_request(TXID)[:-1] + bytes([binding_request(TXID)[-1] ^ 1]),
        # Address attribute with an unknown family.
        StunMessage(MsgClass.REQUEST, Method.BINDING, TXID, (RawAttribute(0x0001, b"\x00\x03\x00\x01abcd"),)).to_wire(),
    ],
)
def test_dropped(data: bytes) -> None:
    assert full().respond(data, CLIENT, PP) is None


def test_unknown_local_socket_dropped_in_rfc5780_mode() -> None:
    assert full().respond(binding_request(TXID), CLIENT, Endpoint.from_text("203.0.113.9:1")) is None


def test_software_dropped_first_to_fit_budget() -> None:
    r = StunResponder(P, alt_ip=ALT_IP, alt_port=ALT_PORT, software="x" * 200)
    small = binding_request(TXID)
    reply = r.respond(small, CLIENT, PP)
    assert reply is not None
    msg = parse(reply.data)
    assert msg.get(Software) is None and msg.get(OtherAddress) is not None and msg.has_fingerprint
    # With enough padding in the request SOFTWARE comes back: PADDING counts as request bytes.
    padded = binding_request(TXID, padding=100)
    reply = r.respond(padded, CLIENT, PP)
    assert reply is not None and parse(reply.data).get(Software) == Software("x" * 200)
    assert len(reply.data) <= reply_budget(len(padded))
    assert parse(padded).get(Padding) is not None


@settings(max_examples=1500, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda t, ln, body: struct.pack("!HHI", t, ln, 0x2112A442) + TXID + body,
            st.sampled_from([0x0001, 0x0101, 0x0011, 0x0003]),
            st.integers(0, 120),
            st.binary(max_size=120),
        ),
        st.builds(
            lambda ci, cp, pad, extra: binding_request(TXID, change_ip=ci, change_port=cp, padding=pad) + extra,
            st.booleans(),
            st.booleans(),
            st.integers(0, 2000),
            st.sampled_from([b"", b"\x00\x00\x00\x00"]),
        ),
    ),
    local=st.sampled_from([PP, PA, AP, AA]),
    software=st.sampled_from([None, "nattool/0.1.0", "y" * 300]),
)
def test_amplification_bound_and_no_crash(data: bytes, local: Endpoint, software: str | None) -> None:
    r = StunResponder(P, alt_ip=ALT_IP, alt_port=ALT_PORT, software=software)
    reply = r.respond(data, CLIENT, local)
    if reply is not None:
        assert len(reply.data) <= min(max(3 * len(data), 128), 1200)
        assert reply.send_from in r.local_endpoints()
        assert reply.dest.ip == CLIENT.ip
        msg = parse(reply.data)
        assert msg.msg_class in (MsgClass.SUCCESS, MsgClass.ERROR)


def test_fingerprint_kept_over_software_when_tight() -> None:
    msg = parse(full().respond(binding_request(TXID), CLIENT, PP).data)
    assert isinstance(msg.attributes[-1], Fingerprint)


# -- the server's template fast paths must answer byte for byte as respond() does ----------


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=12, max_size=12),
    st.integers(0, 2**32 - 1),
    st.integers(1, 65535),
    st.booleans(),
    st.booleans(),
)
def test_bare_binding_fast_paths_equal_the_full_path(txid: bytes, ip: int, port: int, alt_ip: bool, alt_port: bool) -> None:
    from nattool.tracker.stun_responder import StunResponder, is_bare_binding

    primary = Endpoint(ipaddress.ip_address("127.0.0.1"), 3478)
    responder = StunResponder(
        primary,
        alt_ip=ipaddress.ip_address("127.0.0.2") if alt_ip else None,
        alt_port=3479 if alt_port else None,
    )
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + txid
    assert is_bare_binding(request)
    src = Endpoint(ipaddress.IPv4Address(ip), port)
    full = responder.respond(request, src, primary)
    assert full is not None and full.send_from == primary and full.dest == src
    build = responder.bare_binding_builder(primary, 4)
    assert build is not None
    assert build(request, int(src.ip), port) == full.data
    assert responder.bare_binding_reply(request, src.ip.packed, port, primary) == full.data


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=12, max_size=12), st.integers(0, 2**128 - 1), st.integers(1, 65535))
def test_bare_binding_fast_path_for_ipv6_equals_the_full_path(txid: bytes, ip: int, port: int) -> None:
    from nattool.tracker.stun_responder import StunResponder

    primary = Endpoint(ipaddress.ip_address("::1"), 3478)
    responder = StunResponder(primary)
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + txid
    src = Endpoint(ipaddress.IPv6Address(ip), port)
    full = responder.respond(request, src, primary)
    assert full is not None
    build = responder.bare_binding_builder(primary, 6)
    assert build is not None
    assert build(request, ip, port) == full.data
    assert responder.bare_binding_reply(request, src.ip.packed, port, primary) == full.data
