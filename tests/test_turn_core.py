"""The pure TURN server (TurnCore) with a fake clock: authentication, allocations,
permissions, channels, relaying, quotas, the peer policy, group credentials, and fuzzing
(nothing but our outcomes come out of random bytes)."""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import replace
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.errors import ConfigError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.limits import reply_budget
from nattool.protocol.peer_policy import PeerPolicy
from nattool.protocol.stun import (
    Attribute,
    ErrorCode,
    MsgClass,
    Nonce,
    Padding,
    Realm,
    StunMessage,
    UnknownAttributes,
    Username,
    XorMappedAddress,
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
    Lifetime,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    TurnMethod,
    XorPeerAddress,
    XorRelayedAddress,
    encode_channel_data,
    parse_channel_data,
)
from nattool.protocol.turn_auth import rest_password
from nattool.protocol.turn_server import (
    AllocationWanted,
    ClientRef,
    Deallocated,
    ToPeer,
    TurnConfig,
    TurnCore,
)

SECRET = b"s" * 32
WALL = 1_800_000_000.0
SERVER = Endpoint.from_text("203.0.113.1:3478")
RELAY_IP = "203.0.113.1"
PEER = Endpoint.from_text("192.0.2.9:7000")
PEER2 = Endpoint.from_text("192.0.2.10:7000")
_txids = itertools.count(1)
_ports = itertools.count(50000, 2)


def txid() -> bytes:
    return next(_txids).to_bytes(12, "big")


def ref(text: str = "198.51.100.7:5000", transport: str = "udp", connection: int = 0) -> ClientRef:
    return ClientRef(transport, Endpoint.from_text(text), SERVER, connection)


def core_with(**kw: object) -> TurnCore:
    kw.setdefault("users", {"alice": "pw", "bob": "pw2"})
    return TurnCore(TurnConfig(**kw), SECRET)  # type: ignore[arg-type]


class Client:
    """A minimal TURN client for the tests: the 401 dance and signed requests."""

    def __init__(self, core: TurnCore, client: ClientRef, user: str = "alice", password: str = "pw") -> None:
        self.core = core
        self.ref = client
        self.user = user
        self.key = long_term_key(user, core.config.realm, password)
        self.nonce = ""
        self.allocation_id: Optional[int] = None
        self.relayed: Optional[Endpoint] = None

    def signed(self, method: int, attrs: list, tid: Optional[bytes] = None, cls: MsgClass = MsgClass.REQUEST) -> bytes:
        auth = [Username(self.user), Realm(self.core.config.realm), Nonce(self.nonce)]
        msg = StunMessage(cls, method, tid or txid(), tuple(attrs) + tuple(auth))
        return msg.to_wire(integrity_key=self.key, fingerprint=True)

    def send(self, data: bytes, now: float = 0.0, wall: float = WALL) -> object:
        return self.core.on_client_message(data, self.ref, now, wall)

    def request(self, method: int, attrs: list, now: float = 0.0, tid: Optional[bytes] = None) -> object:
        """Signed; a 401/438 challenge is answered once, as clients do."""
        if not self.nonce:
            first = self.send(StunMessage(MsgClass.REQUEST, method, txid(), tuple(attrs)).to_wire(), now)
            assert isinstance(first, bytes)
            self.nonce = parse(first).get(Nonce).text  # type: ignore[union-attr]
        out = self.send(self.signed(method, attrs, tid), now)
        if isinstance(out, bytes):
            reply = parse(out)
            err = reply.get(ErrorCode)
            if isinstance(err, ErrorCode) and err.code in (401, 438) and reply.get(Nonce) is not None:
                new = reply.get(Nonce).text  # type: ignore[union-attr]
                if new != self.nonce:
                    self.nonce = new
                    out = self.send(self.signed(method, attrs, tid), now)
        return out

    def allocate(self, attrs: Optional[list] = None, now: float = 0.0, relayed: Optional[Endpoint] = None) -> StunMessage:
        out = self.request(TurnMethod.ALLOCATE, [RequestedTransport(17), *(attrs or [])], now)
        assert isinstance(out, AllocationWanted), out
        if relayed is None:
            ip = RELAY_IP if out.family == 4 else "2001:db8::1"
            relayed = Endpoint(ipaddress.ip_address(ip), out.reserved.port if out.reserved else next(_ports))
        reply = self.core.allocation_made(out, relayed, now, WALL)
        assert reply is not None
        self.allocation_id = out.allocation_id
        self.relayed = relayed
        return self.verified(reply)

    def verified(self, data: bytes) -> StunMessage:
        assert check_integrity(data, self.key) is True
        return parse(data)

    def permit(self, *peers: Endpoint, now: float = 0.0) -> StunMessage:
        out = self.request(TurnMethod.CREATE_PERMISSION, [XorPeerAddress(p) for p in peers], now)
        assert isinstance(out, bytes)
        return parse(out)

    def bind(self, number: int, peer: Endpoint, now: float = 0.0) -> StunMessage:
        out = self.request(TurnMethod.CHANNEL_BIND, [ChannelNumber(number), XorPeerAddress(peer)], now)
        assert isinstance(out, bytes)
        return parse(out)

    def send_indication(self, peer: Endpoint, payload: bytes, now: float = 0.0) -> object:
        msg = StunMessage(MsgClass.INDICATION, TurnMethod.SEND, txid(), (XorPeerAddress(peer), Data(payload)))
        return self.send(msg.to_wire(), now)


def error_of(data: object) -> Optional[int]:
    assert isinstance(data, bytes)
    err = parse(data).get(ErrorCode)
    return err.code if isinstance(err, ErrorCode) else None


# --------------------------------------------------------------------------- authentication


def test_allocate_without_credentials_gets_401_with_realm_and_nonce() -> None:
    core = core_with()
    req = StunMessage(MsgClass.REQUEST, TurnMethod.ALLOCATE, txid(), (RequestedTransport(17),)).to_wire()
    reply = parse(core.on_client_message(req, ref(), 0.0, WALL))  # type: ignore[arg-type]
    assert reply.msg_class == MsgClass.ERROR and reply.get(ErrorCode).code == 401  # type: ignore[union-attr]
    assert reply.get(Realm) == Realm("nattool")
    assert reply.get(Nonce) is not None
    assert reply.integrity_offset is None
    assert core.counters.challenges == 1 and core.counters.auth_failures == 0


