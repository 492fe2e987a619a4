"""`nattool connect` end to end on loopback: a real `nattool serve`, real `nattool
connect` processes driven through a terminal (pexpect), real UDP.

127.0.0.2 and 127.0.0.3 stand for two hosts with different public IPs (each peer binds
its own); there is no NAT on loopback, so this proves the chain (registration, member
lists, authenticated ping/pong, chat, keepalive, dead-path detection, give-up), and the
NAT lab (test_connect_lab.py) proves the punching.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pexpect
import pytest

from nattool.protocol.punch import Kind, PeerMessage, derive_key
from tests.conftest import TrackerFactory, TrackerProcess, free_udp_port, nattool_cmd, nattool_env

A_IP, B_IP, STRANGER_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"

_SHIM = (
    "from nattool.cli.app import app\n"
    "from nattool.cli.connect_cmd import connect\n"
    "app.command()(connect)\n"
    "app(prog_name='nattool')\n"
)


def connect_argv(*args: str) -> list[str]:
    """`nattool connect ...`. Until the command is registered in nattool/cli/app.py the
    same Typer app is run with it added (same code path, same options)."""
    from nattool.cli.app import app
    from nattool.cli.connect_cmd import connect

    if any(c.callback is connect for c in app.registered_commands):
        return nattool_cmd("connect", *args)
    return [sys.executable, "-c", _SHIM, "connect", *args]


def spawn(home: Path, *args: str, timeout: float = 10) -> pexpect.spawn:
    argv = connect_argv(*args)
    return pexpect.spawn(argv[0], argv[1:], env=nattool_env(home), encoding="utf-8",
                         codec_errors="replace", timeout=timeout, echo=False)


def peer_args(tracker: str, ip: str, port: int, group: str, *extra: str) -> list[str]:
    return [group, "-t", tracker, "--bind", ip, "--port", str(port), "--lan", "0", *extra]


def json_events(child: pexpect.spawn) -> list[dict[str, Any]]:
    out = []
    for line in (child.before or "").splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def finish(child: pexpect.spawn, timeout: float = 10) -> int:
    child.expect(pexpect.EOF, timeout=timeout)
    child.close()
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
    return int(child.exitstatus)


@pytest.fixture
def pair(tracker: TrackerFactory, nattool_home: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    tp = tracker()
    children: list[pexpect.spawn] = []

    def start(ip: str, port: int, *extra: str, group: str = "chat-" + request.node.name[:40]) -> pexpect.spawn:
        child = spawn(nattool_home, *peer_args(tp.endpoint, ip, port, group, *extra))
        children.append(child)
        return child

    yield tp, start
    for child in children:
        if child.isalive():
            child.kill(signal.SIGKILL)
        child.close(force=True)


def test_two_peers_open_a_path_and_chat(pair) -> None:  # type: ignore[no-untyped-def]
    tp, start = pair
    pa, pb = free_udp_port(A_IP), free_udp_port(B_IP)
    a = start(A_IP, pa)
    b = start(B_IP, pb)
    a.expect(rf"path up to {B_IP}:{pb} via Internet: rtt [\d.]+ ms, opened in [\d.]+ s")
    b.expect(rf"path up to {A_IP}:{pa} via Internet")
    a.sendline("hello from a")
    b.expect_exact(f"<{A_IP}:{pa}> hello from a")
    b.sendline("and back \x1b[2J from b")  # an escape sequence must not reach the terminal raw
    a.expect_exact(f"<{B_IP}:{pb}> and back \ufffd[2J from b")
    # End of input: a leaves, says so, and b notices at once (not after --dead-after).
    a.sendeof()
    assert finish(a) == 0
    b.expect(r"path down to .* \(the peer left\)", timeout=3)
    b.kill(signal.SIGINT)
    assert finish(b) == 130


def test_json_once_reports_path_rtt_and_time_to_open(pair) -> None:  # type: ignore[no-untyped-def]
    tp, start = pair
    pa, pb = free_udp_port(A_IP), free_udp_port(B_IP)
    t0 = time.monotonic()
    a = start(A_IP, pa, "--once", "--json")
    b = start(B_IP, pb, "--once", "--json")
    assert finish(a) == 0 and finish(b) == 0
    assert time.monotonic() - t0 < 8
    for child, me, other in ((a, f"{A_IP}:{pa}", f"{B_IP}:{pb}"), (b, f"{B_IP}:{pb}", f"{A_IP}:{pa}")):
        events = json_events(child)
        kinds = [e["event"] for e in events]
        assert "registered" in kinds and "path_up" in kinds, events
        up = next(e for e in events if e["event"] == "path_up")
        assert up["peer"] == other and up["path"] == "internet" and up["method"] == "punch"
        assert up["observed_as"] == me  # the peer saw us where the tracker did
        assert 0 <= up["rtt_ms"] < 1000 and 0 <= up["open_s"] < 3
        assert len(up["peer_id"]) == 16


def test_dead_path_is_noticed_and_reopened(pair) -> None:  # type: ignore[no-untyped-def]
    tp, start = pair
    pa, pb = free_udp_port(A_IP), free_udp_port(B_IP)
    timing = ("--keepalive", "0.3", "--dead-after", "1.2")
    a = start(A_IP, pa, *timing)
    b = start(B_IP, pb, *timing)
    a.expect("path up")
    b.expect("path up")
    b.kill(signal.SIGKILL)  # gone without a goodbye: only the keepalives can tell
    t0 = time.monotonic()
    a.expect(r"path down to .* \(no answer for [\d.]+s\): trying again", timeout=5)
    assert time.monotonic() - t0 < 3
    b2 = start(B_IP, pb, *timing)  # the same endpoint comes back (a new session)
    a.expect(rf"path up to {B_IP}:{pb}", timeout=5)
    b2.expect("path up", timeout=5)


def test_stranger_who_knows_the_endpoint_cannot_inject(pair) -> None:  # type: ignore[no-untyped-def]
    tp, start = pair
    pa, pb = free_udp_port(A_IP), free_udp_port(B_IP)
    a = start(A_IP, pa)
    b = start(B_IP, pb, "--json")
    a.expect("path up")
    b.expect('"event":"path_up"')
    forged_key = derive_key("not-the-group")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((STRANGER_IP, 0))
        s.settimeout(0.3)
        for seq in range(1, 6):
            # DATA with the wrong key; a ping too (would it answer?); plain junk.
            s.sendto(PeerMessage(Kind.DATA, b"stranger", seq, seq, b"INJECTED").to_wire(forged_key), (B_IP, pb))
            s.sendto(PeerMessage(Kind.PING, b"stranger", 100 + seq).to_wire(forged_key), (B_IP, pb))
            s.sendto(b"NtC1INJECTED" + bytes(40), (B_IP, pb))
        with pytest.raises(socket.timeout):
            s.recvfrom(2048)  # not even a pong: a stranger learns nothing
    a.sendline("genuine")
    b.expect(r'"event":"message"[^\n]*"text":"genuine"')
    before = b.before or ""
    assert "INJECTED" not in before and '"event":"message"' not in before, before
    b.sendeof()
    assert finish(b) == 0
    assert "INJECTED" not in (b.before or "")


def test_alone_in_the_group_gives_up_with_exit_3(pair) -> None:  # type: ignore[no-untyped-def]
    tp, start = pair
    a = start(A_IP, free_udp_port(A_IP), "--timeout", "1.5", "--json", group="nobody-else-here")
    t0 = time.monotonic()
    assert finish(a) == 3
    assert time.monotonic() - t0 < 6
    gave_up = [e for e in json_events(a) if e["event"] == "gave_up"]
    assert gave_up and "no other member" in gave_up[-1]["reason"]


def test_no_tracker_answering_is_said_plainly(nattool_home: Path) -> None:
    dead = f"127.0.0.1:{free_udp_port()}"  # nothing listens there
    a = spawn(nattool_home, *peer_args(dead, A_IP, free_udp_port(A_IP), "g", "--timeout", "1.5"))
    assert finish(a) == 3
    assert "no tracker answered" in (a.before or "")


# -- the decisions behind the procedure (no sockets) ------------------------------------


def test_lan_candidates_guess_the_ports_a_member_listens_on() -> None:
    from nattool.protocol.connect_options import DEFAULT_CONNECT_PORT
    from nattool.protocol.connect_rules import lan_candidates

    got = [e.to_text() for e in lan_candidates(("192.0.2.11", "bad"), 5000, 6000)]
    assert got == ["192.0.2.11:5000", "192.0.2.11:6000", f"192.0.2.11:{DEFAULT_CONNECT_PORT}"]
    assert [e.to_text() for e in lan_candidates(("192.0.2.11",), DEFAULT_CONNECT_PORT, DEFAULT_CONNECT_PORT)] == [
        f"192.0.2.11:{DEFAULT_CONNECT_PORT}"
    ]


def test_mapping_and_verdict() -> None:
    from nattool.protocol.connect_rules import ED, EI, mapping_of, verdict
    from nattool.protocol.endpoint import Endpoint

    local = Endpoint.from_text("192.0.2.10:43284")
    t1, t2 = Endpoint.from_text("203.0.113.10:43283"), Endpoint.from_text("203.0.113.11:43283")
    same = Endpoint.from_text("198.51.100.2:43284")
    assert mapping_of({t1: same}, local)[0] is None  # one tracker: unknown, never a guess
    assert mapping_of({t1: same, t2: same}, local)[0] == EI
    assert mapping_of({t1: same, t2: Endpoint.from_text("198.51.100.2:999")}, local)[0] == ED
    impossible, why = verdict(ED, ED)
    assert impossible and "relay" in why
    for mine, theirs in ((ED, None), (None, ED), (EI, EI), (None, None), (EI, ED)):
        assert verdict(mine, theirs)[0] is False


def test_sanitize_keeps_text_and_defuses_escapes() -> None:
    from nattool.cli.connect_render import sanitize

    assert sanitize("héllo\tworld\r\n") == "héllo\tworld"
    assert sanitize("\x1b]0;pwned\x07\x9b") == "\ufffd]0;pwned\ufffd\ufffd"


def test_piped_input_waits_for_a_peer_is_delivered_then_exits_0(pair, nattool_home: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    tp, start = pair
    pa, pb = free_udp_port(A_IP), free_udp_port(B_IP)
    group = "piped-input"
    sender = subprocess.Popen(connect_argv(*peer_args(tp.endpoint, A_IP, pa, group, "--timeout", "8")),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=nattool_env(nattool_home), text=True)
    try:
        assert sender.stdin is not None
        sender.stdin.write("typed before anyone was there\n")
        sender.stdin.close()  # EOF at once: it must still wait for a peer
        time.sleep(0.5)
        b = start(B_IP, pb, group=group)
        b.expect_exact(f"<{A_IP}:{pa}> typed before anyone was there")
        assert sender.wait(timeout=8) == 0
        b.expect(r"path down to .* \(the peer left\)", timeout=3)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
        for stream in (sender.stdout, sender.stderr):
            if stream is not None:
                stream.close()


# -- what a newcomer tripped on --------------------------------------------------------


STDIN_KINDS = ["devnull", "file"]
RETRIES = [0, 2]


def alone_with_stdin_from(home: Path, tracker_ep: str, kind: str, path: str) -> subprocess.CompletedProcess[str]:
    """`connect --timeout 2`, alone in its group, its stdin read from ``path``."""
    argv = connect_argv(*peer_args(tracker_ep, A_IP, free_udp_port(A_IP), "alone-" + kind, "--timeout", "2"))
    with open(path, "rb") as stdin:
        return subprocess.run(argv, stdin=stdin, capture_output=True, text=True, env=nattool_env(home), timeout=30)


# The datagrams counted go out within 3.5 s: the seed form's sends in the first half of the
# tracker timeout (2 s), the original form's in the next 2 s, the next round's first seed
# 0.5 s later. Every send waits for a timer, and on a busy machine each wakes up late: the
# give-up time leaves seconds for that, and a slow start of the interpreter gets its own wait.
SILENT_GIVE_UP = 8
SILENT_WAIT = 30.0  # s for the next datagram (the first comes after the interpreter's start-up)


def against_a_silent_tracker(home: Path, retries: int) -> tuple[list[bytes], int, str]:
    """`connect --retries N --timeout SILENT_GIVE_UP` against a silent tracker (our own
    socket): the first 2 (N + 1) + 1 datagrams it got, then connect's exit status and stderr."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.settimeout(SILENT_WAIT)
        tracker_ep = f"127.0.0.1:{silent.getsockname()[1]}"
        argv = connect_argv(*peer_args(tracker_ep, A_IP, free_udp_port(A_IP), f"retries-{retries}",
                                       "--retries", str(retries), "--timeout", str(SILENT_GIVE_UP)))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=nattool_env(home))
        try:
            got = [silent.recvfrom(2048)[0] for _ in range(2 * (retries + 1) + 1)]
        finally:
            proc.wait(timeout=SILENT_GIVE_UP + SILENT_WAIT)
            assert proc.stderr is not None
            err = proc.stderr.read().decode()
            proc.stderr.close()
    return got, proc.returncode, err


