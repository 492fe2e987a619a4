"""The text protocol of the original NatTrackerServer, plus our extensions.

Requests are ASCII; the first line is the request and any further lines are
``key=value`` extensions or padding. Every class here has a symmetric pair
``to_wire()`` / ``from_wire()`` (requests are parsed with :func:`parse_request`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

from nattool.errors import ProtocolError
from nattool.protocol.endpoint import CANONICAL_IPV4, Endpoint, parse_ip

NAT_PREFIX = b"//nat"
REGISTER_PREFIX = "//51pwn/P2P&E2E/"
TRACKERS_PREFIX = "//tcksvr"
RELAY_PREFIX = "//relay/"
RELAY_REPLY_HEAD = "turn"
# A relay request is padded to this size, so that its reply may be as long as a
# registration's (the amplification rule bounds a reply by its request).
RELAY_REQUEST_PADDING = 400

MAX_GROUP_LEN = 64
MAX_LAN = 16
MAX_ANNOUNCED = 8
MAX_EXTENSIONS = 16
MAX_REASON = 60

_GROUP = r"[A-Za-z0-9._-]{1,64}"
_GROUP_RE = re.compile(_GROUP + r"\Z")
_UUID_RE = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\Z")
_MAC_RE = re.compile(
    r"(?:[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}|[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5}|[0-9A-Fa-f]{12})\Z"
)
_CANONICAL_IPV4_RE = re.compile(CANONICAL_IPV4 + r"\Z")
_CANONICAL_MAC = r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}"
_CANONICAL_MAC_RE = re.compile(_CANONICAL_MAC + r"\Z")
# One entry of the original client's field: a MAC, a dash, then a comma list of IPs.
_MACIP_RE = re.compile(
    r"([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}|[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5}|[0-9A-Fa-f]{12})-(.*)\Z"
)
_EXT_KEY_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
_HOST_RE = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


class MalformedRequest(ProtocolError):
    """A request that starts with ``//`` but is not valid: answered ``ERR <reason>``."""


class NotARequest(ProtocolError):
    """Bytes that are not ours at all: dropped silently (no reply, no reflection)."""


# --- field rules ----------------------------------------------------------------


def canonical_group(text: str) -> str:
    """Validate a group key; an RFC 4122 UUID compares case-insensitively."""
    if not _GROUP_RE.match(text):
        raise MalformedRequest("bad group: 1..64 chars of A-Z a-z 0-9 . _ -")
    if _UUID_RE.match(text):
        return text.lower()
    return text


def canonical_mac(text: str) -> str:
    """``aa:bb:cc:dd:ee:ff``, ``aa-bb-…`` or ``aabbccddeeff``, any case -> ``aa:bb:…``."""
    if _CANONICAL_MAC_RE.match(text):
        return text  # what our own clients send: nothing to rewrite
    if not _MAC_RE.match(text):
        raise MalformedRequest("bad mac")
    digits = text.replace(":", "").replace("-", "").lower()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def parse_lan_list(text: str) -> tuple[str, ...]:
    """A comma list of bare LAN addresses, canonicalised, duplicates removed."""
    if text == "0":
        return ()
    parts = text.split(",")
    if len(parts) > MAX_LAN:
        raise MalformedRequest(f"too many lan addresses (max {MAX_LAN})")
    out: list[str] = []
    for part in parts:
        addr = _canonical_ip_text(part)
        if addr not in out:
            out.append(addr)
    return tuple(out)


def _canonical_ip_text(text: str) -> str:
    """Validate an address and return its canonical text. Dotted-quad IPv4 without
    leading zeros is already canonical, so one regex match decides it (several times
    cheaper than ipaddress); anything else goes through ipaddress."""
    if _CANONICAL_IPV4_RE.match(text):
        return text
    if "." in text and ":" not in text:
        raise MalformedRequest("bad lan address")
    try:
        return str(parse_ip(text))
    except ProtocolError:
        raise MalformedRequest("bad lan address") from None


