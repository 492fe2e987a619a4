from __future__ import annotations

from nattool.tracker.ratelimit import SourceRateLimiter


def test_bucket_allows_burst_then_rate() -> None:
    lim = SourceRateLimiter(rate=10, burst=5)
    assert [lim.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert lim.allow("a", 0.1)  # one token back after 100 ms
    assert not lim.allow("a", 0.1)
    assert lim.dropped == 3


def test_one_source_does_not_spend_another() -> None:
    lim = SourceRateLimiter(rate=10, burst=5)
    for _ in range(10_000):
        lim.allow("flood", 0.0)
    assert all(lim.allow("quiet", 0.0) for _ in range(5))


def test_zero_rate_is_off() -> None:
    lim = SourceRateLimiter(rate=0)
    assert all(lim.allow("a", 0.0) for _ in range(1000))
    assert len(lim) == 0


def test_source_table_is_bounded() -> None:
    lim = SourceRateLimiter(rate=1, burst=2, max_sources=100)
    for i in range(100):
        assert lim.allow(f"s{i}", 0.0)
    assert not lim.allow("newcomer", 0.0)  # table full of busy sources: refuse, never grow
    assert lim.allow("newcomer", 10.0)  # idle sources are swept to make room
    assert len(lim) <= 100
