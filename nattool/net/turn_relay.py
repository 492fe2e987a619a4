"""The relayed sockets of `nattool serve`'s TURN server (RFC 8656).

Each allocation owns one UDP socket, bound to the relay address of its family
on a port of ``--relay-ports``. The event loop reads it with a reader
callback, as the tracker port is read; what arrives goes to the pure TURN core
(:class:`~nattool.protocol.turn_server.TurnCore`), which decides whether it reaches
the client (a permission or channel exists, the bandwidth allows) and how.

Between two allocations of this server (the common case: two peers relayed by one
server) a packet does not go out through the kernel and back: what one allocation
sends to another's relayed address is handed to that allocation's peer side at once,
from the sender's relayed address, as the kernel would have delivered it (the same
checks in the core decide; a test compares both ways).

Per packet, the readers follow routes: what the core decided once for a source and a
channel number (or a Send indication's peer, or a peer of a relayed socket), kept
until the earliest expiry it depends on or until the core's state changes
(:attr:`TurnCore.version`); only the length, the bandwidth cap, the header and the
counters are left per packet. Without a route the general path decides; a test
compares both (tests/test_turn_routes.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import random
import socket
import struct
import time
from collections import Counter
from typing import Any, Callable, Optional

from nattool.errors import NetworkError
from nattool.memo import bounded_memo
from nattool.protocol.endpoint import Endpoint, IPAddress
from nattool.protocol.turn_server import (
    AllocationWanted,
    ChannelRoute,
    ClientRef,
    Handover,
    PeerRoute,
    ToPeer,
    TurnCore,
)

DEFAULT_RELAY_PORTS = (49152, 65535)
# Where a UDP socket would send to, to learn the source address the kernel picks
# for a family (documentation addresses: connect() on UDP sends nothing).
_ROUTE_PROBES = {4: "192.0.2.1", 6: "2001:db8::1"}
RELAY_SOCKET_BUFFER = 1 << 20
PEER_DRAIN_BATCH = 64  # datagrams read from one relayed socket per wake-up
MAX_DATAGRAM = 65535
PEER_CACHE_MAX = 65_536  # (host, port) -> Endpoint entries remembered

# Sends bytes to one allocation's client (a UDP reply, or a frame on its TCP connection).
ClientSender = Callable[[bytes], None]
# A UDP client's socket address and the sendto of the tracker socket it writes to.
DatagramTarget = tuple[Callable[[bytes, Any], int], Any]

# How a route sends a ChannelData packet (see TurnRelay.learn_route).
ROUTE_NONE = 0  # no route: the general path decides
ROUTE_TO_CLIENT = 1  # handed over: sendto(header + payload, client address)
ROUTE_TO_STREAM = 2  # handed over to a TCP client: send(header + payload + padding)
ROUTE_TO_PEER = 3  # sendto(payload, peer address) from the sender's relayed socket
ROUTE_FROM_PEER = 4  # a PeerRoute: a peer's datagram to the client (ChannelData or a Data indication)
ROUTE_HANDOVER = 5  # a Send indication's payload to another allocation here, along its PeerRoute
# (until, how, send, address, header, sender, target): see learn_route.
Route = tuple[float, int, Any, Any, bytes, object, object]
NO_ROUTE: Route = (float("inf"), ROUTE_NONE, None, None, b"", None, None)
NO_PEER_ROUTE = PeerRoute(float("inf"), None, 0, False, 0, Endpoint(ipaddress.IPv4Address(0), 0), b"")
# A Send indication's route: (until, how, send, address, peer route, sender); see learn_send_route.
SendRoute = tuple[float, int, Any, Any, Optional[PeerRoute], object]
NO_SEND_ROUTE: SendRoute = (float("inf"), ROUTE_NONE, None, None, None, None)
_CHANNEL_HEAD = struct.Struct("!HH").pack  # ChannelData header: channel number, length
ROUTES_MAX = 16_384  # entries in one reader's route table; beyond, it is emptied
PEER_ROUTES_MAX = 1024  # entries in one allocation's table of peer routes; the same


def route_source(version: int) -> IPAddress | None:
    """The address the kernel would send from toward the Internet, for ``version``;
    None when that family has no route (or no stack)."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((_ROUTE_PROBES[version], 9))
            ip = ipaddress.ip_address(sock.getsockname()[0].split("%", 1)[0])
    except OSError:
        return None
    return None if ip.is_unspecified else ip


