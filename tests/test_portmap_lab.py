"""`PortMapping` (nattool/net/portmap.py) against the NAT lab's port-mapping gateway: each
protocol offered alone, then all three (PCP wins); the mapping and its nftables rules
exist while the program runs and are gone after Ctrl-C (SIGINT), and renewals keep the
external endpoint."""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import pytest

from tests.natlab import Lab, NatBehaviour
from tests.natlab.fixtures import (  # noqa: F401 - fixtures, imported like tests/test_natlab.py
    natlab,
    natlab_available,
)
from tests.natlab.portmap_lab import ALL_PROTOCOLS, REPO
from tests.natlab.topologies import portmap_topology

pytestmark = [pytest.mark.natlab, pytest.mark.usefixtures("natlab_available")]

LOCAL_PORT = 41000

# Maps LOCAL_PORT, prints the mapping and each later event as JSON lines, holds it until
# SIGINT (asyncio.run turns it into a cancellation of main: the delete is __aexit__'s).
PROGRAM = """
import asyncio, dataclasses, json, sys
from nattool.net.portmap import PortMapping

def event(e):
    fields = {f.name: str(getattr(e, f.name)) for f in dataclasses.fields(e)}
    print(json.dumps({"event": type(e).__name__, **fields}), flush=True)

async def main():
    protocols = tuple(sys.argv[1].split(","))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with PortMapping(int(sys.argv[2]), protocols=protocols, lifetime=int(sys.argv[3]), on_change=event) as pm:
        took = loop.time() - started
        print(json.dumps({"mapping": pm.mapping.to_json() if pm.mapping else None, "failures": pm.failures,
                          "took": took}), flush=True)
        await asyncio.sleep(3600)

try:
    asyncio.run(main())
except KeyboardInterrupt:
    print(json.dumps({"exit": "interrupted"}), flush=True)
"""


def start_mapper(lab: Lab, node: Any, protocols: tuple[str, ...], lifetime: int = 7200) -> Any:
    child = lab.spawn(node, [sys.executable, "-c", PROGRAM, ",".join(protocols), str(LOCAL_PORT), str(lifetime)],
                      cwd=str(REPO), env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=15)
    child.expect(r"\{\"mapping\".*\}\r?\n")
    return child, json.loads(child.after)


def interrupt(child: Any) -> None:
    child.kill(signal.SIGINT)
    child.expect(r"\{\"exit\": \"interrupted\"\}")
    child.expect(r"\Z|$", timeout=5)


@pytest.mark.parametrize("protocols", [("pcp",), ("natpmp",), ("upnp",), ALL_PROTOCOLS])
def test_mapping_is_granted_and_gone_after_ctrl_c(natlab: Lab, protocols: tuple[str, ...]) -> None:
    topo = portmap_topology(natlab, NatBehaviour.APDM, protocols=protocols)
    gw = topo.gateway
    assert gw is not None
    child, first = start_mapper(natlab, topo.client, protocols)
    mapping = first["mapping"]
    assert mapping is not None, first
    assert mapping["protocol"] == protocols[0]  # with all three, PCP
    assert mapping["external"].startswith(f"{topo.nat.wan_ip}:")
    assert mapping["internal"] == f"{topo.client.ip}:{LOCAL_PORT}"
    assert first["took"] < 1.5
    held = gw.mappings()
    assert [(m.via, m.internal) for m in held] == [(protocols[0], (topo.client.ip, LOCAL_PORT))]
    assert gw.nft_rules()
    interrupt(child)
    deadline = time.monotonic() + 5
    while gw.mappings() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.mappings() == []
    assert gw.nft_rules() == []
    assert [e.reason for e in gw.events("delete")] == ["request"]


@pytest.mark.parametrize("protocol", ["pcp", "natpmp"])
def test_renewal_keeps_the_external_endpoint(natlab: Lab, protocol: str) -> None:
    topo = portmap_topology(natlab, NatBehaviour.APDM, protocols=(protocol,), max_lifetime=4)
    gw = topo.gateway
    assert gw is not None
    child, first = start_mapper(natlab, topo.client, (protocol,))
    assert first["mapping"]["lifetime"] == 4
    # Renewed between 2 and 2.5 s after the grant: a second grant line at the gateway.
    child.expect(r"\{\"event\": \"MappingGranted\".*\"renewal\": \"True\".*\}", timeout=6)
    renewed = json.loads(child.after)
    assert renewed["external"] == first["mapping"]["external"]
    assert len(gw.events("grant")) >= 2
    interrupt(child)
    deadline = time.monotonic() + 5
    while gw.mappings() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.mappings() == []
