"""The volatile store, and the in-memory index that the SQLite store reuses."""

from __future__ import annotations

import asyncio
from typing import Iterator, Sequence

from nattool.errors import LimitError, NattoolError
from nattool.protocol.endpoint import Endpoint
from nattool.store.base import (
    ENDPOINT_TEXT_OF,
    SEEN_OF,
    GroupView,
    KeepaliveLane,
    LaneAnswer,
    Member,
    RegisterResult,
    Registration,
    Store,
    StoreLimits,
    StoreStats,
    TrackerRecord,
)

# A Member without its Python-level __new__: the keepalive lane's fields are
# already checked and canonical.
_new_tuple = tuple.__new__
# Groups up to this size are listed by walking all of their members at once.
SMALL_GROUP = 64
# Members dropped from the index per step (~0.25 ms), and per expire() call: the
# event loop gets a turn between steps, so a mass expiry never stalls it.
EXPIRE_STEP = 250
EXPIRE_MAX = 8000
# Expiry sweeps the groups: each expire() call looks at a SWEEP_PARTS-th of them
# (at least SWEEP_MIN), so a dead member goes within SWEEP_PARTS calls (16 s at the
# server's pace), and is never listed meanwhile (views skip the dead).
SWEEP_PARTS = 32
SWEEP_MIN = 256
# Groups a registration to a full tracker may look at for a dead member to replace:
# a full tracker refuses newcomers at a bounded price.
FULL_LOOKS = 16


async def expire_in_steps(index: "MemberIndex", now: float) -> int:
    """Expire up to EXPIRE_MAX members, EXPIRE_STEP at a time; return how many went."""
    gone = 0
    while gone < EXPIRE_MAX:
        step = len(index.expire(now, EXPIRE_STEP))
        gone += step
        if step < EXPIRE_STEP:
            break
        await asyncio.sleep(0)
    return gone


def _live_others(group: dict[str, Member], identity: str, horizon: float) -> list[Member]:
    """Every live member of a (small) group but ``identity``, newest first."""
    live = list(group.values())
    # A group is in registration order, oldest first, so a live
    # first member means all are live; and a member that has just registered is
    # the last one. That case, nearly every registration, needs no test per member.
    if live[0].seen > horizon and live[-1].identity == identity:
        live.pop()
        live.reverse()
        return live
    return [m for m in reversed(live) if m.seen > horizon and m.identity != identity]


