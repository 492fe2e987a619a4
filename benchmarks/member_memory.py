"""Memory of N live members in the in-memory MemberIndex (the state every store keeps).

    python benchmarks/member_memory.py [--members 1000000] [--groups 100000]

Not run in CI. Builds the index the way registrations would (distinct groups,
identities, endpoints, one LAN address each, ~50 members per source) and prints the
growth of the process RSS and the bytes per member. No network traffic.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from nattool.protocol.endpoint import Endpoint
from nattool.store.base import Member, StoreLimits
from nattool.store.memory import MemberIndex


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=1_000_000)
    ap.add_argument("--groups", type=int, default=100_000)
    opts = ap.parse_args()
    n = opts.members
    index = MemberIndex(StoreLimits(max_members=n, max_members_per_group=1024, max_groups_per_source=1024))
    gc.collect()
    base = rss_mib()
    now = time.time()
    started = time.perf_counter()
    base_ip = int(ipaddress.IPv4Address("198.51.100.0"))  # values only: nothing is sent
    for i in range(n):
        ip = ipaddress.IPv4Address(base_ip + i // 50)  # about 50 members behind one public IP
        member = Member(
            group=f"00000001-0000-4000-8000-{i % opts.groups:012x}",
            identity=f"02:01:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}",
            endpoint=Endpoint(ip, 1024 + i % 60000),
            lan=(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",),
            source=str(ip),
            seen=now,
        )
        index.upsert(member, now)
    elapsed = time.perf_counter() - started
    gc.collect()
    grown = rss_mib() - base
    print(
        f"{len(index):,} members in {index.group_count:,} groups: RSS +{grown:,.0f} MiB "
        f"({grown * 1024 * 1024 / max(1, len(index)):,.0f} bytes/member), total RSS {rss_mib():,.0f} MiB, "
        f"built in {elapsed:.1f} s ({len(index) / elapsed:,.0f} upserts/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
