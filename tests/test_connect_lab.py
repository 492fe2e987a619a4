"""`nattool connect` through real NATs (tests/natlab: namespaces + nftables), both ends the
real CLI driven by pexpect, two real `nattool serve` trackers on the lab's internet.

Scenarios of issue 5: endpoint-independent mapping on both sides (every filtering),
two hosts behind one NAT (LAN path), symmetric against full cone (works), symmetric
against symmetric (reported impossible, non-zero exit), a stranger who knows an endpoint
but not the group. The success cases must open a path within 3 s of both peers starting;
the issue's two cases and the LAN case run ``RUNS`` times: once in CI, ten times with
``CONNECT_LAB_RUNS=10`` (what scripts/connect_matrix_runs.py --lab-tests does).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pexpect
import pytest

from nattool.protocol.punch import Kind, PeerMessage, derive_key
from tests.conftest import BANNER_PREFIX, nattool_cmd, nattool_env
from tests.natlab import Lab, NatBehaviour, udp_agent
from tests.natlab.fixtures import natlab, natlab_available  # noqa: F401 - fixtures
from tests.natlab.lab import Host, read_line
from tests.natlab.topologies import SERVER_V4, pair_topology, same_nat_topology
from tests.test_connect_loopback import connect_argv

pytestmark = [pytest.mark.natlab, pytest.mark.usefixtures("natlab_available")]

RUNS = int(os.environ.get("CONNECT_LAB_RUNS", "1"))  # the acceptance: 10 of 10, by hand
TARGET = 3.0
TRACKERS = (f"{SERVER_V4[0]}:43283", f"{SERVER_V4[1]}:43283")
N = NatBehaviour

# Filled by the success scenarios; printed at the end of the session (pytest -s shows it).
RESULTS: list[tuple[str, str, str, list[float]]] = []


def start_trackers(lab: Lab, home: Path) -> None:
    for ep in TRACKERS:
        host, port = ep.rsplit(":", 1)
        proc = lab.popen("tracker", nattool_cmd("serve", "--host", host, "--port", port, "--store", "memory",
                                                "--rate-limit", "0"),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         env=nattool_env(home), text=True)
        line = read_line(proc.stdout, 15)
        assert line and BANNER_PREFIX in line, f"tracker {ep} did not start: {line!r}"


def spawn_peer(lab: Lab, host: Host, home: Path, group: str, port: int, *extra: str) -> pexpect.spawn:
    args = [group, *sum((["-t", t] for t in TRACKERS), []), "--port", str(port), "--json", *extra]
    argv = connect_argv(*args)
    return lab.spawn(host, argv, env=nattool_env(home), timeout=15)


def events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


@dataclass
class Run:
    a_up: dict[str, Any]
    b_up: dict[str, Any]
    elapsed: float  # from the later of the two spawns to the later path_up


def punch_once(lab: Lab, a: Host, b: Host, home: Path, group: str, pa: int, pb: int) -> Run:
    ca = spawn_peer(lab, a, home, group, pa, "--once", "--timeout", "10")
    cb = spawn_peer(lab, b, home, group, pb, "--once", "--timeout", "10")
    t_start = time.monotonic()
    ups: dict[str, dict[str, Any]] = {}
    t_up: dict[str, float] = {}
    for name, child in (("a", ca), ("b", cb)):
        child.expect(r'\{"event":"path_up"[^\n]*\n')
        t_up[name] = time.monotonic()
        ups[name] = json.loads(child.after.strip())
    # The exit of --once (after it lingers for the peer) is the loopback tests' business;
    # here time is short, so the run ends as soon as both sides have their path.
    for child in (ca, cb):
        child.close(force=True)
    return Run(ups["a"], ups["b"], max(t_up.values()) - t_start)


@pytest.fixture(scope="module")
def lab_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("connect-lab-home")


@pytest.fixture(scope="module", autouse=True)
def print_table() -> Iterator[None]:
    yield
    if RESULTS:
        print("\n\nNAT pair | expected | observed | time-to-path (s): median / max over runs")
        for pair, expected, observed, times in RESULTS:
            times = sorted(times)
            print(f"{pair} | {expected} | {observed} | {times[len(times) // 2]:.2f} / {times[-1]:.2f} ({len(times)} runs)")


@pytest.mark.parametrize(
    "left,right,runs",
    [
        # The cases, RUNS times each: EIM on both sides with the strictest
        # filtering there is, and symmetric against full cone.
        (N.EIM_APDF, N.EIM_APDF, RUNS),
        (N.APDM, N.EIM_EIF, RUNS),
        # The other filterings and orders, at most three runs by hand.
        (N.EIM_EIF, N.EIM_EIF, min(3, RUNS)),
        (N.EIM_ADF, N.EIM_APDF, min(3, RUNS)),
        (N.EIM_EIF, N.APDM, min(3, RUNS)),
        (N.APDM, N.EIM_ADF, min(3, RUNS)),
    ],
    ids=lambda v: v.value if isinstance(v, NatBehaviour) else f"{v}runs",
)
def test_punching_succeeds(natlab: Lab, lab_home: Path, left: NatBehaviour, right: NatBehaviour, runs: int) -> None:  # noqa: F811
    topo = pair_topology(natlab, left, right)
    start_trackers(natlab, lab_home)
    times: list[float] = []
    for i in range(runs):
        # A fresh port pair per run: no NAT state carried over from the run before.
        run = punch_once(natlab, topo.left, topo.right, lab_home, f"pair-{i}", 43300 + i, 43400 + i)
        assert run.a_up["path"] == run.b_up["path"] == "internet"
        assert run.a_up["peer"].startswith(topo.right_nat.wan_ip + ":")
        assert run.b_up["peer"].startswith(topo.left_nat.wan_ip + ":")
        assert run.elapsed < TARGET, f"run {i}: path after {run.elapsed:.2f}s"
        times.append(run.elapsed)
    RESULTS.append((f"{left.value} x {right.value}", "path up (internet)", f"path up (internet) {runs}/{runs}", times))


def connected_pair(natlab: Lab, lab_home: Path, left: N, right: N, group: str):  # type: ignore[no-untyped-def]  # noqa: F811
    """Two peers behind NATs of these kinds, each with its path up to the other."""
    topo = pair_topology(natlab, left, right)
    start_trackers(natlab, lab_home)
    a = spawn_peer(natlab, topo.left, lab_home, group, 43284)
    b = spawn_peer(natlab, topo.right, lab_home, group, 43284)
    a.expect('"event":"path_up"')
    b.expect('"event":"path_up"')
    return topo, a, b


def test_chat_line_crosses_two_port_restricted_nats(natlab: Lab, lab_home: Path) -> None:  # noqa: F811
    topo, a, b = connected_pair(natlab, lab_home, N.EIM_APDF, N.EIM_APDF, "chat")
    a.sendline("hello through two NATs")
    b.expect(r'\{"event":"message"[^\n]*\n')
    msg = json.loads(b.after.strip())
    assert msg["text"] == "hello through two NATs"
    assert msg["peer"] == f"{topo.left_nat.wan_ip}:43284"  # masquerade kept the port
    b.sendline("and back")
    a.expect(r'"event":"message"[^\n]*"text":"and back"')


def test_same_nat_uses_the_lan_path(natlab: Lab, lab_home: Path) -> None:  # noqa: F811
    topo = same_nat_topology(natlab)
    start_trackers(natlab, lab_home)
    times: list[float] = []
    for i in range(RUNS):
        # Different local ports (masquerade keeps a port only while it is free).
        run = punch_once(natlab, topo.a, topo.b, lab_home, f"lan-{i}", 43300 + i, 43500 + i)
        assert run.a_up["path"] == run.b_up["path"] == "lan", (run.a_up, run.b_up)
        assert run.a_up["peer"] == f"{topo.b.ip}:{43500 + i}"
        assert run.b_up["peer"] == f"{topo.a.ip}:{43300 + i}"
        assert run.elapsed < TARGET, f"run {i}: path after {run.elapsed:.2f}s"
        times.append(run.elapsed)
    RESULTS.append((f"same NAT ({topo.nat.behaviour.value})", "path up (LAN)", f"path up (LAN) {RUNS}/{RUNS}", times))


def test_both_symmetric_is_reported_impossible(natlab: Lab, lab_home: Path) -> None:  # noqa: F811
    topo = pair_topology(natlab, N.APDM, N.APDM)
    start_trackers(natlab, lab_home)
    timeout = 12
    t0 = time.monotonic()
    a = spawn_peer(natlab, topo.left, lab_home, "sym", 43284, "--timeout", str(timeout))
    b = spawn_peer(natlab, topo.right, lab_home, "sym", 43284, "--timeout", str(timeout))
    for child in (a, b):
        child.expect(pexpect.EOF, timeout=timeout + 5)
        child.close()
        assert child.exitstatus == 1, child.before
        evs = events(child.before)
        assert not [e for e in evs if e["event"] == "path_up"]
        gave_up = [e for e in evs if e["event"] == "gave_up"]
        assert gave_up and all(e["impossible"] for e in gave_up), gave_up
        assert "relay" in gave_up[0]["reason"]
        assert gave_up[0]["mapping"]["self"] == gave_up[0]["mapping"]["peer"] == "endpoint-dependent"
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + 2
    RESULTS.append(("apdm x apdm", "impossible, exit 1", "impossible, exit 1", [elapsed]))


def test_stranger_knowing_the_endpoint_cannot_inject(natlab: Lab, lab_home: Path) -> None:  # noqa: F811
    # Full cone on the victim's side, so the stranger's datagrams really reach its socket.
    topo, a, b = connected_pair(natlab, lab_home, N.EIM_EIF, N.EIM_APDF, "secret-group")
    stranger = udp_agent(natlab, topo.stranger).bind("203.0.113.50", 0)
    target = (topo.left_nat.wan_ip, 43284)
    forged = derive_key("guessed-group")
    for seq in range(1, 6):
        stranger.send(target, PeerMessage(Kind.DATA, b"stranger", seq, seq, b"INJECTED").to_wire(forged))
        stranger.send(target, PeerMessage(Kind.PING, b"stranger", 50 + seq).to_wire(forged))
        stranger.send(target, b"NtC1INJECTED" + bytes(40))
    assert stranger.recv(timeout=0.5) is None  # no pong, no reflection
    b.sendline("genuine")
    a.expect(r'\{"event":"message"[^\n]*"text":"genuine"')
    assert "INJECTED" not in a.before and '"event":"message"' not in a.before