class MemberIndex:
    """Groups of members with replacement by identity, TTL expiry and caps.

    Synchronous and free of I/O: the clock comes in as ``now``. Plain dicts keep
    insertion order, so "move to the newest end" is delete-and-insert, and a
    group's dead members are at its front: expiry sweeps the groups a slice at a
    time. There is no tracker-wide age order. One keyed by member cost 40 bytes a
    member, 80 once keepalives had deleted and inserted in it (a Python dict that
    has seen deletes resizes to three times its live entries), each resize stalled
    the event loop (61 ms with a million members), and keepalives paid two dict
    operations for it. About 410 bytes per member.
    """

    def __init__(self, limits: StoreLimits) -> None:
        self.limits = limits
        # group -> identity -> Member, oldest first
        self._groups: dict[str, dict[str, Member]] = {}
        self._count = 0
        self._sweep: list[str] = []  # groups the current sweep has still to look at
        self._sweep_step = SWEEP_MIN  # groups looked at per expire() call in this sweep
        # source -> group -> live members of that source in that group
        self._source_groups: dict[str, dict[str, int]] = {}
        # group -> its members' endpoint texts, newest first, one per line: the
        # keepalive lane's memo (see keepalive()). Anything else that changes a
        # group drops its entry.
        self._endpoint_lines: dict[str, str] = {}
        # Members the keepalive lane wrote, for a durable store to append (None:
        # nobody needs them); see start_journal().
        self.journal: list[Member] | None = None
        self.refresh_period = 0.0
        self.journal_all_until = 0.0

    def start_journal(self, refresh_period: float) -> None:
        """Keep :attr:`journal` for a durable store. A pure refresh (the same
        endpoint and LAN list, only a later time) goes in only when it is the
        member's first in a new period of ``refresh_period`` seconds (0: every one)."""
        if self.journal is None:
            self.journal = []
            self.refresh_period = refresh_period

    def journal_lost(self, members: Sequence[Member]) -> None:
        """The durable store could not write ``members``. The index keeps them, and a
        refresh of one within its period would go out of the journal with nothing
        written: for one period every refresh goes in. Later ones fall in a new
        period anyway."""
        self.journal_all_until = max(m.seen for m in members) + self.refresh_period

    # -- queries -----------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    @property
    def group_count(self) -> int:
        return len(self._groups)

    def members(self) -> Iterator[Member]:
        for group in self._groups.values():
            yield from group.values()

    def oldest_first(self) -> list[Member]:
        """Every member, by the time of its last registration; each group's members
        in the group's own order (the sort is stable)."""
        return sorted(self.members(), key=SEEN_OF)

    def clear(self) -> None:
        self._groups.clear()
        self._count = 0
        self._sweep.clear()
        self._source_groups.clear()
        self._endpoint_lines.clear()

    def view(self, me: Member, offset: int, limit: int, now: float) -> GroupView:
        """The requester and a page of the others, newest first.

        Stops at the page's end instead of walking the whole group; the count of
        others is then the group's size, which may include a few members that
        expired since the last sweep (they are never listed, only counted).
        """
        group = self._groups.get(me.group)
        if group is None:
            return GroupView(me=me, others=(), total_others=0)
        horizon = now - self.limits.ttl
        identity = me.identity
        if len(group) <= SMALL_GROUP:
            # Most groups are small: copying all of it beats the stepwise walk
            # below, which exists to stop early in big groups.
            live = _live_others(group, identity, horizon)
            return GroupView(me, tuple(live[offset : offset + limit]), len(live))
        others: list[Member] = []
        skip = offset
        for member in reversed(group.values()):  # newest first
            if member.seen <= horizon or member.identity == identity:
                continue
            if skip:
                skip -= 1
                continue
            if len(others) >= limit:
                break
            others.append(member)
        total = len(group) - (1 if identity in group else 0)
        if len(others) < limit:
            # The walk reached the end: the exact count is known.
            total = offset - skip + len(others)
        return GroupView(me=me, others=tuple(others), total_others=total)

    # -- updates -----------------------------------------------------------------
    def upsert(self, member: Member, now: float) -> Member | None:
        """Insert or replace; return the member evicted to make room, if any.
        Raises LimitError when a cap refuses the member."""
        limits = self.limits
        self._endpoint_lines.pop(member.group, None)
        group = self._groups.get(member.group)
        old = group.get(member.identity) if group is not None else None
        if old is not None and old.source == member.source:
            # A re-registration from the same source (the keepalive, the bulk of a
            # tracker's traffic): move it to the newest end; the per-source counts
            # do not change.
            del group[member.identity]  # type: ignore[union-attr]
            group[member.identity] = member  # type: ignore[index]
            return None
        if old is None:
            if self._count >= limits.max_members:
                self.expire(now, 1, FULL_LOOKS)
                if self._count >= limits.max_members:
                    raise LimitError("tracker full")
            per_source = self._source_groups.get(member.source)
            if (
                per_source is not None
                and member.group not in per_source
                and len(per_source) >= limits.max_groups_per_source
            ):
                raise LimitError("too many groups from this source")
        evicted: Member | None = None
        if group is None:
            group = self._groups[member.group] = {}
        elif old is None and len(group) >= limits.max_members_per_group:
            evicted = next(iter(group.values()))
            self._remove(evicted)
        if old is not None:
            del group[member.identity]
            self._forget_source(old)
        else:
            self._count += 1
        group[member.identity] = member
        counts = self._source_groups.get(member.source)
        if counts is None:
            counts = self._source_groups[member.source] = {}
        counts[member.group] = counts.get(member.group, 0) + 1
        return evicted

    def keepalive(
        self, group_key: str, identity: str, endpoint_text: str, lan_text: str, source: str, now: float
    ) -> LaneAnswer | None:
        """The keepalive lane (see :meth:`Store.keepalive_lane`): :meth:`upsert` and
        :meth:`view` in one step for a known member re-registering from the same
        source in a small group, the case that needs no cap, eviction or count.
        None, with nothing changed, in every other case.

        The others' endpoint lines are kept per group, so that the usual keepalive,
        from the group's oldest member with the endpoint it had, takes its own line
        off the end and puts it in front instead of reading every member: periodic
        keepalives come round in turn, so the one that comes is nearly always the
        oldest. The answer then lists the others as members only when one of them
        shares the member's source.
        """
        group = self._groups.get(group_key)
        if group is None or len(group) > SMALL_GROUP:
            return None
        old = group.get(identity)
        if old is None:
            return None
        # One unpacking instead of a field access each: this runs for nearly every
        # registration. The old member's group and source are the interned strings.
        old_group, _, old_endpoint, old_lan, old_source, old_seen = old
        if old_source != source:
            return None
        was_oldest = next(iter(group)) == identity
        member = _new_tuple(Member, (old_group, identity, endpoint_text, lan_text, old_source, now))
        del group[identity]
        group[identity] = member
        journal = self.journal
        if journal is not None:
            period = self.refresh_period
            if (
                not period
                or endpoint_text != old_endpoint
                or lan_text != old_lan
                or now // period != old_seen // period
                or now < self.journal_all_until
            ):
                journal.append(member)
        horizon = now - self.limits.ttl
        memo = self._endpoint_lines
        same_source = self._source_groups[old_source][old_group] - 1
        lines = memo.get(group_key)
        if (
            lines is not None
            and was_oldest
            and endpoint_text == old_endpoint
            and next(iter(group.values())).seen > horizon  # the oldest now is live: all are
        ):
            cut = len(lines) - len(endpoint_text) - 1
            if cut > 0:
                others = lines[:cut]
                memo[group_key] = f"{endpoint_text}\n{others}"
            else:
                others = ""  # the only member
            live = _live_others(group, identity, horizon) if same_source else None
            return live, others, same_source
        live = _live_others(group, identity, horizon)
        if len(live) == len(group) - 1:
            others = "\n".join(map(ENDPOINT_TEXT_OF, live))
            memo[group_key] = f"{endpoint_text}\n{others}" if others else endpoint_text
            return live, others, same_source
        memo.pop(group_key, None)
        return live, None, same_source

    def remove(self, group: str, identity: str) -> None:
        members = self._groups.get(group)
        if members is not None and identity in members:
            self._remove(members[identity])

    def expire(self, now: float, budget: int = 1 << 62, looks: int | None = None) -> list[Member]:
        """Remove up to ``budget`` dead members (not seen for the TTL) from the next
        ``looks`` groups of the sweep (by default its step: a member is then gone
        within SWEEP_PARTS calls of its death)."""
        horizon = now - self.limits.ttl
        gone: list[Member] = []
        groups, sweep, remove = self._groups, self._sweep, self._remove
        refilled = False
        if not sweep:
            refilled = self._start_sweep()
        if looks is None:
            looks = self._sweep_step
        while looks and len(gone) < budget:
            if not sweep:
                if refilled or not self._start_sweep():
                    break  # every group looked at once in this call
                refilled = True
            key = sweep.pop()
            looks -= 1
            group = groups.get(key)
            while group:
                first = next(iter(group.values()))
                if first.seen > horizon:
                    break
                if len(gone) >= budget:
                    sweep.append(key)  # dead members left: this group comes first next time
                    break
                remove(first)
                gone.append(first)
        return gone

    def _start_sweep(self) -> bool:
        """Queue every group for a look; False when there is none. A sweep's step is
        fixed when it starts, so it ends in SWEEP_PARTS calls however many groups
        empty meanwhile."""
        self._sweep.extend(self._groups)
        self._sweep_step = max(SWEEP_MIN, -(-len(self._sweep) // SWEEP_PARTS))
        return bool(self._sweep)

    def _remove(self, member: Member) -> None:
        self._endpoint_lines.pop(member.group, None)
        group = self._groups[member.group]
        del group[member.identity]
        if not group:
            del self._groups[member.group]
        self._count -= 1
        self._forget_source(member)

    def _forget_source(self, member: Member) -> None:
        counts = self._source_groups[member.source]
        left = counts[member.group] - 1
        if left:
            counts[member.group] = left
        else:
            del counts[member.group]
            if not counts:
                del self._source_groups[member.source]

    def register_batch(
        self, batch: Sequence[Registration], now: float
    ) -> tuple[list[RegisterResult], list[Member], list[Member]]:
        """Apply a batch; return the results, the members written and those evicted."""
        results: list[RegisterResult] = []
        written: list[Member] = []
        evicted: list[Member] = []
        upsert, view = self.upsert, self.view
        for member, offset, limit in batch:
            try:
                gone = upsert(member, now)
            except NattoolError as exc:
                results.append(exc)
                continue
            if gone is not None:
                evicted.append(gone)
            written.append(member)
            results.append(view(member, offset, limit, now))
        return results, written, evicted


class TrackerTable:
    """Verified trackers with their expiry, capped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._records: dict[Endpoint, float] = {}

    def save(self, record: TrackerRecord) -> bool:
        if record.endpoint not in self._records and len(self._records) >= self.limit:
            return False
        self._records[record.endpoint] = record.expires
        return True

    def drop(self, endpoint: Endpoint) -> None:
        self._records.pop(endpoint, None)

    def load(self, now: float) -> list[TrackerRecord]:
        for endpoint in [ep for ep, exp in self._records.items() if exp <= now]:
            del self._records[endpoint]
        return sorted(
            (TrackerRecord(ep, exp) for ep, exp in self._records.items()),
            key=lambda r: -r.expires,
        )

    def __len__(self) -> int:
        return len(self._records)


class MemoryStore(Store):
    """Volatile: everything is gone when the process ends."""

    kind = "memory"

    def __init__(self, limits: StoreLimits) -> None:
        super().__init__(limits)
        self.index = MemberIndex(limits)
        self.trackers = TrackerTable(limits.max_trackers)

    supports_sync = True

    def register_now(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        return self.index.register_batch(batch, now)[0]

    def keepalive_lane(self) -> KeepaliveLane:
        return self.index.keepalive

    async def register(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        return self.register_now(batch, now)

    async def expire(self, now: float) -> int:
        return await expire_in_steps(self.index, now)

    async def save_tracker(self, record: TrackerRecord) -> None:
        self.trackers.save(record)

    async def drop_tracker(self, endpoint: Endpoint) -> None:
        self.trackers.drop(endpoint)

    async def load_trackers(self, now: float) -> list[TrackerRecord]:
        return self.trackers.load(now)

    async def stats(self) -> StoreStats:
        return StoreStats(
            groups=self.index.group_count, members=len(self.index), trackers=len(self.trackers)
        )
