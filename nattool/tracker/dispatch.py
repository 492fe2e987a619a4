"""Dispatch one datagram: decide the reply (or that there is none).

The I/O shell (nattool.net.server) calls :meth:`TrackerCore.on_datagram` with the
bytes, the source endpoint and the clocks. Each answer has its own type:

- ``bytes``: a reply to send now (an empty one too: "I know no trackers");
- :class:`PendingRegistration`: needs the store; the shell batches it, hands it to
  the store, and :meth:`TrackerCore.finish_registration` then builds the reply;
- :data:`HELD` (from :meth:`TrackerCore.on_register_v4` only): a keepalive the
  store's lane has done; its reply is in the caller's ``held`` list, to go out
  once the store's ``commit_now()`` has succeeded;
- :class:`Junk`: dropped, nothing to send (the shell may log it);
- None: taken, nothing to send (a federation reply).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import List, NamedTuple, Optional, Protocol, Tuple, Union

from nattool.errors import NattoolError
from nattool.memo import bounded_memo
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.limits import MIN_REPLY_ROOM, SAFE_DATAGRAM, reply_budget
from nattool.protocol.text import (
    AnnounceRequest,
    ErrorReply,
    MalformedRequest,
    NatRequest,
    NotARequest,
    RegisterRequest,
    RelayGrant,
    RelayRequest,
    TrackersRequest,
    parse_request,
    parse_seed_register,
)
from nattool.store.base import GroupView, KeepaliveLane, Member, RegisterResult, Registration
from nattool.tracker.federation import Federation
from nattool.tracker.registry import (
    MAX_PAGE,
    build_member_reply,
    cut_lines,
    lines_reply,
    member_from_request,
    own_line,
    plain_reply,
    registration_for,
)


class PendingRegistration(NamedTuple):
    registration: Registration
    budget: int  # the reply's size bound (amplification rule)
    paging: bool  # the client speaks the paging extension: add "next=N" when cut


class Held:
    """The type of :data:`HELD`: a keepalive the store's lane has done, its reply
    held until the store's ``commit_now()`` has made the change durable. A
    singleton rather than a reply object: nothing is built per keepalive."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "HELD"


HELD = Held()


class Junk(NamedTuple):
    """A datagram dropped unanswered: neither a request nor an expected reply."""

    why: str


JUNK_UNKNOWN = Junk("not a request")


# tuple.__new__ straight: a NamedTuple's own __new__ is a Python-level function,
# and the registration fast path builds three of these per registration.
_new_tuple = tuple.__new__
_intern = sys.intern

# Seed-form registrations remembered by their bytes. A node re-sends the very same
# datagram as its keepalive, so most registrations are parsed once; past this many
# distinct requests the memory is emptied and filled again (a tracker with more
# active members than this parses most of its requests, as it did without it).
SEED_CACHE_MAX = 32_768


Outcome = Union[bytes, PendingRegistration, Junk, None]
RegisterV4Outcome = Union[Held, PendingRegistration, None]
# (reply, source) pairs of keepalives that wait for the store's commit
HeldReplies = List[Tuple[bytes, Tuple[str, int]]]


RELAY_OFF = "relay off"


class RelayGrants(Protocol):
    """What answers ``//relay/<group>`` (the TURN relay of ``serve --relay``)."""

    def grant(self, group: str, now: float, wall_now: float) -> RelayGrant:
        """Credentials for ``group`` and the relayed endpoints of its live allocations."""
        ...


def refusal(error: BaseException, budget: int) -> bytes:
    """The ERR reply for ``error``, cut to ``budget`` bytes (amplification rule)."""
    return ErrorReply(str(error)).to_wire()[:budget]


