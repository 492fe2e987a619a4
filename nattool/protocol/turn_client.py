"""A TURN client (RFC 8656, RFC 8489 long-term credentials) as a pure state machine.

One allocation at one server, with the aioquic shape: bytes from the server and the
time come in, messages for the server and typed events go out::

    client = TurnClient(server, credentials, seed, now)   # Allocate is queued at once
    client.receive_datagram(data, now)     # anything the server sent (STUN or ChannelData)
    client.handle_timer(now)               # when get_timer() says
    client.datagrams_to_send(now)          # -> [bytes], all for the server
    client.next_event()                    # -> Allocated | AllocationFailed | PeerData | ...

What it does: Allocate (an unauthenticated first try, then again with the REALM and
NONCE of the 401), a new NONCE on 438 (stale nonce) and the request again, Refresh well
before the lifetime runs out, CreatePermission for each peer before its first datagram
and again every PERMISSION_REFRESH s (the server forgets one after 300 s), Send
indications out and Data indications in. Channels are not used: one Send indication
per datagram costs 36 bytes more than ChannelData and needs no extra state.

Transaction ids come from ``seed`` (random bytes from the owner) through SHA-256 with a
counter: unpredictable to an off-path attacker, reproducible in a test. Over a stream
(``reliable=True``, TURN over TCP) requests are sent once; over UDP they are sent again
on the retransmission schedule of :mod:`nattool.protocol.retransmit`.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, Union

from nattool.errors import ProtocolError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.retransmit import backoff_schedule
from nattool.protocol.stun import (
    ErrorCode,
    MsgClass,
    Nonce,
    Realm,
    StunMessage,
    Username,
    XorMappedAddress,
    integrity_matches,
    long_term_key,
    parse,
)
from nattool.protocol.turn import (
    PROTO_UDP,
    Data,
    Lifetime,
    RequestedAddressFamily,
    RequestedTransport,
    TurnError,
    TurnMethod,
    XorPeerAddress,
    XorRelayedAddress,
    is_turn_message,
)

REQUEST_TIMEOUT = 5.0  # s for a request, retransmissions included (UDP)
REQUEST_RETRIES = 5
PERMISSION_REFRESH = 240.0  # s; a permission lives 300 s on the server
REFRESH_MARGIN = 60.0  # s before the lifetime runs out that Refresh goes
MAX_NONCE_RETRIES = 3  # 438 answers in a row for one request before giving up


@dataclass(frozen=True, slots=True)
class TurnCredentials:
    username: str
    password: str
    realm: str = ""  # a hint; the server's 401 says which realm counts
    lifetime: Optional[int] = None  # s to ask for (None: the server's default)


class TurnState(str, Enum):
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    FAILED = "failed"
    CLOSED = "closed"


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Allocated:
    relayed: Endpoint  # where peers send to reach us
    mapped: Optional[Endpoint]  # our endpoint as the server saw it
    lifetime: int  # s


@dataclass(frozen=True, slots=True)
class AllocationFailed:
    """The allocation could not be made, or was lost (a Refresh failed, or no answer)."""

    code: Optional[int]  # the server's error code; None: no answer
    reason: str


@dataclass(frozen=True, slots=True)
class PermissionFailed:
    peer: Endpoint
    code: Optional[int]
    reason: str


@dataclass(frozen=True, slots=True)
class PeerData:
    """A datagram a peer sent to our relayed endpoint (a Data indication)."""

    peer: Endpoint
    data: bytes


TurnEvent = Union[Allocated, AllocationFailed, PermissionFailed, PeerData]


# --------------------------------------------------------------------------- state


@dataclass
class _Transaction:
    method: TurnMethod
    payload: bytes
    waits: list[float]
    next_send: float
    peer: Optional[Endpoint] = None  # CreatePermission: the peer it is for
    lifetime: Optional[int] = None  # Refresh: the lifetime asked for
    attempt: int = 0
    nonce_retries: int = 0


@dataclass
class _Permission:
    peer: Endpoint
    installed: bool = False
    refresh_at: float = 0.0
    pending: bool = False


@dataclass
class _Auth:
    realm: str
    nonce: str
    key: bytes = field(repr=False)


class TurnClient:
    """One allocation at ``server``. ``seed`` is random bytes from the owner (8 or more)."""

    def __init__(self, server: Endpoint, credentials: TurnCredentials, seed: bytes, now: float, *,
                 reliable: bool = False, family: Optional[int] = None) -> None:
        self.server = server
        self.credentials = credentials
        self.reliable = reliable
        self.family = family  # 4 or 6: REQUESTED-ADDRESS-FAMILY (None: the server's choice)
        self.state = TurnState.ALLOCATING
        self.relayed: Optional[Endpoint] = None
        self.mapped: Optional[Endpoint] = None
        self.expires_at: Optional[float] = None
        self.counters = {"junk": 0, "bad_integrity": 0, "not_allocated": 0}
        self._seed = bytes(seed)
        self._txn_counter = 0
        self._auth: Optional[_Auth] = None
        self._transactions: dict[bytes, _Transaction] = {}
        self._permissions: dict[Endpoint, _Permission] = {}  # keyed by peer IP (port 0)
        self._refresh_at: Optional[float] = None
        self._out: list[bytes] = []
        self._events: deque[TurnEvent] = deque()
        self._request(TurnMethod.ALLOCATE, now)

    # -- the sans-I/O interface --------------------------------------------------------

    def receive_datagram(self, data: bytes, now: float) -> None:
        """A message from the server (over UDP, or one frame of the stream)."""
        if self.state in (TurnState.FAILED, TurnState.CLOSED) or not is_turn_message(data):
            self.counters["junk"] += 1
            return
        try:
            msg = parse(data)
        except ProtocolError:
            self.counters["junk"] += 1
            return
        if msg.msg_class == MsgClass.INDICATION:
            self._on_indication(msg)
            return
        txn = self._transactions.get(msg.transaction_id)
        if txn is None or msg.method != txn.method or msg.msg_class == MsgClass.REQUEST:
            self.counters["junk"] += 1  # a late answer to a retransmission, or a stranger
            return
        if msg.msg_class == MsgClass.SUCCESS:
            # A success must prove the server knows our key: else anyone on the path
            # could hand us a relayed address of their choosing.
            if self._auth is None or not integrity_matches(data, msg.integrity_offset, self._auth.key):
                self.counters["bad_integrity"] += 1
                return
            del self._transactions[msg.transaction_id]
            self._on_success(txn, msg, now)
        else:
            del self._transactions[msg.transaction_id]
            self._on_error(txn, msg, now)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        self._tick(now)
        out, self._out = self._out, []
        return out

    def get_timer(self) -> Optional[float]:
        if self.state in (TurnState.FAILED, TurnState.CLOSED):
            return None
        times = [t.next_send for t in self._transactions.values()]
        if self._refresh_at is not None:
            times.append(self._refresh_at)
        if self.allocated:
            times.extend(p.refresh_at for p in self._permissions.values() if not p.pending)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._tick(now)

    def next_event(self) -> Optional[TurnEvent]:
        return self._events.popleft() if self._events else None

    # -- what the owner asks ------------------------------------------------------------

    @property
    def allocated(self) -> bool:
        return self.state == TurnState.ALLOCATED

    def permit(self, peer: Endpoint, now: float) -> None:
        """Make sure the server lets ``peer`` (its IP: permissions ignore the port)
        send to our relayed endpoint; kept fresh from now on."""
        key = Endpoint(peer.ip, 0)
        if key not in self._permissions:
            self._permissions[key] = _Permission(peer, refresh_at=now)
            self._tick(now)  # its CreatePermission goes before anything sent to the peer

    def send(self, peer: Endpoint, data: bytes, now: float) -> bool:
        """A datagram for ``peer`` through the relay (a Send indication). False when
        there is no allocation (yet): nothing is sent."""
        if not self.allocated:
            self.counters["not_allocated"] += 1
            return False
        self.permit(peer, now)
        msg = StunMessage(MsgClass.INDICATION, TurnMethod.SEND, self._next_txid(),
                          (XorPeerAddress(peer), Data(bytes(data))))
        self._out.append(msg.to_wire())
        return True

    def close(self, now: float) -> None:
        """Give the allocation back (a Refresh with lifetime 0, sent once, not awaited)."""
        if self.allocated and self._auth is not None:
            txid = self._next_txid()
            self._out.append(self._encode(TurnMethod.REFRESH, txid, (Lifetime(0),)))
        self.state = TurnState.CLOSED
        self._transactions.clear()

    # -- requests ----------------------------------------------------------------------

    def _next_txid(self) -> bytes:
        self._txn_counter += 1
        return hashlib.sha256(self._seed + self._txn_counter.to_bytes(8, "big")).digest()[:12]

    def _encode(self, method: TurnMethod, txid: bytes, attrs: tuple[object, ...]) -> bytes:
        if self._auth is None:
            return StunMessage(MsgClass.REQUEST, method, txid, attrs).to_wire()  # type: ignore[arg-type]
        auth = (Username(self.credentials.username), Realm(self._auth.realm), Nonce(self._auth.nonce))
        msg = StunMessage(MsgClass.REQUEST, method, txid, (*attrs, *auth))  # type: ignore[arg-type]
        return msg.to_wire(integrity_key=self._auth.key)

    def _attrs(self, method: TurnMethod, peer: Optional[Endpoint], lifetime: Optional[int]) -> tuple[object, ...]:
        if method == TurnMethod.ALLOCATE:
            attrs: list[object] = [RequestedTransport(PROTO_UDP)]
            if self.family is not None:
                attrs.append(RequestedAddressFamily(self.family))
            if self.credentials.lifetime is not None:
                attrs.append(Lifetime(self.credentials.lifetime))
            return tuple(attrs)
        if method == TurnMethod.REFRESH:
            return (Lifetime(lifetime),) if lifetime is not None else ()
        assert peer is not None
        return (XorPeerAddress(peer),)

    def _request(self, method: TurnMethod, now: float, *, peer: Optional[Endpoint] = None,
                 lifetime: Optional[int] = None, nonce_retries: int = 0) -> None:
        txid = self._next_txid()
        payload = self._encode(method, txid, self._attrs(method, peer, lifetime))
        waits = [REQUEST_TIMEOUT] if self.reliable else backoff_schedule(REQUEST_TIMEOUT, REQUEST_RETRIES)
        self._transactions[txid] = _Transaction(method, payload, waits, now, peer, lifetime,
                                                nonce_retries=nonce_retries)

    def _again(self, txn: _Transaction, now: float, nonce_retries: int = 0) -> None:
        """The same request anew (new transaction id), e.g. with credentials or a fresh nonce."""
        self._request(txn.method, now, peer=txn.peer, lifetime=txn.lifetime, nonce_retries=nonce_retries)

    def _create_permission(self, perm: _Permission, now: float) -> None:
        perm.pending = True
        self._request(TurnMethod.CREATE_PERMISSION, now, peer=perm.peer)

    def _tick(self, now: float) -> None:
        if self.state in (TurnState.FAILED, TurnState.CLOSED):
            return
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            self._request(TurnMethod.REFRESH, now, lifetime=self.credentials.lifetime)
        if self.allocated:
            for perm in self._permissions.values():
                if not perm.pending and now >= perm.refresh_at:
                    self._create_permission(perm, now)
        for txid, txn in list(self._transactions.items()):
            if now < txn.next_send:
                continue
            if txn.attempt < len(txn.waits):
                self._out.append(txn.payload)
                txn.next_send = now + txn.waits[txn.attempt]
                txn.attempt += 1
            else:
                del self._transactions[txid]
                self._on_timeout(txn, now)
                if self.state == TurnState.FAILED:
                    return

    # -- answers -----------------------------------------------------------------------

    def _on_timeout(self, txn: _Transaction, now: float) -> None:
        if txn.method in (TurnMethod.ALLOCATE, TurnMethod.REFRESH):
            self._fail(None, f"no answer from the TURN server {self.server} to {txn.method.name}")
        elif txn.peer is not None:
            perm = self._permissions.get(Endpoint(txn.peer.ip, 0))
            if perm is not None:
                perm.pending = False
                perm.refresh_at = now  # try again at once: a lost request is no refusal
                if not perm.installed:
                    self._events.append(PermissionFailed(txn.peer, None, "no answer"))

    def _on_success(self, txn: _Transaction, msg: StunMessage, now: float) -> None:
        if txn.method == TurnMethod.ALLOCATE:
            relayed = msg.get(XorRelayedAddress)
            if not isinstance(relayed, XorRelayedAddress):
                self._fail(None, "the TURN server's Allocate answer has no relayed address")
                return
            self.relayed = relayed.endpoint
            self.mapped = msg.endpoint_of(XorMappedAddress)
            lifetime = self._schedule_refresh(msg, now)
            self.state = TurnState.ALLOCATED
            self._events.append(Allocated(self.relayed, self.mapped, lifetime))
            self._tick(now)  # the permissions asked for meanwhile
        elif txn.method == TurnMethod.REFRESH:
            self._schedule_refresh(msg, now)
        elif txn.peer is not None:
            perm = self._permissions.get(Endpoint(txn.peer.ip, 0))
            if perm is not None:
                perm.installed = True
                perm.pending = False
                perm.refresh_at = now + PERMISSION_REFRESH

    def _schedule_refresh(self, msg: StunMessage, now: float) -> int:
        attr = msg.get(Lifetime)
        lifetime = attr.seconds if isinstance(attr, Lifetime) else 600
        self.expires_at = now + lifetime
        self._refresh_at = now + max(lifetime - REFRESH_MARGIN, lifetime / 2)
        return lifetime

    def _on_error(self, txn: _Transaction, msg: StunMessage, now: float) -> None:
        err = msg.get(ErrorCode)
        code = err.code if isinstance(err, ErrorCode) else None
        reason = err.reason if isinstance(err, ErrorCode) else "no ERROR-CODE"
        realm, nonce = msg.get(Realm), msg.get(Nonce)
        if code == TurnError.UNAUTHENTICATED and self._auth is None and isinstance(realm, Realm) and isinstance(nonce, Nonce):
            # The first exchange of every long-term session: now we know realm and nonce.
            key = long_term_key(self.credentials.username, realm.text, self.credentials.password)
            self._auth = _Auth(realm.text, nonce.text, key)
            self._again(txn, now)
            return
        if code == TurnError.STALE_NONCE and self._auth is not None and isinstance(nonce, Nonce):
            if txn.nonce_retries < MAX_NONCE_RETRIES:
                if isinstance(realm, Realm) and realm.text != self._auth.realm:
                    self._auth.key = long_term_key(self.credentials.username, realm.text, self.credentials.password)
                    self._auth.realm = realm.text
                self._auth.nonce = nonce.text
                self._again(txn, now, txn.nonce_retries + 1)
                return
        why = f"{code} {reason}".strip() if code is not None else reason
        if txn.method == TurnMethod.ALLOCATE:
            self._fail(code, f"the TURN server refused the allocation: {why}")
        elif txn.method == TurnMethod.REFRESH:
            self._fail(code, f"the TURN server refused to refresh the allocation: {why}")
        elif txn.peer is not None:
            perm = self._permissions.get(Endpoint(txn.peer.ip, 0))
            if perm is not None:
                perm.pending = False
                perm.refresh_at = now + PERMISSION_REFRESH  # ask again later, not in a loop
            self._events.append(PermissionFailed(txn.peer, code, why))

    def _on_indication(self, msg: StunMessage) -> None:
        if msg.method != TurnMethod.DATA or not self.allocated:
            self.counters["junk"] += 1
            return
        peer, data = msg.get(XorPeerAddress), msg.get(Data)
        if not isinstance(peer, XorPeerAddress) or not isinstance(data, Data):
            self.counters["junk"] += 1
            return
        self._events.append(PeerData(peer.endpoint, data.payload))

    def _fail(self, code: Optional[int], reason: str) -> None:
        self.state = TurnState.FAILED
        self._transactions.clear()
        self._refresh_at = None
        self._events.append(AllocationFailed(code, reason))


__all__ = [
    "Allocated",
    "AllocationFailed",
    "PeerData",
    "PermissionFailed",
    "TurnClient",
    "TurnCredentials",
    "TurnEvent",
    "TurnState",
]
