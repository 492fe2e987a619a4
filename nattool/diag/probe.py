"""`nattool probe`: measure what the NAT in front of this host does (RFC 4787 / 5780).

I/O lives here; every decision is in :mod:`nattool.protocol.nat_behaviour`.

Why not net/client.py: its transactions accept a reply only from the address the request
went to, while CHANGE-REQUEST answers come *by design* from another address, and the
hairpin/lifetime tests receive on a socket other than the one that sent. So the probe
runs its own small engine: blocking sockets, one ``select`` loop, every transaction in
flight at once, each with retransmissions (the clients' doubling backoff: by default
sends at 0, 143, 429 ms, give up at 1 s).

Procedure per address family (each test on its own fresh local socket, so a test never
opens the NAT for another):

  phase 1  socket M: Binding (and ``//nat`` for trackers) to every server's primary
           address; per STUN server sockets F1/F2: CHANGE-REQUEST ip+port / port only.
  phase 2  socket M: Binding to the server's OTHER-ADDRESS variants (mapping test, and
           proof that the alternate address really answers from where it says);
           socket C: the control -- contact the alternate addresses first;
           socket H: hairpinning (--hairpin).
  phase 3  socket C: CHANGE-REQUESTs, only when F1 and F2 both stayed silent: their
           answers now pass any NAT filter, so silence here means the server does not
           honour CHANGE-REQUEST and the silence in phase 1 proved nothing.
  lifetime (--lifetime) sockets X_k get a mapping, stay idle w_k seconds, then socket Y
           asks the server (RESPONSE-PORT) to answer to X_k's public port; all in parallel.

nattool never contacts a host the user did not name: there is no default server list.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

from nattool import __version__
from nattool.errors import NetworkError, ProtocolError, UsageError
from nattool.protocol.retransmit import backoff_schedule
from nattool.net.gateway import default_gateway
from nattool.net.localinfo import local_address_towards
from nattool.protocol.endpoint import DEFAULT_PORT, Endpoint
from nattool.protocol.nat_behaviour import (
    BindingObservation,
    FilteringEvidence,
    NatBehaviour,
    Outcome,
    infer,
)
from nattool.protocol.stun import (
    DEFAULT_STUN_PORT,
    ChangedAddress,
    ErrorCode,
    MappedAddress,
    MsgClass,
    OtherAddress,
    ResponseOrigin,
    SourceAddress,
    StunMessage,
    XorMappedAddress,
    binding_request,
    parse as parse_stun,
)

if TYPE_CHECKING:
    from nattool.net.portmap import PortmapReport

SCHEMA = "nattool.probe/1"
SOFTWARE = f"nattool/{__version__}"
GIVE_UP = 1.0  # default seconds after its start a transaction counts as unanswered
RETRIES = 2  # default retransmissions within GIVE_UP
LIFETIME_LADDER = (2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300)
MAX_REPEAT = 20

Resolve = Callable[[str, int], list[Endpoint]]


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """A server to probe: a tracker (STUN on its port, or only ``//nat`` if old) or a
    plain STUN server."""

    label: str  # as the user wrote it
    endpoint: Endpoint
    kind: str  # "tracker" | "stun"


def resolve_literal(host: str, port: int) -> list[Endpoint]:
    """The default resolver: IP literals and ``localhost`` only (no DNS here; the CLI
    passes the net layer's resolver)."""
    if host == "localhost":
        return [Endpoint(ipaddress.ip_address("127.0.0.1"), port), Endpoint(ipaddress.ip_address("::1"), port)]
    try:
        return [Endpoint(ipaddress.ip_address(host.strip("[]")), port)]
    except ValueError:
        raise UsageError(f"{host!r} is not an IP address (name resolution is done by the CLI)") from None


def parse_target(text: str, resolve: Resolve = resolve_literal) -> list[ProbeTarget]:
    """``host[:port]`` (tracker, default port 43283) or ``stun:host[:port]`` (3478)."""
    from nattool.protocol.tracker_spec import parse_tracker_spec

    spec = parse_tracker_spec(text)
    kind = "stun" if spec.scheme == "stun" else "tracker"
    eps = [Endpoint(spec.ip, spec.port)] if spec.ip is not None else resolve(spec.host, spec.port)
    return [ProbeTarget(text, ep, kind) for ep in eps]


# --------------------------------------------------------------------------- engine


@dataclass(eq=False)
class Txn:
    """One request with retransmissions; filled in by :func:`run_transactions`."""

    label: str  # the local socket's label
    sock: socket.socket
    dest: Endpoint
    payload: bytes
    what: str  # human description of the request
    txid: Optional[bytes] = None  # STUN transaction id; None for the text //nat
    recv_sock: Optional[socket.socket] = None  # where the answer arrives (default: sock)
    start: float = 0.0  # seconds after the run starts
    sent: int = 0
    reply: Optional[bytes] = None
    reply_from: Optional[Endpoint] = None
    rtt: Optional[float] = None
    error: Optional[str] = None  # why it could not be sent
    _last_send: float = 0.0
    # Socket names, kept for the evidence after the sockets are closed.
    local: str = ""
    received_on: Optional[str] = None

    def __post_init__(self) -> None:
        self.local = str(Endpoint.from_sockaddr(self.sock.getsockname()))
        if self.recv_sock is not None:
            self.received_on = str(Endpoint.from_sockaddr(self.recv_sock.getsockname()))

    @property
    def receiver(self) -> socket.socket:
        return self.recv_sock or self.sock

    @property
    def message(self) -> Optional[StunMessage]:
        if self.reply is None or self.txid is None:
            return None
        try:
            return parse_stun(self.reply)
        except ProtocolError:
            return None

    def evidence(self) -> dict[str, object]:
        out: dict[str, object] = {
            "socket": self.label,
            "local": self.local,
            "sent_to": str(self.dest),
            "request": self.what,
            "attempts": self.sent,
            "reply_from": str(self.reply_from) if self.reply_from else None,
            "reply": _describe_reply(self),
            "rtt_ms": round(self.rtt * 1000, 2) if self.rtt is not None else None,
        }
        if self.received_on is not None:
            out["received_on"] = self.received_on
        if self.error:
            out["error"] = self.error
        return out


def _describe_reply(t: Txn) -> Optional[str]:
    if t.reply is None:
        return None
    if t.txid is None:
        return t.reply[:64].decode("ascii", "replace").strip()
    msg = t.message
    if msg is None:
        return "unparseable"
    parts = [msg.msg_class.name.lower()]
    for attr in msg.attributes:
        if isinstance(attr, ErrorCode):
            parts.append(f"error={attr.code}")
        elif hasattr(attr, "endpoint"):
            parts.append(f"{type(attr).__name__}={attr.endpoint}")  # type: ignore[attr-defined]
    return " ".join(parts)


def send_times(give_up: float, retries: int) -> tuple[float, ...]:
    """When each transaction sends, seconds after its start: the clients' doubling
    backoff, the waits summing to ``give_up``."""
    waits = backoff_schedule(give_up, retries)
    return tuple(sum(waits[:i]) for i in range(len(waits)))


SCHEDULE = send_times(GIVE_UP, RETRIES)


def run_transactions(
    txns: Sequence[Txn],
    *,
    schedule: Sequence[float] = SCHEDULE,
    give_up: float = GIVE_UP,
    clock: Callable[[], float] = time.monotonic,
    stop: Optional[threading.Event] = None,
) -> None:
    """Run every transaction at once until each is answered or given up (or ``stop``
    is set: checked at least once a second)."""
    t0 = clock()
    socks = {id(t.receiver): t.receiver for t in txns}
    for t in txns:
        socks.setdefault(id(t.sock), t.sock)
    pending = [t for t in txns]
    while pending and not (stop is not None and stop.is_set()):
        now = clock() - t0
        next_event = now + 1.0
        still: list[Txn] = []
        for t in pending:
            if t.reply is not None or t.error is not None:
                continue
            if now >= t.start + give_up:
                continue
            while t.sent < len(schedule) and now >= t.start + schedule[t.sent]:
                try:
                    t.sock.sendto(t.payload, t.dest.sockaddr())
                except OSError as exc:
                    t.error = f"cannot send to {t.dest}: {exc.strerror or exc}"
                    break
                t.sent += 1
                t._last_send = now
            if t.error is not None:
                continue
            still.append(t)
            nxt = t.start + (schedule[t.sent] if t.sent < len(schedule) else give_up)
            next_event = min(next_event, nxt)
        pending = still
        if not pending:
            break
        wait = max(0.0, next_event - (clock() - t0))
        readable, _, _ = select.select(list(socks.values()), [], [], wait)
        for s in readable:
            _drain(s, pending, clock() - t0)


def _drain(sock: socket.socket, pending: list[Txn], now: float) -> None:
    while True:
        try:
            data, addr = sock.recvfrom(2048)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # e.g. an ICMP error reported on the socket: the timeout tells
        src = Endpoint.from_sockaddr(addr)
        txid: Optional[bytes] = None
        if len(data) >= 20 and data[0] & 0xC0 == 0:
            try:
                txid = parse_stun(data).transaction_id
            except ProtocolError:
                txid = None
        for t in pending:
            if t.reply is not None or t.receiver is not sock:
                continue
            if (txid is not None and t.txid == txid) or (txid is None and t.txid is None and src == t.dest):
                t.reply, t.reply_from, t.rtt = data, src, now - t._last_send
                break


# --------------------------------------------------------------------------- probe


@dataclass
class ServerRun:
    """What was learnt about one server in one family."""

    target: ProbeTarget
    txns: list[Txn] = field(default_factory=list)
    protocol: Optional[str] = None  # "stun" | "//nat" | None (no answer)
    mapped: Optional[Endpoint] = None
    other: Optional[Endpoint] = None
    origin_ok: Optional[bool] = None
    rfc5780: bool = False
    rfc5780_reason: str = "not tested"
    filtering: Optional[FilteringEvidence] = None

    def to_json(self) -> dict[str, object]:
        f = self.filtering
        return {
            "server": self.target.label,
            "kind": self.target.kind,
            "address": str(self.target.endpoint),
            "answered": self.protocol is not None,
            "protocol": self.protocol,
            "mapped": str(self.mapped) if self.mapped else None,
            "other_address": str(self.other) if self.other else None,
            "rfc5780": self.rfc5780,
            "rfc5780_reason": self.rfc5780_reason,
            "filtering_tests": None
            if f is None
            else {
                "change_ip_port": f.change_ip_port.value,
                "change_port": f.change_port.value,
                "control_honoured": f.control_honoured,
            },
            "transactions": [t.evidence() for t in self.txns],
        }


@dataclass(frozen=True)
class FamilyResult:
    family: str  # "IPv4" | "IPv6"
    behaviour: NatBehaviour
    servers: tuple[ServerRun, ...]
    lifetime: Optional[dict[str, object]] = None
    elapsed: float = 0.0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"family": self.family}
        out.update(self.behaviour.to_json())
        out["lifetime"] = self.lifetime
        out["servers"] = [s.to_json() for s in self.servers]
        out["elapsed_s"] = round(self.elapsed, 3)
        return out


@dataclass(frozen=True)
class ProbeResult:
    families: tuple[FamilyResult, ...]
    runs: tuple[tuple[FamilyResult, ...], ...] = ()  # all runs (--repeat)
    elapsed: float = 0.0
    portmap: Optional[PortmapReport] = None  # what the gateway offers for port mapping (None: not asked)

    @property
    def ok(self) -> bool:
        """Did any server answer, in any family?"""
        return any(f.behaviour.udp == "ok" for f in self.families)

    def send_failure(self) -> Optional[str]:
        """Why nothing could be sent (no route, ...), when not a single request left;
        None when something was sent (its silence is then the network's answer)."""
        txns = [t for f in self.families for s in f.servers for t in s.txns]
        if not txns or any(t.error is None for t in txns):
            return None
        return txns[0].error

    @property
    def primary(self) -> Optional[FamilyResult]:
        return self.families[0] if self.families else None

    def consistent(self) -> Optional[bool]:
        if len(self.runs) < 2:
            return None
        keys = [
            tuple((f.family, f.behaviour.nat_type, f.behaviour.mapping, f.behaviour.filtering) for f in run)
            for run in self.runs
        ]
        return all(k == keys[0] for k in keys)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"schema": SCHEMA, "software": SOFTWARE}
        first = self.primary
        if first is not None:
            out.update(first.to_json())
        else:
            out.update({"udp": None, "mapping": None, "filtering": None, "nat_type": "unknown", "public_endpoint": None, "servers": []})
        out["families"] = {f.family: f.to_json() for f in self.families}
        if len(self.runs) > 1:
            out["repeat"] = {
                "runs": len(self.runs),
                "consistent": self.consistent(),
                "per_run": [
                    {f.family: {"nat_type": f.behaviour.nat_type.value,
                                "mapping": f.behaviour.mapping.value if f.behaviour.mapping else None,
                                "filtering": f.behaviour.filtering.value if f.behaviour.filtering else None}
                     for f in run}
                    for run in self.runs
                ],
            }
        out["portmap"] = self.portmap.to_json() if self.portmap is not None else None
        out["elapsed_s"] = round(self.elapsed, 3)
        return out


