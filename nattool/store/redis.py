"""Redis / Valkey store: several trackers on one Redis, or one Redis Cluster, form
one logical tracker.

Data model (times are integer wall-clock milliseconds; nt:trackers has seconds):

- ``nt:{G}:z``  sorted set, one per group ``G``: record -> seen, where the record is
  "identity US endpoint US lan US source" (US = \\x1f). A page of a group is ONE
  ZREVRANGEBYSCORE: the records carry what a reply needs.
- ``nt:{G}:h``  hash identity -> record RS stamp (RS = \\x1e): finds a member's record
  by identity; ``stamp`` is when the slower bookkeeping below was last done.
  Both keys carry the hash tag ``{G}``, so a group lives in one Redis Cluster slot.
  Their key TTL (TTL + refresh + 1 s) is renewed with the bookkeeping: an abandoned
  group is deleted by Redis itself. Members older than ``now - ttl`` are never
  returned (the read starts at the horizon) and are trimmed at the bookkeeping.
- ``nt:src:{S}`` sorted set group -> stamp for source ``S``: the groups-per-source cap.
- ``nt:live`` sorted set "G US identity" -> stamp and ``nt:groups`` group -> stamp:
  counts for stats() and an *approximate* total-members cap; trimmed by ``expire()``
  in bounded steps.
- ``nt:trackers`` sorted set endpoint -> expires.

The bookkeeping (caps, stale trimming, key TTLs, the source and counting sets) is
done when a member is new, changed (endpoint, LAN list, source), or its stamp is
older than ``refresh`` (half the TTL). A keepalive in between costs Redis a
ZADD and the read of its page. So the counting sets hold a member's bookkeeping
time, not its latest registration: a member that stopped registering leaves the
counts up to ``refresh`` seconds before its TTL ends, and the total-members cap is
approximate.

Single Redis (redis_single.py): a batch goes in one round trip; keepalives of
members this tracker knows as plain pipelined commands, the rest as one Lua call
(redis_lua.py) per level of the batch. Redis Cluster (redis_cluster.py): one Lua
call per slot, then the source and counting sets. No KEYS or SCAN anywhere.

Failures: when Redis is down or stalled (nothing from it for ``timeout`` seconds),
``register()`` answers every entry of the batch with a StoreError, then fails fast
(no network) until a backoff delay has passed, doubling up to ``max_backoff``. A
slow but answering Redis only makes replies later: on a single Redis the deadline
moves on whenever reply bytes come, and the server queues registrations while a
batch is in flight (bounded: nattool/net/server.py MAX_QUEUED_REGISTRATIONS; past
it, ERR store unavailable at once, counted as drop_overload).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from nattool.errors import LimitError, ProtocolError, StoreError
from nattool.protocol.endpoint import Endpoint
from nattool.store.base import (
    GroupView,
    Member,
    Registration,
    RegisterResult,
    Store,
    StoreLimits,
    StoreStats,
    TrackerRecord,
)
from nattool.store.redis_lua import CLUSTER_SCRIPTS, SCRIPTS

#: a Redis that sends nothing for this long is unavailable
DEFAULT_TIMEOUT = 1.0
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 2.0
EXPIRE_BATCH = 2000
#: registrations per script call: Redis runs one call without serving others
CHUNK = 256
#: registrations per round trip; a larger batch takes several
ROUND_TRIP = 4096
#: the bookkeeping of a member is redone after this share of the TTL
REFRESH_SHARE = 0.5
RECORD_SEP = "\x1f"
_REPLY_SEP = "\x1d"
LIVE_KEY = "nt:live"
GROUPS_KEY = "nt:groups"
TRACKERS_KEY = "nt:trackers"
TRACKER_FULL = LimitError("tracker full")
SOURCE_FULL = LimitError("too many groups from this source")


def group_keys(group: str) -> tuple[str, str]:
    """The group's sorted set of records and its hash identity -> record."""
    return f"nt:{{{group}}}:z", f"nt:{{{group}}}:h"


def source_key_name(source: str) -> str:
    return f"nt:src:{{{source}}}"


def _num(value: float) -> str:
    return repr(float(value))


def ms(seconds: float) -> int:
    """Wall-clock seconds as the integer milliseconds group scores are kept in
    (floored: a time and its horizon move alike)."""
    return int(seconds * 1000)


