"""nftables rulesets for the lab's NAT routers, one per behaviour.

Every behaviour is built from real kernel NAT and conntrack; nothing is simulated. The router
namespace has two sides: ``wan`` (towards the "internet" namespace) and the bridge ``lan``.
Rules say ``iifname != "wan"`` rather than ``iifname "lan"`` on purpose: where the host has
br_netfilter loaded, bridged LAN-to-LAN frames reach these hooks with the bridge *port* as
input device, and they must pass.
"""

from __future__ import annotations

import enum


class NatBehaviour(enum.Enum):
    """IPv4 behaviour of a lab router (RFC 4787 terms in the docstrings).

    ``mapping``/``filtering`` give the RFC 4787 verdict a correct probe must reach
    (``None`` where there is nothing to classify); ``classic`` the RFC 3489 name.
    """

    #: Plain routing: hosts have public addresses, no NAT, no firewall.
    NO_NAT = "no-nat"
    #: Endpoint-independent mapping + endpoint-independent filtering ("full cone").
    EIM_EIF = "eim-eif"
    #: Endpoint-independent mapping + address-dependent filtering ("restricted cone").
    EIM_ADF = "eim-adf"
    #: Endpoint-independent mapping + address-and-port-dependent filtering ("port-restricted").
    EIM_APDF = "eim-apdf"
    #: Address-and-port-dependent mapping (random port per destination) + APD filtering.
    APDM = "apdm"
    #: UDP is dropped in both directions (TCP still NATed like EIM_APDF).
    UDP_BLOCKED = "udp-blocked"
    #: IPv6-only network: no NAT, a stateful firewall (APD filtering); IPv4 is not forwarded.
    IPV6_FIREWALL = "ipv6-firewall"

    @property
    def mapping(self) -> str | None:
        return _MAPPING[self]

    @property
    def filtering(self) -> str | None:
        return _FILTERING[self]

    @property
    def classic(self) -> str | None:
        return _CLASSIC[self]


EI = "endpoint-independent"
AD = "address-dependent"
APD = "address-and-port-dependent"

_MAPPING: dict[NatBehaviour, str | None] = {
    NatBehaviour.NO_NAT: EI,
    NatBehaviour.EIM_EIF: EI,
    NatBehaviour.EIM_ADF: EI,
    NatBehaviour.EIM_APDF: EI,
    NatBehaviour.APDM: APD,
    NatBehaviour.UDP_BLOCKED: None,
    NatBehaviour.IPV6_FIREWALL: EI,  # of its IPv6 side: no translation at all
}
_FILTERING: dict[NatBehaviour, str | None] = {
    NatBehaviour.NO_NAT: EI,
    NatBehaviour.EIM_EIF: EI,
    NatBehaviour.EIM_ADF: AD,
    NatBehaviour.EIM_APDF: APD,
    NatBehaviour.APDM: APD,
    NatBehaviour.UDP_BLOCKED: None,
    NatBehaviour.IPV6_FIREWALL: APD,
}
_CLASSIC: dict[NatBehaviour, str | None] = {
    NatBehaviour.NO_NAT: "open internet",
    NatBehaviour.EIM_EIF: "full cone",
    NatBehaviour.EIM_ADF: "restricted cone",
    NatBehaviour.EIM_APDF: "port-restricted cone",
    NatBehaviour.APDM: "symmetric",
    NatBehaviour.UDP_BLOCKED: "udp blocked",
    NatBehaviour.IPV6_FIREWALL: "symmetric udp firewall",
}


class Ipv6Mode(enum.Enum):
    """IPv6 service of a lab router's LAN (IPv6 is never translated)."""

    #: No IPv6 on the LAN: hosts get no IPv6 address and no route.
    NONE = "none"
    #: Routed IPv6 behind a stateful firewall: address-and-port-dependent filtering.
    FIREWALL = "firewall"
    #: Routed IPv6, no firewall.
    OPEN = "open"


