"""The default IPv4 gateway, read from the kernel's routing table (/proc/net/route).

One reader for everything that needs the gateway: the port mapper asks it for
mappings, the lifetime cache keys measurements by it (a mapping lifetime belongs to
the router that keeps the mapping). /proc/net/route is per network namespace, so a
process started in a lab namespace sees that namespace's routes.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from pathlib import Path

ROUTE_TABLE = Path("/proc/net/route")

_RTF_UP = 0x0001
_RTF_GATEWAY = 0x0002


@dataclass(frozen=True, slots=True)
class DefaultGateway:
    ip: ipaddress.IPv4Address
    interface: str


def _hex_to_ipv4(field: str) -> ipaddress.IPv4Address:
    # The kernel prints the address as the hex of a host-order (little-endian here)
    # 32-bit word: "0102000A" is 10.0.2.1.
    return ipaddress.IPv4Address(struct.pack("<I", int(field, 16)))


def parse_route_table(text: str) -> DefaultGateway | None:
    """The default route's gateway from the text of /proc/net/route, or None when
    there is no default route through a gateway. With several, the lowest metric wins
    (as the kernel picks)."""
    best: tuple[int, DefaultGateway] | None = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            iface = fields[0]
            destination = int(fields[1], 16)
            flags = int(fields[3], 16)
            metric = int(fields[6])
            mask = int(fields[7], 16)
            gateway = _hex_to_ipv4(fields[2])
        except (ValueError, struct.error):
            continue
        if destination != 0 or mask != 0:
            continue
        if flags & (_RTF_UP | _RTF_GATEWAY) != (_RTF_UP | _RTF_GATEWAY) or gateway.packed == bytes(4):
            continue
        if best is None or metric < best[0]:
            best = (metric, DefaultGateway(ip=gateway, interface=iface))
    return best[1] if best else None


def default_gateway(route_table: Path = ROUTE_TABLE) -> DefaultGateway | None:
    """This namespace's default IPv4 gateway; None when there is none or the table
    cannot be read (not Linux, no /proc)."""
    try:
        text = route_table.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return parse_route_table(text)
