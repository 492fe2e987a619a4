"""`--keepalive auto` through routers that forget idle UDP after 12 s (NAT lab).

The routers' UDP conntrack timeout is ``UDP_TIMEOUT`` = 12 s, shorter than the safe default
of 20 s: a registration or a path kept alive every 20 s loses its mapping between two
keepalives. So a run that survives ``IDLE`` (3 minutes) idle proves the interval came from
the measurement:

* host "a" runs `probe --lifetime` (the cache: 10..20 s, so 5 s), then `connect --keepalive
  auto`; host "b" runs `connect` with nothing cached: 20 s until its background
  measurement switches it to 5 s. The path stays up (no path_down) and a line typed after
  3 minutes idle arrives, both ways.
* host "r", behind a symmetric NAT (a new random port for every new mapping, so a lost
  mapping shows at the tracker as a new endpoint), runs `probe --lifetime` then `register
  --keepalive auto`: after 3 minutes the tracker still lists it at the endpoint it first
  registered from.
* the control, host "c" behind the same kind of NAT with `register --keepalive 20`: its
  first endpoint is gone from the tracker by then (the test would catch an "auto" that
  fell back to the default).

Everything runs at once in one lab, which starts when the test session starts (see
tests/natlab/background.py): its 3.5 minutes (the probes ~25 s, then 3 minutes idle)
overlap the rest of the suite. ``KEEPALIVE_LAB_IDLE`` shortens the idle time by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nattool.protocol.keepalive_rules import SAFE_DEFAULT, TRACKER_TTL
from tests.conftest import BANNER_PREFIX, nattool_cmd, nattool_env
from tests.natlab import Lab, NatBehaviour
from tests.natlab.fixtures import natlab_available  # noqa: F401 - fixture
from tests.natlab.background import BackgroundScenario
from tests.natlab.lab import read_line
from tests.natlab.shared_lab import shown_on_failure
from tests.natlab.topologies import SERVER_V4
from tests.test_connect_loopback import connect_argv

IDLE = float(os.environ.get("KEEPALIVE_LAB_IDLE", "180"))
pytestmark = [pytest.mark.natlab, pytest.mark.usefixtures("natlab_available"), pytest.mark.timeout(IDLE + 400)]

UDP_TIMEOUT = 12  # s: the routers forget idle UDP this soon (the default keepalive is 20 s)
TRACKER = f"{SERVER_V4[0]}:43283"
GROUP_AB, GROUP_R, GROUP_C = "ka-connect", "ka-register", "ka-control"


@dataclass
class Transcript:
    """What a program printed: plain data, so that the scenario's result can be handed
    from the lane (pytest-xdist worker) that ran it to the one that runs its tests."""

    lines: list[str]
    stderr: str = ""

    def events(self) -> list[dict[str, Any]]:
        """Every JSON object printed (one per line for connect, indented for register)."""
        text = "\n".join(self.lines)
        decoder = json.JSONDecoder()
        out: list[dict[str, Any]] = []
        i = 0
        while (start := text.find("{", i)) >= 0:
            obj, i = decoder.raw_decode(text, start)
            out.append(obj)
        return out

    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr:\n" + self.stderr


class Program:
    """A program in the lab with its stdout (JSON lines) collected as it comes, stdin
    kept open for typing, stderr in a file."""

    def __init__(self, lab: Lab, node: str, argv: list[str], home: Path) -> None:
        self.stderr_path = home / f"{node}-{len(list(home.glob('*.stderr')))}.stderr"
        self.stderr_file = open(self.stderr_path, "w")
        self.proc = lab.popen(node, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr_file,
                              text=True, env=nattool_env(home))
        self.lines: list[str] = []
        self.stderr_text: str | None = None  # read when it stopped (its directory goes)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = ""
        for chunk in iter(lambda: self.proc.stdout.readline(), ""):  # type: ignore[union-attr]
            buf += chunk
            if not buf.endswith("\n"):
                continue
            self.lines.append(buf.rstrip("\n"))
            buf = ""

    def events(self) -> list[dict[str, Any]]:
        return Transcript(list(self.lines)).events()

    def wait_for(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if predicate(ev):
                    return ev
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {what} within {timeout:g}s; output:\n{self.output()}")

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def output(self) -> str:
        if self.stderr_text is None:
            self.stderr_file.flush()
        err = self.stderr_text if self.stderr_text is not None else self.stderr_path.read_text()
        return Transcript(list(self.lines), err).output()

    def stop(self) -> Transcript:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        self.stderr_file.close()
        self.stderr_text = self.stderr_path.read_text()
        return Transcript(list(self.lines), self.stderr_text)


@dataclass
class Scenario:
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    programs: dict[str, Transcript] = field(default_factory=dict)  # as they were when stopped
    listed: dict[str, list[str]] = field(default_factory=dict)  # group -> endpoints the tracker lists
    wan: dict[str, str] = field(default_factory=dict)  # host -> its NAT's WAN address
    idle: float = 0.0
    took: float = 0.0
    control_ran: float = 0.0  # s from the control's start to the tracker's listing

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.programs[name].events()

    def output(self, name: str) -> str:
        return self.programs[name].output()


def _probe(lab: Lab, node: str, home: Path) -> dict[str, Any]:
    result = lab.run(node, nattool_cmd("probe", TRACKER, "-4", "--lifetime", "--lifetime-max", "30", "--json"),
                     env=nattool_env(home), timeout=90, check=False)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def _listed(lab: Lab, group: str, home: Path) -> list[str]:
    result = lab.run("tracker", nattool_cmd("register", group, "-t", TRACKER, "--lan", "0", "--id", "0", "--json"),
                     env=nattool_env(home), timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return [m["endpoint"] for m in json.loads(result.stdout)["members"]]


def run_scenario() -> Scenario:
    """The whole run, in one lab (started with the session: see tests/natlab/background.py)."""
    base = Path(tempfile.mkdtemp(prefix="nattool-keepalive-lab-"))
    homes = {name: base / name for name in ("tracker", "a", "b", "r", "c")}
    for home in homes.values():
        home.mkdir()
    started = time.monotonic()
    out = Scenario()
    try:
        with Lab() as lab, shown_on_failure(lab):
            _run(lab, homes, out)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out.took = time.monotonic() - started
    return out


def _run(lab: Lab, homes: dict[str, Path], out: Scenario) -> None:
    lab.add_server_host("tracker", addrs=[*SERVER_V4])
    for host, behaviour in (("a", NatBehaviour.EIM_APDF), ("b", NatBehaviour.EIM_APDF),
                            ("r", NatBehaviour.APDM), ("c", NatBehaviour.APDM)):
        nat = lab.add_nat(f"nat_{host}", behaviour, udp_timeout=UDP_TIMEOUT)
        lab.add_host(host, behind=nat)
        out.wan[host] = nat.wan_ip
    host_ip, port = TRACKER.rsplit(":", 1)
    tracker = lab.popen("tracker", nattool_cmd("serve", "--host", host_ip, "--port", port, "--store", "memory",
                                               "--rate-limit", "0"),
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=nattool_env(homes["tracker"]))
    line = read_line(tracker.stdout, 15)  # type: ignore[arg-type]
    assert line and BANNER_PREFIX in line, f"tracker did not start: {line!r}"
    progs: dict[str, Program] = {}
    try:
        # The control starts at once: its first mapping is lost within 20 s.
        control_start = time.monotonic()
        progs["c"] = Program(lab, "c", nattool_cmd("register", GROUP_C, "-t", TRACKER, "--keepalive", "20",
                                                   "--lan", "0", "--id", "0", "--json"), homes["c"])
        with ThreadPoolExecutor(2) as pool:
            probes = {n: pool.submit(_probe, lab, n, homes[n]) for n in ("a", "r")}
            out.probes = {n: f.result() for n, f in probes.items()}
        progs["r"] = Program(lab, "r", nattool_cmd("register", GROUP_R, "-t", TRACKER, "--keepalive", "auto",
                                                   "--lan", "0", "--id", "0", "--json"), homes["r"])
        for n, p in (("a", 40001), ("b", 40002)):
            progs[n] = Program(lab, n, connect_argv(GROUP_AB, "-t", TRACKER, "--port", str(p), "--json",
                                                    "--timeout", "60"), homes[n])
        for n in ("a", "b"):
            progs[n].wait_for(lambda e: e.get("event") == "path_up", 30, f"path_up at {n}")
        progs["r"].wait_for(lambda e: e.get("event") == "registered", 15, "registration of r")
        idle_from = time.monotonic()
        time.sleep(IDLE)
        out.idle = time.monotonic() - idle_from
        progs["a"].type("after the idle time, from a")
        progs["b"].type("after the idle time, from b")
        for n, other in (("a", "b"), ("b", "a")):
            progs[n].wait_for(lambda e, o=other: e.get("event") == "message" and e.get("text") == f"after the idle time, from {o}",
                              10, f"the line from {other} at {n}")
        out.listed = {g: _listed(lab, g, homes["tracker"]) for g in (GROUP_R, GROUP_C)}
        out.control_ran = time.monotonic() - control_start
    finally:
        out.programs = {name: prog.stop() for name, prog in progs.items()}
        tracker.terminate()
        tracker.wait(10)


SCENARIO = BackgroundScenario("keepalive", run_scenario)
pytestmark.append(pytest.mark.background_scenario(SCENARIO))


@pytest.fixture(scope="module")
def scenario(natlab_available: None) -> Scenario:  # noqa: F811
    out = SCENARIO.result(timeout=IDLE + 300)
    switched = [e.get("t") for e in _keepalives(out.events("b")) if e["source"] == "measured"]
    print(f"keepalive lab: idle {out.idle:.0f} s, whole scenario {out.took:.0f} s (started with the session); "
          f"b measured in the background, switched at t={switched} s")
    return out


def _keepalives(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "keepalive"]


def test_probe_measures_a_lifetime_under_the_router_timeout(scenario: Scenario) -> None:
    for name in ("a", "r"):
        life = scenario.probes[name]["lifetime"]
        assert life["tested"], life
        assert life["at_least_s"] <= UDP_TIMEOUT < life["below_s"], life
        assert life["below_s"] <= SAFE_DEFAULT  # the default would not survive this router


def test_connect_auto_keeps_the_path_up_idle(scenario: Scenario) -> None:
    assert scenario.idle >= IDLE
    for name in ("a", "b"):
        events = scenario.events(name)
        # (The other side's goodbye when the scenario stops it with SIGTERM is no failure.)
        failures = [e for e in events if e.get("event") in ("path_down", "gave_up") and e.get("reason") != "the peer left"]
        assert not failures, scenario.output(name)
        final = _keepalives(events)[-1]
        assert final["source"] == "measured" and final["interval_s"] < UDP_TIMEOUT, final
        assert final["register_every_s"] < UDP_TIMEOUT
    # a read the cache that probe wrote; b measured in the background and switched.
    [a_plan] = _keepalives(scenario.events("a"))
    assert a_plan["age_s"] is not None and a_plan["age_s"] > 0 and a_plan["lifetime"]["below_s"] is not None
    b_plans = _keepalives(scenario.events("b"))
    assert [p["source"] for p in b_plans] == ["default", "measured"], b_plans
    assert b_plans[0]["interval_s"] == SAFE_DEFAULT and "background" in b_plans[0]["reason"]


def test_register_auto_stays_listed(scenario: Scenario) -> None:
    events = scenario.events("r")
    first = next(e for e in events if e.get("event") == "registered")["self"]["endpoint"]
    [plan] = _keepalives(events)
    assert plan["source"] == "measured" and plan["interval_s"] < UDP_TIMEOUT, plan
    mine = [ep for ep in scenario.listed[GROUP_R] if ep.startswith(scenario.wan["r"] + ":")]
    assert mine == [first], (scenario.listed, scenario.output("r"))


def test_control_default_interval_loses_the_mapping(scenario: Scenario) -> None:
    """Without the measurement, the same router: the first mapping is lost and the
    tracker forgets the endpoint registered from it (the test above could fail)."""
    if scenario.control_ran < TRACKER_TTL + 5:
        pytest.skip(f"KEEPALIVE_LAB_IDLE={IDLE:g}: the control ran {scenario.control_ran:.0f} s, under the tracker TTL")
    events = scenario.events("c")
    first = next(e for e in events if e.get("event") == "registered")["self"]["endpoint"]
    assert _keepalives(events)[0]["source"] == "given"
    assert first not in scenario.listed[GROUP_C], (scenario.listed, scenario.output("c"))
    assert any(ep.startswith(scenario.wan["c"] + ":") for ep in scenario.listed[GROUP_C])
