"""`nattool serve --metrics PORT`: a Prometheus endpoint on loopback whose values move
with real traffic (requests by kind, drops by reason, groups, members, store time).
Federation peers are checked in test_federation_three.py, store errors in
test_serve_redis.py (they need a store that can fail)."""

from __future__ import annotations

import struct
import time
import urllib.error
from pathlib import Path
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    TrackerFactory,
    TrackerProcess,
    ask_on,
    free_udp_port,
    lines,
    recv_from,
    run_nattool,
    udp_ask,
    udp_socket,
)

REG = "//51pwn/P2P&E2E/"
STUN_BINDING = struct.pack("!HHI12s", 0x0001, 0, 0x2112A442, b"metrics-test")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers["Content-Type"]
        text = resp.read().decode()
    out: Samples = {}
    # The library's own parser: the text really is the Prometheus exposition format.
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} missing; have {sorted(k[0] for k in samples)}"
    return samples[key]


def wait_for(port: int, name: str, want: float, **labels: str) -> Samples:
    """Gauges are refreshed by the housekeeping timer (0.5 s): poll briefly."""
    deadline = time.monotonic() + 3
    while True:
        samples = scrape(port)
        if value(samples, name, **labels) == want:
            return samples
        assert time.monotonic() < deadline, f"{name}{labels} = {value(samples, name, **labels)}, want {want}"
        time.sleep(0.1)


def test_metrics_move_with_traffic(tracker: TrackerFactory) -> None:
    mport = free_udp_port()
    tp: TrackerProcess = tracker("--metrics", str(mport), "--burst", "5", rate_limit="5")
    before = scrape(mport)
    for kind in ("nat", "register", "trackers", "announce", "stun"):
        assert value(before, "nattool_requests_total", kind=kind, result="ok") == 0
    for reason in ("rate_limit", "amplification_cut", "malformed"):
        assert value(before, "nattool_drops_total", reason=reason) == 0
    assert value(before, "nattool_groups") == 0 and value(before, "nattool_members") == 0

    # A flood from one source: everything past the burst (5) and the rate (5/s) is dropped.
    with udp_socket("127.0.0.7") as flood:
        for _ in range(300):
            flood.sendto(b"//nat", tp.addr)
        answered = 0
        while recv_from(flood, tp, 0.3) is not None:
            answered += 1
    # Malformed text requests, each from its own source (under the limit).
    for n in range(3):
        reply = udp_ask(f"{REG}bad group {n}!/0/0/0".encode(), tp.addr, src_ip=f"127.0.8.{n + 1}")
        assert reply is not None and reply.startswith(b"ERR"), reply
    # A group of 12, then a 13th member whose short, unpadded request has room for
    # only some of them: the list is cut (the amplification rule).
    group = "metrics-amp"
    for n in range(12):
        assert udp_ask(f"{REG}{group}/0/0/0".encode(), tp.addr, src_ip=f"127.0.6.{n + 1}") is not None
    with udp_socket("127.0.6.13") as last:
        rows = lines(ask_on(last, f"{REG}{group}/0/0/0".encode(), tp))
    assert 1 < len(rows) < 13, rows
    assert udp_ask(b"//tcksvr", tp.addr, src_ip="127.0.0.9") is not None
    stun = udp_ask(STUN_BINDING, tp.addr, src_ip="127.0.0.9")
    assert stun is not None and stun[:2] == b"\x01\x01"

    after = wait_for(mport, "nattool_members", 13)
    dropped = value(after, "nattool_drops_total", reason="rate_limit")
    assert dropped == 300 - answered and dropped >= 250, (dropped, answered)
    assert value(after, "nattool_requests_total", kind="nat", result="ok") == answered
    assert value(after, "nattool_drops_total", reason="malformed") == 3
    assert value(after, "nattool_drops_total", reason="amplification_cut") >= 1
    assert value(after, "nattool_requests_total", kind="register", result="ok") == 13
    assert value(after, "nattool_requests_total", kind="trackers", result="ok") == 1
    assert value(after, "nattool_requests_total", kind="stun", result="ok") == 1
    assert value(after, "nattool_groups") == 1
    assert value(after, "nattool_store_batches_total") >= 1
    assert value(after, "nattool_store_seconds_total") > 0
    assert value(after, "nattool_store_errors_total") == 0
    assert value(after, "nattool_federation_peers") == 0


def test_metrics_listen_on_loopback_only_when_given_a_port(tracker: TrackerFactory) -> None:
    mport = free_udp_port()
    tp: TrackerProcess = tracker("--metrics", str(mport))
    scrape(mport, "127.0.0.1")
    assert tcp_listeners(tp.proc.pid) == [f"0100007F:{mport:04X}"]
    # Bound to 127.0.0.1 exactly, not to every address (127.0.0.2 is loopback too).
    with pytest.raises(urllib.error.URLError):
        scrape(mport, "127.0.0.2")


def test_metrics_are_off_by_default_and_a_bad_address_is_a_usage_error(
    tracker: TrackerFactory, nattool_home: Path
) -> None:
    args = ("serve", "--host", "127.0.0.1", "--port", "0", "--store", "memory", "--metrics", "localhost:x")
    res = run_nattool(*args, home=nattool_home)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stderr.strip().count("\n") == 0 and "--metrics" in res.stderr, res.stderr
    tp: TrackerProcess = tracker()
    assert tcp_listeners(tp.proc.pid) == [], "a TCP port is open although --metrics was not given"


def tcp_listeners(pid: int) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that process ``pid`` holds."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for row in fh.readlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    found.append(cols[1])
    return found
