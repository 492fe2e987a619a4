"""`nattool serve`: the asyncio UDP shell around the pure tracker core.

Per datagram: rate limit by source, then the cheapest possible path for the hot
requests (bare ``//nat``), STUN to the STUN responder, text to the tracker core.
Registrations that arrive in one event-loop turn are handed to the store as one
batch (one transaction, one round trip); their replies go out when the store says
the batch is durable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from nattool import __version__
from nattool.errors import ConfigError, NattoolError, NetworkError, StoreError
from nattool.memo import bounded_memo
from nattool.net.coalescing import coalesced, fine_timer_slack
from nattool.net.collector import ServingCollector
from nattool.net.log_gate import LogGate
from nattool.net.metrics import MetricsSnapshot, start_metrics
from nattool.net.reply_memo import ReplyMemo
from nattool.net.tcp_listener import StreamConnection, TcpListener
from nattool.net.turn_relay import (
    DEFAULT_RELAY_PORTS,
    ROUTE_TO_CLIENT,
    DatagramTarget,
    RelayPortRange,
    Route,
    SendRoute,
    TurnRelay,
    relay_addresses,
)
from nattool.protocol.endpoint import DEFAULT_PORT, Endpoint, IPAddress, source_key
from nattool.protocol.stun import MAGIC_COOKIE, is_stun
from nattool.protocol.text import REGISTER_PREFIX, RelayGrant
from nattool.protocol.turn import is_turn_message
from nattool.protocol.turn_server import (
    AllocationWanted,
    ClientOutcome,
    ClientRef,
    Deallocated,
    ToPeer,
    TurnConfig,
    TurnCore,
)
from nattool.store.base import Store, StoreLimits, StoreStats
from nattool.tracker.coalesce import Coalescer
from nattool.tracker.dispatch import HELD, HeldReplies, Junk, PendingRegistration, TrackerCore
from nattool.tracker.federation import Federation, FederationConfig
from nattool.tracker.ratelimit import SourceRateLimiter

log = logging.getLogger("nattool.serve")

# Registrations waiting for the store while it works on a batch (a slow store makes
# replies later); beyond this, ERR store unavailable at once (counted as
# drop_overload): never an unbounded queue.
MAX_QUEUED_REGISTRATIONS = 20_000
DRAIN_BATCH = 256  # datagrams read per event-loop wake-up (then timers and the store get a turn)
# Registrations answered after one commit. A wake-up that reads a burst commits and
# answers every so many, so the first of the burst does not wait for the last.
ANSWER_EVERY = 16
# An asynchronous store (redis) may have this many batches in flight: another one
# goes while the store works on the first (once SECOND_FLUSH_AT registrations
# wait), so the tracker is not idle while the store, another process, waits for a
# core.
FLUSHES_IN_FLIGHT = 3
SECOND_FLUSH_AT = 32
MAX_DATAGRAM = 65535  # the largest UDP payload: a padded request is read whole
HOUSEKEEPING_INTERVAL = 0.5
# The most often a repeated log line goes out (with a count of those held back):
# a store outage fails a batch per write and an expiry per housekeeping tick, and
# junk can come as fast as the network carries it.
STORE_ERROR_LOG_INTERVAL = 1.0
EXPIRE_ERROR_LOG_INTERVAL = 30.0
JUNK_LOG_INTERVAL = 1.0
# A bare STUN Binding request starts with these 8 bytes (type, length 0, magic cookie).
_BARE_BINDING_HEAD = b"\x00\x01\x00\x00" + MAGIC_COOKIE.to_bytes(4, "big")
_REGISTER_HEAD = REGISTER_PREFIX.encode()
_REGISTER_HEAD_LEN = len(_REGISTER_HEAD)
_STORE_UNAVAILABLE = StoreError("store unavailable")


@dataclass(slots=True)
class ServerConfig:
    hosts: tuple[str, ...] = ()  # empty: every interface, IPv4 and IPv6
    port: int = DEFAULT_PORT
    ttl: float = 120.0
    rate_limit: float = 50.0  # requests/s per source; 0 = off
    burst: float | None = None
    store: str = "sqlite:"
    public: Endpoint | None = None
    joins: tuple[Endpoint, ...] = ()
    tracker_ttl: float = 300.0
    announce_interval: float = 60.0
    alt_host: str | None = None
    alt_port: int | None = None
    limits: StoreLimits = field(default_factory=StoreLimits)
    reuse_port: bool = False  # set by --workers: several processes share the port
    metrics: tuple[str, int] | None = None  # --metrics address
    turn: TurnConfig | None = None  # the TURN relay, None: off
    relay_ips: tuple[IPAddress, ...] = ()  # --relay-ip, at most one per family
    relay_ports: tuple[int, int] = DEFAULT_RELAY_PORTS
    tcp: bool = False  # listen on TCP on the tracker port too
    coalesce_us: float = 400.0  # the most a drain waits for more datagrams; 0 = never


def _bind_udp(host: str, port: int, reuse_port: bool) -> socket.socket:
    ip = ipaddress.ip_address(host)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            # One socket per family: no IPv4-mapped addresses to translate on the hot path.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            except OSError:
                pass
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise NetworkError(f"cannot listen on udp {Endpoint(ip, port)}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


SOURCE_CACHE_MAX = 100_000  # entries in each memo table keyed by source text


def v4_address(host: str) -> int:
    """The kernel's dotted-quad text of a source as an integer, for the bare Binding
    builder (memoized: STUN keepalives come from the same sources over and over)."""
    return int.from_bytes(socket.inet_aton(host), "big")


def v6_source_key(host: str) -> str:
    """An IPv6 source's rate-limit key (its /64), from the kernel's text."""
    return source_key(ipaddress.IPv6Address(host.split("%", 1)[0]))


class _Listener:
    """One bound socket, read by the event loop's reader callback."""

    __slots__ = ("local", "sock", "closed", "bare_stun", "v4", "primary", "turn_clients", "turn_routes", "send_routes")

    def __init__(self, local: Endpoint, sock: socket.socket, primary: bool = False) -> None:
        self.local = local
        self.sock = sock
        self.closed = False
        self.primary = primary  # the tracker port (not an RFC 5780 alternate)
        # source (host, port) -> its TURN ClientRef, when TURN is on
        self.turn_clients: dict[Any, Any] = {}
        # (source (host, port), channel number) -> its ChannelData route, when TURN is on
        self.turn_routes: dict[Any, Route] = {}
        # (source (host, port), peer IPv4 address as an integer, peer port) -> the route
        # of its Send indications, when TURN is on
        self.send_routes: dict[Any, SendRoute] = {}
        self.v4 = local.ip.version == 4  # sources are then canonical dotted quads
        # (request, IPv4 source as an integer, port) -> reply, for bare Binding requests
        self.bare_stun: Callable[[bytes, int, int], bytes] | None = None


