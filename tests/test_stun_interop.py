"""Interoperability with STUN software nobody here wrote (issue 4): coturn.

(a) coturn's clients ``turnutils_stunclient`` and ``turnutils_natdiscovery`` against
    ``nattool serve``: on loopback (no root needed) and behind real lab NATs. Their
    reflexive address must be what ``nattool whoami`` reports from the same local port,
    and the NAT's WAN address; natdiscovery's RFC 5780 verdicts must match the NAT.
(b) ``nattool probe`` against coturn's ``turnserver`` (two listening IPs: RFC 5780) behind
    lab NATs must classify each NAT correctly; against a one-address coturn it must not
    claim a filtering verdict.

Traffic goes only to 127.0.0.0/8, ::1 and namespaces the tests create. coturn's clients
can wait forever (behind a NAT, its stunclient waits for an answer the NAT never lets in):
every run is bounded by a timeout and its output parsed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Iterator, Sequence

import pytest

from tests.conftest import TrackerFactory, free_udp_port, nattool_cmd, nattool_env, run_nattool
from tests.natlab import Lab, NatBehaviour
from tests.natlab.lab import ServerHost
from tests.natlab.fixtures import (  # noqa: F401 - fixtures, imported like tests/test_natlab.py
    natlab,
    natlab_available,
    turnserver_available,
)
from tests.natlab.shared_lab import SharedLab, cases_in_one_lab, check_case
from tests.natlab.stun import TurnServer, communicate_bounded, run_stunclient, start_turnserver
from tests.natlab.topologies import SERVER_V4, SERVER_V6, ProbeTopology, probe_topology
from tests.test_probe_lab import (
    APD,
    EI,
    ProbeRun,
    endpoint,
    expected_for,
    mismatches,
    run_probe,
    run_probes,
    split_endpoint,
    start_serve,
)

AD = "address-dependent"
STUN_PORT, STUN_ALT_PORT = 3478, 3479
CLIENT_TIMEOUT = 30.0  # natdiscovery needs ~3 s per silent test; the machine may be loaded

COTURN_TERMS = {
    "Endpoint Independent": EI,
    "Address Dependent": AD,
    "Address and Port Dependent": APD,
}


# --------------------------------------------------------------------------- coturn output


@dataclass(frozen=True)
class Response:
    """One decoded answer as a coturn client prints it."""

    origin: tuple[str, int] | None
    other: tuple[str, int] | None
    reflexive: tuple[str, int] | None
    local: tuple[str, int] | None


_ADDR = {
    "Response origin": "origin",
    "Other addr": "other",
    "UDP reflexive addr": "reflexive",
    "Local addr": "local",
}
# "Response origin: : 1.2.3.4:5" but "UDP reflexive addr: 1.2.3.4:5" (one colon fewer).
_LINE = re.compile(r"IPv[46]\.\s+(Response origin|Other addr|UDP reflexive addr|Local addr):\s*(?::\s+)?(\S+)\s*$")


def _coturn_endpoint(text: str) -> tuple[str, int]:
    # coturn prints "1.2.3.4:5" and "::1:5" alike (no brackets): the port is after the last colon.
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def parse_coturn(output: str) -> list[Response]:
    """The answers in a turnutils_stunclient / turnutils_natdiscovery output, in order.

    An answer is the run of address lines that follows a "RFC 5780 response N" header, or
    (plain RFC 8489 mode, no header) each "UDP reflexive addr" line on its own.
    """
    blocks: list[dict[str, tuple[str, int]]] = []
    current: dict[str, tuple[str, int]] | None = None
    for line in output.splitlines():
        if line.startswith("RFC 5780 response"):
            current = {}
            blocks.append(current)
            continue
        m = _LINE.search(line)
        if not m:
            continue
        key, value = _ADDR[m.group(1)], _coturn_endpoint(m.group(2))
        if current is None or (key in current and key != "origin"):
            # Plain mode prints no headers: a repeated attribute starts a new answer.
            current = {}
            blocks.append(current)
        current.setdefault(key, value)
    return [Response(b.get("origin"), b.get("other"), b.get("reflexive"), b.get("local")) for b in blocks]


def first_answer_complete(output: str) -> bool:
    """The first answer in ``output`` has every address the tests check. Once it has, more
    output cannot change it: parse_coturn keeps an answer's first value of an attribute
    and starts a new answer for anything else."""
    answers = parse_coturn(output)
    return bool(answers) and None not in (answers[0].origin, answers[0].other, answers[0].reflexive)


def natdiscovery_verdicts(output: str) -> tuple[str | None, str | None]:
    """(mapping, filtering) in RFC 4787 terms from natdiscovery's summary lines."""
    mapping = re.search(r"NAT with (.+?) Mapping!", output)
    filtering = re.search(r"NAT with (.+?) Filtering!", output)
    return (COTURN_TERMS.get(mapping.group(1)) if mapping else None,
            COTURN_TERMS.get(filtering.group(1)) if filtering else None)


