"""A TURN server for pure tests: the project's own TurnCore (nattool.protocol.turn_server)
with its relayed sockets simulated in memory, so that TURN clients and `connect`
sessions can be driven through a real server state machine with a fake clock.

``deliver(data, client, now)`` is what a client sends to the server; it returns what
the server sends back, as (destination client endpoint, bytes) pairs: the replies, and
the Data indications of peers relayed by the same server (two allocations reach each
other, as the real shell's sockets do through the kernel).
"""

from __future__ import annotations

from typing import Optional

from nattool.protocol.endpoint import Endpoint
from nattool.protocol.turn_server import AllocationWanted, ClientRef, Deallocated, ToPeer, TurnConfig, TurnCore

WALL = 1_800_000_000.0  # unix time of the fake clock's 0


class RelayWorld:
    def __init__(self, server: Endpoint, *, users: Optional[dict[str, str]] = None, relay_groups: bool = False,
                 relay_ip: str = "203.0.113.10", stream: bool = False) -> None:
        self.server = server
        self.core = TurnCore(TurnConfig(users=users or {}, relay_groups=relay_groups), b"relay-world-secret-bytes")
        self.relay_ip = relay_ip
        self.transport = "tcp" if stream else "udp"
        self.next_port = 50000
        self.sockets: dict[Endpoint, int] = {}  # relayed endpoint -> allocation id
        self.outside: list[tuple[Endpoint, Endpoint, bytes]] = []  # (from relayed, to peer, payload) off-server
        self.dropped = 0  # client messages the core took without an answer

    def ref(self, client: Endpoint) -> ClientRef:
        return ClientRef(self.transport, client, self.server)

    def deliver(self, data: bytes, client: Endpoint, now: float) -> list[tuple[Endpoint, bytes]]:
        out = self.core.on_client_message(data, self.ref(client), now, WALL + now)
        if isinstance(out, bytes):
            return [(client, out)]
        if isinstance(out, AllocationWanted):
            relayed = Endpoint.from_text(f"{self.relay_ip}:{self.next_port}")
            self.next_port += 1
            self.sockets[relayed] = out.allocation_id
            reply = self.core.allocation_made(out, relayed, now, WALL + now)
            return [(client, reply)] if reply is not None else []
        if isinstance(out, ToPeer):
            return self.from_relayed(out, now)
        if isinstance(out, Deallocated):
            for ep, aid in list(self.sockets.items()):
                if aid == out.allocation_id:
                    del self.sockets[ep]
            return [(client, out.reply)]
        self.dropped += 1
        return []

    def from_relayed(self, send: ToPeer, now: float) -> list[tuple[Endpoint, bytes]]:
        source = self.core.relayed_of(send.allocation_id)
        assert source is not None
        target = self.sockets.get(send.peer)
        if target is None:
            self.outside.append((source, send.peer, send.payload))
            return []
        data = self.core.on_peer_datagram(target, send.payload, source, now)
        client = self.core.client_of(target)
        return [(client.client, data)] if data is not None and client is not None else []

    def grant(self, group: str, now: float):  # type: ignore[no-untyped-def]
        return self.core.group_grant(group, now, WALL + now)
