"""pytest fixtures of the NAT lab. Register once in tests/conftest.py::

    pytest_plugins = ["tests.natlab.fixtures"]

Fixtures:
    natlab_available  session: skips (or, under CI=true / NATLAB_REQUIRED=1, fails) with the
                      reason when the machine cannot host the lab
    natlab            function: a started, empty :class:`Lab`, closed after the test; when the
                      test fails, the lab's addresses, routes and rulesets are printed
    turnserver_available  session: skips when coturn is not installed (fails under CI)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator

import pytest

from .lab import Lab, unavailable_reason
from .stun import turnserver_available as _turnserver_reason

_REPORT_KEY = pytest.StashKey[pytest.TestReport]()


def _required() -> bool:
    # In CI a skip would hide a broken lab: there it must run, so missing pieces fail.
    return os.environ.get("CI") == "true" or os.environ.get("NATLAB_REQUIRED") == "1"


def _skip_or_fail(reason: str) -> None:
    if _required():
        pytest.fail(f"NAT lab required (CI=true or NATLAB_REQUIRED=1) but {reason}",
                    pytrace=False)
    pytest.skip(f"NAT lab unavailable: {reason}")


@pytest.fixture(scope="session")
def natlab_available() -> Iterator[None]:
    reason = unavailable_reason()
    if reason is not None:
        _skip_or_fail(reason)
    # SIGTERM would end the process without finalizers or atexit and leave namespaces
    # behind (until the next run sweeps them): turn it into an interrupt pytest cleans up
    # after. Only if nobody else handles SIGTERM, and restored at the end of the session.
    previous = None
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        previous = signal.signal(signal.SIGTERM, _interrupt)
    yield
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def turnserver_available(natlab_available: None) -> None:
    reason = _turnserver_reason()
    if reason is not None:
        _skip_or_fail(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test that builds a lab gets the "natlab" marker: `-m "not natlab"` skips them all.
    for item in items:
        if "natlab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.natlab)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when == "call":
        item.stash[_REPORT_KEY] = report


@pytest.fixture
def natlab(natlab_available: None, request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab()
    lab.start()
    try:
        yield lab
    finally:
        try:
            report = request.node.stash.get(_REPORT_KEY, None)
            if report is not None and report.failed:
                # Shown by pytest under "Captured stderr teardown".
                print(f"--- NAT lab at failure ---\n{lab.describe()}", file=sys.stderr)
        finally:
            lab.close()
