"""The bench histogram: percentiles within the stated relative error, exact merge."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.diag.histogram import Histogram


def exact_percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@pytest.mark.parametrize("bits", [3, 7, 10])
def test_percentiles_within_the_relative_error_bound(bits: int) -> None:
    rng = random.Random(bits)
    # Latency-like: log-normal around 200 µs in ns, plus a tail of slow ones.
    values = [int(rng.lognormvariate(12, 1.2)) for _ in range(20_000)] + [rng.randrange(10**9) for _ in range(200)]
    h = Histogram(bits)
    for v in values:
        h.record(v)
    assert h.count == len(values)
    assert h.min == min(values) and h.max == max(values)
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        want = exact_percentile(values, q)
        got = h.percentile(q)
        assert abs(got - want) <= h.relative_error * want + 1, (q, want, got)


def test_the_error_bound_is_tight_enough_to_matter() -> None:
    # A coarse histogram must actually be off by more than a fine one's bound,
    # or the accuracy test above could not fail.
    coarse = Histogram(2)
    coarse.record(1_000_000)
    coarse.record(1_500_000)
    coarse.record(1_900_000)
    assert abs(coarse.percentile(50) - 1_500_000) > Histogram(7).relative_error * 1_500_000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=300), st.floats(min_value=0, max_value=100))
def test_any_values_any_quantile(values: list[int], q: float) -> None:
    h = Histogram()
    for v in values:
        h.record(v)
    want = exact_percentile([min(v, h.max_value) for v in values], q)
    got = h.percentile(q)
    assert abs(got - want) <= h.relative_error * want + 1


def test_buckets_are_contiguous_and_bounded() -> None:
    h = Histogram(5, 1 << 30)
    prev_high = 0
    for i in range(len(h.counts)):
        low, high = h.bucket_bounds(i)
        assert low == prev_high
        assert high - low <= max(1, low / (1 << 5))
        assert h.index(low) == i and h.index(high - 1) == i
        prev_high = high


def test_merge_equals_recording_everything_in_one() -> None:
    rng = random.Random(5)
    a, b, both = Histogram(), Histogram(), Histogram()
    for i in range(5000):
        v = rng.randrange(10**8)
        (a if i % 3 else b).record(v)
        both.record(v)
    a.merge(b)
    assert a.counts == both.counts
    assert (a.count, a.total, a.min, a.max) == (both.count, both.total, both.min, both.max)
    assert a.summary() == both.summary()


def test_dict_round_trip_and_fixed_memory() -> None:
    h = Histogram()
    size = len(h.counts)
    for v in (1, 10**3, 10**6, 10**9, 10**15):  # the last is above max_value: clamped
        h.record(v)
    assert len(h.counts) == size
    back = Histogram.from_dict(h.to_dict())
    assert back.counts == h.counts and back.summary() == h.summary()
    assert h.max == 10**15 and h.percentile(100) == 10**15


def test_minus_gives_the_recent_values() -> None:
    h = Histogram()
    for _ in range(100):
        h.record(1000)
    before = h.copy()
    for _ in range(100):
        h.record(5_000_000)
    recent = h.minus(before)
    assert recent.count == 100
    assert abs(recent.percentile(50) - 5_000_000) <= recent.relative_error * 5_000_000


def test_empty_and_bad_shapes() -> None:
    assert Histogram().percentile(99) == 0
    with pytest.raises(ValueError):
        Histogram(7).merge(Histogram(8))
    with pytest.raises(ValueError):
        Histogram.from_dict({**Histogram().to_dict(), "buckets": {"999999": 1}})
