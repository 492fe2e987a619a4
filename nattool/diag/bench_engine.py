"""The load generator's inner loop: one process, many non-blocking UDP sockets.

Why not asyncio: plain asyncio reads one datagram per loop wake-up and tops out
near 40k datagrams/s on this machine class; this loop sends in batches, asks
epoll once per turn which sockets have replies, and reads each of them once.

Correlation is exact and cheap: a socket carries at most one outstanding request,
so a reply on socket ``s`` answers the request ``s`` sent last (the sockets are
connected to the target, so the kernel drops datagrams from anyone else). That
is the only way to correlate a bare ``//nat``, whose reply carries nothing but
the source endpoint, and it keeps STUN and registrations just as simple. A socket
whose request times out is closed and replaced, so a late reply can never be
mistaken for the answer to a newer request.

Every reply is validated: ``//nat`` must name the socket's own endpoint, a STUN
reply must be a Binding success with our transaction id and our own
XOR-MAPPED-ADDRESS, a registration reply must start with the requester's own line
and be a well-formed member list, a tracker list must parse. Anything else is
"invalid", counted apart from losses (no reply within the timeout). A STUN reply
byte-identical to one already validated for the very same request (see STUN_RING)
is valid without being parsed again.

Latency in the open loop is taken from the kernel's receive timestamp of each reply
(SO_TIMESTAMPNS) minus the wall clock just before the send, so that the generator's
own scheduling does not count as the server's; the closed loop, which measures
throughput, reads the monotonic clock once per poll. Waiting for the next send, the
open loop sleeps as long as the wake-up can still come on time, and polls only for the
rest: a generator that polls its core all the time starves the kernel's softirq thread
there, and replies then sit in a queue for a scheduler tick (4 ms). Above about 25,000
requests/s a process polls most of each gap; more ``--processes`` keep them asleep.
"""

from __future__ import annotations

import ipaddress
import os
import re
import resource
import select
import socket
import struct
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from nattool.diag.histogram import Histogram
from nattool.errors import NetworkError, ProtocolError
from nattool.net.coalescing import fine_timer_slack
from nattool.protocol.stun import MAGIC_COOKIE
from nattool.protocol.text import REGISTER_PREFIX, MemberList, TrackerList

KIND_NAT, KIND_REGISTER, KIND_TRACKERS, KIND_STUN = 0, 1, 2, 3
KIND_NAMES = ("nat", "register", "trackers", "stun")

_COOKIE = struct.pack("!I", MAGIC_COOKIE)
_BINDING_HEAD = b"\x00\x01\x00\x00" + _COOKIE  # Binding request, no attributes
_BINDING_OK = b"\x01\x01"
_XMA_HEAD_V4 = b"\x00\x20\x00\x08\x00\x01"
_XMA_HEAD_V6 = b"\x00\x20\x00\x14\x00\x02"

# A registration reply, checked on every reply without building objects; every
# FULL_PARSE_EVERY-th one is also parsed by the protocol package itself. The
# quantifiers are possessive and the address alternatives atomic: no character
# class here can match what follows it, so giving back characters could never
# make a match, and not offering to makes the check a third cheaper.
_EP = rb"(?>\d{1,3}+(?:\.\d{1,3}+){3}+|\[[0-9A-Fa-f:.]{2,45}+\]):\d{1,5}+"
_LINE = _EP + rb"(?:;[0-9A-Fa-f:.,]{1,800}+)?+"
_MEMBER_LIST_RE = re.compile(rb"(?:" + _LINE + rb")(?:\n(?:" + _LINE + rb"|next=\d{1,6}+))*+\n?")
FULL_PARSE_EVERY = 64

# Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS) where it is 35; Python does not name it.
_SO_TIMESTAMPNS = 35
_TIMESTAMPNS_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "aarch64", "arm64", "armv7l", "riscv64", "s390x", "ppc64le"})
_TIMESPEC = struct.Struct("@qq")

CALIBRATION_SLEEP_NS = 20_000
SPIN_MARGIN_NS = 5_000  # sleep only when the wake-up can come this early

