"""Lab scenarios that mostly wait start with the test session, in the background.

The suite runs its tests one after the other. A scenario that idles for minutes (say,
keepalives through routers with short UDP timeouts, 3 minutes idle) would add those
minutes to the suite; started as soon as collection ends, its waiting overlaps every other
test instead, and its tests only collect the result::

    SCENARIO = BackgroundScenario("keepalive", run)     # run() -> result, builds its own Lab

    pytestmark = pytest.mark.background_scenario(SCENARIO)

    def test_something() -> None:
        result = SCENARIO.result()                       # waits for it if still running

Only scenarios of selected tests start (``-k``/``-m`` deselection counts), and only when
the machine can host the lab (otherwise their tests skip or fail through the
``natlab_available`` fixture, as every lab test does). A scenario owns its Lab: it closes
it before returning (or at exit).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Generic, Optional, TypeVar

import pytest

from .lab import unavailable_reason

R = TypeVar("R")


class BackgroundScenario(Generic[R]):
    def __init__(self, name: str, run: Callable[[], R]) -> None:
        self.name = name
        self.run = run
        self._future: Optional[Future[R]] = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Run it in a daemon thread, once."""
        with self._lock:
            if self._future is not None:
                return
            future: Future[R] = Future()
            self._future = future

        def work() -> None:
            try:
                future.set_result(self.run())
            except BaseException as exc:  # handed to the test that asks for the result
                future.set_exception(exc)

        threading.Thread(target=work, name=f"natlab-background-{self.name}", daemon=True).start()

    def result(self, timeout: Optional[float] = None) -> R:
        """Its result (starting it now if the session did not), or its exception."""
        self.start()
        assert self._future is not None
        return self._future.result(timeout)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "background_scenario(scenario): start this BackgroundScenario when collection ends")


def pytest_collection_finish(session: pytest.Session) -> None:
    if unavailable_reason() is not None:
        return
    for item in session.items:
        for marker in item.iter_markers("background_scenario"):
            scenario = marker.args[0]
            if isinstance(scenario, BackgroundScenario):
                scenario.start()