def test_parse_coturn_output() -> None:
    """The parser on output captured from coturn 4.6 (both modes, IPv4 and IPv6)."""
    rfc5780 = (
        "========================================\nRFC 5780 response 1\n"
        "0: : IPv4. Response origin: : 203.0.113.10:3478\n"
        "0: : IPv4. Response origin: : 203.0.113.10:3478\n"
        "0: : IPv4. Other addr: : 203.0.113.11:3479\n"
        "0: : IPv4. UDP reflexive addr: 198.51.100.2:40000\n"
        "0: : IPv4. Local addr: : 192.0.2.10:40000\n"
        "========================================\nRFC 5780 response 2\n"
        "0: : IPv6. Response origin: : 2001:db8:203::11:3479\n"
        "0: : IPv6. UDP reflexive addr: ::1:59354\n"
        "NAT with Address and Port Dependent Mapping!\nNAT with Address Dependent Filtering!\n"
    )
    a, b = parse_coturn(rfc5780)
    assert a == Response(("203.0.113.10", 3478), ("203.0.113.11", 3479), ("198.51.100.2", 40000),
                         ("192.0.2.10", 40000))
    assert b == Response(("2001:db8:203::11", 3479), None, ("::1", 59354), None)
    assert natdiscovery_verdicts(rfc5780) == (APD, AD)
    plain = ("0: : IPv4. UDP reflexive addr: 127.0.0.1:56422\n"
             "0: : IPv4. UDP reflexive addr: 127.0.0.1:56422\n")
    assert [r.reflexive for r in parse_coturn(plain)] == [("127.0.0.1", 56422)] * 2
    assert natdiscovery_verdicts("nothing") == (None, None)


# --------------------------------------------------------------------------- running coturn clients


