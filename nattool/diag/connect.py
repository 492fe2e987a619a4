"""`nattool connect GROUP`: meet the group's members through the trackers and punch a
direct UDP path to each of them.

One local socket per address family carries everything: the registrations (so the NAT
mapping the tracker saw is the one the peers are told about) and the peer messages
(:mod:`nattool.protocol.punch`). The procedure, ICE-like but much smaller:

* register at every tracker; re-register every 0.5 s while no path is up (a member
  that registers after us is only learnt from the tracker, and the acceptance target is
  a path within 3 s), every ``register_every`` s once one is (which also keeps the
  tracker's mapping open);
* for every member, candidates: its public endpoint, and for a member behind our own
  public IP (its line carries ``;lan``) each LAN address at the ports it may listen on
  (see :func:`lan_candidates`); all probed at once with authenticated pings, quickly
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

Time and randomness come in from the constructor, so the decisions can be driven in tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from nattool.errors import NattoolError, ProtocolError
from nattool.exit_codes import ExitCode
from nattool.net.client import ClientPool, UdpClient
from nattool.net.tracker_client import Registrar, TrackerAnswer
from nattool.protocol.endpoint import DEFAULT_PORT, Endpoint, parse_ip
from nattool.protocol.nat_behaviour import BindingObservation, infer_mapping
from nattool.protocol.punch import MAX_BODY, BadMac, Kind, NotPeerMessage, PeerMessage, ReplayGuard, ReplayWindow, derive_key
from nattool.protocol.text import MemberList, RegisterRequest

#: `nattool connect`'s default local port: the tracker's port + 1. A fixed default is
#: what makes LAN paths work without any tracker change (see lan_candidates).
DEFAULT_CONNECT_PORT = DEFAULT_PORT + 1

FAST_REGISTER = 0.5  # s between registrations while no path is up
PROBE_FIRST = 0.1  # s between pings to a fresh candidate ...
PROBE_MAX = 1.0  # ... growing to this
PROBE_GROWTH = 1.5
IMPOSSIBLE_GRACE = 3.0  # s of failed probing before a "cannot work" verdict ends the run
LINGER = 1.5  # s --once keeps answering after its path is up (the peer needs its pong)
DATA_RETRIES = (0.3, 0.6, 1.2, 2.4)  # s after which an unacknowledged line is sent again
PENDING_MAX = 4096

Emit = Callable[[dict[str, Any]], None]

EI = "endpoint-independent"
ED = "endpoint-dependent"


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    group: str
    trackers: tuple[Endpoint, ...]
    port: int = DEFAULT_CONNECT_PORT
    bind: Optional[str] = None
    lan: tuple[str, ...] = ()
    identity: Optional[str] = None
    timeout: float = 30.0  # give up when no path is up for this long
    keepalive: float = 20.0
    dead_after: float = 60.0
    register_every: float = 20.0
    tracker_timeout: float = 2.0
    retries: int = 3
    once: bool = False  # exit 0 as soon as a path is up


# --------------------------------------------------------------------------- candidates


def lan_candidates(lan: Sequence[str], public_port: int, own_port: int) -> list[Endpoint]:
    """Where a member behind our public IP may listen on its LAN.

    The registration publishes LAN *addresses* only, not the local port, and the tracker
    protocol has no field for it. Rather than change the tracker, we try the ports it is
    likely to be: the member's public port (NATs keep the inside port when it is free:
    Linux masquerade, most home routers), our own local port (members of one group tend
    to run with the same --port), and the default port of `nattool connect`. Pings are
    authenticated, so a wrong guess costs a few ignored datagrams on the LAN; and a member
    that reaches us first from its real port becomes a peer-reflexive candidate anyway.
    """
    ports: list[int] = []
    for p in (public_port, own_port, DEFAULT_CONNECT_PORT):
        if p and p not in ports:
            ports.append(p)
    out: list[Endpoint] = []
    for addr in lan:
        try:
            ip = parse_ip(addr)
        except ProtocolError:
            continue
        for p in ports:
            out.append(Endpoint(ip, p))
    return out


def mapping_of(observed: dict[Endpoint, Endpoint], local: Endpoint) -> tuple[Optional[str], str]:
    """Our mapping behaviour from the public endpoints the trackers saw (tracker ->
    endpoint), with the reasoning. None = unknown."""
    if len(observed) < 2:
        return None, "only one tracker answered: mapping behaviour unknown (give two trackers on different IPs)"
    return _mapping_verdict(local, observed)


def _mapping_verdict(local: Endpoint, seen_as: dict[Endpoint, Endpoint]) -> tuple[Optional[str], str]:
    """EI/ED/None and the reasoning, from where each tracker saw one socket."""
    obs = [BindingObservation("s", local, tracker, mapped) for tracker, mapped in seen_as.items()]
    _, eim, reason = infer_mapping(obs)
    seen = ", ".join(f"{t} saw {m}" for t, m in seen_as.items())
    if eim:
        return EI, f"{seen}: {reason}"
    if eim is False:
        return ED, f"{seen}: {reason}"
    return None, f"{seen}: {reason}"


def verdict(mine: Optional[str], theirs: Optional[str]) -> tuple[bool, str]:
    """(impossible?, explanation) for a member no path could be opened to."""
    if mine == ED and theirs == ED:
        return True, (
            "both sides' NATs pick a new public port per destination (symmetric NAT: endpoint-"
            "dependent mapping): neither side can know which port to send to, so hole punching "
            "cannot work; these peers need a relay (TURN)"
        )
    if mine == ED:
        return False, (
            "your NAT picks a new public port per destination (symmetric): punching works only "
            "with peers whose NAT maps endpoint-independently and does not filter by port "
            "(full cone, restricted cone, or no NAT); this peer's NAT is apparently not one of them"
        )
    if theirs == ED:
        return False, (
            "the peer's NAT picks a new public port per destination (symmetric): punching works "
            "only if your NAT does not filter by port (full cone or restricted cone); "
            "run 'nattool probe' to see your filtering"
        )
    if mine == EI and theirs == EI:
        return False, (
            "both NATs map endpoint-independently, which should punch; no authenticated answer "
            "came back: the peer may be gone, UDP may be filtered, or a firewall drops it"
        )
    return False, (
        "no authenticated answer from any candidate path; mapping behaviour is unknown on "
        f"{'your side' if mine is None else 'the peer side'} (run 'nattool probe', or give two trackers)"
    )


# --------------------------------------------------------------------------- state


@dataclass
class Candidate:
    endpoint: Endpoint
    kind: str  # "lan" | "internet"
    member: Optional[Endpoint]  # the member (public endpoint) it belongs to, if any
    peer: Optional[bytes]  # the peer it belongs to (peer-reflexive), if known
    started: float
    next_send: float
    interval: float = PROBE_FIRST
    sent: int = 0


@dataclass
class Path:
    endpoint: Endpoint
    kind: str
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
    ever_up: bool = False

    @property
    def name(self) -> str:
        return self.active.to_text() if self.active else self.sender.hex()


@dataclass
class Member:
    endpoint: Endpoint
    lan: tuple[str, ...]
    first_seen: float
    trackers: set[Endpoint] = field(default_factory=set)
    peer: Optional[bytes] = None
    gave_up: bool = False


@dataclass
class _Outgoing:
    msg_id: int
    body: bytes
    peer: bytes
    tries: int = 0
    next_send: float = 0.0


# --------------------------------------------------------------------------- the engine


class Connector:
    """The procedure. ``run()`` returns the exit code; ``send_line()`` queues a line for
    every connected peer; events go to ``emit`` as dicts with an ``event`` key."""

    def __init__(
        self,
        opts: ConnectOptions,
        emit: Emit,
        *,
        clock: Callable[[], float] = time.monotonic,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.opts = opts
        self.emit = emit
        self.clock = clock
        self.key = derive_key(opts.group)
        self.sender = random_bytes(8)
        self.seq = 0
        self.msg_id = 0
        self.guard = ReplayGuard()
        self.members: dict[Endpoint, Member] = {}
        self.peers: dict[bytes, Peer] = {}
        self.cands: dict[Endpoint, Candidate] = {}
        self.pending: dict[int, tuple[Endpoint, float]] = {}
        self.outgoing: list[_Outgoing] = []
        self.observed: dict[Endpoint, Endpoint] = {}  # tracker -> our public endpoint
        self.member_views: dict[Endpoint, list[Endpoint]] = {}  # tracker -> member endpoints
        self.clients: dict[int, UdpClient] = {}
        self.counters = {"bad_mac": 0, "junk": 0, "replayed": 0, "stale_pong": 0}
        self.t0 = clock()
        self.no_path_since = self.t0
        self.any_tracker_answered = False
        self.first_up: Optional[float] = None
        self._register_now = asyncio.Event()
        self._done: Optional[int] = None
        self._tick_soon = False
        self.backlog: list[str] = []  # lines typed before any path was up
        self.closing = False  # input ended: leave once every line is delivered
        self.local: Optional[Endpoint] = None

    # -- sockets ---------------------------------------------------------------------

    async def _open(self) -> ClientPool:
        pool = ClientPool(self.opts.port, self.opts.bind)
        families = {socket.AF_INET6 if t.ip.version == 6 else socket.AF_INET for t in self.opts.trackers}
        for family in sorted(families):
            probe = next(t for t in self.opts.trackers if (t.ip.version == 6) == (family == socket.AF_INET6))
            client = await pool.for_endpoint(probe)
            client.listener = self._on_datagram
            self.clients[family] = client
            if self.local is None:
                self.local = client.local
        return pool

    def _send(self, dest: Endpoint, msg: PeerMessage) -> None:
        client = self.clients.get(socket.AF_INET6 if dest.ip.version == 6 else socket.AF_INET)
        if client is None:
            return
        try:
            client.send(dest, msg.to_wire(self.key))
        except NattoolError:
            pass  # an unroutable candidate is just a candidate that does not work

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _ping(self, dest: Endpoint, now: float) -> None:
        seq = self._next_seq()
        self.pending[seq] = (dest, now)
        if len(self.pending) > PENDING_MAX:
            for old in sorted(self.pending)[: len(self.pending) - PENDING_MAX]:
                del self.pending[old]
        self._send(dest, PeerMessage(Kind.PING, self.sender, seq))

    # -- main ------------------------------------------------------------------------

    async def run(self) -> int:
        """Until a path was up with --once, the session is given up, or finish()."""
        pool = await self._open()
        self._done_fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self._done is not None:
            self._done_fut.set_result(self._done)
        tasks = [asyncio.create_task(self._register_loop()), asyncio.create_task(self._tick_loop())]
        try:
            await asyncio.wait([self._done_fut, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            return self._done_fut.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            pool.close()

    def finish(self, code: int) -> None:
        if self._done is None:
            self._done = code
            fut = getattr(self, "_done_fut", None)
            if fut is not None and not fut.done():
                fut.set_result(code)

    def leave(self) -> None:
        """Say goodbye to every connected peer (stdin closed, or Ctrl-C)."""
        for peer in self.peers.values():
            if peer.active is not None:
                self._send(peer.active, PeerMessage(Kind.BYE, self.sender, self._next_seq()))

    # -- registration ----------------------------------------------------------------

    async def _register_loop(self) -> None:
        registrar = Registrar(_PoolView(self), self.opts.tracker_timeout, self.opts.retries)
        request = RegisterRequest(group=self.opts.group, lan=self.opts.lan, identity=self.opts.identity)
        while True:
            answers = await registrar.register_all(list(self.opts.trackers), request)
            self._on_registered(answers)
            fast = not any(p.active for p in self.peers.values())
            wait = FAST_REGISTER if fast else self.opts.register_every
            try:
                async with asyncio.timeout(wait):  # not wait_for: see net/client.py
                    await self._register_now.wait()
            except TimeoutError:
                pass
            self._register_now.clear()

    def _on_registered(self, answers: list[TrackerAnswer]) -> None:
        now = self.clock()
        for answer in answers:
            if not answer.ok or not isinstance(answer.value, MemberList):
                continue
            entries = answer.value.entries
            me = entries[0].endpoint
            if not self.any_tracker_answered:
                self.any_tracker_answered = True
            if self.observed.get(answer.tracker) != me:
                self.observed[answer.tracker] = me
                self.emit({"event": "registered", "tracker": answer.tracker.to_text(), "public": me.to_text(),
                           "form": answer.form})
            mine = set(self.observed.values())
            self.member_views[answer.tracker] = [e.endpoint for e in entries[1:]]
            for entry in entries[1:]:
                if entry.endpoint in mine:
                    continue  # ourselves as another tracker saw us
                self._on_member(entry.endpoint, entry.lan, answer.tracker, now)

    def _on_member(self, ep: Endpoint, lan: tuple[str, ...], tracker: Endpoint, now: float) -> None:
        member = self.members.get(ep)
        if member is None:
            member = self.members[ep] = Member(ep, lan, now)
            self.emit({"event": "member_seen", "member": ep.to_text(), "lan": list(lan), "tracker": tracker.to_text()})
            self._add_candidate(ep, "internet", ep, None, now)
            own_port = self.local.port if self.local else 0
            for cand in lan_candidates(lan, ep.port, own_port):
                self._add_candidate(cand, "lan", ep, None, now)
        member.trackers.add(tracker)

    def _add_candidate(self, ep: Endpoint, kind: str, member: Optional[Endpoint], peer: Optional[bytes], now: float) -> None:
        if ep in self.cands or ep in set(self.observed.values()):
            return
        if self.local is not None and ep.port == self.local.port and self._is_local(ep):
            return  # our own socket (our LAN address in someone's list, or loopback)
        self.cands[ep] = Candidate(ep, kind, member, peer, now, now)
        self._wake_tick()

    def _is_local(self, ep: Endpoint) -> bool:
        return str(ep.ip) in self.opts.lan or (self.local is not None and ep.ip == self.local.ip)

    # -- probing, keepalive, give-up -------------------------------------------------

    def _wake_tick(self) -> None:
        """Something changed: probe now rather than at the next tick."""
        loop = asyncio.get_running_loop()
        if not self._tick_soon:
            self._tick_soon = True
            loop.call_soon(self._soon)

    def _soon(self) -> None:
        self._tick_soon = False
        if self._done is None:
            self.tick(self.clock())

    async def _tick_loop(self) -> None:
        while True:
            self.tick(self.clock())
            await asyncio.sleep(0.05)

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
        owner = self._owner(cand)
        if owner is None or owner.active is None:
            return True
        path = owner.paths.get(cand.endpoint)
        if path is not None and path.up:
            return False
        # Connected over the internet: keep trying its LAN for a while, a better path.
        active_kind = owner.paths[owner.active].kind
        return cand.kind == "lan" and active_kind != "lan" and now - cand.started < self.opts.timeout

    def tick(self, now: float) -> None:
        for cand in list(self.cands.values()):
            if now >= cand.next_send and self._wants_probe(cand, now):
                self._ping(cand.endpoint, now)
                cand.sent += 1
                cand.next_send = now + cand.interval
                cand.interval = min(PROBE_MAX, cand.interval * PROBE_GROWTH)
        for peer in self.peers.values():
            if peer.active is None:
                continue
            path = peer.paths[peer.active]
            if now - path.last_heard >= self.opts.dead_after:
                self._path_down(peer, path, f"no answer for {now - path.last_heard:.1f}s", now)
            elif now - path.last_ping >= self.opts.keepalive:
                path.last_ping = now
                self._ping(path.endpoint, now)
        if self.backlog and any(p.active for p in self.peers.values()):
            lines, self.backlog = self.backlog, []
            for line in lines:
                self.send_line(line)
        self._resend_data(now)
        if self.closing and self.first_up is not None and not self.backlog and not self.outgoing:
            self.leave()
            self.finish(int(ExitCode.OK))
        self._check_give_up(now)

    def _path_down(self, peer: Peer, path: Path, reason: str, now: float) -> None:
        path.up = False
        was = peer.active
        peer.active = None
        # The best other path that is still up takes over; else probe everything again.
        for other in sorted(peer.paths.values(), key=lambda p: (p.kind != "lan", p.rtt or 0)):
            if other.up and now - other.last_heard < self.opts.dead_after:
                peer.active = other.endpoint
                break
        self.emit({"event": "path_down", "peer": was.to_text() if was else None, "peer_id": peer.sender.hex(),
                   "path": path.kind, "reason": reason})
        if peer.active is None:
            if not any(p.active for p in self.peers.values()):
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
            self._register_now.set()

    def _check_give_up(self, now: float) -> None:
        if self._done is not None:
            return
        connected = any(p.active for p in self.peers.values())
        mine, mine_why = mapping_of(self.observed, self.local) if self.local else (None, "")
        # Members nobody reached in `timeout` (while others are up) are given up one by one.
        for member in self.members.values():
            if member.gave_up or self._member_up(member):
                continue
            theirs, theirs_why = self._member_mapping(member)
            impossible, why = verdict(mine, theirs)
            tried = now - member.first_seen
            if tried >= self.opts.timeout or (impossible and tried >= IMPOSSIBLE_GRACE):
                member.gave_up = True
                self.emit({"event": "gave_up", "member": member.endpoint.to_text(), "impossible": impossible,
                           "reason": why, "mapping": {"self": mine, "self_reason": mine_why,
                                                      "peer": theirs, "peer_reason": theirs_why},
                           "tried_s": round(tried, 3)})
        if connected:
            return
        if self.members and all(m.gave_up for m in self.members.values()):
            self.finish(int(ExitCode.FAILURE))
            return
        if now - self.no_path_since < self.opts.timeout:
            return
        if not self.any_tracker_answered:
            self.emit({"event": "gave_up", "member": None, "impossible": False,
                       "reason": f"no tracker answered within {self.opts.timeout:g}s: UDP may be blocked on this "
                                 "network, or the trackers are down"})
            self.finish(int(ExitCode.TIMEOUT))
        elif not self.members:
            self.emit({"event": "gave_up", "member": None, "impossible": False,
                       "reason": f"no other member joined the group within {self.opts.timeout:g}s"})
            self.finish(int(ExitCode.TIMEOUT))
        else:
            self.finish(int(ExitCode.FAILURE))

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
            return None, "several members behind that public IP: cannot tell"
        return _mapping_verdict(member.endpoint, {t: v[0] for t, v in per_tracker.items()})

    # -- receiving -------------------------------------------------------------------

    def _on_datagram(self, data: bytes, src: Endpoint) -> None:
        try:
            msg = PeerMessage.from_wire(data, self.key)
        except NotPeerMessage:
            self.counters["junk"] += 1  # late tracker replies, scanners: ignore
            return
        except BadMac:
            self.counters["bad_mac"] += 1
            return
        except ProtocolError:
            self.counters["junk"] += 1
            return
        if msg.sender == self.sender:
            return  # our own ping, hairpinned or looped back
        if not self.guard.accept(msg.sender, msg.seq):
            self.counters["replayed"] += 1
            return
        now = self.clock()
        peer = self.peers.get(msg.sender)
        if peer is None:
            peer = self.peers[msg.sender] = Peer(msg.sender, now)
        path = peer.paths.get(src)
        if path is not None and path.up:
            path.last_heard = now
        handler = {
            Kind.PING: self._on_ping,
            Kind.PONG: self._on_pong,
            Kind.DATA: self._on_data,
            Kind.ACK: self._on_ack,
            Kind.BYE: self._on_bye,
        }[msg.kind]
        handler(peer, msg, src, now)
        self._wake_tick()

    def _classify(self, ep: Endpoint) -> str:
        """LAN or Internet, for an endpoint a peer reached us from. A member's LAN list
        says it best; before the tracker told us about the member, an address in the
        subnet of one of our own LAN addresses (/24, /64: the prefix length is not
        known) that is nobody's public address is taken for a LAN neighbour."""
        for member in self.members.values():
            if str(ep.ip) in member.lan:
                return "lan"
        public = {m.endpoint.ip for m in self.members.values()} | {e.ip for e in self.observed.values()}
        if ep.ip in public:
            return "internet"
        for own in self.opts.lan:
            try:
                mine = ipaddress.ip_address(own)
            except ValueError:
                continue
            if mine.version == ep.ip.version and mine != ep.ip:
                bits = 24 if mine.version == 4 else 64
                if ipaddress.ip_network((mine, bits), strict=False) == ipaddress.ip_network((ep.ip, bits), strict=False):
                    return "lan"
        return "internet"

    def _on_ping(self, peer: Peer, msg: PeerMessage, src: Endpoint, now: float) -> None:
        # Answer where it came from: that is the path the peer is testing.
        body = src.to_text().encode("ascii")
        self._send(src, PeerMessage(Kind.PONG, self.sender, self._next_seq(), msg.seq, body))
        if src not in self.cands:
            # Peer-reflexive: the peer's NAT mapping toward us. Ping it back at once.
            cand_member = next((m.endpoint for m in self.members.values() if m.peer == peer.sender), None)
            self._add_candidate(src, self._classify(src), cand_member, peer.sender, now)
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
            self._add_candidate(src, self._classify(src), None, peer.sender, now)
            return
        cand = self.cands.get(dest)
        kind = cand.kind if cand else self._classify(dest)
        if cand is not None and cand.member is not None:
            member = self.members.get(cand.member)
            if member is not None and member.peer != peer.sender:
                member.peer = peer.sender
        elif cand is not None and kind == "internet":
            # A peer-reflexive path (e.g. a symmetric NAT's fresh port): the members the
            # trackers list at that public IP, not yet reached, are most likely this peer
            # as each tracker saw it; without this they would be "given up" while connected.
            for member in self.members.values():
                if member.peer is None and member.endpoint.ip == dest.ip:
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
        if current is not None and not (kind == "lan" and current.kind != "lan"):
            return  # keep the path in use; this one stays a spare
        peer.active = dest
        started = cand.started if cand else peer.first_seen
        if self.first_up is None:
            self.first_up = now
        peer.ever_up = True
        self.emit({
            "event": "path_up",
            "peer": dest.to_text(),
            "peer_id": peer.sender.hex(),
            "path": kind,
            "rtt_ms": round(rtt * 1000, 3),
            "open_s": round(now - started, 3),
            "since_start_s": round(now - self.t0, 3),
            "observed_as": msg.body.decode("ascii", "replace")[:64],
        })
        if self.opts.once:
            asyncio.get_running_loop().call_later(LINGER, self.finish, int(ExitCode.OK))

    def _on_data(self, peer: Peer, msg: PeerMessage, src: Endpoint, now: float) -> None:
        self._send(src, PeerMessage(Kind.ACK, self.sender, self._next_seq(), msg.echo))
        if not peer.delivered.accept(msg.echo):
            return  # a retransmission of a line we already showed (our ACK was lost)
        text = sanitize(msg.body.decode("utf-8", "replace"))
        self.emit({"event": "message", "peer": (peer.active or src).to_text(), "peer_id": peer.sender.hex(), "text": text})

    def _on_ack(self, peer: Peer, msg: PeerMessage, src: Endpoint, now: float) -> None:
        self.outgoing = [o for o in self.outgoing if not (o.peer == peer.sender and o.msg_id == msg.echo)]

    def _on_bye(self, peer: Peer, msg: PeerMessage, src: Endpoint, now: float) -> None:
        if peer.active is not None:
            for path in peer.paths.values():
                if path.endpoint != peer.active:
                    path.up = False
            self._path_down(peer, peer.paths[peer.active], "the peer left", now)

    # -- sending lines ---------------------------------------------------------------

    def send_line(self, text: str) -> int:
        """Queue ``text`` for every connected peer; returns how many it goes to (0: it
        waits in the backlog for the first path)."""
        if not any(p.active for p in self.peers.values()):
            self.backlog.append(text)
            return 0
        body = text.encode("utf-8")[:MAX_BODY]
        now = self.clock()
        count = 0
        for peer in self.peers.values():
            if peer.active is None:
                continue
            self.msg_id += 1
            self.outgoing.append(_Outgoing(self.msg_id, body, peer.sender, 0, now))
            count += 1
        self._resend_data(now)
        return count

    def _resend_data(self, now: float) -> None:
        keep: list[_Outgoing] = []
        for out in self.outgoing:
            peer = self.peers.get(out.peer)
            if peer is None or peer.active is None:
                self.emit({"event": "undelivered", "peer_id": out.peer.hex(), "reason": "no path"})
                continue
            if now < out.next_send:
                keep.append(out)
                continue
            if out.tries > len(DATA_RETRIES):
                self.emit({"event": "undelivered", "peer": peer.name, "peer_id": out.peer.hex(), "reason": "no ack"})
                continue
            self._send(peer.active, PeerMessage(Kind.DATA, self.sender, self._next_seq(), out.msg_id, out.body))
            out.next_send = now + DATA_RETRIES[min(out.tries, len(DATA_RETRIES) - 1)]
            out.tries += 1
            keep.append(out)
        self.outgoing = keep