def _parse_extensions(lines: list[str]) -> dict[str, str]:
    """``key=value`` lines; anything else is padding, unknown keys are kept but ignored."""
    ext: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and _EXT_KEY_RE.match(key) and len(ext) < MAX_EXTENSIONS and len(value) <= 64:
            ext.setdefault(key, value)
    return ext


def _ext_wire(ext: dict[str, str]) -> str:
    return "".join(f"\n{k}={v}" for k, v in ext.items())


# --- requests ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatRequest:
    """``//nat``: who am I."""

    extensions: dict[str, str] = field(default_factory=dict, compare=False)

    def to_wire(self) -> bytes:
        return (NAT_PREFIX.decode() + _ext_wire(self.extensions)).encode("ascii")


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """Register in a group and get its members.

    ``form`` is ``"seed"`` (4 fields: group/public/lan/mac) or ``"original"`` (the
    original Go client's 3 fields: group/public/mac-ip list).
    """

    group: str
    public: Endpoint | None = None  # None: use the observed source endpoint
    lan: tuple[str, ...] = ()
    identity: str | None = None  # canonical MAC, or None
    form: str = "seed"
    extensions: dict[str, str] = field(default_factory=dict, compare=False)
    padding: int = field(default=0, compare=False)  # bytes of padding to add on the wire

    @property
    def offset(self) -> int:
        """The paging extension: how many of the other members to skip."""
        value = self.extensions.get("offset", "0")
        if not value.isdigit() or len(value) > 6:
            raise MalformedRequest("bad offset")
        return int(value)

    @property
    def wants_paging(self) -> bool:
        return "offset" in self.extensions

    def to_wire(self) -> bytes:
        public = self.public.to_text() if self.public else "0"
        if self.form == "original":
            if self.identity is None and not self.lan:
                third = "0"
            else:
                mac = self.identity or "00:00:00:00:00:00"
                third = f"{mac}-{','.join(self.lan)}"
            head = f"{REGISTER_PREFIX}{self.group}/{public}/{third}"
        else:
            lan = ",".join(self.lan) if self.lan else "0"
            head = f"{REGISTER_PREFIX}{self.group}/{public}/{lan}/{self.identity or '0'}"
        text = head + _ext_wire(self.extensions)
        if self.padding:
            text += "\n" + " " * max(0, self.padding - 1)
        return text.encode("ascii")


@dataclass(frozen=True, slots=True)
class TrackersRequest:
    """``//tcksvr``: list the known trackers."""

    def to_wire(self) -> bytes:
        return TRACKERS_PREFIX.encode()


@dataclass(frozen=True, slots=True)
class AnnounceRequest:
    """``//tcksvr/<ip:port>[;<ip:port>…]``: a tracker announces itself."""

    endpoints: tuple[Endpoint, ...]

    def to_wire(self) -> bytes:
        return (TRACKERS_PREFIX + "/" + ";".join(e.to_text() for e in self.endpoints)).encode()


@dataclass(frozen=True, slots=True)
class RelayRequest:
    """``//relay/<group>``: TURN credentials for the members of a group, and the
    relayed endpoints of the group's live allocations (extension, ``serve --relay``)."""

    group: str
    padding: int = field(default=RELAY_REQUEST_PADDING, compare=False)

    def to_wire(self) -> bytes:
        text = RELAY_PREFIX + self.group
        if self.padding > len(text) + 1:
            text += "\n" + " " * (self.padding - len(text) - 1)
        return text.encode("ascii")


Request = Union[NatRequest, RegisterRequest, TrackersRequest, AnnounceRequest, RelayRequest]


def _decode_first_line(data: bytes) -> tuple[str, list[str]]:
    if not data.startswith(b"//"):
        raise NotARequest("not a text request")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedRequest("not ascii") from None
    first, *rest = text.split("\n")
    # Tolerate what sloppy clients append to the only line they send.
    return first.rstrip(" \r\t\x00"), rest


