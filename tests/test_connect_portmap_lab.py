"""`nattool connect` through a port mapping (issue 25), in the NAT lab: two symmetric NATs
with random ports (APDM), which plain punching cannot cross (test_connect_lab shows it
reported impossible); the left router grants port mappings by one protocol alone (PCP,
NAT-PMP or UPnP IGD: the lab's gateway, tests/natlab/portmap_gateway.py). Both ends are
the real CLI driven by pexpect, two real `nattool serve` trackers on the lab's internet.

Per protocol: a direct path through the mapping within ``TARGET`` s of both peers
running (their imports done: time from spawn is printed too), ``"method": "portmap"``
on the mapped side, and the mapping and its nftables
rules gone after `connect` exits, once by each way out: --once (a normal exit), Ctrl-C
(SIGINT) and SIGTERM. The three protocols run at once in one lab (their waits overlap).
By hand, ``CONNECT_PORTMAP_LAB_RUNS=10 pytest -s tests/test_connect_portmap_lab.py`` runs
ten of each protocol (the exits in turn) and prints time to path, median and worst.
A fourth case alongside: behind a double NAT the trackers refuse the mapped endpoint
(100.64.x.y) and the client registers with ``0`` there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pexpect
import pytest

from tests.conftest import BANNER_PREFIX, nattool_cmd, nattool_env
from tests.natlab import Lab, NatBehaviour
from tests.natlab.fixtures import natlab_available  # noqa: F401 - fixture
from tests.natlab.lab import Host, Nat, read_line
from tests.natlab.portmap_lab import PortmapGateway, start_portmap_gateway
from tests.natlab.shared_lab import shown_on_failure
from tests.natlab.topologies import SERVER_V4
from tests.test_connect_loopback import connect_argv

# One lane (pytest-xdist group): its module fixtures run every case at once, in each lane
# that runs one of their tests.
pytestmark = [pytest.mark.natlab, pytest.mark.usefixtures("natlab_available"),
              pytest.mark.xdist_group("connect_portmap_lab")]

PROTOCOLS = ("pcp", "natpmp", "upnp")
EXITS = ("once", "sigint", "sigterm")  # how the mapped side's `connect` ends, in turn
RUNS = int(os.environ.get("CONNECT_PORTMAP_LAB_RUNS", str(len(EXITS))))
TARGET = 5.0  # s from the later process start to the later path_up
TRACKERS = (f"{SERVER_V4[0]}:43283", f"{SERVER_V4[1]}:43283")
EXIT_STATUS = {"once": 0, "sigint": 130, "sigterm": 0}
# s between the starts of the cases that run at once: their `connect` processes do not all
# start (import, open sockets) in the same instant on a 2-core machine
STAGGER = 1.0


@dataclass
class Case:
    protocol: str
    gateway: PortmapGateway
    left_nat: Nat  # symmetric, grants mappings (by `protocol` only)
    right_nat: Nat  # symmetric, grants nothing
    left: Host
    right: Host


@dataclass
class Run:
    how: str
    elapsed: float  # s from the later spawn to the later path_up
    procedure: float  # s from the later of the two processes' start (imports done) to the later path_up
    left_events: list[dict[str, Any]]
    right_events: list[dict[str, Any]]
    left_status: int | None
    left_port: int
    gateway_deletes: list[Any]  # the gateway's delete events for the left socket
    mappings_after: list[Any]  # the gateway's mappings of the left socket after the exit
    rules_after: list[str]  # its nft rules naming the left socket after the exit


def events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def start_trackers(lab: Lab, home: Path) -> None:
    lab.add_server_host("tracker", addrs=list(SERVER_V4))
    for ep in TRACKERS:
        host, port = ep.rsplit(":", 1)
        proc = lab.popen("tracker", nattool_cmd("serve", "--host", host, "--port", port, "--store", "memory",
                                                "--rate-limit", "0"),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=nattool_env(home), text=True)
        line = read_line(proc.stdout, 15)
        assert line and BANNER_PREFIX in line, f"tracker {ep} did not start: {line!r}"


def spawn_peer(lab: Lab, host: Host, home: Path, group: str, port: int, *extra: str) -> pexpect.spawn:
    args = [group, *sum((["-t", t] for t in TRACKERS), []), "--port", str(port), "--json", "--timeout", "10",
            *extra]
    return lab.spawn(host, connect_argv(*args), env=nattool_env(home), timeout=15)


def wait_path_up(child: pexpect.spawn, log: list[str]) -> tuple[float, float]:
    """When the path_up line came, and when the process started (its events' "t" count
    from there: after Python's start-up and the imports)."""
    child.expect(r'\{"event":"path_up"[^\n]*\n')
    now = time.monotonic()
    log.append(child.before + child.after)
    return now, now - json.loads(child.after)["t"]


def gateway_events(gw: PortmapGateway, kind: str, internal: tuple[str, int], count: int) -> list[Any]:
    """The gateway's events of ``kind`` for ``internal`` once there are ``count`` (its
    output lines may come a moment after its answers), or what there is after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        found = [e for e in gw.events(kind) if e.internal == internal]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def run_once(lab: Lab, case: Case, home: Path, i: int) -> Run:
    how = EXITS[i % len(EXITS)]
    group = f"pm-{case.protocol}-{i}"
    # A fresh port pair per run: no NAT state (nor mapping) carried over from the run before.
    pl, pr = 44000 + i, 45000 + i
    left = spawn_peer(lab, case.left, home, group, pl, *(["--once"] if how == "once" else []))
    right = spawn_peer(lab, case.right, home, group, pr, "--once")
    t_start = time.monotonic()
    left_log: list[str] = []
    right_log: list[str] = []
    try:
        (up_l, ready_l), (up_r, ready_r) = wait_path_up(left, left_log), wait_path_up(right, right_log)
        t_up = max(up_l, up_r)
        if how != "once":
            left.kill(signal.SIGINT if how == "sigint" else signal.SIGTERM)
        left.expect(pexpect.EOF, timeout=10)
        left_log.append(left.before)
        left.close()
        right.expect(pexpect.EOF, timeout=10)
        right_log.append(right.before)
    finally:
        for child in (left, right):
            child.close(force=True)
    internal = (case.left.ip, pl)
    deletes = gateway_events(case.gateway, "delete", internal, 1)
    return Run(
        how, t_up - t_start, t_up - max(ready_l, ready_r), events("".join(left_log)), events("".join(right_log)),
        left.exitstatus, pl, deletes,
        [m for m in case.gateway.mappings() if m.internal == internal],
        [r for r in case.gateway.nft_rules() if f"{case.left.ip}" in r and str(pl) in r],
    )


def run_case(lab: Lab, case: Case, home: Path, delay: float) -> list[Run]:
    time.sleep(delay)
    return [run_once(lab, case, home, i) for i in range(RUNS)]


@dataclass
class DoubleNat:
    inner: Nat  # grants mappings; its WAN is in 100.64.0.0/10
    outer: Nat
    client: Host
    peer: Any  # a host with a public address (a ServerHost)


def run_double_nat(lab: Lab, dn: DoubleNat, home: Path, delay: float
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    time.sleep(delay)
    left = spawn_peer(lab, dn.client, home, "pm-double", 44500, "--once")
    right = spawn_peer(lab, dn.peer, home, "pm-double", 44501, "--once")
    logs: list[list[str]] = [[], []]
    try:
        for child, log in zip((left, right), logs):
            wait_path_up(child, log)
        for child, log in zip((left, right), logs):
            child.expect(pexpect.EOF, timeout=10)
            log.append(child.before)
    finally:
        for child in (left, right):
            child.close(force=True)
    return events("".join(logs[0])), events("".join(logs[1]))


@pytest.fixture(scope="module")
def lab_runs(natlab_available: None, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
             ) -> Iterator[tuple[Lab, dict[str, Future[list[Run]]]]]:
    home = tmp_path_factory.mktemp("connect-portmap-lab-home")
    with Lab() as lab:
        start_trackers(lab, home)
        cases = {}
        for n, proto in enumerate(PROTOCOLS):
            left_nat = lab.add_nat(f"gw{n}", NatBehaviour.APDM, grants_mappings=True)
            right_nat = lab.add_nat(f"sym{n}", NatBehaviour.APDM)
            cases[proto] = Case(proto, start_portmap_gateway(lab, left_nat, (proto,)), left_nat, right_nat,
                                lab.add_host(f"left{n}", behind=left_nat), lab.add_host(f"right{n}", behind=right_nat))
        outer = lab.add_nat("cgn", NatBehaviour.EIM_APDF)
        inner = lab.add_nat("inner", NatBehaviour.APDM, grants_mappings=True, behind=outer)
        start_portmap_gateway(lab, inner, ("pcp",))
        dn = DoubleNat(inner, outer, lab.add_host("dn_client", behind=inner),
                       lab.add_server_host("peer", addrs=["203.0.113.60"]))
        with ThreadPoolExecutor(len(cases) + 1) as pool:
            futures: dict[str, Future[Any]] = {proto: pool.submit(run_case, lab, case, home, n * STAGGER)
                                               for n, (proto, case) in enumerate(cases.items())}
            futures["double"] = pool.submit(run_double_nat, lab, dn, home, len(cases) * STAGGER)
            yield lab, futures
        _print_figures({p: futures[p] for p in PROTOCOLS})


def _print_figures(futures: dict[str, Future[list[Run]]]) -> None:
    print("\n\nport mapping | runs | direct via the mapping | time to path (s): median / worst"
          " | the same from both processes ready")
    for proto, future in futures.items():
        if future.exception() is not None:
            print(f"{proto} | - | failed: {future.exception()!r}")
            continue
        runs = future.result()
        ok = [r for r in runs if _portmap_path(r)]
        times = sorted(r.elapsed for r in runs)
        ready = sorted(r.procedure for r in runs)
        print(f"{proto} | {len(runs)} | {len(ok)}/{len(runs)} | {times[len(times) // 2]:.2f} / {times[-1]:.2f}"
              f" | {ready[len(ready) // 2]:.2f} / {ready[-1]:.2f}")


def first(evs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in evs if e["event"] == kind]
    assert found, (kind, evs)
    return found[0]


def _portmap_path(run: Run) -> bool:
    ups = [e for e in run.left_events if e["event"] == "path_up"]
    return bool(ups) and ups[0]["via"] == "direct" and ups[0]["method"] == "portmap"


@contextlib.contextmanager
def case_runs(lab_runs: tuple[Lab, dict[str, Future[list[Run]]]], protocol: str
              ) -> Iterator[tuple[Lab, list[tuple[str, Run]]]]:
    """The runs of ``protocol``'s case, each with a label; the lab is shown on failure."""
    lab, futures = lab_runs
    with shown_on_failure(lab):
        runs = futures[protocol].result()
        yield lab, [(f"{protocol} run {i} ({run.how})", run) for i, run in enumerate(runs)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_symmetric_pair_connects_directly_through_the_mapping(
        lab_runs: tuple[Lab, dict[str, Future[list[Run]]]], protocol: str) -> None:
    with case_runs(lab_runs, protocol) as (lab, runs):
        for label, run in runs:
            (granted,) = [e for e in run.left_events if e["event"] == "portmap" and e["change"] == "granted"]
            assert granted["protocol"] == protocol, label
            gw_nat = lab.node(f"gw{PROTOCOLS.index(protocol)}")
            assert isinstance(gw_nat, Nat)
            mapped = granted["external"]
            assert mapped.startswith(f"{gw_nat.wan_ip}:"), (label, granted)
            # Both trackers list us at the mapped endpoint (we registered it as <public>); a
            # grant later than connect_session.PORTMAP_WAIT follows a registration with `0`.
            seen = {e["tracker"]: e["public"] for e in run.left_events if e["event"] == "registered"}
            assert seen == dict.fromkeys(TRACKERS, mapped), (label, seen)
            left_up = first(run.left_events, "path_up")
            assert (left_up["via"], left_up["method"], left_up["observed_as"]) == ("direct", "portmap", mapped), \
                (label, run.left_events)
            right_up = first(run.right_events, "path_up")
            assert (right_up["via"], right_up["peer"]) == ("direct", mapped), (label, run.right_events)
            # Counted from both processes ready: on a loaded 2-core machine Python's own
            # start-up (imports) took up to 5 s of the time from spawn, the mapping ~0.5 s.
            assert run.procedure < TARGET, f"{label}: path after {run.procedure:.2f}s ({run.elapsed:.2f}s from spawn)"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_mapping_and_its_rules_are_gone_after_connect_exits(
        lab_runs: tuple[Lab, dict[str, Future[list[Run]]]], protocol: str) -> None:
    with case_runs(lab_runs, protocol) as (_, runs):
        assert {run.how for _, run in runs} == set(EXITS[: len(runs)])
        for label, run in runs:
            assert run.left_status == EXIT_STATUS[run.how], label
            # Deleted by `connect` itself (not expired, not the gateway's own exit).
            assert [e.reason for e in run.gateway_deletes] == ["request"], (label, run.gateway_deletes)
            assert run.mappings_after == [] and run.rules_after == [], (label, run.mappings_after, run.rules_after)
            deleted = [e for e in run.left_events if e["event"] == "portmap" and e["change"] == "deleted"]
            assert len(deleted) == 1 and deleted[0]["protocol"] == protocol, (label, deleted)


def test_behind_a_double_nat_the_trackers_refuse_the_mapping_and_get_0(
        lab_runs: tuple[Lab, dict[str, Future[Any]]]) -> None:
    # The inner router maps us to 100.64.x.y: the trackers see the outer router's address,
    # refuse that <public>, and get `0`; punching goes on as without a mapping.
    lab, futures = lab_runs
    with shown_on_failure(lab):
        left, right = futures["double"].result()
        inner = lab.node("inner")
        outer = lab.node("cgn")
        assert isinstance(inner, Nat) and isinstance(outer, Nat)
        (granted,) = [e for e in left if e["event"] == "portmap" and e["change"] == "granted"]
        assert granted["external"].startswith(f"{inner.wan_ip}:")
        refused = [e for e in left if e["event"] == "portmap" and e["change"] == "refused"]
        assert sorted(e["tracker"] for e in refused) == sorted(TRACKERS), refused
        assert all(e["external"] == granted["external"] and e["reason"] for e in refused)
        regs = [e for e in left if e["event"] == "registered"]
        assert regs and all(e["public"].startswith(f"{outer.wan_ip}:") for e in regs), regs
        (left_up,) = [e for e in left if e["event"] == "path_up"]
        assert (left_up["via"], left_up["method"]) == ("direct", "punch")
        assert [e for e in right if e["event"] == "path_up"]


# --------------------------------------------------------------------------- renewal, loss, library

SHORT_LIFETIME = 4  # s the renewal lab's gateways grant at most: a renewal every 2-2.5 s
# A UPnP IGD answers AddPortMapping without a lease (the client's is taken): no short one here.
RENEWING = ("pcp", "natpmp")
# The gateway falls silent: PCP / NAT-PMP datagrams to it are dropped on its input.
SILENCE = """table inet silence {
    chain input { type filter hook input priority -300; policy accept; udp dport 5351 drop; }
}"""
LIBRARY_SCRIPT = """
import asyncio, sys, nattool
async def main():
    group, port, portmap = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "on"
    conn = await nattool.connect(group, sys.argv[4:], port=port, portmap=portmap, timeout=30)
    await asyncio.sleep(1.5)
    print("connected", flush=True)
    sys.stdin.readline()
    await conn.aclose()
    print("closed", flush=True)
asyncio.run(main())
"""


@dataclass
class Held:
    """What became of a mapping that was renewed, then lost when the gateway went."""

    events: list[dict[str, Any]]
    grants: list[Any]  # the gateway's grant events for our socket (the first and renewals)
    status: int | None


def renew_then_lose(lab: Lab, nat: Nat, gw: PortmapGateway, host: Host, home: Path, delay: float) -> Held:
    time.sleep(delay)
    child = spawn_peer(lab, host, home, f"renew-{gw.protocols[0]}", 44700, "--timeout", "30")
    log: list[str] = []
    try:
        for _ in range(2):  # two renewals (at 1/2 to 5/8 of 4 s each)
            child.expect(r'\{"event":"portmap"[^\n]*"change":"renewed"[^\n]*\n', timeout=12)
            log.append(child.before + child.after)
        grants = gateway_events(gw, "grant", (host.ip, 44700), 3)
        if gw.protocols == ("pcp",):
            gw.stop()  # the gateway goes (a reboot): its port is closed, the mapping gone
        else:  # the gateway goes silent: renewals go unanswered, the mapping expires at both ends
            lab.run(nat, ["nft", "-f", "-"], input=SILENCE)
        child.expect(r'\{"event":"portmap"[^\n]*"change":"lost"[^\n]*\n', timeout=12)
        log.append(child.before + child.after)
        external = events(log[0])[0]["external"]
        while True:  # registered again with `0`: the trackers see the plain NAT's port
            child.expect(r'\{"event":"registered"[^\n]*\n', timeout=5)
            log.append(child.before + child.after)
            if json.loads(child.after)["public"] != external:
                break
        child.kill(signal.SIGTERM)
        child.expect(pexpect.EOF, timeout=10)
        log.append(child.before)
        child.close()
    finally:
        child.close(force=True)
    return Held(events("".join(log)), grants, child.exitstatus)


@dataclass
class Library:
    during: list[Any]  # the gateway's mappings of the script's socket while it is connected
    after: list[Any]  # ... once aclose() returned
    deletes: list[Any]


def library_run(lab: Lab, gw: PortmapGateway, host: Host, home: Path, port: int, portmap: bool) -> Library:
    import sys

    argv = [sys.executable, "-c", LIBRARY_SCRIPT, f"lib-{port}", str(port), "on" if portmap else "off", *TRACKERS]
    child = lab.spawn(host, argv, env=nattool_env(home), timeout=15)
    try:
        child.expect("connected")
        during = [m for m in gw.mappings() if m.internal == (host.ip, port)]
        child.sendline("")
        child.expect("closed")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    deletes = gateway_events(gw, "delete", (host.ip, port), 1 if portmap else 0)
    return Library(during, [m for m in gw.mappings() if m.internal == (host.ip, port)], deletes)


def cli_without_portmap(lab: Lab, gw: PortmapGateway, host: Host, home: Path, port: int
                        ) -> tuple[list[dict[str, Any]], list[Any]]:
    """`connect --no-portmap` alone in its group (it gives up after 2 s): its events and
    the gateway's grants for its socket."""
    child = spawn_peer(lab, host, home, f"cli-{port}", port, "--no-portmap", "--timeout", "2")
    try:
        child.expect(pexpect.EOF, timeout=15)
    finally:
        child.close(force=True)
    return events(child.before), [e for e in gw.events("grant") if e.internal == (host.ip, port)]


@pytest.fixture(scope="module")
def held_runs(natlab_available: None, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
              ) -> Iterator[tuple[Lab, dict[str, Future[Any]]]]:
    home = tmp_path_factory.mktemp("connect-portmap-renewal-home")
    with Lab() as lab:
        start_trackers(lab, home)
        jobs: dict[str, Any] = {}
        for n, proto in enumerate(RENEWING):
            nat = lab.add_nat(f"short{n}", NatBehaviour.APDM, grants_mappings=True)
            gw = start_portmap_gateway(lab, nat, (proto,), max_lifetime=SHORT_LIFETIME)
            jobs[proto] = (renew_then_lose, lab, nat, gw, lab.add_host(f"held{n}", behind=nat), home, n * STAGGER)
        nat = lab.add_nat("libnat", NatBehaviour.APDM, grants_mappings=True)
        gw = start_portmap_gateway(lab, nat, ("natpmp",))
        host = lab.add_host("lib", behind=nat)
        with ThreadPoolExecutor(len(jobs) + 1) as pool:
            futures: dict[str, Future[Any]] = {k: pool.submit(*job) for k, job in jobs.items()}
            futures["library"] = pool.submit(lambda: (library_run(lab, gw, host, home, 44800, True),
                                                      library_run(lab, gw, host, home, 44801, False),
                                                      cli_without_portmap(lab, gw, host, home, 44802)))
            yield lab, futures


@pytest.mark.parametrize("protocol", RENEWING)
def test_the_mapping_is_renewed_before_expiry_and_a_lost_one_is_withdrawn(
        held_runs: tuple[Lab, dict[str, Future[Any]]], protocol: str) -> None:
    lab, futures = held_runs
    with shown_on_failure(lab):
        held: Held = futures[protocol].result()
        granted = first(held.events, "portmap")
        assert (granted["change"], granted["protocol"], granted["lifetime_s"]) == ("granted", protocol, SHORT_LIFETIME)
        renewed = [e for e in held.events if e["event"] == "portmap" and e["change"] == "renewed"]
        # Renewed in time (the gateway never let it expire), at the same external endpoint.
        assert len(renewed) == 2 and {e["external"] for e in renewed} == {granted["external"]}, renewed
        assert len(held.grants) >= 3, held.grants
        assert all(b.raw["lifetime"] and a.external == b.external for a, b in zip(held.grants, held.grants[1:]))
        (lost,) = [e for e in held.events if e["event"] == "portmap" and e["change"] == "lost"]
        assert lost["external"] == granted["external"] and lost["reason"], lost
        # Lost: the trackers get `0`, and see us at an endpoint that is no mapping of ours.
        regs = [e for e in held.events if e["event"] == "registered"]
        assert regs[-1]["public"] != granted["external"], regs
        assert held.status == 0  # SIGTERM
        assert not [e for e in held.events if e["event"] == "portmap" and e["change"] == "deleted"]


def test_the_library_maps_the_port_and_aclose_deletes_it_portmap_false_and_no_portmap_do_not_ask(
        held_runs: tuple[Lab, dict[str, Future[Any]]]) -> None:
    lab, futures = held_runs
    with shown_on_failure(lab):
        on, off, (cli_events, cli_grants) = futures["library"].result()
        assert len(on.during) == 1 and on.during[0].via == "natpmp", on
        assert on.after == [] and [e.reason for e in on.deletes] == ["request"], on
        assert off.during == off.after == off.deletes == [], off
        # The same for the command line's --no-portmap: nothing asked, nothing said.
        assert cli_grants == [] and [e for e in cli_events if e["event"] == "registered"], cli_events
        assert not [e for e in cli_events if e["event"] == "portmap"], cli_events