def record_of(member: Member) -> str:
    """The member as its group's sorted set holds it."""
    return f"{member[1]}{RECORD_SEP}{member[2]}{RECORD_SEP}{member[3]}{RECORD_SEP}{member[4]}"


def registration_args(batch: Sequence[Registration]) -> list[Any]:
    """The script's per-registration ARGV fields (redis_lua.FIELDS_PER_REGISTRATION)."""
    args: list[Any] = []
    add = args.extend
    for reg in batch:
        m = reg.member
        add((m[0], m[1], record_of(m), int(m[5] * 1000), m[4], max(0, reg.offset), max(0, reg.limit)))
    return args


class RecordCache:
    """Members decoded from records, per group: a keepalive's page is mostly the
    records the previous one read. Bounded: emptied when full (nattool.memo's rule).
    A cached member's ``seen`` is when this tracker first read its record, a time it
    was live: Redis holds the latest as the score, but printing scores costs it
    more than the rest of a registration, and no reply shows them.

    ``pages`` keeps, per requester's record, the last whole page it read and the
    others decoded from it: keepalives come in a steady order, so a member's page
    is usually the very same records again, and comparing them costs less than
    looking each up (a new string from Redis is hashed for that). Bounded by the
    records it holds, emptied when full too."""

    def __init__(self, limit: int = 200_000) -> None:
        self.groups: dict[str, dict[str, Member]] = {}
        self.size = 0
        self.limit = limit
        self.pages: dict[str, tuple[list[str], tuple[Member, ...], str]] = {}
        self.page_records = 0

    def table(self, group: str) -> dict[str, Member]:
        table = self.groups.get(group)
        if table is None:
            if self.size >= self.limit:
                self.groups.clear()
                self.size = 0
            table = self.groups[group] = {}
        return table

    def learn(self, table: dict[str, Member], group: str, rec: str, seen: float) -> Member:
        """Decode ``rec``; ValueError when nattool did not write it."""
        identity, endpoint, lan, source = rec.split(RECORD_SEP)
        member = table[rec] = tuple.__new__(Member, (group, identity, endpoint, lan, source, seen))
        self.size += 1
        return member

    def keep_page(self, own: str, group: str, page: list[str], others: tuple[Member, ...]) -> None:
        """Remember ``page`` of ``group`` (``own`` among its records) and its ``others``."""
        old = self.pages.get(own)
        if old is not None:
            self.page_records -= len(old[0])
        elif self.page_records >= self.limit:
            self.pages.clear()
            self.page_records = 0
        self.pages[own] = (page, others, group)
        self.page_records += len(page)


def page_view(
    reg: Registration, own: str, page: Sequence[str], start: int, total: int, cache: RecordCache
) -> RegisterResult:
    """The registration's view from a page of its group: records, newest first,
    from ``page[start]``."""
    me, offset, limit = reg
    group = me[0]
    if start == 0 and offset <= 0 and len(page) <= limit + 1 and page.__class__ is list:
        # The usual keepalive: the whole page, the same records as this member's
        # last one (or every record decoded before); C loops.
        last = cache.pages.get(own)
        if last is not None and last[0] == page and last[2] == group:
            return tuple.__new__(GroupView, (me, last[1], total))
        table = cache.groups.get(group) or cache.table(group)
        if own in page:
            whole = page[:]
            page.remove(own)  # type: ignore[attr-defined]  # the caller's list, read once
            known = tuple(map(table.get, page))
            if all(known):
                cache.keep_page(own, group, whole, known)  # all of the page but own: within limit
                return tuple.__new__(GroupView, (me, known, total))
        else:
            known = tuple(map(table.get, page))
            if all(known):
                return tuple.__new__(GroupView, (me, known[:limit], total))
    table = cache.groups.get(group) or cache.table(group)
    get = table.get
    try:
        if offset <= 0 and len(page) - start <= limit + 1:
            others = [get(rec) or cache.learn(table, group, rec, me[5]) for rec in page[start:] if rec != own]
            return tuple.__new__(GroupView, (me, tuple(others[:limit]), total))
        skip, room = offset, limit
        picked: list[Member] = []
        for j in range(start, len(page)):
            rec = page[j]
            if rec == own:
                continue
            if skip > 0:
                skip -= 1
                continue
            if room <= 0:
                break
            picked.append(get(rec) or cache.learn(table, group, rec, me[5]))
            room -= 1
    except ValueError:
        return StoreError(f"redis holds data nattool did not write in group {group!r}")
    return tuple.__new__(GroupView, (me, tuple(picked), total))