def parse_request(data: bytes) -> Request:
    """Parse one request datagram.

    Raises NotARequest (drop silently) or MalformedRequest (answer ``ERR``).
    """
    first, rest = _decode_first_line(data)
    ext = _parse_extensions(rest) if rest else {}
    if first == "//nat":
        return NatRequest(ext)
    if first.startswith(REGISTER_PREFIX):
        return _parse_register(first[len(REGISTER_PREFIX) :], ext)
    if first == TRACKERS_PREFIX:
        return TrackersRequest()
    if first.startswith(TRACKERS_PREFIX + "/"):
        return _parse_announce(first[len(TRACKERS_PREFIX) + 1 :])
    if first.startswith(RELAY_PREFIX):
        return RelayRequest(canonical_group(first[len(RELAY_PREFIX) :]), padding=len(data))
    raise MalformedRequest("unknown request")


# The registration nearly every client sends, decided by one regex over the bytes:
# seed form, no public endpoint, canonical IPv4 LAN addresses, a canonical MAC (or
# none), a single line. Anything else -- and any input this pattern does not accept --
# goes through parse_request, which stays the definition of the protocol. The
# repeats are possessive: none of them can match the character that ends it.
_SEED_REGISTER_RE = re.compile(
    (
        re.escape(REGISTER_PREFIX)
        + rf"({_GROUP}+)/0/(0|{CANONICAL_IPV4}(?:,{CANONICAL_IPV4}){{0,{MAX_LAN - 1}}}+)"
        + rf"/(0|{_CANONICAL_MAC})[ \r\t\x00]*+"
    ).encode()
)


def parse_seed_register(data: bytes) -> tuple[str, str, str | None] | None:
    """``(group, lan_text, identity)`` of a plain seed-form registration, or None when
    :func:`parse_request` must decide (other forms, extensions, errors).

    Equal to what parse_request gives for the inputs it accepts (a property test
    holds the two together), at a fraction of the cost: no request object, the LAN
    list stays the comma text the store keeps.
    """
    match = _SEED_REGISTER_RE.fullmatch(data)
    if match is None:
        return None
    group_b, lan_b, mac_b = match.groups()
    if lan_b == b"0":
        lan = ""
    else:
        lan = lan_b.decode()
        if "," in lan:
            parts = lan.split(",")
            if len(set(parts)) != len(parts):
                return None  # duplicates: parse_lan_list drops them
    group = group_b.decode()
    if len(group) == 36 and group != (lower := group.lower()) and _UUID_RE.match(group):
        group = lower
    return group, lan, None if mac_b == b"0" else mac_b.decode()


def _parse_public(text: str) -> Endpoint | None:
    if text == "0":
        return None
    try:
        return Endpoint.from_text(text)
    except ProtocolError:
        raise MalformedRequest("bad public endpoint") from None


def _parse_register(rest: str, ext: dict[str, str]) -> RegisterRequest:
    fields = rest.split("/")
    if len(fields) == 4:
        group, public, lan, mac = fields
        return RegisterRequest(
            group=canonical_group(group),
            public=_parse_public(public),
            lan=parse_lan_list(lan),
            identity=None if mac == "0" else canonical_mac(mac),
            form="seed",
            extensions=ext,
        )
    if len(fields) == 3:
        group, public, macip = fields
        identity, lan = parse_original_macip(macip)
        return RegisterRequest(
            group=canonical_group(group),
            public=_parse_public(public),
            lan=lan,
            identity=identity,
            form="original",
            extensions=ext,
        )
    raise MalformedRequest("register wants group/public/lan/mac")


