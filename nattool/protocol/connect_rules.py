"""The rules behind `connect`'s decisions (pure): where a member on our LAN may listen,
what the trackers' views say about a NAT's mapping, and whether punching can work."""

from __future__ import annotations

from typing import Optional, Sequence

from nattool.errors import ProtocolError
from nattool.protocol.connect_options import DEFAULT_CONNECT_PORT, RelayMode
from nattool.protocol.endpoint import Endpoint, parse_ip
from nattool.protocol.nat_behaviour import BindingObservation, infer_mapping

EI = "endpoint-independent"
ED = "endpoint-dependent"

#: s a member may go without a direct path before the relay is tried for it (``auto``).
RELAY_AFTER = 2.0


def relay_due(mode: RelayMode, impossible: bool, waited: float, udp_blocked: bool) -> bool:
    """Whether a member without a path is to be reached through the relay now:
    ``waited`` s since it was seen, punching ``impossible`` by the verdict, or our own
    UDP blocked (the trackers answer only over TCP), when no direct path can open."""
    if mode == RelayMode.NEVER:
        return False
    return mode == RelayMode.ONLY or impossible or udp_blocked or waited >= RELAY_AFTER


def lan_candidates(lan: Sequence[str], public_port: int, own_port: int) -> list[Endpoint]:
    """Where a member behind our public IP may listen on its LAN.

    The registration publishes LAN *addresses* only, not the local port, and the tracker
    protocol has no field for it. Rather than change the tracker, we try the ports it is
    likely to be: the member's public port (NATs keep the inside port when it is free:
    Linux masquerade, most home routers), our own local port (members of one group tend
    to run with the same --port), and the default port of `nattool connect`. Pings are
    authenticated, so a wrong guess costs a few ignored datagrams on the LAN; and a member
    that reaches us first from its real port becomes a peer-reflexive candidate anyway.
    """
    ports: list[int] = []
    for p in (public_port, own_port, DEFAULT_CONNECT_PORT):
        if p and p not in ports:
            ports.append(p)
    out: list[Endpoint] = []
    for addr in lan:
        try:
            ip = parse_ip(addr)
        except ProtocolError:
            continue
        for p in ports:
            out.append(Endpoint(ip, p))
    return out


def mapping_of(observed: dict[Endpoint, Endpoint], local: Endpoint) -> tuple[Optional[str], str]:
    """Our mapping behaviour from the public endpoints the trackers saw (tracker ->
    endpoint), with the reasoning. None = unknown."""
    if len(observed) < 2:
        return None, "only one tracker answered: mapping behaviour unknown (give two trackers on different IPs)"
    return mapping_verdict(local, observed)


def mapping_verdict(local: Endpoint, seen_as: dict[Endpoint, Endpoint]) -> tuple[Optional[str], str]:
    """EI/ED/None and the reasoning, from where each tracker saw one socket."""
    obs = [BindingObservation("s", local, tracker, mapped) for tracker, mapped in seen_as.items()]
    _, eim, reason = infer_mapping(obs)
    seen = ", ".join(f"{t} saw {m}" for t, m in seen_as.items())
    if eim:
        return EI, f"{seen}: {reason}"
    if eim is False:
        return ED, f"{seen}: {reason}"
    return None, f"{seen}: {reason}"


def verdict(mine: Optional[str], theirs: Optional[str]) -> tuple[bool, str]:
    """(impossible?, explanation) for a member no path could be opened to."""
    if mine == ED and theirs == ED:
        return True, (
            "both sides' NATs pick a new public port per destination (symmetric NAT: endpoint-"
            "dependent mapping): neither side can know which port to send to, so hole punching "
            "cannot work; these peers need a relay (TURN)"
        )
    if mine == ED:
        return False, (
            "your NAT picks a new public port per destination (symmetric): punching works only "
            "with peers whose NAT maps endpoint-independently and does not filter by port "
            "(full cone, restricted cone, or no NAT); this peer's NAT is apparently not one of them"
        )
    if theirs == ED:
        return False, (
            "the peer's NAT picks a new public port per destination (symmetric): punching works "
            "only if your NAT does not filter by port (full cone or restricted cone); "
            "run 'nattool probe' to see your filtering"
        )
    if mine == EI and theirs == EI:
        return False, (
            "both NATs map endpoint-independently, which should punch; no authenticated answer "
            "came back: the peer may be gone, UDP may be filtered, or a firewall drops it"
        )
    return False, (
        "no authenticated answer from any candidate path; mapping behaviour is unknown on "
        f"{'your side' if mine is None else 'the peer side'} (run 'nattool probe', or give two trackers)"
    )


__all__ = [
    "ED",
    "EI",
    "RELAY_AFTER",
    "lan_candidates",
    "mapping_of",
    "mapping_verdict",
    "relay_due",
    "verdict",
]
