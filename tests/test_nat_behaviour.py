"""NAT behaviour inference: a table of observations -> verdicts (pure)."""

from __future__ import annotations

import pytest

from nattool.protocol.endpoint import Endpoint
from nattool.protocol.nat_behaviour import (
    Behaviour,
    BindingObservation,
    FilteringEvidence,
    NatType,
    Outcome,
    infer,
    infer_filtering,
    infer_mapping,
)

E = Endpoint.from_text
LOCAL = E("192.168.1.10:5000")
S1P, S1_OIP, S1_OPORT, S1_OO = E("203.0.113.1:3478"), E("203.0.113.2:3478"), E("203.0.113.1:3479"), E("203.0.113.2:3479")
S2 = E("198.51.100.1:43283")


def b(dest: Endpoint, mapped: Endpoint | None, *, sock: str = "m", local: Endpoint = LOCAL) -> BindingObservation:
    return BindingObservation(sock, local, dest, mapped, xor_mapped=mapped, plain_mapped=mapped)


def ev(both: Outcome, port: Outcome, *, rfc5780: bool = True, control: bool | None = None) -> FilteringEvidence:
    return FilteringEvidence(
        "s1", rfc5780, "" if rfc5780 else "no OTHER-ADDRESS", True, True, both, port, control
    )


PUB = E("198.51.100.77:5000")


@pytest.mark.parametrize(
    "bindings, want_mapping, want_eim",
    [
        ([b(S1P, PUB), b(S1_OIP, PUB), b(S1_OO, PUB)], Behaviour.ENDPOINT_INDEPENDENT, True),
        ([b(S1P, PUB), b(S2, PUB)], Behaviour.ENDPOINT_INDEPENDENT, True),
        ([b(S1P, PUB), b(S1_OIP, E("198.51.100.77:6000")), b(S1_OO, E("198.51.100.77:6000"))], Behaviour.ADDRESS_DEPENDENT, False),
        ([b(S1P, PUB), b(S1_OIP, E("198.51.100.77:6000")), b(S1_OO, E("198.51.100.77:6001"))], Behaviour.ADDRESS_AND_PORT_DEPENDENT, False),
        ([b(S1P, PUB), b(S2, E("198.51.100.77:6000"))], None, False),  # not EIM; which kind unknown
        ([b(S1P, PUB), b(S1_OPORT, E("198.51.100.77:6000"))], Behaviour.ADDRESS_AND_PORT_DEPENDENT, False),
        ([b(S1P, PUB), b(S1_OPORT, PUB)], None, None),  # only a port was varied
        ([b(S1P, PUB)], None, None),
        ([b(S1P, PUB), b(S2, None)], None, None),
        # Two sockets never compare with each other.
        ([b(S1P, PUB, sock="a"), b(S2, E("198.51.100.77:1"), sock="b")], None, None),
    ],
)
def test_mapping_table(bindings: list, want_mapping: Behaviour | None, want_eim: bool | None) -> None:
    mapping, eim, reason = infer_mapping(bindings)
    assert (mapping, eim) == (want_mapping, want_eim), reason
    assert reason


@pytest.mark.parametrize(
    "evidence, want",
    [
        (ev(Outcome.ANSWERED, Outcome.NOT_TESTED), Behaviour.ENDPOINT_INDEPENDENT),
        (ev(Outcome.ANSWERED, Outcome.ANSWERED), Behaviour.ENDPOINT_INDEPENDENT),
        (ev(Outcome.TIMEOUT, Outcome.ANSWERED), Behaviour.ADDRESS_DEPENDENT),
        (ev(Outcome.TIMEOUT, Outcome.TIMEOUT), Behaviour.ADDRESS_AND_PORT_DEPENDENT),
        (ev(Outcome.TIMEOUT, Outcome.TIMEOUT, control=True), Behaviour.ADDRESS_AND_PORT_DEPENDENT),
        # Unproven servers never yield a verdict, whatever came back.
        (ev(Outcome.TIMEOUT, Outcome.TIMEOUT, rfc5780=False), None),
        (ev(Outcome.ANSWERED, Outcome.ANSWERED, rfc5780=False), None),
        (ev(Outcome.TIMEOUT, Outcome.TIMEOUT, control=False), None),
        (ev(Outcome.WRONG_SOURCE, Outcome.WRONG_SOURCE), None),
        (ev(Outcome.REJECTED, Outcome.REJECTED), None),
        (ev(Outcome.TIMEOUT, Outcome.NOT_TESTED), None),
        (ev(Outcome.NOT_TESTED, Outcome.ANSWERED), None),
    ],
)
def test_filtering_table(evidence: FilteringEvidence, want: Behaviour | None) -> None:
    got, reason = infer_filtering([evidence])
    assert got == want, reason
    assert reason


