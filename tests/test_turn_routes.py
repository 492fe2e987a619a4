"""ChannelData along routes (the serving loop's per-packet path) against the general
path: one scripted session through a real `TrackerServer` on loopback sockets, once
with routes and once without, must give every client and peer the same bytes and
the core the same counters. The session covers what can change a route: a missing
permission back, a channel back or not (Data indication), padding and bad lengths,
a peer through the kernel, a TCP client, the bandwidth cap, an expired permission
under a live channel, an expired channel and its rebinding to another peer, an
allocation's Refresh (shorter and to 0), and a target allocation that expired.

The TURN clock is the test's (``TrackerServer.turn_clock``): time moves only when the
session says so, so both runs see the same expiries and the same bandwidth refill."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import socket
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from conftest import free_udp_tcp_port

from nattool.net.server import ServerConfig, TrackerServer
from nattool.net.turn_relay import ROUTE_FROM_PEER, ROUTE_HANDOVER, ROUTE_TO_CLIENT, ROUTE_TO_PEER, ROUTE_TO_STREAM
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.peer_policy import PeerPolicy
from nattool.protocol.stream_frames import ChannelDataFrame, StreamDeframer, StunFrame
from nattool.protocol.stun import (
    Attribute,
    ErrorCode,
    MsgClass,
    Nonce,
    Realm,
    StunMessage,
    Username,
    long_term_key,
    parse,
)
from nattool.protocol.turn import (
    ChannelNumber,
    Data,
    Lifetime,
    RequestedTransport,
    TurnMethod,
    XorPeerAddress,
    XorRelayedAddress,
    encode_channel_data,
)
from nattool.protocol.turn_server import TurnConfig
from nattool.store.base import StoreLimits
from nattool.store.factory import open_store

PEER_IP = "127.0.0.5"  # a peer through the kernel (--allow-peer), not a relayed address
# A peer at the relayed addresses' IP (--allow-peer): reachable until a permission for a
# relayed address at that IP makes the permission strict (relayed addresses only).
PEER_AT_RELAY_IP = "127.0.0.1"
BANDWIDTH = 100_000  # bytes per second per allocation; the bucket holds as much
_txids = itertools.count(1)


class _Client:
    """A TURN client of the session: a UDP socket or a TCP connection, the 401 dance,
    and everything the server sent it, normalized (no random ports or nonces)."""

    def __init__(self, name: str, sock: socket.socket, server: tuple[str, int], stream: bool) -> None:
        self.name = name
        self.sock = sock
        self.server = server
        self.stream = stream
        self.key = long_term_key("alice", "routes", "pw")
        self.nonce = ""
        self.relayed: Optional[Endpoint] = None
        self.deframer = StreamDeframer()
        self.replies: list[StunMessage] = []

    def send(self, data: bytes) -> None:
        if self.stream:
            self.sock.sendall(data)
        else:
            self.sock.sendto(data, self.server)

    def received(self) -> list[bytes]:
        """What arrived since the last call: datagrams, or frames (STUN and ChannelData)."""
        out: list[bytes] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return out
            if not self.stream:
                out.append(data)
                continue
            for frame in self.deframer.feed(data):
                assert isinstance(frame, (StunFrame, ChannelDataFrame))
                out.append(frame.data)

    async def request(self, method: int, attrs: list, settle: "_Session") -> StunMessage:  # type: ignore[type-arg]
        """A signed request (challenged once for a nonce, and again when it went stale)."""
        for _ in range(3):
            auth = [Username("alice"), Realm("routes"), Nonce(self.nonce)] if self.nonce else []
            msg = StunMessage(MsgClass.REQUEST, method, next(_txids).to_bytes(12, "big"), (*attrs, *auth))
            self.send(msg.to_wire(integrity_key=self.key if self.nonce else None, fingerprint=True))
            for _ in range(200):
                await settle.settle()
                if self.replies:
                    break
            reply = self.replies.pop()
            err = reply.get(ErrorCode)
            if isinstance(err, ErrorCode) and err.code in (401, 438) and isinstance(reply.get(Nonce), Nonce):
                self.nonce = reply.get(Nonce).text  # type: ignore[union-attr]
                continue
            return reply
        raise AssertionError(f"{self.name}: no answer but challenges")

    async def ok(self, method: int, attrs: list, settle: "_Session") -> StunMessage:  # type: ignore[type-arg]
        reply = await self.request(method, attrs, settle)
        assert reply.msg_class == MsgClass.SUCCESS, (self.name, reply)
        return reply


class _Session:
    """The server in this event loop, its clock, the clients, the peer, and the log of
    everything each of them received (in the order the session settled it)."""

    def __init__(self, server: TrackerServer, clients: dict[str, _Client], peers: list[socket.socket]) -> None:
        self.server = server
        self.clients = clients
        self.peers = peers
        self.log: list[tuple[str, object]] = []
        self.roles: dict[Endpoint, str] = {}

    async def settle(self) -> None:
        """Let the server read what was sent and the clients read its answers."""
        for _ in range(8):
            await asyncio.sleep(0.005)
        for client in self.clients.values():
            for data in client.received():
                if 0x40 <= data[0] <= 0x7F:
                    self.log.append((client.name, ("channel", data)))
                    continue
                msg = parse(data)
                if msg.msg_class == MsgClass.INDICATION:
                    peer, payload = msg.get(XorPeerAddress), msg.get(Data)
                    assert isinstance(peer, XorPeerAddress) and isinstance(payload, Data)
                    role = self.roles[peer.endpoint]
                    self.log.append((client.name, ("data", msg.transaction_id, role, payload.payload)))
                else:
                    client.replies.append(msg)
                    err = msg.get(ErrorCode)
                    self.log.append((client.name, ("reply", msg.msg_class, msg.method, err.code if err else None)))
        for peer in self.peers:
            while True:
                try:
                    data, addr = peer.recvfrom(65536)
                except BlockingIOError:
                    break
                self.log.append(("peer", (self.roles[Endpoint.from_sockaddr(addr)], data)))

    def advance(self, seconds: float) -> None:
        self.now += seconds

    now = 0.0


@asynccontextmanager
async def _serving() -> AsyncIterator[TrackerServer]:
    port = free_udp_tcp_port()
    turn = TurnConfig(
        realm="routes",
        users={"alice": "pw"},
        bandwidth=BANDWIDTH,
        user_quota=10,
        source_quota=10,
        peer_policy=PeerPolicy.from_text(allow=[f"{PEER_IP}/32", f"{PEER_AT_RELAY_IP}/32"]),
    )
    config = ServerConfig(hosts=("127.0.0.1",), port=port, rate_limit=0, turn=turn, tcp=True)
    server = TrackerServer(config, open_store("memory", StoreLimits()))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _session(routes: bool) -> tuple[list[tuple[str, object]], dict[str, int], set[int]]:
    """The scripted session; what everyone received, the TURN counters, and the kinds
    of route the UDP reader held at some point."""
    kinds: set[int] = set()
    async with _serving() as server:
        assert server.relay is not None and server.turn is not None
        server.relay.routes_on = routes
        addr = ("127.0.0.1", server.config.port)
        socks: list[socket.socket] = []
        try:
            clients: dict[str, _Client] = {}
            for name, ip in (("x", "127.0.0.2"), ("y", "127.0.0.3"), ("v", "127.0.0.7"), ("w", "127.0.0.6")):  # W later
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((ip, 0))
                clients[name] = _Client(name, sock, addr, stream=False)
            tcp = socket.create_connection(addr, timeout=5, source_address=("127.0.0.4", 0))
            clients["z"] = _Client("z", tcp, addr, stream=True)
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            peer.bind((PEER_IP, 0))
            near = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # receives into the same log
            near.bind((PEER_AT_RELAY_IP, 0))
            socks += [c.sock for c in clients.values()] + [peer, near]
            for sock in socks:
                sock.setblocking(False)
            s = _Session(server, clients, [peer, near])
            s.now = 1_000_000.0  # far beyond the real clock: housekeeping never sweeps
            server.turn_clock = lambda: s.now
            peer_ep = Endpoint.from_sockaddr(peer.getsockname())
            near_ep = Endpoint.from_sockaddr(near.getsockname())
            s.roles[peer_ep] = "P"
            s.roles[near_ep] = "N"
            x, y, z, v, w = clients["x"], clients["y"], clients["z"], clients["v"], clients["w"]

            async def allocate(c: _Client) -> None:
                reply = await c.ok(TurnMethod.ALLOCATE, [RequestedTransport(17)], s)
                relayed = reply.get(XorRelayedAddress)
                assert isinstance(relayed, XorRelayedAddress)
                c.relayed = relayed.endpoint
                s.roles[c.relayed] = c.name.upper()

            for c in (x, y, z, v):
                await allocate(c)

            async def channel(c: _Client, number: int, payload: bytes, raw: Optional[bytes] = None) -> None:
                c.send(raw if raw is not None else encode_channel_data(number, payload, stream=c.stream))
                await s.settle()
                kinds.update(server.relay.route_kinds())  # type: ignore[union-attr]

            async def indication(c: _Client, to: Endpoint, payload: bytes, shape: str = "uclient") -> None:
                """A Send indication: DATA first and FINGERPRINT (as coturn's client
                sends them), the peer first without FINGERPRINT, or a bad FINGERPRINT."""
                attrs: tuple[Attribute, ...] = (Data(payload), XorPeerAddress(to))
                if shape == "peer first":
                    attrs = attrs[::-1]
                msg = StunMessage(MsgClass.INDICATION, TurnMethod.SEND, next(_txids).to_bytes(12, "big"), attrs)
                data = msg.to_wire(fingerprint=shape != "peer first")
                if shape == "bad fingerprint":
                    data = data[:-1] + bytes([data[-1] ^ 1])
                c.send(data)
                await s.settle()
                kinds.update(server.relay.route_kinds())  # type: ignore[union-attr]

            async def from_peer(c: _Client, payload: bytes) -> None:
                assert c.relayed
                peer.sendto(payload, c.relayed.sockaddr())
                await s.settle()
                kinds.update(server.relay.route_kinds())  # type: ignore[union-attr]

            async def bind(c: _Client, number: int, peer_of: Endpoint) -> StunMessage:
                return await c.request(TurnMethod.CHANNEL_BIND, [ChannelNumber(number), XorPeerAddress(peer_of)], s)

            assert x.relayed and y.relayed and z.relayed
            # X to Y: Y has no permission for X yet (dropped), then a permission and no
            # channel back (a Data indication), then a channel back.
            await bind(x, 0x4001, y.relayed)
            await channel(x, 0x4001, b"before Y permits X")
            await indication(x, y.relayed, b"send before Y permits X")
            await y.ok(TurnMethod.CREATE_PERMISSION, [XorPeerAddress(x.relayed)], s)
            await channel(x, 0x4001, b"as a Data indication")
            await indication(x, y.relayed, b"send as a Data indication")
            await indication(x, y.relayed, b"send as a Data indication, peer first", "peer first")
            await bind(y, 0x4002, x.relayed)
            await indication(x, y.relayed, b"send on Y's channel")
            await indication(x, y.relayed, b"send with a bad fingerprint: refused", "bad fingerprint")
            for n in range(5):
                await indication(x, y.relayed, b"send %d" % n)
                await channel(x, 0x4001, b"to Y %d" % n)
                await channel(y, 0x4002, b"to X %d" % n)
            await channel(x, 0x4001, b"", raw=encode_channel_data(0x4001, b"")[:4])  # empty payload
            await channel(x, 0x4001, b"", raw=encode_channel_data(0x4001, b"abcde") + b"\0\0\0")  # padded
            await channel(x, 0x4001, b"", raw=encode_channel_data(0x4001, b"abcde") + b"\0\0\0\0")  # bad length
            await channel(x, 0x4001, b"", raw=encode_channel_data(0x4001, b"abcde")[:-1])  # short
            await channel(x, 0x4001, b"", raw=b"\x40\x01\x00")  # no header
            await channel(x, 0x4009, b"on a channel never bound")
            # X to the peer through the kernel, and back on X's channel.
            await from_peer(x, b"from P, before X's channel")  # no permission: dropped
            await bind(x, 0x4003, peer_ep)
            await channel(x, 0x4003, b"to P")
            await indication(x, peer_ep, b"send to P")
            await indication(v, peer_ep, b"send to P without a permission: refused")
            for n in range(3):
                await from_peer(x, b"from P %d" % n)
            # V to N, a peer at the relayed addresses' IP, until V's permission for that
            # IP becomes strict (a permission for Y's relayed address): then refused.
            assert y.relayed.ip == near_ep.ip
            await bind(v, 0x4001, near_ep)
            await channel(v, 0x4001, b"to N")
            await v.ok(TurnMethod.CREATE_PERMISSION, [XorPeerAddress(y.relayed)], s)
            await channel(v, 0x4001, b"to N, refused now")
            # X to Z (TCP): padded frames; Z back to X.
            await bind(x, 0x4004, z.relayed)
            await bind(z, 0x4005, x.relayed)
            await channel(x, 0x4004, b"to Z, 3 bytes of padding")
            await channel(z, 0x4005, b"to X from TCP")
            await from_peer(z, b"from P to Z, no permission")
            await z.ok(TurnMethod.CREATE_PERMISSION, [XorPeerAddress(peer_ep)], s)
            await from_peer(z, b"from P to Z, no channel: a Data indication")
            await bind(z, 0x400A, peer_ep)
            await from_peer(z, b"from P to Z, padded")
            # The bandwidth cap: X's bucket (BANDWIDTH bytes) runs out, refills with time.
            await channel(x, 0x4001, b"a" * 60_000)
            await channel(x, 0x4001, b"b" * 50_000)  # over X's cap
            await from_peer(x, b"f" * 50_000)  # over X's cap
            await indication(x, y.relayed, b"j" * 50_000)  # over X's cap
            await channel(z, 0x4005, b"i" * 45_000)  # from TCP, over X's cap
            s.advance(0.6)  # 60 kB back in each bucket
            await channel(y, 0x4002, b"c" * 50_000)
            await channel(x, 0x4001, b"d" * 50_000)
            await channel(x, 0x4001, b"e" * 30_000)  # over X's cap again
            # Permissions expire after 300 s; live channels stand for them (600 s).
            s.advance(400)
            await channel(z, 0x4005, b"g" * 60_000)  # from TCP: Z's bucket, then X's
            await channel(z, 0x4005, b"h" * 45_000)  # over Z's cap
            await channel(x, 0x4001, b"after the permission, before the channel")
            await indication(x, y.relayed, b"send after the permission expired: refused")
            await indication(x, peer_ep, b"send to P after the permission expired: refused")
            await channel(y, 0x4002, b"back, the same")
            await x.ok(TurnMethod.REFRESH, [Lifetime(3000)], s)
            await y.ok(TurnMethod.REFRESH, [Lifetime(3000)], s)
            await channel(x, 0x4004, b"to Z after the permission, before the channel")
            await channel(z, 0x4005, b"from Z after the permission, before the channel")
            await from_peer(x, b"from P, after the permission, before the channel")
            s.advance(250)  # the channels bound first have expired
            await channel(x, 0x4001, b"after the channel expired")
            await channel(y, 0x4002, b"back, the same")
            await from_peer(x, b"from P, after the channel expired")
            await channel(x, 0x4004, b"to Z after the channel expired")
            await channel(z, 0x4005, b"from Z after the channel expired")
            # Y shortens its lifetime, X and Y bind again, then Y deallocates.
            await y.ok(TurnMethod.REFRESH, [Lifetime(600)], s)
            await bind(x, 0x4007, y.relayed)
            await bind(y, 0x4008, x.relayed)
            await channel(x, 0x4007, b"to Y again")
            await indication(x, y.relayed, b"send to Y again")
            await channel(y, 0x4008, b"to X again")
            await y.ok(TurnMethod.REFRESH, [Lifetime(0)], s)
            await channel(x, 0x4007, b"to Y, deallocated")
            await indication(x, y.relayed, b"send to Y, deallocated")
            # W: X rebinds 0x4001 to it (a number whose binding expired may go
            # elsewhere), W binds back; later X refreshes the channel but W's
            # allocation (600 s) expires.
            await allocate(w)
            assert w.relayed
            await w.ok(TurnMethod.CREATE_PERMISSION, [XorPeerAddress(x.relayed)], s)
            assert (await bind(x, 0x4001, w.relayed)).msg_class == MsgClass.SUCCESS
            await bind(w, 0x4006, x.relayed)
            await channel(x, 0x4001, b"to W, rebound")
            await channel(w, 0x4006, b"W back to X")
            s.advance(300)
            assert (await bind(x, 0x4001, w.relayed)).msg_class == MsgClass.SUCCESS
            await channel(x, 0x4001, b"to W, channel refreshed")
            s.advance(350)
            await channel(x, 0x4001, b"to W, expired")
            await indication(x, w.relayed, b"send to W, expired")
            await channel(w, 0x4006, b"from W, expired")
            return s.log, dataclasses.asdict(server.turn.counters), kinds
        finally:
            for sock in socks:
                sock.close()


def test_channel_data_routes_equal_the_general_path() -> None:
    """The same bytes to every client and peer, the same refusals, the same counters,
    with routes and without; and with routes, every kind of route was taken."""
    fast, fast_counters, fast_kinds = asyncio.run(_session(routes=True))
    slow, slow_counters, slow_kinds = asyncio.run(_session(routes=False))
    assert fast == slow
    assert fast_counters == slow_counters
    assert fast_kinds >= {ROUTE_TO_CLIENT, ROUTE_TO_PEER, ROUTE_TO_STREAM, ROUTE_FROM_PEER, ROUTE_HANDOVER}
    assert slow_kinds <= {0}
    # The session is not vacuous: it relayed every way, and refused for bandwidth,
    # permission and expiry (what was refused names itself, or is one repeated byte).
    delivered = [entry for entry in fast if entry[0] != "peer" and entry[1][0] in ("channel", "data")]
    assert len(delivered) >= 20
    assert fast_counters["bandwidth_drops"] >= 2 and fast_counters["permission_drops"] >= 1
    for who, number, payload in (
        ("y", 0x4002, b"to Y 4"),
        ("z", 0x4005, b"to Z, 3 bytes of padding"),
        ("x", 0x4004, b"g" * 60_000),
        ("y", 0x4008, b"send to Y again"),
        ("x", 0x4003, b"from P 2"),
        ("z", 0x400A, b"from P to Z, padded"),
        ("w", 0x4006, b"to W, rebound"),
    ):
        assert (who, ("channel", encode_channel_data(number, payload))) in fast
    for sender, payload in (("X", b"send to P"), ("X", b"to P"), ("V", b"to N")):
        assert ("peer", (sender, payload)) in fast
    data_indications = [entry[1] for entry in fast if entry[1][0] == "data"]
    assert sum(d[3].startswith(b"send as a Data") for d in data_indications) == 2  # type: ignore[index]
    assert any(d[3].startswith(b"from P to Z, no channel") for d in data_indications)  # type: ignore[index]
    refused = (b"refused", b"send before", b"before X", b"no permission", b"fff", b"hhh", b"iii", b"jjj")
    assert not any(word in repr(entry).encode() for entry in fast for word in refused)
    gone = (b"expired", b"deallocated")
    assert not any(word in repr(entry).encode() for entry in fast if entry[0] in ("w", "y") for word in gone)
    assert not any(b"channel expired" in repr(entry).encode() for entry in fast if entry[0] == "x")
