"""Facts about this host that registration publishes: LAN addresses, a stable id."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import uuid
from pathlib import Path
from typing import Sequence

from nattool.protocol.endpoint import Endpoint


def local_address_towards(dest: Endpoint) -> str | None:
    """The local address the kernel would use to reach ``dest``. A connected UDP
    socket sends nothing: this only asks the routing table."""
    family = socket.AF_INET6 if dest.ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(dest.sockaddr())
            return str(sock.getsockname()[0]).split("%", 1)[0]
        except OSError:
            return None


def lan_addresses(trackers: Sequence[Endpoint]) -> tuple[str, ...]:
    """Addresses peers on the same LAN can reach us at: the source address toward
    each tracker, skipping loopback unless the tracker itself is on loopback."""
    out: list[str] = []
    for tracker in trackers:
        addr = local_address_towards(tracker)
        if addr is None:
            continue
        ip = ipaddress.ip_address(addr)
        if ip.is_unspecified or (ip.is_loopback and not tracker.ip.is_loopback) or ip.is_link_local:
            continue
        if addr not in out:
            out.append(addr)
    return tuple(out[:16])


def stable_node_id() -> str:
    """A MAC-shaped identity that stays the same across runs of this host.

    uuid.getnode() returns a random number (multicast bit set) when it finds no
    hardware address; then we derive a locally administered one from the machine id.
    """
    node = uuid.getnode()
    if node >> 40 & 0x01:
        seed = b""
        for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
            try:
                seed = Path(path).read_bytes().strip()
                break
            except OSError:
                continue
        if not seed:
            seed = socket.gethostname().encode()
        digest = hashlib.sha256(b"nattool-node-id" + seed).digest()
        node = int.from_bytes(digest[:6], "big")
        node = (node | 0x020000000000) & ~0x010000000000  # locally administered, unicast
    return ":".join(f"{(node >> s) & 0xFF:02x}" for s in range(40, -8, -8))
