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

All cases run at once in one lab (tests/natlab/shared_lab.py): per NAT behaviour one client
host runs both clients, from different local ports, against one RFC 3489 serve; the client
behind the port-restricted NAT also asks a one-address serve on a third server address.
py3stun's silent tests (4 x 2 s each) then overlap instead of adding up.

Traffic goes only to namespaces the test creates: both clients are always given the server.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from tests.natlab import Lab, NatBehaviour, ServerHost
from tests.natlab.fixtures import _skip_or_fail
from tests.natlab.shared_lab import SharedLab, cases_in_one_lab, check_case
from tests.natlab.stun import communicate_bounded
from tests.natlab.topologies import SERVER_V4, ProbeTopology
from tests.test_probe_lab import start_serve

# One lane (pytest-xdist group): the module fixture runs every case at once, in each lane
# that runs one of its tests.
pytestmark = pytest.mark.xdist_group("stun_classic_clients")

STUN_PORT, STUN_ALT_PORT = 3478, 3479  # stun-client knows no other port
# Local ports of the clients sharing a client host. stun-client binds its port and the next.
STUN_CLIENT_PORT, ONE_ADDRESS_CLIENT_PORT, PY3STUN_PORT = 40000, 40002, 54320
# The RFC 3489 serve is on the server host's primary + alternate addresses; the third one
# has a plain serve (no alternates) on the same port.
ONE_ADDRESS_SERVER = SERVER_V4[2]
ONE_ADDRESS_NAT = NatBehaviour.EIM_APDF
# py3stun waits 4 x 2 s for each silent test, stun-client about 1 s in all; a busy machine.
CLIENT_TIMEOUT = 60.0
PY3STUN = Path(sys.executable).parent / "py3stun"  # the test extras' console script

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
CLASSIC_NATS = list(STUN_CLIENT_VERDICT)
assert list(PY3STUN_VERDICT) == CLASSIC_NATS


def stun_client() -> str:
    path = shutil.which("stun")
    if path is None:
        _skip_or_fail("Debian's stun-client ('stun') is not installed")
    return str(path)


def py3stun() -> str:
    if not PY3STUN.exists():
        _skip_or_fail(f"py3stun is not installed next to {sys.executable} (pip install '.[test]')")
    return str(PY3STUN)


ClientRun = tuple[int | None, str]  # exit status (None: killed at CLIENT_TIMEOUT), output


def run_clients(lab: Lab, topo: ProbeTopology, argvs: Sequence[list[str]]) -> list[ClientRun]:
    """Run the clients (at once) in the client host, each bounded by CLIENT_TIMEOUT."""
    procs = [lab.popen(topo.client, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, errors="replace") for argv in argvs]
    return [communicate_bounded(proc, CLIENT_TIMEOUT) for proc in procs]


def ended(run: ClientRun | None, client: str) -> str:
    """The output of a client that ran and ended by itself."""
    assert run is not None, f"{client} did not run (was it installed when the lab ran?)"
    status, out = run
    assert status is not None, f"{client} did not end within {CLIENT_TIMEOUT}s:\n{out}"
    return out


def stun_client_mapped(out: str) -> str | None:
    """The first MAPPED-ADDRESS stun-client decoded (``-v`` prints them)."""
    m = re.search(r"MappedAddress = (\S+)", out)
    return m.group(1) if m else None


def assert_parsed_cleanly(out: str) -> None:
    assert "Bad length" not in out and "Traceback" not in out, out


@dataclass(frozen=True)
class ClassicRun:
    """What the classic clients saw from behind one NAT of the shared lab (None: not run,
    as the client is not installed or the case is not for this NAT)."""

    topo: ProbeTopology
    stun_client: ClientRun | None
    py3stun: ClientRun | None
    one_address: ClientRun | None  # stun-client against the one-address serve


def start_classic_servers(lab: Lab, server: ServerHost) -> None:
    """An RFC 3489 `nattool serve` (two addresses, two ports) and a one-address one."""
    start_serve(lab, server, SERVER_V4[0], alt_host=SERVER_V4[1], alt_port=STUN_ALT_PORT, port=STUN_PORT)
    start_serve(lab, server, ONE_ADDRESS_SERVER, port=STUN_PORT)


