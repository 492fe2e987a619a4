"""The tracker's STUN server decisions (RFC 8489 Binding, RFC 3489 classic, RFC 5780).

Pure: given a datagram, where it came from and which local socket received it, decide
the reply (bytes, which local socket sends it, to where) or ``None`` (drop).

Socket model. The server binds up to four UDP sockets, listed by
:meth:`StunResponder.local_endpoints` (the first is the primary)::

    (primary ip, primary port)   always -- the tracker port
    (primary ip, alt port)       with alt_port
    (alt ip,     primary port)   with alt_ip
    (alt ip,     alt port)       with alt_ip and alt_port

Each socket has a role ``(ip_is_alt, port_is_alt)``. A Binding request arriving on role
``(i, p)`` is answered from role ``(i ^ change_ip, p ^ change_port)``; OTHER-ADDRESS (and
RFC 3489 CHANGED-ADDRESS) names the socket that differs in every dimension the server can
change.

CHANGE-REQUEST that the server cannot honour (no alternate address / port for the flag
asked) is answered with 420 (Unknown Attribute) listing CHANGE-REQUEST, as RFC 5780
section 6.1 prescribes for a server without the alternate address, and as an RFC 5389-only
server answers anyway. The server never answers such a request from the socket it arrived
on: that silent fallback is exactly what makes old tools call every NAT "full cone".
A classic (RFC 3489, no magic cookie) request gets no answer at all instead: RFC 3489
servers always honour CHANGE-REQUEST, so its clients take any answer to tests II and III
as "the NAT let it in" (Debian's stun-client then reports an independent filter; pystun3
resends on an error reply forever). Silence reads to them as filtering, the cautious verdict.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Optional

from nattool import __version__
from nattool.errors import ConfigError, ProtocolError
from ipaddress import IPv4Address, IPv6Address

from nattool.protocol.endpoint import Endpoint, IPAddress
from nattool.protocol.limits import SAFE_DATAGRAM, reply_budget
from nattool.protocol.stun import (
    MAGIC_COOKIE,
    AttrType,
    Attribute,
    ChangedAddress,
    ChangeRequest,
    ErrorCode,
    MappedAddress,
    Method,
    MsgClass,
    OtherAddress,
    ResponseOrigin,
    ResponsePort,
    Software,
    SourceAddress,
    StunMessage,
    UnknownAttributes,
    XorMappedAddress,
    attr_type,
    is_comprehension_required,
    is_stun,
    parse,
)

# Comprehension-required attributes a Binding request may carry that we understand
# (address attributes and credentials in a request are understood and ignored: this
# server has no credentials to check). CHANGE-REQUEST and RESPONSE-PORT are decided
# separately because support depends on configuration.
_UNDERSTOOD = frozenset(
    {
        AttrType.MAPPED_ADDRESS,
        AttrType.SOURCE_ADDRESS,
        AttrType.CHANGED_ADDRESS,
        AttrType.USERNAME,
        AttrType.MESSAGE_INTEGRITY,
        AttrType.MESSAGE_INTEGRITY_SHA256,
        AttrType.ERROR_CODE,
        AttrType.UNKNOWN_ATTRIBUTES,
        AttrType.XOR_MAPPED_ADDRESS,
        AttrType.PADDING,
    }
)

Role = tuple[bool, bool]  # (ip is the alternate, port is the alternate)

_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
# Binding request, message length 0, magic cookie: a bare RFC 8489 Binding request.
_BARE_BINDING_HEAD = b"\x00\x01\x00\x00" + _COOKIE
_MISSING = object()


def is_bare_binding(data: bytes) -> bool:
    """A bare RFC 8489 Binding request: 20 bytes, no attributes."""
    return len(data) == 20 and data[:8] == _BARE_BINDING_HEAD


@dataclass(frozen=True, slots=True)
class StunReply:
    data: bytes
    send_from: Endpoint  # one of StunResponder.local_endpoints(): send with that socket
    dest: Endpoint


class StunResponder:
    """STUN decisions for one address family's set of sockets (make one per primary).

    ``primary`` is the tracker's own bound address. With ``alt_ip`` and/or ``alt_port``
    it is an RFC 5780 server; that needs a concrete primary IP (not 0.0.0.0 / ::),
    since RESPONSE-ORIGIN and OTHER-ADDRESS must name real addresses.
    """

    def __init__(
        self,
        primary: Endpoint,
        *,
        alt_ip: Optional[IPAddress] = None,
        alt_port: Optional[int] = None,
        software: Optional[str] = f"nattool/{__version__}",
        safe_datagram: int = SAFE_DATAGRAM,
        allow_response_port: bool = True,
    ) -> None:
        if alt_ip is not None or alt_port is not None:
            if primary.ip.is_unspecified:
                raise ConfigError(
                    "an alternate STUN address/port needs a concrete primary address, "
                    f"not {primary.ip} (RESPONSE-ORIGIN and OTHER-ADDRESS must be real)"
                )
            if primary.port == 0:
                raise ConfigError("an alternate STUN port needs a fixed primary port")
        if alt_ip is not None and (alt_ip.version != primary.ip.version or alt_ip == primary.ip):
            raise ConfigError(f"alternate address {alt_ip} must differ from {primary.ip} in the same family")
        if alt_port is not None and not (1 <= alt_port <= 65535 and alt_port != primary.port):
            raise ConfigError(f"alternate port {alt_port} must be 1..65535 and differ from {primary.port}")
        self.primary = primary
        self.alt_ip = alt_ip
        self.alt_port = alt_port
        self.software = software
        self.safe_datagram = safe_datagram
        self.allow_response_port = allow_response_port
        self._by_role: dict[Role, Endpoint] = {}
        for ip_alt in (False, True):
            for port_alt in (False, True):
                if (ip_alt and alt_ip is None) or (port_alt and alt_port is None):
                    continue
                ip = alt_ip if ip_alt else primary.ip
                port = alt_port if port_alt else primary.port
                assert ip is not None and port is not None
                self._by_role[(ip_alt, port_alt)] = Endpoint(ip, port)
        self._role_of = {ep: role for role, ep in self._by_role.items()}
        # (local endpoint, IP version) -> reply builder for bare Binding requests
        self._bare_builders: dict[tuple[Endpoint, int], object] = {}

    @property
    def rfc5780(self) -> bool:
        return self.alt_ip is not None or self.alt_port is not None

    def local_endpoints(self) -> tuple[Endpoint, ...]:
        """Sockets to bind, primary first: (P,P), (P,alt port), (alt ip,P), (alt ip,alt port)."""
        return tuple(self._by_role.values())

    def _other_role(self, role: Role) -> Role:
        return (role[0] ^ (self.alt_ip is not None), role[1] ^ (self.alt_port is not None))

    def bare_binding_reply(self, data: bytes, src_ip_packed: bytes, src_port: int, local: Endpoint) -> Optional[bytes]:
        """The answer to a bare RFC 8489 Binding request (20 bytes, no attributes) that
        goes back to its sender from the socket it arrived on -- the common case,
        built from a cached template with no parsing. Byte for byte what
        :meth:`respond` builds (a test proves it). None: use :meth:`respond`.

        ``src_ip_packed`` is the 4- or 16-byte source address.
        """
        if not is_bare_binding(data) or src_port == 0:
            return None
        build = self.bare_binding_builder(local, 4 if len(src_ip_packed) == 4 else 6)
        return None if build is None else build(data, int.from_bytes(src_ip_packed, "big"), src_port)

    def bare_binding_builder(self, local: Endpoint, version: int) -> Optional[Callable[[bytes, int, int], bytes]]:
        """A function (bare request, source address as an integer, source port) ->
        reply for requests from ``version`` sources arriving on ``local``, with
        everything constant bound in advance (cached): the server calls it straight
        from its receive loop, with the address from its own cache of source texts.
        The caller checks the request is bare (:func:`is_bare_binding`). None when
        this socket's replies do not follow the template."""
        key = (local, version)
        build = self._bare_builders.get(key, _MISSING)
        if build is _MISSING:
            build = self._bare_builders[key] = self._make_builder(local, version)
        return build  # type: ignore[return-value]

    def _make_builder(self, local: Endpoint, version: int) -> Optional[Callable[[bytes, int, int], bytes]]:
        template = self._bare_template(local, version)
        if template is None:
            return None
        length, tail = template
        head = b"\x01\x01" + length + _COOKIE
        family_len = b"\x00\x08\x00\x01" if version == 4 else b"\x00\x14\x00\x02"
        xma = b"\x00\x20" + family_len
        ma = b"\x00\x01" + family_len
        if version == 4:
            # One C call lays out the whole reply: header, transaction id,
            # XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, then the constant attributes.
            pack = struct.Struct(f"!8s12s6sHI6sHI{len(tail)}s").pack

            def build(data: bytes, address: int, port: int) -> bytes:
                return pack(head, data[8:20], xma, port ^ 0x2112, address ^ MAGIC_COOKIE, ma, port, address, tail)

        else:
            join = b"".join

            def build(data: bytes, address: int, port: int) -> bytes:
                txid = data[8:20]
                x = address ^ int.from_bytes(_COOKIE + txid, "big")
                return join(
                    (head, txid, xma, (port ^ 0x2112).to_bytes(2, "big"), x.to_bytes(16, "big"),
                     ma, port.to_bytes(2, "big"), address.to_bytes(16, "big"), tail)
                )

        return build

    def _bare_template(self, local: Endpoint, version: int) -> Optional[tuple[bytes, bytes]]:
        """Learn the reply layout from the full path, once per socket and family."""
        sample_ip = IPv4Address("192.0.2.1") if version == 4 else IPv6Address("2001:db8::1")
        sample = Endpoint(sample_ip, 1)
        request = _BARE_BINDING_HEAD + bytes(12)
        reply = self.respond(request, sample, local)
        if reply is None or reply.send_from != local or reply.dest != sample:
            return None
        addr_len = 8 if version == 4 else 20
        head = 20 + 2 * (4 + addr_len)
        body = reply.data
        if len(body) < head or body[20:22] != b"\x00\x20" or body[20 + 4 + addr_len : 22 + 4 + addr_len] != b"\x00\x01":
            return None
        return body[2:4], body[head:]

    def respond(self, data: bytes, src: Endpoint, local: Endpoint) -> Optional[StunReply]:
        """Decide the answer to ``data`` from ``src`` that arrived on socket ``local``."""
        if not is_stun(data) or src.port == 0:
            return None
        try:
            req = parse(data)
        except ProtocolError:
            return None
        # Only requests are answered: answering responses or indications would let two
        # servers bounce datagrams at each other forever.
        if req.msg_class != MsgClass.REQUEST or req.method != Method.BINDING:
            return None
        role = self._role_of.get(local)
        if role is None:
            if self.rfc5780:
                return None  # a socket we do not know: cannot say what it is
            role = (False, False)
            here = local
        else:
            here = self._by_role[role]

        unknown: list[int] = []
        change = req.get(ChangeRequest)
        response_port = req.get(ResponsePort)
        for attr in req.attributes:
            t = attr_type(attr)
            if not is_comprehension_required(t) or t in _UNDERSTOOD:
                continue
            if t == AttrType.CHANGE_REQUEST:
                assert isinstance(change, ChangeRequest)
                if (change.change_ip and self.alt_ip is None) or (change.change_port and self.alt_port is None):
                    unknown.append(t)
                continue
            if t == AttrType.RESPONSE_PORT and self.allow_response_port:
                continue
            unknown.append(t)

        dest = src
        if not unknown and isinstance(response_port, ResponsePort) and self.allow_response_port:
            if response_port.port == 0:
                return None
            # RFC 5780 section 7.5: same IP, other port -- never another host.
            dest = Endpoint(src.ip, response_port.port)

        if unknown and req.classic and AttrType.CHANGE_REQUEST in unknown:
            return None  # see the module doc: to an RFC 3489 client an error is an answer
        budget = reply_budget(len(data), self.safe_datagram)
        fingerprint = req.has_fingerprint
        if unknown:
            return self._error_420(req, unknown, src, here, budget, fingerprint)

        send_role = role
        if isinstance(change, ChangeRequest):
            send_role = (role[0] ^ change.change_ip, role[1] ^ change.change_port)
        send_from = self._by_role.get(send_role, here)
        other = self._by_role.get(self._other_role(role)) if self.rfc5780 else None

        # (attribute, droppable) in wire order; dropped in `drop_order` until it fits.
        must: list[Attribute]
        optional: dict[str, Attribute] = {}
        if req.classic:
            must = [MappedAddress(src)]
            if self.rfc5780:
                optional["source"] = SourceAddress(send_from)
                if other is not None:
                    optional["other"] = ChangedAddress(other)
        else:
            must = [XorMappedAddress(src)]
            optional["mapped"] = MappedAddress(src)
            if self.rfc5780:
                optional["origin"] = ResponseOrigin(send_from)
                if other is not None:
                    optional["other"] = OtherAddress(other)
        if self.software and not req.classic:
            # RFC 3489 clients know no padding: a SOFTWARE value whose length is not a
            # multiple of 4 makes them read the next attribute from the wrong offset.
            optional["software"] = Software(self.software)
        drop_order = ["software", "fingerprint", "mapped", "source", "origin", "other"]
        data_out = self._fit(req, MsgClass.SUCCESS, must, optional, fingerprint, drop_order, budget)
        if data_out is None:
            return None
        return StunReply(data_out, send_from, dest)

    def _error_420(
        self,
        req: StunMessage,
        unknown: list[int],
        src: Endpoint,
        here: Endpoint,
        budget: int,
        fingerprint: bool,
    ) -> Optional[StunReply]:
        types = tuple(dict.fromkeys(unknown))
        # Header 20 + ERROR-CODE 4+4+16 ("Unknown Attribute") + UNKNOWN-ATTRIBUTES header 4:
        # cut the list so even the minimal reply fits the budget.
        room = max(0, (budget - 20 - 24 - 4) // 2)
        if req.classic:
            room -= room % 2  # room for the repeated type below
        types = types[: max(1, room)]
        if req.classic and len(types) % 2:
            # RFC 3489 section 11.2.10: an odd list repeats one type, so that the
            # attribute needs no padding, which classic clients cannot skip.
            types = (*types, types[-1])
        reason = "Unknown Attribute"
        if req.classic:
            # RFC 3489 section 11.2.9: the reason phrase's length is a multiple of 4.
            reason = reason.ljust(-(-len(reason) // 4) * 4)
        must: list[Attribute] = [ErrorCode(420, reason), UnknownAttributes(types)]
        optional: dict[str, Attribute] = {}
        if self.software and not req.classic:
            optional["software"] = Software(self.software)
        data_out = self._fit(req, MsgClass.ERROR, must, optional, fingerprint, ["software", "fingerprint"], budget)
        if data_out is None:
            return None
        return StunReply(data_out, here, src)

    def _fit(
        self,
        req: StunMessage,
        cls: MsgClass,
        must: list[Attribute],
        optional: dict[str, Attribute],
        fingerprint: bool,
        drop_order: list[str],
        budget: int,
    ) -> Optional[bytes]:
        for n_dropped in range(len(drop_order) + 1):
            dropped = set(drop_order[:n_dropped])
            attrs = list(must) + [a for k, a in optional.items() if k not in dropped]
            fp = fingerprint and "fingerprint" not in dropped
            try:
                out = StunMessage(cls, req.method, req.transaction_id, tuple(attrs)).to_wire(fingerprint=fp)
            except ProtocolError:
                return None
            if len(out) <= budget:
                return out
        return None
