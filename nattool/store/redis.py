"""Redis / Valkey store: several trackers on one Redis form one logical tracker.

Data model (all times are wall-clock seconds, scores are ``seen``):

- ``nt:{G}:m``  sorted set identity -> seen, one per group ``G``
- ``nt:{G}:d``  hash identity -> encoded member
  Both carry the hash tag ``{G}``, so a group lives in one Redis Cluster slot and
  one Lua script can touch both. Their key TTL (the member TTL plus a second) is
  refreshed on each write: an abandoned group is deleted by Redis itself. Inside a
  live group, members older than ``now - ttl`` are removed by the registration
  script before it answers, so a stale member is never returned.
- ``nt:src:{S}`` sorted set group -> seen for source ``S``: the groups-per-source
  cap. A different slot than the group, so it is a separate script sent in the
  same pipeline; when it refuses a *new* identity, a second round trip removes
  what the group script wrote (rare: only an over-cap source pays it). If the
  tracker dies between the two, the member stays until its TTL.
- ``nt:live`` sorted set "G<US>identity" -> seen and ``nt:groups`` group -> seen:
  counts for stats() and an *approximate* total-members cap (the count read at
  the end of one batch decides whether the next batch may add new identities).
  They cost one ZADD each per registration in the same pipeline and are trimmed
  by ``expire()`` in bounded steps. Evicted members leave ``nt:live`` at the next
  batch, so the count may run a little high, never low.
- ``nt:trackers`` sorted set endpoint -> expires.

A batch is ONE pipeline (one round trip): per registration an EVALSHA of the
source script, an EVALSHA of the group script and two ZADDs, then one ZCOUNT. No
KEYS or SCAN anywhere.

When Redis is down or slow, ``register()`` answers every entry of the batch with a
StoreError within ``timeout`` seconds, then fails fast (no network) until a
backoff delay has passed, doubling up to ``max_backoff``. Nothing is queued.
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

DEFAULT_TIMEOUT = 0.5
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 2.0
EXPIRE_BATCH = 2000
_FIELD_SEP = "\x1f"
_LAN_SEP = "\x1e"
LIVE_KEY = "nt:live"
GROUPS_KEY = "nt:groups"
TRACKERS_KEY = "nt:trackers"

# Scores and horizons are passed as strings and handed to Redis untouched: Lua
# would print a number with 14 digits and move the TTL boundary.
_GROUP_SCRIPT = """
local m, d = KEYS[1], KEYS[2]
local id, enc, seen, horizon = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local keyttl, maxm, full = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == '1'
local offset, limit = tonumber(ARGV[8]), tonumber(ARGV[9])
while true do
  local stale = redis.call('ZRANGEBYSCORE', m, '-inf', horizon, 'LIMIT', 0, 256)
  if #stale == 0 then break end
  redis.call('ZREM', m, unpack(stale))
  redis.call('HDEL', d, unpack(stale))
  if #stale < 256 then break end
end
local existed = 1
local evicted = ''
if not redis.call('ZSCORE', m, id) then
  existed = 0
  if full then return {2} end
  if redis.call('ZCARD', m) >= maxm then
    local oldest = redis.call('ZPOPMIN', m, 1)
    if #oldest > 0 then
      evicted = oldest[1]
      redis.call('HDEL', d, evicted)
    end
  end
