"""Store-level registration throughput: memory vs sqlite (vs redis), side by side.

    python benchmarks/store_bench.py [--seconds 2] [--redis redis://127.0.0.1:6379/0]

Not run in CI. Each store gets the same stream of registrations (re-registrations
of a fixed population spread over many groups, as a busy tracker sees), fed as
register() batches of several sizes: 1 is a quiet server (one datagram per loop
turn), larger sizes are what group commit sees under load. Prints registrations/s
and the sqlite/memory ratio per batch size.

"sqlite-thread" runs the same store with the commit moved to a worker thread, to
back the choice of committing in the loop thread.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from nattool.protocol.endpoint import Endpoint
from nattool.store.base import Member, Registration, RegisterResult, Store, StoreLimits
from nattool.store.memory import MemoryStore
from nattool.store.sqlite import LoneSqliteStore, SqliteStore

POPULATION = 50_000
GROUPS = 12_500


class ThreadCommitSqliteStore(LoneSqliteStore):
    """For comparison only: the commit runs in a worker thread."""

    async def register(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        results, written, _evicted = self.index.register_batch(batch, now)
        if written:
            await asyncio.to_thread(self._commit, written)
        return results


def make_batches(size: int, count: int) -> list[list[Registration]]:
    batches = []
    n = 0
    for _ in range(count):
        batch = []
        for _ in range(size):
            k = (n * 7919) % POPULATION
            ip = ipaddress.IPv4Address(0xC6336400 + k % 200)  # 198.51.100.0/24
            batch.append(
                Registration(
                    Member(
                        group=f"{k % GROUPS:08x}-0000-4000-8000-000000000000",
                        identity=f"02:00:00:{k >> 16 & 255:02x}:{k >> 8 & 255:02x}:{k & 255:02x}",
                        endpoint=Endpoint(ip, 1024 + k % 50000),
                        lan=("192.168.1.10",),
                        source=str(ip),
                        seen=0.0,
                    ),
                    limit=16,
                )
            )
            n += 1
        batches.append(batch)
    return batches


async def measure(store: Store, size: int, seconds: float) -> float:
    """Registrations per second through register() (and the periodic expire())
    for about ``seconds``; building the batches is not timed."""
    await store.open()
    try:
        batches = make_batches(size, max(1, 20_000 // size))
        done = 0
        busy = 0.0
        deadline = time.perf_counter() + seconds
        i = 0
        last_expire = time.perf_counter()
        while time.perf_counter() < deadline:
            now = time.time()
            batch = [
                dataclasses.replace(r, member=dataclasses.replace(r.member, seen=now))
                for r in batches[i % len(batches)]
            ]
            t0 = time.perf_counter()
            await store.register(batch, now)
            if t0 - last_expire >= 1.0:  # the server's ~1 s expiry tick
                await store.expire(now)
                last_expire = t0
            busy += time.perf_counter() - t0
            done += len(batch)
            i += 1
    finally:
        await store.close()
    return done / busy


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per store, per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved; best kept")
    parser.add_argument("--sizes", default="1,8,64,256")
    parser.add_argument("--redis", help="also measure a RedisStore at this URL (loopback only)")
    args = parser.parse_args()
    limits = StoreLimits(ttl=120.0, max_groups_per_source=100_000)
    sizes = [int(s) for s in args.sizes.split(",")]
    names = ["memory", "sqlite", "sqlite-thread"] + (["redis"] if args.redis else [])

    def build(name: str, tmp: Path, tag: str) -> Store:
        if name == "memory":
            return MemoryStore(limits)
        if name == "sqlite":
            return SqliteStore(limits, tmp / f"a{tag}.db")
        if name == "sqlite-thread":
            return ThreadCommitSqliteStore(limits, tmp / f"b{tag}.db")
        from nattool.store.redis import RedisStore

        return RedisStore(limits, args.redis)

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        print(f"{'batch':>6} {'store':>14} {'reg/s':>12} {'vs memory':>10}")
        for size in sizes:
            best = dict.fromkeys(names, 0.0)
            # Interleave the stores so that a noisy neighbour hurts them alike.
            for r in range(args.rounds):
                for name in names:
                    rate = await measure(build(name, tmp, f"{size}-{r}"), size, args.seconds)
                    best[name] = max(best[name], rate)
            for name in names:
                ratio = best[name] / best["memory"]
                print(f"{size:>6} {name:>14} {best[name]:>12,.0f} {ratio:>10.0%}")


if __name__ == "__main__":
    asyncio.run(main())