@settings(max_examples=200, deadline=None)
@given(
    padding=st.integers(0, 400),
    realm=st.text(min_size=1, max_size=120).filter(lambda r: not any(c.isspace() for c in r)),
    fingerprint=st.booleans(),
)
def test_unauthenticated_replies_stay_within_the_amplification_bound(padding: int, realm: str, fingerprint: bool) -> None:
    core = core_with(realm=realm)
    attrs: list[Attribute] = [RequestedTransport(17)]
    if padding:
        attrs.append(Padding(padding + (-padding % 4)))
    req = StunMessage(MsgClass.REQUEST, TurnMethod.ALLOCATE, txid(), tuple(attrs)).to_wire(fingerprint=fingerprint)
    out = core.on_client_message(req, ref(), 0.0, WALL)
    assert out is None or len(out) <= reply_budget(len(req))  # type: ignore[arg-type]
    if len(realm.encode()) <= 40:
        assert out is not None  # a sane realm always fits a bare request's 128 bytes


def test_wrong_password_and_unknown_user_get_401() -> None:
    core = core_with()
    for user, password in (("alice", "nope"), ("mallory", "pw")):
        c = Client(core, ref(), user, password)
        assert error_of(c.request(TurnMethod.ALLOCATE, [RequestedTransport(17)])) == 401
    assert core.counters.auth_failures == 2
    assert core.live == 0


def test_stale_nonce_gets_438_and_a_fresh_one() -> None:
    core = core_with()
    c = Client(core, ref())
    c.allocate(now=0.0)
    stale = c.signed(TurnMethod.REFRESH, [])
    reply = parse(c.send(stale, now=601.0))  # type: ignore[arg-type]
    assert reply.get(ErrorCode).code == 438  # type: ignore[union-attr]
    assert reply.get(Nonce).text != c.nonce  # type: ignore[union-attr]
    assert core.counters.stale_nonces == 1
    # The client retries with the new nonce and succeeds (the allocation lives 600 s
    # from 0; refresh at 590 instead to keep it).
    c2 = Client(core, ref("198.51.100.8:1"))
    c2.allocate(now=0.0)
    c2.nonce = "0" * 32
    out = c2.request(TurnMethod.REFRESH, [], now=590.0)
    assert error_of(out) is None


def test_nonce_of_another_client_is_stale() -> None:
    core = core_with()
    a = Client(core, ref("198.51.100.7:5000"))
    a.allocate()
    b = Client(core, ref("198.51.100.99:5000"))
    b.nonce = a.nonce
    assert error_of(b.send(b.signed(TurnMethod.ALLOCATE, [RequestedTransport(17)]))) == 438


def test_missing_username_realm_or_nonce_is_400() -> None:
    core = core_with()
    key = long_term_key("alice", "nattool", "pw")
    msg = StunMessage(MsgClass.REQUEST, TurnMethod.ALLOCATE, txid(), (RequestedTransport(17), Username("alice")))
    assert error_of(core.on_client_message(msg.to_wire(integrity_key=key), ref(), 0.0, WALL)) == 400


def test_another_username_on_the_same_five_tuple_is_441() -> None:
    core = core_with()
    a = Client(core, ref())
    a.allocate()
    b = Client(core, ref(), "bob", "pw2")
    b.nonce = a.nonce
    assert error_of(b.send(b.signed(TurnMethod.REFRESH, []))) == 441


def test_rest_secret_credentials_and_expiry() -> None:
    core = core_with(users={}, rest_secret="north")
    user = f"{int(WALL) + 3600}:bob"
    c = Client(core, ref(), user, rest_password(b"north", user))
    assert c.allocate().get(XorRelayedAddress) is not None
    old = f"{int(WALL) - 1}:bob"
    c2 = Client(core, ref("198.51.100.8:1"), old, rest_password(b"north", old))
    assert error_of(c2.request(TurnMethod.ALLOCATE, [RequestedTransport(17)])) == 401


# --------------------------------------------------------------------------- Allocate / Refresh


def test_allocate_success() -> None:
    core = core_with()
    c = Client(core, ref())
    reply = c.allocate(relayed=Endpoint.from_text("203.0.113.1:50000"))
    assert reply.msg_class == MsgClass.SUCCESS
    assert reply.get(XorRelayedAddress) == XorRelayedAddress(Endpoint.from_text("203.0.113.1:50000"))
    assert reply.get(Lifetime) == Lifetime(600)
    assert reply.get(XorMappedAddress) == XorMappedAddress(ref().client)
    assert reply.has_fingerprint
    assert core.live == 1 and core.counters.allocations_total == 1
    assert core.client_of(c.allocation_id) == ref()  # type: ignore[arg-type]
    assert core.relayed_of(c.allocation_id) == Endpoint.from_text("203.0.113.1:50000")  # type: ignore[arg-type]


def test_allocate_retransmission_and_mismatch() -> None:
    core = core_with()
    c = Client(core, ref())
    c.request(TurnMethod.REFRESH, [])  # learn a nonce
    tid = txid()
    request = c.signed(TurnMethod.ALLOCATE, [RequestedTransport(17)], tid)
    wanted = c.send(request)
    assert isinstance(wanted, AllocationWanted)
    assert c.send(request) is None  # while the shell binds: a retransmission is dropped
    reply = core.allocation_made(wanted, Endpoint.from_text("203.0.113.1:50000"), 0.0, WALL)
    assert c.send(request) == reply  # afterwards: the same answer again
    assert error_of(c.send(c.signed(TurnMethod.ALLOCATE, [RequestedTransport(17)]))) == 437


@pytest.mark.parametrize(
    "attrs, code",
    [
        ([], 400),  # no REQUESTED-TRANSPORT (the helper adds UDP; replaced below)
        ([RequestedTransport(6)], 442),
        ([RequestedTransport(17), DontFragment()], 420),
        ([RequestedTransport(17), RequestedAddressFamily(6)], 440),
        ([RequestedTransport(17), RequestedAddressFamily(4), AdditionalAddressFamily(6)], 400),
        ([RequestedTransport(17), AdditionalAddressFamily(4)], 400),
        ([RequestedTransport(17), ReservationToken(bytes(8)), EvenPort(False)], 400),
        ([RequestedTransport(17), ReservationToken(bytes(8))], 508),
    ],
)
def test_allocate_refusals(attrs: list, code: int) -> None:
    core = core_with(families=frozenset({4}))
    c = Client(core, ref())
    c.request(TurnMethod.REFRESH, [])
    out = c.send(c.signed(TurnMethod.ALLOCATE, attrs))
    assert isinstance(out, bytes)
    reply = c.verified(out)
    assert reply.get(ErrorCode).code == code  # type: ignore[union-attr]
    if code == 420:
        assert reply.get(UnknownAttributes) == UnknownAttributes((0x001A,))
    assert core.live == 0


