"""Ready-made topologies for the probe (issue 4), connect (issue 5) and port-mapping
(issue 25) tests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .lab import Host, Lab, Nat, ServerHost
from .nft import Ipv6Mode, NatBehaviour
from .portmap_lab import ALL_PROTOCOLS, MAX_LIFETIME, PortmapGateway, start_portmap_gateway

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
                  ipv6: Ipv6Mode | None = None, udp_timeout: int | None = None,
                  left_grants_mappings: bool = False) -> PairTopology:
    """tracker "tracker" (SERVER_V4/V6) and stranger "stranger" (203.0.113.50,
    2001:db8:203::50) on the internet; NAT "nat_l" with host "left", NAT "nat_r" with
    host "right". ``left_grants_mappings``: "nat_l" can run a port-mapping gateway."""
    tracker = lab.add_server_host("tracker", addrs=[*SERVER_V4, *SERVER_V6])
    stranger = lab.add_server_host("stranger", addrs=["203.0.113.50", "2001:db8:203::50"])
    nat_l = lab.add_nat("nat_l", left, ipv6=ipv6, udp_timeout=udp_timeout,
                        grants_mappings=left_grants_mappings)
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


# -------------------------------------------------------------------------- port mapping


@dataclass(frozen=True)
class PortmapTopology(ProbeTopology):
    """probe_topology whose router grants port mappings through ``gateway``."""

    gateway: PortmapGateway | None = None


def portmap_topology(lab: Lab, behaviour: NatBehaviour = NatBehaviour.APDM,
                     protocols: Iterable[str] = ALL_PROTOCOLS, *,
                     udp_timeout: int | None = None,
                     max_lifetime: int = MAX_LIFETIME) -> PortmapTopology:
    """server "srv" (SERVER_V4 + SERVER_V6) -- internet -- NAT "nat" (grants mappings with
    ``protocols``, PCP/NAT-PMP lifetimes at most ``max_lifetime`` s) -- host "client"."""
    server = lab.add_server_host("srv", addrs=[*SERVER_V4, *SERVER_V6])
    nat = lab.add_nat("nat", behaviour, udp_timeout=udp_timeout, grants_mappings=True)
    client = lab.add_host("client", behind=nat)
    return PortmapTopology(server, nat, client, start_portmap_gateway(
        lab, nat, protocols, max_lifetime=max_lifetime))


@dataclass(frozen=True)
class PortmapPairTopology(PairTopology):
    """pair_topology whose LEFT router grants port mappings through ``gateway``."""

    gateway: PortmapGateway | None = None


def portmap_pair_topology(lab: Lab, protocols: Iterable[str] = ALL_PROTOCOLS,
                          left: NatBehaviour = NatBehaviour.APDM,
                          right: NatBehaviour = NatBehaviour.APDM, *,
                          udp_timeout: int | None = None,
                          max_lifetime: int = MAX_LIFETIME) -> PortmapPairTopology:
    """As pair_topology ("tracker", "stranger", "nat_l"/"left", "nat_r"/"right"); "nat_l"
    runs a gateway offering ``protocols``, "nat_r" grants nothing."""
    pair = pair_topology(lab, left, right, udp_timeout=udp_timeout,
                         left_grants_mappings=True)
    gateway = start_portmap_gateway(lab, pair.left_nat, protocols, max_lifetime=max_lifetime)
    return PortmapPairTopology(pair.tracker, pair.left_nat, pair.right_nat, pair.left,
                               pair.right, pair.stranger, gateway)


@dataclass(frozen=True)
class DoubleNatTopology(ProbeTopology):
    """A client behind two routers: ``nat`` (inner, WAN in 100.64.0.0/10) behind ``outer``.

    ``nat``/``client``/``server`` as in probe_topology, so probe tests run unchanged.
    """

    outer: Nat | None = None
    gateway: PortmapGateway | None = None  # on the inner router ("nat"), if any


def double_nat_topology(lab: Lab, outer: NatBehaviour = NatBehaviour.EIM_APDF,
                        inner: NatBehaviour = NatBehaviour.APDM, *,
                        protocols: Iterable[str] | None = ALL_PROTOCOLS,
                        udp_timeout: int | None = None,
                        max_lifetime: int = MAX_LIFETIME) -> DoubleNatTopology:
    """server "srv" (SERVER_V4/V6) -- internet -- NAT "cgn" (198.51.100.2) -- NAT "nat"
    (WAN 100.64.0.2) -- host "client". With ``protocols`` (None: no gateway), "nat" runs a
    port-mapping gateway: the external address it reports is 100.64.0.2, not public."""
    server = lab.add_server_host("srv", addrs=[*SERVER_V4, *SERVER_V6])
    cgn = lab.add_nat("cgn", outer, udp_timeout=udp_timeout)
    nat = lab.add_nat("nat", inner, udp_timeout=udp_timeout, behind=cgn,
                      grants_mappings=protocols is not None)
    client = lab.add_host("client", behind=nat)
    gateway = None if protocols is None else start_portmap_gateway(
        lab, nat, protocols, max_lifetime=max_lifetime)
    return DoubleNatTopology(server, nat, client, cgn, gateway)
