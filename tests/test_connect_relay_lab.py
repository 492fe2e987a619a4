"""Issue 24's acceptance matrix in the NAT lab: `nattool connect` between every pair of
{open, full, restricted, port, symmetric, UDP blocked}, with `nattool serve --relay`
trackers. Direct for the pairs that punch, relayed for symmetric<->symmetric, port-
restricted<->symmetric and anything with UDP blocked (over TCP to the tracker); the first
path within 5 s; a typed line crosses. Each case runs once here, several labs at a time;
scripts/connect_matrix_runs.py runs the matrix ten times for the closing-note table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pexpect
import pytest

from tests.conftest import nattool_cmd, nattool_env
from tests.natlab import Lab
from tests.natlab.connect_matrix import CASES, NAMES, TRACKERS, run_matrix, start_relay_trackers, table
from tests.natlab.fixtures import natlab_available  # noqa: F401 - fixture
from tests.natlab.nft import NatBehaviour
from tests.natlab.topologies import pair_topology
from tests.test_connect_loopback import connect_argv

pytestmark = [pytest.mark.natlab, pytest.mark.usefixtures("natlab_available")]

N = NatBehaviour
WORKERS = 4  # labs at a time: the cases are independent, and mostly waiting


def test_the_matrix_covers_every_pair_once() -> None:
    assert len(CASES) == 21 and len({frozenset((c.left, c.right)) for c in CASES}) == 21
    relayed = {c.name for c in CASES if c.via == "relay"}
    assert relayed == {
        "symmetric x symmetric", "port x symmetric",
        *(f"{NAMES[b]} x udp-blocked" for b in NAMES),
    }


@pytest.mark.parametrize("kind", ["direct", "relay"])
def test_every_pair_connects(kind: str, tmp_path: Path) -> None:
    cases = [c for c in CASES if c.via == kind]
    results = run_matrix(cases, tmp_path, nattool_env(tmp_path), nattool_cmd, connect_argv, workers=WORKERS)
    print("\n" + table(results))
    failed = [r for r in results if not r.ok]
    report = "\n\n".join(r.describe() + "".join(f"\n--- {side}:\n{text}" for side, text in r.transcript.items())
                         for r in failed)
    assert not failed, report


def test_relay_never_between_two_symmetric_nats_is_still_impossible(tmp_path: Path) -> None:
    """`--relay never` is today's behaviour even with a relaying tracker (exit 1, "impossible")."""
    env = nattool_env(tmp_path)
    with Lab() as lab:
        topo = pair_topology(lab, N.APDM, N.APDM)
        start_relay_trackers(lab, env, nattool_cmd)
        args = ["never-sym", *sum((["-t", t] for t in TRACKERS), []), "--json", "--timeout", "12", "--relay", "never"]
        children = [lab.spawn(h, connect_argv(*args), env=env, timeout=20) for h in (topo.left, topo.right)]
        for child in children:
            child.expect(pexpect.EOF)
            child.close()
            assert child.exitstatus == 1, child.before
            evs = [json.loads(line) for line in child.before.splitlines() if line.startswith("{")]
            assert not [e for e in evs if e["event"] in ("path_up", "relay", "tcp")]
            gave_up = [e for e in evs if e["event"] == "gave_up"]
            assert gave_up and all(e["impossible"] for e in gave_up)


def test_a_relayed_pair_moves_to_a_direct_path_when_udp_opens(tmp_path: Path) -> None:
    """Relayed because UDP is blocked on one side; the network then lets UDP through
    (the blocking rule goes: a port-restricted NAT remains). Direct probing went on all
    along, so each side reports a second path_up, via direct, for the same peer, and the
    next line takes it."""
    env = nattool_env(tmp_path)
    with Lab() as lab:
        topo = pair_topology(lab, N.NO_NAT, N.UDP_BLOCKED)
        start_relay_trackers(lab, env, nattool_cmd)
        args = ["upgrade", *sum((["-t", t] for t in TRACKERS), []), "--json", "--timeout", "30"]
        a, b = (lab.spawn(h, connect_argv(*args), env=env, timeout=20) for h in (topo.left, topo.right))
        first = {}
        for name, child in (("a", a), ("b", b)):
            child.expect(r'\{"event":"path_up"[^\n]*\n')
            first[name] = json.loads(child.after)
            assert first[name]["via"] == "relay"
        rules = lab.run(topo.right_nat, ["nft", "-a", "list", "chain", "inet", "natlab", "fwd4"]).stdout
        [handle] = re.findall(r"meta l4proto udp drop # handle (\d+)", rules)
        lab.run(topo.right_nat, ["nft", "delete", "rule", "inet", "natlab", "fwd4", "handle", handle])
        for name, child in (("a", a), ("b", b)):
            child.expect(r'\{"event":"path_up"[^\n]*\n')
            up = json.loads(child.after)
            assert up["via"] == "direct" and up["peer_id"] == first[name]["peer_id"], up
            assert '"event":"path_down"' not in child.before
        b.sendline("now direct")
        a.expect(r'\{"event":"message"[^\n]*"text":"now direct"[^\n]*\n')
        assert json.loads(a.after)["peer"].startswith(topo.right_nat.wan_ip + ":")  # not the relay's address
