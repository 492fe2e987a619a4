"""Driving the lab's port-mapping gateway (``portmap_gateway``) from a test.

    gw = start_portmap_gateway(lab, nat, protocols=("pcp",))
    gw.wait_for("grant", via="pcp", internal=(client.ip, 4000))
    gw.mappings(); gw.nft_rules(); gw.stop()

``nat`` must be built with ``lab.add_nat(..., grants_mappings=True)`` (its forward chain
accepts DNATed connections). See tests/natlab/README.md and /work/wt/GATEWAY-API.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .lab import Lab, LabError, Nat, Service

ALL_PROTOCOLS = ("pcp", "natpmp", "upnp")
REPO = Path(__file__).resolve().parents[2]
NFT_TABLE = "portmap"
MAX_LIFETIME = 7200  # s, the longest PCP/NAT-PMP lifetime the gateway grants by default
GATEWAY_NICE = -10  # its scheduling priority (see start_portmap_gateway)


def _endpoint(text: str) -> tuple[str, int]:
    ip, port = text.rsplit(":", 1)
    return ip, int(port)


@dataclass(frozen=True)
class GatewayEvent:
    """A line of the gateway's output: a grant (also a renewal) or a delete."""

    kind: str  # "grant" | "delete"
    via: str  # "pcp" | "natpmp" | "upnp"
    proto: str  # "udp" | "tcp"
    internal: tuple[str, int]
    external: tuple[str, int]
    lifetime: int | None  # grant: seconds granted (0: UPnP lease without expiry)
    reason: str | None  # delete: "request" | "expired" | "exit"
    renewal: bool  # grant: the mapping existed already (same client, protocol, port)
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> GatewayEvent:
        return cls(raw["event"], raw["via"], raw["proto"], _endpoint(raw["internal"]),
                   _endpoint(raw["external"]), raw.get("lifetime"), raw.get("reason"),
                   bool(raw.get("renewal")), raw)


@dataclass(frozen=True)
class GatewayMapping:
    """A mapping the gateway holds now (its state file)."""

    via: str
    proto: str
    internal: tuple[str, int]
    external: tuple[str, int]
    lifetime: int
    expires_at: float  # unix time; 0 = no expiry
    description: str


@dataclass(eq=False)
class PortmapGateway:
    """A running gateway in a router namespace (see :func:`start_portmap_gateway`)."""

    lab: Lab
    nat: Nat
    service: Service
    protocols: tuple[str, ...]
    state_file: Path
    http_port: int

    @property
    def lan_ip(self) -> str:
        return self.nat.gateway

    @property
    def wan_ip(self) -> str:
        return self.nat.wan_ip

    def events(self, kind: str | None = None) -> list[GatewayEvent]:
        out = []
        for line in list(self.service.lines):
            if not line.startswith("{"):
                continue
            raw = json.loads(line)
            if raw.get("event") in ("grant", "delete") and kind in (None, raw["event"]):
                out.append(GatewayEvent.from_json(raw))
        return out

    def wait_for(self, kind: str, timeout: float = 10.0, **match: Any) -> GatewayEvent:
        """The first event of ``kind`` whose attributes equal ``match`` (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events(kind):
                if all(getattr(event, k) == v for k, v in match.items()):
                    return event
            if time.monotonic() >= deadline or self.service.proc.poll() is not None:
                raise LabError(f"gateway: no {kind} event matching {match} within "
                               f"{timeout}s; output:\n{self.service.output()}")
            time.sleep(0.05)

    def mappings(self) -> list[GatewayMapping]:
        raw = json.loads(self.state_file.read_text())
        return [GatewayMapping(m["via"], m["proto"], _endpoint(m["internal"]),
                               _endpoint(m["external"]), m["lifetime"], m["expires_at"],
                               m["description"]) for m in raw]

    def nft_rules(self) -> list[str]:
        """The per-mapping rules in the gateway's table now (dnat and snat lines)."""
        out = self.lab.run(self.nat, ["nft", "list", "table", "inet", NFT_TABLE],
                           check=False).stdout
        return [line.strip() for line in out.splitlines()
                if " dnat " in line or " snat " in line]

    def stop(self) -> int:
        """SIGTERM: the gateway removes every mapping and its table, then exits."""
        return self.service.stop()


def start_portmap_gateway(lab: Lab, nat: Nat, protocols: Iterable[str] = ALL_PROTOCOLS, *,
                          http_port: int = 5000, min_lifetime: int = 1,
                          max_lifetime: int = MAX_LIFETIME, timeout: float = 15.0
                          ) -> PortmapGateway:
    """Start the gateway in ``nat``'s namespace; return once it listens."""
    protocols = tuple(protocols)
    if not nat.grants_mappings:
        raise ValueError(f"{nat.name}: build it with add_nat(..., grants_mappings=True)")
    if shutil.which("conntrack") is None:  # stale flows of a mapped port must go
        raise LabError("the port-mapping gateway needs 'conntrack' (conntrack-tools)")
    state_dir = Path(tempfile.mkdtemp(prefix=f"natlab-portmap-{nat.name}-"))
    lab.add_cleanup(lambda: shutil.rmtree(state_dir, ignore_errors=True))
    state_file = state_dir / "mappings.json"
    # A real gateway has a CPU of its own: here it shares a busy machine with the suite, and
    # `connect` gives it 1 s to answer (its nft and conntrack calls included), so it runs
    # ahead of everything else (a negative nice value; root, as the whole lab).
    argv = ["nice", "-n", str(GATEWAY_NICE), sys.executable, "-m", "tests.natlab.portmap_gateway",
            "--lan-ip", nat.gateway, "--wan-ip", nat.wan_ip, "--protocols", ",".join(protocols),
            "--http-port", str(http_port), "--state-file", str(state_file),
            "--min-lifetime", str(min_lifetime), "--max-lifetime", str(max_lifetime)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    service = lab.start_service(nat, argv, ready='"event": "ready"', timeout=timeout, env=env,
                                cwd=REPO)
    return PortmapGateway(lab, nat, service, protocols, state_file, http_port)
