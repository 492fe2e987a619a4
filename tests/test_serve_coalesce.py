"""Coalescing in a real `nattool serve`: a lone request is answered without a wait,
a busy server waits (and `bench` shows it), and what a server answers does not depend
on it: the fast paths' replies are byte for byte those of a server that never waits,
registrations are committed before they are answered, the rate limit still holds.
With TURN on, the relayed sockets (the peers' side) do not wait.

The counters come from the server's `event=stopped` log line (coalesce_waits: the
waits it decided), so no assertion depends on how fast this machine is, except the
floor under the latency `bench` reports with a long wait, which a busy machine only
raises.
"""

from __future__ import annotations

import json
import re
import select
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

from conftest import TrackerFactory, TrackerProcess, free_udp_tcp_port, run_nattool
from turn_helpers import TurnTestClient, peer_endpoint, turn_client, udp_peer  # noqa: F401 - fixture

from nattool.net.coalescing import _sleep_keeping_the_gil
from nattool.protocol.stun import MAGIC_COOKIE, MsgClass
from nattool.protocol.text import REGISTER_PREFIX

LONG = "10000"  # --coalesce-us at its largest: a wait, where there is one, is plain to see


def stopped_counters(tp: TrackerProcess) -> dict[str, int]:
    """Stop the tracker; the counters of its `event=stopped` line."""
    assert tp.stop() == 0, tp.stderr()[-2000:]
    line = next(line for line in tp.stderr().splitlines() if "event=stopped" in line)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.split("event=stopped", 1)[1])}


def binding_request(n: int) -> bytes:
    return b"\x00\x01\x00\x00" + MAGIC_COOKIE.to_bytes(4, "big") + n.to_bytes(12, "big")


def stream(dest: tuple[str, int], socks: list[socket.socket], payloads: list[bytes], rounds: int) -> list[list[bytes]]:
    """``rounds`` rounds: every socket sends its payload of the round (payloads cycle),
    then the round's replies are read (5 s at most). A round is a few datagrams, so
    the server reads few a drain at a high rate: the case where it waits."""
    replies: list[list[bytes]] = [[] for _ in socks]
    for r in range(rounds):
        for i, sock in enumerate(socks):
            sock.sendto(payloads[(r + i) % len(payloads)], dest)
        pending = set(range(len(socks)))
        deadline = time.monotonic() + 5
        while pending and time.monotonic() < deadline:
            ready, _, _ = select.select([socks[i] for i in pending], [], [], max(0.0, deadline - time.monotonic()))
            for sock in ready:
                i = socks.index(sock)
                replies[i].append(sock.recv(65535))
                pending.discard(i)
        assert not pending, f"round {r}: no reply on {len(pending)} sockets"
    return replies


def test_a_lone_request_is_answered_without_a_wait(tracker: TrackerFactory) -> None:
    lone = tracker("--coalesce-us", LONG)
    busy = tracker("--coalesce-us", LONG)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        for _ in range(30):
            sock.sendto(b"//nat", lone.addr)
            assert sock.recv(100) == f"127.0.0.1:{sock.getsockname()[1]}".encode()
            time.sleep(0.02)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        stream(busy.addr, socks, [b"//nat"], 300)
    finally:
        for s in socks:
            s.close()
    assert stopped_counters(lone)["coalesce_waits"] == 0
    assert stopped_counters(busy)["coalesce_waits"] > 0  # the same server does wait when busy


def test_replies_do_not_depend_on_waiting(tracker: TrackerFactory, tmp_path: Path) -> None:
    # The default SQLite store: registrations are answered once committed, waits or not.
    waiting = tracker("--coalesce-us", LONG, store=f"sqlite:{tmp_path / 'waiting.db'}")
    never = tracker("--coalesce-us", "0", store=f"sqlite:{tmp_path / 'never.db'}")
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(6)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        payloads = [b"//nat", binding_request(7), b"//nat", binding_request(8)]
        # One group per socket: a member's reply lists itself only, the same on both.
        payloads += [f"{REGISTER_PREFIX}coalesce-{s.getsockname()[1]}/0/0/0".encode() for s in socks]
        got = {name: stream(tp.addr, socks, payloads, 120) for name, tp in (("waiting", waiting), ("never", never))}
    finally:
        for s in socks:
            s.close()
    assert got["waiting"] == got["never"]
    kinds = {reply[:2] for replies in got["waiting"] for reply in replies}
    assert b"\x01\x01" in kinds and b"12" in kinds  # STUN success replies and text replies came back
    waiting_counters = stopped_counters(waiting)
    assert waiting_counters["coalesce_waits"] > 0
    assert waiting_counters["register"] == stopped_counters(never)["register"] > 0


