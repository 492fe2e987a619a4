"""The port-mapping gateway's mapping table and the nftables rules behind each mapping.

Runs inside a lab router namespace (as part of ``portmap_gateway``). Each mapping is two
rules in the gateway's own ``table inet portmap``:

- prerouting, priority dstnat - 10: ``wan:E -> host:P`` (DNAT), before the lab's EIF DNAT;
- postrouting, priority srcnat - 10: ``host:P -> wan:E`` (SNAT), before the lab's masquerade,
  so that everything the host sends from P leaves as wan:E whatever the destination, which is
  what a PCP/NAT-PMP mapping promises (even behind ``masquerade random``).

Only the first NAT rule that matches a new conntrack applies, so the earlier priorities win.
Conntrack entries of host:P are deleted when a mapping is installed (an older flow from P
would otherwise keep its masquerade port) and when it goes (so nothing keeps using it).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TABLE = "portmap"
_HANDLE_RE = re.compile(r"# handle (\d+)")
PROTOCOLS = ("udp", "tcp")
PORT_RANGE = (1024, 65535)  # for a port the gateway picks itself


class MappingConflict(Exception):
    """The external port is held by another client's mapping."""


@dataclass
class Mapping:
    via: str  # "pcp" | "natpmp" | "upnp": who asked
    proto: str  # "udp" | "tcp"
    internal_ip: str
    internal_port: int
    external_port: int
    lifetime: int  # s granted; 0 = no expiry (a UPnP lease of 0)
    expires_at: float  # time.monotonic(); 0 = never
    nonce: bytes = b""  # PCP: the MAP nonce that owns the mapping
    description: str = ""
    handles: tuple[int, ...] = field(default=(), repr=False)

    def as_dict(self, wan_ip: str, now: float) -> dict[str, object]:
        left = max(0.0, self.expires_at - now) if self.expires_at else 0.0
        return {
            "via": self.via, "proto": self.proto,
            "internal": f"{self.internal_ip}:{self.internal_port}",
            "external": f"{wan_ip}:{self.external_port}",
            "lifetime": self.lifetime,
            "expires_at": round(time.time() + left, 3) if self.expires_at else 0,
            "description": self.description,
        }


class NftRules:
    """Installs and removes the two rules of a mapping; owns ``table inet portmap``."""

    def __init__(self, wan_ip: str, wan_if: str) -> None:
        self.wan_ip = wan_ip
        self.wan_if = wan_if

    def _nft(self, script: str, *, echo: bool = False) -> str:
        argv = ["nft", "--echo", "--handle", "-f", "-"] if echo else ["nft", "-f", "-"]
        proc = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            raise RuntimeError(f"nft failed: {proc.stderr.strip()}\n{script}")
        return proc.stdout

    def create_table(self) -> None:
        # "add" then "delete" clears a leftover table of the same name in one transaction.
        self._nft(
            f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n"
            "  chain pre {\n"
            "    type nat hook prerouting priority dstnat - 10; policy accept;\n"
            "  }\n"
            "  chain post {\n"
            "    type nat hook postrouting priority srcnat - 10; policy accept;\n"
            "  }\n"
            "}\n")

    def delete_table(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True,
                       text=True, timeout=10)

    def install(self, m: Mapping) -> tuple[int, ...]:
        comment = f'comment "{m.via} {m.proto} {m.internal_ip}:{m.internal_port}"'
        out = self._nft(
            f'add rule inet {TABLE} pre iifname "{self.wan_if}" ip daddr {self.wan_ip} '
            f"{m.proto} dport {m.external_port} "
            f"dnat ip to {m.internal_ip}:{m.internal_port} {comment}\n"
            f'add rule inet {TABLE} post oifname "{self.wan_if}" ip saddr {m.internal_ip} '
            f"{m.proto} sport {m.internal_port} "
            f"snat ip to {self.wan_ip}:{m.external_port} {comment}\n", echo=True)
        handles = tuple(int(h) for h in _HANDLE_RE.findall(out))
        if len(handles) != 2:
            raise RuntimeError(f"nft did not echo two rule handles: {out!r}")
        self.forget_flows(m)
        return handles

    def remove(self, m: Mapping) -> None:
        if len(m.handles) == 2:
            self._nft(f"delete rule inet {TABLE} pre handle {m.handles[0]}\n"
                      f"delete rule inet {TABLE} post handle {m.handles[1]}\n")
        self.forget_flows(m)

    def forget_flows(self, m: Mapping) -> None:
        """Delete conntrack entries of host:P, the ones it started and the ones that came
        in through a DNAT to it (exit 1 = there were none: fine)."""
        for direction in ("orig", "reply"):
            subprocess.run(["conntrack", "-D", "-p", m.proto, f"--{direction}-src",
                            m.internal_ip, f"--{direction}-port-src", str(m.internal_port)],
                           capture_output=True, text=True, timeout=10)