def _need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        reason = f"coturn's {program!r} not found (Debian package coturn)"
        if os.environ.get("CI") == "true" or os.environ.get("NATLAB_REQUIRED") == "1":
            pytest.fail(f"required in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    return path


def run_bounded(argv: Sequence[str], timeout: float) -> tuple[int | None, str]:
    """Run ``argv`` (stdout+stderr merged); None as status when killed at ``timeout``."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    return communicate_bounded(proc, timeout)


def whoami(port: int, server: str, *, lab: Lab | None = None, node: object = None) -> tuple[str, int]:
    """`nattool whoami --json -p PORT SERVER` (in ``node`` of ``lab``, or here)."""
    args = ("whoami", "--json", "-p", str(port), server)
    if lab is None:
        out = run_nattool(*args, timeout=60)
    else:
        out = lab.run(node, nattool_cmd(*args), env=nattool_env(), timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return split_endpoint(json.loads(out.stdout)["endpoint"])


def _free_udp6_port() -> int:
    """A UDP port free on ::1 a moment ago (conftest's free_udp_port is IPv4 only)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- (a) loopback


def test_stunclient_plain_server_loopback(tracker: TrackerFactory) -> None:
    """turnutils_stunclient (RFC 8489 mode) against a tracker without RFC 5780."""
    prog = _need("turnutils_stunclient")
    t = tracker()
    status, out = run_bounded([prog, "-p", str(t.port), "127.0.0.1"], timeout=CLIENT_TIMEOUT)
    assert status == 0, out
    answers = parse_coturn(out)
    assert answers, out
    refl = {a.reflexive for a in answers}
    assert len(refl) == 1, out  # one socket, one mapping
    ip, port = refl.pop()  # type: ignore[misc]
    assert ip == "127.0.0.1" and 1024 <= port <= 65535, out
    assert all(a.other is None for a in answers), "a server without --alt-* must not send OTHER-ADDRESS"


def test_stunclient_rfc5780_server_loopback(tracker: TrackerFactory) -> None:
    """turnutils_stunclient's RFC 5780 run: OTHER-ADDRESS, RESPONSE-ORIGIN and the change
    of address and port, all as coturn's client understands them."""
    prog = _need("turnutils_stunclient")
    alt_port = free_udp_port("127.0.0.2")
    t = tracker("--alt-host", "127.0.0.2", "--alt-port", str(alt_port))
    status, out = run_bounded([prog, "-p", str(t.port), "127.0.0.1"], timeout=CLIENT_TIMEOUT)
    assert status == 0, out
    answers = parse_coturn(out)
    assert len(answers) >= 2, out
    first, changed = answers[0], answers[1]
    assert first.origin == ("127.0.0.1", t.port), out
    assert first.other == ("127.0.0.2", alt_port), out
    # Its second request asks for change IP + change port: the answer must come from there.
    assert changed.origin == ("127.0.0.2", alt_port), out
    assert first.reflexive is not None and first.reflexive[0] == "127.0.0.1", out
    assert changed.reflexive == first.reflexive, out


def test_stunclient_ipv6_loopback(tracker: TrackerFactory) -> None:
    """XOR-MAPPED-ADDRESS of an IPv6 address (XORed with the transaction id too)."""
    prog = _need("turnutils_stunclient")
    t = tracker(host="::1", port=_free_udp6_port())
    status, out = run_bounded([prog, "-p", str(t.port), "::1"], timeout=CLIENT_TIMEOUT)
    assert status == 0, out
    answers = parse_coturn(out)
    assert answers and {a.reflexive[0] for a in answers if a.reflexive} == {"::1"}, out


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_natdiscovery_loopback_agrees_with_whoami(tracker: TrackerFactory, family: str) -> None:
    """turnutils_natdiscovery from a fixed local port sees exactly the endpoint `nattool
    whoami` reports from that port; with no NAT on loopback, that port itself."""
    prog = _need("turnutils_natdiscovery")
    host = "127.0.0.1" if family == "ipv4" else "::1"
    if family == "ipv4":
        alt_port = free_udp_port("127.0.0.2")
        t = tracker("--alt-host", "127.0.0.2", "--alt-port", str(alt_port))
    else:
        port, alt_port = _free_udp6_port(), _free_udp6_port()
        t = tracker("--alt-port", str(alt_port), host=host, port=port)
    local_port = _free_udp6_port() if family == "ipv6" else free_udp_port(host)
    seen = whoami(local_port, endpoint(host, t.port))
    assert seen == (host, local_port)
    status, out = run_bounded([prog, "-m", "-f", "-p", str(t.port), "-L", host, "-l", str(local_port), host],
                              timeout=CLIENT_TIMEOUT)
    assert status == 0, out
    answers = parse_coturn(out)
    assert answers and answers[0].reflexive == seen, out
    assert "No ALG: Mapped == XOR-Mapped" in out, out
    mapping, filtering = natdiscovery_verdicts(out)
    assert mapping == EI, out
    if family == "ipv4":
        assert filtering == EI, out


# --------------------------------------------------------------------------- (a) behind lab NATs

CLIENT_NATS = [NatBehaviour.NO_NAT, NatBehaviour.EIM_EIF, NatBehaviour.EIM_ADF, NatBehaviour.EIM_APDF,
               NatBehaviour.APDM, NatBehaviour.IPV6_FIREWALL]


@dataclass(frozen=True)
class ClientsRun:
    """What coturn's clients saw from behind one NAT of the shared lab."""

    primary: str
    alternate: str
    public_ip: str
    seen: tuple[str, int]  # `nattool whoami` from the port natdiscovery then used
    natdiscovery: str  # its output
    stunclient_status: int | None
    stunclient: str  # its output


def run_coturn_clients(lab: Lab, topo: ProbeTopology, behaviour: NatBehaviour, _: None) -> ClientsRun:
    """whoami, then turnutils_natdiscovery from the same port, then turnutils_stunclient,
    from the client behind ``topo``'s NAT."""
    nd = shutil.which("turnutils_natdiscovery")
    assert nd is not None
    if behaviour is NatBehaviour.IPV6_FIREWALL:  # IPv6 through a stateful firewall, no NAT
        assert topo.client.ip6 is not None
        primary, alternate, local_ip, public_ip = topo.primary6, topo.alternate6, topo.client.ip6, topo.client.ip6
    else:
        primary, alternate, local_ip = topo.primary, topo.alternate, topo.client.ip
        public_ip = topo.client.ip if behaviour is NatBehaviour.NO_NAT else topo.nat.wan_ip
    # natdiscovery from the port whoami used: the same 5-tuple, so the same mapping on any NAT.
    local_port = 40000
    seen = whoami(local_port, endpoint(primary, STUN_PORT), lab=lab, node=topo.client)
    proc = lab.popen(topo.client, [nd, "-m", "-f", "-p", str(STUN_PORT), "-L", local_ip,
                                   "-l", str(local_port), primary],
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True, errors="replace")
    status, natdiscovery = communicate_bounded(proc, CLIENT_TIMEOUT)
    if status is None:
        pytest.fail(f"turnutils_natdiscovery did not finish within {CLIENT_TIMEOUT}s:\n{natdiscovery}")
    # turnutils_stunclient: behind a NAT its RFC 5780 run never ends; its first answer counts,
    # so it is stopped once that answer is complete. Without a NAT it must finish by itself.
    until = None if behaviour is NatBehaviour.NO_NAT else first_answer_complete
    status, out = run_stunclient(lab, topo.client, primary, STUN_PORT, timeout=3.0, until=until)
    return ClientsRun(primary, alternate, public_ip, seen, natdiscovery, status, out)


def start_nattool_servers(lab: Lab, server: ServerHost) -> None:
    """`nattool serve` in RFC 5780 mode on the server host's IPv4 and IPv6 addresses."""
    for primary, alternate in ((SERVER_V4[0], SERVER_V4[1]), (SERVER_V6[0], SERVER_V6[1])):
        start_serve(lab, server, primary, alt_host=alternate, alt_port=STUN_ALT_PORT, port=STUN_PORT)


@pytest.fixture(scope="module")
def coturn_clients_runs(natlab_available: None) -> Iterator[SharedLab[ClientsRun]]:
    """Every CLIENT_NATS case in one lab, all at once: natdiscovery's silent waits (3 s for
    each answer a filter drops) overlap."""
    _need("turnutils_natdiscovery")
    _need("turnutils_stunclient")
    with cases_in_one_lab(CLIENT_NATS, start_nattool_servers, run_coturn_clients, len(CLIENT_NATS)) as shared:
        yield shared


@pytest.mark.natlab
@pytest.mark.xdist_group("stun_interop_clients")  # one lane: the fixture runs every case
@pytest.mark.parametrize("behaviour", CLIENT_NATS, ids=[b.value for b in CLIENT_NATS])
def test_coturn_clients_behind_nat(coturn_clients_runs: SharedLab[ClientsRun], behaviour: NatBehaviour) -> None:
    check_case(coturn_clients_runs, behaviour, check_coturn_clients)


def check_coturn_clients(run: ClientsRun, behaviour: NatBehaviour) -> None:
    primary, alternate, public_ip, seen = run.primary, run.alternate, run.public_ip, run.seen
    assert seen[0] == public_ip
    if behaviour is not NatBehaviour.APDM:
        assert seen[1] == 40000  # masquerade keeps a free port
    out = run.natdiscovery
    answers = parse_coturn(out)
    assert answers, out
    first = answers[0]
    assert first.reflexive == seen, out
    assert first.origin == (primary, STUN_PORT), out
    assert first.other == (alternate, STUN_ALT_PORT), out
    assert all(a.reflexive is None or a.reflexive[0] == public_ip for a in answers), out
    assert "ALG detected" not in out and "No ALG" in out, out
    assert natdiscovery_verdicts(out) == (behaviour.mapping, behaviour.filtering), out

    status, out = run.stunclient_status, run.stunclient
    answers = parse_coturn(out)
    assert answers, f"no answer (status {status}):\n{out}"
    assert answers[0].origin == (primary, STUN_PORT), out
    assert answers[0].other == (alternate, STUN_ALT_PORT), out
    assert answers[0].reflexive is not None and answers[0].reflexive[0] == public_ip, out
    if behaviour is NatBehaviour.NO_NAT:
        assert status == 0, out


# --------------------------------------------------------------------------- (b) probe vs coturn

PROBE_NATS = [NatBehaviour.NO_NAT, NatBehaviour.EIM_EIF, NatBehaviour.EIM_ADF, NatBehaviour.EIM_APDF,
              NatBehaviour.APDM, NatBehaviour.IPV6_FIREWALL]
COTURN_RUNS = 3
# Cases probed at once: 9 probes together, fewer than the probe lab's hand-run repetition
# starts together (NATLAB_PROBE_RUNS=10).
PROBE_WORKERS = 3


@dataclass(frozen=True)
class ProbesRun:
    """COTURN_RUNS probes against coturn from behind one NAT of the shared lab."""

    topo: ProbeTopology
    turnserver: TurnServer
    other: str  # the OTHER-ADDRESS the probe must report
    runs: list[ProbeRun]


def start_turnservers(lab: Lab, server: ServerHost) -> dict[int, TurnServer]:
    """coturn on the server host, by IP family: two listening IPs each (RFC 5780)."""
    return {family: start_turnserver(lab, server, ips, port=STUN_PORT)
            for family, ips in ((4, SERVER_V4[:2]), (6, SERVER_V6[:2]))}


def probe_coturn(lab: Lab, topo: ProbeTopology, behaviour: NatBehaviour,
                 turnservers: dict[int, TurnServer]) -> ProbesRun:
    family = 6 if behaviour is NatBehaviour.IPV6_FIREWALL else 4
    ts = turnservers[family]
    runs = run_probes(lab, topo.client, f"stun:{endpoint(*ts.endpoint)}", flags=(f"-{family}",), count=COTURN_RUNS)
    return ProbesRun(topo, ts, endpoint(ts.ips[1], ts.alt_port), runs)


@pytest.fixture(scope="module")
def coturn_probe_runs(turnserver_available: None) -> Iterator[SharedLab[ProbesRun]]:
    """Every PROBE_NATS case in one lab, PROBE_WORKERS at a time."""
    with cases_in_one_lab(PROBE_NATS, start_turnservers, probe_coturn, PROBE_WORKERS) as shared:
        yield shared


@pytest.mark.natlab
@pytest.mark.xdist_group("stun_interop_probes")  # one lane: the fixture runs every case
@pytest.mark.parametrize("behaviour", PROBE_NATS, ids=[b.value for b in PROBE_NATS])
def test_probe_against_coturn(coturn_probe_runs: SharedLab[ProbesRun], behaviour: NatBehaviour) -> None:
    check_case(coturn_probe_runs, behaviour, check_probes)


def check_probes(result: ProbesRun, behaviour: NatBehaviour) -> None:
    want = expected_for(behaviour, result.topo)
    failures = []
    for n, run in enumerate(result.runs):
        bad = mismatches(run, want)
        s = run.report["servers"][0]
        if s["kind"] != "stun" or s["other_address"] != result.other:
            bad.append(f"server entry {s['kind']} other={s['other_address']}")
        if bad:
            failures.append(f"run {n + 1}: {', '.join(bad)}; filtering_reason="
                            f"{run.report.get('filtering_reason')!r}\n  {json.dumps(s)[:3000]}")
    assert not failures, "\n".join(failures) + "\ncoturn log:\n" + "\n".join(result.turnserver.log[-20:])


@pytest.mark.usefixtures("turnserver_available")
def test_probe_against_single_address_coturn_gives_no_filtering_verdict(natlab: Lab) -> None:
    """coturn with one listening IP is a plain RFC 8489 server. Behind an address-dependent
    filter, whatever it does with CHANGE-REQUEST, the probe must not report a filtering
    behaviour it could not measure (change-IP is impossible with one address)."""
    topo = probe_topology(natlab, NatBehaviour.EIM_ADF)
    ts = start_turnserver(natlab, topo.server, [topo.primary], port=STUN_PORT)
    for _ in range(2):
        run = run_probe(natlab, topo.client, f"stun:{endpoint(topo.primary, STUN_PORT)}", flags=("-4",))
        r = run.report
        assert r["udp"] == "ok"
        assert split_endpoint(r["public_endpoint"])[0] == topo.nat.wan_ip
        assert r["filtering"] is None, (r["filtering_reason"], json.dumps(r["servers"])[:3000],
                                        "\n".join(ts.log[-20:]))
        assert r["filtering_reason"]
        assert r["nat_type"] == "unknown"
        (server,) = r["servers"]
        assert server["answered"] and server["rfc5780"] is False, server
        assert "OTHER-ADDRESS" in server["rfc5780_reason"], server