def test_dual_allocation_gives_ipv4_and_says_440_for_ipv6() -> None:
    core = core_with()
    reply = Client(core, ref()).allocate([AdditionalAddressFamily(6)])
    assert reply.get(XorRelayedAddress).endpoint.ip.version == 4  # type: ignore[union-attr]
    assert reply.get(AddressErrorCode) == AddressErrorCode(6, 440, "Address Family not Supported")


def test_ipv6_allocation() -> None:
    core = core_with()
    c = Client(core, ref())
    reply = c.allocate([RequestedAddressFamily(6)])
    assert reply.get(XorRelayedAddress).endpoint.ip.version == 6  # type: ignore[union-attr]
    assert error_of(c.bind(0x4000, PEER).to_wire()) == 443  # an IPv4 peer on an IPv6 allocation


@pytest.mark.parametrize("asked, got", [(None, 600), (0, 600), (10, 600), (1200, 1200), (99999, 3600)])
def test_lifetimes(asked: Optional[int], got: int) -> None:
    core = core_with()
    c = Client(core, ref())
    reply = c.allocate([Lifetime(asked)] if asked is not None else [])
    assert reply.get(Lifetime) == Lifetime(got)
    if asked != 0:  # a Refresh with 0 deallocates
        refreshed = c.request(TurnMethod.REFRESH, [Lifetime(asked)] if asked is not None else [], now=10.0)
        assert c.verified(refreshed).get(Lifetime) == Lifetime(got)  # type: ignore[arg-type]
    assert core.live == 1


def test_refresh_extends_and_expiry_closes() -> None:
    core = core_with()
    c = Client(core, ref())
    c.allocate(now=0.0)
    assert core.get_timer() == 600.0
    c.request(TurnMethod.REFRESH, [], now=500.0)
    assert core.expire(600.0) == []  # extended to 1100
    assert core.live == 1
    assert core.expire(1100.0) == [c.allocation_id]
    assert core.live == 0 and core.counters.allocations_expired == 1
    assert error_of(c.request(TurnMethod.REFRESH, [], now=1101.0)) == 437


def test_refresh_with_lifetime_zero_deallocates() -> None:
    core = core_with()
    c = Client(core, ref())
    c.allocate()
    out = c.request(TurnMethod.REFRESH, [Lifetime(0)], now=1.0)
    assert isinstance(out, Deallocated) and out.allocation_id == c.allocation_id
    assert c.verified(out.reply).get(Lifetime) == Lifetime(0)
    assert core.live == 0
    assert core.expire(10_000.0) == []  # nothing left to close twice
    assert error_of(c.request(TurnMethod.REFRESH, [], now=2.0)) == 437


def test_refresh_family_mismatch_is_443() -> None:
    core = core_with()
    c = Client(core, ref())
    c.allocate()
    assert error_of(c.request(TurnMethod.REFRESH, [RequestedAddressFamily(6)])) == 443


def test_requests_without_an_allocation_are_437() -> None:
    core = core_with()
    c = Client(core, ref())
    assert error_of(c.request(TurnMethod.CREATE_PERMISSION, [XorPeerAddress(PEER)])) == 437
    assert error_of(c.request(TurnMethod.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(PEER)])) == 437


# --------------------------------------------------------------------------- quotas


def test_user_quota() -> None:
    core = core_with(user_quota=2)
    for i in range(2):
        Client(core, ref(f"198.51.100.{i + 1}:1")).allocate()
    c = Client(core, ref("198.51.100.9:1"))
    assert error_of(c.request(TurnMethod.ALLOCATE, [RequestedTransport(17)])) == 486
    assert Client(core, ref("198.51.100.9:2"), "bob", "pw2").allocate() is not None  # another user
    assert core.counters.quota_refusals == 1


def test_source_quota_and_release() -> None:
    core = core_with(source_quota=2)
    first = Client(core, ref("198.51.100.7:1"))
    first.allocate()
    Client(core, ref("198.51.100.7:2"), "bob", "pw2").allocate()
    c = Client(core, ref("198.51.100.7:3"))
    assert error_of(c.request(TurnMethod.ALLOCATE, [RequestedTransport(17)])) == 486
    assert isinstance(first.request(TurnMethod.REFRESH, [Lifetime(0)]), Deallocated)
    assert c.allocate() is not None


def test_total_quota_counts_pending_binds() -> None:
    core = core_with(max_allocations=1)
    a = Client(core, ref("198.51.100.7:1"))
    assert isinstance(a.request(TurnMethod.ALLOCATE, [RequestedTransport(17)]), AllocationWanted)
    b = Client(core, ref("198.51.100.8:1"), "bob", "pw2")
    assert error_of(b.request(TurnMethod.ALLOCATE, [RequestedTransport(17)])) == 486


def test_allocation_failed_is_508_and_frees_the_quota() -> None:
    core = core_with(user_quota=1)
    c = Client(core, ref())
    wanted = c.request(TurnMethod.ALLOCATE, [RequestedTransport(17)])
    assert isinstance(wanted, AllocationWanted)
    assert error_of(core.allocation_failed(wanted)) == 508
    assert core.allocation_made(wanted, Endpoint.from_text("203.0.113.1:50000"), 0.0, WALL) is None
    assert Client(core, ref("198.51.100.9:1")).allocate() is not None


def test_tcp_client_gone_frees_the_allocation() -> None:
    core = core_with(user_quota=1)
    tcp = ref(transport="tcp", connection=7)
    c = Client(core, tcp)
    c.allocate()
    assert core.client_gone(tcp) == [c.allocation_id]
    assert core.live == 0
    pending = Client(core, ref(transport="tcp", connection=8))
    wanted = pending.request(TurnMethod.ALLOCATE, [RequestedTransport(17)])
    assert isinstance(wanted, AllocationWanted)
    assert core.client_gone(pending.ref) == []
    assert core.allocation_made(wanted, Endpoint.from_text("203.0.113.1:50002"), 0.0, WALL) is None
    assert Client(core, ref("198.51.100.9:1")).allocate() is not None  # quota released


# --------------------------------------------------------------------------- permissions and relaying


