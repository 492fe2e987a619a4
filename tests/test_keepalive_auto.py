"""`--keepalive auto` end to end on loopback: the background measurement against a real
tracker (STUN with RESPONSE-PORT), the cache it writes, the CLI's keepalive events, and
the session switching intervals (pure)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from nattool.diag.keepalive_auto import AutoKeepalive
from nattool.net.lifetime_cache import CachedLifetime, LifetimeCache, network_toward
from nattool.protocol import connect_events as ev
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.keepalive_rules import KeepalivePlan, KeepaliveSource, LifetimeBracket, SAFE_DEFAULT
from tests.conftest import TrackerFactory, nattool_cmd, nattool_env, run_nattool
from tests.test_connect_loopback import connect_argv
from tests.test_connect_session import PEER_PUB, T1, connected, drain


def seed_cache(home: Path, tracker: Endpoint, bracket: LifetimeBracket, age: float = 30.0) -> LifetimeCache:
    """What `probe --lifetime` would have left for this host's network toward ``tracker``."""
    network = network_toward(tracker)
    assert network is not None
    cache = LifetimeCache(home / ".cache" / "nattool" / "lifetimes.json")
    assert cache.remember(CachedLifetime(network[0], network[1], bracket, time.time() - age, tracker.to_text()))
    return cache


# --------------------------------------------------------------------------- background measurement


def test_background_measurement_waits_for_an_answer_then_caches(tracker: TrackerFactory, tmp_path: Path) -> None:
    tp = tracker()
    server = Endpoint.from_text(tp.endpoint)
    cache = LifetimeCache(tmp_path / "lifetimes.json")
    auto = AutoKeepalive([server], cache=cache)
    assert auto.wants_measurement and auto.plan.source is KeepaliveSource.DEFAULT
    assert "background" in auto.plan.reason
    plans: list[KeepalivePlan] = []

    async def go() -> None:
        task = asyncio.create_task(auto.measure(plans.append, lifetime_max=2))
        await asyncio.sleep(0.5)
        assert not plans and not cache.path.exists()  # nothing before a tracker answered
        auto.tracker_answered(server)
        await asyncio.wait_for(task, 15)

    asyncio.run(go())
    # Loopback never expires a mapping: alive at the longest wait, so the default stays.
    [plan] = plans
    assert plan.lifetime == LifetimeBracket(2, None) and plan.source is KeepaliveSource.DEFAULT
    assert plan.interval == SAFE_DEFAULT and plan.age == 0
    network = network_toward(server)
    assert network is not None
    entry = cache.lookup(*network)
    assert entry is not None and entry.lifetime == LifetimeBracket(2, None) and entry.server == tp.endpoint
    # The next run reads it and measures no more.
    again = AutoKeepalive([server], cache=cache)
    assert not again.wants_measurement and again.plan.lifetime == LifetimeBracket(2, None)