def view_of(reg: Registration, reply: Any, cache: RecordCache) -> "tuple[str, RegisterResult]":
    """A registration's flag field (flag and stamp) and result from its batch-script
    reply (see redis_lua)."""
    if not isinstance(reply, str):
        return "", StoreError(f"redis gave an unexpected reply: {reply!r:.80}")
    parts = reply.split(_REPLY_SEP)
    flag = parts[0]
    if flag == "F":
        return flag, TRACKER_FULL
    if flag == "S":
        return flag, SOURCE_FULL
    if len(parts) < 2 or not parts[1].lstrip("-").isdigit():
        return "", StoreError(f"redis gave an unexpected reply: {reply!r:.80}")
    return flag, page_view(reg, record_of(reg.member), parts, 2, int(parts[1]), cache)


def redact(url: str) -> str:
    """The URL without its password, for banners and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore(Store):
    """Shared state in Redis or Valkey: a single server, or any node of a cluster
    (detected at open(); the other nodes are then discovered)."""

    kind = "redis"
    shared = True

    def __init__(
        self,
        limits: StoreLimits,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        super().__init__(limits)
        self.url = url
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.cluster = False  # set by open()
        self._single: Any = None  # its SingleRegistrar when not a cluster
        self._client: Any = None  # aioredis.Redis, or RedisCluster
        self._sha: dict[str, str] = {}
        self._live_count = 0
        self.records = RecordCache()
        self._retry_at = 0.0
        self._backoff = 0.0
        self.counters: dict[str, float] = {
            "batches": 0.0,
            "round_trips": 0.0,
            "failures": 0.0,
            "timeouts": 0.0,
            "fast_fails": 0.0,
            "reconnects": 0.0,
            "round_trip_seconds": 0.0,
        }

    def describe(self) -> str:
        return redact(self.url) + (" (cluster)" if self.cluster else "")

    # -- lifecycle ---------------------------------------------------------------
    def _client_options(self) -> dict[str, Any]:
        return {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "decode_responses": True,
            "health_check_interval": 0,
            # RESP2: the replies the lane parses (flat pairs for WITHSCORES)
            "protocol": 2,
        }

    async def open(self) -> None:
        client = aioredis.Redis.from_url(
            self.url,
            # Our own backoff decides when to try again; the client must not
            # retry inside one call and stretch it past the timeout.
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            **self._client_options(),
        )
        self._client = client
        try:
            async with asyncio.timeout(self.timeout * 4):
                await client.ping()
                info = await client.info("cluster")
                if info.get("cluster_enabled"):
                    from nattool.store.redis_cluster import cluster_client

                    await client.aclose()
                    self._client = await cluster_client(self.url, self._client_options())
                    self.cluster = True
                else:
                    from nattool.store.redis_single import SingleRegistrar

                    self._single = SingleRegistrar(self)
                    self.repeats_views = True  # the lane's pages: RecordCache.pages
                await self._load_scripts()
        except (RedisError, OSError, TimeoutError) as exc:
            await self.close()
            raise StoreError(
                f"cannot reach {self.describe()}: {exc or type(exc).__name__}; "
                "start Redis/Valkey there, or use --store sqlite: or --store memory"
            ) from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _load_scripts(self) -> None:
        client = self._require()
        for name, body in (CLUSTER_SCRIPTS if self.cluster else SCRIPTS).items():
            self._sha[name] = await client.script_load(body)

    def _require(self) -> Any:
        if self._client is None:
            raise StoreError("redis store used before open()")
        return self._client

    # -- failure handling ----------------------------------------------------------
    def _unavailable(self) -> StoreError | None:
        """Fail fast while backing off, without touching the network."""
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            self.counters["fast_fails"] += 1
            return StoreError(f"redis unavailable, next try in {wait:.1f}s")
        return None

    def _failed(self, exc: BaseException) -> StoreError:
        self.counters["failures"] += 1
        if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
            self.counters["timeouts"] += 1
        self._backoff = min(self.max_backoff, max(FIRST_BACKOFF, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff
        return StoreError(f"redis failed: {type(exc).__name__}: {exc}".rstrip(": "))

    def _succeeded(self) -> None:
        if self._backoff:
            self.counters["reconnects"] += 1
            self._backoff = 0.0

    async def _run(self, build: Any) -> list[Any]:
        """Build a pipeline with ``build(pipe)``, send it, return per-command
        results (errors as values). Reloads the scripts once if Redis lost them
        (restart, failover, SCRIPT FLUSH). Raises StoreError on a dead or stalled
        Redis."""
        refused = self._unavailable()
        if refused is not None:
            raise refused
        client = self._require()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                for attempt in (1, 2):
                    pipe = client.pipeline(transaction=False)
                    build(pipe)
                    results: list[Any] = await pipe.execute(raise_on_error=False)
                    if attempt == 1 and any(isinstance(r, NoScriptError) for r in results):
                        await self._load_scripts()
                        continue
                    break
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from None
        self.counters["round_trips"] += 1
        self.counters["round_trip_seconds"] += time.perf_counter() - started
        self._succeeded()
        return results

    def script_header(self, mode: str, now: float, live: int) -> list[Any]:
        """The batch script's ARGV before the registrations (redis_lua.HEADER_FIELDS)."""
        limits = self.limits
        refresh = ms(limits.ttl * REFRESH_SHARE)
        return [
            mode, ms(now - limits.ttl), math.ceil(limits.ttl * 1000) + refresh + 1000, refresh,
            limits.max_members_per_group, limits.max_groups_per_source, limits.max_members, live,
        ]  # fmt: skip

    # -- members -----------------------------------------------------------------
    async def register(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        results: list[RegisterResult] = []
        for start in range(0, len(batch), ROUND_TRIP):
            part = batch[start : start + ROUND_TRIP]
            if self.cluster:
                from nattool.store.redis_cluster import register_on_cluster

                results += await register_on_cluster(self, part, now)
            else:
                results += await self._single.register(part, now)
        if batch:
            self.counters["batches"] += 1
        return results

    async def expire(self, now: float) -> int:
        """Redis expires group keys itself and the registration script drops stale
        members; here only the counting sets are trimmed, in bounded steps."""
        horizon = ms(now - self.limits.ttl)
        sha = self._sha

        def build(pipe: Any) -> None:
            pipe.evalsha(sha["trim"], 1, LIVE_KEY, horizon, EXPIRE_BATCH)
            pipe.evalsha(sha["trim"], 1, GROUPS_KEY, horizon, EXPIRE_BATCH)
            pipe.zcount(LIVE_KEY, f"({horizon}", "+inf")

        replies = await self._run(build)
        if isinstance(replies[-1], int):
            self._live_count = replies[-1]
        gone = replies[0]
        return gone if isinstance(gone, int) else 0

    # -- trackers ----------------------------------------------------------------
    async def save_tracker(self, record: TrackerRecord) -> None:
        sha = self._sha
        await self._run(
            lambda pipe: pipe.evalsha(
                sha["tracker"], 1, TRACKERS_KEY,
                record.endpoint.to_text(), _num(record.expires), self.limits.max_trackers,
            )  # fmt: skip
        )

    async def drop_tracker(self, endpoint: Endpoint) -> None:
        await self._run(lambda pipe: pipe.zrem(TRACKERS_KEY, endpoint.to_text()))

    async def load_trackers(self, now: float) -> list[TrackerRecord]:
        def build(pipe: Any) -> None:
            pipe.zremrangebyscore(TRACKERS_KEY, "-inf", _num(now))
            pipe.zrevrange(TRACKERS_KEY, 0, -1, withscores=True)

        replies = await self._run(build)
        if isinstance(replies[1], Exception):
            raise StoreError(f"redis refused to list trackers: {replies[1]}")
        records = []
        for text, expires in replies[1]:
            try:
                records.append(TrackerRecord(Endpoint.from_text(text), float(expires)))
            except ProtocolError:
                continue
        return records

    async def stats(self) -> StoreStats:
        horizon = ms(time.time() - self.limits.ttl)

        def build(pipe: Any) -> None:
            pipe.zcount(GROUPS_KEY, f"({horizon}", "+inf")
            pipe.zcount(LIVE_KEY, f"({horizon}", "+inf")
            pipe.zcard(TRACKERS_KEY)

        replies = await self._run(build)
        for r in replies:
            if isinstance(r, Exception):
                raise StoreError(f"redis refused stats: {r}")
        return StoreStats(
            groups=int(replies[0]),
            members=int(replies[1]),
            trackers=int(replies[2]),
            extra=dict(self.counters),
        )


__all__ = ["RedisStore", "group_keys", "record_of", "redact", "registration_args", "source_key_name", "view_of"]