def _new_socket(version: int) -> socket.socket:
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if version == 6 else "0.0.0.0", 0))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise NetworkError(f"cannot open a UDP socket (IPv{version}): {exc.strerror or exc}") from None
    return sock


class _Sockets:
    """Every socket of one family run, closed together."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.all: list[socket.socket] = []

    def new(self) -> socket.socket:
        s = _new_socket(self.version)
        self.all.append(s)
        return s

    def close(self) -> None:
        for s in self.all:
            s.close()


def _txid() -> bytes:
    return os.urandom(12)


def _stun_txn(label: str, sock: socket.socket, dest: Endpoint, what: str, **kw: object) -> Txn:
    txid = _txid()
    change_ip = bool(kw.pop("change_ip", False))
    change_port = bool(kw.pop("change_port", False))
    response_port = kw.pop("response_port", None)
    payload = binding_request(
        txid,
        change_ip=change_ip,
        change_port=change_port,
        response_port=response_port,  # type: ignore[arg-type]
        software=SOFTWARE,
        # Room for the server's full answer (SOFTWARE included) within the 3x rule.
        padding=24,
    )
    return Txn(label, sock, dest, payload, what, txid=txid, **kw)  # type: ignore[arg-type]


def _mapped(msg: Optional[StunMessage]) -> tuple[Optional[Endpoint], Optional[Endpoint], Optional[Endpoint]]:
    """(best mapped, XOR-MAPPED, MAPPED) of a success response."""
    if msg is None or msg.msg_class != MsgClass.SUCCESS:
        return None, None, None
    xor = msg.endpoint_of(XorMappedAddress)
    plain = msg.endpoint_of(MappedAddress)
    return xor or plain, xor, plain


def _change_outcome(t: Optional[Txn], expect_from: Endpoint) -> Outcome:
    if t is None:
        return Outcome.NOT_TESTED
    msg = t.message
    if t.reply is None or msg is None:
        return Outcome.TIMEOUT
    if msg.msg_class == MsgClass.ERROR:
        return Outcome.REJECTED
    if t.reply_from != expect_from:
        return Outcome.WRONG_SOURCE
    return Outcome.ANSWERED


def probe_family(
    targets: Sequence[ProbeTarget],
    version: int,
    *,
    hairpin: bool = False,
    lifetime_max: Optional[float] = None,
    give_up: float = GIVE_UP,
    retries: int = RETRIES,
) -> FamilyResult:
    t_start = time.monotonic()
    socks = _Sockets(version)
    try:
        run = functools.partial(run_transactions, schedule=send_times(give_up, retries), give_up=give_up)
        return _probe_family(targets, version, socks, hairpin, lifetime_max, run, t_start)
    finally:
        socks.close()


def _probe_family(
    targets: Sequence[ProbeTarget],
    version: int,
    socks: _Sockets,
    hairpin: bool,
    lifetime_max: Optional[float],
    run: Callable[[Sequence[Txn]], None],
    t_start: float,
) -> FamilyResult:
    m = socks.new()
    runs = [ServerRun(t) for t in targets]
    phase1: list[Txn] = []
    m_first: dict[int, Txn] = {}
    m_text: dict[int, Txn] = {}
    f1: dict[int, Txn] = {}
    f2: dict[int, Txn] = {}
    for i, r in enumerate(runs):
        ep = r.target.endpoint
        m_first[i] = _stun_txn("M", m, ep, "binding")
        phase1.append(m_first[i])
        if r.target.kind == "tracker":
            # An old tracker only knows //nat: ask both at once, STUN wins if it answers.
            m_text[i] = Txn("M", m, ep, b"//nat", "//nat")
            phase1.append(m_text[i])
        f1[i] = _stun_txn(f"F1[{i}]", socks.new(), ep, "binding change-ip change-port", change_ip=True, change_port=True)
        f2[i] = _stun_txn(f"F2[{i}]", socks.new(), ep, "binding change-port", change_port=True)
        phase1 += [f1[i], f2[i]]
    # A tracker with //nat and STUN on one socket: the //nat reply is matched by source,
    # so never ask the same destination //nat twice at once (targets are unique).
    run(phase1)

    bindings: list[BindingObservation] = []
    local_ips: set[object] = set()

    def observe(label: str, sock: socket.socket, t: Txn, mapped: Optional[Endpoint], xor: Optional[Endpoint] = None, plain: Optional[Endpoint] = None) -> None:
        lip = local_address_towards(t.dest)
        port = sock.getsockname()[1]
        local = Endpoint(ipaddress.ip_address(lip), port) if lip else Endpoint.from_sockaddr(sock.getsockname())
        local_ips.add(local.ip)
        bindings.append(BindingObservation(label, local, t.dest, mapped, xor, plain))

    phase2: list[Txn] = []
    m_alt: dict[int, list[tuple[Txn, Endpoint]]] = {}
    control: dict[int, tuple[socket.socket, list[Txn]]] = {}
    for i, r in enumerate(runs):
        t = m_first[i]
        r.txns += [t]
        msg = t.message
        best, xor, plain = _mapped(msg)
        if best is not None:
            r.protocol, r.mapped = "stun", best
            observe("M", m, t, best, xor, plain)
            assert msg is not None
            r.other = msg.endpoint_of(OtherAddress) or msg.endpoint_of(ChangedAddress)
            origin = msg.endpoint_of(ResponseOrigin) or msg.endpoint_of(SourceAddress)
            r.origin_ok = t.reply_from == r.target.endpoint and (origin is None or origin == t.reply_from)
        elif i in m_text and m_text[i].reply is not None:
            tt = m_text[i]
            from nattool.protocol.text import NatReply

            seen: Optional[Endpoint]
            try:
                seen = NatReply.from_wire(tt.reply or b"").endpoint
            except ProtocolError:
                seen = None
            if seen is not None:
                r.protocol, r.mapped = "//nat", seen
                observe("M", m, tt, seen)
        else:
            observe("M", m, t, None)
        if i in m_text:
            r.txns.append(m_text[i])
        if r.protocol != "stun":
            r.rfc5780_reason = "only answers //nat (old tracker)" if r.protocol == "//nat" else "no answer"
            continue
        if r.other is None:
            r.rfc5780_reason = "no OTHER-ADDRESS in its answer"
            continue
        if not r.origin_ok:
            r.rfc5780_reason = "answered from an address other than the one it claims (RESPONSE-ORIGIN)"
            continue
        if r.other.ip.version != version or r.other == r.target.endpoint:
            r.rfc5780_reason = f"unusable OTHER-ADDRESS {r.other}"
            continue
        p, o = r.target.endpoint, r.other
        alts = {Endpoint(o.ip, p.port), Endpoint(p.ip, o.port), o} - {p}
        m_alt[i] = []
        for dest in sorted(alts):
            tx = _stun_txn("M", m, dest, "binding (alternate address)")
            m_alt[i].append((tx, dest))
            phase2.append(tx)
        # Control socket C: open the NAT toward the alternate sources first, and learn
        # C's own mapping toward the primary (to know whether the opening applies).
        c = socks.new()
        ctx = [_stun_txn(f"C[{i}]", c, p, "binding (control)")]
        for dest in sorted({o, Endpoint(p.ip, o.port)} - {p}):
            ctx.append(_stun_txn(f"C[{i}]", c, dest, "binding (control, opens the NAT)"))
        control[i] = (c, ctx)
        phase2 += ctx

    h_txn: Optional[Txn] = None
    public = next((r.mapped for r in runs if r.mapped is not None), None)
    if hairpin and public is not None:
        h = socks.new()
        h_txn = _stun_txn("H", h, public, "binding to own public endpoint (hairpin)", recv_sock=m)
        phase2.append(h_txn)
    if phase2:
        run(phase2)

    phase3: list[Txn] = []
    ctl_change: dict[int, list[tuple[Txn, Endpoint]]] = {}
    for i, alt in m_alt.items():
        r = runs[i]
        assert r.other is not None
        p, o = r.target.endpoint, r.other
        verified = False
        for tx, dest in alt:
            r.txns.append(tx)
            best, xor, plain = _mapped(tx.message)
            observe("M", m, tx, best, xor, plain)
            msg = tx.message
            if dest == o and best is not None and msg is not None:
                origin = msg.endpoint_of(ResponseOrigin) or msg.endpoint_of(SourceAddress)
                verified = tx.reply_from == o and (origin is None or origin == o)
        r.rfc5780 = verified
        r.rfc5780_reason = "" if verified else f"its OTHER-ADDRESS {o} did not answer from that address"
        c, ctx = control[i]
        r.txns += ctx
        for tx in ctx:
            best, xor, plain = _mapped(tx.message)
            observe(tx.label, c, tx, best, xor, plain)
        can_ip, can_port = o.ip != p.ip, o.port != p.port
        out1 = _change_outcome(f1[i], o) if can_ip and can_port else Outcome.NOT_TESTED
        out2 = _change_outcome(f2[i], Endpoint(p.ip, o.port)) if can_port else Outcome.NOT_TESTED
        r.txns += [f1[i], f2[i]]
        r.filtering = FilteringEvidence(r.target.label, verified, r.rfc5780_reason, can_ip, can_port, out1, out2, None)
        silent = out2 in (Outcome.TIMEOUT, Outcome.NOT_TESTED) and out1 in (Outcome.TIMEOUT, Outcome.NOT_TESTED)
        opened = all(tx.reply is not None for tx in ctx)
        if verified and silent and opened:
            tests: list[tuple[Txn, Endpoint]] = []
            if can_ip and can_port:
                tx = _stun_txn(f"C[{i}]", c, p, "binding change-ip change-port (control)", change_ip=True, change_port=True)
                tests.append((tx, o))
            if can_port:
                tx = _stun_txn(f"C[{i}]", c, p, "binding change-port (control)", change_port=True)
                tests.append((tx, Endpoint(p.ip, o.port)))
            if tests:  # no control test possible (OTHER-ADDRESS differs in IP only): no verdict
                ctl_change[i] = tests
                phase3 += [tx for tx, _ in tests]
    for i, r in enumerate(runs):
        if r.filtering is None:
            # Not proven: its filtering answers (if any) are kept as evidence, never used.
            r.txns += [f1[i], f2[i]]
            r.filtering = FilteringEvidence(r.target.label, False, r.rfc5780_reason)
    if phase3:
        run(phase3)
    for i, tests in ctl_change.items():
        r = runs[i]
        c, ctx = control[i]
        c_maps = {b.mapped for b in bindings if b.socket == f"C[{i}]" and b.mapped is not None}
        outcomes = [_change_outcome(tx, want) for tx, want in tests]
        r.txns += [tx for tx, _ in tests]
        honoured: Optional[bool]
        if any(o in (Outcome.WRONG_SOURCE, Outcome.REJECTED) for o in outcomes):
            honoured = False
        elif all(o == Outcome.ANSWERED for o in outcomes):
            honoured = True
        elif len(c_maps) == 1:
            # C kept one mapping toward every address, so the NAT let the alternate
            # sources in: silence now is the server's, not the NAT's.
            honoured = False
        else:
            honoured = None
        assert r.filtering is not None
        f = r.filtering
        r.filtering = FilteringEvidence(f.server, f.rfc5780, f.reason, f.can_change_ip, f.can_change_port, f.change_ip_port, f.change_port, honoured)
    for r in runs:
        evidence = r.filtering
        if r.rfc5780 and evidence is not None:
            change = (evidence.change_ip_port, evidence.change_port)
            if Outcome.WRONG_SOURCE in change:
                r.rfc5780, r.rfc5780_reason = False, "ignores CHANGE-REQUEST (answers from the wrong address)"
            elif Outcome.REJECTED in change:
                r.rfc5780, r.rfc5780_reason = False, "rejects CHANGE-REQUEST"
            elif evidence.control_honoured is False:
                r.rfc5780, r.rfc5780_reason = False, "does not honour CHANGE-REQUEST (control test)"

    hairpinning: Optional[bool] = None
    if h_txn is not None:
        hairpinning = h_txn.reply is not None

    lifetime = None
    if lifetime_max is not None:
        lifetime = _lifetime(runs, socks, lifetime_max, run)

    behaviour = infer(bindings, [r.filtering for r in runs if r.filtering is not None], local_ips=frozenset(local_ips), hairpinning=hairpinning)
    return FamilyResult(f"IPv{version}", behaviour, tuple(runs), lifetime, time.monotonic() - t_start)


def _lifetime(
    runs: Sequence[ServerRun], socks: _Sockets, lifetime_max: float, run: Callable[[Sequence[Txn]], None]
) -> dict[str, object]:
    """Mapping lifetime bracket, against the first server that answered STUN."""
    server = next((r for r in runs if r.protocol == "stun" and r.mapped is not None), None)
    if server is None:
        return {"tested": False, "reason": "needs a STUN server that answered"}
    return _lifetime_at(server.target, socks, lifetime_max, run)


def _lifetime_at(
    target: ProbeTarget, socks: _Sockets, lifetime_max: float, run: Callable[[Sequence[Txn]], None]
) -> dict[str, object]:
    """Sockets X_k get a mapping and stay idle w_k seconds each; then socket Y asks the
    server to answer to X_k's public port (RESPONSE-PORT). The waits go up the ladder
    and stop at the first mapping gone: the longer ones cannot change the bracket."""
    p = target.endpoint
    y = socks.new()
    # Does the server honour RESPONSE-PORT? Ask it to answer to Y's own public port.
    check = _stun_txn("Y", y, p, "binding (learn Y's mapping)")
    run([check])
    y_pub, _, _ = _mapped(check.message)
    if y_pub is None:
        return {"tested": False, "reason": f"{target.label} did not answer"}
    check2 = _stun_txn("Y", y, p, f"binding response-port={y_pub.port}", response_port=y_pub.port)
    run([check2])
    msg2 = check2.message
    if msg2 is None or msg2.msg_class != MsgClass.SUCCESS:
        return {"tested": False, "reason": f"{target.label} does not support RESPONSE-PORT"}
    waits = [w for w in LIFETIME_LADDER if w <= lifetime_max] or [int(lifetime_max)]
    xs: list[tuple[float, socket.socket]] = [(w, socks.new()) for w in waits]
    opens = [_stun_txn(f"X[{w}]", s, p, "binding (open mapping)") for w, s in xs]
    run(opens)
    opened = time.monotonic()
    alive: list[float] = []
    dead: list[float] = []
    for (w, s), o in zip(xs, opens):
        pub, _, _ = _mapped(o.message)
        if pub is None:
            continue
        start = max(0.0, w - (time.monotonic() - opened))
        probe = _stun_txn("Y", y, p, f"binding response-port={pub.port} after {w}s idle", response_port=pub.port,
                          recv_sock=s, start=start)
        run([probe])
        if probe.reply is None:
            dead.append(w)
            break
        alive.append(w)
    if not alive and not dead:
        return {"tested": False, "reason": "no mapping could be opened"}
    first_dead = min(dead) if dead else None
    local = local_address_towards(p)
    gateway = default_gateway() if p.ip.version == 4 else None
    return {
        "tested": True,
        "server": target.label,
        "at_least_s": max(alive, default=0),
        "below_s": first_dead,  # None: still alive at the longest wait tried
        "alive_after_s": alive,
        "expired_after_s": dead,
        "local": local,
        "gateway": str(gateway.ip) if gateway is not None else None,
    }


def measure_lifetime(target: ProbeTarget, lifetime_max: float, *, give_up: float = GIVE_UP,
                     retries: int = RETRIES, stop: Optional[threading.Event] = None) -> dict[str, object]:
    """Only the lifetime test (as `probe --lifetime` makes it) against ``target``, a
    server with RESPONSE-PORT, on sockets of its own; blocking, up to ``lifetime_max``
    seconds; ``stop`` set from another thread ends it early (untested then)."""
    socks = _Sockets(target.endpoint.ip.version)
    try:
        run = functools.partial(run_transactions, schedule=send_times(give_up, retries), give_up=give_up, stop=stop)
        result = _lifetime_at(target, socks, lifetime_max, run)
    finally:
        socks.close()
    if stop is not None and stop.is_set():
        return {"tested": False, "reason": "stopped"}
    return result


# --------------------------------------------------------------------------- entry


def probe(
    targets: Sequence[ProbeTarget],
    *,
    families: Iterable[int] = (4, 6),
    hairpin: bool = False,
    lifetime_max: Optional[float] = None,
    repeat: int = 1,
    timeout: float = GIVE_UP,
    retries: int = RETRIES,
) -> ProbeResult:
    """Probe every family that has a target; families run in parallel threads.

    ``timeout``: seconds each request waits for its answer, ``retries`` retransmissions
    included. ``targets`` must already be resolved (see :func:`parse_target`). Raises
    UsageError when no target matches the families asked for."""
    if not 1 <= repeat <= MAX_REPEAT:
        raise UsageError(f"--repeat must be 1..{MAX_REPEAT}")
    if lifetime_max is not None and not 1 <= lifetime_max <= 600:
        raise UsageError("--lifetime-max must be 1..600 seconds")
    wanted = [v for v in (4, 6) if v in set(families)]
    by_family = {v: [t for t in targets if t.endpoint.ip.version == v] for v in wanted}
    by_family = {v: ts for v, ts in by_family.items() if ts}
    if not by_family:
        fams = "/".join(f"IPv{v}" for v in wanted)
        raise UsageError(f"no {fams} server to probe")
    t0 = time.monotonic()
    all_runs: list[tuple[FamilyResult, ...]] = []
    for n in range(repeat):
        with ThreadPoolExecutor(max_workers=len(by_family)) as pool:
            futs = [
                pool.submit(
                    probe_family,
                    ts,
                    v,
                    hairpin=hairpin,
                    lifetime_max=lifetime_max if n == 0 else None,
                    give_up=timeout,
                    retries=retries,
                )
                for v, ts in by_family.items()
            ]
            all_runs.append(tuple(f.result() for f in futs))
    return ProbeResult(all_runs[0], tuple(all_runs), time.monotonic() - t0)


__all__ = [
    "SCHEMA",
    "ProbeTarget",
    "ProbeResult",
    "FamilyResult",
    "ServerRun",
    "parse_target",
    "resolve_literal",
    "probe",
    "probe_family",
    "measure_lifetime",
    "DEFAULT_PORT",
    "DEFAULT_STUN_PORT",
]
