"""The UPnP IGD side of the lab's port-mapping gateway: SSDP, a device description, and
the WANIPConnection:1 control URL (the client side is nattool/protocol/upnp_igd.py).

Only what IGD v1 clients (miniupnpc's ``upnpc``, nattool) use: M-SEARCH answers, the
description with WANCommonInterfaceConfig and WANIPConnection, and the SOAP actions
GetExternalIPAddress, GetStatusInfo, GetConnectionTypeInfo, AddPortMapping,
DeletePortMapping, GetSpecificPortMappingEntry, GetGenericPortMappingEntry and the common
interface's GetCommonLinkProperties / GetTotal* counters. Anything else is fault 401.
HTTP, SSDP and SOAP messages are read and written with nattool's own codec (its gateway
side); this module is the device and its decisions.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid
from collections.abc import Callable

from nattool.errors import PortmapProtocolError
from nattool.protocol.upnp_igd import (
    ERROR_CONFLICT,
    ERROR_INVALID_ARGS,
    ERROR_NO_SUCH_ENTRY,
    MAX_HTTP,
    SSDP_ADDRESS,
    SSDP_PORT,
    SsdpResponse,
    http_message_complete,
    http_response,
    parse_http,
    parse_msearch,
    parse_soap_call,
    soap_fault,
    soap_response,
)

from .portmap_rules import Mapping, MappingConflict, MappingTable

IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WAN_DEVICE = "urn:schemas-upnp-org:device:WANDevice:1"
WAN_CONNECTION_DEVICE = "urn:schemas-upnp-org:device:WANConnectionDevice:1"
WANIP = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANCIF = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1"
DESCRIPTION_PATH = "/rootDesc.xml"
WANIP_CONTROL = "/ctl/IPConn"
WANCIF_CONTROL = "/ctl/CmnIfCfg"
SERVER_HEADER = "Linux UPnP/1.0 natlab-portmap-gateway/1.0"

# UPnP IGD error codes (WANIPConnection:1, section 2.4.x); the codec names those a client
# acts on, the rest only a gateway sends.
INVALID_ACTION = 401
INVALID_ARGS = ERROR_INVALID_ARGS
ACTION_NOT_AUTHORIZED = 606
ARRAY_INDEX_INVALID = 713
NO_SUCH_ENTRY = ERROR_NO_SUCH_ENTRY
WILDCARD_EXT_PORT = 716
CONFLICT_IN_MAPPING = ERROR_CONFLICT
_ERROR_TEXT = {
    INVALID_ACTION: "Invalid Action", INVALID_ARGS: "Invalid Args",
    ACTION_NOT_AUTHORIZED: "Action not authorized",
    ARRAY_INDEX_INVALID: "SpecifiedArrayIndexInvalid", NO_SUCH_ENTRY: "NoSuchEntryInArray",
    WILDCARD_EXT_PORT: "WildCardNotPermittedInExtPort",
    CONFLICT_IN_MAPPING: "ConflictInMappingEntry",
}


class UpnpFault(Exception):
    """An action's UPnPError: answered as a SOAP fault with HTTP 500."""

    def __init__(self, code: int) -> None:
        super().__init__(_ERROR_TEXT.get(code, str(code)))
        self.code = code


def _service(service_type: str, service_id: str, name: str, control: str) -> str:
    return (f"<service><serviceType>{service_type}</serviceType>"
            f"<serviceId>urn:upnp-org:serviceId:{service_id}</serviceId>"
            f"<SCPDURL>/{name}.xml</SCPDURL><controlURL>{control}</controlURL>"
            f"<eventSubURL>/evt/{name}</eventSubURL></service>")


def device_description(udn: str, lan_ip: str, http_port: int) -> str:
    return (
        '<?xml version="1.0"?>\n'
        '<root xmlns="urn:schemas-upnp-org:device-1-0">'
        "<specVersion><major>1</major><minor>0</minor></specVersion>"
        f"<device><deviceType>{IGD}</deviceType>"
        "<friendlyName>natlab gateway</friendlyName><manufacturer>nattool</manufacturer>"
        "<modelName>natlab portmap gateway</modelName>"
        f"<UDN>{udn}</UDN>"
        f"<deviceList><device><deviceType>{WAN_DEVICE}</deviceType>"
        "<friendlyName>WANDevice</friendlyName><manufacturer>nattool</manufacturer>"
        f"<modelName>WAN</modelName><UDN>{udn}-1</UDN>"
        f"<serviceList>{_service(WANCIF, 'WANCommonIFC1', 'WANCfg', WANCIF_CONTROL)}"
        "</serviceList>"
        f"<deviceList><device><deviceType>{WAN_CONNECTION_DEVICE}</deviceType>"
        "<friendlyName>WANConnectionDevice</friendlyName><manufacturer>nattool</manufacturer>"
        f"<modelName>WANConnection</modelName><UDN>{udn}-2</UDN>"
        f"<serviceList>{_service(WANIP, 'WANIPConn1', 'WANIPCn', WANIP_CONTROL)}"
        "</serviceList></device></deviceList>"
        "</device></deviceList>"
        f"<presentationURL>http://{lan_ip}:{http_port}/</presentationURL>"
        "</device></root>\n")


