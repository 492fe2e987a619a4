"""`nattool probe --json` behind real kernel NATs (issue 4, section 3).

Every test builds a NAT lab (tests/natlab): a real `nattool serve` (RFC 5780: alternate
address and port) runs in the "internet" namespace, and the real `nattool probe --json`
runs behind the NAT, as separate processes. All traffic stays inside namespaces this test
creates (documentation addresses 203.0.113.0/24, 198.51.100.0/24, 192.0.2.0/24,
2001:db8::/32).

``NATLAB_PROBE_RUNS`` (default 10) sets how many probes each topology must classify
correctly, all against one lab, all started together (each has its own sockets and so
its own mappings); ``-s`` shows the wall-time table.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import BANNER_PREFIX, nattool_cmd, nattool_env
from tests.natlab import Lab, NatBehaviour, Service
from tests.natlab.lab import NodeRef
from tests.natlab.fixtures import (  # noqa: F401 - fixtures, imported like tests/test_natlab.py
    natlab,
    natlab_available,
)
from tests.natlab.topologies import ProbeTopology, probe_topology

pytestmark = [pytest.mark.natlab, pytest.mark.usefixtures("natlab_available")]

PORT, ALT_PORT = 43283, 43284
# CI runs each topology once; the acceptance repetition ("10 of 10 runs") is by hand:
# NATLAB_PROBE_RUNS=10 python -m pytest tests/test_probe_lab.py -k every_time
RUNS = max(1, int(os.environ.get("NATLAB_PROBE_RUNS", "1")))
# Generous: a probe takes 0.5-3 s here, but the machine is shared and sometimes loaded.
PROBE_TIMEOUT = 60.0
SERVE_READY = 30.0

EI, AD, APD = "endpoint-independent", "address-dependent", "address-and-port-dependent"
EXIT_OK, EXIT_TIMEOUT = 0, 3  # nattool.exit_codes: OK, TIMEOUT (no server answered)


# --------------------------------------------------------------------------- helpers


def start_serve(lab: Lab, node: NodeRef, host: str, *, alt_host: str | None = None,
                alt_port: int | None = None, port: int = PORT) -> Service:
    """A real `nattool serve` in ``node``; RFC 5780 when ``alt_host``/``alt_port`` are given."""
    argv = ["serve", "--host", host, "--port", str(port), "--store", "memory", "--rate-limit", "0"]
    if alt_host is not None:
        argv += ["--alt-host", alt_host]
    if alt_port is not None:
        argv += ["--alt-port", str(alt_port)]
    return lab.start_service(node, nattool_cmd(*argv), ready=BANNER_PREFIX, timeout=SERVE_READY,
                             env=nattool_env())


def endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class ProbeRun:
    report: dict[str, Any]
    wall: float  # seconds, the whole `nattool probe` process
    returncode: int
    stderr: str


def run_probe(lab: Lab, node: NodeRef, *servers: str, flags: tuple[str, ...] = ()) -> ProbeRun:
    (run,) = run_probes(lab, node, *servers, flags=flags, count=1)
    return run


def run_probes(lab: Lab, node: NodeRef, *servers: str, flags: tuple[str, ...] = (), count: int) -> list[ProbeRun]:
    """``count`` `nattool probe --json` processes in ``node``, started together. Their
    output goes to files: no probe can stall on a full pipe while another is read."""
    argv = nattool_cmd("probe", "--json", *flags, *servers)
    with contextlib.ExitStack() as files:
        outs = [(files.enter_context(tempfile.TemporaryFile("w+")), files.enter_context(tempfile.TemporaryFile("w+")))
                for _ in range(count)]
        t0 = time.monotonic()
        procs = [lab.popen(node, argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=nattool_env())
                 for out, err in outs]
        walls: dict[int, float] = {}
        while len(walls) < count:
            now = time.monotonic()
            for n, proc in enumerate(procs):
                if n not in walls and proc.poll() is not None:
                    walls[n] = now - t0
            if now - t0 > PROBE_TIMEOUT:
                pytest.fail(f"{count - len(walls)} of {count} probes still running after {PROBE_TIMEOUT:g} s")
            time.sleep(0.01)
        runs = []
        for n, ((out, err), proc) in enumerate(zip(outs, procs)):
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
            assert "Traceback" not in stderr, stderr
            try:
                report = json.loads(stdout)
            except json.JSONDecodeError:
                pytest.fail(f"probe printed no JSON (exit {proc.returncode}):\n{stdout}\n{stderr}")
            assert report["schema"] == "nattool.probe/1"
            runs.append(ProbeRun(report, walls[n], proc.returncode, stderr))
        return runs


def m_local_port(report: dict[str, Any]) -> int:
    """The local port of the probe's mapping socket M (from its own evidence)."""
    for server in report["servers"]:
        for txn in server["transactions"]:
            if txn["socket"] == "M":
                return split_endpoint(txn["local"])[1]
    raise AssertionError(f"no transaction of socket M in {report['servers']}")


