"""Tracker address syntax (pure) and RFC 2782 SRV ordering (pure, rng passed in)."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.errors import NattoolError, UsageError
from nattool.protocol.endpoint import DEFAULT_PORT, Endpoint
from nattool.protocol.srv import SrvRecord, order_srv
from nattool.protocol.tracker_spec import (
    STUN_DEFAULT_PORT,
    TrackerSpec,
    parse_tracker_list,
    parse_tracker_spec,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


@pytest.mark.parametrize(
    "text, host, port, ip, scheme",
    [
        ("tracker.example.org", "tracker.example.org", DEFAULT_PORT, None, None),
        ("Tracker.Example.ORG.", "tracker.example.org", DEFAULT_PORT, None, None),
        ("tracker.example.org:998", "tracker.example.org", 998, None, None),
        ("localhost", "localhost", DEFAULT_PORT, None, None),
        ("192.0.2.1", "192.0.2.1", DEFAULT_PORT, V4("192.0.2.1"), None),
        ("192.0.2.1:998", "192.0.2.1", 998, V4("192.0.2.1"), None),
        ("[2001:db8::1]", "2001:db8::1", DEFAULT_PORT, V6("2001:db8::1"), None),
        ("[2001:db8::1]:998", "2001:db8::1", 998, V6("2001:db8::1"), None),
        ("2001:db8::1", "2001:db8::1", DEFAULT_PORT, V6("2001:db8::1"), None),
        ("2001:DB8:0::1", "2001:db8::1", DEFAULT_PORT, V6("2001:db8::1"), None),
        ("::1", "::1", DEFAULT_PORT, V6("::1"), None),
        ("  192.0.2.1:7  ", "192.0.2.1", 7, V4("192.0.2.1"), None),
        ("stun:stun.example.org", "stun.example.org", STUN_DEFAULT_PORT, None, "stun"),
        ("STUN:stun.example.org:19302", "stun.example.org", 19302, None, "stun"),
        ("stun:[2001:db8::5]:3479", "2001:db8::5", 3479, V6("2001:db8::5"), "stun"),
        ("stun:2001:db8::5", "2001:db8::5", STUN_DEFAULT_PORT, V6("2001:db8::5"), "stun"),
        ("stun:192.0.2.9", "192.0.2.9", STUN_DEFAULT_PORT, V4("192.0.2.9"), "stun"),
        # A host that happens to be called "stun", with a port: not a scheme.
        ("stun:3478", "stun", 3478, None, None),
        ("bücher.example", "xn--bcher-kva.example", DEFAULT_PORT, None, None),
        ("_svc.example.org", "_svc.example.org", DEFAULT_PORT, None, None),
    ],
)
def test_forms(text: str, host: str, port: int, ip: object, scheme: object) -> None:
    spec = parse_tracker_spec(text)
    assert (spec.host, spec.port, spec.ip, spec.scheme) == (host, port, ip, scheme)
    # The canonical text parses back to the same spec.
    assert parse_tracker_spec(spec.to_text()) == spec


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("host:", "missing port"),
        (":43283", "missing host"),
        ("host:0", "out of range"),
        ("host:65536", "out of range"),
        ("host:http", "not a number"),
        ("host:-1", "not a number"),
        ("[2001:db8::1", "missing ']'"),
        ("[2001:db8::1]43283", "[IPv6]:port"),
        ("[2001:db8::1]:", "[IPv6]:port"),
        ("[192.0.2.1]:5", "only for IPv6"),
        ("[not-an-ip]:5", "not an IP address"),
        ("2001:db8::1:43283:x", "not an IP address"),
        ("2001:db8::1:433283", "[addr]:port"),
        ("fe80::1%eth0", "zone"),
        ("1.2.3", "not a valid IPv4"),
        ("192.0.2.256", "not a valid IPv4"),
        ("bad_host-.example", "not a valid host name label"),
        ("-bad.example", "not a valid host name label"),
        ("a..b", "not a valid host name label"),
        ("a" * 64 + ".example", "not a valid host name label"),
        ("host name", "spaces"),
        ("host\x00", "control"),
        ("stun://stun.example.org", "without //"),
        ("x" * 400, "too long"),
    ],
)
def test_bad_forms(text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_tracker_spec(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message and len(message) < 200


def test_schemes_can_be_refused_and_ports_defaulted() -> None:
    # With no schemes allowed, "stun:host" is a host "stun" with a bad port.
    with pytest.raises(UsageError):
        parse_tracker_spec("stun:stun.example.org", schemes=())
    assert parse_tracker_spec("192.0.2.1", default_port=53).port == 53


def test_endpoint_of_literal_only() -> None:
    assert parse_tracker_spec("[::1]:9").endpoint() == Endpoint(V6("::1"), 9)
    with pytest.raises(UsageError):
        parse_tracker_spec("example.org").endpoint()


def test_list() -> None:
    specs = parse_tracker_list(" a.example:1, [::1]:2,,192.0.2.3 ")
    assert [s.to_text() for s in specs] == ["a.example:1", "[::1]:2", f"192.0.2.3:{DEFAULT_PORT}"]
    assert parse_tracker_list("") == []


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_never_crashes_on_any_text(text: str) -> None:
    try:
        spec = parse_tracker_spec(text)
    except NattoolError:
        return
    assert isinstance(spec, TrackerSpec)
    assert 1 <= spec.port <= 65535
    assert parse_tracker_spec(spec.to_text()) == spec


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(min_value=1, max_value=65535),
)
def test_every_endpoint_text_is_a_tracker(ip: object, port: int) -> None:
    endpoint = Endpoint(ip, port)  # type: ignore[arg-type]
    spec = parse_tracker_spec(endpoint.to_text())
    assert spec.endpoint() == endpoint


# ------------------------------------------------------------------------ SRV ordering


def rec(priority: int, weight: int, target: str, port: int = 1) -> SrvRecord:
    return SrvRecord(priority=priority, weight=weight, port=port, target=target)


def test_priority_lowest_first_always() -> None:
    records = [rec(20, 5, "d"), rec(10, 60, "a"), rec(10, 30, "b"), rec(5, 0, "e"), rec(10, 10, "c")]
    for seed in range(200):
        order = order_srv(records, random.Random(seed))
        assert sorted(order, key=lambda r: r.priority) == order
        assert order[0].target == "e" and order[-1].target == "d"
        assert sorted(r.target for r in order) == ["a", "b", "c", "d", "e"]


def test_weight_distribution_of_first_pick() -> None:
    records = [rec(10, 60, "a"), rec(10, 30, "b"), rec(10, 10, "c")]
    rng = random.Random(2782)
    trials = 6000
    first = Counter(order_srv(records, rng)[0].target for _ in range(trials))
    for target, share in (("a", 0.6), ("b", 0.3), ("c", 0.1)):
        assert abs(first[target] / trials - share) < 0.03, first


def test_order_independent_of_answer_order_for_a_given_seed() -> None:
    records = [rec(10, 60, "a"), rec(10, 30, "b"), rec(10, 10, "c"), rec(10, 0, "z")]
    expected = order_srv(records, random.Random(7))
    assert order_srv(list(reversed(records)), random.Random(7)) == expected


def test_zero_weight_is_rare_but_possible() -> None:
    records = [rec(1, 0, "zero"), rec(1, 100, "heavy")]
    rng = random.Random(1)
    first = Counter(order_srv(records, rng)[0].target for _ in range(5000))
    # Picked only when the draw is exactly 0 of 0..100: about 1 in 101.
    assert 10 <= first["zero"] <= 120, first


def test_all_zero_weights_still_ordered_and_complete() -> None:
    records = [rec(1, 0, "x"), rec(1, 0, "y"), rec(1, 0, "z")]
    firsts = {order_srv(records, random.Random(s))[0].target for s in range(50)}
    assert firsts == {"x"}  # with all weights 0 the RFC picks the first each round
    assert len(order_srv(records, random.Random(0))) == 3
