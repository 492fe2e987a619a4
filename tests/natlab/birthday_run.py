"""One run of issue 25's birthday acceptance: a symmetric NAT with random ports
(``masquerade random``) against a port-restricted one (EIM + APDF), no port mapping, no
relay, two `nattool serve` trackers on the lab's internet (so that each side sees the
other's mapping), both ends the real CLI. Used by tests/test_connect_birthday_lab.py
(once in CI) and scripts/birthday_runs.py (ten times, by hand).

While the run waits for its paths it samples the routers' conntrack tables (``conntrack
-C`` in each router namespace): the session-table footprint the rate cap and the budget
are there to keep small.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .lab import Lab, read_line
from .nft import NatBehaviour
from .topologies import SERVER_V4, PairTopology, pair_topology

TRACKERS = (f"{SERVER_V4[0]}:43283", f"{SERVER_V4[1]}:43283")
WINDOW = 30.0  # s: the acceptance's time to a path, at the default rate
BANNER = "tracker listening on"


@dataclass
class BirthdayOutcome:
    ok: bool
    elapsed: Optional[float]  # s from the later spawn to the later path_up
    ups: dict[str, dict[str, Any]]  # "hard" / "easy": their first direct path_up events
    starts: dict[str, dict[str, Any]]  # their "birthday" events
    ends: dict[str, dict[str, Any]]  # their "birthday_end" events
    conntrack_max: dict[str, int] = field(default_factory=dict)  # router -> most entries seen
    hard_udp_sockets_after: Optional[int] = None  # the hard side's UDP sockets once its path is up
    transcript: dict[str, str] = field(default_factory=dict)
    why: str = ""
    first: dict[str, dict[str, Any]] = field(default_factory=dict)  # their first path_up, of any kind

    @property
    def probes(self) -> dict[str, int]:
        return {side: e["probes"] for side, e in self.ends.items()}

    @property
    def budget_spent(self) -> bool:
        """The technique missed as its arithmetic allows (every probe sent, no hit)."""
        return any(not e["up"] and "budget" in e["reason"] for e in self.ends.values())


def build(lab: Lab) -> PairTopology:
    """left: symmetric with random ports (the hard side); right: port-restricted."""
    return pair_topology(lab, NatBehaviour.APDM, NatBehaviour.EIM_APDF)


def start_trackers(lab: Lab, env: dict[str, str], nattool_cmd: Callable[..., list[str]], *extra: str) -> None:
    for ep in TRACKERS:
        host, port = ep.rsplit(":", 1)
        proc = lab.popen("tracker", nattool_cmd("serve", "--host", host, "--port", port, "--store", "memory",
                                                "--rate-limit", "0", *extra),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        line = read_line(proc.stdout, 15)
        assert line and BANNER in line, f"tracker {ep} did not start: {line!r}"


def conntrack_count(lab: Lab, router: str) -> int:
    out = lab.run(router, ["conntrack", "-C"], check=False, timeout=5).stdout.strip()
    return int(out) if out.isdigit() else -1


def udp_sockets_of(lab: Lab, host: str, pid: int) -> int:
    out = lab.run(host, ["ss", "-uanp"], check=False, timeout=5).stdout
    return sum(1 for line in out.splitlines() if f"pid={pid}," in line)


def settled_udp_sockets(lab: Lab, pid: int) -> int:
    """The hard side's UDP sockets just after its path_up: the unused ones close in the
    same turn of its loop, which a busy machine may not have finished when the line is
    read; asked again for up to 1 s (well within --once's linger)."""
    count = udp_sockets_of(lab, "left", pid)
    deadline = time.monotonic() + 1.0
    while count > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        count = udp_sockets_of(lab, "left", pid)
    return count


# The JSON events of `connect --json` that a birthday run is followed by.
EVENT_LINE = re.compile(r'\{"event":"(path_up|path_down|birthday|birthday_end|gave_up)"[^\n]*\n')


def run_once(lab: Lab, topo: PairTopology, env: dict[str, str], connect_argv: Callable[..., list[str]],
             group: str, ports: tuple[int, int], relay: str = "never") -> BirthdayOutcome:
    """Both ends, ``--relay never --once`` (or ``--relay auto``: then a relayed path may
    come first), until each has its direct path and its birthday is over (or WINDOW + 10 s)."""
    def spawn(host: Any, port: int):  # type: ignore[no-untyped-def]
        args = [group, *sum((["-t", t] for t in TRACKERS), []), "--port", str(port), "--json",
                "--relay", relay, "--timeout", f"{WINDOW:g}", *(["--once"] if relay == "never" else []),
                # A given interval: --keepalive auto's background lifetime measurement holds
                # sockets of its own, and the socket count below is birthday's.
                "--keepalive", "20"]
        return lab.spawn(host, connect_argv(*args), env=env, timeout=WINDOW + 10)

    children = {"hard": spawn(topo.left, ports[0]), "easy": spawn(topo.right, ports[1])}
    t_start = time.monotonic()
    peak = {"nat_l": 0, "nat_r": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for router in peak:
                peak[router] = max(peak[router], conntrack_count(lab, router))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outcome = BirthdayOutcome(False, None, {}, {}, {})
    t_up: dict[str, float] = {}
    lock = threading.Lock()

    def follow(side: str) -> None:
        child = children[side]
        text: list[str] = []
        while True:
            try:
                child.expect(EVENT_LINE)
            except Exception:  # EOF or timeout: the transcript says why
                text.append(str(child.before))
                break
            line = child.after.strip()
            text.append(line)
            event = json.loads(line)
            with lock:
                kind = event["event"]
                if kind == "birthday":
                    outcome.starts[side] = event
                elif kind == "birthday_end":
                    outcome.ends[side] = event
                elif kind == "gave_up":
                    break
                elif kind == "path_up" and side not in outcome.first:
                    outcome.first[side] = event
                if kind == "path_up" and event["via"] == "direct" and side not in outcome.ups:
                    outcome.ups[side] = event
                    t_up[side] = time.monotonic()
                    if side == "hard":
                        outcome.hard_udp_sockets_after = settled_udp_sockets(lab, child.pid)
            if side in outcome.ups and side in outcome.ends:
                break
        outcome.transcript[side] = "\n".join(text)

    threads = [threading.Thread(target=follow, args=(side,), daemon=True) for side in children]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WINDOW + 15)
    stop.set()
    sampler.join(5)
    for child in children.values():
        child.close(force=True)
    outcome.conntrack_max = dict(peak)
    if len(outcome.ups) == 2:
        outcome.elapsed = max(t_up.values()) - t_start
        methods = {side: up["method"] for side, up in outcome.ups.items()}
        # The probing side's random ports may find the hard side's main socket's own
        # mapping toward it (one more open port among the 257) before the hard side has
        # begun its run: the hard side then cannot tell the path from plain punching.
        hard_ok = methods["hard"] == "birthday" or (methods["hard"] == "punch" and "hard" not in outcome.starts)
        outcome.ok = methods["easy"] == "birthday" and hard_ok and outcome.elapsed <= WINDOW
        if not outcome.ok:
            outcome.why = f"methods {methods}, path after {outcome.elapsed:.1f}s"
    else:
        outcome.why = f"path up on {sorted(outcome.ups) or 'neither side'} only"
    return outcome


def describe(o: BirthdayOutcome) -> str:
    elapsed = f"{o.elapsed:.2f}s" if o.elapsed is not None else "-"
    return (f"{'ok  ' if o.ok else 'FAIL'} path after {elapsed}; probes hard/easy "
            f"{o.probes.get('hard', '-')}/{o.probes.get('easy', '-')}; conntrack peak nat_l (symmetric) "
            f"{o.conntrack_max.get('nat_l')}, nat_r (port-restricted) {o.conntrack_max.get('nat_r')}; "
            f"hard side's UDP sockets after the path: {o.hard_udp_sockets_after}"
            + (f"; {o.why}" if o.why else ""))


__all__ = ["EVENT_LINE", "TRACKERS", "BirthdayOutcome", "WINDOW", "build", "describe", "run_once", "start_trackers"]
