"""What a `connect` session tells its owner: typed, frozen events (pure).

:class:`nattool.protocol.connect_session.ConnectSession` queues them and its owner reads
them with ``next_event()``, as aioquic's ``quic/events.py``. Peers are named by their
session id as hex (``peer_id``): a member's endpoint can change (a path goes down and
another comes up), its session id cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional, Union

from nattool.exit_codes import ExitCode
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.keepalive_rules import KeepalivePlan


class PathKind(str, Enum):
    """How a path reaches the peer (the JSON ``path`` field). Room for more ways: a
    port mapping (PCP/NAT-PMP), another local socket."""

    INTERNET = "internet"  # direct, to a public endpoint
    LAN = "lan"  # direct, inside the LAN both members sit in
    RELAY = "relay"  # through a TURN allocation, to the peer's relayed endpoint

    @property
    def via(self) -> str:
        """The JSON ``via`` field: "direct", "lan" or "relay"."""
        return "direct" if self is PathKind.INTERNET else self.value

    @property
    def rank(self) -> int:
        """Preference: lower is better (LAN, then the Internet, then a relay)."""
        return (PathKind.LAN, PathKind.INTERNET, PathKind.RELAY).index(self)


class PathMethod(str, Enum):
    """How a path was opened (the JSON ``method`` field)."""

    LAN = "lan"  # a LAN address of a member behind our own public IP
    PUNCH = "punch"  # simultaneous pings to the endpoints the trackers saw
    PORTMAP = "portmap"  # through a port mapping a gateway granted (PCP, NAT-PMP, UPnP IGD)
    BIRTHDAY = "birthday"  # many ports on the hard side, random probes from the easy side
    PREDICT = "predict"  # ports of a sequential or port-preserving NAT, predicted
    RELAY = "relay"  # through a TURN allocation

    @classmethod
    def of_kind(cls, kind: "PathKind") -> "PathMethod":
        """The method a path of ``kind`` has when nothing more is known."""
        return {PathKind.LAN: cls.LAN, PathKind.RELAY: cls.RELAY}.get(kind, cls.PUNCH)


class CandidateSource(str, Enum):
    """Where an endpoint to probe came from."""

    TRACKER = "tracker"  # the member's public endpoint, as a tracker listed it
    LAN_GUESS = "lan-guess"  # one of the member's LAN addresses at a likely port
    PEER_REFLEXIVE = "peer-reflexive"  # an authenticated ping came from there (its NAT's mapping toward us)
    RELAY = "relay"  # a relayed endpoint of the group, as the relaying tracker listed it


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why no path could be opened to a member, from what the trackers showed."""

    impossible: bool  # both NATs map per destination: punching cannot work
    reason: str
    mine: Optional[str]  # our mapping: EI, ED or None (unknown)
    mine_reason: str
    theirs: Optional[str]  # the member's mapping
    theirs_reason: str


@dataclass(frozen=True, slots=True)
class Registered:
    """A tracker answered a registration and saw us at ``public`` (sent again when it
    sees us somewhere else)."""

    tracker: Endpoint
    public: Endpoint
    form: str  # the registration form it accepted: "seed" or "original"


@dataclass(frozen=True, slots=True)
class MemberSeen:
    """A tracker listed a member we did not know: its candidates are being probed."""

    member: Endpoint
    lan: tuple[str, ...]
    tracker: Endpoint


@dataclass(frozen=True, slots=True)
class PathUp:
    """A ping came back as an authenticated pong from the very endpoint it went to."""

    peer_id: str
    endpoint: Endpoint
    kind: PathKind
    source: CandidateSource
    rtt: float  # s
    open_time: float  # s from the first probe of the candidate
    since_start: float  # s from the start of the session
    observed_as: str  # where the peer saw us (its pong says)
    method: PathMethod = PathMethod.PUNCH

    @property
    def via(self) -> str:
        return self.kind.via


@dataclass(frozen=True, slots=True)
class PathDown:
    peer_id: str
    endpoint: Optional[Endpoint]
    kind: PathKind
    reason: str

    @property
    def via(self) -> str:
        return self.kind.via


@dataclass(frozen=True, slots=True)
class StreamWanted:
    """The owner should reach ``tracker`` over TCP (same port, framed: see
    :mod:`nattool.protocol.stream_frames`) and then call ``stream_opened`` or
    ``stream_failed``: no tracker answered over UDP, or TCP was asked for."""

    tracker: Endpoint
    reason: str


@dataclass(frozen=True, slots=True)
class RelayAllocated:
    """A TURN allocation at ``server`` is ours: peers that cannot be reached directly
    are pinged through it at their relayed endpoints."""

    server: Endpoint
    relayed: Endpoint


