"""The `connect` procedure as a pure state machine: meet a group's members through the
trackers and punch a direct UDP path to each of them.

No sockets, no clock, no randomness: bytes and the time come in as arguments, datagrams
to send and typed events (:mod:`nattool.protocol.connect_events`) go out, the aioquic
shape::

    session.receive_datagram(data, addr, now)   # anything that arrived
    session.handle_timer(now)                   # when get_timer() says
    session.datagrams_to_send(now)              # -> [(bytes, Endpoint)], send them all
    session.next_event()                        # -> event or None

One local socket per address family carries everything: the registrations (so the NAT
mapping the tracker saw is the one the peers are told about) and the peer messages
(:mod:`nattool.protocol.punch`). The procedure, ICE-like but much smaller:

* register at every tracker; again ``FAST_REGISTER`` s after its answer while no path is
  up (a member that registers after us is only learnt from the tracker, and the target
  is a path within 3 s), every ``register_every`` s once one is (which also keeps the
  tracker's mapping open). A tracker silent to the seed form is asked in the original
  client's form, and the form it answers is remembered (the original form after two
  rounds: one answer may be a late answer to the seed form);
* for every member, candidates: its public endpoint, and for a member behind our own
  public IP (its line carries ``;lan``) each LAN address at the ports it may listen on
  (see :func:`nattool.protocol.connect_rules.lan_candidates`); all probed at once with authenticated pings, quickly
  at first, then backing off;
* an authenticated ping from an endpoint we did not know is a *peer-reflexive*
  candidate (the peer's NAT mapping toward us, e.g. a symmetric NAT's fresh port): we
  answer it and ping it back at once;
* a path is up when one of our pings came back as an authenticated pong from the very
  endpoint it was sent to; LAN paths are preferred. Up paths get a ping every
  ``keepalive`` s; a path with no valid message for ``dead_after`` s is down, and the
  peer's candidates are probed again;
* when no path is up for ``timeout`` s, give up with a verdict built from what the
  trackers showed: our own mapping (two trackers saw the same or different public
  ports) and each member's (the same host at different ports in different trackers).

A relay (``relay`` auto or only): once registered, each tracker is asked
``//relay/<group>`` (after every registration round, which also polls its list); the
first tracker in the configured order that answers ``turn ...`` is the relay, and a
:class:`~nattool.protocol.turn_client.TurnClient` allocates there. The relayed endpoints
the tracker lists are candidates of kind RELAY, pinged through the allocation (Send
indications out, Data indications in; the peer messages inside are unchanged, MAC and
all) when :func:`~nattool.protocol.connect_rules.relay_due` says so for some member. A
relayed path is the last choice: probing of the direct candidates goes on, and a direct
path that answers takes over (a second PathUp for the same peer).

Birthday punching (:mod:`nattool.protocol.birthday`): where the trackers show our mapping
per destination and a member's independent of it (or the reverse), the hard side asks
its owner for extra sockets (an :class:`ExtraSockets` event), pings the member from each
(``datagrams_via``: what goes out of which), and takes what arrives on them with
``receive_on_socket``; the easy side pings random ports of the member's IP. A path
remembers the socket it lives on (``socket_of``). Both within one rate cap and budget;
a relayed path does not stop it, a direct one does.

A port mapping (``portmap``): the owner asks the gateway to map the session's port (PCP,
NAT-PMP, UPnP IGD) and reports what happened with :meth:`ConnectSession.port_mapping`;
registering waits for that report (``PORTMAP_WAIT`` s at most), so that the trackers do
not list the unmapped endpoint first. A granted mapping's external endpoint goes into
every registration as ``<public>``: the trackers list it, the peers ping it, the gateway
forwards it to our socket. A tracker that refuses it (its IP is not the one the tracker
sees: a double NAT) gets ``0`` instead. A path is of method PORTMAP when the peer's pong
says it saw us at the mapped endpoint.

No tracker answering over UDP for ``UDP_GIVE_UP`` s (or ``tcp`` set) makes the session
ask its owner for a TCP stream to each tracker (a :class:`StreamWanted` event); the
owner frames what goes to that tracker and says ``stream_opened`` / ``stream_failed``.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Optional

from nattool.errors import ProtocolError
from nattool.exit_codes import ExitCode
from nattool.protocol.birthday import (
    BIRTHDAY_AFTER,
    DEFAULT_BUDGET,
    DEFAULT_RATE,
    REFRESH_EVERY,
    BirthdayRun,
    Pacer,
    Role,
    plan,
)
from nattool.protocol.connect_events import BirthdayEnded, BirthdayStarted, ExtraSockets
from nattool.protocol.connect_events import (
    CandidateSource,
    RelayAllocated,
    RelayLost,
    StreamWanted,
    ConnectEvent,
    GaveUp,
    MappingChange,
    MemberSeen,
    MessageReceived,
    PathDown,
    PathKind,
    PathMethod,
    PathUp,
    PortMapped,
    Queued,
    Registered,
    SessionEnded,
    Undelivered,
    Verdict,
)
from nattool.protocol.connect_options import RelayMode
from nattool.protocol.connect_rules import (
    ED,
    RELAY_AFTER,
    lan_candidates,
    mapping_of,
    mapping_verdict,
    relay_due,
    verdict,
)
from nattool.protocol.connect_events import KeepaliveSet
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.keepalive_rules import KeepalivePlan
from nattool.protocol.punch import BadMac, Kind, NotPeerMessage, PeerMessage, ReplayGuard, ReplayWindow, derive_key
from nattool.protocol.retransmit import backoff_schedule
from nattool.protocol.text import ErrorReply, MemberList, RegisterRequest, RelayGrant, RelayRequest
from nattool.protocol.turn import is_turn_message
from nattool.protocol.turn_client import (
    Allocated,
    AllocationFailed,
    PeerData,
    TurnClient,
    TurnCredentials,
    TurnState,
)

FAST_REGISTER = 0.5  # s between registrations while no path is up
PROBE_FIRST = 0.1  # s between pings to a fresh candidate ...
PROBE_MAX = 1.0  # ... growing to this
PROBE_GROWTH = 1.5
# s between leaving (a BYE through the relay) and giving the allocation back: a server
# may drop what a released allocation still has in flight to its peers.
RELAY_LEAVE_GRACE = 0.2
UPGRADE_PROBE_MAX = 10.0  # s between pings to a relayed peer's direct candidates after `timeout` s
IMPOSSIBLE_GRACE = 3.0  # s of failed probing before a "cannot work" verdict ends the run
LINGER = 1.5  # s `once` keeps answering after its path is up (the peer needs its pong)
DATA_RETRIES = (0.3, 0.6, 1.2, 2.4)  # s after which an unacknowledged message is sent again
PENDING_MAX = 4096
SEED, ORIGINAL = "seed", "original"  # registration forms (RegisterRequest.form)
UDP_GIVE_UP = 2.0  # s without any tracker answer over UDP before trying TCP (with a relay)
GRANTED, REFUSED = "granted", "refused"  # a tracker's answer to //relay/<group>
WANTED, OPEN, FAILED = "wanted", "open", "failed"  # a stream to a tracker
# s registering waits for the owner's port-mapping report: a PCP or NAT-PMP gateway answers
# within it; a UPnP IGD's mapping, or a late one, is registered when it comes (waiting
# for SSDP's silence would make every start on a network without a gateway a second later)
PORTMAP_WAIT = 0.5

@dataclass(frozen=True, slots=True)
class SessionConfig:
    group: str  # canonical group key
    trackers: tuple[Endpoint, ...]
    lan: tuple[str, ...] = ()  # our LAN addresses, published to the trackers
    identity: Optional[str] = None
    timeout: float = 30.0  # give up when no path is up for this long
    keepalive: float = 20.0
    dead_after: float = 60.0
    register_every: float = 20.0
    tracker_timeout: float = 2.0  # per registration, retransmissions included
    retries: int = 3  # retransmissions of a registration within tracker_timeout
    once: bool = False  # end (exit 0) LINGER s after the first path is up
    relay: RelayMode = RelayMode.NEVER  # `connect --relay` (the CLI and the library default to auto)
    tcp: bool = False  # reach the trackers over TCP at once
    birthday_rate: float = DEFAULT_RATE  # probes/s of birthday punching (nattool.protocol.birthday)
    birthday_budget: int = DEFAULT_BUDGET  # its probes in all; 0: neither birthday punching nor prediction
    portmap: bool = False  # the owner asks for a port mapping: registering waits for its port_mapping() report


# --------------------------------------------------------------------------- state


@dataclass
class Candidate:
    endpoint: Endpoint
    kind: PathKind
    source: CandidateSource
    member: Optional[Endpoint]  # the member (public endpoint) it belongs to, if any
    peer: Optional[bytes]  # the peer it belongs to (peer-reflexive), if known
    started: float
    next_send: float
    interval: float = PROBE_FIRST
    sent: int = 0


@dataclass
class Path:
    endpoint: Endpoint
    kind: PathKind
    up: bool = False
    rtt: Optional[float] = None
    last_heard: float = 0.0
    last_ping: float = 0.0


@dataclass
class Peer:
    sender: bytes
    first_seen: float
    paths: dict[Endpoint, Path] = field(default_factory=dict)
    active: Optional[Endpoint] = None
    delivered: ReplayWindow = field(default_factory=lambda: ReplayWindow(256))

    @property
    def peer_id(self) -> str:
        return self.sender.hex()


@dataclass
class Member:
    endpoint: Endpoint
    lan: tuple[str, ...]
    first_seen: float
    trackers: set[Endpoint] = field(default_factory=set)
    peer: Optional[bytes] = None
    gave_up: bool = False


@dataclass
class Registration:
    """One tracker: its dialect, and the registration in flight (if any)."""

    tracker: Endpoint
    form: Optional[str] = None  # the form it answered; None: not known yet
    trying: Optional[str] = None  # form of the registration in flight
    payload: bytes = b""
    waits: list[float] = field(default_factory=list)
    attempt: int = 0
    next_send: float = 0.0  # in flight: next retransmission (or expiry after the last)
    next_round: float = 0.0  # idle: when to register again
    send_error: Optional[str] = None  # the last send to it failed (no route, ...)
    original_answers: int = 0  # rounds in a row answered in the original form only
    relay: Optional[str] = None  # its answer to //relay: GRANTED, REFUSED or None (not yet)
    grant: Optional[RelayGrant] = None
    asking: bool = False  # a //relay request in flight (the next round waits for it)
    ask_waits: list[float] = field(default_factory=list)
    ask_attempt: int = 0
    ask_next: float = 0.0
    stream: Optional[str] = None  # WANTED, OPEN or FAILED: reached over TCP
    silent: bool = False  # a whole registration went unanswered (on this transport)
    public_sent: Optional[Endpoint] = None  # the <public> of the registration in flight (None: `0`)
    public_refused: Optional[Endpoint] = None  # the mapped endpoint this tracker refused as <public>


@dataclass
class Outgoing:
    msg_id: int
    body: bytes
    peer: bytes
    tries: int = 0
    next_send: float = 0.0


# --------------------------------------------------------------------------- the session


class ConnectSession:
    """One run of the procedure. ``session_id`` is 8 random bytes from the caller (our
    sender id in every peer message); ``local`` is the local endpoint of the socket the
    session's datagrams go out from (its port is a LAN candidate port, its address is
    never a candidate)."""

    def __init__(self, config: SessionConfig, session_id: bytes, now: float, local: Optional[Endpoint] = None,
                 seed: Optional[bytes] = None) -> None:
        # ``seed``: secret random bytes for the TURN client's transaction ids (the
        # session id is public: every message carries it).
        self.config = config
        self.seed = seed if seed is not None else session_id
        self.local = local
        self.key = derive_key(config.group)
        self.sender = session_id
        self.seq = 0
        self.msg_id = 0
        self.guard = ReplayGuard()
        self.members: dict[Endpoint, Member] = {}
        self.peers: dict[bytes, Peer] = {}
        self.cands: dict[Endpoint, Candidate] = {}
        self.pending: dict[int, tuple[Endpoint, float]] = {}  # ping seq -> (destination, sent at)
        self.outgoing: list[Outgoing] = []
        self.backlog: list[bytes] = []  # messages sent before any path was up
        self.observed: dict[Endpoint, Endpoint] = {}  # tracker -> our public endpoint
        self.member_views: dict[Endpoint, list[Endpoint]] = {}  # tracker -> member endpoints
        self.registrations = {t: Registration(t, next_round=now) for t in config.trackers}
        self.counters = {"bad_mac": 0, "junk": 0, "replayed": 0, "stale_pong": 0, "not_relayed": 0}
        self.turn: Optional[TurnClient] = None
        self.relayed_peers: set[Endpoint] = set()  # relayed endpoints of other members
        self.mapped: Optional[PortMapped] = None  # the port mapping in force (GRANTED or RENEWED)
        self.former: set[Endpoint] = set()  # where trackers listed us before we moved (e.g. a mapping)
        self.mapping_wait = config.portmap  # no port_mapping() report yet
        self.registering_since = now + PORTMAP_WAIT if config.portmap else now  # UDP_GIVE_UP counts from here
        for reg in self.registrations.values():
            reg.next_round = self.registering_since
        self.t0 = now
        self._now = now
        self.no_path_since = now
        self.any_tracker_answered = False
        self.first_up: Optional[float] = None
        self.closing = False  # leave once every message is delivered
        self.left = False
        self.linger_until: Optional[float] = None  # leaving: the relay allocation goes back then
        self.ended: Optional[SessionEnded] = None
        self._finish_at: Optional[float] = None
        self._last_tick = now
        self._out: list[tuple[bytes, Endpoint]] = []
        self._events: deque[ConnectEvent] = deque()
        self.birthday: dict[Endpoint, BirthdayRun] = {}  # its target -> run (see _tick_birthday)
        self.pacer: Optional[Pacer] = None  # one rate cap and budget for every run
        self.socket_of: dict[Endpoint, int] = {}  # a peer endpoint reached through an extra socket
        self.sockets_open: tuple[int, ...] = ()  # the extra sockets the owner was told to have
        self._out_via: list[tuple[int, bytes, Endpoint]] = []
        self._tick(now)

    # -- the sans-I/O interface --------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float) -> None:
        """Anything that arrived on the session's sockets: peer messages, tracker answers,
        junk (counted and dropped). An ended session takes nothing more."""
        if self.ended is not None:
            return
        self._now = now
        if self.turn is not None and addr == self.turn.server and is_turn_message(data):
            self.turn.receive_datagram(data, now)
            self._on_turn_events(now)
            self._tick(now)
            return
        msg = self._peer_message(data)
        if msg is None:
            reg = self.registrations.get(addr)
            if reg is not None and reg.trying is not None:
                self._on_tracker_answer(reg, data, now)
            elif reg is not None and reg.asking:
                self._on_relay_answer(reg, data, now)
            else:
                self.counters["junk"] += 1  # late tracker replies, scanners: ignore
            return
        if self.config.relay == RelayMode.ONLY:
            self.counters["not_relayed"] += 1  # --relay only: nothing direct
            return
        self._on_peer_message(msg, addr, now)
        self._tick(now)

    def _peer_message(self, data: bytes) -> Optional[PeerMessage]:
        """An authentic peer message, or None (not one: counted if it is junk)."""
        try:
            return PeerMessage.from_wire(data, self.key)
        except NotPeerMessage:
            return None
        except BadMac:
            self.counters["bad_mac"] += 1
        except ProtocolError:
            self.counters["junk"] += 1
        return None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out, self._out = self._out, []
        if self.turn is not None:
            out.extend((data, self.turn.server) for data in self.turn.datagrams_to_send(now))
        return out

    def get_timer(self) -> Optional[float]:
        """When handle_timer() has something to do; None: nothing, ever (ended)."""
        if self.ended is not None:
            return None
        times: list[float] = []
        for reg in self.registrations.values():
            if reg.stream == WANTED:
                continue  # waits for the owner's stream_opened / stream_failed
            times.append(reg.next_send if reg.trying is not None else reg.ask_next if reg.asking else reg.next_round)
        if self.turn is not None and (turn_at := self.turn.get_timer()) is not None:
            times.append(turn_at)
        for cand in self.cands.values():
            if self._wants_probe(cand, self._last_tick):
                times.append(cand.next_send)
        for peer in self.peers.values():
            if peer.active is not None:
                path = peer.paths[peer.active]
                times.append(min(path.last_heard + self.config.dead_after, path.last_ping + self.config.keepalive))
        times.extend(out.next_send for out in self.outgoing)
        times.extend(self._birthday_timers())
        if self._finish_at is not None:
            times.append(self._finish_at)
        if self.linger_until is not None:
            times.append(self.linger_until)
        # Give-up deadlines: only those still ahead (one already past was decided on).
        deadlines = [self.no_path_since + self.config.timeout]
        if self._udp_give_up_pending():
            deadlines.append(self.registering_since + UDP_GIVE_UP)
        for member in self.members.values():
            if not member.gave_up:
                deadlines += (member.first_seen + IMPOSSIBLE_GRACE, member.first_seen + self.config.timeout,
                              member.first_seen + RELAY_AFTER)
        times.extend(t for t in deadlines if t > self._last_tick)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._now = now
        if self.turn is not None:
            self.turn.handle_timer(now)
            self._on_turn_events(now)
        self._tick(now)

    def next_event(self) -> Optional[ConnectEvent]:
        return self._events.popleft() if self._events else None

    # -- what the owner asks ------------------------------------------------------------

    def send(self, data: bytes, now: float, to: Optional[str] = None) -> int:
        """Queue ``data`` (at most punch.MAX_BODY bytes) for the peer ``to`` (a peer id)
        or every connected peer; returns how many it goes to. Without any path up and
        ``to`` None it waits for the first path (a :class:`Queued` event), and 0 is
        returned; to a peer without a path it goes nowhere (0)."""
        self._now = now
        if to is None and not self.connected_peers():
            self.backlog.append(data)
            self._events.append(Queued())
            return 0
        count = 0
        for peer in self.peers.values():
            if peer.active is None or (to is not None and peer.peer_id != to):
                continue
            self.msg_id += 1
            self.outgoing.append(Outgoing(self.msg_id, data, peer.sender, 0, now))
            count += 1
        self._resend_data(now)
        return count

    def connected_peers(self) -> list[str]:
        """Ids of the peers with a path up."""
        return [p.peer_id for p in self.peers.values() if p.active is not None]

    def leave(self, now: float) -> None:
        """Say goodbye to every connected peer (input ended, Ctrl-C, close), and give
        the relay allocation back: at once, or ``linger_until`` when a goodbye went
        through it (the owner may call release_relay() earlier, when it must go)."""
        self._now = now
        self.left = True
        relayed = False
        for peer in self.peers.values():
            if peer.active is not None:
                self._send(peer.active, PeerMessage(Kind.BYE, self.sender, self._next_seq()))
                relayed = relayed or peer.active in self.relayed_peers
        if self.turn is not None and self.turn.allocated and relayed:
            self.linger_until = now + RELAY_LEAVE_GRACE
        else:
            self.release_relay(now)

    def release_relay(self, now: float) -> None:
        """Give the relay allocation back now (a Refresh with lifetime 0)."""
        self.linger_until = None
        if self.turn is not None:
            self.turn.close(now)

    def set_keepalive(self, plan: KeepalivePlan, now: float) -> None:
        """Keep paths and registrations alive at ``plan``'s intervals from now on (a
        :class:`KeepaliveSet` event says so). ``dead_after`` never shrinks, and grows to
        three keepalives if it was less."""
        self._now = now
        dead_after = max(self.config.dead_after, 3 * plan.interval)
        self.config = replace(self.config, keepalive=plan.interval, register_every=plan.register_every,
                              dead_after=dead_after)
        for reg in self.registrations.values():
            if reg.trying is None and not reg.asking and self.connected_peers():
                reg.next_round = min(reg.next_round, now + plan.register_every)
        self._events.append(KeepaliveSet(plan))
        self._tick(now)

    def close_when_delivered(self, now: float) -> None:
        """The input ended: leave (exit 0) once a path was up and every message is acknowledged."""
        self.closing = True
        self._tick(now)

    def send_failed(self, addr: Endpoint, reason: str, now: float) -> None:
        """The owner could not send to ``addr`` (no route, ...). For a candidate that just
        means it does not work; when every tracker is unreachable and none ever answered,
        the session ends: nothing can come of it (exit 4, not a timeout)."""
        reg = self.registrations.get(addr)
        if reg is None:
            return
        reg.send_error = reason
        if not self.any_tracker_answered and all(r.send_error for r in self.registrations.values()):
            self._end(ExitCode.UNREACHABLE, reason)

    def stream_opened(self, tracker: Endpoint, now: float) -> None:
        """The owner has a TCP stream to ``tracker`` (after a StreamWanted): everything
        for that tracker goes over it from now on; registering starts again at once."""
        reg = self.registrations.get(tracker)
        if reg is None:
            return
        self._now = now
        reg.stream = OPEN
        reg.silent = False
        reg.send_error = None
        reg.trying = None
        reg.asking = False
        reg.next_round = now
        self._tick(now)

    def stream_failed(self, tracker: Endpoint, reason: str, now: float) -> None:
        """The stream to ``tracker`` could not be opened, or broke: back to UDP (a relay
        allocation made over it is gone with it)."""
        reg = self.registrations.get(tracker)
        if reg is None:
            return
        self._now = now
        was_open = reg.stream == OPEN
        reg.stream = FAILED
        if was_open and self.turn is not None and self.turn.server == tracker:
            self.turn.close(now)
            self._relay_lost(RelayLost(tracker, f"the TCP connection to {tracker} broke: {reason}"))
        reg.trying = None
        reg.asking = False
        reg.next_round = now
        self._tick(now)

    # -- registration ------------------------------------------------------------------

    def _round_wait(self) -> float:
        return self.config.register_every if self.connected_peers() else FAST_REGISTER

    def _start_registration(self, reg: Registration, form: str, now: float) -> None:
        # The original form carries LAN addresses only behind a MAC: without an identity
        # it would be the all-zero MAC, the same for every such member of the group, and
        # the tracker would take them all for one member.
        lan = self.config.lan if form == SEED or self.config.identity else ()
        reg.public_sent = self._public_for(reg)
        req = RegisterRequest(group=self.config.group, public=reg.public_sent, lan=lan, identity=self.config.identity,
                              form=form)
        # While the dialect is unknown each form gets half of the time, so that
        # tracker_timeout bounds the whole registration, fallback included.
        timeout = self.config.tracker_timeout / 2 if reg.form is None else self.config.tracker_timeout
        reg.trying = form
        reg.payload = req.to_wire()
        reg.waits = backoff_schedule(timeout, self.config.retries)
        reg.attempt = 0
        reg.next_send = now

    def _tick_registrations(self, now: float) -> None:
        self._want_streams(now)
        for reg in self.registrations.values():
            if reg.stream == WANTED:
                continue  # nothing over UDP while the owner opens the stream
            self._tick_relay_ask(reg, now)
            if reg.trying is None and not reg.asking and now >= reg.next_round:
                self._start_registration(reg, reg.form or SEED, now)
            while reg.trying is not None and now >= reg.next_send:
                if reg.attempt < len(reg.waits):
                    reg.send_error = None
                    self._out.append((reg.payload, reg.tracker))
                    reg.next_send = now + reg.waits[reg.attempt]
                    reg.attempt += 1
                elif reg.form is None and reg.trying == SEED:
                    # The original server never answers the seed form: ask in its own.
                    self._start_registration(reg, ORIGINAL, now)
                else:
                    reg.trying = None
                    reg.next_round = now + self._round_wait()
                    if not reg.silent and reg.relay is None:
                        reg.silent = True  # no longer waited for by the relay choice
                        self._pick_relay(now)

    def _on_tracker_answer(self, reg: Registration, data: bytes, now: float) -> None:
        try:
            members = MemberList.from_wire(data)
        except ProtocolError:
            if not self._is_refusal(data):
                return  # not an answer: keep waiting for one
            if reg.public_sent is not None:
                self._public_refused(reg, data, now)
                return
            # Refused (group full, rate limit...): ask again next round.
            reg.trying = None
            reg.next_round = now + self._round_wait()
            if not reg.silent and reg.relay is None:
                reg.silent = True
                self._pick_relay(now)
            return
        form = reg.trying or SEED
        if form == SEED:
            reg.form = SEED
            reg.original_answers = 0
        else:
            # A late answer to the seed form looks the same: believe the tracker speaks
            # only the original form once it answered it in two rounds running.
            reg.original_answers += 1
            if reg.original_answers >= 2:
                reg.form = ORIGINAL
        reg.trying = None
        reg.silent = False
        self._on_registered(reg.tracker, members, form, now)
        reg.next_round = now + self._round_wait()
        if self.config.relay != RelayMode.NEVER and reg.relay != REFUSED:
            self._start_relay_ask(reg, now)
        self._tick(now)

    # -- the relay ---------------------------------------------------------------------

    def _is_refusal(self, data: bytes) -> bool:
        """An ``ERR`` reply from a tracker; anything else is counted as junk."""
        try:
            ErrorReply.from_wire(data)
        except ProtocolError:
            self.counters["junk"] += 1
            return False
        return True

    def _start_relay_ask(self, reg: Registration, now: float) -> None:
        # An old tracker stays silent: half the time budget for the first ask, as for
        # the registration form, so that it delays the next round by little.
        timeout = self.config.tracker_timeout / 2 if reg.relay is None else self.config.tracker_timeout
        reg.asking = True
        reg.ask_waits = backoff_schedule(timeout, self.config.retries)
        reg.ask_attempt = 0
        reg.ask_next = now

    def _tick_relay_ask(self, reg: Registration, now: float) -> None:
        while reg.asking and now >= reg.ask_next:
            if reg.ask_attempt < len(reg.ask_waits):
                self._out.append((RelayRequest(self.config.group).to_wire(), reg.tracker))
                reg.ask_next = now + reg.ask_waits[reg.ask_attempt]
                reg.ask_attempt += 1
            else:
                reg.asking = False
                if reg.relay is None:
                    self._relay_refused(reg, now)  # silence: a tracker that predates relays

    def _on_relay_answer(self, reg: Registration, data: bytes, now: float) -> None:
        try:
            grant = RelayGrant.from_wire(data)
        except ProtocolError:
            if not self._is_refusal(data):
                return  # e.g. a late registration answer: keep waiting
            reg.asking = False
            if reg.relay is None:
                self._relay_refused(reg, now)
            return
        reg.asking = False
        reg.relay = GRANTED
        reg.grant = grant
        for relayed in grant.relayed:
            self._on_relayed_endpoint(relayed, now)
        self._pick_relay(now)
        self._tick(now)

    def _relay_refused(self, reg: Registration, now: float) -> None:
        reg.relay = REFUSED
        self._pick_relay(now)
        if self.turn is None and all(r.relay == REFUSED for r in self.registrations.values()):
            self._relay_lost(RelayLost(None, "no tracker offers a relay"))

    def _relay_lost(self, lost: RelayLost) -> None:
        self._events.append(lost)
        if self.config.relay == RelayMode.ONLY:
            self._end(ExitCode.FAILURE, f"--relay only, and {lost.reason}")

    def _pick_relay(self, now: float) -> None:
        """The first tracker, in the configured order, that grants a relay. One that
        has not said yet is waited for, unless it left a whole registration unanswered:
        members with the same tracker list must pick the same relay (two allocations
        reach each other only on one server), whichever tracker answers them first."""
        if self.turn is not None:
            return
        for reg in self.registrations.values():
            if reg.relay == GRANTED and reg.grant is not None:
                grant = reg.grant
                creds = TurnCredentials(grant.username, grant.password, grant.realm)
                self.turn = TurnClient(reg.tracker, creds, self.seed, now, reliable=reg.stream == OPEN,
                                       family=reg.tracker.ip.version)
                return
            if reg.relay is None and not reg.silent:
                return

    def _on_relayed_endpoint(self, ep: Endpoint, now: float) -> None:
        """A relayed endpoint of the group (the tracker's list, or a Data indication's
        sender): a candidate reached through our allocation."""
        if self.turn is not None and ep == self.turn.relayed:
            return  # our own
        if ep not in self.relayed_peers:
            self.relayed_peers.add(ep)
            if self.turn is not None and self.turn.allocated:
                self.turn.permit(ep, now)  # so that its pings get in before ours go out
        if ep not in self.cands:
            self._add_candidate(ep, PathKind.RELAY, CandidateSource.RELAY, None, None, now)

    def _on_turn_events(self, now: float) -> None:
        turn = self.turn
        assert turn is not None
        while (event := turn.next_event()) is not None:
            if isinstance(event, Allocated):
                self._events.append(RelayAllocated(turn.server, event.relayed))
                self.relayed_peers.discard(event.relayed)
                self.cands.pop(event.relayed, None)
                # Our own relayed address first: a permission for its IP lets in every
                # member relayed by the same server, before we know their endpoints, and
                # it stays valid (a permission is per IP; ours lives as long as we do).
                turn.permit(event.relayed, now)
                for ep in self.relayed_peers:
                    turn.permit(ep, now)
            elif isinstance(event, AllocationFailed):
                self._relay_lost(RelayLost(turn.server, event.reason))
            elif isinstance(event, PeerData):
                msg = self._peer_message(event.data)
                if msg is None:
                    self.counters["junk"] += 1
                    continue
                self._on_relayed_endpoint(event.peer, now)
                self._on_peer_message(msg, event.peer, now)

    def _relay_ready(self) -> bool:
        return self.turn is not None and self.turn.allocated

    def _relay_hope(self) -> bool:
        """A relay is (or may soon be) there to reach members punching cannot."""
        if self.config.relay == RelayMode.NEVER:
            return False
        if self.turn is not None:
            return self.turn.state in (TurnState.ALLOCATING, TurnState.ALLOCATED)
        return any(reg.relay == GRANTED or reg.asking for reg in self.registrations.values())

    def _udp_blocked(self) -> bool:
        """Our trackers answer only over TCP: no direct path can open from here."""
        return self.turn is not None and self.registrations[self.turn.server].stream == OPEN

    def _relay_wanted(self, now: float) -> bool:
        """Whether the relayed endpoints the tracker listed are to be pinged now: some
        member has no path and relay_due says it is time."""
        if not self._relay_ready():
            return False
        mine = self._own_mapping()[0]
        blocked = self._udp_blocked()
        for member in self.members.values():
            if member.gave_up or self._member_up(member):
                continue
            impossible = verdict(mine, self._member_mapping(member)[0])[0]
            if relay_due(self.config.relay, impossible, now - member.first_seen, blocked):
                return True
        return self.config.relay == RelayMode.ONLY

    def _own_mapping(self) -> tuple[Optional[str], str]:
        """Our mapping from what the trackers saw over UDP (a TCP connection's source
        port says nothing about UDP)."""
        if self.local is None:
            return None, ""
        udp = {t: e for t, e in self.observed.items() if self.registrations[t].stream != OPEN}
        return mapping_of(udp, self.local)

    # -- the port mapping --------------------------------------------------------------

    def port_mapping(self, report: PortMapped, now: float) -> None:
        """What the owner's port mapper says: GRANTED or RENEWED (the external endpoint is
        offered to the peers from now on), LOST, NONE (nothing offered) or DELETED. The
        first report ends the wait of the registrations (if they still wait); a new
        external endpoint is registered at once. The report is handed on as an event."""
        if self.ended is not None:
            return
        self._now = now
        before = self.mapped.external if self.mapped is not None else None
        live = report.change in (MappingChange.GRANTED, MappingChange.RENEWED) and report.external is not None
        self.mapped = report if live else None
        self._events.append(report)
        waited = self.mapping_wait and now < self.registering_since  # the registrations are held back
        self.mapping_wait = False
        if waited:
            self.registering_since = now
        after = self.mapped.external if self.mapped is not None else None
        if waited or after != before:
            for reg in self.registrations.values():
                if reg.trying is not None:
                    self._start_registration(reg, reg.trying, now)  # again, with the new <public>
                elif not reg.asking:
                    reg.next_round = now
        self._tick(now)

    def _public_for(self, reg: Registration) -> Optional[Endpoint]:
        """The <public> to register at ``reg``'s tracker: the mapped external endpoint,
        unless that tracker refused it (or cannot reach it: another address family)."""
        ext = self.mapped.external if self.mapped is not None else None
        if ext is None or ext == reg.public_refused or ext.ip.version != reg.tracker.ip.version:
            return None
        return ext

    def _public_refused(self, reg: Registration, data: bytes, now: float) -> None:
        """The tracker refused our mapped endpoint as <public> (its IP is not the one the
        tracker sees, e.g. a double NAT; or any other refusal, which `0` meets too): register
        there with `0` at once, and never offer it that endpoint again."""
        reg.public_refused = reg.public_sent
        why = ErrorReply.from_wire(data).reason
        mapped = self.mapped
        self._events.append(PortMapped(MappingChange.REFUSED, mapped.protocol if mapped else None, reg.public_sent,
                                       None, why, reg.tracker))
        self._start_registration(reg, reg.trying or SEED, now)
        self._tick(now)

    def _path_method(self, kind: PathKind, observed_as: str) -> PathMethod:
        """PORTMAP when the peer saw us at the mapped endpoint (its pong says where),
        else what the kind says."""
        ext = self.mapped.external if self.mapped is not None else None
        if kind == PathKind.INTERNET and ext is not None:
            try:
                seen = Endpoint.from_text(observed_as)
            except ProtocolError:
                seen = None
            if seen == ext:
                return PathMethod.PORTMAP
        return PathMethod.of_kind(kind)

    # -- streams -----------------------------------------------------------------------

    def _udp_give_up_pending(self) -> bool:
        return (self.config.relay != RelayMode.NEVER and not self.any_tracker_answered
                and any(reg.stream is None for reg in self.registrations.values()))

    def _want_streams(self, now: float) -> None:
        if self.config.tcp:
            reason = "TCP asked for (--tcp)"
        elif self._udp_give_up_pending() and now - self.registering_since >= UDP_GIVE_UP:
            reason = f"no tracker answered over UDP within {UDP_GIVE_UP:g}s"
        else:
            return
        for reg in self.registrations.values():
            if reg.stream is None:
                reg.stream = WANTED
                self._events.append(StreamWanted(reg.tracker, reason))

    def _on_registered(self, tracker: Endpoint, answer: MemberList, form: str, now: float) -> None:
        entries = answer.entries
        me = entries[0].endpoint
        self.any_tracker_answered = True
        if self.observed.get(tracker) != me:
            if tracker in self.observed:
                # Moved (a mapping came or went): our old entry stays in the tracker's list
                # until its TTL, and is no member.
                self.former.add(self.observed[tracker])
            self.observed[tracker] = me
            self._events.append(Registered(tracker, me, form))
        mine = set(self.observed.values()) | self.former
        self.member_views[tracker] = [e.endpoint for e in entries[1:]]
        for entry in entries[1:]:
            if entry.endpoint in mine:
                continue  # ourselves as another tracker saw us
            self._on_member(entry.endpoint, entry.lan, tracker, now)

    def _on_member(self, ep: Endpoint, lan: tuple[str, ...], tracker: Endpoint, now: float) -> None:
        member = self.members.get(ep)
        if member is None:
            member = self.members[ep] = Member(ep, lan, now)
            self._events.append(MemberSeen(ep, lan, tracker))
            self._add_candidate(ep, PathKind.INTERNET, CandidateSource.TRACKER, ep, None, now)
            own_port = self.local.port if self.local else 0
            for cand in lan_candidates(lan, ep.port, own_port):
                self._add_candidate(cand, PathKind.LAN, CandidateSource.LAN_GUESS, ep, None, now)
        member.trackers.add(tracker)

    def _add_candidate(
        self, ep: Endpoint, kind: PathKind, source: CandidateSource, member: Optional[Endpoint],
        peer: Optional[bytes], now: float,
    ) -> None:
        if ep in self.cands or ep in set(self.observed.values()):
            return
        if kind != PathKind.RELAY and self.config.relay == RelayMode.ONLY:
            return  # --relay only: no direct candidates
        if self.local is not None and ep.port == self.local.port and self._is_local(ep):
            return  # our own socket (our LAN address in someone's list, or loopback)
        self.cands[ep] = Candidate(ep, kind, source, member, peer, now, now)

    def _is_local(self, ep: Endpoint) -> bool:
        return str(ep.ip) in self.config.lan or (self.local is not None and ep.ip == self.local.ip)

    # -- sending -----------------------------------------------------------------------

    def _send(self, dest: Endpoint, msg: PeerMessage) -> None:
        via = self.socket_of.get(dest)
        if via is not None:
            self._out_via.append((via, msg.to_wire(self.key), dest))
            return
        if dest in self.relayed_peers:
            if self.turn is not None:
                self.turn.send(dest, msg.to_wire(self.key), self._now)
            return
        self._out.append((msg.to_wire(self.key), dest))

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _ping(self, dest: Endpoint, now: float, via: int = 0) -> None:
        """A ping to ``dest``; ``via`` an extra socket to send it from (0: as routed)."""
        seq = self._next_seq()
        self.pending[seq] = (dest, now)
        if len(self.pending) > PENDING_MAX:
            for old in sorted(self.pending)[: len(self.pending) - PENDING_MAX]:
                del self.pending[old]
        msg = PeerMessage(Kind.PING, self.sender, seq)
        if via:
            self._out_via.append((via, msg.to_wire(self.key), dest))
        else:
            self._send(dest, msg)

    def _end(self, code: ExitCode, reason: str) -> None:
        if self.ended is None:
            if self.turn is not None:
                self.turn.close(self._now)  # the allocation goes back with the last datagrams
            self.ended = SessionEnded(code, reason)
            self._events.append(self.ended)

    # -- probing, keepalive, give-up ---------------------------------------------------

    def _owner(self, cand: Candidate) -> Optional[Peer]:
        sender = cand.peer
        if sender is None and cand.member is not None:
            member = self.members.get(cand.member)
            sender = member.peer if member else None
        return self.peers.get(sender) if sender is not None else None

    def _wants_probe(self, cand: Candidate, now: float) -> bool:
        member = self.members.get(cand.member) if cand.member else None
        if member is not None and member.gave_up:
            return False
        if cand.kind == PathKind.RELAY:
            if not self._relay_ready():
                return False
            # A relayed endpoint that pinged us is answered at once; the tracker's list
            # is pinged only when some member needs the relay.
            if cand.source != CandidateSource.PEER_REFLEXIVE and cand.peer is None and not self._relay_wanted(now):
                return False
        owner = self._owner(cand)
        if owner is None or owner.active is None:
            return True
        path = owner.paths.get(cand.endpoint)
        if path is not None and path.up:
            return False
        active_kind = owner.paths[owner.active].kind
        if active_kind == PathKind.RELAY:
            return cand.kind != PathKind.RELAY  # relayed: direct probing goes on, to upgrade
        # Connected over the internet: keep trying its LAN for a while, a better path.
        return cand.kind == PathKind.LAN and active_kind != PathKind.LAN and now - cand.started < self.config.timeout

    def _tick(self, now: float) -> None:
        if self.ended is not None:
            return
        self._last_tick = now
        # Paths first: one found dead is probed and registered again in this same tick.
        for peer in self.peers.values():
            if peer.active is None:
                continue
            path = peer.paths[peer.active]
            # The same sums as get_timer()'s: (a + b) - a may fall short of b, and a
            # timer due by one and not by the other would fire again at once.
            if now >= path.last_heard + self.config.dead_after:
                self._path_down(peer, path, f"no answer for {now - path.last_heard:.1f}s", now)
            elif now >= path.last_ping + self.config.keepalive:
                path.last_ping = now
                self._ping(path.endpoint, now)
        self._tick_registrations(now)
        self._tick_birthday(now)
        for cand in list(self.cands.values()):
            if now >= cand.next_send and self._wants_probe(cand, now):
                self._ping(cand.endpoint, now)
                cand.sent += 1
                cand.next_send = now + cand.interval
                # Past `timeout` only a relayed peer's direct candidates are still probed
                # (for an upgrade): slowly, a network rarely changes its mind.
                cap = PROBE_MAX if now - cand.started < self.config.timeout else UPGRADE_PROBE_MAX
                cand.interval = min(cap, cand.interval * PROBE_GROWTH)
        if self.backlog and self.connected_peers():
            waiting, self.backlog = self.backlog, []
            for data in waiting:
                self.send(data, now)
        self._resend_data(now)
        if self.linger_until is not None and now >= self.linger_until:
            self.release_relay(now)
        if self.closing and self.first_up is not None and not self.backlog and not self.outgoing:
            if not self.left:
                self.leave(now)
            if self.linger_until is None:
                self._end(ExitCode.OK, "input ended and every line was delivered")
        if self._finish_at is not None and now >= self._finish_at:
            self._end(ExitCode.OK, "a path was up")
        self._check_give_up(now)

    def _path_down(self, peer: Peer, path: Path, reason: str, now: float) -> None:
        path.up = False
        was = peer.active
        peer.active = None
        # The best other path that is still up takes over; else probe everything again.
        for other in sorted(peer.paths.values(), key=lambda p: (p.kind.rank, p.rtt or 0)):
            if other.up and now - other.last_heard < self.config.dead_after:
                peer.active = other.endpoint
                break
        self._events.append(PathDown(peer.peer_id, was, path.kind, reason))
        if peer.active is None:
            if not self.connected_peers():
                self.no_path_since = now
            for cand in self.cands.values():
                if self._owner(cand) is peer:
                    cand.started = now
                    cand.next_send = now
                    cand.interval = PROBE_FIRST
            for member in self.members.values():
                if member.peer == peer.sender:
                    member.gave_up = False
                    member.first_seen = now
            for reg in self.registrations.values():
                if reg.trying is None:
                    reg.next_round = now  # the peer may be back at a new endpoint

    def _check_give_up(self, now: float) -> None:
        if self.ended is not None:
            return
        connected = bool(self.connected_peers())
        mine, mine_why = self._own_mapping()
        relay_hope = self._relay_hope()
        # Members nobody reached in `timeout` (while others are up) are given up one by one.
        for member in self.members.values():
            if member.gave_up or self._member_up(member):
                continue
            theirs, theirs_why = self._member_mapping(member)
            impossible, why = verdict(mine, theirs)
            tried = now - member.first_seen
            # With a relay to come, "impossible" only means the relay is this member's way.
            if tried >= self.config.timeout or (impossible and tried >= IMPOSSIBLE_GRACE and not relay_hope):
                member.gave_up = True
                found = Verdict(impossible, why, mine, mine_why, theirs, theirs_why)
                self._events.append(GaveUp(member.endpoint, why, found, tried))
        if connected:
            return
        if self.members and all(m.gave_up for m in self.members.values()):
            self._end(ExitCode.FAILURE, "no path could be opened to any member")
            return
        if now - self.no_path_since < self.config.timeout:
            return
        if not self.any_tracker_answered:
            why = (f"no tracker answered within {self.config.timeout:g}s: UDP may be blocked on this "
                   "network, or the trackers are down")
            self._events.append(GaveUp(None, why))
            self._end(ExitCode.TIMEOUT, why)
        elif not self.members:
            why = f"no other member joined the group within {self.config.timeout:g}s"
            self._events.append(GaveUp(None, why))
            self._end(ExitCode.TIMEOUT, why)
        else:
            self._end(ExitCode.FAILURE, f"no path up for {self.config.timeout:g}s")

    def _member_up(self, member: Member) -> bool:
        peer = self.peers.get(member.peer) if member.peer else None
        return peer is not None and peer.active is not None

    def _member_mapping(self, member: Member) -> tuple[Optional[str], str]:
        """The member's mapping, from how the trackers saw its public IP: the same host
        at the same port in every tracker (endpoint-independent) or at different ports."""
        ip = member.endpoint.ip
        per_tracker: dict[Endpoint, list[Endpoint]] = {}
        for tracker, eps in self.member_views.items():
            at_ip = [e for e in eps if e.ip == ip]
            if at_ip:
                per_tracker[tracker] = at_ip
        if len(per_tracker) < 2:
            return None, "seen by one tracker only: unknown"
        if any(len(v) != 1 for v in per_tracker.values()):
            # A member behind an endpoint-independent mapping shows the same port to
            # every tracker. None does: that NAT maps per destination. (Also the case of
            # one member listed twice, at an old and a new mapping, as a member without
            # an identity is until its old entry expires.)
            ports = [{e.port for e in eps} for eps in per_tracker.values()]
            if all(a.isdisjoint(b) for i, a in enumerate(ports) for b in ports[i + 1:]):
                seen = "; ".join(f"{t} saw ports {', '.join(map(str, sorted(at)))}" for t, at in zip(per_tracker, ports))
                return ED, (f"{seen}: several members behind that public IP, none at the same port "
                            "at two trackers: mapping per destination")
            return None, "several members behind that public IP: cannot tell"
        return mapping_verdict(member.endpoint, {t: v[0] for t, v in per_tracker.items()})

    # -- receiving ---------------------------------------------------------------------

    def _on_peer_message(self, msg: PeerMessage, src: Endpoint, now: float) -> None:
        if msg.sender == self.sender:
            return  # our own ping, hairpinned or looped back
        if not self.guard.accept(msg.sender, msg.seq):
            self.counters["replayed"] += 1
            return
        peer = self.peers.get(msg.sender)
        if peer is None:
            peer = self.peers[msg.sender] = Peer(msg.sender, now)
        path = peer.paths.get(src)
        if path is not None and path.up:
            path.last_heard = now
        if msg.kind == Kind.PING:
            self._on_ping(peer, msg, src, now)
        elif msg.kind == Kind.PONG:
            self._on_pong(peer, msg, src, now)
        elif msg.kind == Kind.DATA:
            self._on_data(peer, msg, src)
        elif msg.kind == Kind.ACK:
            self.outgoing = [o for o in self.outgoing if not (o.peer == peer.sender and o.msg_id == msg.echo)]
        elif msg.kind == Kind.BYE:
            self._on_bye(peer, now)

    def _classify(self, ep: Endpoint) -> PathKind:
        """LAN, Internet or relay, for an endpoint a peer reached us from. A member's LAN list
        says it best; before the tracker told us about the member, an address in the
        subnet of one of our own LAN addresses (/24, /64: the prefix length is not
        known) that is nobody's public address is taken for a LAN neighbour."""
        for member in self.members.values():
            if str(ep.ip) in member.lan:
                return PathKind.LAN
        public = {m.endpoint.ip for m in self.members.values()} | {e.ip for e in self.observed.values()}
        if ep.ip in public:
            return PathKind.INTERNET
        if ep in self.relayed_peers:
            return PathKind.RELAY
        for own in self.config.lan:
            try:
                mine = ipaddress.ip_address(own)
            except ValueError:
                continue
            if mine.version == ep.ip.version and mine != ep.ip:
                bits = 24 if mine.version == 4 else 64
                same_net = ipaddress.ip_network((mine, bits), strict=False)
                if ep.ip in same_net:
                    return PathKind.LAN
        return PathKind.INTERNET

    def _on_ping(self, peer: Peer, msg: PeerMessage, src: Endpoint, now: float) -> None:
        # Answer where it came from: that is the path the peer is testing.
        body = src.to_text().encode("ascii")
        self._send(src, PeerMessage(Kind.PONG, self.sender, self._next_seq(), msg.seq, body))
        if src not in self.cands:
            # Peer-reflexive: the peer's NAT mapping toward us. Ping it back at once.
            cand_member = next((m.endpoint for m in self.members.values() if m.peer == peer.sender), None)
            self._add_candidate(src, self._classify(src), CandidateSource.PEER_REFLEXIVE, cand_member, peer.sender, now)
        cand = self.cands.get(src)
        if cand is not None and cand.peer is None:
            cand.peer = peer.sender
        if cand is not None and peer.active is None and self._wants_probe(cand, now):
            cand.next_send = now  # a triggered check (ICE): the hole is open right now

    def _on_pong(self, peer: Peer, msg: PeerMessage, src: Endpoint, now: float) -> None:
        sent = self.pending.pop(msg.echo, None)
        if sent is None:
            self.counters["stale_pong"] += 1
            return
        dest, sent_at = sent
        if dest != src:
            # Answered, but from elsewhere: a new candidate, not yet a path.
            self._add_candidate(src, self._classify(src), CandidateSource.PEER_REFLEXIVE, None, peer.sender, now)
            return
        cand = self.cands.get(dest)
        kind = cand.kind if cand else self._classify(dest)
        if cand is not None and cand.peer is None:
            cand.peer = peer.sender
        if cand is not None and cand.member is not None:
            member = self.members.get(cand.member)
            if member is not None and member.peer != peer.sender:
                member.peer = peer.sender
        elif cand is not None and kind == PathKind.INTERNET:
            # A peer-reflexive path (e.g. a symmetric NAT's fresh port): the members the
            # trackers list at that public IP, not yet reached, are most likely this peer
            # as each tracker saw it; without this they would be "given up" while connected.
            for member in self.members.values():
                if member.peer is None and member.endpoint.ip == dest.ip:
                    member.peer = peer.sender
        elif kind == PathKind.RELAY and not any(m.peer == peer.sender for m in self.members.values()):
            # A relayed endpoint says nothing of the member behind it; when the members
            # still unreached are all at one public IP (one host, as each tracker saw
            # it), they are this peer.
            unreached = [m for m in self.members.values() if m.peer is None]
            if len({m.endpoint.ip for m in unreached}) == 1:
                for member in unreached:
                    member.peer = peer.sender
        path = peer.paths.get(dest)
        if path is None:
            path = peer.paths[dest] = Path(dest, kind)
        rtt = now - sent_at
        path.rtt = rtt if path.rtt is None else 0.8 * path.rtt + 0.2 * rtt
        path.last_heard = now
        if path.up:
            return
        path.up = True
        path.last_ping = now
        current = peer.paths.get(peer.active) if peer.active else None
        if current is not None and kind.rank >= current.kind.rank:
            return  # keep the path in use; this one stays a spare
        peer.active = dest
        started = cand.started if cand else peer.first_seen
        if self.first_up is None:
            self.first_up = now
        source = cand.source if cand else CandidateSource.PEER_REFLEXIVE
        observed_as = msg.body.decode("ascii", "replace")[:64]
        self._events.append(PathUp(peer.peer_id, dest, kind, source, rtt, now - started, now - self.t0, observed_as,
                                  self._birthday_method(peer, dest, kind) or self._path_method(kind, observed_as)))
        if self.config.once and self._finish_at is None:
            self._finish_at = now + LINGER

    def _on_data(self, peer: Peer, msg: PeerMessage, src: Endpoint) -> None:
        self._send(src, PeerMessage(Kind.ACK, self.sender, self._next_seq(), msg.echo))
        if not peer.delivered.accept(msg.echo):
            return  # a retransmission of a message we already delivered (our ACK was lost)
        self._events.append(MessageReceived(peer.peer_id, peer.active or src, msg.body))

    def _on_bye(self, peer: Peer, now: float) -> None:
        if peer.active is not None:
            for path in peer.paths.values():
                if path.endpoint != peer.active:
                    path.up = False
            self._path_down(peer, peer.paths[peer.active], "the peer left", now)

    def _resend_data(self, now: float) -> None:
        keep: list[Outgoing] = []
        for out in self.outgoing:
            peer = self.peers.get(out.peer)
            if peer is None or peer.active is None:
                self._events.append(Undelivered(out.peer.hex(), None, "no path"))
                continue
            if now < out.next_send:
                keep.append(out)
                continue
            if out.tries > len(DATA_RETRIES):
                self._events.append(Undelivered(out.peer.hex(), peer.active, "no ack"))
                continue
            self._send(peer.active, PeerMessage(Kind.DATA, self.sender, self._next_seq(), out.msg_id, out.body))
            out.next_send = now + DATA_RETRIES[min(out.tries, len(DATA_RETRIES) - 1)]
            out.tries += 1
            keep.append(out)
        self.outgoing = keep

    # -- birthday punching and port prediction (nattool.protocol.birthday) -------------

    def receive_on_socket(self, index: int, data: bytes, addr: Endpoint, now: float) -> None:
        """A datagram on extra socket ``index``: only peer messages count there. An
        authentic one routes ``addr`` through that socket from now on (its NAT let the
        peer in there: that is where the hole is), and ``addr`` is pinged back at once."""
        if self.ended is not None:
            return
        self._now = now
        msg = self._peer_message(data)
        if msg is None or msg.sender == self.sender:
            return
        fresh = addr not in self.socket_of and index in self.sockets_open
        if fresh:
            self.socket_of[addr] = index
        replayed = self.counters["replayed"]
        self._on_peer_message(msg, addr, now)
        if fresh and self.counters["replayed"] != replayed:
            del self.socket_of[addr]  # a replay opens nothing
        elif fresh and (cand := self.cands.get(addr)) is not None:
            cand.next_send = now  # a triggered check through the new socket, relayed or not
        self._tick(now)

    def datagrams_via(self, now: float) -> list[tuple[int, bytes, Endpoint]]:
        """What goes out of an extra socket: (socket index, datagram, destination)."""
        out, self._out_via = self._out_via, []
        return out

    def _direct_up(self, member: Member) -> bool:
        peer = self.peers.get(member.peer) if member.peer else None
        return peer is not None and peer.active is not None and peer.paths[peer.active].kind != PathKind.RELAY

    def _tick_birthday(self, now: float) -> None:
        """Start a run toward each member the trackers' views call for (birthday
        punching after BIRTHDAY_AFTER s of plain punching), send what the runs have due within the
        rate cap, end them once a direct path is up (a relayed one does not end them),
        and tell the owner which extra sockets to have."""
        if self.config.birthday_budget <= 0 or self.config.relay == RelayMode.ONLY or self.local is None:
            return
        mine = self._own_mapping()[0]
        for member in self.members.values():
            if not member.gave_up and not self._direct_up(member):
                self._start_birthday(member, mine, now)
        # The hard side's rounds are short (one ping per socket): they go first, so that
        # a probing run toward another member cannot starve them.
        for run in sorted(self.birthday.values(), key=lambda r: r.plan.role is Role.PROBE):
            if run.ended:
                if run.opened:
                    # The path it opened: once it is down, a new run may start
                    # (_start_birthday), BIRTHDAY_AFTER later.
                    if any(self._direct_up(m) for m in self._mates(run)):
                        run.lost_at = None
                    elif run.lost_at is None:
                        run.lost_at = now
                continue
            assert self.pacer is not None
            mates = self._mates(run)
            if any(self._direct_up(m) for m in mates):
                self._end_birthday(run, True, "a direct path is up", now)
            elif not mates or all(m.gave_up for m in mates):
                self._end_birthday(run, False, "the member was given up", now)
            elif self.pacer.exhausted and (run.plan.role is Role.PROBE or now >= run.last_send + REFRESH_EVERY):
                self._end_birthday(run, False, f"budget of {self.pacer.budget} probes spent", now)
            else:
                for via, dest in run.sends(now, self.pacer.take(now, run.due(now))):
                    self._ping(dest, now, via)
        self._announce_sockets(now)

    def _mates(self, run: BirthdayRun) -> list[Member]:
        """The members a run is for: a probing run, every member behind the target IP
        (one NAT: a path to any of them is what the probes were for)."""
        if run.plan.role is Role.PROBE:
            return [m for m in self.members.values() if m.endpoint.ip == run.target.ip]
        member = self.members.get(run.member)
        return [member] if member is not None else []

    def _start_birthday(self, member: Member, mine: Optional[str], now: float) -> None:
        assert self.local is not None
        own_ports = [e.port for t, e in self.observed.items() if self.registrations[t].stream != OPEN]
        member_ports = [e.port for eps in self.member_views.values() for e in eps if e.ip == member.endpoint.ip]
        found = plan(mine, self._member_mapping(member)[0], own_ports, self.local.port, member_ports)
        # Prediction costs a few probes and no socket: at once. Birthday punching lets
        # plain punching try first.
        if found is None or (found.method is PathMethod.BIRTHDAY and now < member.first_seen + BIRTHDAY_AFTER):
            return
        target = member.endpoint if found.role is Role.OPEN_PORTS else Endpoint(member.endpoint.ip, 0)
        reason = found.reason
        last = self.birthday.get(target)
        if last is not None:
            # One run a target, unless the direct path it opened was lost: then the
            # NATs have new mappings (a rebinding, a reboot) and the technique is what
            # opened a path between these two before. The new run has a budget of its own.
            if last.lost_at is None or now < last.lost_at + BIRTHDAY_AFTER:
                return
            reason = f"{reason}; again: the direct path it opened was lost"
        if self.pacer is None:
            self.pacer = Pacer(self.config.birthday_rate, self.config.birthday_budget, now)
        elif last is not None:
            self.pacer.budget = self.pacer.spent + self.config.birthday_budget
        self.birthday[target] = BirthdayRun(found, target, member.endpoint, now, self.seed)
        self._events.append(BirthdayStarted(member.endpoint, found.role.value, found.method, found.pattern.value,
                                            reason, self.config.birthday_rate, self.config.birthday_budget))

    def _end_birthday(self, run: BirthdayRun, up: bool, reason: str, now: float) -> None:
        run.ended = True
        run.opened = up
        self._events.append(BirthdayEnded(run.member, run.plan.method, up, run.sent, now - run.start, reason))

    def _announce_sockets(self, now: float) -> None:
        """ExtraSockets when the set changes: every run's sockets while it runs, then only
        those a path that is up lives on (routes through the others are forgotten)."""
        wanted: set[int] = set()
        version = 4
        for run in self.birthday.values():
            count = run.sockets_wanted(now)
            if count:
                wanted.update(range(1, count + 1))
                version = run.target.ip.version
        in_use = {p.endpoint for peer in self.peers.values() for p in peer.paths.values() if p.up}
        wanted |= {via for ep, via in self.socket_of.items() if ep in in_use}
        if tuple(sorted(wanted)) == self.sockets_open:
            return
        self.sockets_open = tuple(sorted(wanted))
        self.socket_of = {ep: via for ep, via in self.socket_of.items() if via in wanted}
        self._events.append(ExtraSockets(self.sockets_open, version))

    def _birthday_timers(self) -> list[float]:
        if self.config.birthday_budget <= 0 or self.config.relay == RelayMode.ONLY:
            return []
        # A plan needs our mapping, which needs two trackers' views.
        times = [m.first_seen + BIRTHDAY_AFTER for m in self.members.values()
                 if len(self.observed) > 1 and not m.gave_up and m.first_seen + BIRTHDAY_AFTER > self._last_tick]
        for run in self.birthday.values():
            if run.lost_at is not None and run.lost_at + BIRTHDAY_AFTER > self._last_tick:
                times.append(run.lost_at + BIRTHDAY_AFTER)  # it may start again then
            if run.ended or self.pacer is None:
                continue
            at, paced = run.next_at(), self.pacer.next_at()
            if at is not None and paced is not None:
                times.append(max(at, paced))
            if run.plan.role is Role.OPEN_PORTS and self.pacer.exhausted:
                times.append(run.last_send + REFRESH_EVERY)  # it ends then (see _tick_birthday)
        return times

    def _birthday_method(self, peer: Peer, dest: Endpoint, kind: PathKind) -> Optional[PathMethod]:
        """BIRTHDAY or PREDICT for a path that a birthday run's probe or extra socket
        just opened; None for any other path."""
        if kind == PathKind.INTERNET:
            for run in self.birthday.values():
                method = run.method_of(dest, dest in self.socket_of)
                if method is None:
                    continue
                # The members the trackers list at the probed IP are this peer (as for a
                # peer-reflexive path): not members to give up on.
                for member in self.members.values():
                    if member.peer is None and member.endpoint.ip == dest.ip:
                        member.peer = peer.sender
                return method
        return None


__all__ = ["ConnectSession", "SessionConfig"]
