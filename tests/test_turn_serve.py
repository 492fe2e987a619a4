"""`nattool serve` with TCP on the tracker port and the TURN relay, on loopback: real
`nattool serve` processes, real sockets, requests built with nattool's own codecs."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import TrackerProcess, ask_on, run_nattool, udp_ask
from nattool.protocol.stream_frames import StreamDeframer, StunFrame, TextFrame, text_frame
from nattool.protocol.stun import binding_request, parse
from nattool.protocol.text import RelayGrant, RelayRequest

REG = "//51pwn/P2P&E2E/"


class Stream:
    """A TCP connection to a tracker port that speaks frames."""

    def __init__(self, addr: tuple[str, int], src_ip: str = "127.0.0.2") -> None:
        self.sock = socket.create_connection(addr, timeout=5, source_address=(src_ip, 0))
        self.deframer = StreamDeframer()
        self.frames: list[object] = []

    @property
    def local(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, timeout: float = 5.0) -> object:
        """The next frame, or AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.frames:
            left = deadline - time.monotonic()
            assert left > 0, "no frame in time"
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            assert data, "connection closed"
            self.frames += self.deframer.feed(data)
        return self.frames.pop(0)

    def text(self, payload: bytes, timeout: float = 5.0) -> bytes:
        self.send(text_frame(payload))
        frame = self.frame(timeout)
        assert isinstance(frame, TextFrame), frame
        return frame.payload

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stream_of(tracker):  # type: ignore[no-untyped-def]
    opened: list[Stream] = []

    def connect(tp: TrackerProcess, src_ip: str = "127.0.0.2") -> Stream:
        stream = Stream(tp.addr, src_ip)
        opened.append(stream)
        return stream

    yield connect
    for stream in opened:
        stream.close()


# -- TCP on the tracker port -------------------------------------------------------------


def test_text_requests_in_frames_answer_as_over_udp(tracker, stream_of) -> None:  # type: ignore[no-untyped-def]
    tp = tracker("--tcp")
    assert "and tcp 127.0.0.1:%d" % tp.port in tp.banner
    left = stream_of(tp, "127.0.0.2")
    # //nat over TCP names the TCP source endpoint (the TCP mapping).
    assert left.text(b"//nat") == left.local.encode()
    first = left.text(f"{REG}tcpgroup/0/0/0".encode())
    assert first.decode() == left.local
    # A UDP member and the TCP member see each other.
    via_udp = udp_ask(f"{REG}tcpgroup/0/0/0".encode(), tp.addr, src_ip="127.0.0.3", timeout=3)
    assert via_udp is not None and left.local in via_udp.decode().split("\n")
    again = left.text(f"{REG}tcpgroup/0/0/0".encode()).decode().split("\n")
    assert again[0] == left.local and len(again) == 2 and again[1].startswith("127.0.0.3:")
    # The empty reply ("I know no trackers") is an empty frame.
    assert left.text(b"//tcksvr") == b""
    # Several frames in one segment, each answered in order of the frames.
    left.send(text_frame(b"//nat") + text_frame(b"//nat"))
    assert [left.frame(), left.frame()] == [TextFrame(left.local.encode())] * 2


def test_frames_split_across_segments(tracker, stream_of) -> None:  # type: ignore[no-untyped-def]
    tp = tracker("--tcp")
    stream = stream_of(tp)
    stream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    whole = text_frame(b"//nat") + binding_request(b"T" * 12)
    for i in range(len(whole)):
        stream.send(whole[i : i + 1])
        time.sleep(0.002)
    assert stream.frame() == TextFrame(stream.local.encode())
    reply = stream.frame()
    assert isinstance(reply, StunFrame)
    message = parse(reply.data)
    assert message.transaction_id == b"T" * 12
    assert str(message.attributes[0].endpoint) == stream.local  # type: ignore[attr-defined]


def test_garbage_closes_only_that_connection(tracker, stream_of) -> None:  # type: ignore[no-untyped-def]
    tp = tracker("--tcp")
    good, bad, junk = stream_of(tp, "127.0.0.2"), stream_of(tp, "127.0.0.3"), stream_of(tp, "127.0.0.4")
    bad.send(b"\xff\xff" + b"x" * 100)  # a text frame of 32767 bytes: there is none
    assert bad.closed_by_server()
    junk.send(text_frame(b"hello"))  # a text frame that is no request
    assert junk.closed_by_server()
    assert good.text(b"//nat") == good.local.encode()
    assert tp.ask(b"//nat") is not None  # UDP unaffected


