"""The library's ``nattool.connect(keepalive="auto")`` on loopback: the cached lifetime
chooses the interval, a missing one is measured in the background and the measurement
ends with the connection; bad values are usage errors."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from nattool import connect
from nattool.errors import UsageError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.keepalive_rules import KeepaliveSource, LifetimeBracket
from tests.conftest import TrackerFactory
from tests.test_keepalive_auto import seed_cache


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_auto_takes_the_cached_lifetime(tracker: TrackerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tp = tracker()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    seed_cache(tmp_path, Endpoint.from_text(tp.endpoint), LifetimeBracket(10, 20))

    async def main() -> None:
        async with await connect("api-ka", [tp.endpoint], port=0, lan=(), keepalive="auto") as conn:
            await _until(lambda: conn.keepalive is not None, 10)
            plan = conn.keepalive
            assert plan is not None and plan.source is KeepaliveSource.MEASURED
            assert plan.interval == 5 and plan.lifetime == LifetimeBracket(10, 20)
            assert conn._tuner is None  # a fresh measurement is cached: none in the background

    asyncio.run(main())


def test_a_number_shows_no_plan(tracker: TrackerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tp = tracker()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    seed_cache(tmp_path, Endpoint.from_text(tp.endpoint), LifetimeBracket(10, 20))

    async def main() -> None:
        async with await connect("api-ka", [tp.endpoint], port=0, lan=(), keepalive=7.0) as conn:
            await asyncio.sleep(1.0)
            assert conn.keepalive is None and conn._tuner is None

    asyncio.run(main())


def test_without_a_cached_lifetime_it_is_measured_and_the_measurement_ends_with_the_connection(
    tracker: TrackerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tp = tracker()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))

    before = set(threading.enumerate())  # another test's measurement is not this one's

    def measuring() -> bool:
        return any(t.name == "nattool-lifetime" and t not in before for t in threading.enumerate())

    async def main() -> None:
        conn = await connect("api-ka", [tp.endpoint], port=0, lan=(), keepalive="auto")
        try:
            await _until(lambda: conn.keepalive is not None, 10)
            plan = conn.keepalive
            assert plan is not None and plan.source is KeepaliveSource.DEFAULT and plan.interval == 20
            assert "background" in plan.reason
            await _until(measuring, 10)  # loopback never expires a mapping: it runs on
        finally:
            await conn.aclose()
        assert conn._tuner is not None and conn._tuner.done()

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while measuring() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not measuring(), "the background measurement outlived the connection"


@pytest.mark.parametrize("value", ["often", "", True, None, -1, 0])
def test_bad_keepalive_is_a_usage_error(value: object, tracker: TrackerFactory) -> None:
    tp = tracker()
    with pytest.raises(UsageError):
        asyncio.run(connect("api-ka", [tp.endpoint], port=0, lan=(), keepalive=value))  # type: ignore[arg-type]
