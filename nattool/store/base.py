"""The one interface every store fills.

The tracker hands a store *batches* of registrations (everything that arrived in one
event-loop turn) so that a durable store can commit them in one transaction and a
remote store can do them in one round trip. The store owns the soft-state rules
that need the whole data set: TTL expiry, replacement by identity, and the caps
that keep a flood of registrations from exhausting the server.
"""

from __future__ import annotations

import abc
import sys
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

from nattool.errors import LimitError, NattoolError, StoreError
from nattool.protocol.endpoint import Endpoint

DEFAULT_TTL = 120.0


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Caps that bound the state one tracker keeps."""

    ttl: float = DEFAULT_TTL
    # A full group evicts its least recently seen member: refusing newcomers would
    # let anyone lock a group by filling it, while evicted members come back at
    # their next re-registration.
    max_members_per_group: int = 1024
    # Distinct groups one source (IPv4 address or IPv6 /64) may have live members in.
    max_groups_per_source: int = 64
    # Live members in the whole store (about 500 bytes each in memory).
    max_members: int = 1_000_000
    max_trackers: int = 64


class _MemberFields(NamedTuple):
    group: str  # canonical group key (see protocol.text.canonical_group)
    identity: str  # canonical MAC, or the endpoint text when the node gave none
    endpoint_text: str  # where peers reach it, as the wire writes it
    lan_text: str  # LAN addresses it published, comma-separated as on the wire ("": none)
    source: str  # source_key() of the registering host: the "same public IP" test
    seen: float  # wall-clock seconds (time.time()) of the latest registration


class Member(_MemberFields):
    """One registration inside a group: an immutable record.

    A named tuple rather than a frozen dataclass: a tracker creates one per
    registration and keeps up to a million, and a tuple is built several times
    faster and is no larger. The endpoint is kept as its wire text (which every
    reply needs anyway) and parsed into an :class:`Endpoint` only when asked; group
    keys and sources are interned, as many members share them; the LAN list is kept
    as its wire text too (a tuple of strings would cost 56 bytes more per member).
    The registration fast path (TrackerCore.on_register_v4) builds the tuple
    directly, with the same interning, to spare a call per registration.
    """

    __slots__ = ()

    def __new__(
        cls,
        group: str,
        identity: str,
        endpoint: "Endpoint | str",
        lan: "tuple[str, ...] | str",
        source: str,
        seen: float,
    ) -> "Member":
        text = endpoint if isinstance(endpoint, str) else endpoint.to_text()
        lan_text = lan if isinstance(lan, str) else ",".join(lan)
        return tuple.__new__(cls, (sys.intern(group), identity, text, lan_text, sys.intern(source), seen))

    @property
    def lan(self) -> tuple[str, ...]:
        return tuple(self.lan_text.split(",")) if self.lan_text else ()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint.from_text(self.endpoint_text)


# Member fields by position, as C-level getters for map() on hot paths.
ENDPOINT_TEXT_OF = itemgetter(Member._fields.index("endpoint_text"))
SOURCE_OF = itemgetter(Member._fields.index("source"))
SEEN_OF = itemgetter(Member._fields.index("seen"))


class Registration(NamedTuple):
    """A member to upsert and the slice of its group's list the reply wants."""

    member: Member
    # Members of the group, other than the requester, to skip (newest first): the
    # paging extension. The requester's own entry is always included.
    offset: int = 0
    limit: int = 128


class GroupView(NamedTuple):
    """The answer to one registration: the requester's entry and a page of others."""

    me: Member
    others: tuple[Member, ...]  # newest first, after `offset`, at most `limit`
    total_others: int  # live others in the group, for paging


RegisterResult = Union[GroupView, NattoolError]


# What the keepalive lane found, as data (the tracker decides what a reply shows):
# (others, lines, same_source).
# - others: the group's other live members, newest first; None only when ``lines``
#   is given and ``same_source`` is 0 (the lines then say all about them but their
#   LAN lists);
# - lines: their endpoint texts, one a line ("" for none), when the store holds them
#   ready (every member of the group live); else None;
# - same_source: how many of the group's other members (live or not yet swept)
#   registered from the member's source.
# A plain tuple: it is built once per keepalive, and a NamedTuple instance costs
# about five times as much to build.
LaneAnswer = Tuple[Optional[List[Member]], Optional[str], int]


