"""The relayed sockets of `nattool serve`'s TURN server (RFC 8656).

Each allocation owns one UDP socket, bound to the relay address of its family
(DESIGN24 W6) on a port of ``--relay-ports``. The event loop reads it with a reader
callback, as the tracker port is read; what arrives goes to the pure TURN core,
which decides whether it reaches the client (a permission exists) and how
(Data indication or ChannelData).
"""

from __future__ import annotations

import errno
import ipaddress
import random
import socket
from dataclasses import dataclass
from typing import Callable

from nattool.errors import NetworkError
from nattool.protocol.endpoint import Endpoint

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_RELAY_PORTS = (49152, 65535)
# Where a UDP socket would send to, to learn the source address the kernel picks
# for a family (documentation addresses: connect() on UDP sends nothing).
_ROUTE_PROBES = {4: "192.0.2.1", 6: "2001:db8::1"}
RELAY_SOCKET_BUFFER = 1 << 20


@dataclass(frozen=True, slots=True)
class TurnSettings:
    """The TURN relay's operator settings (``serve`` flags, checked)."""

    realm: str = "nattool"
    users: tuple[tuple[str, str], ...] = ()  # --turn-user NAME:PASSWORD
    rest_secret: str | None = None  # --turn-secret
    group_relay: bool = False  # --relay: credentials handed out by //relay/<group>
    relay_ips: tuple[IPAddress, ...] = ()  # --relay-ip, at most one per family
    ports: tuple[int, int] = DEFAULT_RELAY_PORTS
    allow_peers: tuple[IPNetwork, ...] = ()
    deny_peers: tuple[IPNetwork, ...] = ()
    max_allocations: int = 1000
    user_quota: int = 10
    source_quota: int = 10
    bandwidth: float = 1_000_000.0  # bytes/s per allocation; 0: unlimited

    @property
    def enabled(self) -> bool:
        """TURN is on with at least one way to authenticate."""
        return bool(self.users or self.rest_secret or self.group_relay)


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


def relay_addresses(settings: TurnSettings, hosts: tuple[str, ...]) -> dict[int, IPAddress]:
    """The relay address per family: ``--relay-ip``, else the first concrete
    ``--host`` of that family, else the route's source address. A family with none
    of these has no relayed addresses (its allocations are refused)."""
    out: dict[int, IPAddress] = {ip.version: ip for ip in settings.relay_ips}
    listened = [ipaddress.ip_address(h) for h in hosts] or [ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")]
    for version in (4, 6):
        if version in out:
            continue
        same = [ip for ip in listened if ip.version == version]
        if not same:
            continue  # not listening on that family: no relay there either
        concrete = [ip for ip in same if not ip.is_unspecified]
        found = concrete[0] if concrete else route_source(version)
        if found is not None:
            out[version] = found
    return out


class RelayPortRange:
    """Binds relayed UDP sockets on free ports of one address within a range."""

    def __init__(self, ip: IPAddress, low: int, high: int, rng: random.Random | None = None) -> None:
        self.ip = ip
        self.low = low
        self.high = high
        self._rng = rng or random.SystemRandom()
        self.family = socket.AF_INET if ip.version == 4 else socket.AF_INET6

    def bind(self) -> tuple[socket.socket, Endpoint] | None:
        """A non-blocking socket on a free port of the range, from a random start
        (relayed ports are not predictable), or None when every port is taken."""
        size = self.high - self.low + 1
        start = self._rng.randrange(size)
        for step in range(size):
            port = self.low + (start + step) % size
            sock = socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                if self.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((str(self.ip), port))
            except OSError as exc:
                sock.close()
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise NetworkError(f"cannot bind a relayed socket on {Endpoint(self.ip, port)}: {exc.strerror or exc}") from None
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, RELAY_SOCKET_BUFFER)
                except OSError:
                    pass
            sock.setblocking(False)
            return sock, Endpoint(self.ip, port)
        return None


PeerDatagram = Callable[[Endpoint, bytes, tuple[str, int]], None]
