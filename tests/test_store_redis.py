"""Redis store against a real redis-server: sharing between trackers, outages."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nattool.errors import StoreError
from nattool.protocol.endpoint import Endpoint
from nattool.store.base import GroupView, Member, Registration, StoreLimits

try:
    from redis_server import REDIS_SERVER, SKIP_REASON, RedisServer
except ImportError:  # tests/ imported as a package
    from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)


def member(identity: str, port: int, seen: float, group: str = "g") -> Member:
    return Member(
        group=group,
        identity=identity,
        endpoint=Endpoint(ipaddress.ip_address("198.51.100.7"), port),
        lan=(),
        source="198.51.100.7",
        seen=seen,
    )


def test_two_trackers_on_one_redis_are_one_tracker(redisd: RedisServer) -> None:
    from nattool.store.redis import RedisStore

    async def body() -> None:
        a = RedisStore(StoreLimits(), redisd.url)
        b = RedisStore(StoreLimits(), redisd.url)
        await a.open()
        await b.open()
        try:
            now = time.time()
            [va] = await a.register([Registration(member("alice", 1000, now))], now)
            assert isinstance(va, GroupView) and va.others == ()
            # at once, no waiting: the other tracker lists alice
            [vb] = await b.register([Registration(member("bob", 2000, now + 0.1))], now + 0.1)
            assert isinstance(vb, GroupView)
            assert [(m.identity, m.endpoint.port) for m in vb.others] == [("alice", 1000)]
            assert vb.others[0].lan == ()
            [va] = await a.register([Registration(member("alice", 1001, now + 0.2))], now + 0.2)
            assert isinstance(va, GroupView) and [m.identity for m in va.others] == ["bob"]
            assert (await a.stats()).members == 2 == (await b.stats()).members
        finally:
            await a.close()
            await b.close()

    asyncio.run(body())


def test_group_keys_expire_in_redis_itself(redisd: RedisServer) -> None:
    from nattool.store.redis import RedisStore, group_keys

    async def body() -> None:
        store = RedisStore(StoreLimits(ttl=0.5), redisd.url)
        await store.open()
        try:
            now = time.time()
            await store.register([Registration(member("x", 1, now))], now)
            client = store._require()
            m, d = group_keys("g")
            assert m.startswith("nt:{g}") and d.startswith("nt:{g}")  # one cluster slot
            assert await client.exists(m, d) == 2
            pttl = await client.pttl(m)
            assert 0 < pttl <= 1750  # TTL, half more (the refresh interval), a second
            await asyncio.sleep(2.0)
            assert await client.exists(m, d) == 0  # gone without any expire() call
        finally:
            await store.close()

    asyncio.run(body())


def test_redis_down_fails_fast_then_reconnects(redisd: RedisServer) -> None:
    from nattool.store.redis import RedisStore

    async def body() -> None:
        store = RedisStore(StoreLimits(), redisd.url, timeout=0.3, max_backoff=0.5)
        await store.open()
        try:
            now = time.time()
            batch = [Registration(member(f"m{i}", 1000 + i, now)) for i in range(5)]
            assert all(isinstance(r, GroupView) for r in await store.register(batch, now))

            redisd.stop()
            started = time.monotonic()
            results = await store.register(batch, now)
            took = time.monotonic() - started
            assert len(results) == 5 and all(isinstance(r, StoreError) for r in results)
            assert took < 1.0, f"an outage must be answered quickly, took {took:.2f}s"
            # while backing off: no network at all, an answer in well under a ms
            started = time.monotonic()
            again = await store.register(batch, now)
            assert all(isinstance(r, StoreError) for r in again)
            assert time.monotonic() - started < 0.05
            with pytest.raises(StoreError):
                await store.load_trackers(now)
            stats_failures = store.counters["failures"]
            assert stats_failures >= 1 and store.counters["fast_fails"] >= 1

            redisd.start()  # same port, empty (no persistence), scripts gone
            deadline = time.monotonic() + 5
            while True:
                now = time.time()
                results = await store.register(batch, now)
                if all(isinstance(r, GroupView) for r in results):
                    break
                assert time.monotonic() < deadline, results
                await asyncio.sleep(0.1)
            assert [m.identity for m in results[-1].others] == ["m3", "m2", "m1", "m0"]  # type: ignore[union-attr]
            stats = await store.stats()
            assert stats.extra["reconnects"] >= 1 and stats.members == 5
        finally:
            await store.close()

    asyncio.run(body())


def test_slow_redis_is_a_timeout_not_a_hang(redisd: RedisServer) -> None:
    """A stopped (SIGSTOP) redis-server accepts nothing and answers nothing: the
    way a stalled Redis looks from the tracker."""
    from nattool.store.redis import RedisStore

    async def body() -> None:
        store = RedisStore(StoreLimits(), redisd.url, timeout=0.2, max_backoff=0.3)
        await store.open()
        assert redisd.proc is not None
        try:
            redisd.proc.send_signal(signal.SIGSTOP)
            now = time.time()
            started = time.monotonic()
            [result] = await store.register([Registration(member("a", 1, now))], now)
            assert isinstance(result, StoreError)
            assert time.monotonic() - started < 0.6
            assert store.counters["timeouts"] >= 1
        finally:
            redisd.proc.send_signal(signal.SIGCONT)
        try:
            deadline = time.monotonic() + 5
            while True:
                now = time.time()
                [result] = await store.register([Registration(member("a", 1, now))], now)
                if isinstance(result, GroupView):
                    break
                assert time.monotonic() < deadline, result
                await asyncio.sleep(0.1)
        finally:
            await store.close()

    asyncio.run(body())


def test_keepalive_lane_answers_as_the_script_does(redisd: RedisServer) -> None:
    """The lane (plain ZADD XX + ZREVRANGEBYSCORE for known, unchanged members, with
    their bookkeeping as plain commands when it is due) against the batch script
    alone: the same registrations, in the same batches, give the same views.
    Replaced endpoints, LAN lists, paging, groups over a page and members that
    expire are in the mix."""
    import random

    from nattool.store.redis import RedisStore

    rng = random.Random(26)
    limits = StoreLimits(ttl=30.0)

    def view_text(result: object) -> object:
        if isinstance(result, GroupView):
            return (
                [(m.identity, m.endpoint_text, m.lan_text, m.source) for m in result.others],
                result.total_others,
            )
        return type(result).__name__

    async def body() -> None:
        fast = RedisStore(limits, redisd.url.rsplit("/", 1)[0] + "/1")
        slow = RedisStore(limits, redisd.url.rsplit("/", 1)[0] + "/2")
        await fast.open()
        await slow.open()
        try:
            now = time.time()
            for step in range(60):
                now += rng.choice((0.5, 1.0, 3.0, 12.0))
                batch = []
                for _ in range(rng.randint(1, 25)):
                    g = rng.randrange(4)
                    who = rng.randrange(9)
                    port = 1000 + who + (100 if rng.random() < 0.1 else 0)  # sometimes a new NAT port
                    lan = ("10.0.0.%d" % who,) if who % 3 == 0 else ()
                    m = Member(f"lane-{g}", f"id{who}", Endpoint(ipaddress.ip_address("198.51.100.7"), port), lan,
                               "198.51.100.7", now)  # fmt: skip
                    batch.append(Registration(m, rng.choice((0, 0, 0, 1, 2)), rng.choice((128, 128, 2, 3))))
                got_fast = await fast.register(batch, now)
                slow._single.memo.clear()  # never the lane
                got_slow = await slow.register(batch, now)
                assert [view_text(r) for r in got_fast] == [view_text(r) for r in got_slow], step
            assert fast.counters["lane"] > 100 and slow.counters["lane"] == 0
            assert fast.counters["lane_missed"] == 0 and fast.counters["lane_bookkeeping"] > 20
        finally:
            await fast.close()
            await slow.close()

    asyncio.run(body())


def test_the_lane_reads_replies_without_hiredis_too(redisd: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where hiredis is not installed, redis-py parses in Python and the lane reads
    reply by reply: the same views."""
    from redis._parsers import _AsyncRESP2Parser

    from nattool.store.redis import RedisStore

    plain_options = RedisStore._client_options

    def python_parser(self: RedisStore) -> dict[str, object]:
        return {**plain_options(self), "parser_class": _AsyncRESP2Parser}

    async def views(store: RedisStore) -> list[object]:
        await store.open()
        try:
            parser = store._require().connection_pool.connection_kwargs.get("parser_class")
            assert (parser is _AsyncRESP2Parser) == (store.url.endswith("/4"))
            out: list[object] = []
            now = time.time()
            for step in range(3):  # created, then twice through the lane
                batch = [Registration(member(f"m{i}", 1000 + i, now + step, group=f"p{i % 3}")) for i in range(12)]
                for view in await store.register(batch, now + step):
                    assert isinstance(view, GroupView)
                    out.append(([m.endpoint_text for m in view.others], view.total_others))
            assert store.counters["lane"] == 24
            return out
        finally:
            await store.close()

    async def body() -> None:
        with_hiredis = await views(RedisStore(StoreLimits(), redisd.url.rsplit("/", 1)[0] + "/3"))
        monkeypatch.setattr(RedisStore, "_client_options", python_parser)
        store = RedisStore(StoreLimits(), redisd.url.rsplit("/", 1)[0] + "/4")
        assert python_parser(store)["parser_class"] is _AsyncRESP2Parser
        without = await views(store)
        assert without == with_hiredis

    asyncio.run(body())


