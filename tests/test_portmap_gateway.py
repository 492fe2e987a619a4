"""The NAT lab's port-mapping gateway against clients nobody here wrote.

Debian's ``natpmpc`` (libnatpmp) and miniupnpc's ``upnpc`` run in the client namespace;
PCP, which has no Debian client, is driven with hand-made requests from nattool's codec.
Every test checks the real effect: the gateway's nftables rules appear and go, a packet from
the internet to wan:E reaches the client, and the client's traffic from the mapped port
leaves as wan:E to every destination, even behind ``masquerade random``.

``upnpc -i``: miniupnpc 2.2.4 calls an IGD whose external address is reserved "not
connected?" and stops without ``-i``; the lab's WAN is in 198.51.100.0/24 on purpose.
Each upnpc run spends 2 s in SSDP discovery.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess

import pytest

from nattool.protocol import natpmp, pcp, upnp_igd
from tests.natlab import Lab, NatBehaviour, UdpSocket, udp_agent
from tests.natlab.fixtures import (  # noqa: F401 - fixtures, imported like tests/test_natlab.py
    natlab,
    natlab_available,
)
from tests.natlab.lab import Host
from tests.natlab.portmap_lab import PortmapGateway
from tests.natlab.topologies import (
    SERVER_V4,
    PortmapTopology,
    double_nat_topology,
    portmap_pair_topology,
    portmap_topology,
)

pytestmark = [pytest.mark.natlab, pytest.mark.usefixtures("natlab_available")]

REFLECTOR_PORTS = (7000, 7001)
NONCE = bytes(range(12))


def run(lab: Lab, node: Host, argv: list[str], timeout: float = 30
        ) -> subprocess.CompletedProcess[str]:
    return lab.run(node, argv, check=False, timeout=timeout)


class Internet:
    """Two "what is my address" servers (different addresses and ports) and a sender on
    a third address, all on the server host."""

    def __init__(self, topo: PortmapTopology) -> None:
        agent = udp_agent(topo.server.lab, topo.server)
        self.reflectors = []
        for ip, port in zip(SERVER_V4, REFLECTOR_PORTS):
            agent.bind(ip, port, reflect=True)
            self.reflectors.append((ip, port))
        self.sender = agent.bind(SERVER_V4[2], 7002)
        self.wan_ip = topo.nat.wan_ip

    def seen_as(self, sock: UdpSocket) -> list[tuple[str, int] | None]:
        return [sock.ask(r) for r in self.reflectors]

    def assert_reachable(self, external: int, sock: UdpSocket, want: bool) -> None:
        """A packet to wan:external reaches ``sock`` (want) or nothing arrives."""
        self.sender.send((self.wan_ip, external), b"inbound")
        got = sock.recv(1.5 if want else 0.7)
        if want:
            assert got is not None and got.data == b"inbound", "no packet through the mapping"
            assert got.src == self.sender.addr
        else:
            assert got is None, f"reached the client without a mapping: {got}"


def gateway_lab(lab: Lab, behaviour: NatBehaviour, *protocols: str
                ) -> tuple[PortmapTopology, PortmapGateway, Host]:
    topo = portmap_topology(lab, behaviour, protocols=protocols)
    assert topo.gateway is not None
    return topo, topo.gateway, topo.client


def natpmpc(topo: PortmapTopology, host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    """Debian's natpmpc against the topology's gateway (no args: the external address)."""
    return run(topo.server.lab, host, ["natpmpc", "-g", topo.nat.gateway, *args])


def natpmpc_map(topo: PortmapTopology, host: Host, external: int, internal: int,
                lifetime: int, proto: str = "udp") -> str:
    """``natpmpc -a``; asserts it exits 0 and returns its output."""
    out = natpmpc(topo, host, "-a", str(external), str(internal), proto, str(lifetime))
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def assert_mapped(gw: PortmapGateway, client_ip: str, internal: int, external: int) -> None:
    rules = gw.nft_rules()
    assert any(f"dport {external} dnat ip to {client_ip}:{internal}" in r for r in rules), rules
    assert any(f"ip saddr {client_ip} udp sport {internal} snat ip to {gw.wan_ip}:{external}"
               in r for r in rules), rules
    assert [(m.internal, m.external) for m in gw.mappings()] == [
        ((client_ip, internal), (gw.wan_ip, external))]


def assert_unmapped(gw: PortmapGateway) -> None:
    assert gw.nft_rules() == []
    assert gw.mappings() == []


def assert_gone(gw: PortmapGateway, net: Internet, sock: UdpSocket, external: int,
                reason: str) -> None:
    """The mapping of ``sock`` went for ``reason``: no rules, no state, no way in."""
    delete = gw.wait_for("delete", timeout=15, internal=sock.addr)
    assert delete.reason == reason
    assert_unmapped(gw)
    net.assert_reachable(external, sock, want=False)


# ------------------------------------------------------------------------------ NAT-PMP


def test_natpmpc_maps_forwards_and_deletes(natlab: Lab) -> None:
    topo, gw, client = gateway_lab(natlab, NatBehaviour.APDM, "natpmp")
    net = Internet(topo)
    sock = udp_agent(natlab, client).bind(client.ip, 5000)
    # Before the mapping, masquerade random gives a fresh port per destination; these
    # flows' conntrack entries must not survive the mapping.
    before = net.seen_as(sock)
    assert before[0] != before[1]

    out = natpmpc(topo, client)
    assert f"Public IP address : {topo.nat.wan_ip}" in out.stdout, out.stdout + out.stderr
    text = natpmpc_map(topo, client, 4000, 5000, 60)
    # (sic: natpmpc prints "liftime")
    assert re.search(r"Mapped public port 4000 protocol UDP to local port 5000 li[f]+e?time 60",
                     text), text
    grant = gw.wait_for("grant", via="natpmp", internal=(client.ip, 5000))
    assert grant.external == (topo.nat.wan_ip, 4000) and grant.lifetime == 60
    assert_mapped(gw, client.ip, 5000, 4000)

    # Outbound from the mapped port uses the mapping for every destination.
    assert net.seen_as(sock) == [(topo.nat.wan_ip, 4000)] * 2
    net.assert_reachable(4000, sock, want=True)

    natpmpc_map(topo, client, 4000, 5000, 0)
    assert_gone(gw, net, sock, 4000, "request")


def test_natpmp_mapping_expires(natlab: Lab) -> None:
    topo, gw, client = gateway_lab(natlab, NatBehaviour.EIM_APDF, "natpmp")
    assert "Mapped public port 4100" in natpmpc_map(topo, client, 4100, 5100, 2)
    gw.wait_for("grant", internal=(client.ip, 5100))
    sock = udp_agent(natlab, client).bind(client.ip, 5100)
    net = Internet(topo)
    net.assert_reachable(4100, sock, want=True)
    assert_gone(gw, net, sock, 4100, "expired")


def test_taken_port_gets_another_and_renewal_keeps_it(natlab: Lab) -> None:
    topo, gw, client = gateway_lab(natlab, NatBehaviour.APDM, "natpmp")
    other = natlab.add_host("other", behind=topo.nat)
    for host, internal in ((client, 5200), (other, 5201)):
        natpmpc_map(topo, host, 4200, internal, 60)
    first = gw.wait_for("grant", internal=(client.ip, 5200))
    second = gw.wait_for("grant", internal=(other.ip, 5201))
    assert first.external[1] == 4200 and second.external[1] != 4200
    text = natpmpc_map(topo, other, 4200, 5201, 60)
    assert f"Mapped public port {second.external[1]} " in text, text


def test_lifetime_is_capped_at_the_gateway_maximum(natlab: Lab) -> None:
    topo = portmap_topology(natlab, NatBehaviour.APDM, protocols=("natpmp",), max_lifetime=30)
    assert topo.gateway is not None
    text = natpmpc_map(topo, topo.client, 4150, 5150, 600)
    assert re.search(r"Mapped public port 4150 .* li[f]+e?time 30\b", text), text
    assert topo.gateway.mappings()[0].lifetime == 30


# ------------------------------------------------------------------------------ UPnP IGD


def test_upnpc_add_list_delete(natlab: Lab) -> None:
    topo, gw, client = gateway_lab(natlab, NatBehaviour.APDM, "upnp")
    sock = udp_agent(natlab, client).bind(client.ip, 6000)
    net = Internet(topo)

    out = run(natlab, client, ["upnpc", "-i", "-e", "lab test", "-a", client.ip, "6000",
                               "6001", "UDP", "120"])
    assert (f"external {topo.nat.wan_ip}:6001 UDP is redirected to internal "
            f"{client.ip}:6000") in out.stdout, out.stdout + out.stderr
    grant = gw.wait_for("grant", via="upnp", internal=(client.ip, 6000))
    assert grant.external == (topo.nat.wan_ip, 6001)
    assert_mapped(gw, client.ip, 6000, 6001)
    assert gw.mappings()[0].description == "lab test"
    assert net.seen_as(sock) == [(topo.nat.wan_ip, 6001)] * 2
    net.assert_reachable(6001, sock, want=True)

    out = run(natlab, client, ["upnpc", "-i", "-l"])
    assert f"ExternalIPAddress = {topo.nat.wan_ip}" in out.stdout, out.stdout
    assert re.search(rf"UDP\s+6001->{re.escape(client.ip)}:6000\s+'lab test'", out.stdout), \
        out.stdout

    out = run(natlab, client, ["upnpc", "-i", "-d", "6001", "UDP"])
    assert "UPNP_DeletePortMapping() returned : 0" in out.stdout, out.stdout + out.stderr
    assert_gone(gw, net, sock, 6001, "request")


def test_upnp_refuses_a_port_held_by_another_host(natlab: Lab) -> None:
    topo, gw, client = gateway_lab(natlab, NatBehaviour.EIM_APDF, "upnp")
    other = natlab.add_host("other", behind=topo.nat)
    out = run(natlab, client, ["upnpc", "-i", "-a", client.ip, "6100", "6100", "UDP"])
    assert "is redirected" in out.stdout, out.stdout
    out = run(natlab, other, ["upnpc", "-i", "-a", other.ip, "6100", "6100", "UDP"])
    assert "718" in out.stdout + out.stderr, out.stdout + out.stderr  # ConflictInMappingEntry
    out = run(natlab, other, ["upnpc", "-i", "-a", client.ip, "6200", "6200", "UDP"])
    assert "606" in out.stdout + out.stderr, out.stdout  # only for yourself
    assert len(gw.mappings()) == 1


# ------------------------------------------------------------------------------ PCP


def pcp_exchange(lab: Lab, client: Host, gateway: str, request: bytes) -> bytes:
    sock = udp_agent(lab, client).bind(client.ip, 0)
    sock.send((gateway, pcp.SERVER_PORT), request)
    got = sock.recv(3.0, src=(gateway, pcp.SERVER_PORT))
    assert got is not None, "no answer on 5351"
    return got.data


def test_pcp_map_renew_and_delete(natlab: Lab) -> None:
    topo, gw, client = gateway_lab(natlab, NatBehaviour.APDM, "pcp")
    me = ipaddress.IPv4Address(client.ip)

    def ask(lifetime: int, nonce: bytes = NONCE) -> pcp.Response:
        request = pcp.map_request(me, nonce, 5300, lifetime, suggested_port=4300).to_wire()
        return pcp.parse_response(pcp_exchange(natlab, client, topo.nat.gateway, request))

    granted = ask(60)
    assert granted.result == pcp.ResultCode.SUCCESS and granted.lifetime == 60
    assert granted.map is not None and granted.map.nonce == NONCE
    assert (str(granted.map.external_address), granted.map.external_port) == (
        topo.nat.wan_ip, 4300)
    assert_mapped(gw, client.ip, 5300, 4300)
    sock = udp_agent(natlab, client).bind(client.ip, 5300)
    Internet(topo).assert_reachable(4300, sock, want=True)

    assert ask(60, nonce=b"\xff" * 12).result == pcp.ResultCode.NOT_AUTHORIZED
    renewed = ask(90)
    assert renewed.lifetime == 90 and renewed.map is not None
    assert renewed.map.external_port == 4300
    assert gw.wait_for("grant", lifetime=90).renewal is True

    deleted = ask(0)
    assert deleted.result == pcp.ResultCode.SUCCESS and deleted.lifetime == 0
    assert gw.wait_for("delete", via="pcp").reason == "request"
    assert_unmapped(gw)


def test_pcp_checks_the_client_address(natlab: Lab) -> None:
    topo = portmap_topology(natlab, NatBehaviour.APDM, protocols=("pcp",))
    assert topo.gateway is not None
    forged = pcp.map_request(ipaddress.IPv4Address("192.0.2.99"), NONCE, 5400, 60).to_wire()
    answer = pcp.parse_response(pcp_exchange(natlab, topo.client, topo.nat.gateway, forged))
    assert answer.result == pcp.ResultCode.ADDRESS_MISMATCH
    assert topo.gateway.mappings() == []


# ------------------------------------------------------------------------------ one at a time


def test_a_protocol_left_out_is_not_offered(natlab: Lab) -> None:
    topo, gw, client = gateway_lab(natlab, NatBehaviour.APDM, "pcp")
    # NAT-PMP: natpmpc is told the version is not supported, maps nothing.
    out = natpmpc(topo, client, "-a", "4500", "5500", "udp", "60")
    assert out.returncode != 0 and "Mapped public port" not in out.stdout, out.stdout
    assert "unsupported nat-pmp version" in out.stderr, out.stderr
    answer = pcp_exchange(natlab, client, topo.nat.gateway, natpmp.ExternalAddressRequest()
                          .to_wire())
    assert pcp.parse_response(answer).result == pcp.ResultCode.UNSUPP_VERSION
    # UPnP: nobody answers SSDP (upnpc would say so after 8 s of searching).
    sock = udp_agent(natlab, client).bind(client.ip, 0)
    sock.send((upnp_igd.SSDP_ADDRESS, upnp_igd.SSDP_PORT),
              upnp_igd.build_msearch(upnp_igd.IGD_DEVICE_TYPES[1]))
    assert sock.recv(1.0) is None
    assert gw.mappings() == []


def test_ssdp_answers_an_igd_search(natlab: Lab) -> None:
    topo, gw, client = gateway_lab(natlab, NatBehaviour.APDM, "upnp")
    sock = udp_agent(natlab, client).bind(client.ip, 0)
    sock.send((upnp_igd.SSDP_ADDRESS, upnp_igd.SSDP_PORT),
              upnp_igd.build_msearch(upnp_igd.IGD_DEVICE_TYPES[1]))
    got = sock.recv(2.0)
    assert got is not None and got.src[0] == topo.nat.gateway
    answer = upnp_igd.parse_ssdp_response(got.data)
    assert answer.location == f"http://{topo.nat.gateway}:{gw.http_port}/rootDesc.xml"
    assert answer.search_target == upnp_igd.IGD_DEVICE_TYPES[1]


def test_natpmp_only_answers_pcp_with_unsupported_version(natlab: Lab) -> None:
    topo = portmap_topology(natlab, NatBehaviour.APDM, protocols=("natpmp",))
    me = ipaddress.IPv4Address(topo.client.ip)
    answer = pcp_exchange(natlab, topo.client, topo.nat.gateway,
                          pcp.map_request(me, NONCE, 5600, 60).to_wire())
    assert natpmp.is_natpmp_response(answer)
    assert natpmp.parse_response(answer).result == natpmp.ResultCode.UNSUPPORTED_VERSION


def test_exit_removes_every_mapping_and_the_table(natlab: Lab) -> None:
    topo, gw, client = gateway_lab(natlab, NatBehaviour.APDM, "natpmp", "upnp")
    natpmpc_map(topo, client, 4700, 5700, 600)
    natpmpc_map(topo, client, 4701, 5701, 600, proto="tcp")
    assert len(gw.nft_rules()) == 4
    assert gw.stop() == 0
    assert {e.reason for e in gw.events("delete")} == {"exit"}
    assert len(gw.events("delete")) == 2
    out = natlab.run(topo.nat, ["nft", "list", "tables"]).stdout
    assert "portmap" not in out, out


# ------------------------------------------------------------------------------ double NAT


def test_double_nat_gateway_reports_the_shared_address(natlab: Lab) -> None:
    topo = double_nat_topology(natlab, protocols=("natpmp",))
    gw, client = topo.gateway, topo.client
    assert gw is not None and topo.outer is not None
    assert ipaddress.IPv4Address(topo.nat.wan_ip) in ipaddress.IPv4Network("100.64.0.0/10")
    text = natpmpc_map(topo, client, 4800, 5800, 60)
    assert "Public IP address : 100.64.0.2" in text, text
    assert "Mapped public port 4800" in text, text
    # The internet sees the outer router's address, not the mapping.
    sock = udp_agent(natlab, client).bind(client.ip, 5800)
    assert Internet(topo).seen_as(sock)[0][0] == topo.outer.wan_ip  # type: ignore[index]
    # On the outer router's LAN side, the mapping works: 100.64.0.2:4800 -> client:5800.
    neighbour = natlab.add_host("neighbour", behind=topo.outer)
    udp_agent(natlab, neighbour).bind(neighbour.ip, 7100).send(("100.64.0.2", 4800), b"cgn")
    got = sock.recv(1.5)
    assert got is not None and got.data == b"cgn"


# ------------------------------------------------------------------------------ pair


def test_pair_mapping_lets_a_symmetric_peer_in(natlab: Lab) -> None:
    """Symmetric (random ports) on both sides; the left router maps: the right peer reaches
    the left one at its mapping, and the answer comes from the mapped endpoint."""
    topo = portmap_pair_topology(natlab, protocols=("natpmp",))
    assert topo.gateway is not None and topo.right_nat.grants_mappings is False
    out = run(natlab, topo.left, ["natpmpc", "-g", topo.left_nat.gateway, "-a", "4900",
                                  "5900", "udp", "60"])
    assert "Mapped public port 4900" in out.stdout, out.stdout + out.stderr
    left = udp_agent(natlab, topo.left).bind(topo.left.ip, 5900)
    right = udp_agent(natlab, topo.right).bind(topo.right.ip, 6900)
    right.send((topo.left_nat.wan_ip, 4900), b"hello left")
    got = left.recv(1.5)
    assert got is not None and got.data == b"hello left"
    assert got.src[0] == topo.right_nat.wan_ip
    left.send(got.src, b"hello right")
    back = right.recv(1.5)
    assert back is not None and back.data == b"hello right"
    assert back.src == (topo.left_nat.wan_ip, 4900)
