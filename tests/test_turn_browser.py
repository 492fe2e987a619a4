"""A browser through the TURN relay: headless Chromium (Debian ``chromium``) in the NAT lab.

One page (tests/browser/turn_relay.html) holds two RTCPeerConnections forced to relay
(``iceTransportPolicy: 'relay'``) through the TURN server on a lab server host; they trade
offer, answer and candidates in the page, open a data channel and carry one message. The
browser sits behind a port-restricted NAT. The same page runs against coturn (the
reference: if that fails, the harness or the browser is broken, not our relay) and against
`nattool serve --turn-user`, over UDP and over TCP to the server (``?transport=tcp``).

Traffic goes only to namespaces the test creates; Chromium runs with its background
networking off and is always killed at the end (it never exits by itself).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.conftest import BANNER_PREFIX, nattool_cmd, nattool_env
from tests.natlab import Lab, NatBehaviour
from tests.natlab.fixtures import _skip_or_fail
from tests.natlab.lab import LabError, NodeRef
from tests.natlab.stun import start_turnserver, turnserver_available
from tests.natlab.topologies import probe_topology

PAGE = Path(__file__).resolve().parent / "browser" / "turn_relay.html"
TURN_PORT = 3478
USER, PASSWORD = "browser", "relay-secret"
PAGE_TIMEOUT_MS = 30_000  # the page reports a failure itself after this
BROWSER_TIMEOUT = 60.0  # Chromium's start on a busy machine, then the page
_RESULT = re.compile(r'"TURN-RESULT (.*)", source: ')


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        _skip_or_fail("Debian's chromium is not installed")
    return str(path)


def chromium_argv(profile: Path, url: str) -> list[str]:
    """Headless Chromium as root in a namespace, quiet: no sandbox (root), no GPU, no
    background traffic of its own; console lines on stderr; killed by ``timeout`` anyway."""
    return [
        "timeout", "-s", "KILL", str(int(BROWSER_TIMEOUT) + 10), chromium(),
        "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
        f"--user-data-dir={profile}", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--no-default-browser-check", url,
    ]


def run_page(lab: Lab, node: NodeRef, turn_url: str, tmp_path: Path) -> dict[str, Any]:
    """Load the page in ``node``; its result (see the page's header)."""
    query = urlencode({"url": turn_url, "user": USER, "pass": PASSWORD, "timeout": PAGE_TIMEOUT_MS})
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home)}
    try:
        browser = lab.start_service(node, chromium_argv(tmp_path / "profile", f"{PAGE.as_uri()}?{query}"),
                                    ready="TURN-RESULT ", timeout=BROWSER_TIMEOUT, env=env)
    except LabError as exc:
        pytest.fail(f"the page gave no result: {exc}", pytrace=False)
    browser.stop()
    output = browser.output()
    match = next((m for m in map(_RESULT.search, browser.lines) if m), None)
    assert match is not None, output
    result: dict[str, Any] = json.loads(match.group(1))
    result["log"] = [line for line in browser.lines if "TURN-" in line]
    return result


def start_nattool_turn(lab: Lab, node: NodeRef, ip: str) -> None:
    lab.start_service(node, nattool_cmd(
        "serve", "--host", ip, "--port", str(TURN_PORT), "--store", "memory", "--rate-limit", "0",
        "--turn-user", f"{USER}:{PASSWORD}"), ready=BANNER_PREFIX, env=nattool_env())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("server", ["coturn", "nattool"])
def test_chromium_data_channel_through_turn(natlab: Lab, tmp_path: Path, server: str, transport: str) -> None:
    chromium()
    topo = probe_topology(natlab, NatBehaviour.EIM_APDF)
    if server == "coturn":
        reason = turnserver_available()
        if reason is not None:
            _skip_or_fail(reason)
        start_turnserver(natlab, topo.server, [topo.primary], TURN_PORT, turn_users=(f"{USER}:{PASSWORD}",))
    else:
        start_nattool_turn(natlab, topo.server, topo.primary)
    turn_url = f"turn:{topo.primary}:{TURN_PORT}" + ("?transport=tcp" if transport == "tcp" else "")

    result = run_page(natlab, topo.client, turn_url, tmp_path)

    assert result["ok"], result
    assert result["message"] == "hello through the relay", result
    # Every candidate, and both ends of the pair the data went over, are relayed
    # addresses on the TURN server's address, reached over the transport asked for.
    for side in ("a", "b"):
        assert result["candidates"][side], result
        for cand in result["candidates"][side]:
            assert cand["type"] == "relay" and cand["address"] == topo.primary, result
    pair = result["pair"]
    assert pair is not None, result
    assert pair["local"]["type"] == "relay" and pair["remote"]["type"] == "relay", result
    assert pair["local"]["address"] == pair["remote"]["address"] == topo.primary, result
    assert pair["local"]["relayProtocol"] == transport, result