class _GroupRelay:
    """Answers ``//relay/<group>`` from the TURN core (``serve --relay``)."""

    def __init__(self, turn: TurnCore) -> None:
        self.turn = turn

    def grant(self, group: str, now: float, wall_now: float) -> RelayGrant:
        grant = self.turn.group_grant(group, now, wall_now)
        assert grant is not None  # the core relays for groups: that is why this exists
        return RelayGrant(grant.username, grant.password, grant.lifetime, grant.realm, grant.relayed)


# Where a registration's reply goes: a UDP socket, or a TCP connection (whose
# ``sock.sendto`` frames the reply), both with ``closed`` and ``sock``.
_ReplyTo = Union[_Listener, StreamConnection]


class TrackerServer:
    def __init__(self, config: ServerConfig, store: Store, stun: bool = True) -> None:
        self.config = config
        self.store = store
        self.federation = Federation(
            FederationConfig(tracker_ttl=config.tracker_ttl, announce_interval=config.announce_interval),
            public=config.public,
            joins=config.joins,
        )
        self.core = TrackerCore(self.federation)
        self.limiter = SourceRateLimiter(config.rate_limit, config.burst)
        self.stun_enabled = stun
        self._sync_store = store.supports_sync
        self._stun_by_local: dict[Endpoint, Any] = {}  # local endpoint -> StunResponder
        self.listeners: list[_Listener] = []
        self.tcp_listeners: list[TcpListener] = []
        self.turn: TurnCore | None = None  # the TURN relay's decisions (with cfg.turn)
        self.relay: TurnRelay | None = None  # its relayed sockets
        self.relay_ips: dict[int, IPAddress] = {}
        self._streams: dict[int, StreamConnection] = {}  # TCP connections that spoke TURN, by id
        self._stream_routes: dict[Any, Route] = {}  # ChannelData routes of TCP clients (with TURN)
        # Monotonic seconds for the TURN core's decisions (a test moves it forward).
        self.turn_clock: Callable[[], float] = time.monotonic
        self._v6_keys, self._learn_v6_key = bounded_memo(v6_source_key, SOURCE_CACHE_MAX)
        self._v4_addresses, self._learn_v4_address = bounded_memo(v4_address, SOURCE_CACHE_MAX)
        self._batch: list[tuple[PendingRegistration, _ReplyTo, Any]] = []
        self._flush_scheduled = False
        self._flushing = 0  # store writes in flight (an asynchronous store: redis)
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store_error_log = LogGate(STORE_ERROR_LOG_INTERVAL)
        self._expire_error_log = LogGate(EXPIRE_ERROR_LOG_INTERVAL)
        self._junk_log = LogGate(JUNK_LOG_INTERVAL)
        self.last_stats: StoreStats | None = None  # refreshed by housekeeping, read by metrics
        self.collector = ServingCollector()  # started by serve()
        self.coalescer = Coalescer(config.coalesce_us / 1e6) if config.coalesce_us > 0 else None
        self._metrics_httpd: Any = None
        self._reply_memo: ReplyMemo | None = None  # set once the store is open

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> list[Endpoint]:
        """Open the store, bind every socket (the tracker port on each host, and the
        RFC 5780 alternates), start the timers. Returns the bound endpoints."""
        loop = self._loop = asyncio.get_running_loop()
        if self.coalescer is not None:
            fine_timer_slack()  # the loop's thread: the waits end on time
        await self.store.open()
        self.core.keepalive_lane = self.store.keepalive_lane()
        self._reply_memo = ReplyMemo(self.core) if self.store.repeats_views else None
        try:
            self.federation.restore(await self.store.load_trackers(time.time()))
            await self._bind_all(loop)
            if self.config.turn is not None:
                self._start_turn(loop)
            if self.config.tcp:
                await self._listen_tcp(loop)
        except BaseException:
            await self.stop()
            raise
        if self.config.metrics is not None:
            try:
                self._metrics_httpd = start_metrics(self.metrics_snapshot, *self.config.metrics)
            except BaseException:
                await self.stop()
                raise
        self._tasks.append(loop.create_task(self._housekeeping()))
        return [lst.local for lst in self.listeners]

    async def _bind_all(self, loop: asyncio.AbstractEventLoop) -> None:
        cfg = self.config
        default_hosts = not cfg.hosts
        hosts = list(cfg.hosts) or ["0.0.0.0", "::"]
        alt_ip = ipaddress.ip_address(cfg.alt_host) if cfg.alt_host else None
        if alt_ip is not None and not any(ipaddress.ip_address(h).version == alt_ip.version for h in hosts):
            raise ConfigError(f"--alt-host {alt_ip} needs a --host of the same address family")
        for host in hosts:
            try:
                primary_sock = _bind_udp(host, cfg.port, cfg.reuse_port)
            except NetworkError:
                if default_hosts and host == "::" and self.listeners:
                    log.warning("event=no_ipv6 msg='IPv6 unavailable; serving IPv4 only'")
                    continue
                raise
            primary = Endpoint.from_sockaddr(primary_sock.getsockname()[:2])
            socks = [(primary, primary_sock)]
            responder = None
            if self.stun_enabled:
                from nattool.tracker.stun_responder import StunResponder

                same_family_alt = alt_ip if alt_ip is not None and alt_ip.version == primary.ip.version else None
                try:
                    responder = StunResponder(primary, alt_ip=same_family_alt, alt_port=cfg.alt_port)
                except NattoolError:
                    primary_sock.close()
                    raise
                for ep in responder.local_endpoints()[1:]:
                    socks.append((ep, _bind_udp(str(ep.ip), ep.port, cfg.reuse_port)))
            reader: Callable[[_Listener], Any] = self._drain if cfg.turn is None else self._drain_turn
            if self.coalescer is not None:
                # A store write scheduled (Redis): its registrations are answered once
                # it commits, and it runs when the loop gets its turn: no wait then.
                reader = coalesced(reader, self.coalescer, lambda: self._flush_scheduled)
            for local, sock in socks:
                listener = _Listener(local, sock, primary=local == primary)
                self.listeners.append(listener)
                if responder is not None:
                    self._stun_by_local[local] = responder
                    if local.ip.version == 4:
                        listener.bare_stun = responder.bare_binding_builder(local, 4)
                loop.add_reader(sock.fileno(), reader, listener)

    def _start_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """The TURN core and its relayed sockets: relay addresses per family, the
        server's own endpoints for the peer policy, a secret of this process."""
        cfg = self.config
        assert cfg.turn is not None
        hosts = [ipaddress.ip_address(h) for h in cfg.hosts] or [ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")]
        bound_versions = {lst.local.ip.version for lst in self.listeners}
        relay_ips = relay_addresses(cfg.relay_ips, [ip for ip in hosts if ip.version in bound_versions])
        self.relay_ips = relay_ips
        services = frozenset(lst.local for lst in self.listeners)
        policy = dataclasses.replace(
            cfg.turn.peer_policy,
            service_endpoints=services,
            server_ips=frozenset(relay_ips.values()) | frozenset(ep.ip for ep in services if not ep.ip.is_unspecified),
        )
        turn_config = dataclasses.replace(cfg.turn, families=frozenset(relay_ips), peer_policy=policy)
        self.turn = TurnCore(turn_config, os.urandom(32))
        low, high = cfg.relay_ports
        ranges = {version: RelayPortRange(ip, low, high) for version, ip in relay_ips.items()}
        for port_range in ranges.values():
            port_range.check()
        self.relay = TurnRelay(
            self.turn,
            loop,
            ranges,
            lambda ref: self._client_sender(ref, droppable=True),
            self.core.counters,
            self._datagram_target,
            clock=lambda: self.turn_clock(),
        )
        for lst in self.listeners:
            lst.turn_routes = self.relay.route_table()
            lst.send_routes = self.relay.route_table()
        self._stream_routes = self.relay.route_table()  # (connection id, channel number) -> route
        if cfg.turn.relay_groups:
            self.core.relay = _GroupRelay(self.turn)

    async def _listen_tcp(self, loop: asyncio.AbstractEventLoop) -> None:
        """TCP on the tracker port number of each address (docs/PROTOCOL.md section 9)."""
        for lst in self.listeners:
            if lst.primary:
                tcp = TcpListener(self, lst.local, self.core.counters)
                await tcp.start(loop, self.config.reuse_port)
                self.tcp_listeners.append(tcp)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # A cancellation that lands in a client library's own timeout handling
            # (redis-py's, around a store call) can be swallowed: ask until it ends.
            while not task.done():
                await asyncio.wait({task}, timeout=0.2)
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        # Answer what is already queued before closing the store.
        while self._batch or self._flushing:
            if not self._flushing:
                self._start_flush()
            await asyncio.sleep(0.01)
        for tcp in self.tcp_listeners:
            await tcp.close()
        if self.relay is not None:
            self.relay.close_all()
        for lst in self.listeners:
            if not lst.closed:
                lst.closed = True
                if self._loop is not None:
                    self._loop.remove_reader(lst.sock.fileno())
                lst.sock.close()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd = None
        await self.store.close()
        self._stopped.set()

    # -- the hot path ----------------------------------------------------------------
    def _drain(self, listener: _Listener) -> int:
        """Read and answer up to DRAIN_BATCH datagrams: one event-loop wake-up serves a
        burst, and the cheap requests are answered right here with plain sendto.
        Returns how many it read."""
        sock = listener.sock
        recvfrom = sock.recvfrom
        sendto = sock.sendto
        limiter = self.limiter
        limited = limiter.rate > 0
        v6_key = self._v6_keys.get
        bare_stun = listener.bare_stun
        known_address = self._v4_addresses.get
        register_v4 = self.core.on_register_v4 if listener.v4 else None
        sync_store = self._sync_store
        now, wall = time.monotonic(), time.time()  # one reading serves the whole burst
        nat = stun = 0
        kept: HeldReplies = []
        held = HELD
        batch = self._batch
        for read in range(DRAIN_BATCH):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ICMP errors for earlier sends surface here on some systems.
                self.core.counters["socket_error"] += 1
                continue
            host = addr[0]
            if limited and not limiter.allow((v6_key(host) or self._learn_v6_key(host)) if ":" in host else host, now):
                continue
            if data == b"//nat":
                nat += 1
                if ":" in host:
                    reply = f"[{host.split('%', 1)[0]}]:{addr[1]}".encode()
                else:
                    reply = f"{host}:{addr[1]}".encode()
                try:
                    sendto(reply, addr)
                except OSError:
                    self.core.counters["send_error"] += 1
                continue
            if bare_stun is not None and len(data) == 20 and data[:8] == _BARE_BINDING_HEAD and addr[1]:
                stun += 1
                address = known_address(host) or self._learn_v4_address(host)
                try:
                    sendto(bare_stun(data, address, addr[1]), addr)
                except OSError:
                    self.core.counters["send_error"] += 1
                continue
            # Once a registration is queued, the keepalives after it queue too:
            # replies go out in the order the requests came.
            if (
                register_v4 is not None
                and data[:_REGISTER_HEAD_LEN] == _REGISTER_HEAD
                and (outcome := register_v4(data, addr, wall, None if batch else kept)) is not None
            ):
                if outcome is held:
                    # A keepalive the store's lane took: its reply is on `kept`,
                    # sent once committed.
                    if len(kept) >= ANSWER_EVERY:
                        self._answer_keepalives(sendto, kept)
                    continue
                self._enqueue(outcome, listener, addr)  # type: ignore[arg-type]
            else:
                self._slow_path(listener, data, addr, now, wall)
            if sync_store and len(batch) >= ANSWER_EVERY:
                self._answer_held(sendto, kept)
                batch = self._batch
        else:
            read = DRAIN_BATCH
        if nat:
            self.core.counters["nat"] += nat
        if stun:
            self.core.counters["stun"] += stun
        self._answer_held(sendto, kept)
        registered = self.core.counters["register"]
        if registered >= self.collector.next_at:
            self.collector.collect_young(registered)
        return read

    def _drain_turn(self, listener: _Listener) -> int:
        """The reader of a tracker socket with TURN on: ChannelData and
        TURN methods to the TURN core, everything else as :meth:`_drain` would answer
        it, through the general path. TURN requests count against the per-source rate
        limit; Send indications and ChannelData do not (the core caps their bandwidth).

        ChannelData and plain Send indications go along their routes
        (:meth:`TurnRelay.learn_route`, :meth:`TurnRelay.learn_send_route`: what the
        core decided for that source and channel number or peer, kept until it expires
        or the core's state changes): per packet only the length, the bandwidth and the
        header are left. Without a route, the general path decides; a test compares both."""
        sock = listener.sock
        recvfrom = sock.recvfrom
        turn = self.turn
        relay = self.relay
        assert turn is not None and relay is not None
        limiter = self.limiter
        limited = limiter.rate > 0
        refs = listener.turn_clients
        channel_data = relay.channel_data
        relay.check_routes()
        routes = listener.turn_routes
        route_of = routes.get
        send_routes = listener.send_routes
        send_parts = turn.send_indication_parts
        sent = relay.sent
        capped = turn.config.bandwidth
        spend = turn.spend
        to_peer = to_peer_bytes = to_client = to_client_bytes = send_errors = turn_send_errors = 0
        now, wall = self.turn_clock(), time.time()
        for read in range(DRAIN_BATCH):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.core.counters["socket_error"] += 1
                continue
            first = data[0] if data else 0xFF
            if 0x40 <= first <= 0x7F:  # ChannelData (RFC 8656: 0x40-0x4F; RFC 5766 clients use up to 0x7F)
                n = len(data)
                if n >= 4:
                    key = (addr, (first << 8) | data[1])
                    route = route_of(key)
                    if route is None or now >= route[0]:
                        ref = refs.get(addr) or self._udp_client(listener, addr)
                        if ref is None:
                            continue
                        route = relay.learn_route(routes, key, ref, key[1], now)
                    until, how, send, address, head, sender, target = route  # valid now, as learned now
                    if how:
                        length = (data[2] << 8) | data[3]
                        if not 0 <= n - 4 - length <= 3:
                            continue  # a bad length: dropped
                        if capped and not spend(sender, length, now):
                            continue
                        to_peer += 1
                        to_peer_bytes += length
                        if target is None:
                            try:
                                send(data[4 : 4 + length], address)
                            except OSError:
                                turn_send_errors += 1
                            continue
                        if capped and not spend(target, length, now):
                            continue
                        to_client += 1
                        to_client_bytes += length
                        if how == ROUTE_TO_CLIENT:
                            try:
                                send(head + data[2 : 4 + length], address)
                            except OSError:
                                send_errors += 1
                        else:
                            send(head + data[2 : 4 + length] + bytes(-length % 4))
                        continue
                ref = refs.get(addr) or self._udp_client(listener, addr)
                if ref is not None:
                    channel_data(data, ref, now)
                continue
            if first == 0 and data[1:2] == b"\x16":  # a Send indication: along its route when plain
                parts = send_parts(data)
                if parts.__class__ is tuple:
                    key = (addr, parts[0], parts[1])  # type: ignore[index]
                    send_route = send_routes.get(key)
                    if send_route is None or now >= send_route[0]:
                        ref = refs.get(addr) or self._udp_client(listener, addr)
                        if ref is None:
                            continue
                        send_route = relay.learn_send_route(send_routes, key, ref, key[1], key[2], now)
                    if sent(send_route, parts[2], now):  # type: ignore[index]
                        continue
            if first < 0x40 and is_turn_message(data):
                request = not (first & 0x01 or data[1] & 0x10)
                if request and limited and not limiter.allow(self._limit_key(addr[0]), now):
                    continue
                ref = refs.get(addr) or self._udp_client(listener, addr)
                if ref is not None:
                    self._turn_outcome(turn.on_client_message(data, ref, now, wall), ref, now, wall)
                    relay.check_routes()
                continue
            if limited and not limiter.allow(self._limit_key(addr[0]), now):
                continue
            self._slow_path(listener, data, addr, now, wall)
        else:
            read = DRAIN_BATCH
        if to_peer:
            turn.count_relayed(to_peer, to_peer_bytes, to_client, to_client_bytes)
        if send_errors or turn_send_errors:
            self.core.counters["send_error"] += send_errors
            self.core.counters["turn_send_error"] += turn_send_errors
        self._answer_held(sock.sendto, [])
        if self.core.counters["register"] >= self.collector.next_at:
            self.collector.collect_young(self.core.counters["register"])
        return read  # for the coalescer: how many datagrams this wake-up read

    def _limit_key(self, host: str) -> str:
        return (self._v6_keys.get(host) or self._learn_v6_key(host) or host) if ":" in host else host

    def _udp_client(self, listener: _Listener, addr: Any) -> ClientRef | None:
        try:
            ref = ClientRef("udp", Endpoint.from_sockaddr(addr), listener.local)
        except ValueError:
            return None
        if len(listener.turn_clients) >= SOURCE_CACHE_MAX:
            listener.turn_clients.clear()
        listener.turn_clients[addr] = ref
        return ref

    def _turn_outcome(self, outcome: ClientOutcome, ref: ClientRef, now: float, wall: float) -> None:
        """Carry out what the TURN core decided for a client's message."""
        if outcome is None:
            return
        assert self.relay is not None
        cls = outcome.__class__
        if cls is ToPeer:
            self.relay.to_peer(outcome, now)  # type: ignore[arg-type]
            return
        if cls is bytes:
            reply: bytes | None = outcome  # type: ignore[assignment]
        elif cls is AllocationWanted:
            reply = self.relay.open(outcome, now, wall)  # type: ignore[arg-type]
        elif cls is Deallocated:
            reply = outcome.reply  # type: ignore[union-attr]
            self.relay.close(outcome.allocation_id)  # type: ignore[union-attr]
        else:  # pragma: no cover
            raise AssertionError(f"unhandled TURN outcome {outcome!r}")
        if reply is not None:
            send = self._client_sender(ref)
            if send is not None:
                send(reply)

    def _datagram_target(self, ref: ClientRef) -> DatagramTarget | None:
        """A UDP TURN client's address and the sendto of the tracker socket it wrote to
        (what :meth:`_client_sender` sends with), for the relay's routes."""
        if ref.stream:
            return None
        for lst in self.listeners:
            if lst.local == ref.server:
                return lst.sock.sendto, ref.client.sockaddr()
        return None

    def _client_sender(self, ref: ClientRef, droppable: bool = False) -> Callable[[bytes], None] | None:
        """How to send to a TURN client: from the tracker socket it wrote to, or on its
        TCP connection (``droppable``: relayed data, dropped when a TCP client does not
        keep up)."""
        if ref.stream:
            conn = self._streams.get(ref.connection)
            if conn is None or conn.closed:
                return None
            return lambda data: conn.send_frame(data, droppable=droppable)
        for lst in self.listeners:
            if lst.local == ref.server:
                sendto = lst.sock.sendto
                addr = ref.client.sockaddr()
                counters = self.core.counters

                def send(data: bytes) -> None:
                    try:
                        sendto(data, addr)
                    except OSError:
                        counters["send_error"] += 1

                return send
        return None

    def _answer_held(self, sendto: Callable[[bytes, Any], int], kept: HeldReplies) -> None:
        """Answer the registrations a wake-up holds: the lane's keepalives first
        (they came first, and the lane changed the store first), then, with a
        synchronous store, the queued ones in one transaction, no task."""
        if kept:
            self._answer_keepalives(sendto, kept)
        if self._batch and self._sync_store:
            self._flush_now()

    def _answer_keepalives(self, sendto: Callable[[bytes, Any], int], kept: HeldReplies) -> None:
        """Commit what the lane changed, then answer ``kept`` and empty it."""
        started = time.perf_counter()
        error = self.store.commit_now()
        self._count_store_write(started)
        counters = self.core.counters
        counters["register_keepalive"] += len(kept)
        replies = kept
        if error is not None:
            self._store_failed(len(kept), error)
            refused = self.core.refused_keepalives(len(kept), _STORE_UNAVAILABLE)
            replies = [(refused, addr) for _, addr in kept]
        for reply, addr in replies:
            try:
                sendto(reply, addr)
            except OSError:
                counters["send_error"] += 1
        kept.clear()

    def _slow_path(self, listener: _Listener, data: bytes, addr: Any, now: float, wall: float) -> None:
        if data[:2] != b"//" and is_stun(data):
            responder = self._stun_by_local.get(listener.local)
            if responder is not None:
                self._answer_stun(responder, listener, data, addr)
            return
        try:
            src = Endpoint.from_sockaddr(addr)
        except ValueError:
            return
        outcome = self.core.on_datagram(data, src, now, wall)
        if outcome is None:
            return
        cls = outcome.__class__
        if cls is bytes:
            # An empty reply is meaningful: "I know no trackers" (PROTOCOL.md section 3).
            self._send(listener, outcome, addr)  # type: ignore[arg-type]
        elif cls is PendingRegistration:
            self._enqueue(outcome, listener, addr)  # type: ignore[arg-type]
        elif cls is Junk:
            self._log_junk(outcome.why, data, addr, now)  # type: ignore[union-attr]

    def _log_junk(self, why: str, data: bytes, addr: Any, now: float) -> None:
        """A debug line for a dropped datagram, at most one a second: a junk flood
        must not flood the log."""
        if not log.isEnabledFor(logging.DEBUG):
            return
        held = self._junk_log.admit(now)
        if held is not None:
            log.debug(
                "event=junk_dropped why=%r src=%s bytes=%d head=%r more=%d",
                why, Endpoint.from_sockaddr(addr), len(data), data[:16], held,
            )

    def _enqueue(self, pending: PendingRegistration, listener: _ReplyTo, addr: Any) -> None:
        if len(self._batch) >= MAX_QUEUED_REGISTRATIONS:
            self.core.counters["drop_overload"] += 1
            self._send(listener, self.core.finish_registration(pending, _STORE_UNAVAILABLE), addr)
            return
        self._batch.append((pending, listener, addr))
        if not self._sync_store and not self._flush_scheduled and (
            not self._flushing or len(self._batch) == SECOND_FLUSH_AT
        ):
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._start_flush)

    def _send(self, listener: _ReplyTo, data: bytes, addr: Any) -> None:
        if listener.closed:
            return
        try:
            listener.sock.sendto(data, addr)
        except OSError:
            # Full socket buffer or an unroutable peer: the reply is lost, as UDP allows.
            self.core.counters["send_error"] += 1

    def _answer_stun(self, responder: Any, listener: _Listener, data: bytes, addr: Any) -> None:
        host = addr[0].split("%", 1)[0]
        try:
            packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        except OSError:
            return
        fast = responder.bare_binding_reply(data, packed, addr[1], listener.local)
        if fast is not None:
            self.core.counters["stun"] += 1
            self._send(listener, fast, addr)
            return
        try:
            src = Endpoint.from_sockaddr(addr)
        except ValueError:
            return
        reply = responder.respond(data, src, listener.local)
        if reply is None:
            self.core.counters["stun_drop"] += 1
            self._log_junk("not a STUN request this server answers", data, addr, time.monotonic())
            return
        self.core.counters["stun"] += 1
        out = listener
        if reply.send_from != listener.local:
            for other in self.listeners:
                if other.local == reply.send_from:
                    out = other
                    break
            else:
                self.core.counters["stun_drop"] += 1
                return
        self._send(out, reply.data, addr if reply.dest == src else reply.dest.sockaddr())

    # -- TCP on the tracker port -----------------------------------------------------
    def on_stream_text(self, conn: StreamConnection, payload: bytes) -> None:
        """A text request over TCP: as the same datagram over UDP, answered in a frame."""
        peer = conn.peer
        assert peer is not None
        now, wall = time.monotonic(), time.time()
        host = conn.addr[0]
        if self.limiter.rate > 0 and not self.limiter.allow(source_key(peer.ip) if ":" in host else host, now):
            return
        outcome = self.core.on_datagram(payload, peer, now, wall)
        if outcome is None:
            return
        cls = outcome.__class__
        if cls is bytes:
            # An empty reply too (an empty frame): "I know no trackers".
            conn.send_text(outcome)  # type: ignore[arg-type]
        elif cls is PendingRegistration:
            self._enqueue(outcome, conn, conn.addr)  # type: ignore[arg-type]
            if self._sync_store and not self._flush_scheduled:
                # No datagram wake-up answers it: flush once this read is handled.
                self._flush_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._start_flush)
        elif cls is Junk:
            conn.close()  # not our protocol: a stream has no use for what follows

    def on_stream_stun(self, conn: StreamConnection, message: bytes) -> None:
        """A STUN message over TCP: TURN methods to the TURN core (RFC 8656 TCP to the
        server), Binding to the STUN responder (replies that would come from another
        address or port are not possible on a stream)."""
        if self.turn is not None and is_turn_message(message):
            now = self.turn_clock()
            request = not (message[0] & 0x01 or message[1] & 0x10)
            if request and self.limiter.rate > 0 and not self.limiter.allow(self._limit_key(conn.addr[0]), now):
                return
            ref = self._stream_client(conn)
            self._turn_outcome(self.turn.on_client_message(message, ref, now, time.time()), ref, now, time.time())
            if self.relay is not None:
                self.relay.check_routes()
            return
        peer = conn.peer
        responder = self._stun_by_local.get(conn.local)
        if responder is None or peer is None:
            return
        reply = responder.respond(message, peer, conn.local)
        if reply is None or reply.send_from != conn.local or reply.dest != peer:
            self.core.counters["stun_drop"] += 1
            return
        self.core.counters["stun"] += 1
        conn.send_frame(reply.data)

    def on_stream_channel_data(self, conn: StreamConnection, frame: bytes) -> None:
        if self.turn is None or self.relay is None:
            conn.close()  # no TURN relay here
            return
        relay = self.relay
        now = self.turn_clock()
        relay.check_routes()
        key = (conn.id, (frame[0] << 8) | frame[1])  # a frame holds at least the 4-byte header
        route = self._stream_routes.get(key)
        if route is None or now >= route[0]:
            route = relay.learn_route(self._stream_routes, key, self._stream_client(conn), key[1], now)
        if not relay.routed(route, frame, now):
            relay.channel_data(frame, self._stream_client(conn), now)

    def _stream_client(self, conn: StreamConnection) -> ClientRef:
        ref = conn.turn_client
        if ref is None:
            assert conn.peer is not None
            ref = conn.turn_client = ClientRef("tcp", conn.peer, conn.local, conn.id)
            self._streams[conn.id] = conn
        return ref

    def on_stream_closed(self, conn: StreamConnection) -> None:
        """A TCP client gone: its allocation goes with it (RFC 8656 section 3.1)."""
        if conn.turn_client is None or self.turn is None or self.relay is None:
            return
        self._streams.pop(conn.id, None)
        for allocation_id in self.turn.client_gone(conn.turn_client):
            self.relay.close(allocation_id)

    # -- registrations, batched per loop turn -----------------------------------------
    def _start_flush(self) -> None:
        self._flush_scheduled = False
        if not self._batch:
            return
        if self._flushing and (self._flushing >= FLUSHES_IN_FLIGHT or len(self._batch) < SECOND_FLUSH_AT):
            return
        batch, self._batch = self._batch, []
        self._flushing += 1
        assert self._loop is not None
        self._loop.create_task(self._flush(batch))

    def _flush_now(self) -> None:
        batch, self._batch = self._batch, []
        started = time.perf_counter()
        try:
            results = self.store.register_now([p.registration for p, _, _ in batch], time.time())
        except NattoolError as exc:
            results = [StoreError(str(exc))] * len(batch)
        self._deliver(batch, results, started)

    async def _flush(self, batch: list[tuple[PendingRegistration, _ReplyTo, Any]]) -> None:
        try:
            started = time.perf_counter()
            try:
                results = await self.store.register([p.registration for p, _, _ in batch], time.time())
            except NattoolError as exc:
                results = [StoreError(str(exc))] * len(batch)
            self._deliver(batch, results, started)
        finally:
            self._flushing -= 1
            if self._batch and not self._flush_scheduled:
                self._flush_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._start_flush)

    def _deliver(
        self, batch: list[tuple[PendingRegistration, _ReplyTo, Any]], results: list[Any], started: float
    ) -> None:
        failed = [r for r in results if isinstance(r, StoreError)]
        if failed:
            # A store reports an outage per entry (redis) or raises: count and log
            # both alike, and never send the store's own text (hosts, ports) to clients.
            self._store_failed(len(failed), failed[0])
            results = [_STORE_UNAVAILABLE if isinstance(r, StoreError) else r for r in results]
        self._count_store_write(started)
        finish = self._reply_memo.finish if self._reply_memo is not None else self.core.finish_registration
        send = self._send
        for (pending, listener, addr), result in zip(batch, results):
            send(listener, finish(pending, result), addr)

    def _count_store_write(self, started: float) -> None:
        counters = self.core.counters
        counters["store_batches"] += 1
        counters["store_seconds_x1e6"] += int((time.perf_counter() - started) * 1e6)

    def _store_failed(self, refused: int, error: StoreError) -> None:
        counters = self.core.counters
        counters["store_error"] += 1
        counters["register_store_error"] += refused
        held = self._store_error_log.admit(time.monotonic())
        if held is not None:
            # failed_batches: this one and those held back since the last line.
            log.warning(
                "event=store_error kind=%s refused=%d failed_batches=%d error=%r",
                self.store.kind, refused, held + 1, str(error),
            )

    # -- timers ----------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        last_sweep = last_shared_read = time.monotonic()
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            now, wall = time.monotonic(), time.time()
            await self._expire(now, wall)
            if now - last_sweep > 30:
                self.limiter.sweep(now)
                last_sweep = now
            for tcp in self.tcp_listeners:
                tcp.sweep(now)
            if self.turn is not None and self.relay is not None:
                for allocation_id in self.turn.expire(now):
                    self.relay.close(allocation_id)
            self._federation_tick(now, wall)
            await self._persist_federation()
            if self.store.shared and now - last_shared_read > 2.0:
                # Other processes (workers, other trackers on one Redis) verify
                # trackers too: list theirs.
                last_shared_read = now
                try:
                    self.federation.restore(await self.store.load_trackers(wall))
                except NattoolError:
                    self.core.counters["store_error"] += 1
            try:
                self.last_stats = await self.store.stats()
            except NattoolError:
                self.core.counters["store_error"] += 1
            self.collector.tick(now)

    async def _expire(self, now: float, wall: float) -> None:
        """Expire members. A store that is down fails every housekeeping tick: log
        the first failure at once, then every EXPIRE_ERROR_LOG_INTERVAL a line with
        the count of those held back, and the recovery."""
        gate = self._expire_error_log
        try:
            gone = await self.store.expire(wall)
        except NattoolError as exc:
            self.core.counters["store_error"] += 1
            held = gate.admit(now)
            if held is not None:
                log.warning("event=expire_failed error=%r more=%d", str(exc), held)
            return
        if gone:
            self.core.counters["expired"] += gone
        if gate.active:
            log.info("event=expire_recovered more_failed=%d", gate.settle())

    def _federation_tick(self, now: float, wall: float) -> None:
        out = self.federation.outgoing(now, wall)
        for dest, payload in out:
            listener = self._listener_for(dest)
            if listener is not None:
                self._send(listener, payload, dest.sockaddr())

    def _listener_for(self, dest: Endpoint) -> _Listener | None:
        for lst in self.listeners:
            if lst.local.ip.version == dest.ip.version and lst.local.port == self.config.port:
                return lst
        return None

    async def _persist_federation(self) -> None:
        events = self.federation.take_events()
        if events.learned_public is not None:
            log.info("event=public_learned public=%s", events.learned_public)
        try:
            for record in events.saved:
                await self.store.save_tracker(record)
            for ep in events.dropped:
                await self.store.drop_tracker(ep)
                log.info("event=tracker_expired tracker=%s", ep)
        except NattoolError as exc:
            self.core.counters["store_error"] += 1
            log.warning("event=tracker_persist_failed error=%r", str(exc))

    async def serve_until_stopped(self) -> None:
        await self._stopped.wait()

    def request_stop(self) -> None:
        if self._loop is not None and not self._stopped.is_set():
            self._loop.create_task(self.stop())

    def totals(self) -> dict[str, int]:
        """Every counter, with the datagrams the per-source rate limit dropped."""
        totals = dict(self.core.counters)
        totals["drop_rate_limit"] = self.limiter.dropped
        if self.coalescer is not None:
            totals["coalesce_waits"] = self.coalescer.waits
            totals["coalesce_wait_us"] = int(self.coalescer.waited * 1e6)
        if self.turn is not None:
            for key, value in dataclasses.asdict(self.turn.counters).items():
                totals[f"turn_{key}"] = value
        return totals

    def metrics_snapshot(self) -> MetricsSnapshot:
        """What a metrics scrape reads (from the scraper's thread: copies only)."""
        turn = None
        if self.turn is not None:
            turn = dataclasses.asdict(self.turn.counters)
            turn["live"] = self.turn.live
        tcp = sum(len(t.connections) for t in self.tcp_listeners) if self.tcp_listeners else None
        return MetricsSnapshot(self.totals(), self.last_stats, len(self.federation.listed), turn, tcp)