# Binding requests each socket cycles through, built once: a socket has one request
# outstanding and a timed-out socket is replaced (new transaction ids), so ids need
# only differ from the socket's recent ones. A reply byte-identical to one already
# validated for the very same request is valid without parsing it again.
STUN_RING = 8

SEND_BATCH = 64  # requests sent per loop turn before looking for replies
PROGRESS_EVERY_NS = 500_000_000
MAX_BACKLOG_S = 0.01  # open loop: a schedule further behind than this is skipped, not burst
# Open loop: a request sent this far behind its slot, in a burst with others, is
# counted late. A generator that falls behind catches up in a burst, and the server's
# answer to a burst is part of the latency measured, not of the load asked for.
LATE_NS = 100_000


@dataclass(frozen=True, slots=True)
class EnginePlan:
    """What one generator process does. Times are in seconds."""

    target: tuple[str, int]  # IP literal, port
    kinds: tuple[int, ...]  # the request mix, one kind per slot, cycled
    sockets: int
    window: Optional[int]  # closed loop: outstanding requests; None = open loop
    rate: Optional[float]  # open loop: requests/s; None = closed loop
    duration: float
    warmup: float
    timeout: float
    groups: int = 1000
    members: range = range(0)  # global identity numbers this process registers
    source_ips: tuple[str, ...] = ()  # bind addresses, cycled over the sockets; () = any
    seed: int = 1
    max_requests: int = 50_000_000  # hard bound on requests, whatever the rate
    start_at_ns: int = 0  # time.monotonic_ns() at which to start (aligns processes)
    spin: bool = False  # busy-poll while waiting for replies instead of sleeping in epoll
    # Latency from the kernel's receive timestamp of each reply (open loop, Linux):
    # the generator's own scheduling delays then do not count as server latency.
    rx_timestamps: bool = False


@dataclass(slots=True)
class EngineResult:
    sent: int = 0
    answered: int = 0
    lost: int = 0
    invalid: int = 0
    send_errors: int = 0
    skipped: int = 0  # open loop: sends the generator could not make on schedule
    late: int = 0  # open loop: sent in a burst, more than LATE_NS behind their slot
    invalid_reasons: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    histogram: Histogram = field(default_factory=Histogram)
    elapsed: float = 0.0  # seconds of the measured window
    cpu_user: float = 0.0  # process CPU seconds over the measured window
    cpu_system: float = 0.0
    idle: float = 0.0  # seconds of busy-polling with nothing to do (inside cpu_user/system)
    runqueue_wait: float = 0.0  # seconds ready to run but waiting for a core (a busy machine)
    latency_clock: str = "user"  # "kernel": receive timestamps from the kernel (SO_TIMESTAMPNS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "lost": self.lost,
            "invalid": self.invalid,
            "send_errors": self.send_errors,
            "skipped": self.skipped,
            "late": self.late,
            "invalid_reasons": dict(self.invalid_reasons),
            "by_kind": self.by_kind,
            "histogram": self.histogram.to_dict(),
            "elapsed": self.elapsed,
            "cpu_user": self.cpu_user,
            "cpu_system": self.cpu_system,
            "idle": self.idle,
            "runqueue_wait": self.runqueue_wait,
            "latency_clock": self.latency_clock,
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "EngineResult":
        return cls(
            sent=obj["sent"],
            answered=obj["answered"],
            lost=obj["lost"],
            invalid=obj["invalid"],
            send_errors=obj["send_errors"],
            skipped=obj["skipped"],
            late=obj.get("late", 0),
            invalid_reasons=Counter(obj["invalid_reasons"]),
            by_kind=obj["by_kind"],
            histogram=Histogram.from_dict(obj["histogram"]),
            elapsed=obj["elapsed"],
            cpu_user=obj["cpu_user"],
            cpu_system=obj["cpu_system"],
            idle=obj["idle"],
            runqueue_wait=obj.get("runqueue_wait", 0.0),
            latency_clock=obj.get("latency_clock", "user"),
        )


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot for the live display (measured window only)."""

    phase: str  # "warmup", "run", "drain"
    elapsed: float
    sent: int
    answered: int
    lost: int
    invalid: int
    recent: Histogram  # latencies since the previous snapshot


ProgressFn = Callable[[Progress], None]


def rx_timestamps_supported() -> bool:
    """Whether the kernel can stamp each received datagram (Linux, known ABI)."""
    import platform
    import sys

    return sys.platform.startswith("linux") and platform.machine().lower() in _TIMESTAMPNS_MACHINES


@dataclass(frozen=True, slots=True)
class CpuSample:
    """This process's CPU time and this thread's run-queue wait, at one moment."""

    user: float
    system: float
    runqueue_wait: float

    @classmethod
    def now(cls) -> "CpuSample":
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(usage.ru_utime, usage.ru_stime, _runqueue_wait())


def _runqueue_wait() -> float:
    """Seconds this thread has been runnable without a core (Linux schedstat; 0 elsewhere)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def endpoint_text(host: str, port: int) -> bytes:
    if ":" in host:
        return f"[{host}]:{port}".encode()
    return f"{host}:{port}".encode()