@pytest.mark.parametrize("peer", ["127.0.0.1:9", "10.0.0.1:9", "192.168.1.1:9", "[::1]:9", "224.0.0.1:9"])
def test_private_and_loopback_peers_are_403(peer: str) -> None:
    core = core_with()
    c = Client(core, ref())
    family = [RequestedAddressFamily(6)] if peer.startswith("[") else []
    c.allocate(family)
    assert error_of(c.permit(Endpoint.from_text(peer)).to_wire()) == 403
    assert error_of(c.bind(0x4000, Endpoint.from_text(peer)).to_wire()) == 403
    assert core.counters.peer_denials == 2


def test_allow_peer_overrides_but_never_reaches_service_endpoints() -> None:
    policy = PeerPolicy.from_text(allow=["127.0.0.1", "10.0.0.0/8"], service_endpoints=[Endpoint.from_text("0.0.0.0:3478")])
    core = core_with(peer_policy=policy)
    c = Client(core, ref())
    c.allocate()
    assert c.permit(Endpoint.from_text("10.0.0.1:9")).msg_class == MsgClass.SUCCESS
    assert c.permit(Endpoint.from_text("127.0.0.1:9")).msg_class == MsgClass.SUCCESS
    assert error_of(c.permit(Endpoint.from_text("127.0.0.1:3478")).to_wire()) == 403
    assert isinstance(c.send_indication(Endpoint.from_text("127.0.0.1:9"), b"x"), ToPeer)
    assert c.send_indication(Endpoint.from_text("127.0.0.1:3478"), b"x") is None  # same IP, service port
    assert isinstance(c.send_indication(Endpoint.from_text("10.0.0.1:3478"), b"x"), ToPeer)


def test_one_denied_peer_fails_the_whole_create_permission() -> None:
    core = core_with()
    c = Client(core, ref())
    c.allocate()
    assert error_of(c.permit(PEER, Endpoint.from_text("10.0.0.1:1")).to_wire()) == 403
    assert c.send_indication(PEER, b"x") is None


def test_send_and_data_with_a_permission() -> None:
    core = core_with()
    c = Client(core, ref())
    c.allocate()
    aid = c.allocation_id
    assert c.send_indication(PEER, b"x") is None  # no permission yet
    assert core.on_peer_datagram(aid, b"x", PEER, 0.0) is None  # type: ignore[arg-type]
    assert c.permit(PEER).msg_class == MsgClass.SUCCESS
    assert c.send_indication(PEER, b"hello") == ToPeer(aid, PEER, b"hello")  # type: ignore[arg-type]
    # Permission is per IP: any port of that peer.
    other_port = Endpoint(PEER.ip, 7001)
    assert c.send_indication(other_port, b"hi") == ToPeer(aid, other_port, b"hi")  # type: ignore[arg-type]
    back = core.on_peer_datagram(aid, b"reply", PEER, 1.0)  # type: ignore[arg-type]
    msg = parse(back)  # type: ignore[arg-type]
    assert (msg.msg_class, msg.method) == (MsgClass.INDICATION, TurnMethod.DATA)
    assert msg.get(XorPeerAddress) == XorPeerAddress(PEER) and msg.get(Data) == Data(b"reply")
    assert core.on_peer_datagram(aid, b"x", PEER2, 1.0) is None  # type: ignore[arg-type]
    # Permissions last 300 s.
    assert c.send_indication(PEER, b"late", now=301.0) is None
    assert core.on_peer_datagram(aid, b"late", PEER, 301.0) is None  # type: ignore[arg-type]
    c.permit(PEER, now=302.0)
    assert isinstance(c.send_indication(PEER, b"again", now=303.0), ToPeer)
    assert core.counters.packets_to_peer == 3 and core.counters.bytes_to_peer == 12
    assert core.counters.packets_to_client == 1 and core.counters.bytes_to_client == 5


def test_channels() -> None:
    core = core_with()
    c = Client(core, ref())
    c.allocate()
    aid = c.allocation_id
    assert c.bind(0x4000, PEER).msg_class == MsgClass.SUCCESS
    assert c.send(encode_channel_data(0x4000, b"abc")) == ToPeer(aid, PEER, b"abc")  # type: ignore[arg-type]
    assert c.send(encode_channel_data(0x4001, b"abc")) is None  # not bound
    assert core.on_peer_datagram(aid, b"xyz", PEER, 1.0) == encode_channel_data(0x4000, b"xyz")  # type: ignore[arg-type]
    assert c.bind(0x4000, PEER, now=2.0).msg_class == MsgClass.SUCCESS  # refresh: same pair
    assert error_of(c.bind(0x4000, PEER2).to_wire()) == 400  # number taken by another peer
    assert error_of(c.bind(0x4001, PEER).to_wire()) == 400  # peer has another number
    assert error_of(c.bind(0x3FFF, PEER2).to_wire()) == 400
    assert error_of(c.bind(0x8000, PEER2).to_wire()) == 400
    assert c.bind(0x7FFF, PEER2).msg_class == MsgClass.SUCCESS  # RFC 5766 clients use 0x5000-0x7FFF
    c.request(TurnMethod.REFRESH, [], now=300.0)  # the allocation lives on to 900
    # A live channel keeps its peer reachable though the permission (300 s) ran out.
    assert c.send(encode_channel_data(0x4000, b"abc"), now=400.0) == ToPeer(aid, PEER, b"abc")  # type: ignore[arg-type]
    assert c.send(encode_channel_data(0x4000, b"abc"), now=603.0) is None  # channel: 600 s from 2
    assert c.bind(0x4000, PEER2, now=603.0).msg_class == MsgClass.SUCCESS  # expired: rebindable
    assert c.send(encode_channel_data(0x4000, b"k"), now=604.0) == ToPeer(aid, PEER2, b"k")  # type: ignore[arg-type]


def test_tcp_clients_get_padded_channel_data() -> None:
    core = core_with()
    c = Client(core, ref(transport="tcp", connection=3))
    c.allocate()
    c.bind(0x4000, PEER)
    out = core.on_peer_datagram(c.allocation_id, b"abcde", PEER, 1.0)  # type: ignore[arg-type]
    assert out == encode_channel_data(0x4000, b"abcde", stream=True) and len(out) == 12  # type: ignore[arg-type]
    assert c.send(encode_channel_data(0x4000, b"abcde", stream=True)) == ToPeer(c.allocation_id, PEER, b"abcde")  # type: ignore[arg-type]