def test_cancelled_measurement_stops_its_thread(tracker: TrackerFactory, tmp_path: Path) -> None:
    tp = tracker()
    server = Endpoint.from_text(tp.endpoint)
    auto = AutoKeepalive([server], cache=LifetimeCache(tmp_path / "lifetimes.json"))

    async def go() -> None:
        auto.tracker_answered(server)
        task = asyncio.create_task(auto.measure(lambda plan: None, lifetime_max=120))
        await asyncio.sleep(1.0)
        assert any(t.name == "nattool-lifetime" for t in threading.enumerate())
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(go())
    deadline = time.monotonic() + 5
    while any(t.name == "nattool-lifetime" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the measurement thread did not stop"
        time.sleep(0.1)
    assert not (tmp_path / "lifetimes.json").exists()


def test_tracker_without_stun_leaves_the_default_with_the_reason(tracker: TrackerFactory, tmp_path: Path) -> None:
    tp = tracker("--no-stun")
    server = Endpoint.from_text(tp.endpoint)
    auto = AutoKeepalive([server], cache=LifetimeCache(tmp_path / "lifetimes.json"))
    plans: list[KeepalivePlan] = []

    async def go() -> None:
        auto.tracker_answered(server)
        await asyncio.wait_for(auto.measure(plans.append, lifetime_max=2), 15)

    asyncio.run(go())
    [plan] = plans
    assert plan.source is KeepaliveSource.DEFAULT and plan.interval == SAFE_DEFAULT
    assert "could not be measured" in plan.reason


def test_a_stale_measurement_is_measured_again(tmp_path: Path) -> None:
    from nattool.protocol.keepalive_rules import FRESH_FOR

    server = Endpoint.from_text("127.0.0.1:43283")
    cache = seed_cache(tmp_path, server, LifetimeBracket(120, None), age=FRESH_FOR + 60)
    auto = AutoKeepalive([server], cache=cache)
    assert auto.wants_measurement and auto.plan.interval == SAFE_DEFAULT
    assert auto.plan.reason.endswith("too old to lengthen the interval; measuring it again in the background")
    fresh = AutoKeepalive([server], cache=seed_cache(tmp_path, server, LifetimeBracket(120, None), age=60))
    assert not fresh.wants_measurement and fresh.plan.interval == 60


def test_ipv6_only_trackers_measure_nothing(tmp_path: Path) -> None:
    auto = AutoKeepalive([Endpoint.from_text("[::1]:43283")], cache=LifetimeCache(tmp_path / "x.json"))
    assert not auto.wants_measurement and auto.plan.reason == "no mapping lifetime measured on this network"


# --------------------------------------------------------------------------- the CLI


def _json_objects(text: str) -> list[dict[str, object]]:
    decoder = json.JSONDecoder()
    out, i = [], 0
    while (start := text.find("{", i)) >= 0:
        obj, i = decoder.raw_decode(text, start)
        out.append(obj)
    return out


def test_register_auto_uses_the_cached_lifetime(tracker: TrackerFactory, tmp_path: Path) -> None:
    import subprocess

    tp = tracker()
    seed_cache(tmp_path, Endpoint.from_text(tp.endpoint), LifetimeBracket(4, 6), age=90)
    proc = subprocess.Popen(nattool_cmd("register", "ka-cli", "-t", tp.endpoint, "--keepalive", "auto", "--json",
                                        "--lan", "0", "--id", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=nattool_env(tmp_path))
    time.sleep(5)
    proc.terminate()
    out, err = proc.communicate(timeout=10)
    events = _json_objects(out)
    assert [e["event"] for e in events][:2] == ["registered", "keepalive"], out + err
    plan = events[1]
    assert plan["interval_s"] == 2 and plan["register_every_s"] == 2 and plan["source"] == "measured"
    assert plan["lifetime"] == {"at_least_s": 4, "below_s": 6} and 90 <= plan["age_s"] < 120  # type: ignore[operator]
    assert "mapping lifetime 4..6 s measured 9" in str(plan["reason"])
    assert "Traceback" not in err


def test_connect_shows_its_keepalive_once_registered(tracker: TrackerFactory, tmp_path: Path) -> None:
    tp = tracker()
    seed_cache(tmp_path, Endpoint.from_text(tp.endpoint), LifetimeBracket(10, 20))
    import subprocess

    for args, want in (([], {"interval_s": 5.0, "register_every_s": 5.0, "source": "measured"}),
                       (["--keepalive", "7"], {"interval_s": 7.0, "register_every_s": 20.0, "source": "given"})):
        done = subprocess.run(connect_argv("ka-cli", "-t", tp.endpoint, "--port", "0", "--json", "--timeout", "1", *args),
                              capture_output=True, text=True, env=nattool_env(tmp_path), timeout=30)
        events = [json.loads(line) for line in done.stdout.splitlines()]
        names = [e["event"] for e in events]
        assert names[:2] == ["registered", "keepalive"], done.stdout + done.stderr
        assert {k: events[1][k] for k in want} == want
    # In text, on stderr, after the registration line.
    done = subprocess.run(connect_argv("ka-cli", "-t", tp.endpoint, "--port", "0", "--timeout", "1"),
                          capture_output=True, text=True, env=nattool_env(tmp_path), timeout=30)
    lines = done.stderr.splitlines()
    assert lines[0].startswith("registered at") and lines[1].startswith(
        "keepalive every 5 s (measured: mapping lifetime 10..20 s measured"), done.stderr


def test_corrupt_cache_is_a_warning_not_a_failure(tracker: TrackerFactory, tmp_path: Path) -> None:
    import subprocess

    tp = tracker()
    path = tmp_path / ".cache" / "nattool" / "lifetimes.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage")
    done = subprocess.run(connect_argv("ka-cli", "-t", tp.endpoint, "--port", "0", "--json", "--timeout", "1"),
                          capture_output=True, text=True, env=nattool_env(tmp_path), timeout=30)
    assert "Traceback" not in done.stderr
    assert "warning: ignoring the lifetime cache" in done.stderr and "corrupt" in done.stderr
    plan = next(json.loads(line) for line in done.stdout.splitlines() if '"keepalive"' in line)
    assert plan["source"] == "default" and plan["interval_s"] == SAFE_DEFAULT


@pytest.mark.parametrize("value", ["0", "fast", "nan", "99999"])
def test_bad_keepalive_is_a_usage_error(value: str, tmp_path: Path) -> None:
    for command in (["register", "g", "-t", "127.0.0.1:9"], ["connect", "g", "-t", "127.0.0.1:9"]):
        done = run_nattool(*command, "--keepalive", value, home=tmp_path)
        assert done.returncode == 2 and done.stderr.startswith("nattool: error: --keepalive must be auto or in")
        assert "\n" not in done.stderr.strip()


# --------------------------------------------------------------------------- the session


def test_session_switches_intervals_when_told() -> None:
    s = connected(keepalive=20.0, dead_after=60.0, register_every=20.0)
    plan = KeepalivePlan(5.0, 5.0, KeepaliveSource.MEASURED, LifetimeBracket(10, 20), 0.0, "measured")
    s.set_keepalive(plan, 1.0)
    assert drain(s) == [ev.KeepaliveSet(plan)]
    sent: list[tuple[float, Endpoint]] = []
    now = 1.0
    while (now := s.get_timer() or 99.0) < 7.0:
        s.handle_timer(now)
        sent += [(now, dest) for data, dest in s.datagrams_to_send(now) if dest in (T1, PEER_PUB)]
    # The keepalive 5 s after the path's last ping (at 0.02), the registration 5 s after
    # the switch (not 20 s after the last one; then its retransmissions).
    firsts = {d: round(t, 3) for t, d in reversed(sent)}
    assert firsts == {PEER_PUB: 5.02, T1: 6.0}
    assert s.config.dead_after == 60.0  # kept: still longer than the keepalive
    longer = KeepalivePlan(45.0, 30.0, KeepaliveSource.MEASURED, LifetimeBracket(90, None), 0.0, "measured")
    s.set_keepalive(longer, 7.0)
    assert s.config.dead_after == 135.0 and s.config.keepalive == 45.0 and s.config.register_every == 30.0
