"""Trackers announcing themselves to each other, on real UDP between real servers:
only endpoints that answer `//nat` themselves, and only from their own IP, get listed."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

from conftest import TrackerProcess, ask_on, udp_socket


def tracker_list(tp: TrackerProcess) -> list[str] | None:
    with udp_socket("127.0.0.4") as s:
        reply = ask_on(s, b"//tcksvr", tp)
    return None if reply is None else [line for line in reply.decode("ascii").split("\n") if line]


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_announced_trackers_are_verified_before_listing(tracker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a: TrackerProcess = tracker()
    b: TrackerProcess = tracker()
    c: TrackerProcess = tracker()
    assert tracker_list(a) == []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead_sock:
        # A port that was bound a moment ago and has nothing behind it now.
        dead_sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{dead_sock.getsockname()[1]}"

    with udp_socket("127.0.0.1") as s:
        # The answer to an announcement is the list as it is now: B is not verified yet.
        reply = ask_on(s, f"//tcksvr/{b.endpoint}".encode(), a)
        assert reply is not None and b.endpoint.encode() not in reply
        assert ask_on(s, f"//tcksvr/{dead}".encode(), a) is not None
    with udp_socket("127.0.0.2") as s:
        # C really is a tracker, but the announcement does not come from C's IP.
        assert ask_on(s, f"//tcksvr/{c.endpoint}".encode(), a) is not None

    assert wait_for(lambda: b.endpoint in (tracker_list(a) or []), 5.0), tracker_list(a)
    # The forged ones had as long as B, and more: nothing answers for the dead port,
    # and C's IP is not the sender's, so they are never even probed.
    time.sleep(1.0)
    listed = tracker_list(a) or []
    assert dead not in listed
    assert c.endpoint not in listed
    assert b.endpoint in listed
    # B itself was only probed, never told anything: its own list is unchanged.
    assert tracker_list(b) == []


class LyingTracker:
    """Announces itself honestly (its own IP), then answers the `//nat` verification
    probe with someone else's endpoint."""

    def __init__(self, lie: bytes) -> None:
        self.sock = udp_socket("127.0.0.3", timeout=0.1)
        self.endpoint = "127.0.0.3:%d" % self.sock.getsockname()[1]
        self.lie = lie
        self.probes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            if data == b"//nat":
                self.probes += 1
                self.sock.sendto(self.lie, addr)

    def announce(self, tp: TrackerProcess) -> None:
        self.sock.sendto(f"//tcksvr/{self.endpoint}".encode(), tp.addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_a_verified_stranger_cannot_set_the_trackers_own_endpoint(tracker) -> None:  # type: ignore[no-untyped-def]
    """A tracker that has not been told its public endpoint must not take it from any
    stranger's answer: otherwise one announcement puts a third party's address at the
    head of the list every client downloads (192.0.2.1 is a documentation address; it
    only ever appears as text here)."""
    a: TrackerProcess = tracker()
    liar = LyingTracker(b"192.0.2.1:9")
    try:
        liar.announce(a)
        assert wait_for(lambda: liar.endpoint in (tracker_list(a) or []), 5.0), tracker_list(a)
        assert liar.probes >= 1
        listed = tracker_list(a) or []
        assert "192.0.2.1:9" not in listed, f"a stranger set the tracker's own endpoint: {listed}"
    finally:
        liar.close()
