"""A batch of registrations on a Redis Cluster.

The keys of a group share its hash tag, so a group lives in one slot; the source
sets and the counting sets live in slots of their own. A batch is split by node:

1. one batch-script call per node (mode 'c': no source cap, no counting sets)
   carries the registrations of the groups that node serves (the script may touch
   keys of several of its slots: redis_lua.CLUSTER_BATCH_SCRIPT); the cluster
   pipeline sends each node its call at once;
2. for the members that were new or due for bookkeeping (half a TTL at most
   once per member): the source cap (one script call per member, in the source's
   slot) and the counting sets, in one more pipeline;
3. rarely: a new member that the source cap refuses is removed again.

A failover (a primary gone, its replica promoted) fails the batches in flight
with a StoreError; redis-py then learns the new slot table, and the store's
backoff retries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from nattool.errors import StoreError
from nattool.store.base import Registration, RegisterResult
from nattool.store.redis import (
    CHUNK,
    GROUPS_KEY,
    LIVE_KEY,
    SOURCE_FULL,
    group_keys,
    ms,
    record_of,
    registration_args,
    source_key_name,
    view_of,
)

if TYPE_CHECKING:
    from nattool.store.redis import RedisStore


async def cluster_client(url: str, options: dict[str, Any]) -> RedisCluster:
    """A cluster client that found the other nodes from the one in ``url``."""
    client = RedisCluster.from_url(
        url,
        # One retry (a moved slot); our own backoff does the rest: a batch must
        # fail within the store's timeout.
        retry=Retry(NoBackoff(), 1),
        **options,
    )
    await client.initialize()
    return client


async def register_on_cluster(store: "RedisStore", batch: Sequence[Registration], now: float) -> list[RegisterResult]:
    client = store._require()
    by_node: dict[str, list[int]] = {}
    nodes: dict[str, str] = {}  # group -> the name of the node serving it
    try:
        for i, reg in enumerate(batch):
            group = reg.member[0]
            node = nodes.get(group)
            if node is None:
                node = nodes[group] = client.get_node_from_key(group_keys(group)[0]).name
            by_node.setdefault(node, []).append(i)
    except RedisError as exc:  # a slot no node serves (the cluster is failing over)
        error = store._failed(exc)
        return [error] * len(batch)
    calls = [part[k : k + CHUNK] for part in by_node.values() for k in range(0, len(part), CHUNK)]
    header = store.script_header("c", now, store._live_count)
    sha = store._sha

    def first(pipe: Any) -> None:
        for call in calls:
            # One declared key routes the call to its node; the script reaches the
            # other groups' keys there, undeclared.
            pipe.evalsha(sha["batch"], 1, group_keys(batch[call[0]].member[0])[0], *header,
                         *registration_args([batch[i] for i in call]))  # fmt: skip

    try:
        replies = await store._run(first)
    except StoreError as exc:
        return [exc] * len(batch)
    results: list[Any] = [None] * len(batch)
    booked: list[tuple[int, bool]] = []  # (index, new) of members due for bookkeeping
    for call, reply in zip(calls, replies):
        if isinstance(reply, Exception) or not isinstance(reply, list):
            error = StoreError(f"redis refused the registrations: {reply}")
            for i in call:
                results[i] = error
            continue
        for i, text in zip(call, reply):
            flag, results[i] = view_of(batch[i], text, store.records)
            if flag[:1] in ("n", "r"):
                booked.append((i, flag[0] == "n"))
    if booked:
        await _bookkeeping(store, batch, booked, results, now)
    return results


async def _bookkeeping(
    store: "RedisStore", batch: Sequence[Registration], booked: list[tuple[int, bool]], results: list[Any],
    now: float,
) -> None:  # fmt: skip
    """Phase 2 (and 3): the source cap and the counting sets of the members that
    were new or due."""
    limits = store.limits
    header = store.script_header("c", now, 0)
    horizon, keyttl = header[1], header[2]
    sha = store._sha

    def second(pipe: Any) -> None:
        for i, _new in booked:
            m = batch[i].member
            seen = ms(m[5])
            pipe.evalsha(sha["source"], 1, source_key_name(m[4]), m[0], seen, horizon,
                         limits.max_groups_per_source, keyttl)  # fmt: skip
            pipe.zadd(LIVE_KEY, {f"{m[0]}\x1f{m[1]}": seen})
            pipe.zadd(GROUPS_KEY, {m[0]: seen})
        pipe.zcount(LIVE_KEY, f"({horizon}", "+inf")

    try:
        replies = await store._run(second)
    except StoreError:
        # The registrations stand; the member joins the counts and its source's
        # set at its next bookkeeping (half a TTL on).
        return
    count = replies[-1]
    if isinstance(count, int):
        store._live_count = count
    refused = [i for k, (i, new) in enumerate(booked) if new and replies[3 * k] == 0]
    if not refused:
        return
    for i in refused:
        results[i] = SOURCE_FULL

    def undo(pipe: Any) -> None:
        for i in refused:
            m = batch[i].member
            z, h = group_keys(m[0])
            pipe.zrem(z, record_of(m))
            pipe.hdel(h, m[1])
            pipe.zrem(LIVE_KEY, f"{m[0]}\x1f{m[1]}")

    try:
        await store._run(undo)
    except StoreError:
        pass  # they expire with their TTL; the refusal was still answered


__all__ = ["cluster_client", "register_on_cluster"]
