"""The serving loop's log lines that can repeat fast: a debug line for dropped junk,
and the store's failures while it is down, each at most one per interval with a
count of those held back; the stop summary's rate-limit drops."""

from __future__ import annotations

import re
import signal
import time

import pytest

from conftest import TrackerFactory, TrackerProcess, ask_on, udp_socket
from nattool.net.log_gate import LogGate

try:
    from redis_server import REDIS_SERVER, SKIP_REASON, RedisServer
except ImportError:  # tests/ imported as a package
    from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer

REG = "//51pwn/P2P&E2E/"
_JUNK_LINE = re.compile(r"event=junk_dropped why='([^']*)' src=(\S+) bytes=(\d+) head=(.*) more=(\d+)")


def wait_for(tp: TrackerProcess, pattern: str, timeout: float = 5.0) -> list[re.Match[str]]:
    """Every match of ``pattern`` in the tracker's log, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(re.finditer(pattern, tp.stderr()))
        if found:
            return found
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{tp.stderr()[-3000:]}"
        time.sleep(0.05)


def test_a_log_gate_lets_the_first_through_then_one_per_interval_with_a_count() -> None:
    gate = LogGate(10.0)
    assert not gate.active
    assert gate.admit(100.0) == 0  # the first: at once
    assert gate.active
    assert [gate.admit(100.0 + t) for t in (1, 2, 9.9)] == [None, None, None]
    assert gate.admit(110.0) == 3  # the next interval: the three held back
    assert gate.admit(111.0) is None
    assert gate.settle() == 1 and not gate.active
    assert gate.admit(112.0) == 0  # after settling, the next is news again


def test_dropped_junk_is_logged_at_debug_at_most_once_a_second(tracker: TrackerFactory) -> None:
    tp = tracker("--log-level", "debug")
    with udp_socket("127.0.0.2") as s:
        me = f"127.0.0.2:{s.getsockname()[1]}"
        s.sendto(b"hello tracker", tp.addr)
        [first] = wait_for(tp, _JUNK_LINE.pattern)
        assert first.group(1) == "not a request" and first.group(2) == me
        assert first.group(3) == "13" and first.group(5) == "0"
        started = time.monotonic()
        for n in range(500):
            s.sendto(b"junk %d" % n, tp.addr)
        assert ask_on(s, b"//nat", tp, timeout=2.0) == me.encode()  # all read by now
        time.sleep(max(0.0, started + 1.1 - time.monotonic()))
        s.sendto(b"more junk", tp.addr)
        assert ask_on(s, b"//nat", tp, timeout=2.0) == me.encode()
        elapsed = time.monotonic() - started
    found = wait_for(tp, _JUNK_LINE.pattern + r"[^\n]*\n[^\n]*" + _JUNK_LINE.pattern)
    lines = list(_JUNK_LINE.finditer(tp.stderr()))
    # The first line, then at most one a second, which count what they held back.
    assert found and 2 <= len(lines) <= 2 + elapsed, [m.group(0) for m in lines]
    assert sum(int(m.group(5)) for m in lines) + len(lines) == 502, [m.group(0) for m in lines]


def test_dropped_junk_is_not_logged_above_debug(tracker: TrackerFactory) -> None:
    tp = tracker()  # info
    with udp_socket("127.0.0.2") as s:
        me = f"127.0.0.2:{s.getsockname()[1]}".encode()
        s.sendto(b"hello tracker", tp.addr)
        assert ask_on(s, b"//nat", tp) == me
    assert "junk_dropped" not in tp.stderr()


def test_the_stop_summary_counts_rate_limit_drops(tracker: TrackerFactory) -> None:
    tp = tracker("--burst", "5", rate_limit="1")
    with udp_socket("127.0.0.5") as s:
        for _ in range(30):
            s.sendto(b"//nat", tp.addr)
        answered = 0
        while ask_on(s, b"", tp, timeout=0.5) is not None:  # the empty datagram is dropped: reads only
            answered += 1
    tp.proc.send_signal(signal.SIGTERM)
    tp.proc.wait(10)
    [stopped] = wait_for(tp, r"event=stopped [^\n]*")
    dropped = re.search(r"\bdrop_rate_limit=(\d+)", stopped.group(0))
    assert dropped is not None, stopped.group(0)
    # The burst went through; what was sent within the same second beyond it did not
    # (the empty datagrams are rate-limited too, and never answered).
    assert 5 <= answered <= 7 and int(dropped.group(1)) >= 30 - answered, (answered, stopped.group(0))


@pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)
def test_expiry_failures_while_redis_is_down_are_one_line_then_a_count(
    tracker: TrackerFactory, redisd: RedisServer
) -> None:
    """The housekeeping expires members twice a second: with Redis down, each one
    fails. The log says so once, then (every 30 s) how many more failed, and when
    Redis is back, that the failures are over and how many went unlogged."""
    tp = tracker(store=redisd.url)
    redisd.stop()
    wait_for(tp, r"event=expire_failed ")
    time.sleep(2.0)  # four more housekeeping ticks, each failing
    assert len(re.findall(r"event=expire_failed ", tp.stderr())) == 1, tp.stderr()[-3000:]
    redisd.start()
    [recovered] = wait_for(tp, r"event=expire_recovered more_failed=(\d+)", timeout=10.0)
    assert int(recovered.group(1)) >= 3, recovered.group(0)
    assert len(re.findall(r"event=expire_failed ", tp.stderr())) == 1
