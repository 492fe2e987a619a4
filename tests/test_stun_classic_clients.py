"""Classic RFC 3489 STUN clients nobody here wrote, against `nattool serve` in the NAT lab.

Clients written before RFC 5389 know no magic cookie and no attribute padding. Two of
them, installed from the package registries:

- Debian's ``stun-client`` (Vovida's C client, binary ``stun``; always port 3478). Before
  classic replies dropped SOFTWARE it printed "Bad length string 13".
- PyPI's ``py3stun`` (the pystun code: gaohawk, Justin Riley; pystun3 is the same code),
  installed by the test extras. Its parser raised ``ValueError`` on the padded SOFTWARE and it
  then reported "Blocked". (pystun3 itself installs a top-level ``tests`` package that
  shadows this repository's, so it cannot be a test dependency.)

Against an RFC 3489 server (two addresses, two ports) each must name the lab NAT's classic
type. Against a one-address server, a CHANGE-REQUEST it cannot honour gets no answer (an
error reply made stun-client report an independent filter): the client must see silence.

Traffic goes only to namespaces the test creates: both clients are always given the server.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.natlab import Lab, NatBehaviour
from tests.natlab.fixtures import _skip_or_fail
from tests.natlab.stun import communicate_bounded
from tests.natlab.topologies import ProbeTopology, probe_topology
from tests.test_probe_lab import start_serve

STUN_PORT, STUN_ALT_PORT = 3478, 3479  # stun-client knows no other port
PY3STUN_PORT = 54320
# py3stun waits 4 x 2 s for each silent test, stun-client about 1 s in all; a busy machine.
CLIENT_TIMEOUT = 60.0

# stun-client's summary line ("Primary: Independent Mapping, Port Dependent Filter, ...").
STUN_CLIENT_VERDICT = {
    NatBehaviour.NO_NAT: "Open",
    NatBehaviour.EIM_EIF: "Independent Mapping, Independent Filter",
    NatBehaviour.EIM_ADF: "Independent Mapping, Address Dependent Filter",
    NatBehaviour.EIM_APDF: "Independent Mapping, Port Dependent Filter",
    NatBehaviour.APDM: "Dependent Mapping",
}
PY3STUN_VERDICT = {
    NatBehaviour.NO_NAT: "Open Internet",
    NatBehaviour.EIM_EIF: "Full Cone",
    NatBehaviour.EIM_ADF: "Restric NAT",
    # py3stun sends its test III to the changed IP but the primary port, having sent test I
    # to the changed IP and port: the change-port answer then comes from where it has been,
    # so what it sees of a port-restricted NAT is the address filter.
    NatBehaviour.EIM_APDF: "Restric NAT",
    NatBehaviour.APDM: "Symmetric NAT",
}


def stun_client() -> str:
    path = shutil.which("stun")
    if path is None:
        _skip_or_fail("Debian's stun-client ('stun') is not installed")
    return str(path)


def py3stun() -> str:
    # The console script of the running interpreter's environment (the test extras).
    path = Path(sys.executable).parent / "py3stun"
    if not path.exists():
        _skip_or_fail(f"py3stun is not installed next to {sys.executable} (pip install '.[test]')")
    return str(path)


def run_clients(lab: Lab, topo: ProbeTopology, *argvs: list[str]) -> list[str]:
    """Run the clients (at once) in the client host; their outputs, each checked to have ended."""
    procs = [lab.popen(topo.client, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, errors="replace") for argv in argvs]
    outputs = []
    for argv, proc in zip(argvs, procs):
        status, out = communicate_bounded(proc, CLIENT_TIMEOUT)
        assert status is not None, f"{argv[0]} did not end within {CLIENT_TIMEOUT}s:\n{out}"
        outputs.append(out)
    return outputs


def stun_client_mapped(out: str) -> str | None:
    """The first MAPPED-ADDRESS stun-client decoded (``-v`` prints them)."""
    m = re.search(r"MappedAddress = (\S+)", out)
    return m.group(1) if m else None


def assert_parsed_cleanly(out: str) -> None:
    assert "Bad length" not in out and "Traceback" not in out, out


def start_rfc3489_serve(lab: Lab, behaviour: NatBehaviour) -> ProbeTopology:
    """The probe topology with an RFC 3489 `nattool serve` (two addresses, two ports)."""
    topo = probe_topology(lab, behaviour)
    start_serve(lab, topo.server, topo.primary, alt_host=topo.alternate, alt_port=STUN_ALT_PORT,
                port=STUN_PORT)
    return topo


@pytest.mark.parametrize("behaviour", list(STUN_CLIENT_VERDICT), ids=lambda b: b.value)
def test_stun_client_classifies_the_nat(natlab: Lab, behaviour: NatBehaviour) -> None:
    """Debian's stun-client runs its RFC 3489 discovery against an RFC 3489 `nattool serve`."""
    stun = stun_client()
    topo = start_rfc3489_serve(natlab, behaviour)
    (out,) = run_clients(natlab, topo, [stun, topo.primary, "-v"])
    assert_parsed_cleanly(out)
    public_ip = topo.client.ip if behaviour is NatBehaviour.NO_NAT else topo.nat.wan_ip
    assert (stun_client_mapped(out) or "").startswith(f"{public_ip}:"), out
    assert f"Primary: {STUN_CLIENT_VERDICT[behaviour]}" in out, out


@pytest.mark.parametrize("behaviour", list(PY3STUN_VERDICT), ids=lambda b: b.value)
def test_py3stun_classifies_the_nat(natlab: Lab, behaviour: NatBehaviour) -> None:
    """PyPI's py3stun runs its RFC 3489 discovery against an RFC 3489 `nattool serve`."""
    pystun = py3stun()
    topo = start_rfc3489_serve(natlab, behaviour)
    # -i: py3stun tells "no NAT" by comparing the mapped address with its bound one.
    (out,) = run_clients(natlab, topo, [pystun, "-H", topo.primary, "-P", str(STUN_PORT),
                                        "-i", topo.client.ip, "-p", str(PY3STUN_PORT)])
    assert_parsed_cleanly(out)
    assert f"NAT Type: {PY3STUN_VERDICT[behaviour]}\n" in out, out


def test_one_address_server_is_silent_to_a_classic_change_request(natlab: Lab) -> None:
    """A plain `nattool serve` (no alternates) answers stun-client's test I, and stays silent
    to its tests II and III (CHANGE-REQUEST): stun-client must not see an independent filter
    behind a port-restricted NAT."""
    stun = stun_client()
    topo = probe_topology(natlab, NatBehaviour.EIM_APDF)
    start_serve(natlab, topo.server, topo.primary, port=STUN_PORT)
    (out,) = run_clients(natlab, topo, [stun, topo.primary, "-v"])
    assert_parsed_cleanly(out)
    assert (stun_client_mapped(out) or "").startswith(f"{topo.nat.wan_ip}:"), out
    assert "test I = 1" in out and "test II = 0" in out and "test III = 0" in out, out
    assert "Port Dependent Filter" in out, out
