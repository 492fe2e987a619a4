"""`--keepalive auto`'s rule (pure): the interval from a measured lifetime, its age, the
tracker TTL and the safe default."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from nattool.protocol.keepalive_rules import (
    FRESH_FOR,
    MAX_INTERVAL,
    MIN_INTERVAL,
    SAFE_DEFAULT,
    TRACKER_TTL,
    KeepaliveSource,
    LifetimeBracket,
    auto_keepalive,
    describe_age,
    given_keepalive,
)


def test_nothing_measured_is_the_safe_default() -> None:
    plan = auto_keepalive(None, None)
    assert (plan.interval, plan.register_every, plan.source) == (SAFE_DEFAULT, SAFE_DEFAULT, KeepaliveSource.DEFAULT)
    assert plan.to_json()["lifetime"] is None and plan.to_json()["age_s"] is None


def test_safe_default_survives_the_30s_timeouts_it_is_meant_for() -> None:
    # Linux conntrack's 30 s and Tailscale's assumption, with room to spare.
    assert SAFE_DEFAULT <= 25 and SAFE_DEFAULT <= 30 * 2 / 3


def test_short_measured_lifetime_gives_half_the_proven_lifetime() -> None:
    # A router that forgets idle UDP after 12 s: the probe ladder sees it alive at 10 s,
    # gone at 20 s. The default (20 s) would lose the mapping; half of 10 s does not.
    plan = auto_keepalive(LifetimeBracket(10, 20), age=60)
    assert plan.source is KeepaliveSource.MEASURED
    assert plan.interval == 5 and plan.register_every == 5
    assert plan.interval < SAFE_DEFAULT
    assert "10..20 s" in plan.reason and "measured 60 s ago" in plan.reason


def test_long_lifetime_lengthens_up_to_the_cap_and_registrations_stay_under_the_ttl() -> None:
    plan = auto_keepalive(LifetimeBracket(90, 120), age=10)
    assert plan.interval == 45 and plan.register_every == TRACKER_TTL / 4
    plan = auto_keepalive(LifetimeBracket(300, None), age=10)
    assert plan.interval == MAX_INTERVAL and "at most" in plan.reason
    assert plan.register_every == 30
    assert auto_keepalive(LifetimeBracket(300, None), 10, tracker_ttl=40).register_every == 10


def test_no_expiry_seen_within_short_waits_keeps_the_default() -> None:
    # `probe --lifetime --lifetime-max 5`: alive at 5 s says nothing against 20 s.
    plan = auto_keepalive(LifetimeBracket(5, None), age=1)
    assert plan.interval == SAFE_DEFAULT and plan.source is KeepaliveSource.DEFAULT
    assert plan.lifetime == LifetimeBracket(5, None) and "no expiry seen" in plan.reason


def test_tiny_lifetime_is_floored() -> None:
    plan = auto_keepalive(LifetimeBracket(0, 2), age=5)
    assert plan.interval == MIN_INTERVAL and "at least" in plan.reason


def test_old_measurement_may_only_shorten() -> None:
    old = FRESH_FOR + 1
    longer = auto_keepalive(LifetimeBracket(120, 180), age=old)
    assert longer.interval == SAFE_DEFAULT and longer.source is KeepaliveSource.DEFAULT
    assert "too old" in longer.reason
    shorter = auto_keepalive(LifetimeBracket(10, 20), age=old)
    assert shorter.interval == 5 and shorter.source is KeepaliveSource.MEASURED
    # A measurement from the future (the clock moved back) has no known age.
    assert auto_keepalive(LifetimeBracket(120, 180), age=-50).interval == SAFE_DEFAULT
    assert auto_keepalive(LifetimeBracket(120, 180), age=None).interval == SAFE_DEFAULT


def test_given_interval_is_kept() -> None:
    plan = given_keepalive(7.5, 20)
    assert (plan.interval, plan.register_every, plan.source) == (7.5, 20, KeepaliveSource.GIVEN)
    assert plan.to_json()["source"] == "given"


@pytest.mark.parametrize(("age", "text"), [(5, "5 s"), (600, "10 min"), (7200, "2 h"), (3 * 86400, "3 days"), (None, "an unknown time")])
def test_describe_age(age: float | None, text: str) -> None:
    assert describe_age(age) == text


@given(
    at_least=st.floats(0, 3600),
    span=st.one_of(st.none(), st.floats(0.5, 3600)),
    age=st.one_of(st.none(), st.floats(-1e6, 1e9)),
    ttl=st.floats(4, 86400),
)
def test_interval_is_always_safe(at_least: float, span: float | None, age: float | None, ttl: float) -> None:
    """Whatever was measured: within [MIN, MAX], never more than half the proven
    lifetime (unless floored), registrations within a quarter of the TTL."""
    bracket = LifetimeBracket(at_least, None if span is None else at_least + span)
    plan = auto_keepalive(bracket, age, tracker_ttl=ttl)
    assert MIN_INTERVAL <= plan.interval <= MAX_INTERVAL
    if bracket.below is not None:
        assert plan.interval <= max(at_least / 2, MIN_INTERVAL)
        assert plan.interval < bracket.below or plan.interval == MIN_INTERVAL  # floored
    else:
        assert plan.interval >= SAFE_DEFAULT
    assert plan.interval <= SAFE_DEFAULT or (age is not None and 0 <= age <= FRESH_FOR)
    assert plan.register_every <= min(plan.interval, ttl / 4)
