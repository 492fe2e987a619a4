"""The replies to registrations whose view repeats: a memo in front of
TrackerCore.finish_registration.

A store that answers a keepalive with the very page it gave that member the last
time hands back the same ``others`` tuple (the Redis store: RecordCache.pages),
and the reply is then the same: it depends only on the view's members and total,
the size bound, paging and the offset. An entry keeps the ``others`` it was built
from and is found by that object's identity, so a new tuple at a reused address
is never taken for it; the rest is compared. The count finish_registration keeps
for a view (cut_amplification) is counted again on a hit.
"""

from __future__ import annotations

from typing import Any, Callable

from nattool.store.base import GroupView, RegisterResult
from nattool.tracker.dispatch import PendingRegistration, TrackerCore

#: entries kept; emptied when full (nattool.memo's rule)
REPLY_MEMO_MAX = 65_536
_CUT = "cut_amplification"


class ReplyMemo:
    """``finish(pending, result)``: TrackerCore.finish_registration, remembered."""

    __slots__ = ("_finish", "_counters", "_entries", "limit")

    def __init__(self, core: TrackerCore, limit: int = REPLY_MEMO_MAX) -> None:
        self._finish: Callable[[PendingRegistration, RegisterResult], bytes] = core.finish_registration
        self._counters = core.counters
        self._entries: dict[int, tuple[Any, tuple[Any, ...], bytes, int]] = {}
        self.limit = limit

    def finish(self, pending: PendingRegistration, result: RegisterResult) -> bytes:
        if result.__class__ is not GroupView:
            return self._finish(pending, result)
        me, others, total = result  # type: ignore[misc]
        facts = (me[2], me[3], me[4], total, pending[1], pending[2], pending[0][1])
        entry = self._entries.get(id(others))
        if entry is not None and entry[0] is others and entry[1] == facts:
            if entry[3]:
                self._counters[_CUT] += entry[3]
            return entry[2]
        counters = self._counters
        cut = counters[_CUT]
        reply = self._finish(pending, result)
        cut = counters[_CUT] - cut
        entries = self._entries
        if len(entries) >= self.limit:
            entries.clear()
        entries[id(others)] = (others, facts, reply, cut)
        return reply


__all__ = ["REPLY_MEMO_MAX", "ReplyMemo"]