def test_relayed_addresses_of_this_server_are_reachable_but_not_the_rest_of_its_ports() -> None:
    core = core_with()
    a = Client(core, ref("198.51.100.7:1"))
    a.allocate(relayed=Endpoint.from_text("127.0.0.1:50000"))
    b = Client(core, ref("198.51.100.8:1"), "bob", "pw2")
    b.allocate(relayed=Endpoint.from_text("127.0.0.1:50002"))
    assert a.permit(b.relayed).msg_class == MsgClass.SUCCESS  # type: ignore[arg-type]
    assert b.bind(0x4000, a.relayed).msg_class == MsgClass.SUCCESS  # type: ignore[arg-type]
    assert a.send_indication(b.relayed, b"hi") == ToPeer(a.allocation_id, b.relayed, b"hi")  # type: ignore[arg-type]
    assert a.send_indication(Endpoint.from_text("127.0.0.1:22"), b"hi") is None
    assert core.on_peer_datagram(a.allocation_id, b"x", Endpoint.from_text("127.0.0.1:22"), 0.0) is None  # type: ignore[arg-type]
    assert error_of(a.permit(Endpoint.from_text("127.0.0.1:22")).to_wire()) == 403
    # Once b is gone, its address is just loopback again.
    b.request(TurnMethod.REFRESH, [Lifetime(0)])
    assert a.send_indication(Endpoint.from_text("127.0.0.1:50002"), b"hi") is None


def test_bandwidth_cap() -> None:
    core = core_with(bandwidth=1000)  # burst: 64 KiB
    c = Client(core, ref())
    c.allocate()
    c.permit(PEER)
    sent = [c.send_indication(PEER, b"x" * 1024, now=10.0) for _ in range(65)]
    assert sum(isinstance(s, ToPeer) for s in sent) == 64
    assert core.counters.bandwidth_drops == 1
    assert core.on_peer_datagram(c.allocation_id, b"y" * 500, PEER, 10.0) is None  # type: ignore[arg-type]
    assert core.on_peer_datagram(c.allocation_id, b"y" * 500, PEER, 11.0) is not None  # type: ignore[arg-type]
    unlimited = core_with(bandwidth=0)
    u = Client(unlimited, ref())
    u.allocate()
    u.permit(PEER)
    assert all(isinstance(u.send_indication(PEER, b"x" * 1200, now=1.0), ToPeer) for _ in range(100))


# --------------------------------------------------------------------------- EVEN-PORT / RESERVATION-TOKEN


def test_even_port_with_reservation() -> None:
    core = core_with()
    a = Client(core, ref("198.51.100.7:1"))
    wanted = a.request(TurnMethod.ALLOCATE, [RequestedTransport(17), EvenPort(True)])
    assert isinstance(wanted, AllocationWanted) and wanted.even_port and wanted.reserve_id is not None
    reply = a.verified(core.allocation_made(wanted, Endpoint.from_text("203.0.113.1:50010"), 0.0, WALL))  # type: ignore[arg-type]
    token = reply.get(ReservationToken)
    assert isinstance(token, ReservationToken)
    b = Client(core, ref("198.51.100.7:2"))
    second = b.request(TurnMethod.ALLOCATE, [RequestedTransport(17), token], now=5.0)
    assert isinstance(second, AllocationWanted)
    assert second.allocation_id == wanted.reserve_id and second.reserved == Endpoint.from_text("203.0.113.1:50011")
    reply2 = b.verified(core.allocation_made(second, second.reserved, 5.0, WALL))  # type: ignore[arg-type]
    assert reply2.get(XorRelayedAddress) == XorRelayedAddress(Endpoint.from_text("203.0.113.1:50011"))
    c = Client(core, ref("198.51.100.7:3"))
    assert error_of(c.request(TurnMethod.ALLOCATE, [RequestedTransport(17), token])) == 508  # used up


def test_unused_reservation_expires_after_30_seconds() -> None:
    core = core_with()
    a = Client(core, ref())
    wanted = a.request(TurnMethod.ALLOCATE, [RequestedTransport(17), EvenPort(True)])
    assert isinstance(wanted, AllocationWanted)
    reply = parse(core.allocation_made(wanted, Endpoint.from_text("203.0.113.1:50020"), 0.0, WALL))  # type: ignore[arg-type]
    assert core.expire(29.0) == []
    assert core.expire(30.0) == [wanted.reserve_id]
    b = Client(core, ref("198.51.100.8:1"))
    assert error_of(b.request(TurnMethod.ALLOCATE, [RequestedTransport(17), reply.get(ReservationToken)], now=31.0)) == 508


# --------------------------------------------------------------------------- group credentials


def group_client(core: TurnCore, group: str, source: str) -> Client:
    grant = core.group_grant(group, 0.0, WALL)
    assert grant is not None
    return Client(core, ref(source), grant.username, grant.password)


def test_group_credentials_reach_only_their_group() -> None:
    core = core_with(users={}, relay_groups=True)
    a = group_client(core, "friends", "198.51.100.7:1")
    a.allocate(relayed=Endpoint.from_text("203.0.113.1:50100"))
    b = group_client(core, "friends", "198.51.100.8:1")
    b.allocate(relayed=Endpoint.from_text("203.0.113.1:50102"))
    s = group_client(core, "strangers", "198.51.100.9:1")
    s.allocate(relayed=Endpoint.from_text("203.0.113.1:50104"))
    grant = core.group_grant("friends", 1.0, WALL)
    assert grant is not None and grant.relayed == (b.relayed, a.relayed)  # most recent first
    assert grant.realm == "nattool" and grant.lifetime == 3600
    assert a.permit(b.relayed).msg_class == MsgClass.SUCCESS  # type: ignore[arg-type]
    assert b.bind(0x4000, a.relayed).msg_class == MsgClass.SUCCESS  # type: ignore[arg-type]
    assert error_of(a.permit(s.relayed).to_wire()) == 403  # type: ignore[arg-type]
    assert error_of(s.permit(a.relayed).to_wire()) == 403  # type: ignore[arg-type]
    assert error_of(a.permit(PEER).to_wire()) == 403  # not an open relay
    assert a.send_indication(b.relayed, b"hi") == ToPeer(a.allocation_id, b.relayed, b"hi")  # type: ignore[arg-type]
    assert a.send_indication(s.relayed, b"hi") is None  # same IP, stranger's port
    assert core.on_peer_datagram(a.allocation_id, b"x", s.relayed, 0.0) is None  # type: ignore[arg-type]
    assert core.on_peer_datagram(a.allocation_id, b"x", b.relayed, 0.0) is not None  # type: ignore[arg-type]


