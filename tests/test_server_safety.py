"""The server under hostile input, on real UDP: the amplification bound on every reply,
big groups, padding, per-source rate limits, odd datagram sizes, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
import uuid

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import TrackerProcess, ask_on, lines, recv_from, start_tracker, udp_socket

REG = "//51pwn/P2P&E2E/"


def bound(request_len: int) -> int:
    return min(max(3 * request_len, 128), 1200)


# -- the amplification bound on any input -------------------------------------------------

_G = "0f8fad5b-d9cb-469f-a165-70867728950e"
VALID = [
    b"//nat",
    b"//nat\nfoo=bar",
    b"//tcksvr",
    b"//tcksvr/127.0.0.1:43283;127.0.0.2:9",
    f"{REG}{_G}/0/192.168.0.56,172.66.0.10/77:5b:67:a5:87:66".encode(),
    f"{REG}{_G}/0/0/0".encode(),
    f"{REG}{_G}/0/02:42:ac:11:00:03-192.168.1.11".encode(),
    f"{REG}{_G}/0/02:42:ac:11:00:02-192.168.1.10,10.0.0.5;02:42:ac:11:00:09-10.0.0.9".encode(),
    f"{REG}{_G}/0/0/0\noffset=0\n".encode() + b" " * 40,
    f"{REG}{_G.upper()}/0/0/aabbccddeeff\noffset=3".encode(),
    # A STUN Binding request (RFC 8489) and a classic RFC 3489 one: same port.
    struct.pack("!HHI12s", 0x0001, 0, 0x2112A442, b"hypothesis01"),
    struct.pack("!HH16s", 0x0001, 0, b"classic-rfc3489!"),
    struct.pack("!HHI12sHHI", 0x0001, 8, 0x2112A442, b"hypothesis02", 0x0003, 4, 6),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate", "dup", "pad", "newline"]))
        pos = draw(st.integers(0, len(data)))
        if op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "dup":
            data[pos:pos] = data[: draw(st.integers(0, 64))]
        elif op == "pad":
            data += b"\n" + b"\x00 x"[draw(st.integers(0, 2))].to_bytes(1, "big") * draw(st.integers(0, 1400))
        elif op == "newline":
            data[pos:pos] = draw(st.sampled_from([b"\n", b"/", b";", b",", b"-", b":", b"=", b"\r\n"]))
    return bytes(data[:65000])


payloads = st.one_of(st.binary(min_size=0, max_size=1500), mutated(), st.sampled_from(VALID))


class Marker:
    """Orders replies: a registration in a group with a known other member. Replies
    go out in the order requests were handled (registrations are flushed in order,
    everything else is answered at once), so whatever arrives before the marker's
    own reply answers the datagram sent before it."""

    def __init__(self, tp: TrackerProcess) -> None:
        self.group = "marker-" + uuid.uuid4().hex
        with udp_socket("127.0.0.9") as other:
            reply = ask_on(other, f"{REG}{self.group}/0/0/0".encode(), tp)
            assert reply is not None
            self.other = lines(reply)[0]
        self.request = f"{REG}{self.group}/0/0/0".encode()

    def reply_for(self, sock: socket.socket) -> bytes:
        ip, port = sock.getsockname()[:2]
        return f"{ip}:{port}\n{self.other}".encode()


def test_no_reply_exceeds_the_bound_on_any_input(shared_tracker: TrackerProcess) -> None:
    tp = shared_tracker
    marker = Marker(tp)
    sock = udp_socket("127.0.0.4")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    marker_reply = marker.reply_for(sock)
    answered = {"n": 0, "examples": 0}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(payload=payloads)
    def check(payload: bytes) -> None:
        answered["examples"] += 1
        sock.sendto(payload, tp.addr)
        sock.sendto(marker.request, tp.addr)
        replies: list[bytes] = []
        while True:
            data = recv_from(sock, tp, 3.0)
            assert data is not None, f"server stalled after {payload[:80]!r}"
            if data == marker_reply:
                break
            replies.append(data)
        assert len(replies) <= 1, (payload[:80], replies)
        for reply in replies:
            answered["n"] += 1
            assert len(reply) <= bound(len(payload)), (payload[:120], len(payload), len(reply))
            assert len(reply) <= 1200
            if payload[:2] == b"//" and not reply.startswith(b"ERR"):
                reply.decode("ascii")  # text replies are ASCII

    try:
        check()
    finally:
        sock.close()
    # The test must exercise answers, not only silence.
    assert answered["examples"] >= 300 and answered["n"] >= 50, answered
    with udp_socket("127.0.0.4") as s2:
        assert ask_on(s2, b"//nat", tp) == f"127.0.0.4:{s2.getsockname()[1]}".encode()
    assert tp.alive()
    assert "Traceback" not in tp.stderr()


# -- big groups and padding ------------------------------------------------------------------


def test_big_group_replies_stay_within_the_bound_newest_kept(shared_tracker: TrackerProcess) -> None:
    tp = shared_tracker
    group = str(uuid.uuid4())
    members: list[str] = []
    for ip in ("127.0.0.7", "127.0.0.8"):
        socks = [udp_socket(ip) for _ in range(100)]
        try:
            for s in socks:
                s.sendto(f"{REG}{group}/0/10.7.0.1/0".encode(), tp.addr)
                assert recv_from(s, tp, 2.0) is not None
                members.append(f"{ip}:{s.getsockname()[1]}")
        finally:
            for s in socks:
                s.close()
    newest_first = members[::-1]

    def register(payload: bytes) -> list[str]:
        with udp_socket("127.0.0.2") as me:
            reply = ask_on(me, payload, tp)
            assert reply is not None and not reply.startswith(b"ERR"), reply
            assert len(reply) <= bound(len(payload)), (len(payload), len(reply))
            got = lines(reply)
            assert got[0] == f"127.0.0.2:{me.getsockname()[1]}"
            return got[1:]

    # One identity for the three asks below: each replaces the last, not adds to it.
    bare = f"{REG}{group}/0/0/aa:aa:aa:aa:aa:01".encode()
    small = register(bare)
    # Cut, newest kept, and no LAN addresses for members behind another public IP.
    assert 0 < len(small) < 200
    assert small == newest_first[: len(small)]
    padded = register(bare + b"\n" + b" " * 300)
    assert len(padded) > len(small), "padding did not raise the size of the reply"
    assert padded == newest_first[: len(padded)]
    huge = register(bare + b"\n" + b"x" * 3000)
    assert len(huge) > len(padded) and len(huge) < 200
    assert huge == newest_first[: len(huge)]
    # The reply uses nearly all of the 1200-byte datagram: the cut is by size, not by count.
    assert len("\n".join(huge)) + 40 > 1200 - 20


# -- per-source rate limits ------------------------------------------------------------------------


def test_a_flood_from_one_source_does_not_starve_another(tracker) -> None:  # type: ignore[no-untyped-def]
    tp: TrackerProcess = tracker(rate_limit="20")
    flood = udp_socket("127.0.0.5")
    flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sent = {"n": 0}
    started = time.monotonic()

    def blast() -> None:
        for _ in range(2000):
            try:
                flood.sendto(b"//nat", tp.addr)
                sent["n"] += 1
            except OSError:
                time.sleep(0.001)

    thread = threading.Thread(target=blast)
    thread.start()
    answers = []
    with udp_socket("127.0.0.6") as good:
        want = f"127.0.0.6:{good.getsockname()[1]}".encode()
        for _ in range(10):
            answers.append(ask_on(good, b"//nat", tp, timeout=1.0))
            time.sleep(0.03)
    thread.join()
    elapsed = time.monotonic() - started
    got = 0
    while recv_from(flood, tp, 0.3) is not None:
        got += 1
    flood.close()
    assert answers == [want] * 10
    assert sent["n"] == 2000
    # Burst (2 x rate) plus the rate over the test's duration, with slack.
    assert got <= 40 + 20 * elapsed + 10, (got, elapsed)
    assert got >= 20, "the flooding source got nothing at all: the limiter is not a bucket"


def test_rate_limit_applies_to_registrations_too(tracker) -> None:  # type: ignore[no-untyped-def]
    tp: TrackerProcess = tracker("--burst", "5", rate_limit="5")
    with udp_socket("127.0.0.5") as s:
        started = time.monotonic()
        for _ in range(50):
            s.sendto(f"{REG}rl-test/0/0/0".encode(), tp.addr)
        got, last = 0, started
        while recv_from(s, tp, 0.3) is not None:
            got += 1
            last = time.monotonic()
    # The burst, plus what the bucket refilled while the server worked through them.
    assert 5 <= got <= 5 + 5 * (last - started) + 1, (got, last - started)


# -- odd sizes, shutdown ----------------------------------------------------------------------------


def test_server_survives_empty_and_huge_datagrams(shared_tracker: TrackerProcess) -> None:
    tp = shared_tracker
    with udp_socket("127.0.0.4") as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 18)
        me = f"127.0.0.4:{s.getsockname()[1]}".encode()
        for payload in (b"", b"A" * 65000, b"\x00" * 65000):
            s.sendto(payload, tp.addr)
        # A //nat padded with 64,995 newlines is still a //nat (and answered first:
        # nothing before it deserved an answer).
        assert ask_on(s, b"//nat" + b"\n" * 64995, tp, timeout=2.0) == me
        huge_text = b"//51pwn/P2P&E2E/" + b"g" * 64984
        reply = ask_on(s, huge_text, tp, timeout=2.0)
        assert reply is not None and reply.startswith(b"ERR ") and len(reply) <= 64, reply
        assert ask_on(s, b"//nat", tp) == me
    assert tp.alive()
    assert "Traceback" not in tp.stderr()


def _stop_timed(tp: TrackerProcess, sig: int) -> tuple[int, float]:
    started = time.monotonic()
    tp.proc.send_signal(sig)
    code = tp.proc.wait(10)
    return code, time.monotonic() - started


def test_sigterm_exits_cleanly_and_quickly(tracker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tp: TrackerProcess = tracker(store=f"sqlite:{tmp_path / 'state.db'}")
    with udp_socket("127.0.0.2") as s:
        assert ask_on(s, f"{REG}sigterm/0/0/0".encode(), tp) is not None
        # Registrations in flight while the signal arrives must not break shutdown.
        for _ in range(20):
            s.sendto(f"{REG}sigterm/0/0/0".encode(), tp.addr)
        code, took = _stop_timed(tp, signal.SIGTERM)
    assert code == 0, tp.stderr()
    assert took < 3.0, took
    assert "Traceback" not in tp.stderr()
    assert "event=stopped" in tp.stderr()
    assert os.path.exists(tmp_path / "state.db")


def test_sigint_exits_cleanly(tmp_path, nattool_home) -> None:  # type: ignore[no-untyped-def]
    tp = start_tracker(workdir=tmp_path, home=nattool_home)
    code, took = _stop_timed(tp, signal.SIGINT)
    assert code == 130, tp.stderr()  # interrupted, as every command after Ctrl-C
    assert took < 3.0
    assert "Traceback" not in tp.stderr() and "event=stopped" in tp.stderr()


def test_the_source_address_cache_stays_bounded_and_right() -> None:
    from nattool.memo import bounded_memo
    from nattool.net.server import v4_address

    cache, learn = bounded_memo(v4_address, 3)
    hosts = [f"198.51.100.{i}" for i in range(10)]
    for round_ in range(2):
        for host in hosts:
            got = cache.get(host)
            if got is None:
                got = learn(host)
            assert got == int.from_bytes(socket.inet_aton(host), "big"), (round_, host)
            assert len(cache) <= 3


def test_rate_limit_keys_ipv6_sources_too(tracker) -> None:  # type: ignore[no-untyped-def]
    from test_stun_interop import _free_udp6_port

    tp: TrackerProcess = tracker("--burst", "5", rate_limit="5", host="::1", port=_free_udp6_port())
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        started = time.monotonic()
        for _ in range(50):
            s.sendto(b"//nat", ("::1", tp.port))
        got, last = 0, started
        s.settimeout(0.3)
        while True:
            try:
                reply = s.recv(2048)
            except socket.timeout:
                break
            assert reply == f"[::1]:{s.getsockname()[1]}".encode()
            got += 1
            last = time.monotonic()
    # The burst, plus what the bucket refilled while the server worked through them.
    assert 5 <= got <= 5 + 5 * (last - started) + 1, (got, last - started)
