"""`nattool serve` with TCP on the tracker port and the TURN relay, on loopback: real
`nattool serve` processes, real sockets, requests built with nattool's own codecs."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from conftest import TrackerProcess, run_nattool, udp_ask
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
    good, bad = stream_of(tp, "127.0.0.2"), stream_of(tp, "127.0.0.3")
    bad.send(b"hello\r\n")  # 0x68: no frame starts so
    assert bad.closed_by_server()
    assert good.text(b"//nat") == good.local.encode()
    assert tp.ask(b"//nat") is not None  # UDP unaffected


def test_a_stalled_client_does_not_block_others(tracker, stream_of) -> None:  # type: ignore[no-untyped-def]
    tp = tracker("--tcp")
    stalled = stream_of(tp, "127.0.0.2")
    stalled.send(text_frame(b"//nat" + b" " * 50)[:10])  # half a frame, never finished
    others = [stream_of(tp, "127.0.0.4") for _ in range(5)]
    for other in others:
        assert other.text(b"//nat") == other.local.encode()


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