def test_group_grant_off_without_relay() -> None:
    assert core_with().group_grant("friends", 0.0, WALL) is None


def test_group_grant_forgets_expired_allocations() -> None:
    core = core_with(users={}, relay_groups=True)
    a = group_client(core, "friends", "198.51.100.7:1")
    a.allocate(now=0.0)
    assert core.group_grant("friends", 599.0, WALL).relayed == (a.relayed,)  # type: ignore[union-attr]
    core.expire(600.0)
    assert core.group_grant("friends", 601.0, WALL).relayed == ()  # type: ignore[union-attr]


# --------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize("peer", [PEER, Endpoint.from_text("[2001:db8::9]:7000")])
@pytest.mark.parametrize("payload", [b"", b"a", b"abcd", b"x" * 1001])
def test_data_indication_fast_path_equals_the_encoder(peer: Endpoint, payload: bytes) -> None:
    core = core_with()
    c = Client(core, ref())
    c.allocate([RequestedAddressFamily(peer.ip.version)] if peer.ip.version == 6 else [])
    c.permit(peer)
    for _ in range(2):  # the second time from the cache
        fast = core.on_peer_datagram(c.allocation_id, payload, peer, 1.0)  # type: ignore[arg-type]
        assert fast is not None
        msg = parse(fast)
        slow = StunMessage(MsgClass.INDICATION, TurnMethod.DATA, msg.transaction_id, (XorPeerAddress(peer), Data(payload)))
        assert fast == slow.to_wire()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.integers(0x3FF0, 0x8010))
def test_channel_data_fast_entry_equals_the_general_one(payload: bytes, channel: int) -> None:
    core = core_with()
    c = Client(core, ref())
    c.allocate()
    c.bind(0x4000, PEER)
    for data in (payload, b"\x40\x00" + len(payload).to_bytes(2, "big") + payload, channel.to_bytes(2, "big") + payload):
        if not data or not 0x40 <= data[0] <= 0x7F:
            continue
        for now in (1.0, 599.0, 601.0):  # live, about to expire, expired
            before = core.counters.packets_to_peer, core.counters.bytes_to_peer
            fast = core.channel_data_from_client(data, c.ref, now)
            fast_counted = core.counters.packets_to_peer - before[0], core.counters.bytes_to_peer - before[1]
            slow = core.on_client_message(data, c.ref, now, WALL)
            slow_counted = core.counters.packets_to_peer - before[0] - fast_counted[0], core.counters.bytes_to_peer - before[1] - fast_counted[1]
            assert fast == slow
            assert fast_counted == slow_counted


@pytest.mark.parametrize("y_side", ["nothing", "permission", "channel", "expired", "groups on"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_channel_data_handover_equals_the_two_steps(y_side: str, transport: str) -> None:
    """ChannelData from X to Y's relayed address, handed over in one step, gives what
    channel_data_from_client then on_peer_datagram (from X's relayed address) give:
    the same bytes for Y's client, the same refusals and the same counters."""

    def two_allocations() -> tuple[TurnCore, Client, Client]:
        core = core_with(relay_groups=y_side == "groups on", bandwidth=0)
        x = Client(core, ref("198.51.100.7:5001"))
        y = Client(core, ref("198.51.100.8:5002", transport, 9 if transport == "tcp" else 0))
        x.allocate(relayed=Endpoint.from_text("127.0.0.1:50000"))
        y.allocate(relayed=Endpoint.from_text("127.0.0.1:50002"), now=-600.0 if y_side == "expired" else 0.0)
        x.permit(y.relayed)  # type: ignore[arg-type]
        x.bind(0x4001, y.relayed)  # type: ignore[arg-type]
        if y_side != "nothing":
            y.permit(x.relayed)  # type: ignore[arg-type]
        if y_side == "channel":
            y.bind(0x4002, x.relayed)  # type: ignore[arg-type]
        return core, x, y

    fast_core, fx, fy = two_allocations()
    slow_core, sx, sy = two_allocations()
    for payload in (b"", b"abc", b"abcd", b"z" * 1001):
        data = encode_channel_data(0x4001, payload)
        fast = fast_core.channel_data_handover(data, fx.ref, 1.0)
        step = slow_core.channel_data_from_client(data, sx.ref, 1.0)
        slow = None if step is None else slow_core.on_peer_datagram(sy.allocation_id, step.payload, sx.relayed, 1.0)  # type: ignore[arg-type]
        if y_side in ("nothing", "expired"):
            assert slow is None
        assert (fast.allocation_id, fast.data) == (sy.allocation_id, slow) if slow is not None else fast is None  # type: ignore[union-attr]
        assert fast_core.counters == slow_core.counters


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 1001, 65507])
def test_channel_data_to_client_fast_path_equals_the_encoder(transport: str, size: int) -> None:
    core = core_with()
    c = Client(core, ref(transport=transport, connection=7 if transport == "tcp" else 0))
    c.allocate()
    c.bind(0x4001, PEER)
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    out = core.on_peer_datagram(c.allocation_id, payload, PEER, 1.0)  # type: ignore[arg-type]
    assert out == encode_channel_data(0x4001, payload, stream=transport == "tcp")
    assert core.on_peer_datagram(c.allocation_id, payload, PEER2, 1.0) is None  # no permission there


# --------------------------------------------------------------------------- fuzzing

_SAMPLES: list[bytes] = []


def _samples() -> list[bytes]:
    if not _SAMPLES:
        core = core_with()
        c = Client(core, ref())
        c.request(TurnMethod.REFRESH, [])
        _SAMPLES.extend(
            [
                c.signed(TurnMethod.ALLOCATE, [RequestedTransport(17), EvenPort(True), Lifetime(9)]),
                c.signed(TurnMethod.CHANNEL_BIND, [ChannelNumber(0x4000), XorPeerAddress(PEER)]),
                c.signed(TurnMethod.CREATE_PERMISSION, [XorPeerAddress(PEER), XorPeerAddress(PEER2)]),
                c.signed(TurnMethod.REFRESH, [Lifetime(0)]),
                StunMessage(MsgClass.INDICATION, TurnMethod.SEND, txid(), (XorPeerAddress(PEER), Data(b"hi"))).to_wire(),
                encode_channel_data(0x4000, b"hello", stream=True),
            ]
        )
    return _SAMPLES


def _fuzz_core() -> tuple[TurnCore, Client]:
    core = core_with()
    c = Client(core, ref())
    c.allocate()
    c.permit(PEER)
    c.bind(0x4000, PEER)
    return core, c


