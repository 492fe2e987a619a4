"""The text protocol: parsing, building, round trips, and never-crash on any bytes."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.errors import NattoolError, ProtocolError
from nattool.protocol.endpoint import Endpoint, source_key
from nattool.protocol.text import (
    AnnounceRequest,
    ErrorReply,
    MalformedRequest,
    MemberEntry,
    MemberList,
    NatReply,
    NatRequest,
    NotARequest,
    RegisterRequest,
    TrackerList,
    TrackersRequest,
    canonical_mac,
    parse_request,
    parse_seed_register,
)

SEED_EXAMPLE = b"//51pwn/P2P&E2E/46D0F69E-E347-47A7-8E95-43E5BAA95348/0/192.168.0.56,172.66.0.10/77:5b:67:a5:87:66"
ORIGINAL_EXAMPLE = b"//51pwn/P2P&E2E/g-1/0/02:42:ac:11:00:03-192.168.1.11,10.0.0.5;02:42:ac:11:00:04-10.1.1.1"


def test_nat_request() -> None:
    assert parse_request(b"//nat") == NatRequest()
    assert parse_request(b"//nat\npad=xxxx\n     ") == NatRequest()


def test_seed_example_parses() -> None:
    req = parse_request(SEED_EXAMPLE)
    assert isinstance(req, RegisterRequest)
    assert req.group == "46d0f69e-e347-47a7-8e95-43e5baa95348"  # UUIDs compare case-insensitively
    assert req.public is None
    assert req.lan == ("192.168.0.56", "172.66.0.10")
    assert req.identity == "77:5b:67:a5:87:66"
    assert req.form == "seed"


def test_original_client_form() -> None:
    req = parse_request(ORIGINAL_EXAMPLE)
    assert isinstance(req, RegisterRequest)
    assert req.form == "original"
    assert req.identity == "02:42:ac:11:00:03"
    assert req.lan == ("192.168.1.11", "10.0.0.5", "10.1.1.1")


def test_non_uuid_groups_keep_their_case() -> None:
    req = parse_request(b"//51pwn/P2P&E2E/MyGroup/0/0/0")
    assert isinstance(req, RegisterRequest) and req.group == "MyGroup"


@pytest.mark.parametrize("mac", ["AA:BB:CC:DD:EE:FF", "aa-bb-cc-dd-ee-ff", "aabbccddeeff"])
def test_mac_forms(mac: str) -> None:
    assert canonical_mac(mac) == "aa:bb:cc:dd:ee:ff"


def test_explicit_public_ipv6() -> None:
    req = parse_request(b"//51pwn/P2P&E2E/g/[2001:db8::1]:998/0/0")
    assert isinstance(req, RegisterRequest)
    assert req.public == Endpoint(ipaddress.ip_address("2001:db8::1"), 998)


@pytest.mark.parametrize(
    "data",
    [
        b"//51pwn/P2P&E2E/",
        b"//51pwn/P2P&E2E/g",
        b"//51pwn/P2P&E2E/g/0/0/0/0",
        b"//51pwn/P2P&E2E/bad group/0/0/0",
        b"//51pwn/P2P&E2E/" + b"a" * 65 + b"/0/0/0",
        b"//51pwn/P2P&E2E/g/1.2.3.4/0/0",  # public without port
        b"//51pwn/P2P&E2E/g/0/300.1.1.1/0",
        b"//51pwn/P2P&E2E/g/0/0/zz:bb:cc:dd:ee:ff",
        b"//51pwn/P2P&E2E/g/0/" + b",".join([b"10.0.0.1"] * 17) + b"/0",
        b"//51pwn/P2P&E2E/g/0/xx-1.2.3.4",
        b"//tcksvr/",
        b"//tcksvr/1.2.3.4",
        b"//nat2",
        b"//\xff\xfe",
    ],
)
def test_malformed_requests_get_err(data: bytes) -> None:
    with pytest.raises(MalformedRequest):
        parse_request(data)


@pytest.mark.parametrize("data", [b"", b"nat", b"/nat", b"\x00\x01\x00\x00", b"GET / HTTP/1.1"])
def test_foreign_bytes_are_dropped(data: bytes) -> None:
    with pytest.raises(NotARequest):
        parse_request(data)


def test_announce_and_trackers() -> None:
    assert parse_request(b"//tcksvr") == TrackersRequest()
    req = parse_request(b"//tcksvr/223.16.111.99:9980;[2001:db8::2]:43283")
    assert isinstance(req, AnnounceRequest)
    assert [e.to_text() for e in req.endpoints] == ["223.16.111.99:9980", "[2001:db8::2]:43283"]


def test_offset_extension() -> None:
    req = parse_request(SEED_EXAMPLE + b"\noffset=40\n" + b" " * 100)
    assert isinstance(req, RegisterRequest) and req.wants_paging and req.offset == 40
    with pytest.raises(MalformedRequest):
        _ = parse_request(SEED_EXAMPLE + b"\noffset=x").offset  # type: ignore[union-attr]


def test_reads_original_server_replies() -> None:
    reply = b"127.0.0.1:40002,02:42:ac:11:00:03-192.168.1.11\n127.0.0.1:40001,02:42:ac:11:00:02-192.168.1.10,10.0.0.5\n"
    parsed = MemberList.from_wire(reply)
    assert parsed.dialect == "original"
    assert [e.to_text() for e in parsed.entries] == [
        "127.0.0.1:40002;192.168.1.11",
        "127.0.0.1:40001;192.168.1.10,10.0.0.5",
    ]


def test_reads_our_replies() -> None:
    reply = b"122.44.78.33:998;192.168.0.56,172.66.0.10\n22.144.178.133:1998\n122.44.78.33:1998;192.168.0.57"
    parsed = MemberList.from_wire(reply)
    assert parsed.to_wire() == reply
    assert parsed.entries[1].lan == ()


def test_error_reply_round_trip() -> None:
    assert ErrorReply.from_wire(ErrorReply("bad group").to_wire()) == ErrorReply("bad group")
    with pytest.raises(ProtocolError):
        MemberList.from_wire(b"ERR tracker full")


def test_tracker_list_round_trip() -> None:
    tl = TrackerList(("223.16.111.99:9980", "[2001:db8::1]:99", "tracker.example.org:43283"))
    assert TrackerList.from_wire(tl.to_wire()) == tl
    assert TrackerList.from_wire(b"") == TrackerList(())


def test_source_key_groups_ipv6_by_64() -> None:
    a = source_key(ipaddress.ip_address("2001:db8:1:2:aaaa::1"))
    b = source_key(ipaddress.ip_address("2001:db8:1:2:bbbb::2"))
    c = source_key(ipaddress.ip_address("2001:db8:1:3::1"))
    assert a == b != c
    assert source_key(ipaddress.ip_address("::ffff:1.2.3.4")) == "1.2.3.4"


# --- properties ---------------------------------------------------------------------

ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)).filter(lambda ip: ip.ipv4_mapped is None)
endpoints = st.builds(Endpoint, st.one_of(ipv4, ipv6), st.integers(1, 65535))
groups = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-", min_size=1, max_size=64).filter(
    lambda g: not __import__("re").fullmatch(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}", g)
)
macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
lans = st.lists(st.one_of(ipv4, ipv6).map(str), max_size=16, unique=True).map(tuple)


@given(groups, st.none() | endpoints, lans, st.none() | macs)
def test_seed_register_round_trip(group: str, public: Endpoint | None, lan: tuple[str, ...], mac: str | None) -> None:
    req = RegisterRequest(group=group, public=public, lan=lan, identity=mac)
    assert parse_request(req.to_wire()) == req


@given(groups, st.none() | endpoints, lans.filter(bool), macs)
def test_original_register_round_trip(group: str, public: Endpoint | None, lan: tuple[str, ...], mac: str) -> None:
    req = RegisterRequest(group=group, public=public, lan=lan, identity=mac, form="original")
    assert parse_request(req.to_wire()) == req


@given(endpoints)
def test_endpoint_text_round_trip(ep: Endpoint) -> None:
    assert Endpoint.from_text(ep.to_text()) == ep
    assert NatReply.from_wire(NatReply(ep).to_wire()) == NatReply(ep)


def _canonical_or_error(text: str) -> str:
    try:
        return Endpoint.from_text(text).to_text()
    except ProtocolError as exc:
        return f"error: {exc}"


def _canonical_text_or_error(text: str) -> str:
    try:
        return Endpoint.canonical_text(text)
    except ProtocolError as exc:
        return f"error: {exc}"


# Endpoint-like text near the edges the fast check draws: octets and ports with
# leading zeros, out of range by one, missing or extra parts, IPv6.
_EDGES = st.sampled_from(["0", "00", "01", "09", "99", "100", "199", "200", "249", "250", "255", "256", "300",
                          "0255", "6553", "65529", "65530", "65535", "65536", "65540", "99999", "123456"])
_OCTETS = st.one_of(st.integers(0, 255).map(str), _EDGES)
_PORTS = st.one_of(st.integers(0, 70000).map(str), _EDGES)
_ENDPOINT_LIKE = st.one_of(
    st.builds(lambda octets, sep, port: ".".join(octets) + sep + port,
              st.lists(_OCTETS, min_size=3, max_size=5), st.sampled_from([":", ":", "."]), _PORTS),
    st.text(alphabet="0123456789.:[]abf%", max_size=24),
    endpoints.map(Endpoint.to_text),
)


@settings(max_examples=600)
@given(_ENDPOINT_LIKE)
def test_canonical_text_agrees_with_the_full_parse(text: str) -> None:
    """The regular expression that takes canonical IPv4 text as it is may only ever
    say what parsing and writing the endpoint again says."""
    assert _canonical_text_or_error(text) == _canonical_or_error(text)


def test_canonical_text_fast_path_is_taken_and_edges_hold() -> None:
    text = "203.0.113.7:43283"
    assert Endpoint.canonical_text(text) is text  # the very object: nothing was built
    assert Endpoint.canonical_text("203.0.113.7:08080") == "203.0.113.7:8080"
    for bad in ("203.0.113.7:0", "203.0.113.7:65536", "203.0.113.256:1", "203.0.113.07:1", "203.0.113:1"):
        with pytest.raises(ProtocolError):
            Endpoint.canonical_text(bad)


@given(st.lists(st.builds(MemberEntry, endpoints, lans), min_size=1, max_size=20), st.none() | st.integers(0, 999999))
def test_member_list_round_trip(entries: list[MemberEntry], next_offset: int | None) -> None:
    ml = MemberList(tuple(entries), next_offset)
    assert MemberList.from_wire(ml.to_wire()) == ml


VALID = [SEED_EXAMPLE, ORIGINAL_EXAMPLE, b"//nat", b"//tcksvr", b"//tcksvr/1.2.3.4:5;[::1]:6", SEED_EXAMPLE + b"\noffset=3"]


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, pos, value in edits:
        if not out:
            out.append(value)
            continue
        pos %= len(out)
        if kind == 0:
            out[pos] = value
        elif kind == 1:
            del out[pos]
        else:
            out.insert(pos, value)
    return bytes(out)


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_our_errors(data: bytes) -> None:
    for parse in (parse_request, MemberList.from_wire, TrackerList.from_wire, NatReply.from_wire, ErrorReply.from_wire):
        try:
            parse(data)
        except NattoolError:
            pass


@settings(max_examples=600)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)), max_size=6))
def test_mutated_requests_raise_only_our_errors(data: bytes, edits: list[tuple[int, int, int]]) -> None:
    mutated = _mutate(data, edits)
    try:
        req = parse_request(mutated)
    except NattoolError:
        return
    # Whatever parses must build again, and the rebuilt bytes mean the same request.
    if isinstance(req, RegisterRequest):
        try:
            _ = req.offset
        except NattoolError:
            return
        assert parse_request(req.to_wire()) == req


# --- the registration fast path agrees with the parser ----------------------------------


def _agrees_with_parse_request(data: bytes) -> bool:
    """parse_seed_register either declines (None) or says what parse_request says.
    Returns whether it took the input."""
    fast = parse_seed_register(data)
    if fast is None:
        return False
    req = parse_request(data)  # never raises for an input the fast path took
    assert isinstance(req, RegisterRequest) and req.form == "seed"
    group, lan_text, identity = fast
    assert (group, lan_text, identity) == (req.group, ",".join(req.lan), req.identity)
    assert req.public is None and req.extensions == {} and req.offset == 0
    return True


FAST_FORMS = [
    b"//51pwn/P2P&E2E/g/0/0/0",
    b"//51pwn/P2P&E2E/46D0F69E-E347-47A7-8E95-43E5BAA95348/0/192.168.0.56,172.66.0.10/77:5b:67:a5:87:66",
    b"//51pwn/P2P&E2E/abc_DEF.1-2/0/10.0.0.1/02:00:00:00:00:01 \r",
    SEED_EXAMPLE,
]


def test_fast_path_takes_the_common_forms() -> None:
    assert all(_agrees_with_parse_request(d) for d in FAST_FORMS)
    # ...and leaves everything else to parse_request
    for other in (
        ORIGINAL_EXAMPLE,
        SEED_EXAMPLE + b"\noffset=3",
        b"//51pwn/P2P&E2E/g/1.2.3.4:5/0/0",  # a public endpoint
        b"//51pwn/P2P&E2E/g/0/10.0.0.1,10.0.0.1/0",  # a duplicate (parse_lan_list drops it)
        b"//51pwn/P2P&E2E/g/0/010.0.0.1/0",  # not canonical
        b"//51pwn/P2P&E2E/g/0/fd00::1/0",  # IPv6 LAN address
        b"//51pwn/P2P&E2E/g/0/0/77-5B-67-A5-87-66",  # another MAC spelling
        b"//nat",
    ):
        assert parse_seed_register(other) is None, other


@settings(max_examples=1000)
@given(st.sampled_from(FAST_FORMS), st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)), max_size=4))
def test_fast_path_never_disagrees_on_mutations(data: bytes, edits: list[tuple[int, int, int]]) -> None:
    _agrees_with_parse_request(_mutate(data, edits))


@settings(max_examples=300)
@given(groups | st.uuids().map(lambda u: str(u).upper()), st.lists(ipv4.map(str), max_size=17), st.none() | macs)
def test_fast_path_agrees_on_generated_registrations(group: str, lan: list[str], mac: str | None) -> None:
    data = f"//51pwn/P2P&E2E/{group}/0/{','.join(lan) or '0'}/{mac or '0'}".encode()
    took = _agrees_with_parse_request(data)
    if len(lan) <= 16 and len(set(lan)) == len(lan):
        assert took, data  # the common case must not fall back
