"""UPnP IGD codec: SSDP discovery, the device description, and the SOAP actions a
port mapper needs (GetExternalIPAddress, AddPortMapping, DeletePortMapping).

Pure: bytes in, values out, and back, for both the client and a gateway. On any input
bytes the parsers raise nothing but :class:`~nattool.errors.PortmapProtocolError`, and a
SOAP fault becomes :class:`~nattool.errors.PortmapRefused` (``code`` = the UPnPError code).

XML is parsed with :mod:`xml.etree` after refusing any document with a DOCTYPE (so no
entity can be declared, let alone expanded) and above a size bound. HTTP is the small
subset UPnP uses: one request per connection, Content-Length, chunked, or read to EOF.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urljoin, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from nattool.errors import PortmapProtocolError, PortmapRefused

SSDP_ADDRESS = "239.255.255.250"
SSDP_PORT = 1900
MAX_SSDP = 2048  # bytes of one SSDP datagram we read
MAX_XML = 128 * 1024  # a device description or SOAP body; real ones are a few KiB
MAX_HTTP = MAX_XML + 8192  # headers included
MAX_HEADERS = 64

IGD_DEVICE_TYPES = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
)
# The services that map ports, best first.
WAN_SERVICE_TYPES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
SEARCH_TARGETS = IGD_DEVICE_TYPES + WAN_SERVICE_TYPES

_SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
_SOAP_ENCODING = "http://schemas.xmlsoap.org/soap/encoding/"
_CONTROL_NS = "urn:schemas-upnp-org:control-1-0"

# UPnP errors a port mapper meets (WANIPConnection:1/2 service specs).
ERROR_INVALID_ARGS = 402
ERROR_ACTION_FAILED = 501
ERROR_NO_SUCH_ENTRY = 714
ERROR_CONFLICT = 718  # the external port is mapped to another client
ERROR_ONLY_PERMANENT_LEASES = 725  # an IGD:1 box that takes only lease 0
ERROR_PORT_NOT_AUTHORIZED = 729


# --------------------------------------------------------------------------- HTTP-ish


@dataclass(frozen=True, slots=True)
class HttpMessage:
    """A parsed HTTP (or HTTPU, for SSDP) message: start line, headers, body."""

    start_line: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name.lower())

    @property
    def status(self) -> int:
        """The status code of a response (``HTTP/1.1 200 OK``)."""
        parts = self.start_line.split(" ", 2)
        code = parts[1] if len(parts) >= 2 else ""
        if not parts[0].upper().startswith("HTTP/") or not (code.isascii() and code.isdigit() and len(code) == 3):
            raise PortmapProtocolError(f"not an HTTP status line: {self.start_line[:60]!r}")
        return int(code)


def parse_http(data: bytes, *, complete: bool = True) -> HttpMessage:
    """Split an HTTP message. ``complete``: the peer closed, so a body without a length ends here.

    Raises :class:`PortmapProtocolError` on malformed or oversized input, and on a body
    still incomplete (check :func:`http_message_complete` while reading).
    """
    if len(data) > MAX_HTTP:
        raise PortmapProtocolError(f"HTTP message over {MAX_HTTP} bytes")
    head_end = data.find(b"\r\n\r\n")
    sep = 4
    if head_end < 0:
        head_end, sep = data.find(b"\n\n"), 2
    if head_end < 0:
        if complete and data and b"\n" in data and len(data.split(b"\n")) <= 2 + MAX_HEADERS:
            head_end, sep = len(data), 0  # headers only, no blank line (tolerated for SSDP)
        else:
            raise PortmapProtocolError("HTTP headers not terminated")
    try:
        head = data[:head_end].decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise PortmapProtocolError("HTTP headers not text") from None
    lines = head.replace("\r\n", "\n").split("\n")
    if len(lines) > MAX_HEADERS + 1:
        raise PortmapProtocolError("too many HTTP headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or name != name.strip():
            raise PortmapProtocolError(f"bad HTTP header line {line[:60]!r}")
        headers[name.lower()] = value.strip()
    body = _http_body(data[head_end + sep:], headers, complete)
    return HttpMessage(lines[0].strip(), headers, body)


def _http_body(rest: bytes, headers: dict[str, str], complete: bool) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _dechunk(rest)
    length_text = headers.get("content-length")
    if length_text is not None:
        if not (length_text.isascii() and length_text.isdigit()) or len(length_text) > 9:
            raise PortmapProtocolError(f"bad Content-Length {length_text[:20]!r}")
        length = int(length_text)
        if len(rest) < length:
            raise PortmapProtocolError("HTTP body shorter than its Content-Length")
        return rest[:length]
    if not complete:
        raise PortmapProtocolError("HTTP body without a length before the end")
    return rest


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        line_end = data.find(b"\n", pos)
        if line_end < 0:
            raise PortmapProtocolError("HTTP chunk size line cut short")
        size_text = data[pos:line_end].split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 8 or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
            raise PortmapProtocolError("bad HTTP chunk size")
        size = int(size_text, 16)
        pos = line_end + 1
        if size == 0:
            return bytes(out)
        if pos + size > len(data):
            raise PortmapProtocolError("HTTP chunk cut short")
        out += data[pos:pos + size]
        pos += size
        if data[pos:pos + 2] == b"\r\n":
            pos += 2
        elif data[pos:pos + 1] == b"\n":
            pos += 1
        else:
            raise PortmapProtocolError("HTTP chunk not followed by a line end")


def http_message_complete(data: bytes) -> bool:
    """Whether ``data`` already holds a whole message with a known length (read loop helper)."""
    try:
        parse_http(data, complete=False)
    except PortmapProtocolError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class HttpUrl:
    host: str  # an IP address or name, without brackets
    port: int
    path: str  # with the query, "/" at least

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def split_http_url(url: str) -> HttpUrl:
    """An ``http://`` URL (the only scheme UPnP control uses) into host, port and path."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError:
        raise PortmapProtocolError(f"bad URL {url[:80]!r}") from None
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise PortmapProtocolError(f"not an http:// URL: {url[:80]!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return HttpUrl(parts.hostname, port, path)


def _http_bytes(start_line: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [start_line, *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def http_request(method: str, url: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    target = split_http_url(url)
    fixed = {"Host": target.host_header, "Connection": "close", "Content-Length": str(len(body))}
    return _http_bytes(f"{method} {target.path} HTTP/1.1", {**fixed, **headers}, body)


def http_response(status: int, reason: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """A gateway's answer (the lab fixture's side)."""
    fixed = {"Content-Length": str(len(body)), "Connection": "close"}
    return _http_bytes(f"HTTP/1.1 {status} {reason}", {**fixed, **headers}, body)


# --------------------------------------------------------------------------- SSDP


def build_msearch(search_target: str, mx: int = 1) -> bytes:
    """An SSDP M-SEARCH for ``search_target`` (sent to 239.255.255.250:1900)."""
    return _http_bytes("M-SEARCH * HTTP/1.1", {
        "HOST": f"{SSDP_ADDRESS}:{SSDP_PORT}", "MAN": '"ssdp:discover"', "MX": str(mx), "ST": search_target})


def parse_msearch(data: bytes) -> str:
    """The search target of an M-SEARCH (the gateway's side)."""
    if len(data) > MAX_SSDP:
        raise PortmapProtocolError("SSDP datagram too long")
    msg = parse_http(data)
    if msg.start_line.split(" ")[0].upper() != "M-SEARCH":
        raise PortmapProtocolError("not an M-SEARCH")
    if (msg.header("man") or "").strip('"').lower() != "ssdp:discover":
        raise PortmapProtocolError("M-SEARCH without MAN: \"ssdp:discover\"")
    target = msg.header("st")
    if not target:
        raise PortmapProtocolError("M-SEARCH without ST")
    return target


@dataclass(frozen=True, slots=True)
class SsdpResponse:
    location: str  # the device description URL
    search_target: str
    usn: str = ""
    server: str = ""

    def to_wire(self) -> bytes:
        return _http_bytes("HTTP/1.1 200 OK", {
            "CACHE-CONTROL": "max-age=120", "EXT": "", "LOCATION": self.location,
            "SERVER": self.server or "nattool UPnP/1.1", "ST": self.search_target,
            "USN": self.usn or self.search_target})


def parse_ssdp_response(data: bytes) -> SsdpResponse:
    """An answer to our M-SEARCH (a 200 with LOCATION and ST)."""
    if len(data) > MAX_SSDP:
        raise PortmapProtocolError("SSDP datagram too long")
    msg = parse_http(data)
    if msg.status != 200:
        raise PortmapProtocolError(f"SSDP status {msg.status}")
    location, target = msg.header("location"), msg.header("st")
    if not location or not target:
        raise PortmapProtocolError("SSDP response without LOCATION or ST")
    split_http_url(location)
    return SsdpResponse(location, target, msg.header("usn") or "", msg.header("server") or "")


# --------------------------------------------------------------------------- XML


def _parse_xml(data: bytes) -> ElementTree.Element:
    if len(data) > MAX_XML:
        raise PortmapProtocolError(f"XML over {MAX_XML} bytes")
    if re.search(rb"<!\s*(DOCTYPE|ENTITY)", data, re.IGNORECASE):
        raise PortmapProtocolError("XML with a DOCTYPE or ENTITY declaration refused")
    try:
        return ElementTree.fromstring(data)
    except (ElementTree.ParseError, ValueError, UnicodeError, LookupError, RecursionError):
        raise PortmapProtocolError("malformed XML") from None


def _local(tag: object) -> str:
    text = tag if isinstance(tag, str) else ""
    return text.rsplit("}", 1)[-1]


def _child_text(element: ElementTree.Element, name: str) -> Optional[str]:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


@dataclass(frozen=True, slots=True)
class IgdService:
    service_type: str  # one of WAN_SERVICE_TYPES
    control_url: str  # absolute http:// URL on the description's host

    def preference(self) -> int:
        return WAN_SERVICE_TYPES.index(self.service_type)


def parse_device_description(xml: bytes, location: str) -> list[IgdService]:
    """The port-mapping services of a device description, best first (maybe none).

    Control URLs are resolved against URLBase or ``location`` and must point to the
    same host as ``location``: a description cannot send our requests elsewhere.
    """
    root = _parse_xml(xml)
    base = location
    for element in root.iter():
        if _local(element.tag) == "URLBase" and (element.text or "").strip():
            base = (element.text or "").strip()
            break
    home = split_http_url(location)
    services = []
    for element in root.iter():
        if _local(element.tag) != "service":
            continue
        service_type, control = _child_text(element, "serviceType"), _child_text(element, "controlURL")
        if service_type not in WAN_SERVICE_TYPES or not control:
            continue
        url = urljoin(base, control)
        target = split_http_url(url)
        if target.host.lower() != home.host.lower():
            continue
        services.append(IgdService(service_type, url))
    return sorted(set(services), key=lambda s: (s.preference(), s.control_url))


# --------------------------------------------------------------------------- SOAP


@dataclass(frozen=True, slots=True)
class SoapCall:
    """One action of a service, with its arguments in order (both sides)."""

    service_type: str
    action: str
    args: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in (self.action, *(n for n, _ in self.args)):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
                raise PortmapProtocolError(f"bad SOAP name {name[:64]!r}")

    @property
    def soap_action(self) -> str:
        """The SOAPACTION header's value, quotes included."""
        return f'"{self.service_type}#{self.action}"'

    def body(self) -> bytes:
        args = "".join(f"<{n}>{escape(v)}</{n}>" for n, v in self.args)
        return _envelope(f'<u:{self.action} xmlns:u="{escape(self.service_type)}">{args}</u:{self.action}>')

    def http_request(self, control_url: str) -> bytes:
        return http_request("POST", control_url, {
            "Content-Type": 'text/xml; charset="utf-8"',
            "SOAPAction": self.soap_action,
        }, self.body())

    def arg(self, name: str) -> Optional[str]:
        return next((v for n, v in self.args if n == name), None)


def _envelope(inner: str) -> bytes:
    return (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{_SOAP_ENV}" s:encodingStyle="{_SOAP_ENCODING}">'
        f"<s:Body>{inner}</s:Body></s:Envelope>\r\n"
    ).encode("utf-8")


def get_external_ip_address(service_type: str) -> SoapCall:
    return SoapCall(service_type, "GetExternalIPAddress")


def add_port_mapping(service_type: str, *, external_port: int, internal_port: int, internal_client: str,
                     lease_duration: int, protocol: str = "UDP", description: str = "nattool",
                     remote_host: str = "") -> SoapCall:
    """Map ``external_port`` to internal_client:internal_port (lease 0: until deleted)."""
    _check_port(external_port, allow_zero=False)
    _check_port(internal_port, allow_zero=False)
    if protocol not in ("UDP", "TCP"):
        raise PortmapProtocolError(f"UPnP protocol {protocol!r}")
    if not 0 <= lease_duration <= 0xFFFFFFFF:
        raise PortmapProtocolError(f"UPnP lease {lease_duration}")
    return SoapCall(service_type, "AddPortMapping", (
        ("NewRemoteHost", remote_host),
        ("NewExternalPort", str(external_port)),
        ("NewProtocol", protocol),
        ("NewInternalPort", str(internal_port)),
        ("NewInternalClient", internal_client),
        ("NewEnabled", "1"),
        ("NewPortMappingDescription", description),
        ("NewLeaseDuration", str(lease_duration)),
    ))


def delete_port_mapping(service_type: str, *, external_port: int, protocol: str = "UDP",
                        remote_host: str = "") -> SoapCall:
    _check_port(external_port, allow_zero=False)
    return SoapCall(service_type, "DeletePortMapping", (
        ("NewRemoteHost", remote_host),
        ("NewExternalPort", str(external_port)),
        ("NewProtocol", protocol),
    ))


def _check_port(port: int, *, allow_zero: bool) -> None:
    if not isinstance(port, int) or not (0 if allow_zero else 1) <= port <= 65535:
        raise PortmapProtocolError(f"port {port!r} out of range")


def _soap_body_element(xml: bytes) -> ElementTree.Element:
    root = _parse_xml(xml)
    if _local(root.tag) != "Envelope":
        raise PortmapProtocolError("SOAP message without an Envelope")
    body = next((c for c in root if _local(c.tag) == "Body"), None)
    if body is None or len(body) == 0:
        raise PortmapProtocolError("SOAP message without a Body element")
    return body[0]


def _args_of(element: ElementTree.Element) -> tuple[tuple[str, str], ...]:
    return tuple((_local(c.tag), (c.text or "").strip()) for c in element)


def _namespace(tag: object) -> str:
    text = tag if isinstance(tag, str) else ""
    return text[1:].split("}", 1)[0] if text.startswith("{") else ""


def parse_soap_call(xml: bytes) -> SoapCall:
    """The action a client called (the gateway's side)."""
    element = _soap_body_element(xml)
    try:
        return SoapCall(_namespace(element.tag), _local(element.tag), _args_of(element))
    except PortmapProtocolError:
        raise
    except (TypeError, ValueError):  # pragma: no cover - defensive
        raise PortmapProtocolError("bad SOAP call") from None


def soap_response(service_type: str, action: str, out_args: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A gateway's success body for ``action``."""
    call = SoapCall(service_type, f"{action}Response", out_args)
    return call.body()


def soap_fault(code: int, description: str) -> bytes:
    """A gateway's UPnPError body (sent with HTTP 500)."""
    return _envelope(
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        f'<UPnPError xmlns="{_CONTROL_NS}"><errorCode>{int(code)}</errorCode>'
        f"<errorDescription>{escape(description)}</errorDescription></UPnPError></detail></s:Fault>"
    )


def parse_soap_response(xml: bytes, action: str) -> dict[str, str]:
    """The out-arguments of a success, or :class:`PortmapRefused` for a UPnP fault."""
    element = _soap_body_element(xml)
    name = _local(element.tag)
    if name == "Fault":
        code, description = 0, "SOAP fault"
        for node in element.iter():
            local = _local(node.tag)
            if local == "errorCode" and (node.text or "").strip().isdigit() and len((node.text or "").strip()) < 9:
                code = int((node.text or "").strip())
            elif local == "errorDescription":
                description = (node.text or "").strip()[:200] or description
        raise PortmapRefused(f"UPnP {action}: error {code} {description}", protocol="upnp", code=code)
    if name != f"{action}Response":
        raise PortmapProtocolError(f"SOAP answer {name[:64]!r} to {action}")
    return dict(_args_of(element))


def external_ip_from(out_args: dict[str, str]) -> Optional[ipaddress.IPv4Address]:
    """GetExternalIPAddress's answer; None when the gateway has none (empty or 0.0.0.0)."""
    text = out_args.get("NewExternalIPAddress", "")
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        if text:
            raise PortmapProtocolError(f"UPnP external address {text[:48]!r}") from None
        return None
    return None if address.is_unspecified else address


__all__ = [
    "ERROR_CONFLICT", "ERROR_ONLY_PERMANENT_LEASES", "HttpMessage", "HttpUrl", "IGD_DEVICE_TYPES",
    "IgdService", "MAX_HTTP", "MAX_SSDP", "MAX_XML", "SEARCH_TARGETS", "SSDP_ADDRESS", "SSDP_PORT",
    "SoapCall", "SsdpResponse", "WAN_SERVICE_TYPES", "add_port_mapping", "build_msearch",
    "delete_port_mapping", "external_ip_from", "get_external_ip_address", "http_message_complete",
    "http_request", "http_response", "parse_device_description", "parse_http", "parse_msearch",
    "parse_soap_call", "parse_soap_response", "parse_ssdp_response", "soap_fault", "soap_response",
    "split_http_url",
]
