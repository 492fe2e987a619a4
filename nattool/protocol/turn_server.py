"""The TURN server's decisions (RFC 8656, long-term credentials of RFC 8489): a pure
state machine of allocations, permissions and channels.

Pure: bytes, endpoints and clocks in; replies and instructions out. The I/O shell
(nattool.net) owns the sockets: the client-facing ones (UDP and TCP on the tracker
port) and one UDP socket per allocation (its relayed address). ``now`` is monotonic
seconds (lifetimes, nonces, bandwidth); ``wall`` is unix time (REST and group
usernames carry a unix expiry).

What :meth:`TurnCore.on_client_message` returns, one meaning per type:

- ``bytes``: send this to the client, on the transport it came from (already padded
  for TCP where the framing wants it);
- :class:`AllocationWanted`: bind a relayed UDP socket as it says, then call
  :meth:`TurnCore.allocation_made` (or :meth:`TurnCore.allocation_failed`) and send
  the bytes those return to the client;
- :class:`ToPeer`: send ``payload`` from the relayed socket of ``allocation_id`` to
  ``peer``;
- :class:`Deallocated`: send ``reply`` to the client, then close the relayed socket
  of ``allocation_id`` (a Refresh with lifetime 0);
- None: nothing to do (dropped).

From the peer side, :meth:`TurnCore.on_peer_datagram` returns the bytes to send to the
allocation's client (:meth:`TurnCore.client_of`), or None. :meth:`TurnCore.expire`
returns the ids whose sockets to close; :meth:`TurnCore.get_timer` says when to call it.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import struct
import zlib
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Optional, Union

from nattool.errors import ConfigError, ProtocolError
from nattool.protocol.endpoint import Endpoint, IPAddress, endpoint_source_key, unmap
from nattool.protocol.limits import SAFE_DATAGRAM, reply_budget
from nattool.protocol.peer_policy import PeerPolicy
from nattool.protocol.stun import (
    FINGERPRINT_XOR,
    MAGIC_COOKIE,
    AttrType,
    Attribute,
    ErrorCode,
    MsgClass,
    Nonce,
    Realm,
    StunMessage,
    UnknownAttributes,
    Username,
    XorMappedAddress,
    attr_type,
    encode_xor_address,
    integrity_matches,
    is_comprehension_required,
    parse,
)
from nattool.protocol.turn import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    PROTO_UDP,
    REASONS,
    AdditionalAddressFamily,
    AddressErrorCode,
    ChannelNumber,
    Data,
    EvenPort,
    Lifetime,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    TurnAttr,
    TurnMethod,
    XorPeerAddress,
    XorRelayedAddress,
    encode_channel_data,
    parse_channel_data,
)
from nattool.protocol.turn_auth import (
    CredentialStore,
    NonceMint,
    UserKey,
    grant_group_credentials,
    is_group_username,
)

_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
RESERVATION_LIFETIME = 30.0  # RFC 8656 section 7.2: a reserved port is held 30 s
MAX_PERMISSIONS = 256  # per allocation; beyond: 508
# The largest peer datagram a Data indication carries within STUN's 16-bit length
# (XOR-PEER-ADDRESS 12 or 24 bytes, DATA header 4, padding up to 3), by IP version.
_CHANNEL_HEAD = struct.Struct("!HH").pack  # ChannelData header: channel number, length (and an attribute's)
# A Data indication's header: type, length, magic cookie, transaction id (allocation id, counter)
_DATA_INDICATION_HEAD = struct.Struct("!HHIIQ").pack
_TXID = struct.Struct("!IQ").pack
_PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")
_ATTR_HEAD = struct.Struct("!HH").unpack_from  # an attribute's type and length
_XPA_V4 = struct.Struct("!HI").unpack_from  # X-Port and X-Address of an IPv4 XOR-PEER-ADDRESS
_U32 = struct.Struct("!I").unpack_from
MAX_DATA_PAYLOAD = {4: 0xFFFF - 12 - 4 - 3, 6: 0xFFFF - 24 - 4 - 3}
MAX_CHANNELS = 1024  # per allocation (the number space is 16K; memory is the limit); beyond: 508
DEFAULT_REALM = "nattool"

# Comprehension-required attributes understood in requests (the rest get 420).
_UNDERSTOOD = frozenset(
    {
        AttrType.USERNAME,
        AttrType.MESSAGE_INTEGRITY,
        AttrType.MESSAGE_INTEGRITY_SHA256,
        AttrType.REALM,
        AttrType.NONCE,
        AttrType.ERROR_CODE,
        AttrType.UNKNOWN_ATTRIBUTES,
        AttrType.XOR_MAPPED_ADDRESS,
        AttrType.PADDING,
        TurnAttr.CHANNEL_NUMBER,
        TurnAttr.LIFETIME,
        TurnAttr.XOR_PEER_ADDRESS,
        TurnAttr.DATA,
        TurnAttr.XOR_RELAYED_ADDRESS,
        TurnAttr.REQUESTED_ADDRESS_FAMILY,
        TurnAttr.EVEN_PORT,
        TurnAttr.REQUESTED_TRANSPORT,
        TurnAttr.RESERVATION_TOKEN,
    }
)
_NOT_PLAIN = object()  # a Send indication the per-packet reader leaves to parse()
_V4_PEERS_MAX = 4096  # peer endpoints the Send indication reader remembers
_REQUEST_METHODS = frozenset(
    {TurnMethod.ALLOCATE, TurnMethod.REFRESH, TurnMethod.CREATE_PERMISSION, TurnMethod.CHANNEL_BIND}
)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TurnConfig:
    """Everything the core decides with. ``users``: static ``--turn-user`` credentials;
    ``rest_secret``: ``--turn-secret``; ``relay_groups``: ``serve --relay`` (group
    credentials from ``//relay/<group>``). ``families``: the relayed address families
    the shell can bind (4 and/or 6). ``bandwidth``: bytes per second per allocation,
    both directions together; 0 = unlimited."""

    realm: str = DEFAULT_REALM
    users: Mapping[str, str] = field(default_factory=dict)
    rest_secret: Optional[str] = None
    relay_groups: bool = False
    families: frozenset[int] = frozenset({4, 6})
    default_lifetime: int = 600
    max_lifetime: int = 3600
    permission_lifetime: int = 300
    channel_lifetime: int = 600
    group_credential_lifetime: int = 3600
    max_allocations: int = 1000
    user_quota: int = 10
    source_quota: int = 10
    bandwidth: int = 1_000_000
    peer_policy: PeerPolicy = field(default_factory=PeerPolicy)
    safe_datagram: int = SAFE_DATAGRAM

    def __post_init__(self) -> None:
        # The realm travels in REALM (RFC 8489: under 128 characters) and as one word of
        # the //relay reply.
        if not 1 <= len(self.realm) <= 127 or any(c.isspace() for c in self.realm):
            raise ConfigError(f"realm {self.realm[:40]!r}: 1..127 characters, no spaces")
        for name in self.users:
            if not name or is_group_username(name):
                raise ConfigError(f"TURN user name {name[:40]!r} is empty or shaped like a group credential")
        if not 0 < self.default_lifetime <= self.max_lifetime:
            raise ConfigError("TURN lifetimes: 0 < default <= max")
        if min(self.permission_lifetime, self.channel_lifetime, self.group_credential_lifetime) <= 0:
            raise ConfigError("TURN permission, channel and credential lifetimes must be positive")
        if min(self.max_allocations, self.user_quota, self.source_quota, self.bandwidth) < 0:
            raise ConfigError("TURN quotas and bandwidth cannot be negative")

    @property
    def enabled(self) -> bool:
        """TURN is on: some credentials exist."""
        return bool(self.users) or self.rest_secret is not None or self.relay_groups


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class ClientRef:
    """The client side of an allocation's 5-tuple. ``connection``: the shell's id of a
    TCP connection (0 for UDP). Hashable: the shell may cache one per source."""

    transport: str  # "udp" | "tcp"
    client: Endpoint
    server: Endpoint
    connection: int = 0
    # Looked up for every relayed packet: hashing two Endpoints each time costs more
    # than the rest of the relay's decision.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.transport, self.client, self.server, self.connection)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def stream(self) -> bool:
        return self.transport == "tcp"


@dataclass(frozen=True, slots=True)
class AllocationWanted:
    """Bind a relayed UDP socket of ``family`` (4 or 6) on the relay address, register
    it under ``allocation_id``, then call :meth:`TurnCore.allocation_made`.

    - ``even_port``: the port must be even;
    - ``reserve_id`` (with ``even_port``): also bind port + 1 and keep it under
      ``reserve_id`` (no traffic is relayed through it; a later Allocate takes it, or
      :meth:`TurnCore.expire` lists ``reserve_id`` after 30 s: close it then);
    - ``reserved``: do not bind: the socket already held under ``allocation_id`` (from
      an earlier ``reserve_id``) becomes this allocation's relayed socket.

    Failure to bind (ports exhausted, ...): call :meth:`TurnCore.allocation_failed`."""

    allocation_id: int
    client: ClientRef
    family: int
    even_port: bool = False
    reserve_id: Optional[int] = None
    reserved: Optional[Endpoint] = None


class ToPeer(NamedTuple):
    """Send ``payload`` from the relayed socket of ``allocation_id`` to ``peer``."""

    allocation_id: int
    peer: Endpoint
    payload: bytes


class Handover(NamedTuple):
    """Send ``data`` to the client of ``allocation_id``: a packet from another
    allocation of this core to its relayed address, handed over without the kernel."""

    allocation_id: int
    data: bytes


_new_tuple = tuple.__new__


class ChannelRoute(NamedTuple):
    """Where ChannelData from one client on one channel goes, and the checks it passes,
    as :meth:`TurnCore.channel_data_handover` decides them, while they hold: until
    ``until`` (monotonic; the earliest expiry of the allocations and channels involved)
    and while :attr:`TurnCore.version` stays the same. What is left per packet: the
    length check, the bandwidth (:meth:`TurnCore.spend` on ``sender``, then on
    ``target``), the counters (:meth:`TurnCore.count_relayed`), the ChannelData header.

    ``target`` None: send the payload from the relayed socket of ``allocation_id``
    (the sender's) to ``peer``. Otherwise hand it over to the client of
    ``allocation_id`` (the target's) as ChannelData on channel ``number``, padded when
    ``stream``."""

    until: float
    sender: object  # the sending allocation, for spend()
    target: object  # the allocation handed over to, or None
    allocation_id: int
    peer: Endpoint
    number: int
    stream: bool


class PeerRoute(NamedTuple):
    """How datagrams from ``peer`` on one relayed socket reach the allocation's client,
    as :meth:`TurnCore.on_peer_datagram` decides, while it holds (``until``, and the
    core's version): after :meth:`TurnCore.spend` on ``allocation``, as ChannelData
    on channel ``number`` (padded when ``stream``), or with ``number`` 0 as a Data
    indication (:meth:`TurnCore.data_indication`) when the datagram is at most
    ``limit`` bytes (longer ones are dropped); counted with
    :meth:`TurnCore.count_relayed`."""

    until: float
    allocation: object
    number: int
    stream: bool
    limit: int
    peer: Endpoint
    xpa: bytes  # the Data indication's XOR-PEER-ADDRESS attribute (IPv4; empty: per packet)


@dataclass(frozen=True, slots=True)
class Deallocated:
    """Send ``reply`` to the client, then close the relayed socket of ``allocation_id``."""

    allocation_id: int
    reply: bytes


@dataclass(frozen=True, slots=True)
class GroupGrant:
    """What ``//relay/<group>`` answers: credentials and the relayed addresses of live
    allocations made with this group's credentials, most recent first."""

    username: str
    password: str
    lifetime: int
    realm: str
    relayed: tuple[Endpoint, ...]


ClientOutcome = Union[bytes, AllocationWanted, ToPeer, Deallocated, None]


@dataclass
class TurnCounters:
    """Monotonic counters for the metrics (allocations live: :attr:`TurnCore.live`)."""

    allocations_total: int = 0
    allocations_expired: int = 0
    auth_failures: int = 0
    stale_nonces: int = 0
    challenges: int = 0  # 401 to a request without credentials (the normal first step)
    peer_denials: int = 0  # 403
    quota_refusals: int = 0  # 486
    capacity_failures: int = 0  # 508
    bad_requests: int = 0  # 400 / 420 / 437 / 440 / 441 / 442 / 443
    packets_to_peer: int = 0
    bytes_to_peer: int = 0
    packets_to_client: int = 0
    bytes_to_client: int = 0
    bandwidth_drops: int = 0
    permission_drops: int = 0  # no permission / denied peer at send or receive time


# --------------------------------------------------------------------------- state

# How a permission's peer IP is checked packet by packet.
_OPEN = 0  # any port at that IP
_NOT_SERVICE = 1  # any port but the server's own service endpoints
_RELAYED_ONLY = 2  # only live relayed addresses (of the same group, for group allocations)


class _Allocation:
    __slots__ = (
        "id",
        "client",
        "username",
        "key",
        "group",
        "source",
        "family",
        "relayed",
        "expiry",
        "timer_at",
        "allocate_txid",
        "allocate_reply",
        "permissions",
        "channels",
        "channel_of_peer",
        "tokens",
        "bucket_time",
        "stream",
        "txid_counter",
    )

    def __init__(self, aid: int, pending: "_Pending", relayed: Endpoint, now: float) -> None:
        self.id = aid
        self.client = pending.client
        self.username = pending.username
        self.key = pending.key
        self.group = pending.group
        self.source = pending.source
        self.family = pending.family
        self.relayed = relayed
        self.expiry = now + pending.lifetime
        self.timer_at = self.expiry  # its one live entry in TurnCore._timers
        self.allocate_txid = pending.txid
        self.allocate_reply = b""
        # peer IP -> [expiry, mode]
        self.permissions: dict[IPAddress, list] = {}  # type: ignore[type-arg]
        # channel number -> [peer, expiry]; peer -> channel number
        self.channels: dict[int, list] = {}  # type: ignore[type-arg]
        self.channel_of_peer: dict[Endpoint, int] = {}
        self.tokens = 0.0
        self.bucket_time = now
        self.stream = pending.client.transport == "tcp"
        self.txid_counter = 0


@dataclass
class _Pending:
    client: ClientRef
    username: str
    key: bytes
    group: Optional[str]
    source: str
    family: int
    lifetime: int
    txid: bytes
    fingerprint: bool
    reserve_id: Optional[int]
    dual_refused: bool


@dataclass
class _Reservation:
    id: int
    endpoint: Endpoint
    expiry: float
    family: int


class TurnCore:
    """Allocations of one server process. ``secret``: random per process, never sent
    (nonces, reservation tokens and group credentials are derived from it)."""

    def __init__(self, config: TurnConfig, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError("the TURN server secret needs at least 16 bytes")
        self.config = config
        self._secret = secret
        self.credentials = CredentialStore(
            config.realm,
            dict(config.users),
            config.rest_secret.encode("utf-8") if config.rest_secret is not None else None,
            hmac.new(secret, b"relay-group-credentials", hashlib.sha256).digest() if config.relay_groups else None,
        )
        self.nonces = NonceMint(hmac.new(secret, b"nonce", hashlib.sha256).digest())
        self.counters = TurnCounters()
        # Changes whenever a verdict of the per-packet paths may change other than by
        # time passing (a request, an allocation made or removed): the shell's
        # ChannelRoute caches are good for one version.
        self.version = 0
        self._next_id = 1
        self._by_client: dict[ClientRef, _Allocation] = {}
        self._by_id: dict[int, _Allocation] = {}
        self._pending: dict[int, _Pending] = {}
        self._pending_by_client: dict[ClientRef, int] = {}
        self._relayed: dict[Endpoint, _Allocation] = {}
        self._own_ips: set[IPAddress] = set(config.peer_policy.server_ips) | {
            unmap(ep.ip) for ep in config.peer_policy.service_endpoints if not ep.ip.is_unspecified
        }
        self._reservations: dict[bytes, _Reservation] = {}
        self._reservation_ids: dict[int, bytes] = {}
        self._by_user: dict[str, int] = {}
        self._by_source: dict[str, int] = {}
        self._by_group: dict[str, dict[int, _Allocation]] = {}
        self._timers: list[tuple[float, int]] = []
        burst = max(config.bandwidth, 65536)
        self._rate = float(config.bandwidth)
        self._burst = float(burst)
        self._xor_peer_cache: dict[Endpoint, bytes] = {}
        # (IPv4 address as an integer, port) -> its endpoint (interned), for the plain
        # Send indication reader: no address object built per packet.
        self._v4_peers: dict[tuple[int, int], Endpoint] = {}

    # ------------------------------------------------------------------ public surface

    @property
    def live(self) -> int:
        """Allocations alive now (a gauge)."""
        return len(self._by_id)

    def client_of(self, allocation_id: int) -> Optional[ClientRef]:
        alloc = self._by_id.get(allocation_id)
        return alloc.client if alloc is not None else None

    def relayed_of(self, allocation_id: int) -> Optional[Endpoint]:
        alloc = self._by_id.get(allocation_id)
        return alloc.relayed if alloc is not None else None

    def on_client_message(self, data: bytes, client: ClientRef, now: float, wall: float) -> ClientOutcome:
        """A datagram (UDP) or a frame (TCP: a STUN or ChannelData frame) from a client."""
        if data and 0x40 <= data[0] <= 0x7F:
            return self._channel_data_general(data, client, now)
        if data[:2] == b"\x00\x16":
            fast = self._plain_send_indication(data, client, now)
            if fast is not _NOT_PLAIN:
                return fast  # type: ignore[return-value]
        try:
            msg = parse(data)
        except ProtocolError:
            return None
        if msg.classic:
            return None
        if msg.msg_class == MsgClass.INDICATION:
            if msg.method == TurnMethod.SEND:
                return self._send_indication(msg, client, now)
            return None
        if msg.msg_class != MsgClass.REQUEST or msg.method not in _REQUEST_METHODS:
            return None
        return self._request(msg, data, client, now, wall)

    def channel_data_from_client(self, data: bytes, client: ClientRef, now: float) -> Optional[ToPeer]:
        """The per-packet path of ChannelData from a client: what
        :meth:`on_client_message` decides for it (a test compares both), with the
        header read, the permission check and the counting inline."""
        return self.channel_data_handover(data, client, now, False)  # type: ignore[return-value]

    def channel_data_handover(
        self, data: bytes, client: ClientRef, now: float, handover: bool = True
    ) -> Union[ToPeer, Handover, None]:
        """:meth:`channel_data_from_client`, except when the peer is the relayed address
        of another allocation here (of the same IP version): then what that allocation's
        client gets, as :meth:`on_peer_datagram` would make it from this allocation's
        relayed address (a test compares this with the way through the kernel)."""
        alloc = self._by_client.get(client)
        if alloc is None or alloc.expiry <= now:
            return None
        n = len(data)
        if n < 4:
            return None
        channel = alloc.channels.get((data[0] << 8) | data[1])
        length = (data[2] << 8) | data[3]
        if channel is None or not 0 <= n - 4 - length <= 3 or channel[1] < now:
            return None  # no such channel (also: a number out of range), a bad length, or expired
        peer = channel[0]
        perm = alloc.permissions.get(peer.ip)
        target = None
        if perm is None:
            reachable = False
        elif perm[1] == _RELAYED_ONLY:  # _reach_checked, keeping the allocation found
            target = self._relayed.get(peer)
            reachable = target is not None and (alloc.group is None or target.group == alloc.group)
        else:
            reachable = perm[1] == _OPEN or self._reach_checked(alloc, peer, perm[1])
        if not reachable:
            self.counters.permission_drops += 1
            return None
        payload = data[4 : 4 + length]
        if self._rate and not self._spend(alloc, length, now):
            return None
        counters = self.counters
        counters.packets_to_peer += 1
        counters.bytes_to_peer += length
        if handover:
            if target is None:
                target = self._relayed.get(peer)
            if target is not None and target.relayed.ip.version == alloc.relayed.ip.version:
                # on_peer_datagram(target.id, payload, alloc.relayed, now), its lookups inline
                if target.expiry <= now:
                    return None
                source = alloc.relayed
                number = target.channel_of_peer.get(source)
                if number is not None and target.channels[number][1] >= now:
                    out = self._on_channel(target, number, payload, source, now)
                else:
                    out = self.on_peer_datagram(target.id, payload, source, now)
                return None if out is None else _new_tuple(Handover, (target.id, out))
        return _new_tuple(ToPeer, (alloc.id, peer, payload))  # ToPeer(...) without its Python __new__

    def _channel_data_general(self, data: bytes, client: ClientRef, now: float) -> Optional[ToPeer]:
        """ChannelData from a client, step by step through the codec: the reference
        :meth:`channel_data_from_client` must agree with."""
        alloc = self._by_client.get(client)
        if alloc is None or alloc.expiry <= now:
            return None
        try:
            message = parse_channel_data(data)
        except ProtocolError:
            return None
        channel = alloc.channels.get(message.channel)
        if channel is None or channel[1] < now:
            return None
        peer = channel[0]
        if not self._may_reach(alloc, peer, now, channel_ok=True):
            self.counters.permission_drops += 1
            return None
        if self._rate and not self._spend(alloc, len(message.payload), now):
            return None
        self.counters.packets_to_peer += 1
        self.counters.bytes_to_peer += len(message.payload)
        return ToPeer(alloc.id, peer, message.payload)

    def channel_route(
        self, client: ClientRef, number: int, now: float, handover: bool = True
    ) -> Optional[ChannelRoute]:
        """The :class:`ChannelRoute` of ChannelData from ``client`` on channel ``number``
        now, or None when :meth:`channel_data_handover` would drop it or take a way
        without a route (to an allocation without a live channel back: a Data
        indication). Changes nothing; a test compares routes with the handover."""
        alloc = self._by_client.get(client)
        if alloc is None or alloc.expiry <= now:
            return None
        channel = alloc.channels.get(number)
        if channel is None or channel[1] < now:
            return None
        peer = channel[0]
        perm = alloc.permissions.get(peer.ip)
        if perm is None or (perm[1] != _OPEN and not self._reach_checked(alloc, peer, perm[1])):
            return None
        until = min(alloc.expiry, channel[1])
        target = self._relayed.get(peer) if handover else None
        if target is None or target.relayed.ip.version != alloc.relayed.ip.version:
            return _new_tuple(ChannelRoute, (until, alloc, None, alloc.id, peer, 0, False))
        if target.expiry <= now:
            return None
        source = alloc.relayed
        back = target.channel_of_peer.get(source)
        if back is None or target.channels[back][1] < now:
            return None
        perm = target.permissions.get(source.ip)
        if perm is None or (perm[1] != _OPEN and not self._reach_checked(target, source, perm[1])):
            return None
        until = min(until, target.expiry, target.channels[back][1])
        return _new_tuple(ChannelRoute, (until, alloc, target, target.id, peer, back, target.stream))

    def peer_route(self, allocation_id: int, peer: Endpoint, now: float) -> Optional[PeerRoute]:
        """The :class:`PeerRoute` of datagrams from ``peer`` on the relayed socket of
        ``allocation_id`` now. None: :meth:`on_peer_datagram` would drop them (it
        decides). Changes nothing; a test compares routes with it."""
        alloc = self._by_id.get(allocation_id)
        if alloc is None or alloc.expiry <= now:
            return None
        number = alloc.channel_of_peer.get(peer)
        perm = alloc.permissions.get(peer.ip)
        if perm is None or (perm[1] != _OPEN and not self._reach_checked(alloc, peer, perm[1])):
            return None
        if number is not None and alloc.channels[number][1] >= now:
            until = min(alloc.expiry, alloc.channels[number][1])
            return _new_tuple(PeerRoute, (until, alloc, number, alloc.stream, 0xFFFF, peer, b""))
        if perm[0] < now:
            return None
        until = min(alloc.expiry, perm[0])
        xpa = self._v4_xpa(peer) if peer.ip.version == 4 else b""
        return _new_tuple(PeerRoute, (until, alloc, 0, alloc.stream, MAX_DATA_PAYLOAD[peer.ip.version], peer, xpa))

    def send_route(self, client: ClientRef, ip: int, port: int, now: float) -> Optional[tuple[float, object, Endpoint]]:
        """Where a plain Send indication from ``client`` to the IPv4 peer ``ip``:``port``
        goes (:meth:`send_indication_parts`), as :meth:`_relay_send` decides, while it
        holds (``until``, and the core's version): ``(until, sender, peer)``; send the
        payload from the relayed socket of the sender (after :meth:`spend` on it, counted
        with :meth:`count_relayed`). None: it would be dropped (it decides)."""
        peer = self.v4_peer(ip, port)
        alloc = self._by_client.get(client)
        if alloc is None or alloc.expiry <= now or peer.ip.version != alloc.family:
            return None
        perm = alloc.permissions.get(peer.ip)
        if perm is None or perm[0] < now or (perm[1] != _OPEN and not self._reach_checked(alloc, peer, perm[1])):
            return None
        return (min(alloc.expiry, perm[0]), alloc, peer)

    def spend(self, allocation: object, n: int, now: float) -> bool:
        """Take ``n`` bytes from the bandwidth of a route's ``sender`` or ``target``
        (False: over the cap, dropped and counted)."""
        return self._spend(allocation, n, now)  # type: ignore[arg-type]

    def count_relayed(
        self, packets_to_peer: int, bytes_to_peer: int, packets_to_client: int, bytes_to_client: int
    ) -> None:
        """Count what the shell relayed along routes (once per batch of packets)."""
        counters = self.counters
        counters.packets_to_peer += packets_to_peer
        counters.bytes_to_peer += bytes_to_peer
        counters.packets_to_client += packets_to_client
        counters.bytes_to_client += bytes_to_client

    def allocation_made(self, wanted: AllocationWanted, relayed: Endpoint, now: float, wall: float) -> Optional[bytes]:
        """The shell bound ``relayed`` for ``wanted``: the success reply for the client.
        None: the client went away meanwhile; close the sockets registered under
        ``wanted.allocation_id`` and ``wanted.reserve_id``."""
        pending = self._pending.pop(wanted.allocation_id, None)
        if pending is None:
            return None
        self._pending_by_client.pop(pending.client, None)
        aid = wanted.allocation_id
        alloc = _Allocation(aid, pending, relayed, now)
        alloc.tokens = self._burst
        self._by_client[pending.client] = alloc
        self._by_id[aid] = alloc
        self._relayed[relayed] = alloc
        self._own_ips.add(unmap(relayed.ip))
        self.version += 1
        if alloc.group is not None:
            self._by_group.setdefault(alloc.group, {})[aid] = alloc
        heapq.heappush(self._timers, (alloc.expiry, aid))
        self.counters.allocations_total += 1
        attrs: list[Attribute] = [
            XorRelayedAddress(relayed),
            Lifetime(pending.lifetime),
        ]
        if pending.reserve_id is not None:
            token = self._token(pending.reserve_id)
            reserved = Endpoint(relayed.ip, relayed.port + 1)
            self._reservations[token] = _Reservation(pending.reserve_id, reserved, now + RESERVATION_LIFETIME, pending.family)
            self._reservation_ids[pending.reserve_id] = token
            heapq.heappush(self._timers, (now + RESERVATION_LIFETIME, pending.reserve_id))
            attrs.append(ReservationToken(token))
        attrs.append(XorMappedAddress(pending.client.client))
        if pending.dual_refused:
            attrs.append(AddressErrorCode(6, 440, REASONS[440]))
        reply = self._build(MsgClass.SUCCESS, TurnMethod.ALLOCATE, pending.txid, attrs, pending.key, pending.fingerprint)
        alloc.allocate_reply = reply
        return reply

    def allocation_failed(self, wanted: AllocationWanted) -> Optional[bytes]:
        """The shell could not bind: 508 for the client (None: the client went away).
        Either way, close any socket registered under ``wanted.allocation_id`` (a
        reserved one, when ``wanted.reserved`` was set)."""
        pending = self._pending.pop(wanted.allocation_id, None)
        if pending is None:
            return None
        self._pending_by_client.pop(pending.client, None)
        self._release_quota(pending.username, pending.source)
        self.counters.capacity_failures += 1
        return self._error(TurnMethod.ALLOCATE, pending.txid, 508, pending.key, pending.fingerprint)

    def on_peer_datagram(self, allocation_id: int, data: bytes, peer: Endpoint, now: float) -> Optional[bytes]:
        """A datagram from ``peer`` on the relayed socket of ``allocation_id``: the
        ChannelData or Data indication to send to :meth:`client_of` it, or None."""
        alloc = self._by_id.get(allocation_id)
        if alloc is None or alloc.expiry <= now:
            return None
        number = alloc.channel_of_peer.get(peer)
        if number is not None and alloc.channels[number][1] >= now:
            return self._on_channel(alloc, number, data, peer, now)
        if not self._may_reach(alloc, peer, now, channel_ok=False):
            self.counters.permission_drops += 1
            return None
        if len(data) > MAX_DATA_PAYLOAD[peer.ip.version] or (self._rate and not self._spend(alloc, len(data), now)):
            return None
        self.counters.packets_to_client += 1
        self.counters.bytes_to_client += len(data)
        return self.data_indication(alloc, peer, data)

    def _on_channel(self, alloc: _Allocation, number: int, data: bytes, peer: Endpoint, now: float) -> Optional[bytes]:
        """:meth:`on_peer_datagram` for a peer with a live channel: _may_reach
        (channel_ok=True) and encode_channel_data inline (a test compares them)."""
        perm = alloc.permissions.get(peer.ip)
        if perm is None or (perm[1] != _OPEN and not self._reach_checked(alloc, peer, perm[1])):
            self.counters.permission_drops += 1
            return None
        n = len(data)
        if n > 0xFFFF or (self._rate and not self._spend(alloc, n, now)):
            return None  # (a UDP datagram always fits a ChannelData message)
        out = _CHANNEL_HEAD(number, n) + data
        if alloc.stream and n % 4:
            out += bytes(-n % 4)
        counters = self.counters
        counters.packets_to_client += 1
        counters.bytes_to_client += n
        return out

    def get_timer(self) -> Optional[float]:
        """When :meth:`expire` next has something to do (monotonic), or None."""
        return self._timers[0][0] if self._timers else None

    def expire(self, now: float) -> list[int]:
        """Drop what has expired; the ids (allocations and reservations) whose sockets
        the shell must close."""
        closed: list[int] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, aid = heapq.heappop(timers)
            alloc = self._by_id.get(aid)
            if alloc is not None:
                if alloc.expiry > now:
                    if at == alloc.timer_at:  # refreshed meanwhile: one entry for the new time
                        alloc.timer_at = alloc.expiry
                        heapq.heappush(timers, (alloc.expiry, aid))
                    continue
                self._remove(alloc)
                self.counters.allocations_expired += 1
                closed.append(aid)
                continue
            token = self._reservation_ids.get(aid)
            if token is not None and self._reservations[token].expiry <= now:
                del self._reservation_ids[aid]
                del self._reservations[token]
                closed.append(aid)
        return closed

    def client_gone(self, client: ClientRef) -> list[int]:
        """A TCP connection closed: its allocation goes (the ids whose sockets to close)."""
        pid = self._pending_by_client.pop(client, None)
        if pid is not None:
            pending = self._pending.pop(pid)
            self._release_quota(pending.username, pending.source)
        alloc = self._by_client.get(client)
        if alloc is None:
            return []
        self._remove(alloc)
        return [alloc.id]

    def group_grant(self, group_canonical: str, now: float, wall: float) -> Optional[GroupGrant]:
        """Credentials for a ``--relay`` group (None when relaying for groups is off)."""
        secret = self.credentials.relay_secret
        if secret is None:
            return None
        lifetime = self.config.group_credential_lifetime
        username, password = grant_group_credentials(secret, group_canonical, wall, lifetime)
        tag = username.rsplit(":", 1)[1]
        members = self._by_group.get(tag, {})
        relayed = tuple(a.relayed for a in reversed(members.values()) if a.expiry > now)
        return GroupGrant(username, password, lifetime, self.config.realm, relayed)

    # ------------------------------------------------------------------ requests

    def _request(self, msg: StunMessage, data: bytes, client: ClientRef, now: float, wall: float) -> ClientOutcome:
        method = TurnMethod(msg.method)
        auth = self._authenticate(msg, data, client, now, wall)
        if not isinstance(auth, UserKey):
            return auth
        self.version += 1  # whatever it changes (permissions, channels, lifetimes, quotas)
        key = auth.key
        fp = msg.has_fingerprint
        unknown = [
            t for t in (attr_type(a) for a in msg.attributes) if is_comprehension_required(t) and t not in _UNDERSTOOD
        ]
        if unknown:
            self.counters.bad_requests += 1
            attrs: list[Attribute] = [
                ErrorCode(420, REASONS[420]),
                UnknownAttributes(tuple(dict.fromkeys(unknown))),
            ]
            return self._build(MsgClass.ERROR, method, msg.transaction_id, attrs, key, fp)
        if method == TurnMethod.ALLOCATE:
            return self._allocate(msg, client, auth, now)
        alloc = self._by_client.get(client)
        if alloc is None or alloc.expiry <= now:  # expired, not yet swept by expire(): gone
            self.counters.bad_requests += 1
            return self._error(method, msg.transaction_id, 437, key, fp)
        if method == TurnMethod.REFRESH:
            return self._refresh(msg, alloc, now)
        if method == TurnMethod.CREATE_PERMISSION:
            return self._create_permission(msg, alloc, now)
        return self._channel_bind(msg, alloc, now)

    def _authenticate(
        self, msg: StunMessage, data: bytes, client: ClientRef, now: float, wall: float
    ) -> Union[UserKey, bytes, None]:
        """RFC 8489 section 9.2.4, in its order. Replies before the integrity check are
        unauthenticated: they stay within the amplification bound."""
        budget = reply_budget(len(data), self.config.safe_datagram)
        ip = client.client.ip
        if msg.integrity_offset is None:
            self.counters.challenges += 1
            return self._challenge(msg, 401, ip, now, budget)
        username = msg.get(Username)
        realm = msg.get(Realm)
        nonce = msg.get(Nonce)
        if not (isinstance(username, Username) and isinstance(realm, Realm) and isinstance(nonce, Nonce)):
            self.counters.bad_requests += 1
            return self._fit(MsgClass.ERROR, msg, [ErrorCode(400, REASONS[400])], budget)
        if not self.nonces.valid(nonce.text, ip, now):
            self.counters.stale_nonces += 1
            return self._challenge(msg, 438, ip, now, budget)
        alloc = self._by_client.get(client)
        user_key: Optional[UserKey]
        if alloc is not None:
            if username.name != alloc.username:
                self.counters.auth_failures += 1
                return self._fit(MsgClass.ERROR, msg, [ErrorCode(441, REASONS[441])], budget)
            user_key = UserKey(alloc.key, alloc.group)
        else:
            user_key = self.credentials.key_for(username.name, wall)
        if (
            user_key is None
            or realm.text != self.config.realm
            or not integrity_matches(data, msg.integrity_offset, user_key.key)
        ):
            self.counters.auth_failures += 1
            return self._challenge(msg, 401, ip, now, budget)
        return user_key

    def _allocate(self, msg: StunMessage, client: ClientRef, auth: UserKey, now: float) -> ClientOutcome:
        cfg = self.config
        txid = msg.transaction_id
        key = auth.key
        fp = msg.has_fingerprint
        existing = self._by_client.get(client)
        if existing is not None:
            if existing.allocate_txid == txid:
                return existing.allocate_reply  # a retransmission: the same answer
            return self._refuse(TurnMethod.ALLOCATE, txid, 437, key, fp)
        pid = self._pending_by_client.get(client)
        if pid is not None:
            return None if self._pending[pid].txid == txid else self._refuse(TurnMethod.ALLOCATE, txid, 437, key, fp)
        transport = msg.get(RequestedTransport)
        if not isinstance(transport, RequestedTransport):
            return self._refuse(TurnMethod.ALLOCATE, txid, 400, key, fp)
        if transport.protocol != PROTO_UDP:
            return self._refuse(TurnMethod.ALLOCATE, txid, 442, key, fp)
        requested = msg.get(RequestedAddressFamily)
        additional = msg.get(AdditionalAddressFamily)
        token = msg.get(ReservationToken)
        even = msg.get(EvenPort)
        if (
            (token is not None and (even is not None or requested is not None or additional is not None))
            or (requested is not None and additional is not None)
            or (isinstance(additional, AdditionalAddressFamily) and additional.family != 6)
        ):
            return self._refuse(TurnMethod.ALLOCATE, txid, 400, key, fp)
        reservation: Optional[_Reservation] = None
        if isinstance(token, ReservationToken):
            reservation = self._reservations.get(token.token)
            if reservation is None or reservation.expiry < now:
                self.counters.capacity_failures += 1
                return self._error(TurnMethod.ALLOCATE, txid, 508, key, fp)
            family = reservation.family
        else:
            family = requested.family if isinstance(requested, RequestedAddressFamily) else 4
        # ADDITIONAL-ADDRESS-FAMILY asks for IPv4 and IPv6: this server relays one
        # family per allocation, so it gives IPv4 and says 440 for IPv6.
        dual_refused = isinstance(additional, AdditionalAddressFamily)
        if family not in cfg.families:
            return self._refuse(TurnMethod.ALLOCATE, txid, 440, key, fp)
        username = msg.get(Username)
        assert isinstance(username, Username)
        source = endpoint_source_key(client.client)
        if (
            # Reserved ports hold sockets too: they count against the total.
            len(self._by_id) + len(self._pending) + len(self._reservations) >= cfg.max_allocations
            or self._by_user.get(username.name, 0) >= cfg.user_quota
            or self._by_source.get(source, 0) >= cfg.source_quota
        ):
            self.counters.quota_refusals += 1
            return self._error(TurnMethod.ALLOCATE, txid, 486, key, fp)
        lifetime_attr = msg.get(Lifetime)
        lifetime = self._lifetime(lifetime_attr.seconds if isinstance(lifetime_attr, Lifetime) else None)
        reserve_id: Optional[int] = None
        if reservation is not None:
            aid = reservation.id
            del self._reservations[token.token]  # type: ignore[union-attr]
            del self._reservation_ids[aid]
        else:
            aid = self._new_id()
            if isinstance(even, EvenPort) and even.reserve_next:
                reserve_id = self._new_id()
        self._pending[aid] = _Pending(
            client, username.name, key, auth.group, source, family, lifetime, txid, fp, reserve_id, dual_refused
        )
        self._pending_by_client[client] = aid
        self._by_user[username.name] = self._by_user.get(username.name, 0) + 1
        self._by_source[source] = self._by_source.get(source, 0) + 1
        return AllocationWanted(
            aid,
            client,
            family,
            even_port=isinstance(even, EvenPort),
            reserve_id=reserve_id,
            reserved=reservation.endpoint if reservation is not None else None,
        )

    def _refresh(self, msg: StunMessage, alloc: _Allocation, now: float) -> ClientOutcome:
        txid = msg.transaction_id
        fp = msg.has_fingerprint
        requested = msg.get(RequestedAddressFamily)
        if isinstance(requested, RequestedAddressFamily) and requested.family != alloc.family:
            return self._refuse(TurnMethod.REFRESH, txid, 443, alloc.key, fp)
        lifetime_attr = msg.get(Lifetime)
        if isinstance(lifetime_attr, Lifetime) and lifetime_attr.seconds == 0:
            self._remove(alloc)
            reply = self._build(MsgClass.SUCCESS, TurnMethod.REFRESH, txid, [Lifetime(0)], alloc.key, fp)
            return Deallocated(alloc.id, reply)
        lifetime = self._lifetime(lifetime_attr.seconds if isinstance(lifetime_attr, Lifetime) else None)
        alloc.expiry = now + lifetime
        # A later expiry waits for the entry already queued (expire() moves it); only an
        # earlier one needs an entry of its own. Refreshes cannot pile up entries.
        if alloc.expiry < alloc.timer_at:
            alloc.timer_at = alloc.expiry
            heapq.heappush(self._timers, (alloc.expiry, alloc.id))
        return self._build(MsgClass.SUCCESS, TurnMethod.REFRESH, txid, [Lifetime(lifetime)], alloc.key, fp)

    def _create_permission(self, msg: StunMessage, alloc: _Allocation, now: float) -> ClientOutcome:
        txid = msg.transaction_id
        fp = msg.has_fingerprint
        peers = [self._interned(a.endpoint) for a in msg.get_all(XorPeerAddress)]  # type: ignore[union-attr]
        if not peers:
            return self._refuse(TurnMethod.CREATE_PERMISSION, txid, 400, alloc.key, fp)
        modes: list[tuple[IPAddress, int]] = []
        for peer in peers:
            if peer.ip.version != alloc.family:
                return self._refuse(TurnMethod.CREATE_PERMISSION, txid, 443, alloc.key, fp)
            mode = self._permission_mode(alloc, peer)
            if mode is None:
                self.counters.peer_denials += 1
                return self._error(TurnMethod.CREATE_PERMISSION, txid, 403, alloc.key, fp)
            modes.append((peer.ip, mode))
        if not self._room_for_permissions(alloc, [ip for ip, _ in modes], now):
            self.counters.capacity_failures += 1
            return self._error(TurnMethod.CREATE_PERMISSION, txid, 508, alloc.key, fp)
        for ip, mode in modes:
            self._install_permission(alloc, ip, mode, now)
        return self._build(MsgClass.SUCCESS, TurnMethod.CREATE_PERMISSION, txid, [], alloc.key, fp)

    def _channel_bind(self, msg: StunMessage, alloc: _Allocation, now: float) -> ClientOutcome:
        txid = msg.transaction_id
        fp = msg.has_fingerprint
        number_attr = msg.get(ChannelNumber)
        peer_attr = msg.get(XorPeerAddress)
        if not isinstance(number_attr, ChannelNumber) or not isinstance(peer_attr, XorPeerAddress):
            return self._refuse(TurnMethod.CHANNEL_BIND, txid, 400, alloc.key, fp)
        number = number_attr.number
        peer = self._interned(peer_attr.endpoint)
        if not CHANNEL_MIN <= number <= CHANNEL_MAX:
            return self._refuse(TurnMethod.CHANNEL_BIND, txid, 400, alloc.key, fp)
        if peer.ip.version != alloc.family:
            return self._refuse(TurnMethod.CHANNEL_BIND, txid, 443, alloc.key, fp)
        bound = alloc.channels.get(number)
        if bound is not None and bound[1] >= now and bound[0] != peer:
            return self._refuse(TurnMethod.CHANNEL_BIND, txid, 400, alloc.key, fp)
        other = alloc.channel_of_peer.get(peer)
        if other is not None and other != number and alloc.channels[other][1] >= now:
            return self._refuse(TurnMethod.CHANNEL_BIND, txid, 400, alloc.key, fp)
        mode = self._permission_mode(alloc, peer)
        if mode is None:
            self.counters.peer_denials += 1
            return self._error(TurnMethod.CHANNEL_BIND, txid, 403, alloc.key, fp)
        if not self._room_for_permissions(alloc, [peer.ip], now) or not self._room_for_channel(alloc, number, now):
            self.counters.capacity_failures += 1
            return self._error(TurnMethod.CHANNEL_BIND, txid, 508, alloc.key, fp)
        # A rebinding of an expired number or peer replaces the old binding.
        if bound is not None and bound[0] != peer:
            alloc.channel_of_peer.pop(bound[0], None)
        if other is not None and other != number:
            alloc.channels.pop(other, None)
        alloc.channels[number] = [peer, now + self.config.channel_lifetime]
        alloc.channel_of_peer[peer] = number
        self._install_permission(alloc, peer.ip, mode, now)
        return self._build(MsgClass.SUCCESS, TurnMethod.CHANNEL_BIND, txid, [], alloc.key, fp)

    def _plain_send_indication(self, data: bytes, client: ClientRef, now: float) -> object:
        """The per-packet path of a Send indication of the plain shape
        (:meth:`send_indication_parts`). Anything else: :data:`_NOT_PLAIN` (the general
        path decides). Same verdicts as the general path (a test compares them)."""
        parts = self.send_indication_parts(data)
        if parts.__class__ is not tuple:
            return parts
        ip, port, payload = parts  # type: ignore[misc]
        return self._relay_send(client, self.v4_peer(ip, port), payload, now)

    def send_indication_parts(self, data: bytes) -> object:
        """(peer IPv4 address as an integer, peer port, payload) of a Send indication
        that holds XOR-PEER-ADDRESS (IPv4) and DATA once each, and maybe FINGERPRINT
        last, in any order: read without the general parser. None: its FINGERPRINT
        does not match (dropped, as parse() would refuse it). Anything else (another
        shape): :data:`_NOT_PLAIN`, the general path decides."""
        n = len(data)
        if n < 20 or data[4:8] != _COOKIE or ((data[2] << 8) | data[3]) + 20 != n or n % 4:
            return _NOT_PLAIN
        pos = 20
        ip = port = -1
        payload: Optional[bytes] = None
        while pos < n:
            if n - pos < 4:
                return _NOT_PLAIN
            t, length = _ATTR_HEAD(data, pos)
            end = pos + 4 + length
            if end + (-length % 4) > n:
                return _NOT_PLAIN
            if t == 0x0012 and port < 0 and length == 8 and data[pos + 5] == 0x01:
                port, ip = _XPA_V4(data, pos + 6)
                port ^= 0x2112
                ip ^= MAGIC_COOKIE
            elif t == 0x0013 and payload is None:
                payload = data[pos + 4 : end]
            elif t == 0x8028 and length == 4 and end == n:
                # FINGERPRINT last: the header's length already ends with it, so what it
                # covers is the message before it as it is (fingerprint_matches, no copy).
                if (zlib.crc32(data[:pos]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF != _U32(data, pos + 4)[0]:
                    return None  # not STUN after all: what parse() would refuse
            else:
                return _NOT_PLAIN
            pos = end + (-length % 4)
        if port < 0 or payload is None:
            return _NOT_PLAIN
        return (ip, port, payload)

    def v4_peer(self, ip: int, port: int) -> Endpoint:
        """The peer endpoint of an IPv4 address (as an integer) and port, interned."""
        return self._v4_peers.get((ip, port)) or self._learn_v4_peer(ip, port)

    def _learn_v4_peer(self, ip: int, port: int) -> Endpoint:
        if len(self._v4_peers) >= _V4_PEERS_MAX:
            self._v4_peers.clear()
        peer = self._v4_peers[(ip, port)] = self._interned(Endpoint(ipaddress.IPv4Address(ip), port))
        return peer

    def _send_indication(self, msg: StunMessage, client: ClientRef, now: float) -> Optional[ToPeer]:
        peer_attr = msg.get(XorPeerAddress)
        data_attr = msg.get(Data)
        if not isinstance(peer_attr, XorPeerAddress) or not isinstance(data_attr, Data):
            return None
        if any(attr_type(a) == TurnAttr.DONT_FRAGMENT for a in msg.attributes):
            return None  # this relay cannot promise DF; RFC 8656 section 11.2: discard
        return self._relay_send(client, peer_attr.endpoint, data_attr.payload, now)

    def _relay_send(self, client: ClientRef, peer: Endpoint, payload: bytes, now: float) -> Optional[ToPeer]:
        alloc = self._by_client.get(client)
        if alloc is None or alloc.expiry <= now:
            return None
        if peer.ip.version != alloc.family or not self._may_reach(alloc, peer, now, channel_ok=False):
            self.counters.permission_drops += 1
            return None
        if self._rate and not self._spend(alloc, len(payload), now):
            return None
        self.counters.packets_to_peer += 1
        self.counters.bytes_to_peer += len(payload)
        return ToPeer(alloc.id, peer, payload)

    # ------------------------------------------------------------------ peers

    def _interned(self, peer: Endpoint) -> Endpoint:
        """The relayed address of this server equal to ``peer`` when there is one (the
        very object the shell reports as the source of what it relays between
        allocations), else ``peer``: per packet, the permission, channel and relayed
        address tables then find their key by identity, without comparing endpoints."""
        target = self._relayed.get(peer)
        return target.relayed if target is not None else peer

    def _permission_mode(self, alloc: _Allocation, peer: Endpoint) -> Optional[int]:
        """How a permission for ``peer``'s IP is checked per packet, or None: 403."""
        if alloc.group is not None:
            # Group credentials reach only relayed addresses of the same group here.
            target = self._relayed.get(peer)
            return _RELAYED_ONLY if target is not None and target.group == alloc.group else None
        policy = self.config.peer_policy
        ip = unmap(peer.ip)
        if peer in self._relayed:
            if policy.ip_denied(ip) or ip in self._own_ips:
                return _RELAYED_ONLY
            return _NOT_SERVICE
        if policy.is_service(peer, self._own_ips):
            return None
        if ip in self._own_ips or ip.is_loopback:
            # The server's own addresses: only where --allow-peer says, never its services.
            return _NOT_SERVICE if policy.explicitly_allowed(ip) else None
        return None if policy.ip_denied(ip) else _OPEN

    def _may_reach(self, alloc: _Allocation, peer: Endpoint, now: float, *, channel_ok: bool) -> bool:
        """Permission check, per packet, both directions. ``channel_ok``: a live channel
        to this peer stands for its permission."""
        perm = alloc.permissions.get(peer.ip)
        if perm is None or (perm[0] < now and not channel_ok):
            return False
        return perm[1] == _OPEN or self._reach_checked(alloc, peer, perm[1])

    def _reach_checked(self, alloc: _Allocation, peer: Endpoint, mode: int) -> bool:
        """The rest of :meth:`_may_reach` for a permission that is not ``_OPEN``."""
        if mode == _NOT_SERVICE:
            return not self.config.peer_policy.is_service(peer, self._own_ips)
        target = self._relayed.get(peer)
        return target is not None and (alloc.group is None or target.group == alloc.group)

    def _room_for_permissions(self, alloc: _Allocation, ips: list[IPAddress], now: float) -> bool:
        new = {ip for ip in ips if ip not in alloc.permissions}
        if len(alloc.permissions) + len(new) <= MAX_PERMISSIONS:
            return True
        live_channel_ips = {c[0].ip for c in alloc.channels.values() if c[1] >= now}
        for ip in [ip for ip, p in alloc.permissions.items() if p[0] < now and ip not in live_channel_ips]:
            del alloc.permissions[ip]
        return len(alloc.permissions) + len(new) <= MAX_PERMISSIONS

    def _room_for_channel(self, alloc: _Allocation, number: int, now: float) -> bool:
        if number in alloc.channels or len(alloc.channels) < MAX_CHANNELS:
            return True
        for old in [n for n, c in alloc.channels.items() if c[1] < now]:
            alloc.channel_of_peer.pop(alloc.channels.pop(old)[0], None)
        return len(alloc.channels) < MAX_CHANNELS

    def _install_permission(self, alloc: _Allocation, ip: IPAddress, mode: int, now: float) -> None:
        perm = alloc.permissions.get(ip)
        expiry = now + self.config.permission_lifetime
        if perm is None:
            alloc.permissions[ip] = [expiry, mode]
        else:
            perm[0] = expiry
            perm[1] = max(perm[1], mode)  # the stricter check wins

    def _spend(self, alloc: _Allocation, n: int, now: float) -> bool:
        """The allocation's token bucket (both directions share it). The per-packet
        paths call it only when there is a cap (``self._rate and not self._spend(...)``)."""
        if not self._rate:
            return True
        tokens = alloc.tokens
        if now > alloc.bucket_time:
            tokens += (now - alloc.bucket_time) * self._rate
            alloc.bucket_time = now
            if tokens > self._burst:
                tokens = self._burst
        if tokens < n:
            alloc.tokens = tokens
            self.counters.bandwidth_drops += 1
            return False
        alloc.tokens = tokens - n
        return True

    def data_indication(self, alloc: _Allocation, peer: Endpoint, payload: bytes, xpa: bytes = b"") -> bytes:
        """A Data indication built without the general encoder (per packet); byte for
        byte what ``StunMessage.to_wire`` gives (a test compares them). ``xpa``: the
        XOR-PEER-ADDRESS attribute of an IPv4 ``peer`` when the caller has it (a
        route's :attr:`PeerRoute.xpa`)."""
        alloc.txid_counter += 1
        counter = alloc.txid_counter & 0xFFFFFFFFFFFFFFFF
        if xpa:
            pass
        elif peer.ip.version == 4:
            xpa = self._v4_xpa(peer)
        else:
            xpa = self._xor_peer_attr(peer, _TXID(alloc.id & 0xFFFFFFFF, counter))
        n = len(payload)
        pad = -n % 4
        head = _DATA_INDICATION_HEAD(0x0017, len(xpa) + 4 + n + pad, MAGIC_COOKIE, alloc.id & 0xFFFFFFFF, counter)
        return b"".join((head, xpa, _CHANNEL_HEAD(TurnAttr.DATA, n), payload, _PADDING[pad]))

    def _v4_xpa(self, peer: Endpoint) -> bytes:
        """XOR-PEER-ADDRESS of an IPv4 peer (the same in every message: only the magic
        cookie is mixed in), remembered."""
        xpa = self._xor_peer_cache.get(peer)
        if xpa is None:
            if len(self._xor_peer_cache) > 4096:
                self._xor_peer_cache.clear()
            xpa = self._xor_peer_cache[peer] = self._xor_peer_attr(peer, bytes(12))
        return xpa

    @staticmethod
    def _xor_peer_attr(peer: Endpoint, txid: bytes) -> bytes:
        value = encode_xor_address(peer, txid)
        return struct.pack("!HH", TurnAttr.XOR_PEER_ADDRESS, len(value)) + value

    # ------------------------------------------------------------------ bookkeeping

    def _lifetime(self, requested: Optional[int]) -> int:
        """RFC 8656 section 7.2: what the client asks, cut to the maximum, never below
        the default (a Refresh's 0 is decided before this)."""
        cfg = self.config
        if requested is None:
            return cfg.default_lifetime
        return max(cfg.default_lifetime, min(requested, cfg.max_lifetime))

    def _new_id(self) -> int:
        aid = self._next_id
        self._next_id += 1
        return aid

    def _token(self, reserve_id: int) -> bytes:
        return hmac.new(self._secret, b"reservation" + reserve_id.to_bytes(8, "big"), hashlib.sha256).digest()[:8]

    def _release_quota(self, username: str, source: str) -> None:
        for table, k in ((self._by_user, username), (self._by_source, source)):
            n = table.get(k, 0) - 1
            if n > 0:
                table[k] = n
            else:
                table.pop(k, None)

    def _remove(self, alloc: _Allocation) -> None:
        self.version += 1
        self._by_id.pop(alloc.id, None)
        if self._by_client.get(alloc.client) is alloc:
            del self._by_client[alloc.client]
        if self._relayed.get(alloc.relayed) is alloc:
            del self._relayed[alloc.relayed]
        if alloc.group is not None:
            members = self._by_group.get(alloc.group)
            if members is not None:
                members.pop(alloc.id, None)
                if not members:
                    del self._by_group[alloc.group]
        self._release_quota(alloc.username, alloc.source)

    # ------------------------------------------------------------------ replies

    def _build(
        self,
        cls: MsgClass,
        method: int,
        txid: bytes,
        attrs: list[Attribute],
        key: Optional[bytes],
        fingerprint: bool,
    ) -> bytes:
        return StunMessage(cls, method, txid, tuple(attrs)).to_wire(integrity_key=key, fingerprint=fingerprint)

    def _error(self, method: int, txid: bytes, code: int, key: bytes, fingerprint: bool) -> bytes:
        return self._build(MsgClass.ERROR, method, txid, [ErrorCode(code, REASONS[code])], key, fingerprint)

    def _refuse(self, method: int, txid: bytes, code: int, key: bytes, fingerprint: bool) -> bytes:
        """An error for a malformed or mismatched authenticated request (counted)."""
        self.counters.bad_requests += 1
        return self._error(method, txid, code, key, fingerprint)

    def _challenge(self, msg: StunMessage, code: int, ip: IPAddress, now: float, budget: int) -> Optional[bytes]:
        attrs: list[Attribute] = [
            ErrorCode(code, REASONS[code]),
            Realm(self.config.realm),
            Nonce(self.nonces.make(ip, now)),
        ]
        return self._fit(MsgClass.ERROR, msg, attrs, budget)

    def _fit(self, cls: MsgClass, msg: StunMessage, attrs: list[Attribute], budget: int) -> Optional[bytes]:
        """An unauthenticated reply within ``budget`` bytes (FINGERPRINT goes first)."""
        for fingerprint in ((True, False) if msg.has_fingerprint else (False,)):
            out = self._build(cls, msg.method, msg.transaction_id, attrs, None, fingerprint)
            if len(out) <= budget:
                return out
        return None
