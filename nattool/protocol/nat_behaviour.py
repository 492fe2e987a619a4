"""NAT behaviour inference (RFC 4787 terms, RFC 5780 method). Pure.

The probe (nattool/diag/probe.py) collects observations; this module turns them into a
verdict. Every check is ``True``/``False``/``None`` -- ``None`` means "not tested or
could not be told", never "no". A verdict that was not measured is never reported:
filtering in particular needs a server that *proved* RFC 5780 support.

Mapping (RFC 5780 section 4.3), from one local socket toward several destinations:
  same mapped address toward a different server IP          -> endpoint-independent
  different toward another IP, same toward another port     -> address-dependent
  different toward another port of the same IP              -> address-and-port-dependent
Filtering (section 4.4), each on a fresh socket, asking the server to answer from its
alternate address:
  answer from the other IP and port arrives                 -> endpoint-independent
  only the answer from the other port (same IP) arrives     -> address-dependent
  neither arrives (server proven able to send them)         -> address-and-port-dependent
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, Sequence

from nattool.protocol.endpoint import Endpoint

CGNAT_SPACE = ipaddress.IPv4Network("100.64.0.0/10")


class Behaviour(str, Enum):
    """RFC 4787 mapping/filtering behaviour (JSON value = the enum value)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class NatType(str, Enum):
    """Classic (RFC 3489) names; the JSON ``nat_type`` value."""

    OPEN_INTERNET = "open internet"
    FULL_CONE = "full cone"
    RESTRICTED_CONE = "restricted cone"
    PORT_RESTRICTED_CONE = "port-restricted cone"
    SYMMETRIC = "symmetric"
    SYMMETRIC_UDP_FIREWALL = "symmetric UDP firewall"  # no NAT, but filtering
    UDP_BLOCKED = "UDP blocked"
    UNKNOWN = "unknown"


class Outcome(str, Enum):
    """What came of one CHANGE-REQUEST test."""

    ANSWERED = "answered"  # success, from the address asked for
    TIMEOUT = "timeout"  # nothing came back
    WRONG_SOURCE = "wrong-source"  # the server answered, but not from the changed address
    REJECTED = "rejected"  # error response (420: the server does not do CHANGE-REQUEST)
    NOT_TESTED = "not-tested"


@dataclass(frozen=True, slots=True)
class BindingObservation:
    """One Binding (or ``//nat``) transaction from a local socket."""

    socket: str  # label of the local socket; observations with one label share a socket
    local: Endpoint  # the local IP the OS used toward ``dest`` and the socket's port
    dest: Endpoint  # where the request went
    mapped: Optional[Endpoint]  # XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS, else //nat; None = no answer
    xor_mapped: Optional[Endpoint] = None
    plain_mapped: Optional[Endpoint] = None


@dataclass(frozen=True, slots=True)
class FilteringEvidence:
    """Filtering tests against one server (each on its own fresh socket)."""

    server: str
    rfc5780: bool  # proven: OTHER-ADDRESS sent, answers come from where RESPONSE-ORIGIN says
    reason: str  # why it is not proven (empty when it is)
    can_change_ip: bool = False  # OTHER-ADDRESS differs from the primary in IP
    can_change_port: bool = False  # ... in port
    change_ip_port: Outcome = Outcome.NOT_TESTED
    change_port: Outcome = Outcome.NOT_TESTED
    # Control test: the alternate address was contacted first from the same socket, so
    # any NAT lets its answers in; True = the server then honoured CHANGE-REQUEST,
    # False = it still did not (so its silence proves nothing), None = not run/inconclusive.
    control_honoured: Optional[bool] = None