def sanitize(text: str) -> str:
    """A peer's line as it may reach a terminal: no control characters (no escape
    sequences that could rewrite the screen), tabs kept."""
    return "".join(ch if ch == "\t" or (ch.isprintable()) else "\ufffd" for ch in text.rstrip("\r\n"))


# --------------------------------------------------------------------------- session


async def connect_session(opts: ConnectOptions, emit: Emit, *, read_stdin: bool = True) -> int:
    """Run a Connector with stdin as the outgoing chat: each line goes to every connected
    peer; end of input says goodbye to the peers and ends the session (exit 0)."""
    connector = Connector(opts, emit)
    if not read_stdin or opts.once:
        return await connector.run()
    runner = asyncio.create_task(connector.run())
    reader = asyncio.create_task(_pump_stdin(connector, emit))
    try:
        await asyncio.wait([runner, reader], return_when=asyncio.FIRST_COMPLETED)
        if reader.done() and not reader.cancelled() and reader.exception() is None:
            # End of input: leave once what was typed is delivered (`echo hi | nattool
            # connect G` waits for a peer, hands the line over, and exits 0).
            connector.closing = True
        return await runner
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        if not runner.done():
            connector.leave()  # Ctrl-C: the peers hear it now, not after --dead-after
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


async def _pump_stdin(connector: Connector, emit: Emit) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(0), "rb", 0))
        read_line = reader.readline
    except (ValueError, OSError):
        # A regular file on stdin cannot be a pipe transport; reading it never blocks long.
        import sys

        async def read_line() -> bytes:
            return await loop.run_in_executor(None, sys.stdin.buffer.readline)

    while True:
        line = await read_line()
        if not line:
            return
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if not text:
            continue
        if connector.send_line(text) == 0:
            emit({"event": "queued", "reason": "no path up yet: the line waits for the first peer"})


# --------------------------------------------------------------------------- plumbing


class _PoolView(ClientPool):
    """What the Registrar sees: the connector's own sockets, never new ones."""

    def __init__(self, owner: Connector) -> None:
        super().__init__(0)
        self.owner = owner

    async def for_endpoint(self, dest: Endpoint) -> UdpClient:
        family = socket.AF_INET6 if dest.ip.version == 6 else socket.AF_INET
        return self.owner.clients[family]

    def close(self) -> None:
        pass


__all__ = [
    "DEFAULT_CONNECT_PORT",
    "ConnectOptions",
    "Connector",
    "connect_session",
    "lan_candidates",
    "mapping_of",
    "sanitize",
    "verdict",
]