def test_filtering_servers_disagree_is_unknown() -> None:
    got, reason = infer_filtering([ev(Outcome.ANSWERED, Outcome.ANSWERED), ev(Outcome.TIMEOUT, Outcome.TIMEOUT)])
    assert got is None and "inconsistent" in reason
    got, _ = infer_filtering([ev(Outcome.ANSWERED, Outcome.ANSWERED), ev(Outcome.TIMEOUT, Outcome.TIMEOUT, rfc5780=False)])
    assert got == Behaviour.ENDPOINT_INDEPENDENT
    assert infer_filtering([])[0] is None


EIM_BINDINGS = [b(S1P, PUB), b(S1_OIP, PUB), b(S1_OO, PUB)]
APDM_BINDINGS = [b(S1P, PUB), b(S1_OIP, E("198.51.100.77:6000")), b(S1_OO, E("198.51.100.77:6001"))]
OPEN_LOCAL = E("203.0.113.50:5000")
OPEN_BINDINGS = [b(d, OPEN_LOCAL, local=OPEN_LOCAL) for d in (S1P, S1_OIP, S1_OO)]


@pytest.mark.parametrize(
    "bindings, filt, nat_type",
    [
        (OPEN_BINDINGS, ev(Outcome.ANSWERED, Outcome.ANSWERED), NatType.OPEN_INTERNET),
        (OPEN_BINDINGS, ev(Outcome.TIMEOUT, Outcome.TIMEOUT), NatType.SYMMETRIC_UDP_FIREWALL),
        (OPEN_BINDINGS, ev(Outcome.TIMEOUT, Outcome.TIMEOUT, rfc5780=False), NatType.UNKNOWN),
        (EIM_BINDINGS, ev(Outcome.ANSWERED, Outcome.ANSWERED), NatType.FULL_CONE),
        (EIM_BINDINGS, ev(Outcome.TIMEOUT, Outcome.ANSWERED), NatType.RESTRICTED_CONE),
        (EIM_BINDINGS, ev(Outcome.TIMEOUT, Outcome.TIMEOUT), NatType.PORT_RESTRICTED_CONE),
        (EIM_BINDINGS, ev(Outcome.TIMEOUT, Outcome.TIMEOUT, rfc5780=False), NatType.UNKNOWN),
        (APDM_BINDINGS, ev(Outcome.TIMEOUT, Outcome.TIMEOUT), NatType.SYMMETRIC),
        (APDM_BINDINGS, ev(Outcome.TIMEOUT, Outcome.TIMEOUT, rfc5780=False), NatType.SYMMETRIC),
        ([b(S1P, None), b(S2, None)], ev(Outcome.TIMEOUT, Outcome.TIMEOUT), NatType.UDP_BLOCKED),
    ],
)
def test_classic_names(bindings: list, filt: FilteringEvidence, nat_type: NatType) -> None:
    result = infer(bindings, [filt])
    assert result.nat_type == nat_type, (result.mapping_reason, result.filtering_reason)
    assert result.hole_punching
    doc = result.to_json()
    assert doc["nat_type"] == nat_type.value
    for key in ("mapping", "filtering", "public_endpoint", "udp"):
        assert key in doc


def test_checks_are_none_when_unknown_never_false() -> None:
    blocked = infer([b(S1P, None)])
    assert blocked.udp == "blocked"
    for value in (blocked.no_nat, blocked.port_preservation, blocked.cgnat, blocked.alg, blocked.filtering, blocked.mapping):
        assert value is None
    one = infer([b(S1P, PUB)])
    assert one.mapping is None and one.endpoint_independent_mapping is None
    assert one.filtering is None and one.filtering_reason
    assert one.alg is False  # both addresses present and equal: tested
    assert one.no_nat is False and one.port_preservation is True and one.cgnat is False
    only_nat = infer([BindingObservation("m", LOCAL, S2, PUB)])  # //nat answer: no XOR/plain pair
    assert only_nat.alg is None


def test_hints() -> None:
    cg = infer([b(S1P, E("100.64.3.4:5000"))])
    assert cg.cgnat is True and any("100.64.0.0/10" in n for n in cg.notes)
    v6 = infer([b(E("[2001:db8::1]:3478"), E("[2001:db8:9::5]:5000"), local=E("[2001:db8:9::5]:5000"))])
    assert v6.cgnat is None and v6.no_nat is True
    alg = infer([BindingObservation("m", LOCAL, S1P, PUB, xor_mapped=PUB, plain_mapped=E("192.168.1.10:5000"))])
    assert alg.alg is True
    moved = infer([b(S1P, E("198.51.100.77:6000"))])
    assert moved.port_preservation is False
