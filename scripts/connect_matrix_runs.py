#!/usr/bin/env python3
"""By hand (root, NAT lab): issue 24's `connect` matrix N times, and the table for the
closing note: pair | via | time to the first path, median / worst | runs ok.

    sudo /work/main/.venv/bin/python scripts/connect_matrix_runs.py            # 10 runs
    sudo .venv/bin/python scripts/connect_matrix_runs.py --runs 3 --workers 2
    sudo .venv/bin/python scripts/connect_matrix_runs.py --lab-tests           # also tests/test_connect_lab.py x10

CI runs each case once (tests/test_connect_relay_lab.py); the ten-run acceptance lives
here. ``--lab-tests`` runs the older punching lab (tests/test_connect_lab.py) with its
repeated cases at CONNECT_LAB_RUNS=N as well. Exit status 0 when every run passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import nattool_cmd, nattool_env  # noqa: E402
from tests.natlab.connect_matrix import CASES, Outcome, run_matrix, table  # noqa: E402
from tests.test_connect_loopback import connect_argv  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of every pair (default 10)")
    parser.add_argument("--workers", type=int, default=4, help="labs at a time (default 4)")
    parser.add_argument("-k", dest="only", default=None, help="only pairs whose name contains this")
    parser.add_argument("--lab-tests", action="store_true", help="also tests/test_connect_lab.py with N runs")
    args = parser.parse_args()
    cases = [c for c in CASES if args.only is None or args.only in c.name]
    failed: list[Outcome] = []

    def progress(outcome: Outcome) -> None:
        mark = "ok  " if outcome.ok else "FAIL"
        print(f"{mark} {outcome.describe()}", flush=True)
        if not outcome.ok:
            failed.append(outcome)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="connect-matrix-") as home:
        results = run_matrix(cases, Path(home), nattool_env(Path(home)), nattool_cmd, connect_argv,
                             workers=args.workers, runs=args.runs, progress=progress)
    print(f"\n{len(results)} runs in {time.monotonic() - started:.0f}s, "
          f"{args.workers} labs at a time (time to path: the later-started session's clock)\n")
    print(table(results))
    for outcome in failed:
        print(f"\n{outcome.describe()}")
        for side, text in outcome.transcript.items():
            print(f"--- {side}:\n{text}")
    code = 1 if failed else 0
    if args.lab_tests:
        env = dict(os.environ, CONNECT_LAB_RUNS=str(args.runs))
        lab = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-n", "0", "tests/test_connect_lab.py"],
                             cwd=REPO, env=env)
        code = code or lab.returncode
    return code


if __name__ == "__main__":
    raise SystemExit(main())