def test_housekeeping_and_the_metrics_endpoint_keep_their_turn(tracker: TrackerFactory) -> None:
    mport = free_udp_tcp_port()
    tp = tracker("--coalesce-us", LONG, "--ttl", "1", "--metrics", str(mport))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as member:
        member.settimeout(5)
        member.sendto(f"{REGISTER_PREFIX}coalesce-expiry/0/0/0".encode(), tp.addr)
        assert member.recv(65535).startswith(b"127.0.0.1:")
    scrapes: list[bytes] = []

    def scrape() -> None:
        time.sleep(2.5)  # the member's TTL and a housekeeping tick or more
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
            scrapes.append(resp.read())

    scraper = threading.Thread(target=scrape)
    scraper.start()
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        # About three seconds of waiting for batches: the member's TTL, and more.
        start = time.monotonic()
        while time.monotonic() - start < 3:
            stream(tp.addr, socks, [b"//nat"], 20)
    finally:
        for s in socks:
            s.close()
    scraper.join(10)
    assert scrapes, "the metrics endpoint did not answer while the server waited for batches"
    # Housekeeping expired the member while the stream went on.
    assert re.search(rb"^nattool_expired_members_total [1-9]", scrapes[0], re.M), scrapes[0][-2000:]
    # The waits themselves show on the endpoint, in number and in time.
    assert re.search(rb"^nattool_coalesce_waits_total [1-9]", scrapes[0], re.M), scrapes[0][-2000:]
    waited = re.search(rb"^nattool_coalesce_wait_seconds_total (\S+)$", scrapes[0], re.M)
    assert waited is not None and float(waited.group(1)) > 0, scrapes[0][-2000:]
    assert stopped_counters(tp)["coalesce_waits"] > 0


def test_the_rate_limit_holds_while_waiting(tracker: TrackerFactory) -> None:
    tp = tracker("--coalesce-us", LONG, "--burst", "50", rate_limit="100")
    sent = 0
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            for _ in range(8):
                sock.sendto(b"//nat", tp.addr)
                sent += 1
            if select.select([sock], [], [], 0.001)[0]:
                try:
                    while True:
                        sock.recv(100)
                        answered += 1
                except BlockingIOError:
                    pass
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if select.select([sock], [], [], 0.05)[0]:
                answered += len([sock.recv(100)])
        elapsed = time.monotonic() - start
    counters = stopped_counters(tp)
    assert sent > 1000
    # The bucket: 50 at once, then 100 a second.
    assert answered <= 50 + 100 * elapsed + 1
    assert counters["drop_rate_limit"] > 0
    assert counters["coalesce_waits"] > 0


def test_bench_latency_shows_the_wait(tracker: TrackerFactory) -> None:
    # At 2,000 requests a second a 10 ms bound is worth waiting for (20 datagrams):
    # the server answers in batches every 10 ms, and a request waits 5 ms on average.
    tp = tracker("--coalesce-us", LONG)
    out = run_nattool("bench", tp.endpoint, "--rate", "2000", "--duration", "1", "--warmup", "0.5", "--sockets", "64", "--json")
    assert out.returncode in (0, 1), out.stderr
    doc = json.loads(out.stdout)
    assert doc["answered"] > 1000
    assert doc["latency_ms"]["p50"] >= 2.0
    assert doc["latency_ms"]["max"] >= 8.0
    assert stopped_counters(tp)["coalesce_waits"] > 0