def parse_original_macip(text: str) -> tuple[str | None, tuple[str, ...]]:
    """The original client's ``<mac>-<ip>,<ip>[;<mac>-<ip>,...]`` field.

    Returns the first MAC (the node's identity) and every IP as its LAN list.
    """
    if text in ("0", ""):
        return None, ()
    identity: str | None = None
    lan: list[str] = []
    for entry in text.split(";"):
        if not entry:
            continue
        match = _MACIP_RE.match(entry)
        if match is None:
            raise MalformedRequest("bad mac-ip list")
        mac = canonical_mac(match.group(1))
        if identity is None:
            identity = mac
        if match.group(2):
            for addr in parse_lan_list(match.group(2)):
                if addr not in lan:
                    lan.append(addr)
        if len(lan) > MAX_LAN:
            raise MalformedRequest(f"too many lan addresses (max {MAX_LAN})")
    return identity, tuple(lan)


def _parse_announce(rest: str) -> AnnounceRequest:
    parts = rest.split(";")
    if not rest or len(parts) > MAX_ANNOUNCED:
        raise MalformedRequest(f"announce 1..{MAX_ANNOUNCED} endpoints")
    try:
        eps = tuple(Endpoint.from_text(p) for p in parts)
    except ProtocolError:
        raise MalformedRequest("bad tracker endpoint") from None
    return AnnounceRequest(eps)


# --- replies ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatReply:
    endpoint: Endpoint

    def to_wire(self) -> bytes:
        return self.endpoint.to_text().encode()

    @classmethod
    def from_wire(cls, data: bytes) -> "NatReply":
        text = _reply_text(data).strip()
        try:
            return cls(Endpoint.from_text(text))
        except ProtocolError:
            raise ProtocolError(f"not a //nat reply: {text[:64]!r}") from None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    reason: str

    def to_wire(self) -> bytes:
        return b"ERR " + self.reason[:MAX_REASON].encode("ascii", "replace")

    @classmethod
    def from_wire(cls, data: bytes) -> "ErrorReply":
        text = _reply_text(data)
        if not text.startswith("ERR"):
            raise ProtocolError("not an ERR reply")
        return cls(text[3:].strip())


@dataclass(frozen=True, slots=True)
class MemberEntry:
    endpoint: Endpoint
    lan: tuple[str, ...] = ()

    def to_text(self) -> str:
        if self.lan:
            return f"{self.endpoint.to_text()};{','.join(self.lan)}"
        return self.endpoint.to_text()


@dataclass(frozen=True, slots=True)
class MemberList:
    """A registration reply: the requester's own entry first, then members newest first.

    ``next_offset`` is the paging extension (a ``next=N`` line), only ever sent to a
    client that asked for paging.
    """

    entries: tuple[MemberEntry, ...]
    next_offset: int | None = None
    dialect: str = "nattool"  # or "original": the Go server's "<ep>,<mac-ip>" lines

    def to_wire(self) -> bytes:
        lines = [e.to_text() for e in self.entries]
        if self.next_offset is not None:
            lines.append(f"next={self.next_offset}")
        return "\n".join(lines).encode("ascii")

    @classmethod
    def from_wire(cls, data: bytes) -> "MemberList":
        """Read our replies and the original Go server's."""
        text = _reply_text(data)
        if text.startswith("ERR"):
            raise ProtocolError(f"tracker refused: {text[:80]}")
        entries: list[MemberEntry] = []
        next_offset: int | None = None
        dialect = "nattool"
        for line in text.split("\n"):
            line = line.strip()
            if not line:
                continue
            if line.startswith("next="):
                value = line[5:]
                if not value.isdigit() or len(value) > 6:
                    raise ProtocolError("bad next= line")
                next_offset = int(value)
                continue
            if ";" in line and "," not in line.split(";", 1)[0]:
                ep_text, lan_text = line.split(";", 1)
                lan = parse_lan_list(lan_text) if lan_text else ()
            elif "," in line:
                # The original server: "<ip:port>,<mac>-<ip>,<ip>[;...]" verbatim.
                ep_text, macip = line.split(",", 1)
                _, lan = parse_original_macip(macip)
                dialect = "original"
            else:
                ep_text, lan = line, ()
            try:
                endpoint = Endpoint.from_text(ep_text)
            except ProtocolError:
                raise ProtocolError(f"bad member line {line[:80]!r}") from None
            entries.append(MemberEntry(endpoint, lan))
        if not entries:
            raise ProtocolError("empty member list")
        return cls(tuple(entries), next_offset, dialect)


