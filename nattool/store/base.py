"""The one interface every store fills.

The tracker hands a store *batches* of registrations (everything that arrived in one
event-loop turn) so that a durable store can commit them in one transaction and a
remote store can do them in one round trip. The store owns the soft-state rules
that need the whole data set: TTL expiry, replacement by identity, and the caps
that keep a flood of registrations from exhausting the server.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Sequence, Union

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


@dataclass(frozen=True, slots=True)
class Member:
    """One registration inside a group."""

    group: str  # canonical group key (see protocol.text.canonical_group)
    identity: str  # canonical MAC, or the endpoint text when the node gave none
    endpoint: Endpoint  # where peers reach it
    lan: tuple[str, ...]  # LAN addresses it published ("" tuple: none)
    source: str  # source_key() of the registering host: "same public IP" test
    seen: float  # wall-clock seconds (time.time()) of the latest registration


@dataclass(frozen=True, slots=True)
class Registration:
    """A member to upsert and the slice of its group's list the reply wants."""

    member: Member
    # Members of the group, other than the requester, to skip (newest first): the
    # paging extension. The requester's own entry is always included.
    offset: int = 0
    limit: int = 128


@dataclass(frozen=True, slots=True)
class GroupView:
    """The answer to one registration: the requester's entry and a page of others."""

    me: Member
    others: tuple[Member, ...]  # newest first, after `offset`, at most `limit`
    total_others: int  # live others in the group, for paging


RegisterResult = Union[GroupView, NattoolError]


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

    def __init__(self, limits: StoreLimits) -> None:
        self.limits = limits

    def describe(self) -> str:
        """Human description for the startup banner (e.g. the SQLite path)."""
        return self.kind

    async def open(self) -> None:
        """Connect, create or migrate; raise StoreError with a way out on failure."""

    async def close(self) -> None:
        """Flush what is pending and release resources."""

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
    "GroupView",
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