end
redis.call('ZADD', m, seen, id)
redis.call('HSET', d, id, enc)
redis.call('PEXPIRE', m, keyttl)
redis.call('PEXPIRE', d, keyttl)
local total = redis.call('ZCARD', m) - 1
local ids = redis.call('ZREVRANGE', m, 0, offset + limit)
local page = {}
local skip = offset
for _, other in ipairs(ids) do
  if other ~= id then
    if skip > 0 then
      skip = skip - 1
    elseif #page < limit then
      page[#page + 1] = other
    end
  end
end
local out = {existed, evicted, total}
if #page > 0 then
  local encs = redis.call('HMGET', d, unpack(page))
  for i, other in ipairs(page) do
    out[#out + 1] = other
    out[#out + 1] = encs[i]
  end
end
return out
"""

_SOURCE_SCRIPT = """
local src = KEYS[1]
redis.call('ZREMRANGEBYSCORE', src, '-inf', ARGV[3])
if not redis.call('ZSCORE', src, ARGV[1]) and redis.call('ZCARD', src) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', src, ARGV[2], ARGV[1])
redis.call('PEXPIRE', src, tonumber(ARGV[5]))
return 1
"""

_TRIM_SCRIPT = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return #gone
"""

_SAVE_TRACKER_SCRIPT = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""

_SCRIPTS = {
    "group": _GROUP_SCRIPT,
    "source": _SOURCE_SCRIPT,
    "trim": _TRIM_SCRIPT,
    "tracker": _SAVE_TRACKER_SCRIPT,
}


def group_keys(group: str) -> tuple[str, str]:
    return f"nt:{{{group}}}:m", f"nt:{{{group}}}:d"


def source_key_name(source: str) -> str:
    return f"nt:src:{{{source}}}"


def _num(value: float) -> str:
    return repr(float(value))


def _encode(member: Member) -> str:
    return _FIELD_SEP.join(
        (member.endpoint_text, _LAN_SEP.join(member.lan), member.source, _num(member.seen))
    )


def _decode(group: str, identity: str, text: str) -> Member:
    parts = text.split(_FIELD_SEP)
    if len(parts) != 4:
        raise ProtocolError(f"bad stored member in group {group!r}")
    endpoint, lan, source, seen = parts
    try:
        when = float(seen)
    except ValueError:
        raise ProtocolError(f"bad stored member in group {group!r}") from None
    return Member(
        group=group,
        identity=identity,
        endpoint=Endpoint.from_text(endpoint),
        lan=tuple(lan.split(_LAN_SEP)) if lan else (),
        source=source,
        seen=when,
    )


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
    """Shared state in Redis or Valkey."""

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
        self._client: aioredis.Redis | None = None
        self._sha: dict[str, str] = {}
        self._live_count = 0
        # Entries of nt:live to remove at the next round trip (evicted members).
        # Bounded: past the cap they are left for expire() to trim by score.
        self._pending_unlive: list[str] = []
        self._retry_at = 0.0
        self._backoff = 0.0
        self.counters: dict[str, float] = {
            "batches": 0.0,
            "failures": 0.0,
            "timeouts": 0.0,
            "fast_fails": 0.0,
            "reconnects": 0.0,
            "round_trip_seconds": 0.0,
        }

    def describe(self) -> str:
        return redact(self.url)

    # -- lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        self._client = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # Our own backoff decides when to try again; the client must not
            # retry inside one call and stretch it past the timeout.
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            decode_responses=True,
            health_check_interval=0,
        )
        try:
            async with asyncio.timeout(self.timeout * 4):
                await self._client.ping()
                await self._load_scripts()
        except (RedisError, OSError, TimeoutError) as exc:
            await self._client.aclose()
            self._client = None
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
        for name, body in _SCRIPTS.items():
            self._sha[name] = await client.script_load(body)

    def _require(self) -> aioredis.Redis:
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
        (restart, SCRIPT FLUSH). Raises StoreError on a dead or slow Redis."""
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
        self.counters["round_trip_seconds"] += time.perf_counter() - started
        self._succeeded()
        return results

    # -- members -----------------------------------------------------------------
    async def register(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        if not batch:
            return []
        limits = self.limits
        horizon = _num(now - limits.ttl)
        keyttl = str(math.ceil(limits.ttl * 1000) + 1000)
        full = "1" if self._live_count >= limits.max_members else "0"
        sha = self._sha
        unlive, self._pending_unlive = self._pending_unlive, []

        def build(pipe: Any) -> None:
            if unlive:
                pipe.zrem(LIVE_KEY, *unlive)
            for reg in batch:
                m = reg.member
                seen = _num(m.seen)
                pipe.evalsha(
                    sha["source"], 1, source_key_name(m.source),
                    m.group, seen, horizon, limits.max_groups_per_source, keyttl,
                )  # fmt: skip
                pipe.evalsha(
                    sha["group"], 2, *group_keys(m.group),
                    m.identity, _encode(m), seen, horizon, keyttl,
                    limits.max_members_per_group, full, max(0, reg.offset), max(0, reg.limit),
                )  # fmt: skip
                pipe.zadd(LIVE_KEY, {m.group + _FIELD_SEP + m.identity: m.seen})
                pipe.zadd(GROUPS_KEY, {m.group: m.seen})
            pipe.zcount(LIVE_KEY, f"({horizon}", "+inf")

        try:
            replies = await self._run(build)
        except StoreError as exc:
            self._pending_unlive = (unlive + self._pending_unlive)[:10_000]
            return [exc] * len(batch)
        self.counters["batches"] += 1
        if unlive:
            replies = replies[1:]
        count = replies[-1]
        if isinstance(count, int):
            self._live_count = count

        results: list[RegisterResult] = []
        undo: list[Member] = []
        for i, reg in enumerate(batch):
            admitted, reply = replies[4 * i], replies[4 * i + 1]
            m = reg.member
            if isinstance(admitted, Exception) or isinstance(reply, Exception):
                err = reply if isinstance(reply, Exception) else admitted
                results.append(StoreError(f"redis refused the registration: {err}"))
                continue
            existed = reply[0]
            if existed == 2:
                self._pending_unlive.append(m.group + _FIELD_SEP + m.identity)
                results.append(LimitError("tracker full"))
                continue
            if admitted == 0 and existed == 0:
                undo.append(m)
                results.append(LimitError("too many groups from this source"))
                continue
            if reply[1]:
                self._pending_unlive.append(m.group + _FIELD_SEP + reply[1])
            results.append(self._view(m, reply))
        if undo:
            await self._undo(undo)
        del self._pending_unlive[10_000:]
        return results

    def _view(self, me: Member, reply: list[Any]) -> RegisterResult:
        others: list[Member] = []
        try:
            for j in range(3, len(reply) - 1, 2):
                if reply[j + 1] is None:  # deleted between ZREVRANGE and HMGET: cannot be
                    continue
                others.append(_decode(me.group, reply[j], reply[j + 1]))
        except ProtocolError as exc:
            return StoreError(f"redis holds data nattool did not write: {exc}")
        return GroupView(me=me, others=tuple(others), total_others=int(reply[2]))

    async def _undo(self, members: list[Member]) -> None:
        """Remove what the group script wrote for registrations that the source
        cap refused (a second round trip, paid only by over-cap sources)."""

        def build(pipe: Any) -> None:
            for m in members:
                mkey, dkey = group_keys(m.group)
                pipe.zrem(mkey, m.identity)
                pipe.hdel(dkey, m.identity)
            pipe.zrem(LIVE_KEY, *(m.group + _FIELD_SEP + m.identity for m in members))

        try:
            await self._run(build)
        except StoreError:
            pass  # they expire with their TTL; the refusal was still answered

    async def expire(self, now: float) -> int:
        """Redis expires group keys itself and the registration script drops stale
        members; here only the counting sets are trimmed, in bounded steps."""
        horizon = _num(now - self.limits.ttl)
        sha = self._sha
        unlive, self._pending_unlive = self._pending_unlive, []

        def build(pipe: Any) -> None:
            if unlive:
                pipe.zrem(LIVE_KEY, *unlive)
            pipe.evalsha(sha["trim"], 1, LIVE_KEY, horizon, EXPIRE_BATCH)
            pipe.evalsha(sha["trim"], 1, GROUPS_KEY, horizon, EXPIRE_BATCH)
            pipe.zcount(LIVE_KEY, f"({horizon}", "+inf")

        try:
            replies = await self._run(build)
        except StoreError:
            self._pending_unlive = (unlive + self._pending_unlive)[:10_000]
            raise
        if unlive:
            replies = replies[1:]
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
        horizon = _num(time.time() - self.limits.ttl)

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


__all__ = ["RedisStore", "group_keys", "redact", "source_key_name"]
