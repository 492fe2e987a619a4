"""Port-mapping clients for PCP and NAT-PMP as pure state machines, and address classes.

The aioquic shape: the gateway's datagrams and the time come in, requests for the
gateway and typed events go out::

    mapper = PcpMapper(client_ip, internal_port, nonce, seed, now)   # the MAP is queued
    mapper.receive_datagram(data, now)   # what came from gateway:5351 (the shell checks the source)
    mapper.handle_timer(now)             # when get_timer() says
    mapper.datagrams_to_send(now)        # -> [bytes], all for gateway:5351
    mapper.next_event()                  # -> MappingGranted | MappingFailed | MappingDeleted | ...
    mapper.delete(now)                   # lifetime 0; MappingDeleted follows

Timers: the first request retransmits from 250 ms, doubling, within ``timeout`` (the RFCs
allow far longer -- PCP retransmits forever from 3 s, NAT-PMP for 64 s -- but a user waits
on it); a renewal goes at a random point between 1/2 and 5/8 of the granted lifetime
(RFC 6887 section 11.2.1) and retransmits (from 1 s, doubling, at most 60 s apart) until
the mapping expires; a delete retransmits within ``delete_timeout``. A server epoch that
went backwards (a rebooted gateway, RFC 6887 section 8.5 / RFC 6886 section 3.6) or an
ANNOUNCE showing one makes the mapper ask again at once.

Randomness (the renewal point) comes from ``seed`` through SHA-256 with a counter.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Optional, Union

from nattool.errors import PortmapProtocolError
from nattool.protocol import natpmp, pcp
from nattool.protocol.endpoint import Endpoint, IPAddress

FIRST_WAIT = 0.25  # s before the first retransmission (RFC 6886's initial interval)
RENEW_FIRST_WAIT = 1.0
MAX_WAIT = 60.0  # s between renewal retransmissions at most
DEFAULT_TIMEOUT = 1.0  # s for the first answer, retransmissions included
DEFAULT_DELETE_TIMEOUT = 1.0
DEFAULT_LIFETIME = 7200
RENEW_FROM, RENEW_TO = 0.5, 0.625  # of the lifetime: when a renewal goes


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class MappingGranted:
    protocol: str  # "pcp" | "natpmp" | "upnp"
    internal_port: int
    external: Endpoint  # what peers send to
    lifetime: int  # s granted
    renewal: bool = False  # False for the first grant (and after a gateway reboot)


@dataclass(frozen=True, slots=True)
class MappingFailed:
    protocol: str
    code: Optional[int]  # the gateway's result code; None: no answer in time
    reason: str
    lost: bool = False  # True: a mapping we held is gone (renewal refused or unanswered)
    unsupported: bool = False  # the gateway does not speak this protocol (try another)


@dataclass(frozen=True, slots=True)
class MappingDeleted:
    protocol: str
    internal_port: int
    confirmed: bool  # the gateway answered the delete (else: no answer in time)


@dataclass(frozen=True, slots=True)
class ExternalAddress:
    """The gateway's external address (NAT-PMP's address request, no mapping)."""

    protocol: str
    address: IPAddress
    epoch: int


PortmapEvent = Union[MappingGranted, MappingFailed, MappingDeleted, ExternalAddress]


class MapperState(str, Enum):
    MAPPING = "mapping"
    MAPPED = "mapped"
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"


# --------------------------------------------------------------------------- schedule


def retransmit_waits(first: float, total: float, cap: float = MAX_WAIT) -> list[float]:
    """Waits after each send: from ``first``, doubling up to ``cap``, the last cut to end at ``total``."""
    waits: list[float] = []
    spent, wait = 0.0, first
    while spent < total - 1e-9:
        step = min(wait, cap, total - spent)
        waits.append(step)
        spent += step
        wait *= 2
    return waits or [total]


@dataclass
class _Exchange:
    kind: str  # "map" | "address" | "delete"
    payload: bytes
    waits: list[float]
    next_send: float
    attempt: int = 0

    def exhausted(self) -> bool:
        return self.attempt >= len(self.waits)


class _Mapper:
    """What PCP and NAT-PMP mapping share: exchanges, renewal, epoch, events."""

    protocol = ""

    def __init__(self, internal_port: int, seed: bytes, now: float, *, lifetime: int, timeout: float,
                 delete_timeout: float) -> None:
        if not 0 <= internal_port <= 0xFFFF:
            raise PortmapProtocolError(f"internal port {internal_port} out of range")
        if not 1 <= lifetime <= 0xFFFFFFFF:
            raise PortmapProtocolError(f"lifetime {lifetime} out of range")
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.timeout = timeout
        self.delete_timeout = delete_timeout
        self.state = MapperState.MAPPING
        self.external: Optional[Endpoint] = None
        self.granted_lifetime = 0
        self.expires_at: Optional[float] = None
        self.renew_at: Optional[float] = None
        self.counters = {"junk": 0, "stale": 0, "epoch_resets": 0}
        self._seed = bytes(seed)
        self._draws = 0
        self._epoch: Optional[tuple[int, float]] = None  # (server epoch, our time) last seen
        self._exchanges: dict[str, _Exchange] = {}
        self._out: list[bytes] = []
        self._events: deque[PortmapEvent] = deque()
        self._renewing = False
        self._unanswered = False  # the first request timed out: it may have been granted unseen
        self._may_map = True  # False for a mapper that only asks for the external address

    # -- the sans-I/O interface --------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[bytes]:
        self._send_due(now)
        out, self._out = self._out, []
        return out

    def get_timer(self) -> Optional[float]:
        times = [x.next_send for x in self._exchanges.values()]
        if self.state == MapperState.MAPPED and self.renew_at is not None and "map" not in self._exchanges:
            times.append(self.renew_at)
        if self.state == MapperState.MAPPED and self.expires_at is not None:
            times.append(self.expires_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for kind, exchange in list(self._exchanges.items()):
            if self._exchanges.get(kind) is exchange and exchange.exhausted() and now >= exchange.next_send:
                del self._exchanges[kind]  # (a timeout may have ended the other exchanges too)
                self._on_timeout(kind, now)
        if self.state == MapperState.MAPPED:
            if self.expires_at is not None and now >= self.expires_at:
                self._lose(None, "the mapping expired before a renewal was answered")
            elif self.renew_at is not None and now >= self.renew_at and "map" not in self._exchanges:
                self._renew(now)
        self._send_due(now)

    def next_event(self) -> Optional[PortmapEvent]:
        return self._events.popleft() if self._events else None

    def receive_datagram(self, data: bytes, now: float) -> None:
        if self.state in (MapperState.DELETED, MapperState.FAILED):
            self.counters["junk"] += 1
            return
        try:
            self._on_datagram(bytes(data), now)
        except PortmapProtocolError:
            self.counters["junk"] += 1

    def delete(self, now: float) -> None:
        """Remove the mapping (lifetime 0). A mapper that holds none ends at once.

        Also after the first request went unanswered: the gateway may have granted it
        and lost the answer, so a delete goes (a gateway with nothing to delete says so).
        """
        if self.state in (MapperState.DELETING, MapperState.DELETED):
            return
        if self.state == MapperState.FAILED and not self._unanswered:
            return
        had_mapping = self.state == MapperState.MAPPED or "map" in self._exchanges or self._unanswered
        self._exchanges.clear()
        if not had_mapping:
            self.state = MapperState.DELETED
            self._events.append(MappingDeleted(self.protocol, self.internal_port, True))
            return
        self.state = MapperState.DELETING
        self._start("delete", self._delete_request(), now, retransmit_waits(FIRST_WAIT, self.delete_timeout))

    # -- for subclasses ------------------------------------------------------------------

    def _start(self, kind: str, payload: bytes, now: float, waits: list[float]) -> None:
        self._exchanges[kind] = _Exchange(kind, payload, waits, now)

    def _send_due(self, now: float) -> None:
        for exchange in self._exchanges.values():
            if not exchange.exhausted() and now >= exchange.next_send:
                self._out.append(exchange.payload)
                exchange.next_send = now + exchange.waits[exchange.attempt]
                exchange.attempt += 1

    def _map_waits(self, now: float) -> list[float]:
        if self.state == MapperState.MAPPED and self.expires_at is not None:
            return retransmit_waits(RENEW_FIRST_WAIT, max(self.expires_at - now, 0.001))
        return retransmit_waits(FIRST_WAIT, self.timeout)

    def _renew(self, now: float) -> None:
        self._renewing = True
        self._send_map(now)

    def _send_map(self, now: float) -> None:
        raise NotImplementedError

    def _delete_request(self) -> bytes:
        raise NotImplementedError

    def _on_datagram(self, data: bytes, now: float) -> None:
        raise NotImplementedError

    def _on_timeout(self, kind: str, now: float) -> None:
        if kind == "delete":
            self.state = MapperState.DELETED
            self._events.append(MappingDeleted(self.protocol, self.internal_port, False))
        elif self.state == MapperState.MAPPING:
            self._fail(None, f"no {self._label()} answer from the gateway")
        # A renewal that runs out is handled by the expiry.

    def _granted(self, external: Endpoint, lifetime: int, now: float) -> None:
        if lifetime == 0:
            # Granted for 0 s: nothing to keep (some gateways answer so when out of ports).
            self._fail(0, "the gateway granted a lifetime of 0 s")
            return
        renewal = self._renewing and self.external is not None
        self._renewing = False
        self.state = MapperState.MAPPED
        self.external = external
        self.granted_lifetime = lifetime
        self.expires_at = now + lifetime
        self.renew_at = now + lifetime * (RENEW_FROM + (RENEW_TO - RENEW_FROM) * self._draw())
        self._events.append(MappingGranted(self.protocol, self.internal_port, external, lifetime, renewal))

    def _refused(self, code: int, reason: str, *, unsupported: bool = False) -> None:
        if self.state == MapperState.MAPPED:
            self._lose(code, reason)
        else:
            self._fail(code, reason, unsupported=unsupported)

    def _fail(self, code: Optional[int], reason: str, *, unsupported: bool = False) -> None:
        self._unanswered = code is None and self._may_map
        self.state = MapperState.FAILED
        self._exchanges.clear()
        self._events.append(MappingFailed(self.protocol, code, reason, unsupported=unsupported))

    def _lose(self, code: Optional[int], reason: str) -> None:
        self.state = MapperState.FAILED
        self._exchanges.clear()
        self.external = None
        self._events.append(MappingFailed(self.protocol, code, reason, lost=True))

    def _deleted(self) -> None:
        self.state = MapperState.DELETED
        self._exchanges.clear()
        self._events.append(MappingDeleted(self.protocol, self.internal_port, True))

    def _epoch_reset(self, epoch: int, now: float) -> bool:
        """Whether the server's epoch shows it lost its state since we last heard it."""
        previous = self._epoch
        self._epoch = (epoch, now)
        if previous is None:
            return False
        prev_epoch, prev_now = previous
        elapsed = max(now - prev_now, 0.0)
        # RFC 6887 section 8.5: allow the clocks to drift 1/16 and 2 s of slack.
        if epoch + 2 + elapsed / 16 < prev_epoch + elapsed:
            self.counters["epoch_resets"] += 1
            return True
        return False

    def _remap_after_reset(self, now: float) -> None:
        if self.state == MapperState.MAPPED and "map" not in self._exchanges:
            self._renewing = False  # a fresh grant, not a renewal: the gateway forgot us
            self._send_map(now)

    def _draw(self) -> float:
        self._draws += 1
        digest = hashlib.sha256(self._seed + self._draws.to_bytes(8, "big")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def _label(self) -> str:
        return {"pcp": "PCP", "natpmp": "NAT-PMP"}.get(self.protocol, self.protocol)


# --------------------------------------------------------------------------- PCP


class PcpMapper(_Mapper):
    """One PCP MAP of ``internal_port`` (UDP by default) at the gateway.

    ``client_address`` is our address as the gateway sees it (the source address of
    our requests); ``nonce`` is 12 random bytes, the same for the whole life of the
    mapping (renewals and the delete carry it).
    """

    protocol = "pcp"

    def __init__(self, client_address: IPAddress, internal_port: int, nonce: bytes, seed: bytes, now: float, *,
                 lifetime: int = DEFAULT_LIFETIME, transport: int = pcp.PROTO_UDP, suggested_port: int = 0,
                 timeout: float = DEFAULT_TIMEOUT, delete_timeout: float = DEFAULT_DELETE_TIMEOUT) -> None:
        super().__init__(internal_port, seed, now, lifetime=lifetime, timeout=timeout, delete_timeout=delete_timeout)
        if len(nonce) != pcp.NONCE_LEN:
            raise PortmapProtocolError("PCP nonce must be 12 bytes")
        self.client_address = client_address
        self.nonce = bytes(nonce)
        self.transport = transport
        self.suggested_port = suggested_port
        self._send_map(now)

    def _request(self, lifetime: int) -> bytes:
        suggested_port, suggested_address = self.suggested_port, None
        if self.external is not None:  # a renewal asks for what it has
            suggested_port, suggested_address = self.external.port, self.external.ip
        return pcp.map_request(self.client_address, self.nonce, self.internal_port, lifetime,
                               protocol=self.transport, suggested_port=suggested_port,
                               suggested_address=suggested_address).to_wire()

    def _send_map(self, now: float) -> None:
        self._start("map", self._request(self.lifetime), now, self._map_waits(now))

    def _delete_request(self) -> bytes:
        return self._request(0)

    def _on_datagram(self, data: bytes, now: float) -> None:
        if natpmp.is_natpmp_response(data):
            reply = natpmp.parse_response(data)
            asking = "map" in self._exchanges and self.state == MapperState.MAPPING
            if reply.result == natpmp.ResultCode.UNSUPPORTED_VERSION and asking:
                self._fail(pcp.ResultCode.UNSUPP_VERSION, "the gateway speaks NAT-PMP, not PCP", unsupported=True)
            else:
                self.counters["junk"] += 1
            return
        response = pcp.parse_response(data)
        if response.opcode == pcp.Opcode.ANNOUNCE:
            if response.result == pcp.ResultCode.SUCCESS and self._epoch_reset(response.epoch, now):
                self._remap_after_reset(now)
            return
        if response.opcode != pcp.Opcode.MAP:
            self.counters["junk"] += 1
            return
        if response.result == pcp.ResultCode.UNSUPP_VERSION and self.state == MapperState.MAPPING:
            self._fail(response.result, f"the gateway speaks PCP version {response.version}, not 2", unsupported=True)
            return
        m = response.map
        if m is None or m.nonce != self.nonce or m.internal_port != self.internal_port or m.protocol != self.transport:
            self.counters["stale"] += 1  # not about this mapping (or an error that did not copy it)
            return
        if self.state == MapperState.DELETING:
            if "delete" in self._exchanges and response.lifetime == 0:
                self._deleted()
            return
        if "map" not in self._exchanges:
            self.counters["stale"] += 1  # a late duplicate
            if self._epoch_reset(response.epoch, now):
                self._remap_after_reset(now)
            return
        if response.result != pcp.ResultCode.SUCCESS:
            del self._exchanges["map"]
            self._refused(response.result, f"PCP {pcp.result_name(response.result)}",
                          unsupported=response.result in (pcp.ResultCode.UNSUPP_OPCODE, pcp.ResultCode.UNSUPP_VERSION))
            return
        del self._exchanges["map"]
        if self._epoch_reset(response.epoch, now):
            self._renewing = False  # a fresh grant: the gateway forgot us
        self._granted(Endpoint(m.external_address, m.external_port), response.lifetime, now)


# --------------------------------------------------------------------------- NAT-PMP


class NatpmpMapper(_Mapper):
    """One NAT-PMP mapping of ``internal_port``: the external address request and the map
    request go together; the grant comes when both are answered.

    ``internal_port=None``: only ask for the external address (an :class:`ExternalAddress`
    event, then DELETED, nothing mapped).
    """

    protocol = "natpmp"

    def __init__(self, internal_port: Optional[int], seed: bytes, now: float, *, lifetime: int = DEFAULT_LIFETIME,
                 tcp: bool = False, suggested_port: int = 0, timeout: float = DEFAULT_TIMEOUT,
                 delete_timeout: float = DEFAULT_DELETE_TIMEOUT) -> None:
        super().__init__(internal_port or 0, seed, now, lifetime=lifetime, timeout=timeout,
                         delete_timeout=delete_timeout)
        self.address_only = internal_port is None
        self._may_map = not self.address_only
        self.opcode = natpmp.OP_MAP_TCP if tcp else natpmp.OP_MAP_UDP
        self.suggested_port = suggested_port
        self.external_address: Optional[ipaddress.IPv4Address] = None
        self._mapped_port: Optional[tuple[int, int]] = None  # (external port, lifetime) waiting for the address
        self._send_map(now)

    def _send_map(self, now: float) -> None:
        waits = self._map_waits(now)
        self.external_address = None if self.state != MapperState.MAPPED else self.external_address
        self._start("address", natpmp.ExternalAddressRequest().to_wire(), now, list(waits))
        if not self.address_only:
            suggested = self.external.port if self.external is not None else self.suggested_port
            self._mapped_port = None
            self._start("map", natpmp.MapRequest(self.opcode, self.internal_port, suggested, self.lifetime).to_wire(),
                        now, list(waits))

    def _delete_request(self) -> bytes:
        return natpmp.MapRequest(self.opcode, self.internal_port, 0, 0).to_wire()

    def _on_timeout(self, kind: str, now: float) -> None:
        if kind in ("address", "map") and self.state == MapperState.MAPPING:
            self._fail(None, "no NAT-PMP answer from the gateway")
            return
        super()._on_timeout(kind, now)

    def _on_datagram(self, data: bytes, now: float) -> None:
        reply = natpmp.parse_response(data)
        if isinstance(reply, natpmp.ErrorResponse):
            if self.state == MapperState.MAPPING and reply.result == natpmp.ResultCode.UNSUPPORTED_VERSION:
                self._fail(reply.result, "the gateway does not speak NAT-PMP version 0", unsupported=True)
            elif self.state in (MapperState.MAPPING, MapperState.MAPPED) and self._exchanges:
                self._exchanges.clear()
                self._refused(reply.result, f"NAT-PMP {natpmp.result_name(reply.result)}",
                              unsupported=reply.result == natpmp.ResultCode.UNSUPPORTED_OPCODE)
            else:
                self.counters["junk"] += 1
            return
        if self._epoch_reset(reply.epoch, now) and self.state == MapperState.MAPPED:
            if not self._exchanges:
                self._remap_after_reset(now)
                return
            self._renewing = False  # this answer is a fresh grant: the gateway forgot us
        if isinstance(reply, natpmp.ExternalAddressResponse):
            self._on_address(reply, now)
        else:
            self._on_map(reply, now)

    def _answer_usable(self, kind: str, result: int) -> bool:
        """Close the ``kind`` exchange with this answer; a refusal ends the other one too."""
        if kind not in self._exchanges:
            self.counters["stale"] += 1  # a late duplicate
            return False
        del self._exchanges[kind]
        if result != natpmp.ResultCode.SUCCESS:
            self._exchanges.clear()
            self._refused(result, f"NAT-PMP {natpmp.result_name(result)}")
            return False
        return True

    def _on_address(self, reply: natpmp.ExternalAddressResponse, now: float) -> None:
        if not self._answer_usable("address", reply.result):
            return
        self.external_address = reply.address
        if self.address_only:
            self.state = MapperState.DELETED
            self._events.append(ExternalAddress(self.protocol, reply.address, reply.epoch))
            return
        self._maybe_granted(now)

    def _on_map(self, reply: natpmp.MapResponse, now: float) -> None:
        if reply.opcode != self.opcode or reply.internal_port != self.internal_port:
            self.counters["stale"] += 1
            return
        if self.state == MapperState.DELETING:
            if "delete" in self._exchanges and reply.lifetime == 0:
                self._deleted()
            return
        if not self._answer_usable("map", reply.result):
            return
        self._mapped_port = (reply.external_port, reply.lifetime)
        self._maybe_granted(now)

    def _maybe_granted(self, now: float) -> None:
        if self.external_address is None or self._mapped_port is None or self._exchanges:
            return
        port, lifetime = self._mapped_port
        self._mapped_port = None
        self._granted(Endpoint(self.external_address, port), lifetime, now)


# --------------------------------------------------------------------------- address classes

_CLASSES_V4 = (
    ("unspecified", "0.0.0.0/8"),
    ("loopback", "127.0.0.0/8"),
    ("private", "10.0.0.0/8"),
    ("private", "172.16.0.0/12"),
    ("private", "192.168.0.0/16"),
    ("cgnat", "100.64.0.0/10"),
    ("link-local", "169.254.0.0/16"),
    ("documentation", "192.0.2.0/24"),
    ("documentation", "198.51.100.0/24"),
    ("documentation", "203.0.113.0/24"),
    ("reserved", "192.0.0.0/24"),
    ("reserved", "198.18.0.0/15"),
    ("multicast", "224.0.0.0/4"),
    ("reserved", "240.0.0.0/4"),
)
_CLASSES_V6 = (
    ("unspecified", "::/128"),
    ("loopback", "::1/128"),
    ("private", "fc00::/7"),
    ("link-local", "fe80::/10"),
    ("documentation", "2001:db8::/32"),
    ("multicast", "ff00::/8"),
)
_NETWORKS = tuple((name, ipaddress.ip_network(net)) for name, net in _CLASSES_V4 + _CLASSES_V6)

# Classes that mean "this address is itself behind another NAT" when a gateway reports it
# as its external address.
NAT_BEHIND_CLASSES = frozenset({"private", "cgnat"})


def address_class(ip: Union[IPAddress, str]) -> str:
    """``public``, ``private`` (RFC 1918, IPv6 ULA), ``cgnat`` (100.64.0.0/10), ``link-local``,
    ``loopback``, ``unspecified``, ``documentation`` (RFC 5737 / 3849), ``multicast`` or
    ``reserved``. Documentation ranges are their own class, not "private" as
    :mod:`ipaddress` has it: the lab's "internet" lives there.
    """
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for name, network in _NETWORKS:
        if address.version == network.version and address in network:
            return name
    return "public"


def behind_another_nat(ip: Union[IPAddress, str]) -> bool:
    """Whether a gateway's external address shows carrier-grade NAT or a double NAT."""
    return address_class(ip) in NAT_BEHIND_CLASSES


__all__ = [
    "DEFAULT_LIFETIME", "DEFAULT_TIMEOUT", "ExternalAddress", "MapperState", "MappingDeleted",
    "MappingFailed", "MappingGranted", "NAT_BEHIND_CLASSES", "NatpmpMapper", "PcpMapper", "PortmapEvent",
    "address_class", "behind_another_nat", "retransmit_waits",
]