def run_classic_clients(lab: Lab, topo: ProbeTopology, behaviour: NatBehaviour, _: None) -> ClassicRun:
    """The installed classic clients, at once, from the client behind ``topo``'s NAT."""
    argvs: dict[str, list[str]] = {}
    stun = shutil.which("stun")
    if stun is not None:
        argvs["stun_client"] = [stun, topo.primary, "-v", "-p", str(STUN_CLIENT_PORT)]
        if behaviour is ONE_ADDRESS_NAT:
            argvs["one_address"] = [stun, ONE_ADDRESS_SERVER, "-v", "-p", str(ONE_ADDRESS_CLIENT_PORT)]
    if PY3STUN.exists():
        # -i: py3stun tells "no NAT" by comparing the mapped address with its bound one.
        argvs["py3stun"] = [str(PY3STUN), "-H", topo.primary, "-P", str(STUN_PORT),
                            "-i", topo.client.ip, "-p", str(PY3STUN_PORT)]
    runs = dict(zip(argvs, run_clients(lab, topo, list(argvs.values()))))
    return ClassicRun(topo, runs.get("stun_client"), runs.get("py3stun"), runs.get("one_address"))


@pytest.fixture(scope="module")
def classic_runs(natlab_available: None) -> Iterator[SharedLab[ClassicRun]]:
    """Every CLASSIC_NATS case in one lab, all at once."""
    with cases_in_one_lab(CLASSIC_NATS, start_classic_servers, run_classic_clients, len(CLASSIC_NATS)) as shared:
        yield shared


@pytest.mark.natlab
@pytest.mark.parametrize("behaviour", CLASSIC_NATS, ids=lambda b: b.value)
def test_stun_client_classifies_the_nat(classic_runs: SharedLab[ClassicRun], behaviour: NatBehaviour) -> None:
    """Debian's stun-client runs its RFC 3489 discovery against an RFC 3489 `nattool serve`."""
    stun_client()
    check_case(classic_runs, behaviour, check_stun_client)


def check_stun_client(run: ClassicRun, behaviour: NatBehaviour) -> None:
    out = ended(run.stun_client, "stun-client")
    assert_parsed_cleanly(out)
    topo = run.topo
    public_ip = topo.client.ip if behaviour is NatBehaviour.NO_NAT else topo.nat.wan_ip
    assert (stun_client_mapped(out) or "").startswith(f"{public_ip}:"), out
    assert f"Primary: {STUN_CLIENT_VERDICT[behaviour]}" in out, out


@pytest.mark.natlab
@pytest.mark.parametrize("behaviour", CLASSIC_NATS, ids=lambda b: b.value)
def test_py3stun_classifies_the_nat(classic_runs: SharedLab[ClassicRun], behaviour: NatBehaviour) -> None:
    """PyPI's py3stun runs its RFC 3489 discovery against an RFC 3489 `nattool serve`."""
    py3stun()
    check_case(classic_runs, behaviour, check_py3stun)


def check_py3stun(run: ClassicRun, behaviour: NatBehaviour) -> None:
    out = ended(run.py3stun, "py3stun")
    assert_parsed_cleanly(out)
    assert f"NAT Type: {PY3STUN_VERDICT[behaviour]}\n" in out, out


@pytest.mark.natlab
def test_one_address_server_is_silent_to_a_classic_change_request(classic_runs: SharedLab[ClassicRun]) -> None:
    """A plain `nattool serve` (no alternates) answers stun-client's test I, and stays silent
    to its tests II and III (CHANGE-REQUEST): stun-client must not see an independent filter
    behind a port-restricted NAT."""
    stun_client()
    check_case(classic_runs, ONE_ADDRESS_NAT, check_one_address)


def check_one_address(run: ClassicRun, behaviour: NatBehaviour) -> None:
    out = ended(run.one_address, "stun-client (one-address serve)")
    assert_parsed_cleanly(out)
    assert (stun_client_mapped(out) or "").startswith(f"{run.topo.nat.wan_ip}:"), out
    assert "test I = 1" in out and "test II = 0" in out and "test III = 0" in out, out
    assert "Port Dependent Filter" in out, out