@dataclass(frozen=True)
class Expected:
    udp: str
    mapping: str | None
    filtering: str | None
    nat_type: str
    public_ip: str | None
    no_nat: bool | None
    port_preservation: bool | None
    exit_code: int = EXIT_OK
    rfc5780: bool = True  # the server must be recognised as RFC 5780


def expected_for(behaviour: NatBehaviour, topo: ProbeTopology) -> Expected:
    nat_type = (behaviour.classic or "").lower()
    if behaviour is NatBehaviour.UDP_BLOCKED:
        return Expected("blocked", None, None, nat_type, None, None, None, EXIT_TIMEOUT, rfc5780=False)
    if behaviour is NatBehaviour.NO_NAT:
        return Expected("ok", EI, EI, nat_type, topo.client.ip, True, True)
    if behaviour is NatBehaviour.IPV6_FIREWALL:
        assert topo.client.ip6 is not None
        return Expected("ok", EI, APD, nat_type, topo.client.ip6, True, True)
    # Masquerade keeps a free port (EIM) and picks a random one per destination (APDM).
    preserved = behaviour is not NatBehaviour.APDM
    return Expected("ok", behaviour.mapping, behaviour.filtering, nat_type, topo.nat.wan_ip, False, preserved)


def mismatches(run: ProbeRun, want: Expected) -> list[str]:
    """Every way the report differs from ``want`` (empty: classified correctly)."""
    r = run.report
    bad: list[str] = []

    def check(what: str, got: object, expected: object) -> None:
        if got != expected:
            bad.append(f"{what}={got!r} (want {expected!r})")

    check("exit", run.returncode, want.exit_code)
    check("udp", r.get("udp"), want.udp)
    check("mapping", r.get("mapping"), want.mapping)
    check("filtering", r.get("filtering"), want.filtering)
    check("nat_type", str(r.get("nat_type")).lower(), want.nat_type)
    check("no_nat", r.get("no_nat"), want.no_nat)
    check("port_preservation", r.get("port_preservation"), want.port_preservation)
    pub = r.get("public_endpoint")
    if want.public_ip is None:
        check("public_endpoint", pub, None)
    elif pub is None:
        bad.append(f"public_endpoint=None (want {want.public_ip}:*)")
    else:
        ip, port = split_endpoint(pub)
        check("public_endpoint.ip", ip, want.public_ip)
        if want.port_preservation is not None and r.get("port_preservation") is not None:
            # port_preservation must describe what really happened to socket M's port.
            check("port kept", port == m_local_port(r), want.port_preservation)
    servers = r.get("servers") or []
    check("servers", len(servers), 1)
    if servers:
        check("rfc5780", servers[0].get("rfc5780"), want.rfc5780)
    return bad


# Wall times of every probe run, per topology, for the summary at the end of the module.
TIMES: dict[str, list[tuple[float, float]]] = {}


@pytest.fixture(scope="module", autouse=True)
def _time_table() -> Any:
    yield
    if TIMES:
        print("\n\nprobe wall time per topology (process / probe's own elapsed_s):", file=sys.stderr)
        for name, ts in TIMES.items():
            walls, own = [w for w, _ in ts], [e for _, e in ts]
            print(f"  {name:<14} runs={len(ts):>2}  wall mean {statistics.mean(walls):.2f} s "
                  f"max {max(walls):.2f} s  | elapsed_s mean {statistics.mean(own):.2f} "
                  f"max {max(own):.2f}", file=sys.stderr)


# --------------------------------------------------------------------------- topologies

TOPOLOGIES = [
    NatBehaviour.NO_NAT,
    NatBehaviour.EIM_EIF,
    NatBehaviour.EIM_ADF,
    NatBehaviour.EIM_APDF,
    NatBehaviour.APDM,
    NatBehaviour.UDP_BLOCKED,
    NatBehaviour.IPV6_FIREWALL,
]