class MappingTable:
    """All mappings of the gateway, whatever protocol asked; one per (proto, host, port)."""

    def __init__(self, rules: NftRules, emit: Callable[[dict[str, object]], None], *,
                 state_file: Path | None = None, seed: int | None = None) -> None:
        self.rules = rules
        self.emit = emit
        self.state_file = state_file
        self._by_internal: dict[tuple[str, str, int], Mapping] = {}
        self._random = random.Random(seed)

    @property
    def wan_ip(self) -> str:
        return self.rules.wan_ip

    def all(self) -> list[Mapping]:
        return sorted(self._by_internal.values(), key=lambda m: (m.proto, m.external_port))

    def find(self, proto: str, ip: str, port: int) -> Mapping | None:
        return self._by_internal.get((proto, ip, port))

    def by_external(self, proto: str, port: int) -> Mapping | None:
        for m in self._by_internal.values():
            if m.proto == proto and m.external_port == port:
                return m
        return None

    def _free_port(self, proto: str, *wishes: int) -> int:
        for port in wishes:
            if port and self.by_external(proto, port) is None:
                return port
        while True:
            port = self._random.randint(*PORT_RANGE)
            if self.by_external(proto, port) is None:
                return port

    def grant(self, via: str, proto: str, ip: str, port: int, suggested: int, lifetime: int,
              now: float, *, nonce: bytes = b"", description: str = "",
              exact: bool = False) -> Mapping:
        """Create or renew the mapping of ip:port. A renewal keeps its external port.

        ``exact`` (UPnP): the external port must be ``suggested`` or MappingConflict.
        """
        old = self.find(proto, ip, port)
        holder = self.by_external(proto, suggested) if suggested else None
        if exact and holder is not None and holder is not old:
            raise MappingConflict(f"{proto} {suggested} is mapped to {holder.internal_ip}")
        if old is not None and (not exact or old.external_port == suggested):
            old.lifetime = lifetime
            old.expires_at = now + lifetime if lifetime else 0.0
            old.nonce = nonce or old.nonce
            old.via, old.description = via, description or old.description
            self._event("grant", old, renewal=True)
            self.save(now)
            return old
        if old is not None:  # UPnP moved the mapping to another external port
            self.remove(old, "request", now)
        external = suggested if exact else self._free_port(proto, suggested, port)
        m = Mapping(via, proto, ip, port, external, lifetime,
                    now + lifetime if lifetime else 0.0, nonce, description)
        m.handles = self.rules.install(m)
        self._by_internal[(proto, ip, port)] = m
        self._event("grant", m, renewal=False)
        self.save(now)
        return m

    def remove(self, m: Mapping, reason: str, now: float) -> None:
        if self._by_internal.get((m.proto, m.internal_ip, m.internal_port)) is not m:
            return
        del self._by_internal[(m.proto, m.internal_ip, m.internal_port)]
        self.rules.remove(m)
        self._event("delete", m, reason=reason)
        self.save(now)

    def expire(self, now: float) -> None:
        for m in [m for m in self._by_internal.values() if m.expires_at and m.expires_at <= now]:
            self.remove(m, "expired", now)

    def close(self, now: float) -> None:
        for m in self.all():
            self.remove(m, "exit", now)

    def _event(self, kind: str, m: Mapping, **extra: object) -> None:
        event: dict[str, object] = {"event": kind, "via": m.via, "proto": m.proto,
                                    "internal": f"{m.internal_ip}:{m.internal_port}",
                                    "external": f"{self.wan_ip}:{m.external_port}"}
        if kind == "grant":
            event["lifetime"] = m.lifetime
        event.update(extra)
        self.emit(event)

    def save(self, now: float) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps([m.as_dict(self.wan_ip, now) for m in self.all()]))
        os.replace(tmp, self.state_file)