# ------------------------------------------------------------------------------- SOAP


def _port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 0 <= int(value) <= 65535:
        raise UpnpFault(INVALID_ARGS)
    return int(value)


def _proto(value: str) -> str:
    if value.upper() not in ("UDP", "TCP"):
        raise UpnpFault(INVALID_ARGS)
    return value.lower()


class IgdService:
    """The SOAP actions, over the gateway's mapping table."""

    def __init__(self, table: MappingTable, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.table = table
        self.clock = clock
        self.started = clock()

    def call(self, service: str, action: str, args: dict[str, str], client_ip: str
             ) -> dict[str, object]:
        if service == WANCIF:
            return self._common(action)
        handler = getattr(self, f"_do_{action}", None)
        if handler is None:
            raise UpnpFault(INVALID_ACTION)
        result: dict[str, object] = handler(args, client_ip)
        return result

    def _common(self, action: str) -> dict[str, object]:
        if action == "GetCommonLinkProperties":
            return {"NewWANAccessType": "Ethernet",
                    "NewLayer1UpstreamMaxBitRate": 100_000_000,
                    "NewLayer1DownstreamMaxBitRate": 100_000_000,
                    "NewPhysicalLinkStatus": "Up"}
        counters = {"GetTotalBytesSent": "NewTotalBytesSent",
                    "GetTotalBytesReceived": "NewTotalBytesReceived",
                    "GetTotalPacketsSent": "NewTotalPacketsSent",
                    "GetTotalPacketsReceived": "NewTotalPacketsReceived"}
        if action in counters:
            return {counters[action]: 0}
        raise UpnpFault(INVALID_ACTION)

    def _do_GetExternalIPAddress(self, args: dict[str, str], client: str) -> dict[str, object]:
        return {"NewExternalIPAddress": self.table.wan_ip}

    def _do_GetStatusInfo(self, args: dict[str, str], client: str) -> dict[str, object]:
        return {"NewConnectionStatus": "Connected", "NewLastConnectionError": "ERROR_NONE",
                "NewUptime": int(self.clock() - self.started)}

    def _do_GetConnectionTypeInfo(self, args: dict[str, str], client: str
                                  ) -> dict[str, object]:
        return {"NewConnectionType": "IP_Routed", "NewPossibleConnectionTypes": "IP_Routed"}

    def _do_AddPortMapping(self, args: dict[str, str], client: str) -> dict[str, object]:
        try:
            external = _port(args["NewExternalPort"])
            proto = _proto(args["NewProtocol"])
            internal = _port(args["NewInternalPort"])
            internal_client = args["NewInternalClient"]
            lease = int(args.get("NewLeaseDuration") or "0")
        except (KeyError, ValueError):
            raise UpnpFault(INVALID_ARGS) from None
        if external == 0:
            raise UpnpFault(WILDCARD_EXT_PORT)
        if internal == 0 or lease < 0:
            raise UpnpFault(INVALID_ARGS)
        if internal_client != client:  # as miniupnpd's secure mode: only for yourself
            raise UpnpFault(ACTION_NOT_AUTHORIZED)
        try:
            self.table.grant("upnp", proto, client, internal, external, lease, self.clock(),
                             description=args.get("NewPortMappingDescription", ""),
                             exact=True)
        except MappingConflict:
            raise UpnpFault(CONFLICT_IN_MAPPING) from None
        return {}

    def _find_external(self, args: dict[str, str]) -> Mapping:
        try:
            external = _port(args["NewExternalPort"])
            proto = _proto(args["NewProtocol"])
        except KeyError:
            raise UpnpFault(INVALID_ARGS) from None
        m = self.table.by_external(proto, external)
        if m is None:
            raise UpnpFault(NO_SUCH_ENTRY)
        return m

    def _do_DeletePortMapping(self, args: dict[str, str], client: str) -> dict[str, object]:
        m = self._find_external(args)
        if m.internal_ip != client:
            raise UpnpFault(ACTION_NOT_AUTHORIZED)
        self.table.remove(m, "request", self.clock())
        return {}

    def _entry(self, m: Mapping) -> dict[str, object]:
        left = max(0, int(m.expires_at - self.clock())) if m.expires_at else 0
        return {"NewInternalPort": m.internal_port, "NewInternalClient": m.internal_ip,
                "NewEnabled": 1, "NewPortMappingDescription": m.description,
                "NewLeaseDuration": left}

    def _do_GetSpecificPortMappingEntry(self, args: dict[str, str], client: str
                                        ) -> dict[str, object]:
        return self._entry(self._find_external(args))

    def _do_GetGenericPortMappingEntry(self, args: dict[str, str], client: str
                                       ) -> dict[str, object]:
        try:
            index = int(args["NewPortMappingIndex"])
        except (KeyError, ValueError):
            raise UpnpFault(INVALID_ARGS) from None
        mappings = self.table.all()
        if not 0 <= index < len(mappings):
            raise UpnpFault(ARRAY_INDEX_INVALID)
        m = mappings[index]
        return {"NewRemoteHost": "", "NewExternalPort": m.external_port,
                "NewProtocol": m.proto.upper(), **self._entry(m)}


# ------------------------------------------------------------------------------- HTTP

_XML = {"Content-Type": 'text/xml; charset="utf-8"', "Server": SERVER_HEADER, "Ext": ""}


def _bodyless_request(data: bytes) -> bool:
    """Headers complete, and neither a length nor chunks: a request without a body (GET)."""
    head, blank, _ = data.partition(b"\r\n\r\n")
    head = head.lower()
    return bool(blank) and b"content-length:" not in head and b"transfer-encoding:" not in head


class HttpServer:
    """One request per connection (``Connection: close``), as miniupnpc expects it."""

    def __init__(self, service: IgdService, lan_ip: str, port: int) -> None:
        self.service = service
        self.lan_ip = lan_ip
        self.port = port
        self.udn = f"uuid:{uuid.uuid4()}"
        self.description = device_description(self.udn, lan_ip, port).encode()

    async def start(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._handle, self.lan_ip, self.port,
                                          reuse_address=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        try:
            data = await asyncio.wait_for(self._read(reader), 10)
            answer = self._answer(data, writer.get_extra_info("peername")[0])
        except (asyncio.TimeoutError, ConnectionError, PortmapProtocolError):
            answer = http_response(400, "Bad Request", {"Server": SERVER_HEADER})
        try:
            writer.write(answer)
            await writer.drain()
            writer.close()
        except ConnectionError:
            pass

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> bytes:
        data = b""
        while not (_bodyless_request(data) or http_message_complete(data)):
            chunk = await reader.read(4096)
            if not chunk or len(data) > MAX_HTTP:
                break  # parse_http says what is wrong with it
            data += chunk
        return data

    def _answer(self, data: bytes, client_ip: str) -> bytes:
        request = parse_http(data)
        method, path = (request.start_line.split(" ") + ["", ""])[:2]
        if method == "GET" and path == DESCRIPTION_PATH:
            return http_response(200, "OK", _XML, self.description)
        service = {WANIP_CONTROL: WANIP, WANCIF_CONTROL: WANCIF}.get(path)
        if method != "POST" or service is None:
            return http_response(404, "Not Found", {"Server": SERVER_HEADER})
        try:
            call = parse_soap_call(request.body)
            soap_action = (request.header("soapaction") or "").strip('"')
            if soap_action and soap_action != f"{service}#{call.action}":
                raise UpnpFault(INVALID_ACTION)
            values = self.service.call(service, call.action, dict(call.args), client_ip)
        except PortmapProtocolError:
            return http_response(500, "Internal Server Error", _XML,
                                 soap_fault(INVALID_ARGS, _ERROR_TEXT[INVALID_ARGS]))
        except UpnpFault as fault:
            return http_response(500, "Internal Server Error", _XML,
                                 soap_fault(fault.code, str(fault)))
        out = tuple((name, str(value)) for name, value in values.items())
        return http_response(200, "OK", _XML, soap_response(service, call.action, out))


# ------------------------------------------------------------------------------- SSDP

_SEARCH_TARGETS = ("ssdp:all", "upnp:rootdevice", IGD, WAN_DEVICE, WAN_CONNECTION_DEVICE,
                   WANIP, WANCIF)


def msearch_answer(data: bytes, location: str, udn: str) -> bytes | None:
    """The unicast answer to an M-SEARCH datagram, None if it does not search for us."""
    try:
        st = parse_msearch(data)
    except PortmapProtocolError:
        return None
    if st not in _SEARCH_TARGETS and st != udn:
        return None
    target = IGD if st == "ssdp:all" else st
    usn = udn if target == udn else f"{udn}::{target}"
    return SsdpResponse(location, target, usn, SERVER_HEADER).to_wire()


class SsdpResponder(asyncio.DatagramProtocol):
    def __init__(self, location: str, udn: str) -> None:
        self.location = location
        self.udn = udn
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        answer = msearch_answer(data, self.location, self.udn)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


def ssdp_socket(lan_ip: str) -> socket.socket:
    """UDP 1900 on all addresses, joined to the SSDP group on the LAN interface."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", SSDP_PORT))
    mreq = struct.pack("4s4s", socket.inet_aton(SSDP_ADDRESS), socket.inet_aton(lan_ip))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(lan_ip))
    sock.setblocking(False)
    return sock


async def start_upnp(table: MappingTable, lan_ip: str, http_port: int
                     ) -> tuple[asyncio.AbstractServer, asyncio.DatagramTransport]:
    http = HttpServer(IgdService(table), lan_ip, http_port)
    server = await http.start()
    location = f"http://{lan_ip}:{http_port}{DESCRIPTION_PATH}"
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: SsdpResponder(location, http.udn), sock=ssdp_socket(lan_ip))
    return server, transport
