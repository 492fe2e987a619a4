"""Peer-to-peer messages of `nattool connect`: format and authentication. Pure.

Two members of a group talk over the same UDP socket they registered from. Their
datagrams must be told apart from tracker replies, STUN and random junk, and a
stranger who knows an endpoint but not the group must not be able to make a member
accept anything. So every message is::

    magic "NtC1" (4) | kind (1) | sender (8) | seq (8) | echo (8) | body (0..MAX_BODY) | mac (16)

- ``sender``: a random id per process run (a session id, not the member's identity);
- ``seq``: strictly increasing per sender, one per datagram sent, so a receiver keeps a
  sliding replay window per sender (:class:`ReplayGuard`);
- ``echo``: the ping's ``seq`` in a pong, the message id in DATA and ACK;
- ``mac``: HMAC-SHA256 over everything before it, truncated to 16 bytes, keyed with
  :func:`derive_key` (HKDF-SHA256 of the canonical group name).

The key is only as secret as the group name: the trackers see it, and so does anyone
the members told. It keeps strangers, scanners and reflected junk out; it is not
end-to-end encryption (bodies travel in clear).

The magic's first byte 'N' (0x4E) has ``01`` as its top two bits, so a peer message is
never taken for STUN (top bits ``00``) nor for a text request (``//``).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntEnum

from nattool.errors import ProtocolError
from nattool.protocol.text import canonical_group

MAGIC = b"NtC1"
SENDER_LEN = 8
MAC_LEN = 16
_HEAD = struct.Struct("!4sB8sQQ")
HEADER_LEN = _HEAD.size  # 29
MIN_LEN = HEADER_LEN + MAC_LEN  # 45
#: Keeps every message inside one safe datagram (1200 bytes), as the tracker's replies.
MAX_BODY = 1200 - MIN_LEN
MAX_SEQ = 2**64 - 1

_KDF_SALT = b"nattool-connect v1"
_KDF_INFO = b"peer message mac"


class Kind(IntEnum):
    PING = 1  # "are you there on this path?"; answered by a PONG to the ping's source
    PONG = 2  # echo = the ping's seq; body = the ping's source endpoint as text
    DATA = 3  # one chat line (UTF-8); echo = message id
    ACK = 4  # echo = the DATA's message id
    BYE = 5  # the sender leaves: its paths are down now, not after --dead-after


class NotPeerMessage(ProtocolError):
    """Bytes without our magic: somebody else's protocol, or junk. Drop silently."""


class BadMac(ProtocolError):
    """Our magic but a wrong MAC: another group, a stranger, or corruption. Drop, count."""


def derive_key(group: str) -> bytes:
    """The group's 32-byte MAC key: HKDF-SHA256 (RFC 5869) of the canonical group name,
    so that ``46D0F69E-…`` and ``46d0f69e-…`` (the same UUID) give the same key."""
    ikm = canonical_group(group).encode("ascii")
    prk = hmac.new(_KDF_SALT, ikm, hashlib.sha256).digest()
    return hmac.new(prk, _KDF_INFO + b"\x01", hashlib.sha256).digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:MAC_LEN]


@dataclass(frozen=True, slots=True)
class PeerMessage:
    kind: Kind
    sender: bytes
    seq: int
    echo: int = 0
    body: bytes = b""

    def __post_init__(self) -> None:
        if len(self.sender) != SENDER_LEN:
            raise ProtocolError(f"sender id must be {SENDER_LEN} bytes")
        if not (0 <= self.seq <= MAX_SEQ and 0 <= self.echo <= MAX_SEQ):
            raise ProtocolError("seq/echo out of range")
        if len(self.body) > MAX_BODY:
            raise ProtocolError(f"body over {MAX_BODY} bytes")

    def to_wire(self, key: bytes) -> bytes:
        head = _HEAD.pack(MAGIC, int(self.kind), self.sender, self.seq, self.echo) + self.body
        return head + _mac(key, head)

    @classmethod
    def from_wire(cls, data: bytes, key: bytes) -> "PeerMessage":
        """Check magic, size and MAC, then parse. The MAC is checked before anything
        else is believed, and compared in constant time."""
        if not is_peer_message(data):
            raise NotPeerMessage("not a peer message")
        if len(data) < MIN_LEN or len(data) > MIN_LEN + MAX_BODY:
            raise BadMac("peer message of impossible size")
        signed, tag = data[:-MAC_LEN], data[-MAC_LEN:]
        if not hmac.compare_digest(_mac(key, signed), tag):
            raise BadMac("bad MAC (another group, or a stranger)")
        _, kind, sender, seq, echo = _HEAD.unpack_from(signed)
        try:
            kind_enum = Kind(kind)
        except ValueError:
            # Authentic but from a newer version: not an attack, but not ours to act on.
            raise ProtocolError(f"unknown peer message kind {kind}") from None
        return cls(kind_enum, sender, seq, echo, signed[HEADER_LEN:])


def is_peer_message(data: bytes) -> bool:
    return data[:4] == MAGIC


class ReplayWindow:
    """Anti-replay sliding window (as IPsec/DTLS): accepts each number once, and none
    more than ``size`` below the highest seen."""

    __slots__ = ("size", "top", "bits")

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.top = 0  # highest number accepted; 0 = none yet (numbers start at 1)
        self.bits = 0  # bit i set: number top - i was accepted

    def check(self, n: int) -> bool:
        if n <= 0:
            return False
        if n > self.top:
            return True
        offset = self.top - n
        return offset < self.size and not (self.bits >> offset) & 1

    def accept(self, n: int) -> bool:
        """Record ``n``; False (and nothing recorded) if it is a replay or too old."""
        if not self.check(n):
            return False
        if n > self.top:
            shift = n - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.top = n
        else:
            self.bits |= 1 << (self.top - n)
        return True


class ReplayGuard:
    """One :class:`ReplayWindow` per sender, bounded: the least recently heard sender is
    forgotten first (only authenticated messages ever reach it, so a stranger cannot
    flush it)."""

    def __init__(self, max_senders: int = 256, size: int = 64) -> None:
        self.max_senders = max_senders
        self.size = size
        self._windows: OrderedDict[bytes, ReplayWindow] = OrderedDict()
        self.replays = 0

    def accept(self, sender: bytes, seq: int) -> bool:
        window = self._windows.get(sender)
        if window is None:
            window = self._windows[sender] = ReplayWindow(self.size)
            while len(self._windows) > self.max_senders:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(sender)
        if window.accept(seq):
            return True
        self.replays += 1
        return False


__all__ = [
    "BadMac",
    "Kind",
    "MAGIC",
    "MAX_BODY",
    "NotPeerMessage",
    "PeerMessage",
    "ReplayGuard",
    "ReplayWindow",
    "derive_key",
    "is_peer_message",
]
