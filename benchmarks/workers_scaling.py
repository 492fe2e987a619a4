"""`nattool serve --workers 2` against `--workers 1`, each worker held to a share of
one core, so that the server and not the load generator is the limit.

    sudo python benchmarks/workers_scaling.py                # 0.4 core per worker, 3 rounds
    sudo python benchmarks/workers_scaling.py --cpu 0        # no cap: what this machine gives
    python benchmarks/workers_scaling.py --rounds 5 --json out.json

Not run in CI. On a 2-core machine the generator needs most of one core, so two
uncapped workers only take CPU from it and from each other: that measures the
machine, not the workers. Capping every worker at the same share of a core (a
cgroup CPU quota; cgroup v1 `cpu` or v2 `cpu.max`, root needed) stands in for a
machine with a core per worker: one worker gets `--cpu` of a core, two get that
each. Both servers use the embedded SQLite store (the workers share the file);
`--rate-limit 0` because the generator is one source. Rounds interleave the two
servers so that a noisy neighbour hurts both alike. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_cap import CpuCap, CpuCapError  # noqa: E402
from run_benchmarks import REPO, Server, bench_cmd, run_bench, start_nattool  # noqa: E402


def worker_pids(server: Server) -> list[int]:
    """The processes that answer: the server itself, or its spawned workers."""
    pid = server.proc.pid
    kids = [int(k) for t in Path(f"/proc/{pid}/task").iterdir() for k in (t / "children").read_text().split()]
    workers = [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
    return workers or [pid]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", type=float, default=0.4, help="share of a core per worker (0: no cap)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--workloads", default="nat,stun,register")
    ap.add_argument("--json", metavar="FILE", help="also write the runs as JSON")
    opts = ap.parse_args()
    if opts.cpu < 0 or opts.cpu > 1:
        ap.error("--cpu is a share of one core, 0 to 1")
    workloads = opts.workloads.split(",")
    cmd = bench_cmd()
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="nattool-workers-") as tmp:
        work = Path(tmp)
        for rnd in range(opts.rounds):
            for n in (1, 2):
                cap = CpuCap(opts.cpu) if opts.cpu > 0 else None
                server = start_nattool(work, ("--workers", str(n), "--store", f"sqlite:{work / f'w{n}-{rnd}.db'}"), name=f"w{n}")
                try:
                    time.sleep(0.5)  # every worker listening
                    pids = worker_pids(server)
                    if len(pids) != n:
                        raise SystemExit(f"expected {n} worker processes, found {pids}")
                    if cap is not None:
                        cap.put(pids)
                    for workload in workloads:
                        result = run_bench(cmd, server, workload, opts.duration, opts.warmup, ["--window", str(opts.window)], work)
                        runs.setdefault((n, workload), []).append(result)
                        print(f"round {rnd + 1} workers {n} {workload}: {result['achieved_rate']:,.0f}/s", file=sys.stderr)
                finally:
                    server.stop()
                    if cap is not None:
                        cap.remove()

    def med(n: int, workload: str, pick: Any) -> float:
        return statistics.median(pick(r) for r in runs[(n, workload)])

    cap_text = f"each worker capped at {opts.cpu:g} core (cgroup quota)" if opts.cpu > 0 else "no CPU cap"
    print(f"nattool serve --workers 1 vs 2, SQLite store, {cap_text}; {opts.rounds} x {opts.duration:g} s, median, "
          f"closed loop window {opts.window}; {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'workload':<10} {'1 worker/s':>12} {'2 workers/s':>12} {'2 vs 1':>7} {'lost':>6} {'gen CPU':>8}")
    for workload in workloads:
        one = med(1, workload, lambda r: r["achieved_rate"])
        two = med(2, workload, lambda r: r["achieved_rate"])
        lost = sum(r["lost"] for n in (1, 2) for r in runs[(n, workload)])
        gen = max(max(r["generator"]["cpu_per_process"]) for n in (1, 2) for r in runs[(n, workload)])
        print(f"{workload:<10} {one:>12,.0f} {two:>12,.0f} {two / one:>6.2f}x {lost:>6} {gen:>7.0%}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({f"{n}:{w}": r for (n, w), r in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    try:
        sys.exit(main())
    except CpuCapError as exc:
        sys.exit(f"workers_scaling.py: {exc} (or run with --cpu 0)")
