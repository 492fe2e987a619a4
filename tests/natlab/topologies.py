"""Ready-made topologies for the probe (issue 4) and connect (issue 5) tests."""

from __future__ import annotations

from dataclasses import dataclass

from .lab import Host, Lab, Nat, ServerHost
from .nft import Ipv6Mode, NatBehaviour

#: Addresses of the server host in every ready-made topology: two for an RFC 5780 server
#: (primary, alternate) and a third one for "somebody else on the internet".
SERVER_V4 = ("203.0.113.10", "203.0.113.11", "203.0.113.12")
SERVER_V6 = ("2001:db8:203::10", "2001:db8:203::11", "2001:db8:203::12")


@dataclass(frozen=True)
class ProbeTopology:
    """One server host (3 IPv4 + 3 IPv6 addresses), one NAT, one client behind it."""

    server: ServerHost
    nat: Nat
    client: Host

    @property
    def primary(self) -> str:
        return SERVER_V4[0]

    @property
    def alternate(self) -> str:
        return SERVER_V4[1]

    @property
    def other(self) -> str:
        """A third address of the server host, for unsolicited traffic."""
        return SERVER_V4[2]

    @property
    def primary6(self) -> str:
        return SERVER_V6[0]

    @property
    def alternate6(self) -> str:
        return SERVER_V6[1]

    @property
    def other6(self) -> str:
        return SERVER_V6[2]


def probe_topology(lab: Lab, behaviour: NatBehaviour, *, ipv6: Ipv6Mode | None = None,
                   udp_timeout: int | None = None, hairpin: bool = False) -> ProbeTopology:
    """server "srv" (SERVER_V4 + SERVER_V6) -- internet -- NAT "nat" -- host "client"."""
    server = lab.add_server_host("srv", addrs=[*SERVER_V4, *SERVER_V6])
    nat = lab.add_nat("nat", behaviour, ipv6=ipv6, udp_timeout=udp_timeout, hairpin=hairpin)
    client = lab.add_host("client", behind=nat)
    return ProbeTopology(server, nat, client)


@dataclass(frozen=True)
class PairTopology:
    """A tracker host, and one peer behind each of two NATs (``left``/``right``)."""

    tracker: ServerHost
    left_nat: Nat
    right_nat: Nat
    left: Host
    right: Host
    stranger: ServerHost  # a public host that is no member, for injection attempts


def pair_topology(lab: Lab, left: NatBehaviour, right: NatBehaviour, *,
                  ipv6: Ipv6Mode | None = None, udp_timeout: int | None = None) -> PairTopology:
    """tracker "tracker" (SERVER_V4/V6) and stranger "stranger" (203.0.113.50,
    2001:db8:203::50) on the internet; NAT "nat_l" with host "left", NAT "nat_r" with
    host "right"."""
    tracker = lab.add_server_host("tracker", addrs=[*SERVER_V4, *SERVER_V6])
    stranger = lab.add_server_host("stranger", addrs=["203.0.113.50", "2001:db8:203::50"])
    nat_l = lab.add_nat("nat_l", left, ipv6=ipv6, udp_timeout=udp_timeout)
    nat_r = lab.add_nat("nat_r", right, ipv6=ipv6, udp_timeout=udp_timeout)
    return PairTopology(tracker, nat_l, nat_r, lab.add_host("left", behind=nat_l),
                        lab.add_host("right", behind=nat_r), stranger)


@dataclass(frozen=True)
class SameNatTopology:
    """A tracker host and two peers on the same NAT's LAN."""

    tracker: ServerHost
    nat: Nat
    a: Host
    b: Host


def same_nat_topology(lab: Lab, behaviour: NatBehaviour = NatBehaviour.EIM_APDF, *,
                      ipv6: Ipv6Mode | None = None, hairpin: bool = False) -> SameNatTopology:
    """tracker "tracker" (SERVER_V4/V6); NAT "nat" with hosts "a" and "b" on one LAN.

    Give the two peers different local ports: Linux masquerade keeps a port only while it
    is free, so two hosts using the same port cannot both get an endpoint-independent
    mapping (the second one is remapped per destination).
    """
    tracker = lab.add_server_host("tracker", addrs=[*SERVER_V4, *SERVER_V6])
    nat = lab.add_nat("nat", behaviour, ipv6=ipv6, hairpin=hairpin)
    return SameNatTopology(tracker, nat, lab.add_host("a", behind=nat),
                           lab.add_host("b", behind=nat))
