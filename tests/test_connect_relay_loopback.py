"""`nattool connect` through `nattool serve --relay` on loopback: the real CLI (pexpect)
and the library, real UDP and TCP. 127.0.0.2 and 127.0.0.3 stand for two hosts; with
`--relay only` nothing goes direct, so every path is the relay's (the NAT lab,
test_connect_relay_lab.py, proves when the relay is needed)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pexpect

from nattool.diag.connect import connect
from tests.conftest import TrackerFactory, nattool_env
from tests.test_connect_loopback import A_IP, B_IP, connect_argv, finish, spawn

PATH_UP = r'\{"event":"path_up"[^\n]*\n'


def peer(home: Path, endpoint: str, ip: str, group: str, *extra: str) -> pexpect.spawn:
    return spawn(home, group, "-t", endpoint, "--bind", ip, "--port", "0", "--lan", "0", *extra)


def test_relay_only_carries_lines_both_ways_and_says_via_relay(tracker: TrackerFactory, nattool_home: Path) -> None:
    tp = tracker("--relay")
    a = peer(nattool_home, tp.endpoint, A_IP, "relay-only", "--relay", "only", "--json")
    b = peer(nattool_home, tp.endpoint, B_IP, "relay-only", "--relay", "only")
    a.expect(r'\{"event":"relay"[^\n]*\n')
    relay = json.loads(a.after)
    assert relay["server"] == tp.endpoint and relay["relayed"].startswith("127.0.0.1:")
    a.expect(PATH_UP)
    up = json.loads(a.after)
    assert up["via"] == "relay" and up["path"] == "relay" and up["method"] == "relay" and up["peer"].startswith("127.0.0.1:")
    b.expect(r"path up to 127\.0\.0\.1:\d+ via relay: rtt [\d.]+ ms")
    b.sendline("through the relay")
    a.expect(r'\{"event":"message"[^\n]*"text":"through the relay"')
    a.sendline("and back")
    b.expect(r"<127\.0\.0\.1:\d+> and back")
    a.sendeof()
    assert finish(a) == 0
    b.expect(r"path down to 127\.0\.0\.1:\d+ via relay \(the peer left\)")
    b.sendeof()
    assert finish(b) == 0


def test_tcp_reaches_the_tracker_and_the_relay_over_one_stream(tracker: TrackerFactory, nattool_home: Path) -> None:
    tp = tracker("--relay")
    a = peer(nattool_home, tp.endpoint, A_IP, "over-tcp", "--tcp", "--json")
    b = peer(nattool_home, tp.endpoint, B_IP, "over-tcp", "--relay", "only", "--json")
    a.expect(r'\{"event":"tcp"[^\n]*\n')
    assert json.loads(a.after)["tracker"] == tp.endpoint
    a.expect(r'\{"event":"registered"[^\n]*\n')
    # Over TCP the tracker sees the TCP connection's source: another port than ours.
    assert json.loads(a.after)["public"].startswith(A_IP + ":")
    for child in (a, b):
        child.expect(PATH_UP)
        assert json.loads(child.after)["via"] == "relay"
    b.sendline("to the tcp side")
    a.expect(r'\{"event":"message"[^\n]*"text":"to the tcp side"')
    a.sendline("from the tcp side")
    b.expect(r'\{"event":"message"[^\n]*"text":"from the tcp side"')


def test_relay_never_against_a_relaying_tracker_asks_nothing(tracker: TrackerFactory, nattool_home: Path) -> None:
    tp = tracker("--relay")
    a = peer(nattool_home, tp.endpoint, A_IP, "never", "--relay", "never", "--json", "--once", "--timeout", "3")
    b = peer(nattool_home, tp.endpoint, B_IP, "never", "--relay", "never", "--json", "--once", "--timeout", "3")
    for child in (a, b):
        assert finish(child) == 0
        events = [json.loads(line) for line in child.before.splitlines() if line.startswith("{")]
        ups = [e for e in events if e["event"] == "path_up"]
        assert ups and ups[0]["via"] == "direct"
        assert not [e for e in events if e["event"] in ("relay", "tcp", "relay_lost")]


def test_a_bad_relay_mode_is_one_usage_line(nattool_home: Path) -> None:
    argv = connect_argv("g", "-t", "127.0.0.1:1", "--relay", "sometimes")
    child = pexpect.spawn(argv[0], argv[1:], env=nattool_env(nattool_home), encoding="utf-8", timeout=10)
    assert finish(child) == 2
    assert "sometimes" in child.before and "Traceback" not in child.before


def test_the_library_connects_through_the_relay(tracker: TrackerFactory) -> None:
    tp = tracker("--relay")

    async def main() -> None:
        a = await connect("api-relay", [tp.endpoint], port=0, bind=A_IP, lan=(), relay="only", tcp=True)
        b = await connect("api-relay", [tp.endpoint], port=0, bind=B_IP, lan=(), relay="only")
        async with a, b:
            b_id = await a.wait_for_peer(timeout=10)
            a_id = await b.wait_for_peer(timeout=10)
            await a.send(b"relayed bytes \x00\xff", to=b_id)
            assert await asyncio.wait_for(b.recv(), 10) == (a_id, b"relayed bytes \x00\xff")
            await b.send(b"back")
            assert await asyncio.wait_for(a.recv(), 10) == (b_id, b"back")
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


def test_serve_without_relay_leaves_auto_as_it_was(tracker: TrackerFactory, nattool_home: Path) -> None:
    tp = tracker()
    a = peer(nattool_home, tp.endpoint, A_IP, "no-relay", "--json", "--once", "--timeout", "5")
    b = peer(nattool_home, tp.endpoint, B_IP, "no-relay", "--json", "--once", "--timeout", "5")
    for child in (a, b):
        assert finish(child) == 0
        events = [json.loads(line) for line in child.before.splitlines() if line.startswith("{")]
        assert [e["via"] for e in events if e["event"] == "path_up"][:1] == ["direct"]
        assert not [e for e in events if e["event"] in ("relay", "tcp")]

