"""NAT lab: real NAT topologies in network namespaces for nattool's tests (see README.md)."""

from .lab import (
    Host,
    Internet,
    Lab,
    LabError,
    LabUnavailable,
    Nat,
    Node,
    ServerHost,
    Service,
    read_line,
    sweep_stale_namespaces,
    unavailable_reason,
    wait_for_line,
)
from .nft import Ipv6Mode, NatBehaviour
from .udp import AgentError, Datagram, UdpAgent, UdpSocket, udp_agent

__all__ = [
    "AgentError",
    "Datagram",
    "Host",
    "Internet",
    "Ipv6Mode",
    "Lab",
    "LabError",
    "LabUnavailable",
    "Nat",
    "NatBehaviour",
    "Node",
    "ServerHost",
    "Service",
    "read_line",
    "UdpAgent",
    "UdpSocket",
    "sweep_stale_namespaces",
    "udp_agent",
    "unavailable_reason",
    "wait_for_line",
]
