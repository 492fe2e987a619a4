"""A batch of registrations on a single Redis, in one round trip (rarely two).

Most registrations are keepalives: a known member, same endpoint, LAN list and
source. When this tracker did the member's bookkeeping (caps, key TTLs, counting
and source sets: see redis.py) within the TTL, it takes the *lane*: plain commands
pipelined, ``ZADD z XX CH ms record`` (1: the record is there and now has the new
time) and ``ZREVRANGEBYSCORE`` for its page; when the bookkeeping is due, its plain
commands too (HSET, the counting and source sets, PEXPIRE). Plain commands cost
Redis less than the same commands called from Lua, and they are written as RESP
here, not through the client's per-command machinery. The other registrations
(new or changed members) go to the batch script (redis_lua.BATCH_SCRIPT).

A lane registration whose record was not there (evicted, or changed by another
tracker) is done again by the script in a second round trip: its page may then show
registrations that came after it in the same batch. One whose page came back full
needs a ZCOUNT for its total, in that second round trip too (or in the first, for
groups whose last known size would fill the page).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Sequence

from redis.exceptions import ConnectionError, NoScriptError, RedisError, ResponseError

from nattool.errors import StoreError

try:
    # redis-py's hiredis reader is private: read_replies() reads straight from it
    # where it is there, and through redis-py's public read_response() otherwise.
    from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
except ImportError:  # pragma: no cover - a redis-py that moved it (tested in a subprocess)
    NOT_ENOUGH_DATA = object()
    _AsyncHiredisParser = None
from nattool.store.base import GroupView, Registration, RegisterResult
from nattool.store.redis_lua import HEADER_FIELDS
from nattool.store.redis import (
    CHUNK,
    GROUPS_KEY,
    REFRESH_SHARE,
    LIVE_KEY,
    ms,
    page_view,
    record_of,
    registration_args,
    view_of,
)

if TYPE_CHECKING:
    from nattool.store.redis import RedisStore

#: entries of the registrar's memo tables; each is emptied when full
MEMO_MAX = 200_000


def zkey_of(group: str) -> str:
    return _bulk(f"nt:{{{group}}}:z")


def hkey_of(group: str) -> str:
    return _bulk(f"nt:{{{group}}}:h")


def _bulk(arg: Any) -> str:
    text = str(arg)
    return f"${len(text.encode()) if not text.isascii() else len(text)}\r\n{text}\r\n"


def pack(*args: Any) -> str:
    """One command in RESP."""
    return f"*{len(args)}\r\n" + "".join(map(_bulk, args))


async def read_replies(conn: Any, count: int, deadline: asyncio.Timeout, patience: float) -> list[Any]:
    """``count`` replies from ``conn``, error replies as values. The deadline moves
    ``patience`` seconds on whenever bytes come: a Redis that answers slowly makes
    the replies late; only one that stops answering fails. With hiredis, read
    straight from its reader: redis-py's read_response() arms a timer per reply,
    which would cost more than the parsing."""
    loop = asyncio.get_running_loop()
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    replies: list[Any] = []
    if _AsyncHiredisParser is None or not isinstance(parser, _AsyncHiredisParser) or reader is None:
        for _ in range(count):
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
            deadline.reschedule(loop.time() + patience)
        return replies
    gets = reader.gets
    fill = parser.read_from_socket
    add = replies.append
    while len(replies) < count:
        reply = gets()
        while reply is NOT_ENOUGH_DATA:
            await fill()
            deadline.reschedule(loop.time() + patience)
            reply = gets()
        if isinstance(reply, ConnectionError):
            raise reply
        add(reply)
    return replies


class SingleRegistrar:
    """Registers batches on a single Redis for a :class:`RedisStore`."""

    def __init__(self, store: "RedisStore") -> None:
        self.store = store
        # group -> identity -> (its record, when this tracker last did its bookkeeping (ms))
        self.memo: dict[str, dict[str, tuple[str, int]]] = {}
        self.memo_size = 0
        # group -> the lane's command heads for it (RESP: ZADD up to the score, the
        # page read up to the horizon, ZCOUNT up to the horizon, HSET up to the
        # identity; the group as a bulk string)
        self.heads: dict[str, tuple[str, str, str, str, str]] = {}
        # group -> its members when this tracker last read it: a lane registration
        # whose page that many would fill counts the group in the same trip
        self.sizes: dict[str, int] = {}
        self.counters = store.counters
        self.counters.setdefault("lane", 0.0)
        self.counters.setdefault("lane_missed", 0.0)
        self.counters.setdefault("lane_bookkeeping", 0.0)

    def _heads(self, group: str) -> tuple[str, str, str, str, str]:
        z, h = f"nt:{{{group}}}:z", f"nt:{{{group}}}:h"
        zkey = f"${len(z.encode())}\r\n{z}\r\n"
        heads = (
            f"*6\r\n$4\r\nZADD\r\n{zkey}$2\r\nXX\r\n$2\r\nCH\r\n",
            f"*7\r\n$16\r\nZREVRANGEBYSCORE\r\n{zkey}$4\r\n+inf\r\n",
            f"*4\r\n$6\r\nZCOUNT\r\n{zkey}",
            f"*4\r\n$4\r\nHSET\r\n${len(h.encode())}\r\n{h}\r\n",
            _bulk(group),
        )
        if len(self.heads) >= MEMO_MAX:
            self.heads.clear()
            self.sizes.clear()
        self.heads[group] = heads
        return heads

    async def register(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        store = self.store
        refused = store._unavailable()
        if refused is not None:
            return [refused] * len(batch)
        fresh_after = ms(now) - ms(store.limits.ttl * REFRESH_SHARE)
        live_after = ms(now - store.limits.ttl)
        horizon = f"({live_after}"
        horizon_bulk = f"${len(horizon)}\r\n{horizon}\r\n$5\r\nLIMIT\r\n$1\r\n0\r\n"
        horizon_count = f"${len(horizon)}\r\n{horizon}\r\n$4\r\n+inf\r\n"
        tails: dict[int, str] = {}  # want -> the end of the page read
        sizes = self.sizes
        size_of = sizes.get
        memo_get = self.memo.get
        heads_get = self.heads.get
        header = store.script_header("s", now, -1)
        assert len(header) == HEADER_FIELDS
        sha = store._sha["batch"]
        results: list[Any] = [None] * len(batch)
        records: list[str] = []
        # The pipeline keeps the order of each group's registrations, not across
        # groups: it goes in levels, a script call for the registrations at level
        # 0, the lane for those at level 1, a script call for level 2... A group's
        # registrations take the first level of their kind at or after its last one.
        levels: list[list[Any]] = []
        level_of: dict[str, int] = {}
        level_get = level_of.get
        laned: dict[tuple[str, str, str], int] = {}
        repeats: dict[int, int] = {}  # a lane registration -> the same one earlier in the batch
        kept_groups: set[str] = set()  # groups whose key TTLs this batch renews
        kept: set[Any] = set()  # sources and (source, group) pairs this batch renews
        keyttl = _bulk(header[2])
        zadd_live = f"*4\r\n$4\r\nZADD\r\n{_bulk(LIVE_KEY)}"
        zadd_groups = f"*4\r\n$4\r\nZADD\r\n{_bulk(GROUPS_KEY)}"
        stamp = ""
        last_seen = -1.0
        score = ""
        for i, reg in enumerate(batch):
            m, offset, limit = reg
            group = m[0]
            rec = f"{m[1]}\x1f{m[2]}\x1f{m[3]}\x1f{m[4]}"
            records.append(rec)
            known = memo_get(group)
            entry = known.get(m[1]) if known is not None else None
            level = level_get(group)
            # a member this tracker knows live (bookkeeping within the TTL), unchanged
            if entry is not None and entry[1] > live_after and entry[0] == rec:
                level = 1 if level is None else level | 1
                if m[5] != last_seen:
                    last_seen = m[5]
                    text = str(int(last_seen * 1000))
                    score = f"${len(text)}\r\n{text}\r\n"
                    stamp = f"\x1e{text}"
                want = (offset if offset > 0 else 0) + (limit if limit > 0 else 0) + 1
                tail = tails.get(want)
                if tail is None:
                    tail = tails[want] = f"{horizon_bulk}${len(str(want))}\r\n{want}\r\n"
                key = (group, m[1], score)
                first = laned.get(key)
                if first is not None:
                    repeats[i] = first  # its ZADD will find the same score: CH says 0
                else:
                    laned[key] = i
                zadd, zread, zcount, hset, gbulk = heads_get(group) or self._heads(group)
                zadd = f"{zadd}{score}${len(rec)}\r\n{rec}\r\n"
                extra = 0
                if entry[1] <= fresh_after:
                    # bookkeeping due, the member unchanged: its record's stamp, the
                    # counting and source sets, key TTLs, as plain commands too
                    ident = m[1]
                    live = f"{group}\x1f{ident}"
                    value = rec + stamp
                    zadd += (
                        f"{hset}${len(ident)}\r\n{ident}\r\n${len(value)}\r\n{value}\r\n"
                        f"{zadd_live}{score}${len(live)}\r\n{live}\r\n"
                    )
                    extra = 2
                    # once per batch: a source's set, its pairs with groups, a group's keys
                    pair = (m[4], group)
                    if pair not in kept:
                        kept.add(pair)
                        src = f"nt:src:{{{m[4]}}}"
                        zadd += f"*4\r\n$4\r\nZADD\r\n${len(src)}\r\n{src}\r\n{score}{gbulk}"
                        extra += 1
                        if m[4] not in kept:
                            kept.add(m[4])
                            zadd += f"*3\r\n$7\r\nPEXPIRE\r\n${len(src)}\r\n{src}\r\n{keyttl}"
                            extra += 1
                    if group not in kept_groups:
                        kept_groups.add(group)
                        zadd += (
                            f"*3\r\n$7\r\nPEXPIRE\r\n{zkey_of(group)}{keyttl}"
                            f"*3\r\n$7\r\nPEXPIRE\r\n{hkey_of(group)}{keyttl}"
                            f"{zadd_groups}{score}{gbulk}"
                        )
                        extra += 3
                if size_of(group, want) + 2 >= want:
                    # the page will likely be full: its total in the same trip
                    item: Any = ((i, extra, 1), f"{zadd}{zread}{tail}{zcount}{horizon_count}")
                elif extra:
                    item = ((i, extra, 0), f"{zadd}{zread}{tail}")
                else:
                    item = (i, f"{zadd}{zread}{tail}")  # the common case: two replies
            else:
                if entry is not None:
                    # changed or due: its later registrations in this batch follow it
                    # through the script
                    del known[m[1]]  # type: ignore[union-attr]
                level = 0 if level is None else level + (level & 1)
                item = i
            level_of[group] = level
            while len(levels) <= level:
                levels.append([])
            levels[level].append(item)
        # What the pipeline's replies answer, in order: an index (a lane
        # registration: two replies), a 1-tuple of an index (three: the count too),
        # or a list of indexes (one script call).
        plan: list[Any] = []
        out: list[str] = []
        count = 0
        for level, items in enumerate(levels):
            if level & 1:
                for step, command in items:
                    out.append(command)
                    plan.append(step)
                    count += 2 if step.__class__ is int else 2 + step[1] + step[2]
                continue
            for k in range(0, len(items), CHUNK):
                run = items[k : k + CHUNK]
                out.append(pack("EVALSHA", sha, 2, LIVE_KEY, GROUPS_KEY, *header,
                                *registration_args([batch[i] for i in run])))  # fmt: skip
                plan.append(run)
                count += 1
        text = "".join(out)
        data = text.encode()
        if len(data) != len(text):  # not all ASCII: the lane wrote lengths in characters
            return await self._all_by_script(batch, now)
        try:
            replies = await self._exchange(data, count)
        except StoreError as exc:
            return [exc] * len(batch)

        cache = store.records
        pages_get = cache.pages.get
        new_tuple = tuple.__new__
        again: list[int] = []
        totals: list[int] = []  # lane registrations whose page came back full
        k = 0
        lane = booked = 0
        for step in plan:
            kind = step.__class__
            if kind is list:
                reply = replies[k]
                k += 1
                if isinstance(reply, NoScriptError):
                    again += step
                    continue
                self._script_results(batch, step, reply, results)
                continue
            if kind is int:
                changed, page = replies[k], replies[k + 1]
                k += 2
                extra = 0
                total = None
            else:
                step, extra, counted = step
                changed = replies[k]
                k += 1 + extra
                page = replies[k]
                k += 1
                if counted:
                    total = replies[k]
                    k += 1
                else:
                    total = None
            # 0: not there (or there with that score already: a repeat in the batch)
            if page.__class__ is not list or (changed != 1 and (step not in repeats or repeats[step] in again)):
                again.append(step)
                continue
            lane += 1
            reg = batch[step]
            if extra:  # in plan order: a later script call may change the record
                self._remember(batch, [(step, int(reg[0][5] * 1000))])
                booked += 1
            if len(page) > reg[1] + reg[2]:
                if total.__class__ is not int:
                    sizes[reg[0][0]] = len(page)  # at least: its next lane counts
                    totals.append(step)
                    results[step] = page
                    continue
            else:
                total = len(page)
            group = reg[0][0]
            sizes[group] = total
            # page_view's first case, inline: this member's page as it last read it
            last = pages_get(records[step])
            if last is not None and last[0] == page and last[2] == group and reg[1] <= 0:
                results[step] = new_tuple(GroupView, (reg[0], last[1], total - 1))
            else:
                results[step] = page_view(reg, records[step], page, 0, total - 1, cache)
        self.counters["lane"] += lane
        self.counters["lane_bookkeeping"] += booked
        if again or totals:
            self.counters["lane_missed"] += len(again)
            await self._second_trip(batch, sorted(again), totals, records, results, now)
        return results

    def _remember(self, batch: Sequence[Registration], done: list[tuple[int, int]]) -> None:
        """Note the records of these registrations and when their bookkeeping was
        done (ms)."""
        memo = self.memo
        for i, stamp in done:
            member = batch[i].member
            if self.memo_size >= MEMO_MAX:
                memo.clear()
                self.memo_size = 0
            known = memo.get(member[0])
            if known is None:
                known = memo[member[0]] = {}
            known[member[1]] = (record_of(member), stamp)
            self.memo_size += 1

    def _script_results(self, batch: Sequence[Registration], step: list[int], reply: Any, results: list[Any]) -> None:
        if isinstance(reply, Exception) or not isinstance(reply, list):
            error = StoreError(f"redis refused the registrations: {reply}")
            for i in step:
                results[i] = error
            return
        done = []
        sizes = self.sizes
        for i, text in zip(step, reply):
            flag, result = view_of(batch[i], text, self.store.records)
            results[i] = result
            if flag[:1] in ("f", "n", "r") and isinstance(result, GroupView):
                done.append((i, int(flag[1:])))
                sizes[batch[i].member[0]] = result.total_others + 1
        self._remember(batch, done)
        live = reply[-1]
        if isinstance(live, str) and live.isdigit():
            self.store._live_count = int(live)

    async def _second_trip(
        self, batch: Sequence[Registration], again: list[int], totals: list[int], records: list[str],
        results: list[Any], now: float,
    ) -> None:  # fmt: skip
        store = self.store
        header = store.script_header("s", now, -1)
        horizon = f"({ms(now - store.limits.ttl)}"
        chunks = [again[i : i + CHUNK] for i in range(0, len(again), CHUNK)]

        def build(pipe: Any) -> None:
            for chunk in chunks:
                pipe.evalsha(store._sha["batch"], 2, LIVE_KEY, GROUPS_KEY, *header,
                             *registration_args([batch[i] for i in chunk]))  # fmt: skip
            for i in totals:
                pipe.zcount(f"nt:{{{batch[i].member[0]}}}:z", horizon, "+inf")

        try:
            replies = await store._run(build)
        except StoreError as exc:
            for i in again + totals:
                results[i] = exc
            return
        for chunk, reply in zip(chunks, replies):
            self._script_results(batch, chunk, reply, results)
        for i, total in zip(totals, replies[len(chunks) :]):
            if isinstance(total, int):
                self.sizes[batch[i].member[0]] = total
                results[i] = page_view(batch[i], records[i], results[i], 0, total - 1, self.store.records)
            else:
                results[i] = StoreError(f"redis refused to count a group: {total}")

    async def _all_by_script(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        results: list[Any] = [None] * len(batch)
        await self._second_trip(batch, list(range(len(batch))), [], [], results, now)
        return results

    async def _exchange(self, data: bytes, count: int) -> list[Any]:
        """Send ``data`` (``count`` commands) on one connection and read ``count``
        replies (error replies as values)."""
        store = self.store
        client = store._require()
        pool = client.connection_pool
        started = time.perf_counter()
        conn = None
        try:
            async with asyncio.timeout(store.timeout) as deadline:
                conn = await pool.get_connection()
                await conn.send_packed_command(data, check_health=False)
                replies = await read_replies(conn, count, deadline, store.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            if conn is not None:
                await conn.disconnect()
            raise store._failed(exc) from None
        finally:
            if conn is not None:
                await pool.release(conn)
        store.counters["round_trips"] += 1
        store.counters["round_trip_seconds"] += time.perf_counter() - started
        store._succeeded()
        return replies


__all__ = ["MEMO_MAX", "SingleRegistrar", "pack"]