def router_ruleset(behaviour: NatBehaviour, ipv6: Ipv6Mode, mapping_timeout: int, *,
                   wan_ip: str = "", lan: str = "", hairpin: bool = False,
                   accept_dnat: bool = False) -> str:
    """The complete nftables ruleset (``nft -f`` input) for one router namespace.

    ``accept_dnat``: the forward chain lets in new connections that a DNAT rule translated
    (a router that grants port mappings: its gateway adds the DNAT rules in its own table).

    ``hairpin`` (needs ``wan_ip`` and ``lan``): a LAN host sending to a mapped address of
    this router reaches the host owning that mapping, with the sender's mapped address as
    source (RFC 4787 REQ-9); without it such packets end at the router itself.
    """
    dnat = behaviour in (NatBehaviour.EIM_EIF, NatBehaviour.EIM_ADF)
    hairpin = hairpin and behaviour in (NatBehaviour.EIM_EIF, NatBehaviour.EIM_ADF,
                                        NatBehaviour.EIM_APDF, NatBehaviour.APDM)
    track = dnat or hairpin
    out: list[str] = ["table inet natlab {"]
    if track:
        # Endpoint-independent filtering is not something masquerade can do: inbound
        # packets from a new remote are a *new* conntrack, so they need an explicit DNAT.
        # The map remembers, per external port, which inside address:port owns it; it is
        # fed from outbound traffic after masquerade (priority 300 sees translated headers).
        out += [
            "  map eif {",
            "    type inet_service : ipv4_addr . inet_service",
            "    flags dynamic, timeout",
            f"    timeout {mapping_timeout}s",
            "  }",
        ]
    if behaviour is NatBehaviour.EIM_ADF:
        # Keyed per mapping (remote IP . external port), not per remote IP alone: otherwise
        # one socket's traffic to a server would open every other mapping to that server.
        out += [
            "  set adf {",
            "    type ipv4_addr . inet_service",
            "    flags dynamic, timeout",
            f"    timeout {mapping_timeout}s",
            "  }",
            "  chain pre_filter {",
            "    type filter hook prerouting priority -150; policy accept;",
            '    iifname "wan" ct state new meta l4proto udp ip saddr . udp dport != @adf drop',
            "  }",
        ]
    if track:
        out += [
            "  chain pre_nat {",
            "    type nat hook prerouting priority dstnat; policy accept;",
        ]
        if dnat:
            out.append('    iifname "wan" meta l4proto udp dnat ip to udp dport map @eif')
        if hairpin:
            out.append(f'    iifname != "wan" ip daddr {wan_ip} meta l4proto udp '
                       "dnat ip to udp dport map @eif")
        out += [
            "  }",
            "  chain post_track {",
            "    type filter hook postrouting priority 300; policy accept;",
            '    oifname "wan" meta nfproto ipv4 meta l4proto udp update @eif '
            "{ ct reply proto-dst : ct original ip saddr . ct original proto-src }",
        ]
        if behaviour is NatBehaviour.EIM_ADF:
            out.append('    oifname "wan" meta l4proto udp update @adf { ip daddr . udp sport }')
        out.append("  }")

    masq = {
        NatBehaviour.EIM_EIF: "masquerade",
        NatBehaviour.EIM_ADF: "masquerade",
        NatBehaviour.EIM_APDF: "masquerade",
        NatBehaviour.UDP_BLOCKED: "masquerade",
        # "random" draws a fresh port for every new conntrack, i.e. per remote ip:port.
        NatBehaviour.APDM: "masquerade random",
    }.get(behaviour)
    if masq:
        out += [
            "  chain post_nat {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f'    oifname "wan" meta nfproto ipv4 {masq}',
        ]
        if hairpin:
            # The hairpinned packet must carry the sender's *mapped* address as source.
            out.append(f'    oifname != "wan" ct status dnat ip saddr {lan} snat ip to {wan_ip}')
        out += [
            "  }",
        ]

    # Unsolicited traffic to the router itself is dropped, as real routers do. This matters
    # beyond tidiness: a dropped packet's conntrack entry is never confirmed. Accepting an
    # early hole-punch packet would leave an entry (peer -> wan:port) that makes masquerade
    # pick a *different* port for the host's own packet to that peer, breaking EIM.
    out += [
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        '    iifname "wan" ct state new meta l4proto { udp, tcp } drop',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "    meta nfproto ipv4 jump fwd4",
        "    meta nfproto ipv6 jump fwd6",
        "  }",
        "  chain fwd4 {",
    ]
    if behaviour is NatBehaviour.NO_NAT:
        out.append("    accept")
    elif behaviour is NatBehaviour.IPV6_FIREWALL:
        out.append("    drop")
    else:
        if behaviour is NatBehaviour.UDP_BLOCKED:
            out.append("    meta l4proto udp drop")
        out += [
            "    ct state established,related accept",
            '    iifname != "wan" accept',
        ]
        if dnat or accept_dnat:
            out.append("    ct status dnat accept")
        out.append("    drop")
    out += ["  }", "  chain fwd6 {"]
    if ipv6 is Ipv6Mode.OPEN:
        out.append("    accept")
    elif ipv6 is Ipv6Mode.FIREWALL:
        out += [
            "    ct state established,related accept",
            '    iifname != "wan" accept',
            # RFC 4890: ICMPv6 errors (packet too big...) and echo must pass a firewall.
            "    meta l4proto ipv6-icmp accept",
            "    drop",
        ]
    else:
        out.append("    drop")
    out += ["  }", "}"]
    return "\n".join(out) + "\n"
