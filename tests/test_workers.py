"""`nattool serve --workers N`: several processes on one port and one store answer as
one tracker, whichever worker the kernel hands a datagram to."""

from __future__ import annotations

from pathlib import Path

from conftest import TrackerProcess, lines, run_nattool, udp_socket

REG = "//51pwn/P2P&E2E/"


def _members_seen(tp: TrackerProcess, group: str, n: int) -> list[int]:
    """Register ``n`` members from ``n`` source sockets (so the kernel's hash spreads
    them over the workers); return how many others each one was told about."""
    counts = []
    socks = [udp_socket(f"127.0.0.{2 + i % 5}") for i in range(n)]
    try:
        for s in socks:
            s.sendto(f"{REG}{group}/0/0/0\noffset=0\n{' ' * 300}".encode(), tp.addr)
            reply = s.recv(2048)
            counts.append(len([ln for ln in lines(reply) if not ln.startswith("next=")]) - 1)
    finally:
        for s in socks:
            s.close()
    return counts


def test_two_workers_on_sqlite_are_one_tracker(tracker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tp: TrackerProcess = tracker("--workers", "2", store=f"sqlite:{tmp_path / 'w.db'}")
    assert "x 2 workers" in tp.banner
    counts = _members_seen(tp, "workers-test", 24)
    # Every newcomer sees everyone before it, whichever worker answered either.
    assert counts == list(range(24)), counts
    # Both workers did some of the work: each logs its counters when it stops.
    assert tp.stop() == 0
    log = tp.stderr() + tp.stdout()
    stopped = [ln for ln in log.splitlines() if "event=stopped" in ln and "worker=" in ln]
    registered = sorted(int(ln.split("register=")[1].split()[0]) for ln in stopped)
    assert len(registered) == 2 and registered[0] > 0 and sum(registered) == 24, stopped


def test_workers_answer_nat_and_stun(tracker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tp: TrackerProcess = tracker("--workers", "2", store=f"sqlite:{tmp_path / 'w.db'}")
    for i in range(10):
        with udp_socket("127.0.0.3") as s:
            s.sendto(b"//nat", tp.addr)
            assert s.recv(100) == f"127.0.0.3:{s.getsockname()[1]}".encode()
            s.sendto(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes([i]) * 12, tp.addr)
            assert s.recv(200)[:2] == b"\x01\x01"


def test_workers_refuse_the_memory_store(tmp_path: Path) -> None:
    result = run_nattool("serve", "--host", "127.0.0.1", "--port", "0", "--store", "memory", "--workers", "2", home=tmp_path)
    assert result.returncode == 2, result
    assert result.stderr.startswith("nattool: error:") and "memory store" in result.stderr
    assert "Traceback" not in result.stderr


def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    result = run_nattool(
        "serve", "--host", "127.0.0.1", "--port", "0", "--store", f"sqlite:{tmp_path / 'x.db'}", "--workers", "2",
        home=tmp_path,
    )
    assert result.returncode == 2, result
    assert "fixed --port" in result.stderr