def test_a_stalled_client_does_not_block_others(tracker, stream_of) -> None:  # type: ignore[no-untyped-def]
    tp = tracker("--tcp")
    stalled = stream_of(tp, "127.0.0.2")
    stalled.send(text_frame(b"//nat" + b" " * 50)[:10])  # half a frame, never finished
    others = [stream_of(tp, "127.0.0.4") for _ in range(5)]
    for other in others:
        assert other.text(b"//nat") == other.local.encode()
    # Half a frame is not a way to hold a connection: closed after PARTIAL_FRAME_TIMEOUT.
    assert stalled.closed_by_server(timeout=20)


def test_connections_per_source_are_capped(tracker, stream_of) -> None:  # type: ignore[no-untyped-def]
    from nattool.net.tcp_listener import MAX_CONNECTIONS_PER_SOURCE

    tp = tracker("--tcp")
    held = [stream_of(tp, "127.0.0.5") for _ in range(MAX_CONNECTIONS_PER_SOURCE)]
    assert held[-1].text(b"//nat") == held[-1].local.encode()
    extra = stream_of(tp, "127.0.0.5")
    assert extra.closed_by_server()
    other_source = stream_of(tp, "127.0.0.6")
    assert other_source.text(b"//nat") == other_source.local.encode()


def test_udp_clients_unaffected_and_tcp_off_by_default(tracker) -> None:  # type: ignore[no-untyped-def]
    tp = tracker()
    assert "tcp" not in tp.banner
    assert tp.ask(b"//nat") is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(tp.addr, timeout=2).close()


# -- //relay without --relay -------------------------------------------------------------


def test_relay_request_refused_without_relay(tracker) -> None:  # type: ignore[no-untyped-def]
    tp = tracker()
    assert tp.ask(RelayRequest("grp").to_wire()) == b"ERR relay off"
    with pytest.raises(Exception):
        RelayGrant.from_wire(b"ERR relay off")


# -- flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--relay", "--workers", "2"], "needs --workers 1"),
        (["--turn-user", "alice:pw", "--workers", "3"], "needs --workers 1"),
        (["--turn-user", "alice"], "bad --turn-user"),
        (["--turn-user", "alice:pw", "--turn-user", "alice:other"], "given twice"),
        (["--relay", "--relay-ports", "60000-50000"], "bad --relay-ports"),
        (["--relay", "--relay-ports", "abc"], "bad --relay-ports"),
        (["--relay-ports", "60000-50000"], "bad --relay-ports"),  # relay off: still an error
        (["--relay-ip", "0.0.0.0"], "bad --relay-ip"),
        (["--relay", "--allow-peer", "10.0.0.0/33"], "--allow-peer: bad CIDR"),
        (["--relay", "--deny-peer", "nope"], "--deny-peer: bad CIDR"),
        (["--relay", "--relay-ip", "0.0.0.0"], "bad --relay-ip"),
        (["--relay", "--relay-ip", "192.0.2.1", "--relay-ip", "192.0.2.2"], "one address per family"),
        (["--relay", "--realm", "two words"], "bad --realm"),
        (["--relay", "--max-allocations", "0"], "--max-allocations"),
        (["--relay", "--relay-bandwidth", "-1"], "--relay-bandwidth"),
    ],
)
def test_bad_turn_flags_are_one_line_exit_2(args: list[str], fragment: str, nattool_home: Path) -> None:
    result = run_nattool("serve", "--store", "memory", "--port", "0", *args, home=nattool_home)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "pw" not in result.stderr.replace("--workers", "")  # no password echoed


# -- the TURN relay ------------------------------------------------------------------------

from nattool.protocol.stun import MsgClass  # noqa: E402
from nattool.protocol.turn import RequestedTransport, TurnMethod, encode_channel_data  # noqa: E402
from turn_helpers import TurnTestClient, error_of, peer_endpoint, recv_or_none, turn_client, udp_peer  # noqa: E402, F401 - fixture

