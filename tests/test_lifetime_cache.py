"""The lifetime cache on real files in temporary directories: where it lives, what it
keeps, atomic replacement, and files that are not ours (ignored with a warning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nattool.net.gateway import DefaultGateway, default_gateway, parse_route_table
from nattool.net.lifetime_cache import SCHEMA, CachedLifetime, LifetimeCache, auto_plan, cache_path
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.keepalive_rules import KeepaliveSource, LifetimeBracket
from tests.conftest import REPO

ENTRY = CachedLifetime("192.0.2.10", "192.0.2.1", LifetimeBracket(10, 20), 1_800_000_000.0, "203.0.113.10:43283")


def make_cache(tmp_path: Path) -> tuple[LifetimeCache, list[str]]:
    warnings: list[str] = []
    return LifetimeCache(tmp_path / "nattool" / "lifetimes.json", warn=warnings.append), warnings


def test_cache_path_follows_xdg(tmp_path: Path) -> None:
    assert cache_path({"XDG_CACHE_HOME": str(tmp_path), "HOME": "/nowhere"}) == tmp_path / "nattool" / "lifetimes.json"
    # A relative XDG_CACHE_HOME is invalid per the spec: ~/.cache then.
    assert cache_path({"XDG_CACHE_HOME": "rel", "HOME": str(tmp_path)}) == tmp_path / ".cache" / "nattool" / "lifetimes.json"
    assert cache_path({"HOME": str(tmp_path)}) == tmp_path / ".cache" / "nattool" / "lifetimes.json"


def test_remember_then_lookup(tmp_path: Path) -> None:
    cache, warnings = make_cache(tmp_path)
    assert cache.lookup("192.0.2.10", "192.0.2.1") is None
    assert cache.remember(ENTRY)
    assert cache.lookup("192.0.2.10", "192.0.2.1") == ENTRY
    # Another gateway or another local address is another network.
    assert cache.lookup("192.0.2.10", "192.0.2.254") is None
    assert cache.lookup("192.0.2.11", "192.0.2.1") is None
    newer = CachedLifetime("192.0.2.10", "192.0.2.1", LifetimeBracket(120, None), ENTRY.measured_at + 5, "x")
    other = CachedLifetime("10.0.0.2", None, LifetimeBracket(30, 45), ENTRY.measured_at, "y")
    assert cache.remember(newer) and cache.remember(other)
    fresh = LifetimeCache(cache.path)  # what a later run reads
    assert fresh.lookup("192.0.2.10", "192.0.2.1") == newer
    assert fresh.lookup("10.0.0.2", None) == other
    assert json.loads(cache.path.read_text())["schema"] == SCHEMA
    assert warnings == []
    assert [p.name for p in cache.path.parent.iterdir()] == ["lifetimes.json"]  # no temporary left


def test_entries_are_bounded(tmp_path: Path) -> None:
    cache, _ = make_cache(tmp_path)
    for n in range(70):
        cache.remember(CachedLifetime(f"10.0.0.{n}", "10.0.0.1", LifetimeBracket(10, 20), 1000.0 + n, "s"))
    entries = json.loads(cache.path.read_text())["entries"]
    assert len(entries) == 64 and entries[0]["local"] == "10.0.0.6"  # the oldest went


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xffnot json",
        b'{"schema": "nattool.lifetimes/1", "entries": [{"local": 5}]}',
        b'{"schema": "nattool.lifetimes/1", "entries": [{"local": "a", "at_least_s": 20, "below_s": 10, "measured_at": 1}]}',
        b'{"schema": "nattool.lifetimes/1", "entries": [{"local": "a", "at_least_s": NaN, "measured_at": 1}]}',
        b'{"schema": "nattool.lifetimes/1", "entries": {}}',
        b"[1, 2, 3]",
        b'{"entries": []}',
        b"[" * 100_000,
        b" " * 300_000,
    ],
    ids=["binary", "bad-type", "empty-bracket", "nan", "entries-not-list", "list", "no-schema", "deep", "huge"],
)
def test_corrupt_file_is_ignored_with_a_warning_and_replaced(tmp_path: Path, content: bytes) -> None:
    cache, warnings = make_cache(tmp_path)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_bytes(content)
    assert cache.lookup("192.0.2.10", "192.0.2.1") is None
    assert len(warnings) == 1 and "corrupt" in warnings[0] and str(cache.path) in warnings[0]
    assert cache.remember(ENTRY)
    assert LifetimeCache(cache.path).lookup("192.0.2.10", "192.0.2.1") == ENTRY


def test_another_versions_file_is_ignored_and_left_alone(tmp_path: Path) -> None:
    cache, warnings = make_cache(tmp_path)
    cache.path.parent.mkdir(parents=True)
    foreign = b'{"schema": "nattool.lifetimes/2", "networks": {}}'
    cache.path.write_bytes(foreign)
    assert cache.lookup("192.0.2.10", "192.0.2.1") is None
    assert not cache.remember(ENTRY)
    assert cache.path.read_bytes() == foreign
    assert all("another version" in w for w in warnings) and len(warnings) == 2


def test_unwritable_directory_is_a_warning(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    warnings: list[str] = []
    cache = LifetimeCache(blocker / "nattool" / "lifetimes.json", warn=warnings.append)
    assert not cache.remember(ENTRY)
    assert len(warnings) == 1 and "cannot write" in warnings[0]


def test_default_warning_goes_to_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "lifetimes.json"
    path.write_text("garbage")
    assert LifetimeCache(path).lookup("a", None) is None
    assert "corrupt" in caplog.text


def test_concurrent_writers_never_leave_a_broken_file(tmp_path: Path) -> None:
    """Processes writing at once: the file is always whole (one writer's entry may be
    lost, never the file)."""
    path = tmp_path / "lifetimes.json"
    script = (
        "import sys; from pathlib import Path\n"
        "from nattool.net.lifetime_cache import LifetimeCache, CachedLifetime\n"
        "from nattool.protocol.keepalive_rules import LifetimeBracket\n"
        "n = int(sys.argv[2]); cache = LifetimeCache(Path(sys.argv[1]), warn=lambda m: sys.exit(m))\n"
        "for i in range(40):\n"
        "    cache.remember(CachedLifetime(f'10.{n}.0.{i}', None, LifetimeBracket(10, 20), 1000.0 + i, 's'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(n)], env=env, stderr=subprocess.PIPE, text=True)
             for n in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err  # a writer saw no corrupt file
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA and data["entries"]
    assert not [p for p in tmp_path.iterdir() if p.name != "lifetimes.json"]


def test_auto_plan_reads_this_networks_entry(tmp_path: Path) -> None:
    """The real routing table of this namespace: the key is the local address toward
    the tracker and the default gateway."""
    from nattool.net.lifetime_cache import network_toward

    cache, _ = make_cache(tmp_path)
    tracker = Endpoint.from_text("127.0.0.1:43283")
    assert auto_plan([tracker], 1e9, cache=cache).source is KeepaliveSource.DEFAULT
    network = network_toward(tracker)
    assert network is not None and network[0] == "127.0.0.1"
    gw = default_gateway()
    assert network[1] == (str(gw.ip) if gw else None)
    cache.remember(CachedLifetime(network[0], network[1], LifetimeBracket(10, 20), 1e9 - 100, "t"))
    plan = auto_plan([Endpoint.from_text("[::1]:43283"), tracker], 1e9, cache=cache)
    assert plan.source is KeepaliveSource.MEASURED and plan.interval == 5 and plan.age == 100
    assert network_toward(Endpoint.from_text("[::1]:1")) is None


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
tun0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0
eth1\t00000000\t0A0A0A0A\t0002\t0\t0\t0\t00000000\t0\t0\t0
garbage line
"""


def test_parse_route_table() -> None:
    import ipaddress

    # The lowest metric among default routes that are up and go through a gateway (the
    # on-link tun0 route has none; eth1's is not up).
    assert parse_route_table(ROUTES) == DefaultGateway(ipaddress.IPv4Address("192.0.2.1"), "eth0")
    assert parse_route_table(ROUTES.splitlines()[0]) is None
    assert parse_route_table("") is None


def test_default_gateway_of_a_missing_table(tmp_path: Path) -> None:
    assert default_gateway(tmp_path / "no-such-file") is None
    table = tmp_path / "route"
    table.write_text(ROUTES)
    gw = default_gateway(table)
    assert gw is not None and str(gw.ip) == "192.0.2.1"