class TrackerCore:
    """Text-protocol decisions of one tracker. Counters are plain ints in a Counter,
    read by the metrics endpoint and the shutdown summary."""

    def __init__(self, federation: Federation, safe_datagram: int = SAFE_DATAGRAM) -> None:
        self.federation = federation
        self.safe_datagram = safe_datagram
        self.counters: Counter[str] = Counter()
        # The store's keepalive lane, set by the I/O shell once the store is open.
        self.keepalive_lane: KeepaliveLane | None = None
        # The relay that answers //relay/<group>, set by the I/O shell with --relay.
        self.relay: RelayGrants | None = None
        # reply_budget() by request length, up to where it reaches safe_datagram:
        # an index instead of a call on the registration fast path.
        self._budgets = tuple(reply_budget(n, safe_datagram) for n in range(safe_datagram // 3 + 1))
        self._seed_parsed, self._parse_seed = bounded_memo(parse_seed_register, SEED_CACHE_MAX)

    def on_datagram(self, data: bytes, src: Endpoint, now: float, wall_now: float) -> Outcome:
        counters = self.counters
        budget = reply_budget(len(data), self.safe_datagram)
        try:
            request = parse_request(data)
        except NotARequest:
            if self.federation.is_expected(src):
                counters["federation_reply"] += 1
                self.federation.on_reply(src, data, now, wall_now)
            else:
                counters["drop_unknown"] += 1
                return JUNK_UNKNOWN
            return None
        except MalformedRequest as exc:
            counters["malformed"] += 1
            return refusal(exc, budget)
        if isinstance(request, NatRequest):
            counters["nat"] += 1
            return src.to_text().encode()
        if isinstance(request, RegisterRequest):
            try:
                member = member_from_request(request, src, wall_now)
                registration = registration_for(request, member, budget)
            except MalformedRequest as exc:
                counters["malformed"] += 1
                return refusal(exc, budget)
            counters["register"] += 1
            return PendingRegistration(registration, budget, request.wants_paging)
        if isinstance(request, TrackersRequest):
            counters["trackers"] += 1
            return self._tracker_list(budget, wall_now)
        if isinstance(request, AnnounceRequest):
            counters["announce"] += 1
            self.federation.on_announce(request, src, now)
            return self._tracker_list(budget, wall_now)
        if isinstance(request, RelayRequest):
            if self.relay is None:
                counters["relay_off"] += 1
                return ErrorReply(RELAY_OFF).to_wire()[:budget]
            counters["relay"] += 1
            return self._relay_reply(self.relay.grant(request.group, now, wall_now), budget)
        raise AssertionError(f"unhandled request {request!r}")  # pragma: no cover

    def on_register_v4(
        self, data: bytes, source: Tuple[str, int], wall_now: float, held: Optional[HeldReplies] = None
    ) -> RegisterV4Outcome:
        """The common registration from an IPv4 source, decided without request or
        Endpoint objects; None when it is not that case (then :meth:`on_datagram`).

        ``source`` is the kernel's (host, port): its host the canonical dotted quad,
        which is also the source's accounting key. A keepalive that the store's lane
        (:attr:`keepalive_lane`) takes is done here, when ``held`` is given: its
        reply goes on ``held`` with ``source``, and :data:`HELD` comes back.
        """
        fields = self._seed_parsed.get(data) or self._parse_seed(data)
        if fields is None:
            return None
        group, lan_text, identity = fields
        host, port = source
        endpoint = f"{host}:{port}"
        identity = identity or endpoint
        size = len(data)
        budgets = self._budgets
        budget = budgets[size] if size < len(budgets) else self.safe_datagram
        self.counters["register"] += 1
        lane = self.keepalive_lane
        if lane is not None and held is not None:
            answer = lane(group, identity, endpoint, lan_text, host, wall_now)
            if answer is not None:
                # What finish_registration() would reply after the lane's work.
                others, lines, same_source = answer
                first = f"{endpoint};{lan_text}" if lan_text else endpoint
                if lines is not None and not same_source:
                    # Nobody else behind this source, so none of their LAN lists
                    # is shown: their endpoint lines are the reply.
                    reply = lines_reply(first, lines, budget) or self._cut_reply(endpoint, lan_text, lines, budget)
                else:
                    assert others is not None  # the lane lists them as members then
                    reply = plain_reply(first, others, host, budget)
                    if reply is None:
                        me = Member(group, identity, endpoint, lan_text, host, wall_now)
                        reply = self._member_reply(GroupView(me, tuple(others), len(others)), budget, False, 0)
                held.append((reply, source))
                return HELD
        # Member(...) without its checks and conversions: every field is already
        # wire text; group and source are interned as Member() does.
        member = _new_tuple(Member, (_intern(group), identity, endpoint, lan_text, _intern(host), wall_now))
        registration = _new_tuple(Registration, (member, 0, min(MAX_PAGE, budget // 10)))
        return _new_tuple(PendingRegistration, (registration, budget, False))

    def refused_keepalives(self, count: int, error: NattoolError) -> bytes:
        """The reply to each of ``count`` keepalives whose commit failed."""
        self.counters["register_refused"] += count
        return refusal(error, MIN_REPLY_ROOM)  # the least budget

    def _tracker_list(self, budget: int, wall_now: float) -> bytes:
        lines = self.federation.tracker_list(wall_now).trackers
        out = b""
        for line in lines:
            candidate = (out + b"\n" if out else b"") + line.encode()
            if len(candidate) > budget:
                self.counters["cut_amplification"] += 1
                break
            out = candidate
        return out

    def _relay_reply(self, grant: RelayGrant, budget: int) -> bytes:
        """``grant`` with as many relayed endpoints as the size bound lets through."""
        size = grant.head_len()
        if size > budget:
            self.counters["malformed"] += 1
            return refusal(MalformedRequest("pad the relay request"), budget)
        kept = 0
        for endpoint in grant.relayed:
            size += 1 + len(endpoint.to_text())
            if size > budget:
                self.counters["cut_amplification"] += 1
                break
            kept += 1
        if kept < len(grant.relayed):
            grant = RelayGrant(grant.username, grant.password, grant.lifetime, grant.realm, grant.relayed[:kept])
        return grant.to_wire()

    def finish_registration(self, pending: PendingRegistration, result: RegisterResult) -> bytes:
        if isinstance(result, NattoolError):
            self.counters["register_refused"] += 1
            return refusal(result, pending.budget)
        return self._member_reply(result, pending.budget, pending.paging, pending.registration.offset)

    def _cut_reply(self, endpoint: str, lan_text: str, others_text: str, budget: int) -> bytes:
        """A keepalive's reply from its others' endpoint lines, cut as
        :func:`build_member_reply` cuts when they do not all fit ``budget``."""
        lines = [own_line(endpoint, lan_text, budget)]
        others = others_text.split("\n") if others_text else []
        if cut_lines(lines, others, budget) < len(others):
            self.counters["cut_amplification"] += 1
        return "\n".join(lines).encode("ascii")

    def _member_reply(self, view: GroupView, budget: int, paging: bool, offset: int) -> bytes:
        reply = build_member_reply(view, budget, paging, offset)
        if len(view.others) and reply.count(b"\n") < len(view.others):
            self.counters["cut_amplification"] += 1
        return reply
