"""IPv4/IPv6 endpoints as the wire protocol writes them.

An endpoint is written ``1.2.3.4:998`` or ``[2001:db8::1]:998``; a bare LAN address
is written without port or brackets.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Union

from nattool.errors import ProtocolError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# The tracker's default port: int(hex("51pwn"), 16) % 65535, as the original server.
DEFAULT_PORT = 43283

_MAX_ENDPOINT_TEXT = 64  # "[" + 45 chars of IPv6 text + "]:" + 5 digits, with slack

# IPv4 text as str(IPv4Address) writes it, for expressions to embed. Atomic: an
# octet is always followed by a non-digit, and every other way to match it leaves a
# digit next, so trying them after a failure could never succeed.
_OCTET = r"(?>25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CANONICAL_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
# A port as str(int) writes it, 1..65535 (atomic for the same reason).
_CANONICAL_PORT = r"(?>6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
_CANONICAL_V4_ENDPOINT_RE = re.compile(rf"{CANONICAL_IPV4}:{_CANONICAL_PORT}\Z")


def parse_ip(text: str) -> IPAddress:
    """Parse a bare IPv4 or IPv6 address (no brackets, no zone id)."""
    if not text or len(text) > 45 or "%" in text:
        raise ProtocolError(f"bad IP address {text[:48]!r}")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ProtocolError(f"bad IP address {text[:48]!r}") from None


def unmap(ip: IPAddress) -> IPAddress:
    """The IPv4 address behind an IPv4-mapped IPv6 address (dual-stack sockets)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise ProtocolError(f"bad port {text[:8]!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ProtocolError(f"port {port} out of range 1..65535")
    return port


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """An IP address and a UDP port."""

    ip: IPAddress
    port: int
    # The wire text, when the constructor already had it: str() of an ipaddress
    # object costs microseconds, and the tracker writes endpoints in every reply.
    _text: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ProtocolError(f"port {self.port} out of range")

    @classmethod
    def from_text(cls, text: str) -> "Endpoint":
        """Parse ``1.2.3.4:998`` or ``[2001:db8::1]:998``."""
        if not text or len(text) > _MAX_ENDPOINT_TEXT:
            raise ProtocolError(f"bad endpoint {text[:_MAX_ENDPOINT_TEXT]!r}")
        if text.startswith("["):
            close = text.find("]")
            if close < 0 or text[close + 1 : close + 2] != ":":
                raise ProtocolError(f"bad endpoint {text!r}: want [IPv6]:port")
            ip = parse_ip(text[1:close])
            if ip.version != 6:
                raise ProtocolError(f"bad endpoint {text!r}: brackets are for IPv6")
            return cls(ip, parse_port(text[close + 2 :]))
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ProtocolError(f"bad endpoint {text!r}: want IP:port or [IPv6]:port")
        ip = parse_ip(host)
        return cls(ip, parse_port(port))

    @staticmethod
    def canonical_text(text: str) -> str:
        """``Endpoint.from_text(text).to_text()``, raising as that does; text that is
        already a canonical IPv4 endpoint (nearly all of it) comes back as it is,
        checked by one regular expression instead of the ipaddress module."""
        if _CANONICAL_V4_ENDPOINT_RE.match(text):
            return text
        return Endpoint.from_text(text).to_text()

    @classmethod
    def from_sockaddr(cls, addr: tuple) -> "Endpoint":  # type: ignore[type-arg]
        """From a socket address tuple; IPv4-mapped IPv6 becomes plain IPv4.

        The kernel's own IPv4 text is canonical dotted quad, so it is turned into an
        integer directly rather than through the ipaddress module's string parser,
        and kept as the wire text.
        """
        host = str(addr[0]).split("%", 1)[0]
        port = int(addr[1])
        try:
            if ":" not in host:
                a, b, c, d = map(int, host.split("."))
                ip: IPAddress = ipaddress.IPv4Address(a << 24 | b << 16 | c << 8 | d)
                return cls(ip, port, f"{host}:{port}")
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad socket address {host!r}") from None
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
            return cls(ip, port, f"{ip}:{port}")
        return cls(ip, port)

    def to_text(self) -> str:
        if self._text:
            return self._text
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    def host_text(self) -> str:
        """The address alone, as text (no brackets)."""
        if self._text and self.ip.version == 4:
            return self._text.rsplit(":", 1)[0]
        return str(self.ip)

    def sockaddr(self) -> tuple[str, int]:
        return (str(self.ip), self.port)

    @property
    def family_name(self) -> str:
        return "IPv6" if self.ip.version == 6 else "IPv4"

    def __str__(self) -> str:
        return self.to_text()


def endpoint_source_key(ep: Endpoint) -> str:
    """:func:`source_key` of an endpoint's address, without re-formatting IPv4."""
    if ep.ip.version == 4:
        return ep.host_text()
    return source_key(ep.ip)


def source_key(ip: IPAddress) -> str:
    """The unit of per-source accounting and of "same public IP": an IPv4 address,
    or the /64 of an IPv6 address (one subscriber usually gets a whole /64)."""
    ip = unmap(ip)
    if ip.version == 6:
        net = ipaddress.IPv6Network((int(ip) >> 64 << 64, 64))
        return str(net)
    return str(ip)
