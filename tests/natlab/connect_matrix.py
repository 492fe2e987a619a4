"""The `connect` acceptance matrix of issue 24: every pair of {open, full, restricted,
port, symmetric, UDP blocked}, each pair in a lab of its own (pair_topology) with two
`nattool serve --relay` trackers, both ends the real CLI driven by pexpect.

Used by tests/test_connect_relay_lab.py (each case once, several at a time) and by
scripts/connect_matrix_runs.py (each case N times, for the closing-note table). A case
passes when both ends report a first path with the expected ``via`` within TARGET s
(the later-started session's clock: start-up CPU on a busy machine does not count), and
a line typed on one side arrives on the other.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations_with_replacement
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .lab import Lab
from .nft import NatBehaviour
from .topologies import SERVER_V4, pair_topology

N = NatBehaviour
NAMES = {
    N.NO_NAT: "open",
    N.EIM_EIF: "full",
    N.EIM_ADF: "restricted",
    N.EIM_APDF: "port",
    N.APDM: "symmetric",
    N.UDP_BLOCKED: "udp-blocked",
}
TRACKERS = (f"{SERVER_V4[0]}:43283", f"{SERVER_V4[1]}:43283")
TARGET = 5.0  # s to the first path
PATH_WAIT = 25.0  # s a case waits for its paths before it fails
BANNER = "tracker listening on"


def expected_via(left: NatBehaviour, right: NatBehaviour) -> str:
    """What connects directly today stays direct; symmetric against symmetric, port-
    restricted against symmetric (its filter drops the fresh port a symmetric NAT picks
    toward it) and anything with UDP blocked is relayed."""
    pair = {left, right}
    if N.UDP_BLOCKED in pair or pair == {N.APDM} or pair == {N.APDM, N.EIM_APDF}:
        return "relay"
    return "direct"


@dataclass(frozen=True)
class Case:
    left: NatBehaviour
    right: NatBehaviour

    @property
    def name(self) -> str:
        return f"{NAMES[self.left]} x {NAMES[self.right]}"

    @property
    def via(self) -> str:
        return expected_via(self.left, self.right)


CASES = tuple(Case(a, b) for a, b in combinations_with_replacement(list(NAMES), 2))


@dataclass
class Outcome:
    case: Case
    via: tuple[str, str] = ("", "")  # each side's first path_up
    time_to_path: Optional[float] = None  # s, the later-started session's clock
    wall: Optional[float] = None  # s from the later spawn to the later path_up (with start-up)
    line_crossed: bool = False
    error: str = ""
    transcript: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        # "lan" is direct too: the lab's open hosts sit in one /24, which connect takes
        # for a LAN before the trackers list the member (as it did before the relay).
        want = {"direct", "lan"} if self.case.via == "direct" else {self.case.via}
        if {self.case.left, self.case.right} == {N.APDM, N.EIM_APDF}:
            want.add("direct")  # birthday punching (issue 25) may open its path before the relay's
        return (not self.error and set(self.via) <= want and self.line_crossed
                and self.time_to_path is not None and self.time_to_path < TARGET)

    def describe(self) -> str:
        t = f"{self.time_to_path:.2f}s" if self.time_to_path is not None else "-"
        head = f"{self.case.name}: via {self.via[0]}/{self.via[1]} (want {self.case.via}), first path {t}"
        head += f", line {'crossed' if self.line_crossed else 'LOST'}"
        if self.error:
            head += f"; {self.error}"
        return head


def start_relay_trackers(lab: Lab, env: dict[str, str], serve: Callable[..., list[str]]) -> None:
    """`nattool serve --relay` at each of TRACKERS, on the lab's "tracker" host."""
    for ep in TRACKERS:
        host, port = ep.rsplit(":", 1)
        lab.start_service("tracker", serve("serve", "--host", host, "--port", port, "--store", "memory",
                                           "--rate-limit", "0", "--relay"),
                          ready=BANNER, env=env, timeout=30)