@pytest.mark.parametrize("behaviour", TOPOLOGIES, ids=[b.value for b in TOPOLOGIES])
def test_probe_classifies_topology_every_time(natlab: Lab, behaviour: NatBehaviour) -> None:
    topo = probe_topology(natlab, behaviour)
    if behaviour is NatBehaviour.IPV6_FIREWALL:
        start_serve(natlab, topo.server, topo.primary6, alt_host=topo.alternate6, alt_port=ALT_PORT)
        server, flags = endpoint(topo.primary6, PORT), ("-6",)
    else:
        start_serve(natlab, topo.server, topo.primary, alt_host=topo.alternate, alt_port=ALT_PORT)
        server, flags = endpoint(topo.primary, PORT), ("-4",)
    want = expected_for(behaviour, topo)
    failures: list[str] = []
    times = TIMES.setdefault(behaviour.value, [])
    for n, run in enumerate(run_probes(natlab, topo.client, server, flags=flags, count=RUNS)):
        times.append((run.wall, float(run.report.get("elapsed_s") or 0.0)))
        bad = mismatches(run, want)
        if bad:
            failures.append(f"run {n + 1}: " + ", ".join(bad)
                            + f"\n  filtering_reason={run.report.get('filtering_reason')!r}"
                            + f" mapping_reason={run.report.get('mapping_reason')!r}"
                            + f"\n  servers={json.dumps(run.report.get('servers'))[:3000]}")
    assert not failures, (f"{behaviour.value}: {len(failures)} of {RUNS} runs misclassified\n"
                          + "\n".join(failures))


# --------------------------------------------------------------------------- servers without RFC 5780


def test_server_without_rfc5780_gives_no_filtering_verdict(natlab: Lab) -> None:
    """A tracker without --alt-*: no OTHER-ADDRESS, so the silence of its CHANGE-REQUEST
    answers behind a port-restricted NAT must not become a filtering verdict."""
    topo = probe_topology(natlab, NatBehaviour.EIM_APDF)
    start_serve(natlab, topo.server, topo.primary)
    for _ in range(3):
        run = run_probe(natlab, topo.client, endpoint(topo.primary, PORT), flags=("-4",))
        r = run.report
        assert run.returncode == EXIT_OK
        assert r["udp"] == "ok"
        assert split_endpoint(r["public_endpoint"])[0] == topo.nat.wan_ip
        assert r["filtering"] is None, r["filtering_reason"]
        assert r["filtering_reason"], "an unknown verdict must say why"
        assert r["nat_type"] == "unknown"  # no cone name without a filtering measurement
        (server,) = r["servers"]
        assert server["answered"] and server["protocol"] == "stun"
        assert server["rfc5780"] is False and server["rfc5780_reason"]
        assert server["other_address"] is None


def test_server_with_alternate_port_only_never_guesses_the_filtering(natlab: Lab) -> None:
    """--alt-port without --alt-host: only change-port can be tested. Behind an
    address-dependent filter its answer arrives, which leaves endpoint-independent and
    address-dependent open: the probe must not pick one."""
    topo = probe_topology(natlab, NatBehaviour.EIM_ADF)
    start_serve(natlab, topo.server, topo.primary, alt_port=ALT_PORT)
    for _ in range(2):
        r = run_probe(natlab, topo.client, endpoint(topo.primary, PORT), flags=("-4",)).report
        assert r["udp"] == "ok"
        # Likewise, one IP cannot tell endpoint-independent from address-dependent mapping.
        assert r["mapping"] is None, r["mapping_reason"]
        assert r["filtering"] is None, f"no change-IP test was possible, yet: {r['filtering_reason']}"
        assert r["filtering_reason"]
        assert r["nat_type"] == "unknown"


def test_server_with_alternate_address_only_never_guesses_the_filtering(natlab: Lab) -> None:
    """--alt-host without --alt-port: OTHER-ADDRESS differs in IP only. Behind a
    port-restricted NAT the silence of a change-IP answer cannot tell address-dependent
    from address-and-port-dependent filtering: no verdict. The mapping (two IPs) is known."""
    topo = probe_topology(natlab, NatBehaviour.EIM_APDF)
    start_serve(natlab, topo.server, topo.primary, alt_host=topo.alternate)
    for _ in range(2):
        r = run_probe(natlab, topo.client, endpoint(topo.primary, PORT), flags=("-4",)).report
        assert r["udp"] == "ok"
        assert r["mapping"] == EI, r["mapping_reason"]
        assert r["filtering"] is None, r["filtering_reason"]
        assert r["filtering_reason"]
        assert r["nat_type"] == "unknown"
        (server,) = r["servers"]
        assert server["other_address"] == endpoint(topo.alternate, PORT)