@pytest.fixture(scope="module")
def timeout_runs(
    nattool_home: Path, shared_tracker: TrackerProcess, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, object], Future[Any]]:
    """The cases below wait out connect's --timeout on purpose: all started at once, they
    take one wait instead of one each."""
    source = tmp_path_factory.mktemp("stdin") / "lines.txt"
    source.write_text("a line nobody will read\n")
    stdin_paths = {"devnull": "/dev/null", "file": str(source)}
    with ThreadPoolExecutor(len(STDIN_KINDS) + len(RETRIES)) as pool:
        runs: dict[tuple[str, object], Future[Any]] = {
            ("stdin", kind): pool.submit(alone_with_stdin_from, nattool_home, shared_tracker.endpoint, kind,
                                         stdin_paths[kind])
            for kind in STDIN_KINDS
        }
        runs.update({("retries", n): pool.submit(against_a_silent_tracker, nattool_home, n) for n in RETRIES})
    return runs


@pytest.mark.xdist_group("connect_timeout_runs")  # one lane: the fixture runs every case
@pytest.mark.parametrize("stdin_kind", STDIN_KINDS)
def test_stdin_from_dev_null_or_a_file_is_read_without_a_traceback(
    timeout_runs: dict[tuple[str, object], Future[Any]], stdin_kind: str
) -> None:
    out: subprocess.CompletedProcess[str] = timeout_runs[("stdin", stdin_kind)].result()
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr and "Exception" not in out.stderr, out.stderr
    assert "gave up: group: no other member joined the group within 2s" in out.stderr
    if stdin_kind == "file":
        assert "no peer connected yet: the line will be sent when a path is up" in out.stderr


