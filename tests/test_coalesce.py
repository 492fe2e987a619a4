"""The coalescing decision (nattool.tracker.coalesce), with time as an argument."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.tracker.coalesce import HISTORY, MIN_BATCH, TARGET_BATCH, Coalescer

BOUND = 200e-6


def steady(coalescer: Coalescer, rate: float, drains: int, start: float = 0.0, per_drain: int = 1) -> tuple[float, float]:
    """Drains of ``per_drain`` datagrams arriving at ``rate``, no sleeping; the last
    decision and the time of the last drain."""
    gap = per_drain / rate
    now = start
    wait = 0.0
    for _ in range(drains):
        now += gap
        wait = coalescer.after_drain(per_drain, now)
    return wait, now


def test_a_busy_server_waits_the_bound() -> None:
    # 50,000/s: TARGET_BATCH datagrams take 640 us, longer than the bound.
    wait, _ = steady(Coalescer(BOUND), 50_000, HISTORY * 2)
    assert wait == pytest.approx(BOUND)


def test_a_very_busy_server_waits_only_for_a_target_batch() -> None:
    wait, _ = steady(Coalescer(BOUND), 500_000, HISTORY * 2, per_drain=4)
    assert wait == pytest.approx(TARGET_BATCH / 500_000)
    assert wait < BOUND


def test_a_trickle_is_answered_without_a_wait() -> None:
    # 5,000/s brings one datagram within 200 us: not worth a sleep.
    assert 5_000 * BOUND < MIN_BATCH
    wait, _ = steady(Coalescer(BOUND), 5_000, HISTORY * 4)
    assert wait == 0.0


def test_the_first_drain_never_waits() -> None:
    assert Coalescer(BOUND).after_drain(5, 1.0) == 0.0


def test_a_lone_request_after_a_busy_spell_is_answered_at_once() -> None:
    coalescer = Coalescer(BOUND)
    wait, now = steady(coalescer, 50_000, HISTORY * 2)
    assert wait > 0
    # Quiet for 50 ms, then one request: the rate over the last drains is low.
    assert coalescer.after_drain(1, now + 0.05) == 0.0


def test_a_drain_that_read_a_batch_already_does_not_wait() -> None:
    coalescer = Coalescer(BOUND)
    steady(coalescer, 50_000, HISTORY * 2)
    # A backlog (or clients waiting for their answers): sleeping would idle a busy server.
    assert coalescer.after_drain(TARGET_BATCH, 1.0) == 0.0


def test_no_wait_while_the_loop_has_work_due() -> None:
    coalescer = Coalescer(BOUND)
    _, now = steady(coalescer, 50_000, HISTORY * 2)
    assert coalescer.after_drain(1, now + 20e-6, urgent=True) == 0.0
    assert coalescer.after_drain(1, now + 40e-6) > 0


def test_zero_turns_coalescing_off() -> None:
    wait, _ = steady(Coalescer(0.0), 500_000, HISTORY * 2)
    assert wait == 0.0


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError):
        Coalescer(-1e-6)


def test_the_sleeps_lateness_is_taken_off_the_wait() -> None:
    coalescer = Coalescer(BOUND)
    now = 0.0
    for _ in range(1000):
        now += 20e-6
        wait = coalescer.after_drain(1, now)
        if wait:
            coalescer.slept(wait, wait + 30e-6, now + wait + 30e-6)
            now += wait + 30e-6
    assert coalescer.lateness == pytest.approx(30e-6, rel=0.05)
    now += 20e-6
    wait = coalescer.after_drain(10, now)
    assert wait == pytest.approx(BOUND - coalescer.lateness)


def test_a_preempted_sleep_counts_as_at_most_the_bound_late() -> None:
    coalescer = Coalescer(BOUND)
    coalescer.slept(100e-6, 0.5, 1.0)  # the process was off the CPU for half a second
    assert coalescer.lateness <= BOUND


def test_a_bound_below_the_lateness_means_no_wait() -> None:
    coalescer = Coalescer(20e-6)
    for _ in range(100):
        coalescer.slept(10e-6, 10e-6 + 40e-6, 0.0)
    assert coalescer.lateness > 20e-6 * 0.9
    wait, _ = steady(coalescer, 1_000_000, HISTORY * 2, start=1.0, per_drain=8)
    assert wait == 0.0


def test_one_loop_turn_waits_once_for_all_sockets() -> None:
    coalescer = Coalescer(BOUND)
    now = 0.0
    for _ in range(HISTORY * 2):
        now += 20e-6
        coalescer.after_drain(1, now, "v4")
        coalescer.after_drain(1, now, "v6")
    now += 20e-6
    wait = coalescer.after_drain(1, now, "v4")
    assert wait > 0
    coalescer.slept(wait, wait, now + wait)
    # The IPv6 socket's drain right after it, in the same loop turn: no second wait.
    assert coalescer.after_drain(3, now + wait + 10e-6, "v6") == 0.0
    # The IPv4 socket's next drain waits again.
    assert coalescer.after_drain(10, now + wait + 30e-6, "v4") > 0


def test_a_drain_that_does_not_count_keeps_waiting_at_a_steady_rate_and_stops_when_idle() -> None:
    coalescer = Coalescer(BOUND)
    _, now = steady(coalescer, 50_000, HISTORY * 2)
    waits = []
    for _ in range(HISTORY * 2):
        # Each wake-up at 50,000/s after a 200 us wait: 20 us to the next datagram.
        wait = coalescer.after_drain(None, now)
        waits.append(wait)
        if wait:
            coalescer.slept(wait, wait, now + wait)
        now += wait + 20e-6
    assert all(w > 0 for w in waits)
    assert coalescer.after_drain(None, now + 0.05) == 0.0


def test_waits_are_counted() -> None:
    coalescer = Coalescer(BOUND)
    steady(coalescer, 50_000, HISTORY * 2)
    assert coalescer.waits > 0
    before = coalescer.waits
    coalescer.after_drain(1, 10.0)
    assert coalescer.waits == before
    coalescer.slept(100e-6, 120e-6, 10.1)
    coalescer.slept(100e-6, 90e-6, 10.2)
    assert coalescer.waited == pytest.approx(210e-6)


drains = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=0.01, allow_nan=False),  # seconds since the last drain
        st.one_of(st.none(), st.integers(min_value=0, max_value=256)),  # datagrams read
        st.sampled_from(["v4", "v6"]),
        st.floats(min_value=0.0, max_value=0.002, allow_nan=False),  # how late the sleep ends
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(bound=st.sampled_from([0.0, 1e-6, 50e-6, 200e-6, 400e-6, 10e-3]), history=drains)
def test_never_longer_than_the_bound_and_never_negative(bound: float, history: list[tuple[float, int | None, str, float]]) -> None:
    coalescer = Coalescer(bound)
    now = 100.0
    for gap, count, source, late in history:
        now += gap
        wait = coalescer.after_drain(count, now, source)
        assert 0.0 <= wait <= bound
        assert math.isfinite(wait)
        if wait:
            # The wait asked for plus the lateness learned stays within the bound.
            assert wait + coalescer.lateness <= bound * (1 + 1e-9)
            coalescer.slept(wait, wait + late, now + wait + late)
            now += wait + late
