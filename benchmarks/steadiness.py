"""How steady this machine's CPU speed is: a fixed piece of Python work, timed over and
over by the thread's own CPU time, on each CPU, alone and with the other CPUs busy.

    python benchmarks/steadiness.py               # 4 s per case
    python benchmarks/steadiness.py --seconds 10

On a virtual machine the same work can take twice as long for a while (another guest on
the same physical core, the host's own work), and the thread's CPU time cannot tell:
preemption inside the guest is not counted, but a slower core is. A server at 60% of a
core then runs at 120% for that while, builds a backlog, and its p99 shows it. Run this
next to a latency benchmark to know whether the machine was steady.

The figure: the share of samples (each 20 units of work) more than 1.4 times slower
than the fastest tenth. Not run in CI.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

SLOW = 1.4  # a sample this many times slower than the fast ones is "slow"
UNITS = 20  # units of work per sample


def _unit(table: dict[str, int], keys: list[str]) -> int:
    total = 0
    for key in keys:
        total += table[key]
    return total


def samples(seconds: float) -> list[float]:
    """Microseconds of thread CPU time per unit of work, one figure per sample."""
    table = {str(i): i for i in range(20_000)}
    keys = list(table)[:2_000]
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.thread_time_ns()
        for _ in range(UNITS):
            _unit(table, keys)
        out.append((time.thread_time_ns() - began) / UNITS / 1000)
    return out


def _busy(cpu: int, seconds: float) -> None:
    os.sched_setaffinity(0, {cpu})
    samples(seconds)


def measure(cpu: int, seconds: float, others: list[int]) -> tuple[float, float, float]:
    """(fast-tenth us, median us, share of slow samples) on ``cpu``, the CPUs in
    ``others`` kept busy meanwhile."""
    busy = [multiprocessing.Process(target=_busy, args=(other, seconds + 1)) for other in others]
    for proc in busy:
        proc.start()
    try:
        os.sched_setaffinity(0, {cpu})
        got = sorted(samples(seconds))
    finally:
        for proc in busy:
            proc.join()
    fast = got[len(got) // 10]
    slow = sum(1 for s in got if s > SLOW * fast) / len(got)
    return fast, got[len(got) // 2], slow


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per case (default 4)")
    opts = ap.parse_args()
    if opts.seconds <= 0:
        ap.error("--seconds must be above 0")
    if not hasattr(os, "sched_setaffinity"):
        ap.error("needs Linux (sched_setaffinity)")
    cpus = sorted(os.sched_getaffinity(0))
    print("| CPU | others | fast tenth (us a unit) | median | slow samples (> 1.4x) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for cpu in cpus:
        rest = [c for c in cpus if c != cpu]
        for label, others in (("idle", []), ("busy", rest)):
            if label == "busy" and not rest:
                continue
            fast, median, slow = measure(cpu, opts.seconds, others)
            print(f"| {cpu} | {label} | {fast:.1f} | {median:.1f} | {slow:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