_OUTCOMES = (bytes, AllocationWanted, ToPeer, Deallocated, type(None))


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=160))
def test_random_bytes_from_clients_and_peers(data: bytes) -> None:
    core, c = _fuzz_core()
    assert isinstance(core.on_client_message(data, c.ref, 1.0, WALL), _OUTCOMES)
    assert isinstance(core.on_client_message(data, ref("198.51.100.99:9"), 1.0, WALL), _OUTCOMES)
    out = core.on_peer_datagram(c.allocation_id, data, PEER, 1.0)  # type: ignore[arg-type]
    assert out is not None  # a permitted peer's datagram is always relayed
    assert parse_channel_data(out) == ChannelData(0x4000, data)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_mutated_turn_messages(data: st.DataObject) -> None:
    sample = bytearray(data.draw(st.sampled_from(_samples())))
    for pos, value in data.draw(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), min_size=1, max_size=4)):
        sample[pos % len(sample)] = value
    core, c = _fuzz_core()
    for candidate in (bytes(sample), bytes(sample[:-4])):
        assert isinstance(core.on_client_message(candidate, c.ref, 1.0, WALL), _OUTCOMES)


def test_config_defaults_follow_the_design() -> None:
    cfg = TurnConfig()
    assert (cfg.default_lifetime, cfg.max_lifetime, cfg.permission_lifetime, cfg.channel_lifetime) == (600, 3600, 300, 600)
    assert (cfg.max_allocations, cfg.user_quota, cfg.source_quota, cfg.bandwidth) == (1000, 10, 10, 1_000_000)
    assert cfg.realm == "nattool" and not cfg.enabled
    assert replace(cfg, users={"a": "b"}).enabled and replace(cfg, relay_groups=True).enabled


def test_client_refs_built_apart_are_the_same_key() -> None:
    a = ClientRef("udp", Endpoint.from_sockaddr(("198.51.100.7", 5000)), SERVER)
    b = ClientRef("udp", Endpoint.from_text("198.51.100.7:5000"), SERVER)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != ClientRef("tcp", a.client, SERVER) and a != ClientRef("udp", a.client, SERVER, 1)


def test_reserved_ports_count_against_the_total() -> None:
    core = core_with(max_allocations=2)
    a = Client(core, ref("198.51.100.7:1"))
    a.allocate([EvenPort(True)])  # one allocation + one reserved port
    b = Client(core, ref("198.51.100.8:1"), "bob", "pw2")
    assert error_of(b.request(TurnMethod.ALLOCATE, [RequestedTransport(17)])) == 486
    core.expire(30.0)  # the reservation lapses
    assert b.allocate(now=31.0) is not None


def test_an_expired_allocation_is_dead_before_expire_sweeps_it() -> None:
    core = core_with()
    c = Client(core, ref())
    c.allocate(now=0.0)
    c.bind(0x4000, PEER)
    assert error_of(c.request(TurnMethod.REFRESH, [], now=600.0)) == 437  # no revival
    assert c.send(encode_channel_data(0x4000, b"x"), now=600.0) is None
    assert core.on_peer_datagram(c.allocation_id, b"x", PEER, 600.0) is None  # type: ignore[arg-type]
    assert core.expire(600.0) == [c.allocation_id]


@pytest.mark.parametrize(
    "kw",
    [
        {"realm": ""},
        {"realm": "two words"},
        {"realm": "r" * 128},
        {"users": {"1800000000:g:0123456789abcdef": "pw"}},
        {"users": {"": "pw"}},
        {"default_lifetime": 0},
        {"default_lifetime": 4000, "max_lifetime": 3600},
        {"permission_lifetime": 0},
        {"user_quota": -1},
    ],
)
def test_bad_configuration_is_a_config_error(kw: dict) -> None:
    with pytest.raises(ConfigError):
        TurnConfig(**kw)


def test_short_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        TurnCore(TurnConfig(), b"short")


def test_refreshes_do_not_pile_up_timers() -> None:
    core = core_with()
    c = Client(core, ref())
    c.allocate([Lifetime(3600)], now=0.0)
    for i in range(1, 200):
        c.request(TurnMethod.REFRESH, [Lifetime(3600)], now=float(i))
    assert len(core._timers) == 1
    c.request(TurnMethod.REFRESH, [Lifetime(600)], now=200.0)  # shorter: expires at 800
    assert core.get_timer() == 800.0
    assert core.expire(799.0) == [] and core.expire(800.0) == [c.allocation_id]
    d = Client(core, ref("198.51.100.8:1"))
    d.allocate(now=0.0)
    d.request(TurnMethod.REFRESH, [], now=500.0)  # 1100
    assert core.expire(600.0) == [] and core.get_timer() == 1100.0
    assert core.expire(1100.0) == [d.allocation_id]


def test_channels_per_allocation_are_capped() -> None:
    from nattool.protocol.turn_server import MAX_CHANNELS

    core = core_with()
    c = Client(core, ref())
    c.allocate()
    for i in range(MAX_CHANNELS):
        assert error_of(c.bind(0x4000 + i, Endpoint(PEER.ip, 1000 + i)).to_wire()) is None
    assert error_of(c.bind(0x4000 + MAX_CHANNELS, PEER2).to_wire()) == 508
    assert error_of(c.bind(0x4000, Endpoint(PEER.ip, 1000)).to_wire()) is None  # refreshing one is fine
    c.request(TurnMethod.REFRESH, [], now=500.0)
    assert error_of(c.bind(0x4000 + MAX_CHANNELS, PEER2, now=601.0).to_wire()) is None  # the old ones expired


@pytest.mark.parametrize("v6", [False, True])
def test_the_largest_peer_datagrams(v6: bool) -> None:
    from nattool.protocol.turn_server import MAX_DATA_PAYLOAD

    core = core_with(bandwidth=0)
    c = Client(core, ref())
    peer = Endpoint.from_text("[2001:db8::9]:7000") if v6 else PEER
    c.allocate([RequestedAddressFamily(6)] if v6 else [])
    c.permit(peer)
    MAX_PEER_PAYLOAD = MAX_DATA_PAYLOAD[6 if v6 else 4]
    assert MAX_DATA_PAYLOAD[4] >= 65507  # the largest IPv4 UDP payload fits
    for size in (65000, MAX_PEER_PAYLOAD):
        out = core.on_peer_datagram(c.allocation_id, bytes(size), peer, 1.0)  # type: ignore[arg-type]
        assert out is not None and parse(out).get(Data) == Data(bytes(size))
    assert core.on_peer_datagram(c.allocation_id, bytes(MAX_PEER_PAYLOAD + 1), peer, 1.0) is None  # type: ignore[arg-type]
    c.bind(0x4000, peer)
    out = core.on_peer_datagram(c.allocation_id, bytes(MAX_PEER_PAYLOAD), peer, 1.0)  # type: ignore[arg-type]
    assert out is not None and parse_channel_data(out).payload == bytes(MAX_PEER_PAYLOAD)