def stun_request(txid: bytes) -> bytes:
    """A bare RFC 8489 Binding request (what ``stun.binding_request(txid,
    fingerprint=False)`` builds; a test holds the two equal)."""
    return _BINDING_HEAD + txid


def xor_mapped_value(host: str, port: int, txid: bytes) -> bytes:
    """The XOR-MAPPED-ADDRESS attribute (header included) a server must send back
    to ``host:port`` for a request with ``txid``."""
    ip = ipaddress.ip_address(host)
    xport = (port ^ (MAGIC_COOKIE >> 16)).to_bytes(2, "big")
    if ip.version == 4:
        return _XMA_HEAD_V4 + xport + (int(ip) ^ MAGIC_COOKIE).to_bytes(4, "big")
    key = int.from_bytes(_COOKIE + txid, "big")
    return _XMA_HEAD_V6 + xport + (int(ip) ^ key).to_bytes(16, "big")


def group_name(seed: int, group: int) -> str:
    # RFC 4122-shaped (version 4, variant 8) like the seed's example group keys.
    return f"{seed & 0xFFFFFFFF:08x}-0000-4000-8000-{group:012x}"


def identity_mac(seed: int, identity: int) -> str:
    b = [0x02, seed & 0xFF, (identity >> 24) & 0xFF, (identity >> 16) & 0xFF, (identity >> 8) & 0xFF, identity & 0xFF]
    return ":".join(f"{x:02x}" for x in b)


def identity_lan(identity: int) -> str:
    return f"10.{(identity >> 16) & 0xFF}.{(identity >> 8) & 0xFF}.{identity & 0xFF}"


def register_request(seed: int, groups: int, identity: int) -> bytes:
    """The seed form: group/public/lan/mac, public 0 = "use what you see"."""
    group = group_name(seed, identity % groups)
    return f"{REGISTER_PREFIX}{group}/0/{identity_lan(identity)}/{identity_mac(seed, identity)}".encode()


