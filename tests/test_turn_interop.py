"""A TURN client nobody here wrote: coturn's `turnutils_uclient` against `nattool serve`.

Client-to-client (-y): the client allocates relayed addresses and sends between them
through the server, so it needs no peer process; it ends with "Total lost packets N".
Over UDP and TCP (-t), with long-term credentials (-u/-w) and the REST secret (-W with
an EXPIRY:NAME user), with channels (the default) and with Send indications (-s). On
loopback (the relayed addresses of one server reach each other under the default peer
policy), and in the NAT lab, the client behind a NAT and the server on a public address.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BANNER_PREFIX, nattool_cmd, nattool_env
from tests.natlab import Lab, NatBehaviour
from tests.natlab.fixtures import _skip_or_fail, natlab, natlab_available  # noqa: F401 - fixtures
from tests.natlab.lab import read_line
from tests.natlab.topologies import SERVER_V4, probe_topology

UCLIENT = shutil.which("turnutils_uclient")


@pytest.fixture(autouse=True)
def _uclient_installed() -> None:
    if UCLIENT is None:
        _skip_or_fail("coturn's turnutils_uclient is not installed (apt install coturn)")


SECRET = "interop-rest-secret"
LOST = re.compile(r"Total lost packets (\d+)")
SENT = re.compile(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")
MESSAGES = 20  # per client
CLIENTS = 2


def _auth_args(auth: str) -> list[str]:
    if auth == "long-term":
        return ["-u", "alice", "-w", "wonderland"]
    return ["-u", f"{int(time.time()) + 3600}:bob", "-W", SECRET]


def _uclient_argv(host: str, port: int, transport: str, auth: str, mode: str) -> list[str]:
    assert UCLIENT is not None
    argv = [UCLIENT, "-y", "-n", str(MESSAGES), "-m", str(CLIENTS), "-z", "5", "-p", str(port), *_auth_args(auth)]
    if transport == "tcp":
        argv.append("-t")
    if mode == "send":
        argv.append("-s")
    return [*argv, host]


def _assert_no_loss(output: str) -> None:
    lost = LOST.findall(output)
    assert lost, f"turnutils_uclient did not finish:\n{output[-3000:]}"
    assert lost[-1] == "0", output[-3000:]
    totals = SENT.findall(output)
    assert totals, output[-3000:]
    sent, received = (int(n) for n in totals[-1])
    assert sent == received >= MESSAGES * CLIENTS, output[-3000:]  # RTP and RTCP allocations: twice that


@pytest.mark.parametrize("mode", ["channel", "send"])
@pytest.mark.parametrize("auth", ["long-term", "rest"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_uclient_on_loopback_loses_nothing(transport: str, auth: str, mode: str, tracker) -> None:  # type: ignore[no-untyped-def]
    tp = tracker("--turn-user", "alice:wonderland", "--turn-secret", SECRET, "--relay-bandwidth", "0")
    result = subprocess.run(
        _uclient_argv("127.0.0.1", tp.port, transport, auth, mode), capture_output=True, text=True, timeout=60
    )
    _assert_no_loss(result.stdout + result.stderr)


@pytest.mark.natlab
@pytest.mark.usefixtures("natlab_available")
@pytest.mark.parametrize(("transport", "auth"), [("udp", "long-term"), ("tcp", "rest")])
def test_uclient_behind_a_nat_loses_nothing(transport: str, auth: str, natlab: Lab, tmp_path: Path) -> None:  # noqa: F811
    """The server on a public address with the default peer policy (no --allow-peer),
    the client behind a port-restricted NAT."""
    topo = probe_topology(natlab, NatBehaviour.EIM_APDF)
    port = 3478
    proc = natlab.popen(
        topo.server,
        nattool_cmd("serve", "--host", SERVER_V4[0], "--port", str(port), "--store", "memory",
                    "--turn-user", "alice:wonderland", "--turn-secret", SECRET),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=nattool_env(tmp_path), text=True,
    )  # fmt: skip
    line = read_line(proc.stdout, 15)
    assert line and BANNER_PREFIX in line and "turn on" in line, line
    assert f"relayed {SERVER_V4[0]} " in line
    result = natlab.run(topo.client, _uclient_argv(SERVER_V4[0], port, transport, auth, "channel"), check=False, timeout=60)
    _assert_no_loss(result.stdout + result.stderr)