_PEERS = [PEER, PEER2, Endpoint.from_text("10.0.0.1:5"), Endpoint.from_text("[2001:db8::9]:7000")]
_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["allocate", "allocate6", "even", "permit", "bind", "send", "chan", "peer", "refresh", "free", "gone", "tick"]
        ),
        st.integers(0, 2),  # which client
        st.integers(0, len(_PEERS) - 1),  # which peer
        st.integers(0, 700),  # how far the clock moves
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_OPS)
def test_random_sequences_keep_the_books_straight(ops: list) -> None:
    core = core_with(user_quota=2, source_quota=3, max_allocations=4, bandwidth=5000)
    clients = [Client(core, ref(f"198.51.100.{i + 1}:1", "tcp" if i == 2 else "udp", i)) for i in range(3)]
    now = 0.0
    open_ids: set[int] = set()
    for op, who, which, dt in ops:
        c, peer = clients[who], _PEERS[which]
        if op in ("allocate", "allocate6", "even"):
            attrs = [RequestedTransport(17)] + ([RequestedAddressFamily(6)] if op == "allocate6" else [])
            attrs += [EvenPort(True)] if op == "even" else []
            out = c.request(TurnMethod.ALLOCATE, attrs, now)
            if isinstance(out, AllocationWanted):
                ip = RELAY_IP if out.family == 4 else "2001:db8::1"
                relayed = Endpoint(ipaddress.ip_address(ip), next(_ports))
                if core.allocation_made(out, relayed, now, WALL) is not None:
                    open_ids.add(out.allocation_id)
                    c.allocation_id = out.allocation_id
                    if out.reserve_id is not None:
                        open_ids.add(out.reserve_id)
        elif op == "permit":
            c.request(TurnMethod.CREATE_PERMISSION, [XorPeerAddress(peer)], now)
        elif op == "bind":
            c.request(TurnMethod.CHANNEL_BIND, [ChannelNumber(0x4000 + which), XorPeerAddress(peer)], now)
        elif op == "send":
            c.send_indication(peer, b"x" * dt, now)
        elif op == "chan":
            c.send(encode_channel_data(0x4000 + which, b"y" * dt), now)
        elif op == "peer" and c.allocation_id is not None:
            core.on_peer_datagram(c.allocation_id, b"z" * dt, peer, now)
        elif op in ("refresh", "free"):  # a refresh to lifetime 0 frees, as "free" does
            out = c.request(TurnMethod.REFRESH, [Lifetime(dt if op == "refresh" else 0)], now)
            if isinstance(out, Deallocated):
                open_ids.discard(out.allocation_id)
        elif op == "gone":
            for aid in core.client_gone(c.ref):
                open_ids.discard(aid)
        else:
            now += dt
            for aid in core.expire(now):
                open_ids.discard(aid)
        # The books: quotas count exactly what lives (or waits for a socket).
        assert sum(core._by_user.values()) == core.live + len(core._pending)
        assert sum(core._by_source.values()) == core.live + len(core._pending)
        assert core.live <= 4 and max(core._by_user.values(), default=0) <= 2
        assert set(core._by_id) <= open_ids
    for aid in core.expire(now + 10_000):
        open_ids.discard(aid)
    assert core.live == 0 and not core._by_user and not core._by_source and not open_ids


_SEND_ATTRS = st.sampled_from(
    [
        XorPeerAddress(PEER),
        XorPeerAddress(PEER2),
        XorPeerAddress(Endpoint.from_text("10.0.0.1:5")),
        XorPeerAddress(Endpoint.from_text("[2001:db8::9]:7000")),
        Data(b"payload"),
        Data(b""),
        Data(b"odd"),
        DontFragment(),
        Lifetime(5),
        Username("x"),
    ]
)


@settings(max_examples=1500, deadline=None)
@given(
    attrs=st.lists(_SEND_ATTRS, max_size=4),
    fingerprint=st.booleans(),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=2),
)
def test_plain_send_indication_path_agrees_with_the_parser(attrs: list, fingerprint: bool, flips: list) -> None:
    from nattool.errors import ProtocolError

    core = core_with(bandwidth=0)
    c = Client(core, ref())
    c.allocate()
    c.permit(PEER)
    data = bytearray(StunMessage(MsgClass.INDICATION, TurnMethod.SEND, txid(), tuple(attrs)).to_wire(fingerprint=fingerprint))
    for pos, value in flips:
        if pos % len(data) >= 2:  # keep it a Send indication, or the fast path is not asked
            data[pos % len(data)] = value
    data = bytes(data)
    fast = core.on_client_message(data, c.ref, 1.0, WALL)
    try:
        msg = parse(data)
    except ProtocolError:
        slow = None
    else:
        slow = core._send_indication(msg, c.ref, 1.0) if (msg.msg_class, msg.method) == (MsgClass.INDICATION, 6) else None
    assert fast == slow


def test_plain_send_indications_take_the_fast_path() -> None:
    core = core_with(bandwidth=0)
    c = Client(core, ref())
    c.allocate()
    c.permit(PEER)
    for attrs in ([XorPeerAddress(PEER), Data(b"abc")], [Data(b"abc"), XorPeerAddress(PEER)]):
        for fp in (False, True):
            wire = StunMessage(MsgClass.INDICATION, TurnMethod.SEND, txid(), tuple(attrs)).to_wire(fingerprint=fp)
            assert core._plain_send_indication(wire, c.ref, 1.0) == ToPeer(c.allocation_id, PEER, b"abc")  # type: ignore[arg-type]


@pytest.mark.parametrize("module", ["turn", "turn_server", "turn_auth", "peer_policy", "stream_frames", "stun"])
def test_turn_modules_are_sans_io(module: str) -> None:
    import ast
    import importlib

    path = importlib.import_module(f"nattool.protocol.{module}").__file__
    assert path is not None
    tree = ast.parse(open(path, encoding="utf-8").read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"socket", "time", "random", "os", "asyncio", "secrets", "select", "selectors"}
