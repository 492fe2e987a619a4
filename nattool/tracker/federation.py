"""Trackers knowing each other, without letting anyone poison the list.

A tracker is listed only after *we* verified it: it answered ``//nat`` from the
announced endpoint to a probe sent from our own socket. Announcements are accepted
only for the sender's own IP and are rate limited per source; entries expire unless
re-verified, which happens when the tracker announces again, appears in a list we
pull, or is one we joined.

Pure: the caller passes ``now`` (monotonic seconds for timers, and wall seconds for
persisted expiry come from the caller too) and does the sending.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nattool.errors import ProtocolError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.text import (
    AnnounceRequest,
    NatReply,
    TrackerList,
    TrackersRequest,
)
from nattool.store.base import TrackerRecord
from nattool.tracker.ratelimit import SourceRateLimiter

NAT_PROBE = b"//nat"
PULL = TrackersRequest().to_wire()


@dataclass(slots=True)
class _Pending:
    kind: str  # "verify" | "announce" | "pull"
    payload: bytes
    sent_at: float
    attempts: int = 1


@dataclass(slots=True)
class FederationConfig:
    tracker_ttl: float = 300.0  # a verified tracker stays listed this long
    announce_interval: float = 60.0  # how often we announce to / pull from joined trackers
    retry_interval: float = 1.0
    max_attempts: int = 3
    max_trackers: int = 64
    max_pending: int = 256
    announce_rate_per_min: float = 10.0  # the original server's limit


@dataclass(slots=True)
class FederationEvents:
    saved: list[TrackerRecord] = field(default_factory=list)
    dropped: list[Endpoint] = field(default_factory=list)
    learned_public: Endpoint | None = None


class Federation:
    def __init__(
        self,
        config: FederationConfig,
        *,
        public: Endpoint | None = None,
        joins: tuple[Endpoint, ...] = (),
    ) -> None:
        self.config = config
        self.public = public
        self.public_is_learned = public is None
        self.joins = joins
        self.listed: dict[Endpoint, float] = {}  # endpoint -> expiry (wall clock)
        self._pending: dict[Endpoint, _Pending] = {}
        self._queue: dict[Endpoint, list[bytes]] = {}  # one outstanding request per peer
        self._next_join_round = 0.0
        self._announce_limiter = SourceRateLimiter(
            rate=config.announce_rate_per_min / 60.0, burst=config.announce_rate_per_min
        )
        self.events = FederationEvents()
        self.dropped_announcements = 0
        self.failed_verifications = 0

    # -- what clients see ----------------------------------------------------------
    def tracker_list(self, wall_now: float) -> TrackerList:
        items = [ep for ep, exp in self.listed.items() if exp > wall_now and ep != self.public]
        head = [self.public] if self.public is not None else []
        return TrackerList(tuple(e.to_text() for e in head + items))

    def restore(self, records: list[TrackerRecord]) -> None:
        for rec in records[: self.config.max_trackers]:
            self.listed[rec.endpoint] = rec.expires

    # -- inputs ----------------------------------------------------------------------
    def on_announce(self, req: AnnounceRequest, sender: Endpoint, now: float) -> None:
        """Queue verification of announced endpoints that carry the sender's IP."""
        if not self._announce_limiter.allow(str(sender.ip), now):
            self.dropped_announcements += 1
            return
        for ep in req.endpoints:
            if ep.ip != sender.ip or ep == self.public:
                self.dropped_announcements += 1
                continue
            self._enqueue(ep, NAT_PROBE)

    def is_expected(self, src: Endpoint) -> bool:
        """Is a non-request datagram from ``src`` an answer we are waiting for?"""
        return src in self._pending

    def on_reply(self, src: Endpoint, data: bytes, now: float, wall_now: float) -> None:
        pending = self._pending.pop(src, None)
        if pending is None:
            return
        try:
            if pending.kind == "verify":
                observed = NatReply.from_wire(data).endpoint
                self._verified(src, wall_now)
                # Only a tracker the operator joined may tell us our own endpoint: any
                # verified stranger could otherwise put a third party's address at the
                # head of the list every client downloads.
                if self.public_is_learned and src in self.joins and self.public != observed:
                    self.public = observed
                    self.events.learned_public = observed
            else:
                for text in TrackerList.from_wire(data).trackers:
                    try:
                        ep = Endpoint.from_text(text)
                    except ProtocolError:
                        continue  # host names in lists are not verified here
                    if ep != self.public and ep not in self._pending:
                        self._enqueue(ep, NAT_PROBE)
        except ProtocolError:
            self.failed_verifications += pending.kind == "verify"

    # -- timers ----------------------------------------------------------------------
    def outgoing(self, now: float, wall_now: float) -> list[tuple[Endpoint, bytes]]:
        """Datagrams to send now: queued requests, retries, the periodic join round."""
        out: list[tuple[Endpoint, bytes]] = []
        if self.joins and now >= self._next_join_round:
            self._next_join_round = now + self.config.announce_interval
            for join in self.joins:
                self._enqueue(join, NAT_PROBE)
                if self.public is not None:
                    self._enqueue(join, AnnounceRequest((self.public,)).to_wire())
                self._enqueue(join, PULL)
        for ep, pending in list(self._pending.items()):
            if now - pending.sent_at < self.config.retry_interval * pending.attempts:
                continue
            if pending.attempts >= self.config.max_attempts:
                del self._pending[ep]
                if pending.kind == "verify":
                    self.failed_verifications += 1
                continue
            pending.attempts += 1
            pending.sent_at = now
            out.append((ep, pending.payload))
        for ep, queue in list(self._queue.items()):
            if ep not in self._pending and queue:
                payload = queue.pop(0)
                self._start(ep, payload, now)
                out.append((ep, payload))
            if not queue:
                del self._queue[ep]
        for ep in [e for e, exp in self.listed.items() if exp <= wall_now]:
            del self.listed[ep]
            self.events.dropped.append(ep)
        return out

    def take_events(self) -> FederationEvents:
        events, self.events = self.events, FederationEvents()
        return events

    # -- internals -------------------------------------------------------------------
    def _verified(self, ep: Endpoint, wall_now: float) -> None:
        if ep not in self.listed and len(self.listed) >= self.config.max_trackers:
            return
        expires = wall_now + self.config.tracker_ttl
        self.listed[ep] = expires
        self.events.saved.append(TrackerRecord(ep, expires))

    def _enqueue(self, ep: Endpoint, payload: bytes) -> None:
        queue = self._queue.get(ep)
        if queue is None:
            if len(self._queue) + len(self._pending) >= self.config.max_pending:
                return
            queue = self._queue[ep] = []
        if payload not in queue and not (ep in self._pending and self._pending[ep].payload == payload):
            queue.append(payload)

    def _start(self, ep: Endpoint, payload: bytes, now: float) -> None:
        kind = "verify" if payload == NAT_PROBE else ("pull" if payload == PULL else "announce")
        self._pending[ep] = _Pending(kind, payload, now)