def test_workers_share_the_setting(tracker: TrackerFactory, tmp_path: Path) -> None:
    tp = tracker("--coalesce-us", LONG, "--workers", "2", store=f"sqlite:{tmp_path / 'workers.db'}")
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        replies = stream(tp.addr, socks, [b"//nat"], 200)
        assert all(r == [f"127.0.0.1:{s.getsockname()[1]}".encode()] * 200 for r, s in zip(replies, socks))
    finally:
        for s in socks:
            s.close()
    assert tp.stop() == 0
    waits = [int(m) for m in re.findall(r"event=stopped.* coalesce_waits=(\d+)", tp.stderr())]
    assert len(waits) == 2 and sum(waits) > 0, tp.stderr()[-2000:]



def test_the_wait_keeps_the_gil() -> None:
    """Released, the GIL went to the SQLite log's idle-priority checkpoint thread,
    which could hold it for milliseconds on a busy machine (see nattool/net/coalescing.py)."""
    sleep = _sleep_keeping_the_gil()
    counter = [0]
    stop = threading.Event()

    def other_thread() -> None:
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0)  # gives the GIL back at once

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # no forced switch between reading the counter and sleeping
    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while counter[0] < 10 and time.monotonic() < deadline:
            time.sleep(0.01)  # releases the GIL: the other thread runs
        assert counter[0] >= 10
        before = counter[0]
        sleep(0.05)
        assert counter[0] == before
    finally:
        stop.set()
        thread.join(10)
        sys.setswitchinterval(interval)


# -- the relay's sockets (TURN): the peers' side does not wait ---------------------------
TURN_FLAGS = ("--turn-user", "alice:wonderland", "--allow-peer", "127.0.0.0/8")


def metric_waits(mport: int) -> int:
    """The waits a server has decided so far, from its metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
        found = re.search(rb"^nattool_coalesce_waits_total (\S+)$", resp.read(), re.M)
    assert found is not None
    return int(float(found.group(1)))


def _relayed_rounds(
    client: TurnTestClient, rounds: int, after_setup: Callable[[], None] = lambda: None
) -> list[tuple[str, object, bytes]]:
    """An allocation, four peers (two on channels, two by Data indications), then
    ``after_setup()``, then ``rounds`` rounds in which every peer sends one datagram to
    the relayed address and the client receives the four. Only peers send meanwhile.
    Peers are named by their index."""
    relayed = client.allocate()
    socks = [udp_peer("127.0.0.3") for _ in range(4)]
    try:
        ends = [peer_endpoint(p) for p in socks]
        assert client.permit(*ends).msg_class == MsgClass.SUCCESS
        for number, end in zip((0x4001, 0x4002), ends):
            assert client.bind(number, end).msg_class == MsgClass.SUCCESS
        after_setup()
        got: list[tuple[str, object, bytes]] = []
        for r in range(rounds):
            for i, peer in enumerate(socks):
                peer.sendto(f"round {r} peer {i}".encode(), relayed.sockaddr())
            for _ in socks:
                message = client.receive(5.0)
                assert message is not None, f"round {r}: a relayed datagram is missing"
                kind, via, payload = message
                got.append((kind, ends.index(via) if kind == "data" else via, payload))  # type: ignore[arg-type]
        return got
    finally:
        for peer in socks:
            peer.close()


def test_the_relayed_sockets_do_not_wait(tracker: TrackerFactory, turn_client) -> None:  # type: ignore[no-untyped-def]
    """Only the tracker sockets wait. A relay's datagrams are spread over a socket per
    allocation, so a wait gathers next to nothing into any one drain: measured with
    `benchmarks/relay_bench.py --peer`, waits on the relayed sockets cost 12-21% more
    CPU for the same relayed packets. Peers-only traffic that a tracker socket would wait for
    (rounds of four datagrams, back to back) leaves the count of waits where the
    client's setup left it, and the datagrams relayed are those of a server that
    never waits."""
    mport = free_udp_tcp_port()
    waiting = tracker(*TURN_FLAGS, "--coalesce-us", LONG, "--metrics", str(mport))
    never = tracker(*TURN_FLAGS, "--coalesce-us", "0")
    before: list[int] = []
    got = {
        "waiting": _relayed_rounds(turn_client(waiting), 150, after_setup=lambda: before.append(metric_waits(mport))),
        "never": _relayed_rounds(turn_client(never), 150),
    }
    assert got["waiting"] == got["never"]
    assert {kind for kind, _, _ in got["waiting"]} == {"channel", "data"}
    assert metric_waits(mport) == before[0]