@dataclass(frozen=True, slots=True)
class NatBehaviour:
    udp: str  # "ok" | "blocked"
    public_endpoint: Optional[Endpoint]
    mapping: Optional[Behaviour]
    mapping_reason: str
    endpoint_independent_mapping: Optional[bool]
    filtering: Optional[Behaviour]
    filtering_reason: str
    port_preservation: Optional[bool]
    no_nat: Optional[bool]
    cgnat: Optional[bool]
    alg: Optional[bool]
    hairpinning: Optional[bool]
    nat_type: NatType
    hole_punching: str
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        return {
            "udp": self.udp,
            "public_endpoint": str(self.public_endpoint) if self.public_endpoint else None,
            "mapping": self.mapping.value if self.mapping else None,
            "mapping_reason": self.mapping_reason,
            "endpoint_independent_mapping": self.endpoint_independent_mapping,
            "filtering": self.filtering.value if self.filtering else None,
            "filtering_reason": self.filtering_reason,
            "port_preservation": self.port_preservation,
            "no_nat": self.no_nat,
            "cgnat": self.cgnat,
            "alg": self.alg,
            "hairpinning": self.hairpinning,
            "nat_type": self.nat_type.value,
            "hole_punching": self.hole_punching,
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- mapping


def infer_mapping(bindings: Sequence[BindingObservation]) -> tuple[Optional[Behaviour], Optional[bool], str]:
    """(behaviour, endpoint-independent?, reason) from answered bindings per socket."""
    ip_same = ip_diff = port_same = port_diff = 0
    by_socket: dict[str, list[BindingObservation]] = {}
    for b in bindings:
        if b.mapped is not None:
            by_socket.setdefault(b.socket, []).append(b)
    for obs in by_socket.values():
        for i, a in enumerate(obs):
            for b in obs[i + 1 :]:
                if a.dest == b.dest:
                    continue
                same = a.mapped == b.mapped
                if a.dest.ip != b.dest.ip:
                    ip_same += same
                    ip_diff += not same
                else:
                    port_same += same
                    port_diff += not same
    if ip_diff == 0 and ip_same == 0 and port_diff == 0 and port_same == 0:
        return None, None, "no two answers from one socket to different server addresses"
    if ip_diff == 0 and ip_same > 0:
        if port_diff:
            # Mapping kept toward another IP, changed toward another port: odd; report it.
            return None, False, "inconsistent: mapping kept toward another IP but changed toward another port"
        return Behaviour.ENDPOINT_INDEPENDENT, True, "same mapped address toward different server IPs"
    if ip_diff and ip_same:
        return None, False, "inconsistent: mapping sometimes kept, sometimes changed toward another IP"
    if ip_diff:
        if port_diff:
            return Behaviour.ADDRESS_AND_PORT_DEPENDENT, False, "mapping changes toward another port of the same IP"
        if port_same:
            return Behaviour.ADDRESS_DEPENDENT, False, "mapping changes per server IP, not per port"
        return None, False, (
            "mapping changes per server IP; no two answers from one IP on different ports "
            "to tell address-dependent from address-and-port-dependent"
        )
    # Only same-IP, different-port comparisons.
    if port_diff:
        return Behaviour.ADDRESS_AND_PORT_DEPENDENT, False, "mapping changes toward another port of the same IP"
    return None, None, "same mapping toward another port, but no second server IP to test address dependence"


# --------------------------------------------------------------------------- filtering


def _filtering_one(ev: FilteringEvidence) -> tuple[Optional[Behaviour], str]:
    name = ev.server
    if not ev.rfc5780:
        return None, f"{name}: no proven RFC 5780 support ({ev.reason})"
    for outcome in (ev.change_ip_port, ev.change_port):
        if outcome == Outcome.WRONG_SOURCE:
            return None, f"{name}: ignored CHANGE-REQUEST (answered from the wrong address)"
        if outcome == Outcome.REJECTED:
            return None, f"{name}: rejected CHANGE-REQUEST"
    if ev.change_ip_port == Outcome.ANSWERED:
        return Behaviour.ENDPOINT_INDEPENDENT, f"{name}: answer from its other IP and port arrived"
    if ev.change_port == Outcome.ANSWERED:
        if ev.change_ip_port == Outcome.TIMEOUT:
            return Behaviour.ADDRESS_DEPENDENT, f"{name}: answer from its other port arrived, from its other IP not"
        return None, f"{name}: answer from its other port arrived; change-IP not tested (EIF or ADF)"
    if ev.control_honoured is False:
        return None, f"{name}: does not honour CHANGE-REQUEST even with the NAT opened (control test)"
    if ev.change_port == Outcome.TIMEOUT and (ev.change_ip_port in (Outcome.TIMEOUT, Outcome.NOT_TESTED)):
        return Behaviour.ADDRESS_AND_PORT_DEPENDENT, f"{name}: no answer from its other port nor its other IP"
    if ev.change_ip_port == Outcome.TIMEOUT:
        return None, f"{name}: no answer from its other IP; change-port not tested"
    return None, f"{name}: filtering not tested"


def infer_filtering(evidence: Sequence[FilteringEvidence]) -> tuple[Optional[Behaviour], str]:
    verdicts: list[tuple[Behaviour, str]] = []
    reasons: list[str] = []
    for ev in evidence:
        v, why = _filtering_one(ev)
        reasons.append(why)
        if v is not None:
            verdicts.append((v, why))
    if not evidence:
        return None, "no server to test filtering against"
    if not verdicts:
        return None, "unknown: " + "; ".join(reasons)
    kinds = {v for v, _ in verdicts}
    if len(kinds) > 1:
        return None, "inconsistent between servers: " + "; ".join(w for _, w in verdicts)
    return verdicts[0][0], "; ".join(w for _, w in verdicts)


# --------------------------------------------------------------------------- the rest


def _classic(
    udp_ok: bool, no_nat: Optional[bool], eim: Optional[bool], filtering: Optional[Behaviour]
) -> NatType:
    if not udp_ok:
        return NatType.UDP_BLOCKED
    if no_nat:
        if filtering == Behaviour.ENDPOINT_INDEPENDENT:
            return NatType.OPEN_INTERNET
        if filtering is not None:
            return NatType.SYMMETRIC_UDP_FIREWALL
        return NatType.UNKNOWN
    if eim is False:
        return NatType.SYMMETRIC
    if eim and filtering is not None:
        return {
            Behaviour.ENDPOINT_INDEPENDENT: NatType.FULL_CONE,
            Behaviour.ADDRESS_DEPENDENT: NatType.RESTRICTED_CONE,
            Behaviour.ADDRESS_AND_PORT_DEPENDENT: NatType.PORT_RESTRICTED_CONE,
        }[filtering]
    return NatType.UNKNOWN


def hole_punching_verdict(nat_type: NatType, eim: Optional[bool], filtering: Optional[Behaviour]) -> str:
    """One sentence on what the behaviour means for direct (hole-punched) connections."""
    if nat_type == NatType.UDP_BLOCKED:
        return "UDP is blocked: direct connections cannot work; peers need a relay (TURN) over TCP/TLS."
    if nat_type == NatType.OPEN_INTERNET:
        return "No NAT and no filtering: any peer can reach you directly; direct connections will work with every peer."
    if nat_type == NatType.FULL_CONE:
        return ("Direct connections will work with every peer, symmetric NATs included: "
                "anyone who knows your public endpoint can reach you.")
    if nat_type == NatType.RESTRICTED_CONE:
        return ("Direct connections will work with peers behind cone NATs and behind symmetric NATs "
                "(you accept any port from a peer IP you have sent to); hole punching is needed.")
    if nat_type in (NatType.PORT_RESTRICTED_CONE, NatType.SYMMETRIC_UDP_FIREWALL):
        return ("Direct connections will work with peers behind cone NATs (with hole punching) "
                "and will fail against peers behind symmetric NATs, which then need a relay.")
    if nat_type == NatType.SYMMETRIC:
        return ("Your NAT picks a new public port per destination: direct connections will work with "
                "peers on the open internet or behind full-cone or restricted-cone NATs, and will fail "
                "against port-restricted-cone and symmetric NATs (those need a relay).")
    if eim:
        return ("Your mapping is stable (endpoint-independent), so hole punching works with cone NATs; "
                "filtering is unknown, so whether symmetric-NAT peers can reach you is untested.")
    return "Not enough evidence to say which peers you can reach directly (see the reasons)."


def infer(
    bindings: Sequence[BindingObservation],
    filtering_evidence: Sequence[FilteringEvidence] = (),
    *,
    local_ips: frozenset[object] = frozenset(),
    hairpinning: Optional[bool] = None,
) -> NatBehaviour:
    """The whole verdict. ``local_ips``: addresses of this host (besides ``b.local.ip``)."""
    answered = [b for b in bindings if b.mapped is not None]
    notes: list[str] = []
    if bindings and not answered:
        return NatBehaviour(
            udp="blocked", public_endpoint=None, mapping=None, mapping_reason="no answer from any server",
            endpoint_independent_mapping=None, filtering=None, filtering_reason="no answer from any server",
            port_preservation=None, no_nat=None, cgnat=None, alg=None, hairpinning=hairpinning,
            nat_type=NatType.UDP_BLOCKED,
            hole_punching=hole_punching_verdict(NatType.UDP_BLOCKED, None, None),
            notes=("no server answered: UDP is blocked, or every server is down",),
        )
    if not bindings:
        return NatBehaviour(
            udp="ok", public_endpoint=None, mapping=None, mapping_reason="not tested",
            endpoint_independent_mapping=None, filtering=None, filtering_reason="not tested",
            port_preservation=None, no_nat=None, cgnat=None, alg=None, hairpinning=hairpinning,
            nat_type=NatType.UNKNOWN, hole_punching=hole_punching_verdict(NatType.UNKNOWN, None, None),
        )

    mapping, eim, mapping_reason = infer_mapping(bindings)

    # No NAT: every answer shows the socket's own address. One mismatch is proof of NAT.
    own = {b.local.ip for b in answered} | set(local_ips)
    no_nat: Optional[bool] = all(b.mapped == b.local or (b.mapped is not None and b.mapped.ip in own and b.mapped.port == b.local.port) for b in answered)
    if no_nat:
        # Without NAT there is no mapping to change: trivially endpoint-independent.
        if mapping is None and eim is None:
            mapping, eim, mapping_reason = Behaviour.ENDPOINT_INDEPENDENT, True, "no NAT: the mapped address is the local address"

    first_per_socket: dict[str, BindingObservation] = {}
    for b in answered:
        first_per_socket.setdefault(b.socket, b)
    port_preservation: Optional[bool] = all(
        b.mapped is not None and b.mapped.port == b.local.port for b in first_per_socket.values()
    )

    cgnat: Optional[bool] = None
    v4 = [b for b in answered if b.mapped is not None and b.mapped.ip.version == 4]
    if v4:
        cgnat = any(b.mapped.ip in CGNAT_SPACE or (b.local.ip.version == 4 and b.local.ip in CGNAT_SPACE) for b in v4 if b.mapped)
        if cgnat:
            notes.append("an address in 100.64.0.0/10 (shared address space): a carrier-grade NAT is likely in the path")

    both = [b for b in answered if b.xor_mapped is not None and b.plain_mapped is not None]
    alg: Optional[bool] = None
    if both:
        alg = any(b.xor_mapped != b.plain_mapped for b in both)
        if alg:
            notes.append("MAPPED-ADDRESS differs from XOR-MAPPED-ADDRESS: a NAT ALG rewrites addresses in payloads")

    filtering, filtering_reason = infer_filtering(filtering_evidence)
    nat_type = _classic(True, no_nat, eim, filtering)
    return NatBehaviour(
        udp="ok",
        public_endpoint=answered[0].mapped,
        mapping=mapping,
        mapping_reason=mapping_reason,
        endpoint_independent_mapping=eim,
        filtering=filtering,
        filtering_reason=filtering_reason,
        port_preservation=port_preservation,
        no_nat=no_nat,
        cgnat=cgnat,
        alg=alg,
        hairpinning=hairpinning,
        nat_type=nat_type,
        hole_punching=hole_punching_verdict(nat_type, eim, filtering),
        notes=tuple(notes),
    )
