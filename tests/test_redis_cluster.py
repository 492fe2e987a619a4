"""The Redis store on a real local Redis Cluster (three primaries, a replica each):
detected from any node, groups spread over every primary, two trackers one fleet,
the store contract, and a failover survived without a restart."""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import test_store_contract as contract
from conftest import TrackerFactory, TrackerProcess, ask_on, lines, udp_socket
from nattool.errors import StoreError
from nattool.protocol.endpoint import Endpoint
from nattool.store.base import GroupView, Member, Registration, StoreLimits

try:
    from redis_server import REDIS_CLI, REDIS_SERVER, SKIP_REASON, RedisCluster
except ImportError:  # tests/ imported as a package
    from tests.redis_server import REDIS_CLI, REDIS_SERVER, SKIP_REASON, RedisCluster

# One lane (pytest-xdist group): the module's cluster (six redis-servers) starts once.
pytestmark = [pytest.mark.skipif(REDIS_SERVER is None or REDIS_CLI is None, reason=SKIP_REASON),
              pytest.mark.xdist_group("redis_cluster")]

REG = "//51pwn/P2P&E2E/"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path_factory.mktemp("cluster"), primaries=3, replicas=1)
    c.start()
    yield c
    c.stop()


def member(group: str, identity: str, port: int, seen: float, ip: str = "198.51.100.7") -> Member:
    return Member(group, identity, Endpoint(ipaddress.ip_address(ip), port), (), ip, seen)


def flush(c: RedisCluster) -> None:
    for port in c.primary_ports():
        c.cli(c.node_on(port), "flushall")


def test_cluster_is_detected_from_a_replica_and_groups_spread_over_every_primary(cluster: RedisCluster) -> None:
    from nattool.store.redis import RedisStore

    flush(cluster)
    primaries = cluster.primary_ports()
    replica = next(n for n in cluster.nodes if n.port not in primaries)

    async def body() -> None:
        store = RedisStore(StoreLimits(), replica.url)
        await store.open()
        try:
            assert store.cluster and "(cluster)" in store.describe()
            now = time.time()
            batch = [Registration(member(f"spread-{g}", f"m{g}", 1000 + g, now)) for g in range(60)]
            results = await store.register(batch, now)
            assert all(isinstance(r, GroupView) for r in results), results[:3]
            stats = await store.stats()
            assert (stats.groups, stats.members) == (60, 60)
        finally:
            await store.close()

    asyncio.run(body())
    holding = {port for port in primaries if int(cluster.cli(cluster.node_on(port), "dbsize").strip() or 0) > 0}
    assert holding == primaries, f"groups only on {holding} of {primaries}"


def test_two_stores_on_the_cluster_see_each_other_at_once(cluster: RedisCluster) -> None:
    from nattool.store.redis import RedisStore

    flush(cluster)
    primaries = sorted(cluster.primary_ports())

    async def body() -> None:
        # Each through a different node: each discovers the whole cluster.
        a = RedisStore(StoreLimits(), cluster.node_on(primaries[0]).url)
        b = RedisStore(StoreLimits(), cluster.node_on(primaries[1]).url)
        await a.open()
        await b.open()
        try:
            for g in range(20):
                now = time.time()
                group = f"pair-{g}"
                [va] = await a.register([Registration(member(group, "alice", 1000 + g, now))], now)
                assert isinstance(va, GroupView) and va.others == ()
                [vb] = await b.register([Registration(member(group, "bob", 2000 + g, now + 0.01))], now + 0.01)
                assert isinstance(vb, GroupView) and [m.identity for m in vb.others] == ["alice"]
                [va] = await a.register([Registration(member(group, "alice", 1000 + g, now + 0.02))], now + 0.02)
                assert isinstance(va, GroupView) and [m.identity for m in va.others] == ["bob"]
        finally:
            await a.close()
            await b.close()

    asyncio.run(body())


CONTRACT = [
    fn for name, fn in sorted(vars(contract).items())
    if name.startswith("test_") and list(inspect.signature(fn).parameters) == ["make"]
]  # fmt: skip


@pytest.mark.parametrize("case", CONTRACT, ids=[fn.__name__[5:] for fn in CONTRACT])
def test_store_contract_on_the_cluster(cluster: RedisCluster, case: Any) -> None:
    """Every behaviour of tests/test_store_contract.py, on the cluster."""
    from nattool.store.redis import RedisStore

    flush(cluster)
    case(lambda limits=StoreLimits(ttl=contract.TTL): RedisStore(limits, cluster.url))


def test_two_servers_on_the_cluster_are_one_tracker(tracker: TrackerFactory, cluster: RedisCluster) -> None:
    flush(cluster)
    ports = sorted(cluster.primary_ports())
    a: TrackerProcess = tracker(store=cluster.node_on(ports[0]).url)
    b: TrackerProcess = tracker(store=cluster.node_on(ports[2]).url)
    assert "(cluster)" in a.banner
    with udp_socket("127.0.0.2") as alice, udp_socket("127.0.0.3") as bob:
        me_a = "127.0.0.2:%d" % alice.getsockname()[1]
        me_b = "127.0.0.3:%d" % bob.getsockname()[1]
        for g in range(6):
            group = f"fleet-c{g}"
            assert lines(ask_on(alice, f"{REG}{group}/0/0/aa:00:00:00:00:01".encode(), a)) == [me_a]
            assert lines(ask_on(bob, f"{REG}{group}/0/0/aa:00:00:00:00:02".encode(), b)) == [me_b, me_a]
            assert lines(ask_on(alice, f"{REG}{group}/0/0/aa:00:00:00:00:01".encode(), b)) == [me_a, me_b]


def test_failover_loses_nothing_acknowledged_and_needs_no_restart(tmp_path: Path) -> None:
    """Kill a primary: its replica is promoted; registrations resume on the same
    store object, and every member acknowledged before (a replication interval
    ago: the replicas are at their primary's offset) is still listed."""
    from nattool.store.redis import RedisStore

    c = RedisCluster(tmp_path, primaries=3, replicas=1)
    c.start()
    try:

        async def body() -> None:
            store = RedisStore(StoreLimits(), c.url, timeout=0.5, max_backoff=0.5)
            await store.open()
            try:
                now = time.time()
                groups = [f"fo-{g}" for g in range(30)]
                batch = [Registration(member(g, "acked", 1000 + k, now)) for k, g in enumerate(groups)]
                assert all(isinstance(r, GroupView) for r in await store.register(batch, now))
                c.wait_replicated()  # the replicas have every write so far

                victim = c.node_on(sorted(c.primary_ports())[0])
                assert victim.proc is not None
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(5)
                victim.proc = None
                started = time.monotonic()
                failed = 0
                while True:
                    now = time.time()
                    batch = [Registration(member(g, "late", 2000 + k, now)) for k, g in enumerate(groups)]
                    results = await store.register(batch, now)
                    if all(isinstance(r, GroupView) for r in results):
                        break
                    assert all(isinstance(r, (GroupView, StoreError)) for r in results), results
                    failed += 1
                    assert time.monotonic() - started < 30, f"registrations did not resume: {results[:2]}"
                    await asyncio.sleep(0.2)
                assert failed >= 1  # the killed primary held some of the groups
                for g, view in zip(groups, results):
                    assert isinstance(view, GroupView)
                    assert [m.identity for m in view.others] == ["acked"], (g, view.others)
            finally:
                await store.close()

        asyncio.run(body())
    finally:
        c.stop()
