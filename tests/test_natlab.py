"""Self-tests of the NAT lab: every router behaviour behaves as named, measured with plain
Python UDP programs (tests/natlab/udp.py) and coturn, no nattool code.

Fixtures come from tests/natlab/fixtures.py (imported below, and/or registered as a plugin
by tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.natlab import (
    Datagram,
    Ipv6Mode,
    Lab,
    LabError,
    NatBehaviour,
    UdpSocket,
    sweep_stale_namespaces,
    udp_agent,
)
from tests.natlab.fixtures import (  # noqa: F401 - fixtures, until conftest registers the plugin
    natlab,
    natlab_available,
    turnserver_available,
)
from tests.natlab.lab import NETNS_DIR
from tests.natlab.stun import run_stunclient, start_turnserver, stun_binding
from tests.natlab.topologies import (
    SERVER_V4,
    SERVER_V6,
    pair_topology,
    probe_topology,
    same_nat_topology,
)

pytestmark = [pytest.mark.natlab, pytest.mark.usefixtures("natlab_available")]

# How long to wait for a datagram that must NOT arrive. Everything here is on one machine
# (sub-millisecond RTT), so 0.3 s is ample for the ones that must arrive.
SILENCE = 0.3

EI, AD, APD = "endpoint-independent", "address-dependent", "address-and-port-dependent"


def _namespaces() -> set[str]:
    try:
        return set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return set()


def _wait_for(sock: UdpSocket, data: bytes, timeout: float) -> Datagram | None:
    """The first datagram carrying ``data`` within ``timeout`` (others are dropped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        d = sock.recv(left)
        if d is None:
            return None
        if d.data == data:
            return d
    return None


class World:
    """A probe topology with reflectors on the server and one client socket."""

    def __init__(self, lab: Lab, behaviour: NatBehaviour, *, v6: bool = False,
                 ipv6: Ipv6Mode | None = None, udp_timeout: int | None = None) -> None:
        self.topo = probe_topology(lab, behaviour, ipv6=ipv6, udp_timeout=udp_timeout)
        addrs = SERVER_V6 if v6 else SERVER_V4
        self.primary = (addrs[0], 3478)
        self.primary_alt_port = (addrs[0], 3479)
        self.alternate = (addrs[1], 3478)
        self.primary_other_port = (addrs[0], 4000)
        self.other = (addrs[2], 3478)
        server = udp_agent(lab, self.topo.server)
        self.srv = {ep: server.bind(ep[0], ep[1], reflect=True) for ep in (
            self.primary, self.primary_alt_port, self.alternate, self.primary_other_port,
            self.other)}
        client = udp_agent(lab, self.topo.client)
        host = self.topo.client
        local = (host.ip6 or "::") if v6 else host.ip
        self.sock: UdpSocket = client.bind(local, 0)
        self.client_agent = client

    def mapping(self) -> tuple[str | None, tuple[str, int] | None]:
        """(RFC 4787 mapping behaviour or None if UDP is blocked, first mapped address)."""
        m1 = self.sock.ask(self.primary)
        m2 = self.sock.ask(self.alternate)
        m3 = self.sock.ask(self.primary_alt_port)
        if m1 is None or m2 is None or m3 is None:
            assert m1 is m2 is m3 is None, "UDP half-blocked?"
            return None, None
        if m1 == m2 == m3:
            return EI, m1
        if m1 == m3:
            return AD, m1
        return APD, m1

    def unsolicited(self, mapped: tuple[str, int]) -> set[str]:
        """Send from a third IP and from the primary IP's other port to ``mapped``; which
        arrived? (The client has talked to primary:3478/3479 and alternate:3478 only.)"""
        self.srv[self.other].send(mapped, "from-other-ip")
        self.srv[self.primary_other_port].send(mapped, "from-other-port")
        # A marker from the endpoint the client talked to always passes: once it is in,
        # whatever else was let through is in too (give reordering SILENCE more), so a
        # loaded machine cannot turn "arrived late" into "filtered".
        self.srv[self.primary].send(mapped, "marker")
        got = [d.data.decode() for d in self.sock.recv_all(SILENCE)]
        if "marker" not in got:
            marker = _wait_for(self.sock, b"marker", 5.0)
            assert marker is not None, "the marker from the exact server endpoint was lost"
            got += [d.data.decode() for d in self.sock.recv_all(SILENCE)]
        return set(got) - {"marker"}


# --- mapping and filtering of every IPv4 behaviour ------------------------------------

CASES = [
    (NatBehaviour.NO_NAT, EI, EI),
    (NatBehaviour.EIM_EIF, EI, EI),
    (NatBehaviour.EIM_ADF, EI, AD),
    (NatBehaviour.EIM_APDF, EI, APD),
    (NatBehaviour.APDM, APD, APD),
]


@pytest.mark.parametrize(("behaviour", "mapping", "filtering"), CASES,
                         ids=[c[0].value for c in CASES])
def test_behaviour_is_what_its_name_says(natlab: Lab, behaviour: NatBehaviour,
                                         mapping: str, filtering: str) -> None:
    w = World(natlab, behaviour)
    assert behaviour.mapping == mapping and behaviour.filtering == filtering
    observed, m1 = w.mapping()
    assert observed == mapping
    assert m1 is not None
    if behaviour is NatBehaviour.NO_NAT:
        assert m1 == (w.topo.client.ip, w.sock.port)  # no translation at all
    else:
        assert m1[0] == w.topo.nat.wan_ip
    if mapping == EI and behaviour is not NatBehaviour.NO_NAT:
        assert m1[1] == w.sock.port, "masquerade should preserve a free port"

    arrived = w.unsolicited(m1)
    expected = {EI: {"from-other-ip", "from-other-port"}, AD: {"from-other-port"},
                APD: set()}[filtering]
    assert arrived == expected
    # The exact server endpoint always gets through (it is a reply to our mapping).
    w.srv[w.primary].send(m1, "from-primary")
    got = w.sock.recv(2.0)
    assert got is not None and got.data == b"from-primary" and got.src == w.primary


def test_udp_blocked_blocks_udp_both_ways_but_not_tcp(natlab: Lab) -> None:
    w = World(natlab, NatBehaviour.UDP_BLOCKED)
    assert w.sock.ask(w.primary, timeout=0.2, tries=2) is None
    w.srv[w.other].send((w.topo.nat.wan_ip, w.sock.port), "in")
    w.srv[w.other].send((w.topo.client.ip, w.sock.port), "in-direct")
    assert w.sock.recv(SILENCE) is None
    # TCP still works (and is NATed): the router is not simply broken.
    server = natlab.popen(w.topo.server, [sys.executable, "-c", (
        "import socket,sys;s=socket.create_server(('203.0.113.10',8080));"
        "print('ready',flush=True);c,a=s.accept();c.sendall(a[0].encode());c.close()")],
        stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    out = natlab.run(w.topo.client, [sys.executable, "-c", (
        "import socket;c=socket.create_connection(('203.0.113.10',8080),timeout=3);"
        "print(c.recv(100).decode())")], timeout=10).stdout.strip()
    assert out == w.topo.nat.wan_ip


def test_eim_with_adf_is_per_mapping_not_per_remote_ip(natlab: Lab) -> None:
    """Socket A talking to the server must not open socket B's mapping to that server."""
    w = World(natlab, NatBehaviour.EIM_ADF)
    ma = w.sock.ask(w.primary)
    b = w.client_agent.bind(w.topo.client.ip, 0)
    mb = b.ask(w.alternate)  # B has a mapping, but never talked to the primary IP
    assert ma is not None and mb is not None and ma[1] != mb[1]
    w.srv[w.primary_other_port].send(mb, "to-b")
    assert b.recv(SILENCE) is None
    w.srv[w.primary_other_port].send(ma, "to-a")
    got = w.sock.recv(2.0)
    assert got is not None and got.data == b"to-a"


@pytest.mark.parametrize("behaviour", [NatBehaviour.EIM_EIF, NatBehaviour.EIM_ADF,
                                       NatBehaviour.EIM_APDF])
def test_unsolicited_packet_to_wan_does_not_break_eim(natlab: Lab,
                                                      behaviour: NatBehaviour) -> None:
    """The pitfall: an early packet from a peer must not make masquerade remap the port.

    Then the control: without the router's input rule the same sequence does remap, which
    shows this test can fail (on the EIM_APDF router, where nothing else catches the packet).
    """
    w = World(natlab, behaviour)
    m1 = w.sock.ask(w.primary)
    assert m1 is not None
    w.srv[w.other].send(m1, "early-punch")  # before the client ever sent to `other`
    w.sock.recv_all(SILENCE)  # EIF lets it in; drop it
    assert w.sock.ask(w.other) == m1

    if behaviour is NatBehaviour.EIM_APDF:
        natlab.run(w.topo.nat, ["nft", "flush", "chain", "inet", "natlab", "input"])
        s2 = w.client_agent.bind(w.topo.client.ip, 0)
        m2 = s2.ask(w.primary)
        assert m2 is not None
        w.srv[w.other].send(m2, "early-punch")
        time.sleep(0.1)
        m3 = s2.ask(w.other)
        assert m3 is not None and m3 != m2, "control: the input rule was not what mattered"


def test_udp_timeout_expires_mappings(natlab: Lab) -> None:
    w = World(natlab, NatBehaviour.EIM_EIF, udp_timeout=1)
    m1 = w.sock.ask(w.primary)
    assert m1 is not None
    assert w.unsolicited(m1) == {"from-other-ip", "from-other-port"}
    time.sleep(1.6)  # idle longer than the timeout (the kernel's GC runs often enough)
    for ep in (w.other, w.primary_other_port, w.primary):  # the mapping itself has expired
        w.srv[ep].send(m1, "late")
    assert w.sock.recv_all(SILENCE) == []


# --- IPv6 ---------------------------------------------------------------------------


@pytest.mark.parametrize(("behaviour", "ipv6"), [
    (NatBehaviour.IPV6_FIREWALL, None),
    (NatBehaviour.EIM_APDF, Ipv6Mode.FIREWALL),
], ids=["ipv6-only", "dual-stack"])
def test_ipv6_firewall_no_translation_apd_filtering(natlab: Lab, behaviour: NatBehaviour,
                                                    ipv6: Ipv6Mode | None) -> None:
    w = World(natlab, behaviour, v6=True, ipv6=ipv6)
    client = w.topo.client
    assert client.ip6 is not None and w.topo.nat.ipv6 is Ipv6Mode.FIREWALL
    observed, m1 = w.mapping()
    assert observed == EI
    assert m1 == (client.ip6, w.sock.port)  # the host's own address: no NAT
    assert w.unsolicited(m1) == set()  # APD filtering
    w.srv[w.primary].send(m1, "reply")
    got = w.sock.recv(2.0)
    assert got is not None and got.src == w.primary
    # Unsolicited inbound to a port the host never used: blocked as well.
    listener = w.client_agent.bind(client.ip6, 9)
    w.srv[w.other].send((client.ip6, 9), "probe")
    assert listener.recv(SILENCE) is None

    udp_agent(natlab, w.topo.server).bind(SERVER_V4[0], 3478, reflect=True)
    v4 = w.client_agent.bind(client.ip, 0)
    if behaviour is NatBehaviour.IPV6_FIREWALL:
        assert v4.ask((SERVER_V4[0], 3478), timeout=0.2, tries=2) is None  # IPv6-only
    else:
        assert v4.ask((SERVER_V4[0], 3478)) == (w.topo.nat.wan_ip, v4.port)


def test_no_ipv6_by_default_behind_ipv4_nat(natlab: Lab) -> None:
    topo = probe_topology(natlab, NatBehaviour.EIM_EIF)
    assert topo.client.ip6 is None
    agent = udp_agent(natlab, topo.client)
    s = agent.bind("::", 0)
    with pytest.raises(LabError, match="unreachable"):
        s.send((SERVER_V6[0], 3478))


# --- several hosts, two NATs ---------------------------------------------------------


def test_hosts_behind_the_same_nat_talk_over_the_lan(natlab: Lab) -> None:
    topo = same_nat_topology(natlab)
    a = udp_agent(natlab, topo.a).bind(topo.a.ip, 0)
    b = udp_agent(natlab, topo.b).bind(topo.b.ip, 0)
    a.send((topo.b.ip, b.port), "hi-b")
    got = b.recv(2.0)
    assert got is not None and got.data == b"hi-b" and got.src == (topo.a.ip, a.port)
    # Both are behind the same public address towards the internet.
    udp_agent(natlab, topo.tracker).bind(SERVER_V4[0], 3478, reflect=True)
    ma, mb = a.ask((SERVER_V4[0], 3478)), b.ask((SERVER_V4[0], 3478))
    assert ma is not None and mb is not None
    assert ma[0] == mb[0] == topo.nat.wan_ip and ma[1] != mb[1]


@pytest.mark.parametrize("hairpin", [True, False], ids=["hairpin", "no-hairpin"])
def test_hairpinning_is_opt_in(natlab: Lab, hairpin: bool) -> None:
    topo = same_nat_topology(natlab, NatBehaviour.EIM_APDF, hairpin=hairpin)
    udp_agent(natlab, topo.tracker).bind(SERVER_V4[0], 3478, reflect=True)
    a = udp_agent(natlab, topo.a).bind(topo.a.ip, 0)
    b = udp_agent(natlab, topo.b).bind(topo.b.ip, 0)
    ma, mb = a.ask((SERVER_V4[0], 3478)), b.ask((SERVER_V4[0], 3478))
    assert ma is not None and mb is not None
    a.send(ma, "to-myself")
    a.send(mb, "to-b")
    got_a = _wait_for(a, b"to-myself", 2.0 if hairpin else SILENCE)
    got_b = _wait_for(b, b"to-b", 2.0 if hairpin else SILENCE)
    if hairpin:
        # Both arrive, and from a's *mapped* address, as RFC 4787 REQ-9 wants.
        assert got_a is not None and got_a.src == ma
        assert got_b is not None and got_b.src == ma
    else:
        assert got_a is None and got_b is None


def _punch(lab: Lab, left_b: NatBehaviour, right_b: NatBehaviour) -> tuple[bool, bool]:
    topo = pair_topology(lab, left_b, right_b)
    udp_agent(lab, topo.tracker).bind(SERVER_V4[0], 3478, reflect=True)
    left = udp_agent(lab, topo.left).bind(topo.left.ip, 0)
    right = udp_agent(lab, topo.right).bind(topo.right.ip, 0)
    ml, mr = left.ask((SERVER_V4[0], 3478)), right.ask((SERVER_V4[0], 3478))
    assert ml is not None and mr is not None
    # Simultaneous open: each side sends to the other's mapped address; whatever arrives
    # is answered at its source (a symmetric NAT's packets come from a fresh port).
    for _ in range(3):
        left.send(mr, "from-left")
        right.send(ml, "from-right")
        time.sleep(0.05)
    got_right = _wait_for(right, b"from-left", 1.0)
    got_left = _wait_for(left, b"from-right", 0.2)
    if got_right is not None:
        right.send(got_right.src, "from-right")
    if got_left is not None:
        left.send(got_left.src, "from-left")
    got_left = got_left or _wait_for(left, b"from-right", 1.0)
    got_right = got_right or _wait_for(right, b"from-left", 1.0)
    return got_left is not None, got_right is not None


@pytest.mark.parametrize(("left", "right", "works"), [
    (NatBehaviour.EIM_APDF, NatBehaviour.EIM_APDF, True),
    (NatBehaviour.APDM, NatBehaviour.EIM_EIF, True),
    (NatBehaviour.APDM, NatBehaviour.APDM, False),
], ids=["apdf-apdf", "apdm-eif", "apdm-apdm"])
def test_hole_punching_between_two_nats(natlab: Lab, left: NatBehaviour,
                                        right: NatBehaviour, works: bool) -> None:
    assert _punch(natlab, left, right) == (works, works)


# --- coturn --------------------------------------------------------------------------


@pytest.mark.usefixtures("turnserver_available")
def test_coturn_rfc5780_server_answers_through_the_nat(natlab: Lab) -> None:
    topo = probe_topology(natlab, NatBehaviour.EIM_EIF)
    ts = start_turnserver(natlab, topo.server, [topo.primary, topo.alternate], port=3478)
    r = stun_binding(natlab, topo.client, ts.endpoint, local=(topo.client.ip, 0))
    assert r is not None and r.is_success
    assert r.xor_mapped == r.mapped == (topo.nat.wan_ip, r.local[1])
    assert r.other == (topo.alternate, 3479)  # RFC 5780 mode needs both listening-ips
    assert r.origin == (topo.primary, 3478) and r.src == (topo.primary, 3478)
    # CHANGE-REQUEST (change IP and port): the reply comes from the other address, and a
    # full-cone NAT lets it in.
    r2 = stun_binding(natlab, topo.client, ts.endpoint, change=0x6, timeout=1.0)
    assert r2 is not None and r2.src == (topo.alternate, 3479)


@pytest.mark.usefixtures("turnserver_available")
def test_stunclient_behind_nat_needs_a_timeout(natlab: Lab) -> None:
    topo = probe_topology(natlab, NatBehaviour.EIM_APDF)
    start_turnserver(natlab, topo.server, [topo.primary, topo.alternate])
    status, out = run_stunclient(natlab, topo.client, topo.primary, timeout=1.5)
    assert status is None  # still waiting for the answer the NAT filters out
    assert f"UDP reflexive addr: {topo.nat.wan_ip}:" in out
    # Behind an APD-filtering NAT a change-request reply never arrives: same with our client.
    assert stun_binding(natlab, topo.client, (topo.primary, 3478), change=0x6,
                        timeout=0.5) is None


# --- lifecycle ------------------------------------------------------------------------


def test_close_kills_processes_and_deletes_namespaces() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Lab() as lab:
            topo = pair_topology(lab, NatBehaviour.EIM_EIF, NatBehaviour.APDM)
            sleeper = lab.popen(topo.left, ["sleep", "300"])
            child = lab.spawn(topo.right, ["sleep", "300"])
            created = {n.ns for n in lab.nodes.values()}
            assert created <= _namespaces()
            raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert not child.isalive()
    assert not (created & _namespaces())
    # Nothing of this lab's, nodes or not (other labs, of this process or another lane,
    # come and go meanwhile).
    assert [ns for ns in _namespaces() if ns.startswith(f"natlab-{os.getpid()}-{lab.id}-")] == []


def test_sweep_removes_namespaces_of_dead_runs_only() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"natlab-{dead.pid}-1-x"
    mine = f"natlab-{os.getpid()}-999-x"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    subprocess.run(["ip", "netns", "add", mine], check=True)
    try:
        removed = sweep_stale_namespaces()
        assert stale in removed and mine not in removed
        assert stale not in _namespaces() and mine in _namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", mine], check=False)
        subprocess.run(["ip", "netns", "del", stale], check=False, capture_output=True)


def test_two_labs_with_the_same_names_do_not_collide(natlab: Lab) -> None:
    with Lab() as other:
        for lab in (natlab, other):
            probe_topology(lab, NatBehaviour.EIM_APDF)
        assert natlab.node("client").ns != other.node("client").ns
        out = other.run("client", ["ip", "-br", "address", "show", "eth0"]).stdout
        assert "192.0.2.10/27" in out


def test_setup_is_fast_and_spawn_works(natlab: Lab) -> None:
    t0 = time.monotonic()
    topo = pair_topology(natlab, NatBehaviour.EIM_EIF, NatBehaviour.APDM, ipv6=Ipv6Mode.FIREWALL)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"pair topology took {elapsed:.2f}s"
    child = natlab.spawn(topo.left, [sys.executable, "-c",
                                     "import socket;print('up');print(input().upper())"])
    child.expect("up")
    child.sendline("hello")
    child.expect("HELLO")
    # `ip netns exec` execs the program: the pid is the program's, so signals reach it.
    proc = natlab.popen(topo.right, ["sleep", "30"])
    deadline = time.monotonic() + 5
    while not os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep"):
        assert time.monotonic() < deadline, "ip netns exec did not exec the program"
        time.sleep(0.01)
    proc.terminate()
    assert proc.wait(5) == -15


def test_service_output_is_drained_and_readiness_awaited(natlab: Lab) -> None:
    host = natlab.add_server_host("srv")
    # 1 MB of output after the ready line: a program writing to an undrained pipe would
    # block at 64 kB and never print "done".
    svc = natlab.start_service(host, [sys.executable, "-u", "-c", (
        "import time;print('warming');print('ready now');"
        "[print('x'*99) for _ in range(10000)];print('done');time.sleep(60)")],
        ready="ready now", timeout=10)
    deadline = time.monotonic() + 10
    while "done" not in svc.lines:
        assert time.monotonic() < deadline, "service output not drained"
        time.sleep(0.02)
    assert svc.lines[:2] == ["warming", "ready now"]
    assert svc.stop() == -15
    with pytest.raises(LabError, match="never-printed"):
        natlab.start_service(host, [sys.executable, "-c", "print('bye')"],
                             ready="never-printed", timeout=5)


def test_bad_names_and_addresses_are_refused(natlab: Lab) -> None:
    with pytest.raises(ValueError):
        natlab.add_server_host("Bad Name")
    with pytest.raises(ValueError):
        natlab.add_server_host("s1", addrs=["192.0.2.5"])  # LAN range, not a server address
    natlab.add_server_host("s2", addrs=["203.0.113.20"])
    with pytest.raises(ValueError):
        natlab.add_server_host("s3", addrs=["203.0.113.20"])
    with pytest.raises(ValueError):
        natlab.add_server_host("s2")
