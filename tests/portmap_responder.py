"""A small port-mapping gateway on loopback for the shell's tests: PCP and NAT-PMP on one
UDP port, UPnP IGD (SSDP by unicast, HTTP description and SOAP control), all answered
with the server side of nattool's own codecs. It maps nothing in any kernel: it keeps a
table and the requests it saw. (The NAT lab's gateway, tests/natlab/portmap_gateway.py,
is the real one, checked against natpmpc and upnpc.)"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import Optional

from nattool.errors import PortmapProtocolError
from nattool.protocol import natpmp, pcp, upnp_igd

WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"


@dataclass
class Seen:
    protocol: str  # "pcp" | "natpmp" | "upnp"
    internal_port: int
    lifetime: int  # 0: a delete


@dataclass
class Gateway:
    """Which protocols answer, and how."""

    protocols: tuple[str, ...] = ("pcp", "natpmp", "upnp")
    external: str = "203.0.113.9"
    max_lifetime: int = 7200
    epoch: int = 100
    upnp_conflicts: set[int] = field(default_factory=set)  # external ports UPnP says are taken
    upnp_permanent_only: bool = False
    seen: list[Seen] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)  # every datagram on the UDP port, answered or not
    mappings: dict[tuple[str, int], int] = field(default_factory=dict)  # (protocol, internal port) -> external port
    udp_port: int = 0
    ssdp_port: int = 0
    http_port: int = 0

    # -- UDP 5351 -------------------------------------------------------------------------

    def answer_udp(self, data: bytes, source: str) -> Optional[bytes]:
        self.received.append(data)
        if data[:1] == bytes([pcp.VERSION]) and "pcp" in self.protocols:
            return self._answer_pcp(data, source)
        if "natpmp" not in self.protocols:
            return None
        request = natpmp.read_request(data, self.epoch)
        if request is None or isinstance(request, natpmp.ErrorResponse):
            return None if request is None else request.to_wire()
        if isinstance(request, natpmp.ExternalAddressRequest):
            return natpmp.ExternalAddressResponse(0, self.epoch, ipaddress.IPv4Address(self.external)).to_wire()
        lifetime = min(request.lifetime, self.max_lifetime)
        self.seen.append(Seen("natpmp", request.internal_port, request.lifetime))
        external = self._map("natpmp", request.internal_port, request.suggested_external_port, lifetime)
        return natpmp.MapResponse(request.opcode, 0, self.epoch, request.internal_port, external, lifetime).to_wire()

    def _answer_pcp(self, data: bytes, source: str) -> Optional[bytes]:
        try:
            request = pcp.parse_request(data)
        except PortmapProtocolError as exc:
            return pcp.error_response(data, exc.result, self.epoch)
        if request.client_address != ipaddress.ip_address(source):
            return pcp.error_response(data, pcp.ResultCode.ADDRESS_MISMATCH, self.epoch)
        if request.opcode == pcp.Opcode.ANNOUNCE:
            return pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, self.epoch).to_wire()
        if request.map is None:
            return pcp.error_response(data, pcp.ResultCode.UNSUPP_OPCODE, self.epoch)
        m = request.map
        lifetime = min(request.lifetime, self.max_lifetime)
        self.seen.append(Seen("pcp", m.internal_port, request.lifetime))
        external = self._map("pcp", m.internal_port, m.external_port, lifetime)
        assigned = pcp.MapData(m.nonce, m.protocol, m.internal_port, external, ipaddress.ip_address(self.external))
        return pcp.Response(pcp.Opcode.MAP, 0, lifetime, self.epoch, assigned).to_wire()

    def _map(self, protocol: str, internal: int, suggested: int, lifetime: int) -> int:
        key = (protocol, internal)
        if lifetime == 0:
            self.mappings.pop(key, None)
            return 0
        # 10000 above the internal port, counted round within 1024..65535: an ephemeral
        # internal port (a discovery maps its own socket's) may be above 55535.
        external = self.mappings.get(key) or suggested or 1024 + (internal + 10000 - 1024) % (65536 - 1024)
        self.mappings[key] = external
        return external

    # -- UPnP -----------------------------------------------------------------------------

    def answer_ssdp(self, data: bytes) -> Optional[bytes]:
        if "upnp" not in self.protocols:
            return None
        try:
            target = upnp_igd.parse_msearch(data)
        except PortmapProtocolError:
            return None
        return upnp_igd.SsdpResponse(f"http://127.0.0.1:{self.http_port}/rootDesc.xml", target).to_wire()

    def answer_http(self, msg: upnp_igd.HttpMessage) -> bytes:
        if msg.start_line.startswith("GET /rootDesc.xml"):
            body = (f'<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0"><device><deviceList><device>'
                    f"<serviceList><service><serviceType>{WANIP1}</serviceType><controlURL>/ctl/IPConn</controlURL>"
                    "</service></serviceList></device></deviceList></device></root>").encode()
            return upnp_igd.http_response(200, "OK", {"Content-Type": "text/xml"}, body)
        call = upnp_igd.parse_soap_call(msg.body)
        if call.action == "GetExternalIPAddress":
            return self._soap_ok(call, (("NewExternalIPAddress", self.external),))
        port = int(call.arg("NewExternalPort") or 0)
        if call.action == "AddPortMapping":
            lease = int(call.arg("NewLeaseDuration") or 0)
            if port in self.upnp_conflicts:
                return self._soap_fault(718, "ConflictInMappingEntry")
            if self.upnp_permanent_only and lease:
                return self._soap_fault(725, "OnlyPermanentLeasesSupported")
            self.seen.append(Seen("upnp", int(call.arg("NewInternalPort") or 0), lease or 1))
            self.mappings[("upnp", port)] = port
            return self._soap_ok(call)
        if call.action == "DeletePortMapping":
            self.seen.append(Seen("upnp", port, 0))
            if self.mappings.pop(("upnp", port), None) is None:
                return self._soap_fault(714, "NoSuchEntryInArray")
            return self._soap_ok(call)
        return self._soap_fault(401, "Invalid Action")

    def _soap_ok(self, call: upnp_igd.SoapCall, out: tuple[tuple[str, str], ...] = ()) -> bytes:
        return upnp_igd.http_response(200, "OK", {"Content-Type": 'text/xml; charset="utf-8"'},
                                      upnp_igd.soap_response(call.service_type, call.action, out))

    def _soap_fault(self, code: int, text: str) -> bytes:
        return upnp_igd.http_response(500, "Internal Server Error", {"Content-Type": "text/xml"},
                                      upnp_igd.soap_fault(code, text))


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, answer) -> None:  # type: ignore[no-untyped-def]
        self.answer = answer
        self.transport: Optional[asyncio.DatagramTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        reply = self.answer(data, addr[0])
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def start(gateway: Gateway) -> list[object]:
    """Listen on loopback (ports in ``gateway``); returns what to close."""
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(gateway.answer_udp), local_addr=("127.0.0.1", 0))
    ssdp, _ = await loop.create_datagram_endpoint(lambda: _Udp(lambda d, s: gateway.answer_ssdp(d)),
                                                  local_addr=("127.0.0.1", 0))

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while not upnp_igd.http_message_complete(data):
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
        writer.write(gateway.answer_http(upnp_igd.parse_http(data, complete=False)))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    gateway.udp_port = udp.get_extra_info("sockname")[1]
    gateway.ssdp_port = ssdp.get_extra_info("sockname")[1]
    gateway.http_port = server.sockets[0].getsockname()[1]
    return [udp, ssdp, server]


def stop(handles: list[object]) -> None:
    for handle in handles:
        handle.close()  # type: ignore[attr-defined]