def test_control_test_not_reported_when_not_run(natlab: Lab) -> None:
    topo = probe_topology(natlab, NatBehaviour.EIM_APDF)
    start_serve(natlab, topo.server, topo.primary, alt_host=topo.alternate)
    r = run_probe(natlab, topo.client, endpoint(topo.primary, PORT), flags=("-4",)).report
    (server,) = r["servers"]
    ran = [t for t in server["transactions"] if t["request"].endswith("(control)")
           and "change" in t["request"]]
    assert ran == []  # with no alternate port there is no control CHANGE-REQUEST to send ...
    assert server["filtering_tests"]["control_honoured"] is None  # ... so no result either


def check_mapping_only(r: dict[str, Any], behaviour: NatBehaviour, topo: ProbeTopology) -> None:
    """The verdict from servers that can only show the mapping: the right mapping, and no
    filtering verdict.

    Two server IPs (one port each) show whether the mapping is endpoint-independent. When
    it is not, telling address-dependent from address-and-port-dependent needs two ports
    on one IP (RFC 5780 test III), so `mapping` may stay unknown -- but it must say "not
    endpoint-independent", and the classic name is then "symmetric".
    """
    assert r["udp"] == "ok"
    assert split_endpoint(r["public_endpoint"])[0] == topo.nat.wan_ip
    assert r["filtering"] is None, r["filtering_reason"]
    assert r["filtering_reason"]
    if behaviour is NatBehaviour.APDM:
        assert r["endpoint_independent_mapping"] is False, r["mapping_reason"]
        assert r["mapping"] in (None, APD), r["mapping_reason"]
        assert r["nat_type"] == "symmetric"
    else:
        assert r["endpoint_independent_mapping"] is True, r["mapping_reason"]
        assert r["mapping"] == EI, r["mapping_reason"]
        assert r["nat_type"] == "unknown"  # no cone name without a filtering measurement


@pytest.mark.parametrize("behaviour", [NatBehaviour.EIM_EIF, NatBehaviour.EIM_APDF, NatBehaviour.APDM],
                         ids=["eim-eif", "eim-apdf", "apdm"])
def test_two_plain_trackers_give_mapping_only(natlab: Lab, behaviour: NatBehaviour) -> None:
    """Two trackers without RFC 5780 on different IPs: the mapping verdict comes from one
    socket across both; filtering stays unknown (even behind a full cone)."""
    topo = probe_topology(natlab, behaviour)
    start_serve(natlab, topo.server, topo.primary)
    start_serve(natlab, topo.server, topo.other)
    servers = (endpoint(topo.primary, PORT), endpoint(topo.other, PORT))
    for _ in range(2):
        r = run_probe(natlab, topo.client, *servers, flags=("-4",)).report
        assert r["udp"] == "ok"
        check_mapping_only(r, behaviour, topo)
        assert [s["rfc5780"] for s in r["servers"]] == [False, False]
        mapped = [split_endpoint(s["mapped"]) for s in r["servers"]]
        assert {ip for ip, _ in mapped} == {topo.nat.wan_ip}
        assert (mapped[0][1] == mapped[1][1]) == (behaviour is not NatBehaviour.APDM)


# An old tracker: answers `//nat` with the observed source endpoint and ignores anything
# else (STUN included), like the original Go server. Plain Python, no nattool code.
OLD_TRACKER = r'''
import select, socket, sys
port, ips = int(sys.argv[1]), sys.argv[2:]
socks = []
for ip in ips:
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, port))
    socks.append(s)
print("old tracker ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, addr = s.recvfrom(4096)
        if data.split(b"\n", 1)[0].strip() == b"//nat":
            host = "[%s]" % addr[0] if ":" in addr[0] else addr[0]
            s.sendto(("%s:%d" % (host, addr[1])).encode(), addr)
            print("nat", addr[0], addr[1], flush=True)
        else:
            print("ignored", len(data), flush=True)
'''


@pytest.mark.parametrize("behaviour", [NatBehaviour.EIM_EIF, NatBehaviour.APDM], ids=["eim-eif", "apdm"])
def test_old_trackers_are_used_for_mapping_only(natlab: Lab, behaviour: NatBehaviour) -> None:
    topo = probe_topology(natlab, behaviour)
    old = natlab.start_service(topo.server, [sys.executable, "-c", OLD_TRACKER, str(PORT),
                                             topo.primary, topo.other], ready="old tracker ready")
    r = run_probe(natlab, topo.client, endpoint(topo.primary, PORT), endpoint(topo.other, PORT),
                  flags=("-4",)).report
    assert r["udp"] == "ok"
    assert [s["protocol"] for s in r["servers"]] == ["//nat", "//nat"]
    assert all(s["rfc5780"] is False for s in r["servers"])
    check_mapping_only(r, behaviour, topo)
    # The old tracker really was asked (//nat) and really saw STUN it did not understand.
    assert any(line.startswith("nat ") for line in old.lines)