# (group, identity, endpoint_text, lan_text, source, now) -> LaneAnswer, or None
KeepaliveLane = Callable[[str, str, str, str, str, float], "LaneAnswer | None"]


@dataclass(frozen=True, slots=True)
class TrackerRecord:
    endpoint: Endpoint
    expires: float  # wall-clock seconds


@dataclass(frozen=True, slots=True)
class StoreStats:
    groups: int
    members: int
    trackers: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Store(abc.ABC):
    """State of a tracker. All times are wall-clock seconds passed in by the caller."""

    #: short name for banners and metrics ("memory", "sqlite", "redis")
    kind: str = "abstract"
    #: other processes write to the same state (redis; sqlite under serve --workers):
    #: the server then re-reads the tracker list from the store periodically
    shared: bool = False

    def __init__(self, limits: StoreLimits) -> None:
        self.limits = limits

    def describe(self) -> str:
        """Human description for the startup banner (e.g. the SQLite path)."""
        return self.kind

    async def open(self) -> None:
        """Connect, create or migrate; raise StoreError with a way out on failure."""

    async def close(self) -> None:
        """Flush what is pending and release resources."""

    #: register_now() works: the store can answer a batch without waiting on I/O
    #: it does not own (memory, sqlite), so the server answers within the same
    #: event-loop wake-up that read the datagrams
    supports_sync: bool = False

    #: register() hands back the same ``others`` tuple when a member's page has not
    #: changed (a single Redis; known once open), so the server keeps the replies
    #: it built from them (nattool/net/reply_memo.py)
    repeats_views: bool = False

    def register_now(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        """:meth:`register`, synchronously; only where ``supports_sync``."""
        raise NotImplementedError

    def keepalive_lane(self) -> KeepaliveLane | None:
        """The store's fast lane for keepalives, or None where it has none.

        A keepalive is a known member registering again from the same source: the
        bulk of a tracker's traffic. The lane is called as ``lane(group, identity,
        endpoint_text, lan_text, source, now)``. When the member is known from that
        source, in a small group, it moves the member to the newest end with its new
        endpoint, LAN list and time, and returns a :data:`LaneAnswer` about the
        group's other live members, newest first: what :meth:`register` would list.
        In every other case it changes nothing and returns None, and the
        registration takes :meth:`register`. What the lane changed is durable only
        after :meth:`commit_now`; no reply may go out before.
        """
        return None

    def commit_now(self) -> StoreError | None:
        """Make what the keepalive lane changed since the last call durable; the
        error instead of raising it. Its caller refuses those keepalives then (the
        index keeps them: soft state, re-sent within the TTL)."""
        return None

    @abc.abstractmethod
    async def register(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        """Upsert every member of the batch, in order, and return for each one its
        group view after its own upsert, or the error that refused it
        (LimitError, StoreError). When this returns, the batch is as durable as the
        store can make it: a reply may be sent."""

    @abc.abstractmethod
    async def expire(self, now: float) -> int:
        """Drop members not seen for the TTL; return how many went. Bounded work."""

    @abc.abstractmethod
    async def save_tracker(self, record: TrackerRecord) -> None:
        """Insert or refresh a verified tracker."""

    @abc.abstractmethod
    async def drop_tracker(self, endpoint: Endpoint) -> None: ...

    @abc.abstractmethod
    async def load_trackers(self, now: float) -> list[TrackerRecord]:
        """Unexpired trackers, soonest to expire last."""

    @abc.abstractmethod
    async def stats(self) -> StoreStats: ...


__all__ = [
    "DEFAULT_TTL",
    "ENDPOINT_TEXT_OF",
    "SEEN_OF",
    "SOURCE_OF",
    "GroupView",
    "KeepaliveLane",
    "LaneAnswer",
    "LimitError",
    "Member",
    "Registration",
    "RegisterResult",
    "Store",
    "StoreError",
    "StoreLimits",
    "StoreStats",
    "TrackerRecord",
]