def relay_addresses(relay_ips: tuple[IPAddress, ...], hosts: list[IPAddress]) -> dict[int, IPAddress]:
    """The relay address per family: ``--relay-ip``, else the first concrete listening
    address of that family, else the route's source address (for a wildcard). A
    family the server does not listen on, or cannot route, has none (its
    allocations are refused with 440)."""
    out: dict[int, IPAddress] = {ip.version: ip for ip in relay_ips}
    for version in (4, 6):
        same = [ip for ip in hosts if ip.version == version]
        if version in out or not same:
            continue
        concrete = [ip for ip in same if not ip.is_unspecified]
        found = concrete[0] if concrete else route_source(version)
        if found is not None:
            out[version] = found
    return out


class RelayPortRange:
    """Binds relayed UDP sockets on free ports of one address within a range."""

    def __init__(self, ip: IPAddress, low: int, high: int, rng: random.Random | None = None) -> None:
        self.ip = hashed_ip(ip)  # every relayed endpoint of the range shares this object
        self.low = low
        self.high = high
        self._rng = rng or random.SystemRandom()
        self.family = socket.AF_INET if ip.version == 4 else socket.AF_INET6

    def check(self) -> None:
        """Raise NetworkError now when the relay address cannot be bound at all (not
        an address of this host, say), rather than at every Allocate."""
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.bind((str(self.ip), 0))
        except OSError as exc:
            raise NetworkError(f"cannot bind relayed sockets on {self.ip}: {exc.strerror or exc}") from None
        finally:
            sock.close()

    def bind(self, even: bool = False, with_next: bool = False) -> list[tuple[socket.socket, Endpoint]]:
        """A non-blocking socket on a free port of the range, tried from a random start
        (relayed ports are not predictable); ``even``: an even port; ``with_next``: the
        port after it too (RFC 8656 EVEN-PORT with R). Empty when no port is free (or
        the address cannot be bound any more)."""
        size = self.high - self.low + 1
        start = self._rng.randrange(size)
        try:
            for step in range(size):
                port = self.low + (start + step) % size
                if even and port % 2:
                    continue
                first = self._bind_port(port)
                if first is None:
                    continue
                if not with_next:
                    return [first]
                second = self._bind_port(port + 1) if port + 1 <= self.high else None
                if second is not None:
                    return [first, second]
                first[0].close()
        except OSError:
            pass  # the address went away: no port at all
        return []

    def _bind_port(self, port: int) -> tuple[socket.socket, Endpoint] | None:
        """The socket on ``port``; None when the port is taken (OSError for worse)."""
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((str(self.ip), port))
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return None
            raise
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, RELAY_SOCKET_BUFFER)
            except OSError:
                pass
        sock.setblocking(False)
        return sock, Endpoint(self.ip, port)


def _hashing_once(plain: type) -> type:
    """A subclass of ``plain`` (IPv4Address or IPv6Address) that hashes once: the relay
    looks its peers and relayed addresses up in several tables per packet, and
    ``ipaddress`` formats the address as hex text on every hash. Equal to, and hashed
    as, the plain address."""

    class HashedOnce(plain):  # type: ignore[misc, valid-type]
        __slots__ = ("_hash",)

        def __init__(self, address: object) -> None:
            super().__init__(address)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    HashedOnce.__name__ = HashedOnce.__qualname__ = f"HashedOnce{plain.__name__}"
    return HashedOnce


_HASHED_IPV4 = _hashing_once(ipaddress.IPv4Address)
_HASHED_IPV6 = _hashing_once(ipaddress.IPv6Address)


def hashed_ip(ip: IPAddress) -> IPAddress:
    """``ip`` as an address that hashes once (equal to ``ip``, and of its version)."""
    if isinstance(ip, (_HASHED_IPV4, _HASHED_IPV6)):
        return ip
    return _HASHED_IPV4(int(ip)) if ip.version == 4 else _HASHED_IPV6(str(ip))  # type: ignore[no-any-return]


