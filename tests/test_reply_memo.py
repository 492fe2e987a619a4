"""The reply memo (nattool/net/reply_memo.py) against TrackerCore.finish_registration
itself: the same replies and the same counts, for views whose ``others`` repeat
(the same tuple again, as the Redis store hands back) with the rest changed or not."""

from __future__ import annotations

import random
import time

from nattool.errors import StoreError
from nattool.net.reply_memo import ReplyMemo
from nattool.store.base import GroupView, Member, Registration
from nattool.tracker.dispatch import PendingRegistration, TrackerCore
from nattool.tracker.federation import Federation, FederationConfig


def core() -> TrackerCore:
    return TrackerCore(Federation(FederationConfig()))


def test_memo_replies_and_counts_as_finish_registration() -> None:
    rng = random.Random(26)
    now = time.time()
    ips = ("198.51.100.7", "203.0.113.9")

    def someone(n: int) -> Member:
        ip = ips[n % 2]
        return Member("g", f"id{n}", f"{ip}:{1000 + n}", f"10.0.0.{n}" if n % 3 else "", ip, now)

    pages = [tuple(someone(n) for n in rng.sample(range(40), rng.randint(0, 30))) for _ in range(12)]
    memoized, plain = core(), core()
    memo = ReplyMemo(memoized, limit=7)  # small: emptied when full along the way
    hits = 0
    for step in range(3000):
        others = rng.choice(pages)  # the same objects again and again
        me = someone(rng.randrange(40, 44))
        offset = rng.choice((0, 0, 0, 2))
        pending = PendingRegistration(Registration(me, offset, 128), rng.choice((60, 200, 1200)), rng.random() < 0.3)
        total = len(others) + rng.choice((0, 0, 5))
        result = GroupView(me, others, total) if rng.random() < 0.95 else StoreError("store unavailable")
        before = memoized.counters["cut_amplification"]
        hits += id(others) in memo._entries
        got = memo.finish(pending, result)
        assert got == plain.finish_registration(pending, result), step
        assert memoized.counters == plain.counters, step
        assert memoized.counters["cut_amplification"] >= before
    assert hits > 1000 and plain.counters["cut_amplification"] > 100