TURN_FLAGS = ("--turn-user", "alice:wonderland", "--allow-peer", "127.0.0.0/8")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_allocate_permission_send_data_channel_refresh(transport: str, tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker(*TURN_FLAGS)
    assert "turn on" in tp.banner
    client = turn_client(tp, transport=transport)
    relayed = client.allocate()
    assert str(relayed.ip) == "127.0.0.1" and 49152 <= relayed.port <= 65535
    peer = udp_peer("127.0.0.3")
    try:
        target = peer_endpoint(peer)
        # Nothing passes before a permission, either way.
        client.send_to(target, b"too early")
        assert recv_or_none(peer, 0.5) is None
        assert client.permit(target).msg_class == MsgClass.SUCCESS
        client.send_to(target, b"hello peer")
        got = recv_or_none(peer, 3)
        assert got is not None and got[0] == b"hello peer" and got[1] == relayed.sockaddr()
        peer.sendto(b"hello client", relayed.sockaddr())
        assert client.receive() == ("data", target, b"hello client")
        # A channel: ChannelData both ways (padded over TCP, not over UDP).
        assert client.bind(0x4001, target).msg_class == MsgClass.SUCCESS
        client.send_channel(0x4001, b"odd")
        got = recv_or_none(peer, 3)
        assert got is not None and got[0] == b"odd"
        peer.sendto(b"12345", relayed.sockaddr())
        assert client.receive() == ("channel", 0x4001, b"12345")
        assert client.refresh(300).msg_class == MsgClass.SUCCESS
        # Lifetime 0 deletes the allocation: its relayed port is closed.
        assert client.refresh(0).msg_class == MsgClass.SUCCESS
        peer.sendto(b"after", relayed.sockaddr())
        assert client.receive(0.5) is None
        assert client.refresh(300).msg_class == MsgClass.ERROR  # 437: no allocation
    finally:
        peer.close()


def test_a_tcp_allocation_goes_with_its_connection(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker(*TURN_FLAGS, "--user-quota", "1")
    first = turn_client(tp, transport="tcp")
    first.allocate()
    first.close()
    # The quota of 1 is free again once the server saw the connection close.
    deadline = time.monotonic() + 5
    while True:
        second = turn_client(tp, transport="tcp")
        reply = second.request(TurnMethod.ALLOCATE, (RequestedTransport(17),))
        if reply.msg_class == MsgClass.SUCCESS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply.msg_class == MsgClass.SUCCESS, error_of(reply)


def test_two_allocations_reach_each_other(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    """Relayed addresses of one server reach each other (the common case: two peers
    relayed by one server), through the kernel, with the default peer policy."""
    tp = tracker("--turn-user", "alice:wonderland")
    left, right = turn_client(tp, src_ip="127.0.0.2"), turn_client(tp, src_ip="127.0.0.3", transport="tcp")
    a, b = left.allocate(), right.allocate()
    assert left.permit(b).msg_class == MsgClass.SUCCESS
    assert right.permit(a).msg_class == MsgClass.SUCCESS
    left.send_to(b, b"left to right")
    assert right.receive() == ("data", a, b"left to right")
    right.send_to(a, b"right to left")
    assert left.receive() == ("data", b, b"right to left")


def test_udp_tracker_traffic_unaffected_with_turn_on(tracker) -> None:  # type: ignore[no-untyped-def]
    tp = tracker(*TURN_FLAGS)
    assert tp.ask(b"//nat", src_ip="127.0.0.2") is not None
    reply = tp.ask(f"{REG}turnon/0/0/0".encode(), src_ip="127.0.0.2")
    assert reply is not None and reply.startswith(b"127.0.0.2:")
    binding = tp.ask(binding_request(b"B" * 12), src_ip="127.0.0.2")
    assert binding is not None and parse(binding).transaction_id == b"B" * 12
    assert tp.ask(RelayRequest("grp").to_wire()) == b"ERR relay off"  # TURN users, but no --relay


def test_relay_grants_list_the_groups_relayed_addresses(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker("--relay")
    assert "tcp" in tp.banner  # --relay listens on TCP too
    grant = RelayGrant.from_wire(tp.ask(RelayRequest("team").to_wire(), timeout=3) or b"")
    assert grant.realm == "nattool" and grant.relayed == () and 0 < grant.lifetime <= 3600
    assert grant.username.split(":")[1] == "g"
    member = turn_client(tp, grant.username, grant.password)
    relayed = member.allocate()
    again = RelayGrant.from_wire(tp.ask(RelayRequest("team").to_wire()) or b"")
    assert again.relayed == (relayed,)
    other_group = RelayGrant.from_wire(tp.ask(RelayRequest("other").to_wire()) or b"")
    assert other_group.relayed == () and other_group.username != grant.username
    # Over TCP, in a text frame, the same answer.
    stream = turn_client(tp, transport="tcp")
    assert RelayGrant.from_wire(stream.text(RelayRequest("team").to_wire())).relayed == (relayed,)
    # An unpadded request gets a reply within the size bound (here: without the list).
    short = tp.ask(b"//relay/team")
    assert short is not None and len(short) <= 128


def test_relay_group_members_exchange_data(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker("--relay")
    grant = RelayGrant.from_wire(tp.ask(RelayRequest("pair").to_wire()) or b"")
    left = turn_client(tp, grant.username, grant.password, src_ip="127.0.0.2")
    right = turn_client(tp, grant.username, grant.password, src_ip="127.0.0.3", transport="tcp")
    a, b = left.allocate(), right.allocate()
    assert left.bind(0x4000, b).msg_class == MsgClass.SUCCESS
    assert right.permit(a).msg_class == MsgClass.SUCCESS
    left.send_channel(0x4000, b"through the relay")
    assert right.receive() == ("data", a, b"through the relay")
    right.send_to(a, b"and back")
    assert left.receive() == ("channel", 0x4000, b"and back")


def test_metrics_count_allocations_and_relayed_packets(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    import urllib.request

    from conftest import free_tcp_port

    port = free_tcp_port()
    tp = tracker(*TURN_FLAGS, "--metrics", str(port))
    client = turn_client(tp)
    relayed = client.allocate()
    peer = udp_peer()
    try:
        permitted = client.permit(peer_endpoint(peer))
        assert permitted.msg_class == MsgClass.SUCCESS, error_of(permitted)
        client.send_to(peer_endpoint(peer), b"x" * 10)
        assert recv_or_none(peer, 3) is not None
        peer.sendto(b"y" * 7, relayed.sockaddr())
        assert client.receive() is not None
    finally:
        peer.close()
    bad = turn_client(tp, "alice", "wrong", src_ip="127.0.0.4")
    assert error_of(bad.request(TurnMethod.ALLOCATE, (RequestedTransport(17),))) == 401
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = [
        "nattool_turn_allocations 1.0",
        "nattool_turn_allocations_created_total 1.0",
        'nattool_turn_relayed_packets_total{direction="to_peer"} 1.0',
        'nattool_turn_relayed_packets_total{direction="to_client"} 1.0',
        'nattool_turn_relayed_bytes_total{direction="to_peer"} 10.0',
        'nattool_turn_relayed_bytes_total{direction="to_client"} 7.0',
        'nattool_turn_auth_failures_total{reason="bad_credentials"} 1.0',
        "nattool_tcp_connections 0.0",
    ]
    for line in want:
        assert line in text, line


def test_relayed_ports_come_from_the_range_and_run_out_with_508(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    from conftest import free_udp_port

    port = free_udp_port()
    tp = tracker(*TURN_FLAGS, "--relay-ports", f"{port}-{port}")
    assert f"ports {port}-{port}" in tp.banner
    first = turn_client(tp, src_ip="127.0.0.2")
    assert first.allocate().port == port
    second = turn_client(tp, src_ip="127.0.0.3")
    assert error_of(second.request(TurnMethod.ALLOCATE, (RequestedTransport(17),))) == 508
    assert first.refresh(0).msg_class == MsgClass.SUCCESS  # the port is free again
    assert second.allocate().port == port


def test_ipv6_relayed_address_on_request(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    from nattool.protocol.turn import RequestedAddressFamily

    tp = tracker(*TURN_FLAGS, "--host", "::1")
    assert "relayed 127.0.0.1 ::1 " in tp.banner
    client = turn_client(tp)
    relayed6 = client.allocate(RequestedAddressFamily(6))
    assert str(relayed6.ip) == "::1"
    other = turn_client(tp, src_ip="127.0.0.3")
    assert other.allocate().ip.version == 4  # IPv4 unless asked (RFC 8656 section 7.2)
    over_tcp6 = TurnTestClient(("::1", tp.port), "alice", "wonderland", transport="tcp", src_ip="::1")
    try:
        assert str(over_tcp6.allocate(RequestedAddressFamily(6)).ip) == "::1"
    finally:
        over_tcp6.close()


def test_bandwidth_cap_drops_the_excess(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker(*TURN_FLAGS, "--relay-bandwidth", "2000")
    client = turn_client(tp)
    client.allocate()
    peer = udp_peer()
    try:
        target = peer_endpoint(peer)
        assert client.permit(target).msg_class == MsgClass.SUCCESS
        for _ in range(400):  # 400 kB at once: far beyond any burst the cap allows
            client.send_to(target, b"z" * 1000)
        received = 0
        while recv_or_none(peer, 0.5) is not None:
            received += 1
        assert 0 < received < 400
    finally:
        peer.close()


def test_turn_settings_from_the_config_file_and_environment(tmp_path: Path, nattool_home: Path) -> None:
    from conftest import nattool_env, start_tracker

    config = tmp_path / "serve.toml"
    config.write_text('[serve]\nturn_user = ["carol:from-file"]\nrealm = "example.org"\nrelay_ports = "50000-50100"\n')
    tp = start_tracker("--config", str(config), workdir=tmp_path / "t", home=nattool_home)
    try:
        assert "realm example.org" in tp.banner and "ports 50000-50100" in tp.banner and "users" in tp.banner
        client = TurnTestClient(tp.addr, "carol", "from-file")
        try:
            assert 50000 <= client.allocate().port <= 50100
        finally:
            client.close()
    finally:
        tp.stop()
    tp.assert_clean()
    env = nattool_env(nattool_home, NATTOOL_TURN_SECRET="from-the-environment")
    result = subprocess.run(
        [sys.executable, "-m", "nattool", "config", "show", "--json"], capture_output=True, text=True, env=env, timeout=30
    )
    assert '"from-the-environment"' in result.stdout and "env NATTOOL_TURN_SECRET" in result.stdout


def test_print_unit_warns_about_secrets_on_the_command_line(nattool_home: Path) -> None:
    result = run_nattool("serve", "--turn-user", "alice:wonderland", "--print-unit", home=nattool_home)
    assert result.returncode == 0, result.stderr
    assert "--turn-user alice:wonderland" in result.stdout
    assert "can be read by every local user" in result.stderr and "[serve] turn_user" in result.stderr
    quiet = run_nattool("serve", "--relay", "--print-unit", home=nattool_home)
    assert quiet.returncode == 0 and "--relay" in quiet.stdout and "local user" not in quiet.stderr


def test_tracker_answers_are_the_same_with_turn_on_and_off(tracker) -> None:  # type: ignore[no-untyped-def]
    """With TURN on, tracker datagrams take the general path instead of the plain
    reader's shortcuts (bare //nat, bare Binding, the keepalive lane): the answers
    are byte for byte the same."""
    plain, with_turn = tracker(), tracker(*TURN_FLAGS)
    requests = [
        b"//nat",
        f"{REG}same/0/0/0".encode(),
        f"{REG}same/0/10.0.0.5/aa:bb:cc:dd:ee:ff".encode(),
        f"{REG}same/0/0/0".encode(),  # a keepalive
        f"{REG}same/0/aa:bb:cc:dd:ee:ff-10.0.0.6".encode(),  # the original client's form
        f"{REG}same/0/0/0\noffset=1".encode(),
        b"//tcksvr",
        b"//bogus",
        binding_request(b"S" * 12),
        binding_request(b"P" * 12, padding=64, software="x"),
        b"\x00\x01\x00\x00" + b"C" * 16,  # classic RFC 3489 Binding
        RelayRequest("same").to_wire(),
        b"not ours",
    ]
    socks = {name: socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for name in ("a", "b")}
    try:
        for sock, ip in zip(socks.values(), ("127.0.0.2", "127.0.0.3")):
            sock.bind((ip, 0))
        answered = 0
        for request in requests:
            for sock in socks.values():
                replies = [ask_on(sock, request, tp.addr, timeout=1.0 if request != b"not ours" else 0.3) for tp in (plain, with_turn)]
                assert replies[0] == replies[1], request
                answered += replies[0] is not None
        assert answered == 2 * (len(requests) - 1)  # all but the one that is not ours
    finally:
        for sock in socks.values():
            sock.close()


def test_a_half_closed_connection_still_gets_its_replies(tracker) -> None:  # type: ignore[no-untyped-def]
    tp = tracker("--tcp")
    sock = socket.create_connection(tp.addr, timeout=5, source_address=("127.0.0.2", 0))
    try:
        sock.sendall(text_frame(f"{REG}halfclosed/0/0/0".encode()) + text_frame(b"//nat"))
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        frames = StreamDeframer().feed(received)
        local = "%s:%d" % sock.getsockname()[:2]
        assert sorted(frames) == sorted([TextFrame(local.encode()), TextFrame(local.encode())])
    finally:
        sock.close()


def test_a_relay_ip_that_is_not_ours_fails_at_start(nattool_home: Path) -> None:
    result = run_nattool(
        "serve", "--host", "127.0.0.1", "--port", "0", "--store", "memory", "--relay", "--relay-ip", "192.0.2.99",
        home=nattool_home,
    )  # fmt: skip
    assert result.returncode == 4, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot bind relayed sockets on 192.0.2.99" in lines[0], result.stderr


def test_random_bytes_never_break_the_server(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    """Mutated TURN messages, ChannelData and frames over UDP and TCP: the server keeps
    answering and logs no traceback (the fixture checks the log and the exit)."""
    import random

    rng = random.Random(24)
    tp = tracker(*TURN_FLAGS)
    client = turn_client(tp)
    client.allocate()
    seeds = [client.last_request, encode_channel_data(0x4000, b"data"), text_frame(b"//nat")[2:]]
    udp = udp_peer("127.0.0.7")
    try:
        for _ in range(1500):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.2:
                data = data[: rng.randrange(len(data) + 1)]
            udp.sendto(bytes(data), tp.addr)
            client.send_raw(bytes(data))
        for _ in range(20):
            stream = socket.create_connection(tp.addr, timeout=5, source_address=("127.0.0.8", 0))
            stream.sendall(bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))))
            stream.close()
    finally:
        udp.close()
    time.sleep(0.5)
    assert tp.ask(b"//nat", src_ip="127.0.0.9", timeout=3) is not None
    assert client.refresh(600).msg_class == MsgClass.SUCCESS


# -- the fast path between two allocations of one server ----------------------------------


def _two_allocations_relaying(fast: bool) -> tuple[list[tuple[str, object]], dict[str, int], list[bool]]:
    """Two allocations of one TURN core with real relayed sockets on 127.0.0.1 (the
    serving loop's relay): X's client reaches Y's relayed address before and after Y
    permits X, by Send indication and ChannelData, Y's channel back, and a packet Y's
    bandwidth cap refuses. What each client got (relayed addresses named by role), the
    core's counters, and whether each delivery happened within the sending call."""
    import asyncio
    import dataclasses
    import ipaddress
    from collections import Counter

    from nattool.net.turn_relay import RelayPortRange, TurnRelay
    from nattool.protocol.endpoint import Endpoint
    from nattool.protocol.turn import Data, XorPeerAddress, channel_data_payload
    from nattool.protocol.turn_server import AllocationWanted, ClientRef, ToPeer, TurnConfig, TurnCore
    from test_turn_core import SERVER, Client

    got: list[tuple[str, object]] = []
    immediate: list[bool] = []
    roles: dict[Endpoint, str] = {}

    def sender_for(ref: ClientRef):  # type: ignore[no-untyped-def]
        name = "x" if ref.client.port == 5001 else "y"

        def send(data: bytes) -> None:
            parsed = channel_data_payload(data) if 0x40 <= data[0] <= 0x7F else None
            if parsed is not None:
                got.append((name, ("channel", parsed[0], parsed[1], len(data))))
            else:
                msg = parse(data)
                peer = msg.get(XorPeerAddress)
                payload = msg.get(Data)
                got.append((name, ("data", msg.transaction_id, roles.get(peer.endpoint), payload.payload)))  # type: ignore[union-attr]

        return send

    async def scenario() -> TurnCore:
        loop = asyncio.get_running_loop()
        core = TurnCore(TurnConfig(users={"alice": "pw"}, bandwidth=1000), b"s" * 32)
        ranges = {4: RelayPortRange(ipaddress.ip_address("127.0.0.1"), 49152, 65535)}
        relay = TurnRelay(core, loop, ranges, sender_for, Counter())
        relay.local_fast_path = fast
        x = Client(core, ClientRef("udp", Endpoint.from_text("198.51.100.7:5001"), SERVER))
        y = Client(core, ClientRef("tcp", Endpoint.from_text("198.51.100.8:5002"), SERVER, 7))
        try:
            for client, role in ((x, "X"), (y, "Y")):
                wanted = client.request(TurnMethod.ALLOCATE, [RequestedTransport(17)], time.monotonic())
                assert isinstance(wanted, AllocationWanted)
                assert relay.open(wanted, time.monotonic(), time.time()) is not None
                client.relayed = core.relayed_of(wanted.allocation_id)
                roles[client.relayed] = role  # type: ignore[index]

            async def relayed(out: object) -> None:
                before = len(got)
                if isinstance(out, ToPeer):
                    relay.to_peer(out, time.monotonic())
                elif callable(out):
                    out()
                immediate.append(len(got) > before)
                for _ in range(20):  # the slow path: the kernel has it, the loop reads it
                    await asyncio.sleep(0.005)

            def channel(client: Client, number: int, payload: bytes) -> Callable[[], None]:
                data = encode_channel_data(number, payload, stream=client.ref.stream)
                return lambda: relay.channel_data(data, client.ref, time.monotonic())  # as the server's readers do

            assert x.permit(y.relayed, now=time.monotonic()).msg_class == MsgClass.SUCCESS  # type: ignore[arg-type]
            await relayed(x.send_indication(y.relayed, b"before Y permits X", time.monotonic()))  # type: ignore[arg-type]
            assert y.permit(x.relayed, now=time.monotonic()).msg_class == MsgClass.SUCCESS  # type: ignore[arg-type]
            await relayed(x.send_indication(y.relayed, b"one", time.monotonic()))  # type: ignore[arg-type]
            assert x.bind(0x4001, y.relayed, now=time.monotonic()).msg_class == MsgClass.SUCCESS  # type: ignore[arg-type]
            await relayed(channel(x, 0x4001, b"two"))
            assert y.bind(0x4002, x.relayed, now=time.monotonic()).msg_class == MsgClass.SUCCESS  # type: ignore[arg-type]
            await relayed(channel(x, 0x4001, b"three"))
            await relayed(channel(y, 0x4002, b"four"))
            # Y spends most of its bucket (64 KiB burst) toward X, then cannot take 10 kB more.
            await relayed(channel(y, 0x4002, b"y" * 60000))
            await relayed(channel(x, 0x4001, b"x" * 10000))
        finally:
            relay.close_all()
        return core

    core = asyncio.run(scenario())
    return got, dataclasses.asdict(core.counters), immediate


def test_between_two_allocations_the_fast_path_equals_the_kernel_path() -> None:
    """A packet from one allocation to another of the same server is handed over in
    the process instead of through the kernel: the same bytes reach the same client,
    the same refusals (no permission, bandwidth) and the same counters."""
    fast, fast_counters, fast_immediate = _two_allocations_relaying(fast=True)
    slow, slow_counters, slow_immediate = _two_allocations_relaying(fast=False)
    assert fast == slow
    assert fast_counters == slow_counters
    assert [who for who, _ in fast] == ["y", "y", "y", "x", "x"]  # refused: before the permit, over Y's cap
    assert fast_counters["permission_drops"] == 1 and fast_counters["bandwidth_drops"] == 1
    assert fast_immediate == [False, True, True, True, True, True, False]
    assert slow_immediate == [False] * 7


@pytest.mark.parametrize("text", ["127.0.0.1", "203.0.113.9", "::1", "2001:db8::7", "fe80::1%lo", "::ffff:192.0.2.1"])
def test_addresses_that_hash_once_are_the_plain_addresses(text: str) -> None:
    """The relay's addresses that keep their hash (one computation per address, not per
    lookup) find and are found by the plain ``ipaddress`` objects the rest of the
    server holds."""
    import ipaddress

    from nattool.net.turn_relay import hashed_ip

    plain = ipaddress.ip_address(text)
    fast = hashed_ip(plain)
    assert fast is not plain and hashed_ip(fast) is fast
    assert fast == plain and plain == fast and not fast != plain
    assert hash(fast) == hash(plain) and str(fast) == str(plain) and fast.version == plain.version
    assert {plain: 1}[fast] == 1 and {fast: 2}[plain] == 2
    assert not fast < plain and not plain < fast