def _peer_endpoint(addr: tuple[str, int]) -> Endpoint:
    endpoint = Endpoint.from_sockaddr(addr)
    return dataclasses.replace(endpoint, ip=hashed_ip(endpoint.ip))


class TurnRelay:
    """The relayed sockets of every allocation: binds them when the core wants one,
    reads them, sends what the core says to peers, closes them when the core is done."""

    def __init__(
        self,
        core: TurnCore,
        loop: asyncio.AbstractEventLoop,
        ranges: dict[int, RelayPortRange],
        sender_for: Callable[[ClientRef], Optional[ClientSender]],
        counters: Counter[str],
        datagram_target_for: Callable[[ClientRef], Optional[DatagramTarget]] = lambda ref: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self.loop = loop
        self.ranges = ranges
        self.sender_for = sender_for
        self.counters = counters
        self.clock = clock  # monotonic seconds for the core's decisions on peer datagrams
        self._sockets: dict[int, socket.socket] = {}  # allocation (or reservation) id -> socket
        self._senders: dict[int, ClientSender] = {}
        # Read relayed sockets: the endpoint the kernel names as their address (what a
        # peer sees as the source) -> (allocation id, IP version), and back.
        self._local: dict[Endpoint, tuple[int, int]] = {}
        self._source_of: dict[int, tuple[Endpoint, int]] = {}
        # Off: every packet between allocations goes through the kernel (the slow path,
        # for the test that compares both).
        self.local_fast_path = True
        self._handover = core.channel_data_handover
        self._sockaddrs, self._learn_sockaddr = bounded_memo(Endpoint.sockaddr, PEER_CACHE_MAX)
        self._peers, self._learn_peer = bounded_memo(_peer_endpoint, PEER_CACHE_MAX)
        self._datagram_target_for = datagram_target_for
        self._datagram_targets: dict[int, Optional[DatagramTarget]] = {}  # allocation id -> its client's
        # The route tables of the readers (ChannelData and Send indications) and of each
        # allocation's peers, good for one core version; off: every packet takes the
        # general path (for the test that compares both).
        self.routes_on = True
        self._route_tables: list[dict[Any, Any]] = []  # of Route, or of SendRoute
        self._peer_routes: dict[int, dict[Any, PeerRoute]] = {}  # allocation id -> peer (host, port) -> route
        self._routes_version = core.version

    @property
    def open_sockets(self) -> int:
        return len(self._sockets)

    def open(self, wanted: AllocationWanted, now: float, wall: float) -> Optional[bytes]:
        """Bind what ``wanted`` asks for; the reply for the client (None: none)."""
        core = self.core
        if wanted.reserved is not None:
            sock = self._sockets.get(wanted.allocation_id)
            if sock is None:
                return self._failed(wanted)
            relayed = wanted.reserved
        else:
            port_range = self.ranges.get(wanted.family)
            bound = port_range.bind(wanted.even_port, wanted.reserve_id is not None) if port_range else []
            if not bound:
                self.counters["turn_ports_exhausted"] += 1
                return self._failed(wanted)
            sock, relayed = bound[0]
            self._sockets[wanted.allocation_id] = sock
            if len(bound) > 1 and wanted.reserve_id is not None:
                self._sockets[wanted.reserve_id] = bound[1][0]  # held, not read, until taken or expired
        reply = core.allocation_made(wanted, relayed, now, wall)
        sender = self.sender_for(wanted.client)
        if reply is None or sender is None:
            self.close(wanted.allocation_id)
            if wanted.reserve_id is not None:
                self.close(wanted.reserve_id)
            return None
        self._senders[wanted.allocation_id] = sender
        self._peer_routes[wanted.allocation_id] = {}
        self._datagram_targets[wanted.allocation_id] = self._datagram_target_for(wanted.client)
        self.loop.add_reader(sock.fileno(), self._drain_peer, wanted.allocation_id, sock)
        source = Endpoint.from_sockaddr(sock.getsockname()[:2])
        if source == relayed:
            source = relayed  # the core's own object: its tables find it by identity
        self._local[source] = (wanted.allocation_id, source.ip.version)
        self._source_of[wanted.allocation_id] = (source, source.ip.version)
        return reply

    def _failed(self, wanted: AllocationWanted) -> Optional[bytes]:
        self.close(wanted.allocation_id)
        return self.core.allocation_failed(wanted)

    def close(self, allocation_id: int) -> None:
        sock = self._sockets.pop(allocation_id, None)
        self._senders.pop(allocation_id, None)
        self._datagram_targets.pop(allocation_id, None)
        self._peer_routes.pop(allocation_id, None)
        self.forget_routes()
        source = self._source_of.pop(allocation_id, None)
        if source is not None:
            del self._local[source[0]]
        if sock is not None:
            try:
                self.loop.remove_reader(sock.fileno())
            except (ValueError, OSError):
                pass
            sock.close()

    def close_all(self) -> None:
        for allocation_id in list(self._sockets):
            self.close(allocation_id)

    # -- routes: ChannelData along what the core decided once -----------------------
    def route_table(self) -> dict[Any, Any]:
        """A new table of routes (Route or SendRoute) for one reader (emptied with the others)."""
        table: dict[Any, Any] = {}
        self._route_tables.append(table)
        return table

    def check_routes(self) -> None:
        """Empty the route tables when the core's version moved since they were filled.
        The readers call it before they use a table, and after each request they pass
        to the core."""
        if self._routes_version != self.core.version:
            self.forget_routes()

    def route_kinds(self) -> set[int]:
        """The kinds of route held now (ROUTE_FROM_PEER for a peer's), for the tests."""
        kinds = {route[1] for table in self._route_tables for route in table.values()}  # type: ignore[attr-defined]
        if any(r.allocation is not None for routes in self._peer_routes.values() for r in routes.values()):
            kinds.add(ROUTE_FROM_PEER)
        return kinds

    def forget_routes(self) -> None:
        for table in self._route_tables:
            table.clear()
        for routes in self._peer_routes.values():
            routes.clear()
        self._routes_version = self.core.version

    def learn_route(self, table: dict[Any, Route], key: Any, client: ClientRef, number: int, now: float) -> Route:
        """The route of ChannelData from ``client`` on channel ``number`` (remembered in
        ``table`` under ``key``): ``(until, how, send, address, header, sender, target)``,
        valid while ``now < until`` and the core's version stays. ``how``:
        :data:`ROUTE_TO_CLIENT` (``send`` is a tracker socket's sendto, ``address`` the
        target client's, ``header`` the 2-byte channel number it gets),
        :data:`ROUTE_TO_STREAM` (``send`` takes the padded message),
        :data:`ROUTE_TO_PEER` (``send`` is the relayed socket's sendto, ``address`` the
        peer's), :data:`ROUTE_NONE` (the general path, :meth:`channel_data`, decides).
        ``sender`` and ``target`` are for :meth:`TurnCore.spend`."""
        self.check_routes()
        if len(table) >= ROUTES_MAX:
            table.clear()
        route = table[key] = self._route(client, number, now)
        return route

    def _route(self, client: ClientRef, number: int, now: float) -> Route:
        if not self.routes_on:
            return NO_ROUTE
        found: Optional[ChannelRoute] = self.core.channel_route(client, number, now, self.local_fast_path)
        if found is None:
            return NO_ROUTE
        until, sender, target, allocation_id, peer, back, stream = found
        if target is None:
            sock = self._sockets.get(allocation_id)
            local = self._local.get(peer)
            if sock is None or (local is not None and self.local_fast_path):
                return NO_ROUTE  # closed; or another family's relayed address here (to_peer decides)
            return (until, ROUTE_TO_PEER, sock.sendto, self._learn_sockaddr(peer), b"", sender, None)
        head = back.to_bytes(2, "big")
        if stream:
            send = self._senders.get(allocation_id)
            if send is None:
                return NO_ROUTE
            return (until, ROUTE_TO_STREAM, send, None, head, sender, target)
        udp = self._datagram_targets.get(allocation_id)
        if udp is None:
            return NO_ROUTE
        return (until, ROUTE_TO_CLIENT, udp[0], udp[1], head, sender, target)

    def routed(self, route: Route, data: bytes, now: float) -> bool:
        """Relay ChannelData along ``route`` (as learned now, or learned earlier and not
        expired): what :meth:`channel_data` would do. False: there is no route (the
        general path decides)."""
        until, how, send, address, head, sender, target = route
        if how == ROUTE_NONE:
            return False
        n = len(data)
        length = (data[2] << 8) | data[3] if n >= 4 else -1
        if not 0 <= n - 4 - length <= 3:
            return True  # a bad length: dropped
        core = self.core
        capped = core.config.bandwidth
        if capped and not core.spend(sender, length, now):
            return True
        core.count_relayed(1, length, 0, 0)
        if target is None:
            try:
                send(data[4 : 4 + length], address)
            except OSError:
                self.counters["turn_send_error"] += 1
            return True
        if capped and not core.spend(target, length, now):
            return True
        core.count_relayed(0, 0, 1, length)
        if how == ROUTE_TO_STREAM:
            send(head + data[2 : 4 + length] + bytes(-length % 4))
            return True
        try:
            send(head + data[2 : 4 + length], address)
        except OSError:
            self.counters["send_error"] += 1
        return True

    def learn_send_route(
        self, table: dict[Any, SendRoute], key: Any, client: ClientRef, ip: int, port: int, now: float
    ) -> SendRoute:
        """The route of plain Send indications (:meth:`TurnCore.send_indication_parts`)
        from ``client`` to the IPv4 peer ``ip``:``port`` (remembered in ``table`` under
        ``key``): ``(until, how, send, address, peer route, sender)``, valid while ``now <
        until`` and the core's version stays. ``how``: :data:`ROUTE_TO_PEER` (``send`` is
        the relayed socket's sendto, ``address`` the peer's), :data:`ROUTE_HANDOVER`
        (the peer is the relayed address of another allocation here: ``send`` is its
        client's sender, the peer route says how), :data:`ROUTE_NONE` (the general
        path decides). What :meth:`to_peer` does with the core's ToPeer, decided once."""
        self.check_routes()
        if len(table) >= ROUTES_MAX:
            table.clear()
        route = table[key] = self._send_route(client, ip, port, now)
        return route

    def _send_route(self, client: ClientRef, ip: int, port: int, now: float) -> SendRoute:
        found = self.core.send_route(client, ip, port, now) if self.routes_on else None
        if found is None:
            return NO_SEND_ROUTE
        until, sender, peer = found
        allocation_id = sender.id  # type: ignore[attr-defined]
        sock = self._sockets.get(allocation_id)
        if sock is None:
            return NO_SEND_ROUTE
        local = self._local.get(peer)
        if local is not None and self.local_fast_path:
            source = self._source_of.get(allocation_id)
            send = self._senders.get(local[0])
            if source is not None and send is not None and source[1] == local[1]:
                back = self.core.peer_route(local[0], source[0], now)
                if back is None:
                    return NO_SEND_ROUTE
                return (min(until, back.until), ROUTE_HANDOVER, send, None, back, sender)
        return (until, ROUTE_TO_PEER, sock.sendto, self._learn_sockaddr(peer), None, sender)

    def sent(self, route: SendRoute, payload: bytes, now: float) -> bool:
        """Relay a Send indication's payload along ``route`` (as learned now, or learned
        earlier and not expired): what the core and :meth:`to_peer` would do. False:
        there is no route (the general path decides)."""
        until, how, send, address, back, sender = route
        if how == ROUTE_NONE:
            return False
        core = self.core
        n = len(payload)
        if core.config.bandwidth and not core.spend(sender, n, now):
            return True
        core.count_relayed(1, n, 0, 0)
        if how == ROUTE_HANDOVER:
            self._to_client(back, payload, now, send)  # type: ignore[arg-type]
            return True
        try:
            send(payload, address)
        except OSError:
            self.counters["turn_send_error"] += 1
        return True

    def channel_data(self, data: bytes, client: ClientRef, now: float) -> None:
        """ChannelData from a client, to its peer: handed to the allocation whose
        relayed address that is, when it is one of this server's (the core decides as
        :meth:`to_peer` and :meth:`_drain_peer` would, in one step)."""
        if not self.local_fast_path:
            out: ToPeer | Handover | None = self.core.channel_data_from_client(data, client, now)
        else:
            out = self._handover(data, client, now)
            if out.__class__ is Handover:
                send = self._senders.get(out[0])  # type: ignore[index]
                if send is not None:  # else its socket is closed: nobody would read it
                    send(out[1])  # type: ignore[index, arg-type]
                return
        if out is not None:
            self.to_peer(out, now)  # type: ignore[arg-type]

    def to_peer(self, out: ToPeer, now: float) -> None:
        sock = self._sockets.get(out.allocation_id)
        if sock is None:
            return
        local = self._local.get(out.peer)
        if local is not None and self.local_fast_path:
            # The relayed address of allocation local[0] of this server: what reading it
            # there would do (_drain_peer), without the kernel. A socket cannot send to
            # the other family's addresses: those go to the kernel, as for any peer.
            source = self._source_of.get(out.allocation_id)
            send = self._senders.get(local[0])
            if source is not None and send is not None and source[1] == local[1]:
                reply = self.core.on_peer_datagram(local[0], out.payload, source[0], now)
                if reply is not None:
                    send(reply)
                return
        addr = self._sockaddrs.get(out.peer) or self._learn_sockaddr(out.peer)
        try:
            sock.sendto(out.payload, addr)
        except OSError:
            self.counters["turn_send_error"] += 1

    def _drain_peer(self, allocation_id: int, sock: socket.socket) -> None:
        """Datagrams from peers on one relayed socket, to the allocation's client: along
        the peer's route (:meth:`_learn_peer_route`), else as the core decides (a test
        compares both)."""
        recvfrom = sock.recvfrom
        on_peer = self.core.on_peer_datagram
        send = self._senders.get(allocation_id)
        routes = self._peer_routes.get(allocation_id)
        if send is None or routes is None:
            return
        self.check_routes()
        to_client = self._to_client
        known = self._peers.get
        learn = self._learn_peer
        now = self.clock()
        for _ in range(PEER_DRAIN_BATCH):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters["turn_socket_error"] += 1  # an ICMP error for an earlier send
                continue
            route = routes.get(addr)
            if route is None or now >= route[0]:
                route = self._learn_peer_route(routes, allocation_id, addr, now)
            if route[1] is not None:  # valid now, as learned now
                to_client(route, data, now, send)
                continue
            try:
                peer = known(addr) or learn(addr)
            except ValueError:
                continue
            out = on_peer(allocation_id, data, peer, now)
            if out is not None:
                send(out)

    def _to_client(self, route: PeerRoute, data: bytes, now: float, send: ClientSender) -> None:
        """A peer's datagram along its route to the allocation's client: what
        :meth:`TurnCore.on_peer_datagram` would make of it, sent."""
        until, allocation, number, stream, limit, peer, xpa = route
        core = self.core
        n = len(data)
        if n > limit or (core.config.bandwidth and not core.spend(allocation, n, now)):
            return
        core.count_relayed(0, 0, 1, n)
        if not number:
            send(core.data_indication(allocation, peer, data, xpa))  # type: ignore[arg-type]
        elif stream and n % 4:
            send(_CHANNEL_HEAD(number, n) + data + bytes(-n % 4))
        else:
            send(_CHANNEL_HEAD(number, n) + data)

    def _learn_peer_route(self, routes: dict[Any, PeerRoute], allocation_id: int, addr: Any, now: float) -> PeerRoute:
        """The route of datagrams from ``addr`` on the relayed socket of
        ``allocation_id``: the core's :class:`PeerRoute` (remembered in ``routes``), or
        one without an allocation, not remembered (the core decides each datagram:
        what it drops may come from any number of addresses)."""
        if not self.routes_on:
            return NO_PEER_ROUTE
        try:
            peer = self._peers.get(addr) or self._learn_peer(addr)
        except ValueError:
            return NO_PEER_ROUTE
        route = self.core.peer_route(allocation_id, peer, now)
        if route is None:
            return NO_PEER_ROUTE
        if len(routes) >= PEER_ROUTES_MAX:
            routes.clear()
        routes[addr] = route
        return route
