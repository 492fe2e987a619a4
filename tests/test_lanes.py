"""The lanes (tests/lanes.py, tests/natlab/background.py) on a small suite of their own: a
group's tests run in one worker, a background scenario runs once for the whole run, and its
result (or its failure) reaches a test in a worker that did not run it."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import nattool_env
from tests.natlab import background
from tests.natlab.background import BackgroundScenario

INNER_CONFTEST = 'pytest_plugins = ["tests.lanes", "tests.natlab.background"]\n'

INNER_TESTS = '''
import os
import time
from pathlib import Path

import pytest

from tests.natlab.background import BackgroundScenario

RUNS = Path(os.environ["INNER_SCENARIO_RUNS"])


def run():
    with open(RUNS, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1)
    return {"answer": 42}


SCENARIO = BackgroundScenario("inner", run)


@pytest.mark.xdist_group("together")
@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    time.sleep(0.2)


@pytest.mark.parametrize("i", range(8))
def test_free(i):
    time.sleep(0.2)


@pytest.mark.background_scenario(SCENARIO)
@pytest.mark.parametrize("i", range(4))
def test_waits(i):
    assert SCENARIO.result(timeout=60) == {"answer": 42}
'''


def test_a_group_runs_in_one_lane_and_a_scenario_once(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    runs = tmp_path / "scenario-runs.txt"
    env = nattool_env(None, INNER_SCENARIO_RUNS=str(runs))  # PYTHONPATH: this checkout's tests package
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'basetemp'}", "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    lanes: dict[str, set[str]] = defaultdict(set)
    for worker, test in re.findall(r"^\[(gw\d)\] \[\s*\d+%\] PASSED test_inner\.py::(\w+)\[", result.stdout, re.M):
        lanes[test].add(worker)
    assert sum(1 for _ in re.finditer(r" PASSED test_inner\.py::", result.stdout)) == 18, result.stdout
    assert len(lanes["test_grouped"]) == 1, result.stdout
    assert set().union(*lanes.values()) == {"gw0", "gw1"}, result.stdout  # two lanes were really used
    assert len(runs.read_text().splitlines()) == 1, runs.read_text()


def test_another_lane_gets_the_result_or_the_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two workers' copies of one scenario, played in one process: the first to start
    it runs it, the other one reads what it published."""
    monkeypatch.setattr(background, "_shared_dir", tmp_path)
    runs: list[str] = []

    def run() -> dict[str, int]:
        runs.append("ran")
        return {"answer": 42}

    owner, other = BackgroundScenario("handoff", run), BackgroundScenario("handoff", run)
    owner.start()
    other.start()
    assert other.result(timeout=30) == {"answer": 42} == owner.result(timeout=30)
    assert runs == ["ran"]

    def fail() -> None:
        raise ValueError("the lab broke")

    owner, other = BackgroundScenario("broken", fail), BackgroundScenario("broken", fail)
    owner.start()
    with pytest.raises(RuntimeError, match=r"(?s)failed in the worker that ran it.*ValueError: the lab broke"):
        other.result(timeout=30)
    with pytest.raises(ValueError, match="the lab broke"):
        owner.result(timeout=30)