class Engine:
    def __init__(self, plan: EnginePlan) -> None:
        if plan.sockets < 1:
            raise ValueError("at least one socket")
        self.plan = plan
        host, port = plan.target
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.v6 = self.family == socket.AF_INET6
        self.epoll = select.epoll()
        self.socks: list[socket.socket] = []
        self.fd_index: dict[int, int] = {}
        self.local_text: list[bytes] = []
        self.local_host: list[str] = []
        self.local_port: list[int] = []
        self.stun_req: list[bytes] = [b""] * (plan.sockets * STUN_RING)  # [s * STUN_RING + slot]
        self.stun_xma: list[bytes] = [b""] * (plan.sockets * STUN_RING)  # its XOR-MAPPED-ADDRESS
        self.stun_memo: list[Optional[bytes]] = [None] * (plan.sockets * STUN_RING)  # a validated reply to it
        n = plan.sockets
        self.ids_of: list[list[int]] = [[] for _ in range(n)]
        for j, ident in enumerate(plan.members):
            self.ids_of[j % n].append(ident)
        self.id_pos = [0] * n
        self._reg_cache: dict[int, tuple[bytes, bytes]] = {}
        try:
            for s in range(n):
                self.socks.append(socket.socket(self.family, socket.SOCK_DGRAM))
                self.local_text.append(b"")
                self.local_host.append("")
                self.local_port.append(0)
                self._open(s, first=True)
        except BaseException:
            self.close()
            raise

    def _bind_host(self, s: int) -> str:
        ips = self.plan.source_ips
        if ips:
            return ips[s % len(ips)]
        return "::" if self.v6 else "0.0.0.0"

    def _open(self, s: int, first: bool = False) -> None:
        """(Re)create socket ``s``: bound, connected to the target, registered in epoll."""
        if not first:
            old = self.socks[s]
            self.fd_index.pop(old.fileno(), None)
            try:
                self.epoll.unregister(old.fileno())
            except (OSError, ValueError):
                pass
            old.close()
            self.socks[s] = socket.socket(self.family, socket.SOCK_DGRAM)
        sock = self.socks[s]
        try:
            sock.setblocking(False)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, 1 << 18)
            if self.plan.rx_timestamps:
                sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            sock.bind((self._bind_host(s), 0))
            sock.connect(self.plan.target)
        except OSError as exc:
            raise NetworkError(f"cannot open a bench socket towards {self.plan.target[0]}:{self.plan.target[1]}: {exc.strerror or exc}") from None
        lhost, lport = sock.getsockname()[:2]
        lhost = lhost.split("%", 1)[0]
        self.local_host[s] = lhost
        self.local_port[s] = lport
        self.local_text[s] = endpoint_text(lhost, lport)
        for k in range(s * STUN_RING, (s + 1) * STUN_RING):
            txid = os.urandom(12)
            self.stun_req[k] = _BINDING_HEAD + txid
            self.stun_xma[k] = xor_mapped_value(lhost, lport, txid)
            self.stun_memo[k] = None
        self.fd_index[sock.fileno()] = s
        self.epoll.register(sock.fileno(), select.EPOLLIN)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.epoll.close()

    def _register_payload(self, s: int) -> tuple[bytes, bytes]:
        """(request, the lan suffix of the own line) for the next identity of socket s."""
        ids = self.ids_of[s]
        if ids:
            pos = self.id_pos[s]
            ident = ids[pos]
            self.id_pos[s] = pos + 1 if pos + 1 < len(ids) else 0
        else:
            members = self.plan.members
            ident = members[s % len(members)] if len(members) else s
        cached = self._reg_cache.get(ident)
        if cached is None:
            p = self.plan
            cached = (register_request(p.seed, p.groups, ident), b";" + identity_lan(ident).encode())
            if len(self._reg_cache) < 200_000:
                self._reg_cache[ident] = cached
        return cached

    # -- the loop ------------------------------------------------------------------
    def run(self, progress: Optional[ProgressFn] = None) -> EngineResult:  # noqa: C901 - one hot loop on purpose
        plan = self.plan
        res = EngineResult()
        hist = res.histogram
        counts = hist.counts
        h_bits = hist.bits
        h_exact = 2 << h_bits
        h_shift_base = h_bits + 1
        h_cap = hist.max_value
        h_min = 1 << 62
        h_max = 0
        h_total = 0

        nsock = plan.sockets
        socks = self.socks
        fd_index = self.fd_index
        local_text = self.local_text
        stun_req, stun_xma, stun_memo = self.stun_req, self.stun_xma, self.stun_memo
        stun_slot = [0] * nsock
        poll = self.epoll.poll
        perf = time.monotonic_ns
        kinds = plan.kinds
        nkinds = len(kinds)
        kind_pos = 0

        sent_at = [0] * nsock  # 0: free
        rx_ts = plan.rx_timestamps
        sent_wall = [0] * nsock  # time.time_ns() just before the send (rx_ts only)
        wall_ns = time.time_ns
        unpack_ts = _TIMESPEC.unpack
        sleep = time.sleep
        nap = False
        anc: list[Any] = []
        counted = [False] * nsock
        kind_of = [0] * nsock
        expect: list[bytes] = [b""] * nsock
        stun_key = [0] * nsock  # index of the Binding request outstanding on a socket
        # First in, first out: every socket takes its turn. A stack reused the
        # sockets answered last, so a closed loop of window W sent from about W of
        # them and registered about W/S of --members.
        free = deque(range(nsock))
        outstanding = 0

        k_sent = [0, 0, 0, 0]
        k_ok = [0, 0, 0, 0]
        k_bad = [0, 0, 0, 0]
        k_lost = [0, 0, 0, 0]
        reasons: Counter[str] = Counter()
        sent = answered = lost = invalid = send_errors = skipped = late = 0
        reg_replies = 0

        closed = plan.window is not None
        spin = plan.spin
        window = min(plan.window or nsock, nsock)
        rate = plan.rate or 0.0
        timeout_ns = int(plan.timeout * 1e9)
        scan_every = max(1_000_000, min(20_000_000, timeout_ns // 10))

        overshoot = sleep_overshoot_ns() if not closed else 0
        now = perf()
        if plan.start_at_ns > now:
            time.sleep((plan.start_at_ns - now) / 1e9)
            now = perf()
        t0 = now
        warm_end = t0 + int(plan.warmup * 1e9)
        send_end = warm_end + int(plan.duration * 1e9)
        hard_end = send_end + timeout_ns + 50_000_000
        issued = 0  # open loop: requests scheduled so far (sent or skipped)
        max_requests = plan.max_requests
        ns_per_req = 1e9 / rate if rate else 0.0
        max_backlog = max(SEND_BATCH, int(rate * MAX_BACKLOG_S))
        next_scan = t0 + scan_every
        next_progress = t0 + PROGRESS_EVERY_NS
        last_hist = Histogram(hist.bits, hist.max_value)
        measuring = False
        cpu_start = cpu_end = CpuSample.now()
        sending = True

        # Busy-polling that found nothing to do: CPU time, but not work. Time blocked
        # in epoll or asleep is no CPU time and is not counted here.
        idle_ns = 0
        prev = t0
        spun = False
        while True:
            now = perf()
            if spun and measuring and sending:
                idle_ns += now - prev
            prev = now
            spun = worked = False
            if not measuring and now >= warm_end:
                measuring = True
                cpu_start = CpuSample.now()
            if sending and now >= send_end:
                sending = False
                cpu_end = CpuSample.now()
            # ---- send
            if sending:
                if closed:
                    n = window - outstanding
                else:
                    due = int((now - t0) / ns_per_req) + 1 - issued
                    if due > max_backlog:
                        # Behind schedule: skip the excess rather than burst it later.
                        if measuring:
                            skipped += due - max_backlog
                        issued += due - max_backlog
                        due = max_backlog
                    n = due
                if n > SEND_BATCH:
                    n = SEND_BATCH
                if n > len(free):
                    if not closed:
                        # No free socket: the schedule slips (more --sockets would help).
                        if measuring:
                            skipped += n - len(free)
                        issued += n - len(free)
                    n = len(free)
                if sent + n > max_requests:
                    n = max(0, max_requests - sent)
                    if n == 0:
                        sending = False
                        cpu_end = CpuSample.now()
                if not closed and measuring and n > 1:
                    # Several due at once: a burst. The k-th is due at slot `issued + k`.
                    # (A lone request sent late makes no queue at the server.)
                    behind = now - (t0 + issued * ns_per_req) - LATE_NS
                    if behind > 0:
                        late += min(n, int(behind / ns_per_req) + 1)
                for _ in range(n):
                    s = free.popleft()
                    kind = kinds[kind_pos]
                    kind_pos += 1
                    if kind_pos == nkinds:
                        kind_pos = 0
                    if kind == KIND_NAT:
                        payload = b"//nat"
                        expect[s] = local_text[s]
                    elif kind == KIND_STUN:
                        slot = stun_slot[s]
                        stun_slot[s] = (slot + 1) % STUN_RING
                        k = s * STUN_RING + slot
                        payload = stun_req[k]
                        stun_key[s] = k
                    elif kind == KIND_REGISTER:
                        payload, lan = self._register_payload(s)
                        expect[s] = local_text[s] + lan
                    else:
                        payload = b"//tcksvr"
                    if rx_ts:
                        sent_wall[s] = wall_ns()
                    try:
                        socks[s].send(payload)
                    except BlockingIOError:
                        # Socket buffer full: the host, not the server, is the limit.
                        free.append(s)
                        send_errors += 1
                        break
                    except OSError:
                        # An ICMP error from an earlier send surfaced here (ECONNREFUSED).
                        free.append(s)
                        send_errors += 1
                        issued += 1
                        continue
                    kind_of[s] = kind
                    worked = True
                    sent_at[s] = now
                    outstanding += 1
                    issued += 1
                    if measuring:
                        counted[s] = True
                        sent += 1
                        k_sent[kind] += 1
                    else:
                        counted[s] = False
            elif outstanding == 0 or now >= hard_end:
                break
            # ---- wait / receive
            if sending and (not closed or outstanding < window):
                if closed:
                    wait = 0.0
                else:
                    gap = t0 + (issued + 1) * ns_per_req - now
                    wait = gap / 1e9 if gap > 1_500_000 else 0.0
                    # Spinning here would starve the kernel's softirq thread on this
                    # core: replies then wait for a scheduler tick (4 ms stalls).
                    nap = not spin
            elif spin and sending:
                # Spin rather than sleep: a sleeping generator makes every reply the
                # server sends pay for a wake-up, which halves a fast server's rate.
                wait = 0.0
            else:
                wait = 0.002
            events = poll(wait)
            if not events:
                if nap:
                    # Until the next send is due, so that requests go out evenly
                    # spaced: asleep while the wake-up can still be on time, then
                    # polling (a sleep ends `overshoot` late, and at tens of
                    # thousands a second that is most of the gap).
                    pause = t0 + issued * ns_per_req - perf()  # when request number `issued` is due
                    if pause > overshoot + SPIN_MARGIN_NS:
                        sleep((pause - overshoot) / 1e9)
                    elif not worked:
                        spun = True
                elif wait == 0.0 and not worked:
                    spun = True
            nap = False
            if events:
                now = perf()
                for fd, _ev in events:
                    s = fd_index.get(fd)
                    if s is None:
                        continue
                    try:
                        if rx_ts:
                            data, anc, _flags, _addr = socks[s].recvmsg(2048, 64)
                        else:
                            data = socks[s].recv(2048)
                    except BlockingIOError:
                        continue
                    except OSError:
                        # ICMP port unreachable: nobody listens there. Counted as lost
                        # when the request times out; drop the error now.
                        continue
                    t_sent = sent_at[s]
                    if t_sent == 0:
                        continue  # nothing outstanding: a duplicate reply
                    kind = kind_of[s]
                    if kind == KIND_NAT:
                        ok = data == expect[s]
                        why = "nat: not our endpoint"
                    elif kind == KIND_STUN:
                        k = stun_key[s]
                        ok = data == stun_memo[k]
                        why = "stun: bad reply"
                        if not ok:
                            txid = stun_req[k][8:20]
                            ok = (
                                len(data) >= 32
                                and data[:2] == _BINDING_OK
                                and data[8:20] == txid
                                and ((data[2] << 8) | data[3]) + 20 == len(data)
                                and stun_xma[k] in data
                            )
                            if ok:
                                stun_memo[k] = data
                            elif len(data) >= 20 and data[8:20] != txid:
                                why = "stun: wrong transaction id"
                            elif len(data) >= 20 and data[:2] != _BINDING_OK:
                                why = "stun: not a binding success"
                            elif len(data) >= 20:
                                why = "stun: wrong mapped address"
                    elif kind == KIND_REGISTER:
                        e = expect[s]
                        le = len(e)
                        ok = (
                            data.startswith(e)
                            and (len(data) == le or data[le] == 10)
                            and _MEMBER_LIST_RE.fullmatch(data) is not None
                        )
                        why = "register: not our own line first"
                        if ok:
                            reg_replies += 1
                            if reg_replies % FULL_PARSE_EVERY == 1:
                                try:
                                    MemberList.from_wire(data)
                                except ProtocolError:
                                    ok = False
                                    why = "register: not a member list"
                        elif data.startswith(b"ERR"):
                            why = "register: " + data[:40].decode("ascii", "replace")
                        elif data.startswith(e):
                            why = "register: not a member list"
                    else:
                        why = "trackers: not a tracker list"
                        try:
                            TrackerList.from_wire(data)
                            ok = True
                        except ProtocolError:
                            ok = False
                    sent_at[s] = 0
                    outstanding -= 1
                    free.append(s)
                    if counted[s]:
                        if ok:
                            answered += 1
                            k_ok[kind] += 1
                            if rx_ts and anc:
                                sec, nsec = unpack_ts(anc[0][2])
                                v = sec * 1_000_000_000 + nsec - sent_wall[s]
                                if v < 0:  # the wall clock stepped back
                                    v = 0
                            else:
                                v = now - t_sent
                            if v < h_min:
                                h_min = v
                            if v > h_max:
                                h_max = v
                            h_total += v
                            if v > h_cap:
                                v = h_cap
                            if v < h_exact:
                                counts[v] += 1
                            else:
                                sh = v.bit_length() - h_shift_base
                                counts[(sh << h_bits) + (v >> sh)] += 1
                        else:
                            invalid += 1
                            k_bad[kind] += 1
                            reasons[why] += 1
            # ---- timeouts
            if now >= next_scan:
                next_scan = now + scan_every
                horizon = now - timeout_ns
                for s in range(nsock):
                    t_sent = sent_at[s]
                    if t_sent and t_sent < horizon:
                        sent_at[s] = 0
                        outstanding -= 1
                        if counted[s]:
                            lost += 1
                            k_lost[kind_of[s]] += 1
                        # A fresh socket: a late reply to the old one cannot be
                        # taken for the answer to the next request.
                        self._open(s)
                        free.append(s)
            if progress is not None and now >= next_progress:
                next_progress = now + PROGRESS_EVERY_NS
                hist.count = answered
                recent = hist.minus(last_hist)
                last_hist = hist.copy()
                phase = "warmup" if not measuring else ("run" if sending else "drain")
                progress(
                    Progress(phase, max(0.0, (now - warm_end) / 1e9), sent, answered, lost, invalid, recent)
                )

        # Still outstanding at the end: lost (the drain waited a full timeout).
        for s in range(nsock):
            if sent_at[s]:
                if counted[s]:
                    lost += 1
                    k_lost[kind_of[s]] += 1
                sent_at[s] = 0
        measured_end = min(perf(), send_end)
        res.elapsed = max(1e-9, (measured_end - warm_end) / 1e9) if measuring else 0.0
        if measuring:
            res.cpu_user = max(0.0, cpu_end.user - cpu_start.user)
            res.cpu_system = max(0.0, cpu_end.system - cpu_start.system)
            res.runqueue_wait = max(0.0, cpu_end.runqueue_wait - cpu_start.runqueue_wait)
        res.idle = idle_ns / 1e9
        res.latency_clock = "kernel" if rx_ts else "user"
        res.sent, res.answered, res.lost, res.invalid = sent, answered, lost, invalid
        res.send_errors, res.skipped, res.late = send_errors, skipped, late
        res.invalid_reasons = reasons
        hist.count = answered
        hist.total = h_total
        hist.min = h_min if answered else 0
        hist.max = h_max
        for k, name in enumerate(KIND_NAMES):
            if k_sent[k]:
                res.by_kind[name] = {"sent": k_sent[k], "answered": k_ok[k], "invalid": k_bad[k], "lost": k_lost[k]}
        return res


def sleep_overshoot_ns(samples: int = 64) -> int:
    """How late a short sleep of this process ends (the median, in ns), with the
    timer slack made fine first: the open loop's pacing sleeps that much less."""
    fine_timer_slack()
    late = []
    for _ in range(samples):
        began = time.monotonic_ns()
        time.sleep(CALIBRATION_SLEEP_NS / 1e9)
        late.append(time.monotonic_ns() - began - CALIBRATION_SLEEP_NS)
    late.sort()
    return max(0, late[len(late) // 2])


def run_engine(plan: EnginePlan, progress: Optional[ProgressFn] = None) -> EngineResult:
    engine = Engine(plan)
    try:
        return engine.run(progress)
    finally:
        engine.close()