@dataclass(frozen=True, slots=True)
class TrackerList:
    """``host:port`` lines; an empty datagram is an empty list."""

    trackers: tuple[str, ...]

    def to_wire(self) -> bytes:
        return "\n".join(self.trackers).encode("ascii")

    @classmethod
    def from_wire(cls, data: bytes) -> "TrackerList":
        text = _reply_text(data)
        if text.startswith("ERR"):
            raise ProtocolError(f"tracker refused: {text[:80]}")
        out: list[str] = []
        for line in text.split("\n"):
            line = line.strip()
            if not line:
                continue
            out.append(validate_tracker_text(line))
        return cls(tuple(out))


_REALM_RE = re.compile(r"[!-~]{1,127}\Z")
_RELAY_WORD_RE = re.compile(r"[!-~]{1,513}\Z")


def valid_realm(text: str) -> bool:
    """A realm the ``turn`` line can carry: printable ASCII, no spaces, < 128 chars."""
    return _REALM_RE.match(text) is not None


@dataclass(frozen=True, slots=True)
class RelayGrant:
    """The reply to ``//relay/<group>``: TURN long-term credentials valid for
    ``lifetime`` seconds, and the relayed endpoints of other live allocations of the
    group (most recent first; cut to the reply's size bound)."""

    username: str
    password: str
    lifetime: int
    realm: str
    relayed: tuple[Endpoint, ...] = ()

    def to_wire(self) -> bytes:
        head = f"{RELAY_REPLY_HEAD} {self.username} {self.password} {self.lifetime} {self.realm}"
        return "\n".join([head, *(e.to_text() for e in self.relayed)]).encode("ascii")

    def head_len(self) -> int:
        """Bytes of the ``turn`` line alone."""
        return len(RELAY_REPLY_HEAD) + len(self.username) + len(self.password) + len(str(self.lifetime)) + len(self.realm) + 4

    @classmethod
    def from_wire(cls, data: bytes) -> "RelayGrant":
        text = _reply_text(data)
        if text.startswith("ERR"):
            raise ProtocolError(f"tracker refused: {text[:80]}")
        first, *rest = text.split("\n")
        words = first.strip().split(" ")
        if (
            len(words) != 5
            or words[0] != RELAY_REPLY_HEAD
            or not all(_RELAY_WORD_RE.match(w) for w in words[1:])
            or not words[3].isdigit()
            or len(words[3]) > 6
            or not valid_realm(words[4])
        ):
            raise ProtocolError(f"not a relay reply: {first[:80]!r}")
        relayed = []
        for line in rest:
            line = line.strip()
            if not line:
                continue
            try:
                relayed.append(Endpoint.from_text(line))
            except ProtocolError:
                raise ProtocolError(f"bad relayed endpoint line {line[:80]!r}") from None
        return cls(words[1], words[2], int(words[3]), words[4], tuple(relayed))


def validate_tracker_text(text: str) -> str:
    """A ``host:port`` or endpoint as a tracker list carries it, canonicalised."""
    try:
        return Endpoint.canonical_text(text)
    except ProtocolError:
        pass
    host, sep, port = text.rpartition(":")
    if sep and _HOST_RE.match(host) and port.isdigit() and 0 < int(port) < 65536 and len(port) <= 5:
        return f"{host.lower()}:{int(port)}"
    raise ProtocolError(f"bad tracker line {text[:80]!r}")


def _reply_text(data: bytes) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("reply is not ascii") from None