@pytest.mark.xdist_group("connect_timeout_runs")
@pytest.mark.parametrize("retries", RETRIES)
def test_retries_sets_the_registration_retransmissions(
    timeout_runs: dict[tuple[str, object], Future[Any]], retries: int
) -> None:
    """A silent tracker (our own socket) sees 1 + --retries registrations in the seed form,
    then as many in the original client's form: whatever the machine's speed."""
    from nattool.protocol.text import RegisterRequest

    group = f"retries-{retries}"
    seed, original = RegisterRequest(group).to_wire(), RegisterRequest(group, form="original").to_wire()
    got, returncode, err = timeout_runs[("retries", retries)].result()
    assert got == [seed] * (retries + 1) + [original] * (retries + 1) + [seed]
    assert returncode == 3 and f"no tracker answered within {SILENT_GIVE_UP}s" in err


def test_retries_out_of_range_is_one_usage_line(nattool_home: Path) -> None:
    import subprocess

    out = subprocess.run(connect_argv("g", "-t", "127.0.0.1", "--retries", "99"), capture_output=True, text=True,
                         env=nattool_env(nattool_home), stdin=subprocess.DEVNULL, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["nattool: error: --retries must be in 0..20"]


def test_no_route_to_the_tracker_is_a_network_error_exit_4(nattool_home: Path) -> None:
    """In a fresh network namespace loopback is down: sending fails (ENETUNREACH). That is
    exit 4 and one line at once, not 'no tracker answered' (3) after --timeout."""
    import subprocess

    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --net needs root (CAP_SYS_ADMIN)")
    t0 = time.monotonic()
    out = subprocess.run(["unshare", "--net", *connect_argv("g", "-t", "127.0.0.1", "--timeout", "20")],
                         capture_output=True, text=True, env=nattool_env(nattool_home), stdin=subprocess.DEVNULL,
                         timeout=30)
    assert out.returncode == 4, out.stderr
    assert "cannot send to 127.0.0.1:43283" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert time.monotonic() - t0 < 15  # did not wait for --timeout