_PATH_UP = re.compile(r'\{"event":"path_up"[^\n]*\n')


def run_case(case: Case, home: Path, env: dict[str, str], serve: Callable[..., list[str]],
             connect: Callable[..., list[str]], tag: str = "") -> Outcome:
    """One run of one case, in a lab of its own (built and closed here)."""
    out = Outcome(case)
    with _build_lock:
        lab = Lab()
        lab.start()
    children: list[Any] = []
    try:
        with _build_lock:  # nft and ip are quick; one build at a time keeps them simple
            topo = pair_topology(lab, case.left, case.right)
        start_relay_trackers(lab, env, serve)
        group = f"matrix-{NAMES[case.left]}-{NAMES[case.right]}{tag}"
        args = [group, *sum((["-t", t] for t in TRACKERS), []), "--json", "--timeout", "30", "--port", "43284"]
        spawned = []
        for host in (topo.left, topo.right):
            children.append(lab.spawn(host, connect(*args), env=env, timeout=PATH_WAIT))
            spawned.append(time.monotonic())
        ups: list[dict[str, Any]] = []
        seen_at: list[float] = []
        for child in children:
            child.expect(_PATH_UP)
            seen_at.append(time.monotonic())
            ups.append(json.loads(child.after.strip()))
        out.via = (ups[0].get("via", "?"), ups[1].get("via", "?"))
        out.time_to_path = min(u["since_start_s"] for u in ups)
        out.wall = max(seen_at) - max(spawned)
        children[0].sendline(f"hello from the {NAMES[case.left]} side")
        children[1].expect(rf'"event":"message"[^\n]*"text":"hello from the {NAMES[case.left]} side"', timeout=10)
        out.line_crossed = True
    except Exception as exc:  # noqa: BLE001 - the outcome carries it; the caller asserts
        out.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        for i, child in enumerate(children):
            out.transcript["left" if i == 0 else "right"] = _unread(child)[-3000:]
    finally:
        for child in children:
            child.close(force=True)
        lab.close()
    return out


_build_lock = threading.Lock()


def _unread(child: Any) -> str:
    """What a child printed that no expect() consumed yet (for a failure report)."""
    text = child.before or ""
    try:
        while True:
            text += child.read_nonblocking(65536, timeout=0.2)
    except Exception:  # noqa: BLE001 - pexpect.TIMEOUT or EOF: that was all
        return text


def run_matrix(cases: Sequence[Case], home: Path, env: dict[str, str], serve: Callable[..., list[str]],
               connect: Callable[..., list[str]], *, workers: int = 4, runs: int = 1,
               progress: Optional[Callable[[Outcome], None]] = None) -> list[Outcome]:
    """Every case ``runs`` times, ``workers`` labs at a time."""
    jobs = [(case, f"-{i}") for i in range(runs) for case in cases]
    results: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_case, case, home, env, serve, connect, tag) for case, tag in jobs]
        for future in futures:
            outcome = future.result()
            results.append(outcome)
            if progress is not None:
                progress(outcome)
    return results


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} / {max(values):.2f}" if values else "-"


def table(results: Sequence[Outcome]) -> str:
    """pair | via | time to the first path, median / worst (session clock, then wall
    clock from the later spawn) | runs ok."""
    lines = ["pair | via | first path (s): median / worst | with process start-up (s): median / worst | ok"]
    by_case: dict[Case, list[Outcome]] = {}
    for r in results:
        by_case.setdefault(r.case, []).append(r)
    for case in CASES:
        runs = by_case.get(case)
        if not runs:
            continue
        times = [r.time_to_path for r in runs if r.time_to_path is not None]
        vias = sorted({v for r in runs for v in r.via if v})
        walls = [r.wall for r in runs if r.wall is not None]
        lines.append(f"{case.name} | {'/'.join(vias) or '-'} | {_spread(times)} | {_spread(walls)} | "
                     f"{sum(r.ok for r in runs)}/{len(runs)}")
    return "\n".join(lines)
