"""Which peers a TURN allocation may relay to (docs/PROTOCOL.md section 8).

Pure. Default deny: loopback, RFC 1918, ULA, link-local, multicast, unspecified,
0.0.0.0/8, broadcast, and the IPv4-mapped forms of all these; the server's own service
endpoints (its tracker / STUN ports, on any of its addresses). ``--allow-peer CIDR``
overrides a deny, ``--deny-peer CIDR`` adds one. Relayed addresses of this server are
decided by the TURN core (they are allowed for operator credentials), not here.

Documentation ranges (192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32) and
100.64.0.0/10 are deliberately NOT denied; ``ipaddress``'s ``is_private`` would deny
them, hence the explicit list.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import AbstractSet, Iterable, Union

from nattool.errors import UsageError
from nattool.protocol.endpoint import Endpoint, IPAddress, unmap

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

DEFAULT_DENIED: tuple[str, ...] = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)


def parse_cidr(text: str) -> Network:
    """A ``--allow-peer`` / ``--deny-peer`` value: an address or a CIDR block."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise UsageError(f"bad CIDR {text[:60]!r}: want an address or ADDRESS/PREFIX") from None


def _in_any(ip: IPAddress, networks: tuple[Network, ...]) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


@dataclass(frozen=True)
class PeerPolicy:
    """``allow``/``deny``: the operator's extra CIDRs. ``service_endpoints``: the
    server's own listening endpoints; one with an unspecified address (a wildcard
    bind) stands for that port on every address in ``server_ips`` and on every
    relayed address's IP (the core passes those)."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    service_endpoints: frozenset[Endpoint] = frozenset()
    server_ips: frozenset[IPAddress] = frozenset()
    _denied: tuple[Network, ...] = field(init=False, repr=False, compare=False)
    _service_ports_any_ip: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        denied = tuple(ipaddress.ip_network(c) for c in DEFAULT_DENIED) + tuple(self.deny)
        object.__setattr__(self, "_denied", denied)
        object.__setattr__(
            self, "_service_ports_any_ip", frozenset(ep.port for ep in self.service_endpoints if ep.ip.is_unspecified)
        )

    @classmethod
    def from_text(
        cls,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        service_endpoints: Iterable[Endpoint] = (),
        server_ips: Iterable[IPAddress] = (),
    ) -> "PeerPolicy":
        return cls(
            tuple(parse_cidr(a) for a in allow),
            tuple(parse_cidr(d) for d in deny),
            frozenset(service_endpoints),
            frozenset(unmap(ip) for ip in server_ips),
        )

    def explicitly_allowed(self, ip: IPAddress) -> bool:
        ip = unmap(ip)
        return _in_any(ip, self.allow)

    def ip_denied(self, ip: IPAddress) -> bool:
        """Denied by the CIDR lists (default and ``--deny-peer``), unless ``--allow-peer``
        covers it. IPv4-mapped IPv6 addresses are judged as the IPv4 address."""
        ip = unmap(ip)
        if _in_any(ip, self.allow):
            return False
        return _in_any(ip, self._denied)

    def is_service(self, peer: Endpoint, own_ips: AbstractSet[IPAddress] = frozenset()) -> bool:
        """One of the server's own listening endpoints (a relay must not loop into them)."""
        ip = unmap(peer.ip)
        if Endpoint(ip, peer.port) in self.service_endpoints:
            return True
        if peer.port in self._service_ports_any_ip:
            return ip in self.server_ips or ip in own_ips or ip.is_loopback or ip.is_unspecified
        return False
