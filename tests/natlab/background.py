"""Lab scenarios that mostly wait start with the test session, in the background.

A scenario that idles for minutes (say, keepalives through routers with short UDP
timeouts, 3 minutes idle) would add those minutes to the suite; started as soon as
collection ends, its waiting overlaps every other test instead, and its tests only
collect the result::

    SCENARIO = BackgroundScenario("keepalive", run)     # run() -> result, builds its own Lab

    pytestmark = pytest.mark.background_scenario(SCENARIO)

    def test_something() -> None:
        result = SCENARIO.result()                       # waits for it if still running

Only scenarios of selected tests start (``-k``/``-m`` deselection counts), and only when
the machine can host the lab (otherwise their tests skip or fail through the
``natlab_available`` fixture, as every lab test does). A scenario owns its Lab: it closes
it before returning (or at exit). Its tests are moved to the end of the run, so that the
scenario has the whole suite to overlap.

In lanes (pytest-xdist) every worker collects every test, but a scenario runs once: the
first worker to claim it (a file created with O_EXCL in the run's shared temporary
directory) runs it and publishes its result there, pickled, for the tests that land in
other workers; so ``run()`` must return something picklable. The owner waits for its
scenario before its session ends, so a worker never exits with a scenario half done.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Generic, Optional, TypeVar

import pytest

from .lab import unavailable_reason

R = TypeVar("R")

POLL_INTERVAL = 0.5  # s between two looks for another worker's result
OWNER_WAIT = 1200.0  # s a worker's session end waits, at most, for the scenario it runs

# Where the workers of one run meet (None: not in lanes, every scenario runs here).
_shared_dir: Optional[Path] = None
_started: list[BackgroundScenario[object]] = []


class BackgroundScenario(Generic[R]):
    def __init__(self, name: str, run: Callable[[], R]) -> None:
        self.name = name
        self.run = run
        self._future: Optional[Future[R]] = None
        self._owner = False
        self._lock = threading.Lock()

    def _claim(self) -> bool:
        """True if this process runs the scenario (the first of the run's workers to ask)."""
        if _shared_dir is None:
            return True
        _shared_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(_shared_dir / f"{self.name}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def start(self) -> None:
        """Run it in a daemon thread, once per run (here, or in the worker that claimed it)."""
        with self._lock:
            if self._future is not None:
                return
            future: Future[R] = Future()
            self._future = future
            self._owner = self._claim()
        if not self._owner:
            return
        _started.append(self)  # type: ignore[arg-type]

        def work() -> None:
            try:
                result = self.run()
            except BaseException as exc:  # handed to the test that asks for the result
                future.set_exception(exc)
                self._publish(("error", None, traceback.format_exc()))
            else:
                future.set_result(result)
                self._publish(("result", result, ""))

        threading.Thread(target=work, name=f"natlab-background-{self.name}", daemon=True).start()

    def _publish(self, outcome: tuple[str, object, str]) -> None:
        """For the tests in other workers: the outcome, written whole or not at all."""
        if _shared_dir is None:
            return
        try:
            data = pickle.dumps(outcome)
        except Exception:  # noqa: BLE001 - an unpicklable result still must reach the waiters
            trace = f"its result is not picklable: {outcome[1]!r}\n{traceback.format_exc()}"
            data = pickle.dumps(("error", None, trace))
        partial = _shared_dir / f"{self.name}.result.partial"
        partial.write_bytes(data)
        partial.rename(_shared_dir / f"{self.name}.result")

    def result(self, timeout: Optional[float] = None) -> R:
        """Its result (starting it now if nobody did), or its exception."""
        self.start()
        assert self._future is not None
        if self._owner:
            return self._future.result(timeout)
        assert _shared_dir is not None
        path = _shared_dir / f"{self.name}.result"
        deadline = None if timeout is None else time.monotonic() + timeout
        while not path.exists():
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"scenario {self.name}: no result from the worker running it within {timeout:g} s")
            time.sleep(POLL_INTERVAL)
        kind, value, trace = pickle.loads(path.read_bytes())
        if kind == "error":
            raise RuntimeError(f"scenario {self.name} failed in the worker that ran it:\n{trace}")
        return value  # type: ignore[no-any-return]

    def wait_if_owner(self, timeout: float) -> None:
        """Until it is done, if this process runs it."""
        if self._owner and self._future is not None:
            try:
                self._future.exception(timeout)
            except TimeoutError:
                pass


def _scenarios(item: pytest.Item) -> list[BackgroundScenario[object]]:
    return [m.args[0] for m in item.iter_markers("background_scenario") if isinstance(m.args[0], BackgroundScenario)]


def pytest_configure(config: pytest.Config) -> None:
    global _shared_dir
    config.addinivalue_line(
        "markers", "background_scenario(scenario): start this BackgroundScenario when collection ends")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        # xdist gives each worker <the run's temporary directory>/<worker id> as basetemp.
        _shared_dir = Path(config.option.basetemp).parent / "background-scenarios"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Their tests last (the same order in every worker, as xdist requires): by then the
    # scenario has had the whole suite to run in.
    waiting = [item for item in items if _scenarios(item)]
    if waiting:
        items[:] = [item for item in items if not _scenarios(item)] + waiting


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly or unavailable_reason() is not None:
        return
    for item in session.items:
        for scenario in _scenarios(item):
            scenario.start()


def pytest_sessionfinish() -> None:
    for scenario in _started:
        scenario.wait_if_owner(OWNER_WAIT)
