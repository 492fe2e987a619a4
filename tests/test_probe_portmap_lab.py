"""`nattool probe --json` reports the port-mapping protocols of the lab's gateway (issue 25).

The router runs the lab's port-mapping gateway (tests/natlab/portmap_gateway.py) offering
one protocol at a time, then all three behind a double NAT (inner WAN 100.64.0.2): the
probe must say which protocols answered, the external address each reports, whether that
address is itself behind a NAT, and leave nothing mapped (the gateway's state, its
nftables rules and its delete lines are the evidence).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.natlab import Lab, NatBehaviour
from tests.natlab.fixtures import (  # noqa: F401 - fixtures, imported like tests/test_natlab.py
    natlab,
    natlab_available,
)
from tests.natlab.portmap_lab import ALL_PROTOCOLS, PortmapGateway
from tests.natlab.topologies import ProbeTopology, double_nat_topology, portmap_topology
from tests.test_probe_lab import PORT, endpoint, run_probe, start_serve

pytestmark = [pytest.mark.natlab, pytest.mark.usefixtures("natlab_available")]


def probe_portmap(lab: Lab, topo: ProbeTopology) -> dict[str, Any]:
    start_serve(lab, topo.server, topo.primary)
    run = run_probe(lab, topo.client, endpoint(topo.primary, PORT))
    assert run.returncode == 0, run.stderr
    portmap: dict[str, Any] = run.report["portmap"]
    return portmap


def assert_nothing_left(gw: PortmapGateway) -> None:
    """Whatever the probe mapped, it deleted before it exited."""
    assert gw.mappings() == []
    assert gw.nft_rules() == []
    assert all(e.reason == "request" for e in gw.events("delete"))
    assert len(gw.events("delete")) == len({e.internal for e in gw.events("grant")})


@pytest.mark.parametrize("protocol", ALL_PROTOCOLS)
def test_probe_reports_the_protocol_offered(natlab: Lab, protocol: str) -> None:
    topo = portmap_topology(natlab, NatBehaviour.APDM, protocols=(protocol,))
    assert topo.gateway is not None
    portmap = probe_portmap(natlab, topo)
    assert portmap["gateway"] == topo.nat.gateway
    assert portmap["answered"] == [protocol]
    assert portmap["behind_nat"] is False
    offered = portmap[protocol]
    assert offered["answered"] is True
    assert offered["external_address"] == topo.nat.wan_ip
    assert offered["behind_nat"] is False
    for other in set(ALL_PROTOCOLS) - {protocol}:
        assert portmap[other]["answered"] is False, portmap[other]
        assert portmap[other]["external_address"] is None
    assert_nothing_left(topo.gateway)


def test_probe_flags_a_double_nat(natlab: Lab) -> None:
    topo = double_nat_topology(natlab, protocols=ALL_PROTOCOLS)
    assert topo.gateway is not None
    portmap = probe_portmap(natlab, topo)
    assert sorted(portmap["answered"]) == sorted(ALL_PROTOCOLS)
    assert portmap["behind_nat"] is True
    assert portmap["note"]
    for protocol in ALL_PROTOCOLS:
        report = portmap[protocol]
        assert report["external_address"] == "100.64.0.2", report
        assert report["address_class"] == "cgnat"
        assert report["behind_nat"] is True
    assert_nothing_left(topo.gateway)


def test_probe_without_a_mapping_gateway(natlab: Lab) -> None:
    topo = double_nat_topology(natlab, protocols=None)
    portmap = probe_portmap(natlab, topo)
    assert portmap["answered"] == []
    assert all(portmap[p]["answered"] is False for p in ALL_PROTOCOLS)
