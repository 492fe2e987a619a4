#!/usr/bin/env python3
"""By hand (root, NAT lab): issue 25's birthday acceptance N times, and the figures for the
closing note: symmetric (random ports) <-> port-restricted, no port mapping, `--relay
never`, default rate and budget; per run the time to a direct path, the probes each side
sent, and the routers' conntrack peaks; then median and worst.

    sudo /work/main/.venv/bin/python scripts/birthday_runs.py             # 10 runs
    sudo .venv/bin/python scripts/birthday_runs.py --runs 3 --relay auto  # with relaying trackers

Each run gets a lab of its own (no NAT state carried over). CI runs the case once
(tests/test_connect_birthday_lab.py). Exit status 0 when at least 9 runs in 10 opened
their path by the birthday technique within 30 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import nattool_cmd, nattool_env  # noqa: E402
from tests.natlab.birthday_run import BirthdayOutcome, build, describe, run_once, start_trackers  # noqa: E402
from tests.natlab.lab import Lab  # noqa: E402
from tests.test_connect_loopback import connect_argv  # noqa: E402


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} / {fmt.format(max(values))}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs (default 10)")
    parser.add_argument("--relay", choices=("never", "auto"), default="never",
                        help="never (the acceptance) or auto (relaying trackers: birthday takes over)")
    args = parser.parse_args()
    outcomes: list[BirthdayOutcome] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="birthday-runs-") as home:
        env = nattool_env(Path(home))
        for i in range(args.runs):
            with Lab() as lab:
                topo = build(lab)
                start_trackers(lab, env, nattool_cmd, *(["--relay"] if args.relay == "auto" else []))
                outcome = run_once(lab, topo, env, connect_argv, f"bday-{i}", (43300 + i, 43400 + i), args.relay)
            outcomes.append(outcome)
            print(f"run {i + 1:2}: {describe(outcome)}", flush=True)
            if not outcome.ok:
                for side, text in outcome.transcript.items():
                    print(f"--- {side}:\n{text[-3000:]}")
    ok = [o for o in outcomes if o.ok]
    times = [o.elapsed for o in ok if o.elapsed is not None]
    easy = [float(o.probes["easy"]) for o in ok if "easy" in o.probes]
    hard = [float(o.probes["hard"]) for o in ok if "hard" in o.probes]
    print(f"\n{len(ok)}/{len(outcomes)} runs opened a direct path by the birthday technique within 30 s "
          f"({time.monotonic() - started:.0f}s in all; --relay {args.relay})")
    print(f"time to path (s, from the later spawn to the later path_up): median / worst {spread(times)}")
    print(f"probes of the port-restricted side: median / worst {spread(easy, '{:.0f}')}; "
          f"of the symmetric side: {spread(hard, '{:.0f}')}")
    for router, name in (("nat_l", "symmetric"), ("nat_r", "port-restricted")):
        peaks = [float(o.conntrack_max.get(router, -1)) for o in outcomes]
        print(f"conntrack entries in the {name} router ({router}), peak per run: median / worst "
              f"{spread(peaks, '{:.0f}')}")
    return 0 if len(ok) * 10 >= 9 * len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
