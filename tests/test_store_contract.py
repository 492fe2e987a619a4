"""One behaviour suite, run against every store: memory, sqlite and a real redis."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Coroutine, Iterator, TypeVar

import pytest
from contextlib import asynccontextmanager

from nattool.errors import LimitError, StoreError, UsageError
from nattool.protocol.endpoint import Endpoint
from nattool.store.base import (
    GroupView,
    Member,
    Registration,
    Store,
    StoreLimits,
    TrackerRecord,
)
from nattool.store.factory import open_store
from nattool.store.memory import MemoryStore
from nattool.store.sqlite import SqliteStore, default_sqlite_path

try:
    from redis_server import REDIS_SERVER, SKIP_REASON, RedisServer, free_port
except ImportError:  # tests/ imported as a package
    from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer, free_port

T = TypeVar("T")
TTL = 120.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def member(
    group: str, identity: str, port: int, seen: float, ip: str = "198.51.100.7",
    lan: tuple[str, ...] = ("192.168.1.5",),
) -> Member:  # fmt: skip
    return Member(
        group=group,
        identity=identity,
        endpoint=Endpoint(ipaddress.ip_address(ip), port),
        lan=lan,
        source=ip,
        seen=seen,
    )


def reg(m: Member, offset: int = 0, limit: int = 128) -> Registration:
    return Registration(member=m, offset=offset, limit=limit)


@pytest.fixture(scope="module")
def redisd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


StoreMaker = Callable[..., Store]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> StoreMaker:
    kind = request.param
    if kind == "memory":
        return lambda limits=StoreLimits(ttl=TTL): MemoryStore(limits)
    if kind == "sqlite":
        return lambda limits=StoreLimits(ttl=TTL): SqliteStore(limits, tmp_path / "t.db")
    server: RedisServer = request.getfixturevalue("redisd")
    server.flushall()
    from nattool.store.redis import RedisStore

    return lambda limits=StoreLimits(ttl=TTL): RedisStore(limits, server.url)


@asynccontextmanager
async def opened(store: Store) -> AsyncIterator[Store]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def one(store: Store, r: Registration, now: float) -> GroupView:
    [result] = await store.register([r], now)
    assert isinstance(result, GroupView), result
    return result


def ports(view: GroupView) -> list[int]:
    return [m.endpoint.port for m in view.others]


def test_replacement_by_identity(make: StoreMaker) -> None:
    async def body() -> None:
        now = time.time()
        async with opened(make()) as store:
            await one(store, reg(member("g", "aa", 1000, now)), now)
            # same identity, new NAT port: replaces, never duplicates
            await one(store, reg(member("g", "aa", 2000, now + 1)), now + 1)
            view = await one(store, reg(member("g", "bb", 3000, now + 2)), now + 2)
            assert ports(view) == [2000]
            assert view.total_others == 1
            assert view.me.endpoint.port == 3000
            got = view.others[0]
            assert (got.group, got.identity, got.lan, got.source) == (
                "g", "aa", ("192.168.1.5",), "198.51.100.7",
            )  # fmt: skip
            assert got.seen == pytest.approx(now + 1)

    run(body())


def test_newest_first_and_groups_apart(make: StoreMaker) -> None:
    async def body() -> None:
        now = time.time()
        async with opened(make()) as store:
            for i in range(4):
                await one(store, reg(member("g", f"m{i}", 1000 + i, now + i)), now + i)
            await one(store, reg(member("other", "x", 9, now + 5)), now + 5)
            view = await one(store, reg(member("g", "m9", 1999, now + 10)), now + 10)
            assert ports(view) == [1003, 1002, 1001, 1000]
            # re-registration moves a member to the front
            await one(store, reg(member("g", "m0", 1000, now + 11)), now + 11)
            view = await one(store, reg(member("g", "m9", 1999, now + 12)), now + 12)
            assert ports(view) == [1000, 1003, 1002, 1001]

    run(body())


def test_batch_in_order_sees_itself(make: StoreMaker) -> None:
    async def body() -> None:
        now = time.time()
        async with opened(make()) as store:
            batch = [reg(member("g", f"m{i}", 1000 + i, now + i / 10)) for i in range(3)]
            results = await store.register(batch, now + 1)
            assert [ports(r) for r in results if isinstance(r, GroupView)] == [
                [], [1000], [1001, 1000],
            ]  # fmt: skip
            assert await store.register([], now) == []

    run(body())


def test_paging(make: StoreMaker) -> None:
    async def body() -> None:
        now = time.time()
        async with opened(make()) as store:
            for i in range(10):
                await one(store, reg(member("g", f"m{i}", 1000 + i, now + i)), now + i)
            t = now + 20
            view = await one(store, reg(member("g", "me", 1, t), offset=0, limit=3), t)
            assert ports(view) == [1009, 1008, 1007]
            assert view.total_others == 10
            view = await one(store, reg(member("g", "me", 1, t + 1), offset=3, limit=3), t + 1)
            assert ports(view) == [1006, 1005, 1004]
            view = await one(store, reg(member("g", "me", 1, t + 2), offset=8, limit=5), t + 2)
            assert ports(view) == [1001, 1000]
            view = await one(store, reg(member("g", "me", 1, t + 3), offset=50, limit=5), t + 3)
            assert ports(view) == [] and view.total_others == 10

    run(body())


def test_ttl_is_honoured_in_reads_before_expire(make: StoreMaker) -> None:
    async def body() -> None:
        now = time.time()
        async with opened(make()) as store:
            await one(store, reg(member("g", "old", 1000, now)), now)
            await one(store, reg(member("g", "mid", 1001, now + 10)), now + 10)
            # exactly at the TTL boundary the old one is gone (seen <= now - ttl)
            t = now + TTL
            view = await one(store, reg(member("g", "new", 1002, t)), t)
            assert ports(view) == [1001]
            assert view.total_others == 1
            t = now + 10 + TTL + 0.001
            view = await one(store, reg(member("g", "new", 1002, t)), t)
            assert ports(view) == [] and view.total_others == 0

    run(body())


def test_expire_drops_old_members(make: StoreMaker) -> None:
    async def body() -> None:
        now = time.time()
        old = now - TTL - 10
        async with opened(make()) as store:
            for i in range(3):
                await one(store, reg(member(f"g{i}", "old", 1000 + i, old)), old)
            await one(store, reg(member("fresh", "x", 2000, now)), now)
            gone = await store.expire(now)
            assert gone == 3
            stats = await store.stats()
            assert (stats.groups, stats.members) == (1, 1)
            assert await store.expire(now) == 0

    run(body())


def test_cap_members_per_group_evicts_oldest(make: StoreMaker) -> None:
    async def body() -> None:
        now = time.time()
        limits = StoreLimits(ttl=TTL, max_members_per_group=3)
        async with opened(make(limits)) as store:
            for i in range(3):
                await one(store, reg(member("g", f"m{i}", 1000 + i, now + i)), now + i)
            # a known identity never evicts anyone
            await one(store, reg(member("g", "m1", 1001, now + 3)), now + 3)
            view = await one(store, reg(member("g", "m3", 1003, now + 4)), now + 4)
            assert ports(view) == [1001, 1002]  # m0, the least recently seen, went
            assert view.total_others == 2

    run(body())


def test_cap_groups_per_source(make: StoreMaker) -> None:
    async def body() -> None:
        now = time.time()
        limits = StoreLimits(ttl=TTL, max_groups_per_source=2)
        async with opened(make(limits)) as store:
            await one(store, reg(member("g1", "a", 1000, now)), now)
            await one(store, reg(member("g2", "a", 1001, now)), now)
            [refused] = await store.register([reg(member("g3", "a", 1002, now))], now)
            assert isinstance(refused, LimitError)
            # the refused member is nowhere to be seen
            view = await one(store, reg(member("g3", "b", 7, now + 1, ip="203.0.113.9")), now + 1)
            assert ports(view) == []
            # more members in a group the source already uses are fine
            await one(store, reg(member("g1", "c", 1003, now + 1)), now + 1)
            # after the TTL (and the periodic expire) the source may use new groups
            t = now + TTL + 1
            await store.expire(t)
            await one(store, reg(member("g4", "a", 1004, t)), t)

    run(body())


def test_cap_total_members(make: StoreMaker) -> None:
    async def body() -> None:
        now = time.time()
        limits = StoreLimits(ttl=TTL, max_members=4)
        async with opened(make(limits)) as store:
            for i in range(4):
                ip = f"203.0.113.{i + 1}"
                await one(store, reg(member(f"g{i}", "a", 1000 + i, now, ip=ip)), now)
            [refused] = await store.register([reg(member("g9", "z", 9, now + 1))], now + 1)
            assert isinstance(refused, LimitError)
            # known members still refresh
            await one(store, reg(member("g0", "a", 1000, now + 2, ip="203.0.113.1")), now + 2)

    run(body())


def test_trackers(make: StoreMaker) -> None:
    async def body() -> None:
        now = time.time()
        limits = StoreLimits(ttl=TTL, max_trackers=3)
        a, b, c, d = (Endpoint.from_text(t) for t in (
            "127.0.0.1:43283", "[::1]:43283", "127.0.0.2:9", "127.0.0.3:9",
        ))  # fmt: skip
        async with opened(make(limits)) as store:
            await store.save_tracker(TrackerRecord(a, now + 100))
            await store.save_tracker(TrackerRecord(b, now + 300))
            await store.save_tracker(TrackerRecord(c, now + 10))
            await store.save_tracker(TrackerRecord(d, now + 500))  # over the cap
            loaded = await store.load_trackers(now)
            assert [r.endpoint for r in loaded] == [b, a, c]  # soonest to expire last
            assert loaded[0].expires == pytest.approx(now + 300)
            await store.save_tracker(TrackerRecord(c, now + 1000))  # refresh
            assert [r.endpoint for r in await store.load_trackers(now)] == [c, b, a]
            await store.drop_tracker(b)
            assert [r.endpoint for r in await store.load_trackers(now)] == [c, a]
            assert [r.endpoint for r in await store.load_trackers(now + 200)] == [c]
            assert (await store.stats()).trackers == 1

    run(body())


def test_stats(make: StoreMaker) -> None:
    async def body() -> None:
        now = time.time()
        async with opened(make()) as store:
            assert ((await store.stats()).groups, (await store.stats()).members) == (0, 0)
            batch = [reg(member(f"g{i % 3}", f"m{i}", 1000 + i, now)) for i in range(7)]
            await store.register(batch, now)
            stats = await store.stats()
            assert (stats.groups, stats.members, stats.trackers) == (3, 7, 0)
            assert store.describe()

    run(body())


# -- the factory -------------------------------------------------------------------


def test_factory_forms(tmp_path: Path) -> None:
    limits = StoreLimits()
    assert isinstance(open_store("memory", limits), MemoryStore)
    s = open_store(f"sqlite:{tmp_path}/x.db", limits)
    assert isinstance(s, SqliteStore) and s.path == tmp_path / "x.db"
    assert open_store("sqlite:", limits).path == default_sqlite_path()  # type: ignore[attr-defined]
    assert open_store("sqlite", limits).path == default_sqlite_path()  # type: ignore[attr-defined]
    from nattool.store.redis import RedisStore

    for spec, url in [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("rediss://u:pw@127.0.0.1:6380/2", "rediss://u:pw@127.0.0.1:6380/2"),
        ("valkey://127.0.0.1/1", "redis://127.0.0.1/1"),
        ("valkeys://127.0.0.1", "rediss://127.0.0.1"),
    ]:
        store = open_store(spec, limits)
        assert isinstance(store, RedisStore) and store.url == url
    assert "pw" not in open_store("rediss://u:pw@127.0.0.1:6380/2", limits).describe()


@pytest.mark.parametrize(
    "spec", ["", "mem", "postgres://x", "redis://", "redis://h:notaport/0", "redis://h/x"]
)
def test_factory_rejects(spec: str) -> None:
    with pytest.raises(UsageError) as info:
        open_store(spec, StoreLimits())
    assert "memory" in str(info.value) and "sqlite:PATH" in str(info.value)


def test_default_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    if sys.platform in ("win32", "darwin"):
        pytest.skip("XDG applies to Linux and other Unixes")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_sqlite_path() == tmp_path / "nattool" / "tracker.db"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    assert default_sqlite_path() == Path.home() / ".local" / "state" / "nattool" / "tracker.db"


def test_redis_unreachable_open_is_a_store_error() -> None:
    from nattool.store.redis import RedisStore

    store = RedisStore(StoreLimits(), f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach"):
        run(store.open())
    assert time.monotonic() - started < 3