def banner(server: TrackerServer, bound: list[Endpoint]) -> str:
    cfg = server.config
    addrs = ", ".join(str(e) for e in bound)
    if server.tcp_listeners:
        addrs += " and tcp " + ", ".join(str(t.local) for t in server.tcp_listeners)
    rate = f"{cfg.rate_limit:g}/s per source" if cfg.rate_limit else "off"
    stun = "stun off"
    if server.stun_enabled:
        stun = "stun + RFC 5780" if cfg.alt_host or cfg.alt_port else "stun on"
    turn = ""
    if server.turn is not None and cfg.turn is not None:
        low, high = cfg.relay_ports
        relayed = " ".join(str(ip) for _, ip in sorted(server.relay_ips.items())) or "none"
        modes = [m for m, on in (("users", cfg.turn.users), ("rest", cfg.turn.rest_secret), ("groups", cfg.turn.relay_groups)) if on]
        turn = f", turn on: realm {cfg.turn.realm}, relayed {relayed} ports {low}-{high}, {'+'.join(modes)}"
    return (
        f"nattool {__version__} tracker listening on udp {addrs} "
        f"(store {server.store.describe()}, ttl {cfg.ttl:g}s, rate limit {rate}, {stun}{turn})"
    )


async def serve(
    config: ServerConfig,
    store: Store,
    stun: bool = True,
    on_ready: Callable[[str], None] | None = None,
    on_signal: Callable[[signal.Signals], None] | None = None,
) -> dict[str, int]:
    """Run until SIGINT/SIGTERM; return the counters (:meth:`TrackerServer.totals`).
    ``on_signal`` hears which signal stopped it (the command exits 130 after Ctrl-C,
    0 after systemd's SIGTERM)."""
    server = TrackerServer(config, store, stun)
    bound = await server.start()
    server.collector.start(time.monotonic())
    loop = asyncio.get_running_loop()

    def stop_on(sig: signal.Signals) -> None:
        if on_signal is not None:
            on_signal(sig)
        server.request_stop()

    if sys.platform != "win32":
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_on, sig)
    line = banner(server, bound)
    if on_ready is not None:
        on_ready(line)
    try:
        await server.serve_until_stopped()
    finally:
        if not server._stopped.is_set():
            await server.stop()
        server.collector.stop()
    return server.totals()