def test_the_store_imports_where_redis_py_moved_its_hiredis_reader(tmp_path: Path) -> None:
    """The lane reads from redis-py's private hiredis reader; a redis-py without it at
    that place must still give a working store (read through the public API, which
    the test above checks), not an ImportError."""
    script = (
        "import redis._parsers.hiredis as h\n"
        "del h._AsyncHiredisParser  # the import fails as if it had moved\n"
        "import nattool.store.redis_single as m\n"
        "assert m._AsyncHiredisParser is None\n"
        "from nattool.store.factory import open_store\n"
        "from nattool.store.base import StoreLimits\n"
        "open_store('redis://127.0.0.1:1/0', StoreLimits())\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_page_read_again_gives_the_view_decoded_afresh() -> None:
    """page_view's first case (a member's page the same records as the last one it
    read, answered from RecordCache.pages) against decoding with an empty cache:
    the same views, for pages that repeat, change, reorder, lose the requester, and
    for a record that is the same in two groups."""
    import random

    from nattool.store.redis import RecordCache, page_view, record_of

    rng = random.Random(2026)
    kept = RecordCache(limit=40)  # small: emptied when full along the way
    now = time.time()
    people = {g: [member(f"id{i}", 1000 + i, now, group=g) for i in range(6)] for g in ("a", "b")}
    hits = 0
    last_page: dict[str, list[str]] = {}
    for step in range(400):
        g = rng.choice("ab")
        me = rng.choice(people[g])
        own = record_of(me)
        roll = rng.random()
        if own in last_page and roll < 0.5:
            page = list(last_page[own])  # the same records, new strings from Redis
        elif own in last_page and roll < 0.7:
            page = last_page[own][:-1]  # one fewer, or one more
            page += [record_of(m) for m in people[g] if record_of(m) not in page][: rng.randint(0, 2)]
        else:
            page = [record_of(m) for m in rng.sample(people[g], rng.randint(0, 6))]
            rng.shuffle(page)
        last_page[own] = list(page)
        reg = Registration(me, 0, rng.choice((128, 128, 3)))
        hits += kept.pages.get(own, ([], (), ""))[0] == page
        fast = page_view(reg, own, [("" + r + ".")[:-1] for r in page], 0, len(page), kept)
        slow = page_view(reg, own, list(page), 0, len(page), RecordCache())
        assert isinstance(fast, GroupView) and isinstance(slow, GroupView)
        assert fast.me is me and fast.total_others == slow.total_others
        assert [m[:5] for m in fast.others] == [m[:5] for m in slow.others], step
    assert hits > 50