@dataclass(frozen=True, slots=True)
class RelayLost:
    """No relay (any more): the allocation failed or expired, or no tracker offers one."""

    server: Optional[Endpoint]
    reason: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A DATA message, delivered once (retransmissions are acknowledged, not repeated)."""

    peer_id: str
    endpoint: Endpoint  # the peer's path in use, or where the message came from
    data: bytes


@dataclass(frozen=True, slots=True)
class Queued:
    """A message sent while no path was up: it waits for the first one."""


@dataclass(frozen=True, slots=True)
class Undelivered:
    peer_id: str
    endpoint: Optional[Endpoint]
    reason: str


@dataclass(frozen=True, slots=True)
class GaveUp:
    """No path to ``member`` (or, with ``member`` None, to anyone in the group)."""

    member: Optional[Endpoint]
    reason: str
    verdict: Optional[Verdict] = None  # for a member: what its mapping and ours say
    tried: Optional[float] = None  # s spent probing the member

    @property
    def impossible(self) -> bool:
        return self.verdict is not None and self.verdict.impossible


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """The session is over; ``exit_code`` is what `nattool connect` exits with."""

    exit_code: ExitCode
    reason: str


# --------------------------------------------------------------------------- birthday punching


@dataclass(frozen=True, slots=True)
class BirthdayStarted:
    """Birthday punching or port prediction toward ``member`` begins (see
    :mod:`nattool.protocol.birthday`): ``role`` "open-ports" (our NAT maps per destination:
    many sockets ping the member) or "probe" (the member's does: we ping its ports);
    ``method`` BIRTHDAY or PREDICT; ``pattern`` how the per-destination NAT picks ports."""

    member: Endpoint
    role: str
    method: PathMethod
    pattern: str
    reason: str
    rate: float  # probes per second
    budget: int  # probes in all


@dataclass(frozen=True, slots=True)
class BirthdayEnded:
    """The attempt toward ``member`` is over: a direct path is up (``up``), or its
    budget is spent; ``probes`` it sent, ``elapsed`` s since it began."""

    member: Endpoint
    method: PathMethod
    up: bool
    probes: int
    elapsed: float
    reason: str


@dataclass(frozen=True, slots=True)
class ExtraSockets:
    """The owner should have exactly these extra local sockets open (indices from 1;
    the session's own socket is 0), of IP version ``ip_version``: opened when birthday
    punching starts, all but the one a path lives on closed once it is up."""

    wanted: tuple[int, ...]
    ip_version: int = 4


# --------------------------------------------------------------------------- keepalive


@dataclass(frozen=True, slots=True)
class KeepaliveSet:
    """The keepalive interval in force and where it came from: given, measured on this
    network (with the measurement's age) or the default. Again when it changes (a
    measurement made in the background)."""

    plan: KeepalivePlan


class MappingChange(str, Enum):
    """What happened to the port mapping of the session's socket (the JSON ``change``)."""

    GRANTED = "granted"  # a gateway mapped our port: its external endpoint is offered to the peers
    RENEWED = "renewed"  # renewed before expiry (the external endpoint may have moved)
    LOST = "lost"  # renewal failed or the gateway took it back: peers get the endpoint the trackers see
    NONE = "none"  # no gateway offered a mapping in time (or --no-portmap): registration goes on without
    REFUSED = "refused"  # a tracker refused the mapped endpoint (double NAT): `0` at that tracker
    DELETED = "deleted"  # given back at the end of the session


@dataclass(frozen=True, slots=True)
class PortMapped:
    """The port mapping of the session's socket: which protocol granted which external
    endpoint for how long, and when it is renewed, lost, refused by a tracker or deleted."""

    change: MappingChange
    protocol: Optional[str] = None  # "pcp", "natpmp" or "upnp"
    external: Optional[Endpoint] = None
    lifetime: Optional[float] = None  # s the gateway granted
    reason: str = ""
    tracker: Optional[Endpoint] = None  # REFUSED: the tracker that refused it


# --------------------------------------------------------------------------- all of them

ConnectEvent = Union[
    Registered, MemberSeen, PathUp, PathDown, MessageReceived, Queued, Undelivered, GaveUp, SessionEnded,
    StreamWanted, RelayAllocated, RelayLost, BirthdayStarted, BirthdayEnded, ExtraSockets, KeepaliveSet,
    PortMapped,
]

__all__ = [
    "BirthdayEnded",
    "BirthdayStarted",
    "CandidateSource",
    "ConnectEvent",
    "ExtraSockets",
    "GaveUp",
    "KeepaliveSet",
    "MappingChange",
    "MemberSeen",
    "MessageReceived",
    "PathDown",
    "PathKind",
    "PathMethod",
    "PathUp",
    "PortMapped",
    "Queued",
    "Registered",
    "RelayAllocated",
    "RelayLost",
    "SessionEnded",
    "StreamWanted",
    "Undelivered",
    "Verdict",
]
