"""Tracker names and SRV discovery against a real authoritative DNS server on loopback.

The server (tests/loopback_dns.py) is dnspython's own message and zone code behind a
UDP socket on 127.0.0.1 (or ::1). The addresses in the zone are documentation ranges:
they are only ever resolved, never sent to.
"""

from __future__ import annotations

import asyncio
import json
import ipaddress
import random
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import dns.rcode
import pytest

from loopback_dns import LoopbackDNS, SilentUDP
from nattool.errors import ResolveError, UsageError
from nattool.net.resolve import (
    ResolveOptions,
    discover_each,
    discover_trackers,
    gather_trackers,
    parse_dns_server,
    resolve_each,
    resolve_trackers,
)
from nattool.protocol.endpoint import DEFAULT_PORT, Endpoint
from nattool.protocol.srv import SrvRecord, order_srv

ZONE = """
@                 60 IN SOA ns.test. admin.test. 1 60 60 60 60
@                 60 IN NS  ns.test.
ns                60 IN A   127.0.0.1

; trackers with both families, one family, or none
dual.trk          60 IN A    192.0.2.1
dual.trk          60 IN A    192.0.2.2
dual.trk          60 IN AAAA 2001:db8::1
v4.trk            60 IN A    192.0.2.4
v6.trk            60 IN AAAA 2001:db8::6
txtonly.trk       60 IN TXT  "no address here"
second.trk        60 IN A    198.51.100.2

; SRV discovery: priorities 5 < 10 < 20, weights 60/30/10 inside priority 10
_nattracker._udp.srv  60 IN SRV 10 60 40001 w60.srv.test.
_nattracker._udp.srv  60 IN SRV 10 30 40002 w30.srv.test.
_nattracker._udp.srv  60 IN SRV 10 10 40003 w10.srv.test.
_nattracker._udp.srv  60 IN SRV 20 0  40004 backup.srv.test.
_nattracker._udp.srv  60 IN SRV 5  0  40005 first.srv.test.
w60.srv           60 IN A    203.0.113.60
w60.srv           60 IN AAAA 2001:db8::60
w30.srv           60 IN A    203.0.113.30
w10.srv           60 IN AAAA 2001:db8::10
backup.srv        60 IN A    203.0.113.20
first.srv         60 IN A    203.0.113.5
first.srv         60 IN AAAA 2001:db8::5

; no SRV: fall back to the domain's own addresses on the default port
plain             60 IN A    198.51.100.7
plain             60 IN AAAA 2001:db8::7

; "." target: the domain says it runs no tracker
_nattracker._udp.none 60 IN SRV 0 0 0 .
none              60 IN A    198.51.100.8

; one target does not resolve, the other does
_nattracker._udp.partial 60 IN SRV 1 10 40010 gone.partial.test.
_nattracker._udp.partial 60 IN SRV 1 10 40011 ok.partial.test.
ok.partial        60 IN A    192.0.2.11

; no target resolves
_nattracker._udp.broken 60 IN SRV 1 10 40020 gone.broken.test.

; the SRV name exists but the domain has no addresses at all
empty             60 IN TXT "nothing"

; a tracker answered over v4 while its AAAA query is swallowed
slowv6.trk        60 IN A    192.0.2.66
slowv6.trk        60 IN AAAA 2001:db8::66
"""


@pytest.fixture(scope="module")
def dns_server() -> Iterator[LoopbackDNS]:
    server = LoopbackDNS(
        ZONE,
        origin="test.",
        rcodes={"servfail.trk": dns.rcode.SERVFAIL, "refused.trk": dns.rcode.REFUSED},
        drop={("slowv6.trk", "AAAA")},
    )
    with server:
        yield server


def ep(text: str) -> Endpoint:
    return Endpoint.from_text(text)


def on(
    resolver_address: tuple[str, int],
    timeout: float = 2,
    *,
    family: int | None = None,
    hosts_path: Path | None = None,
    rng: random.Random | None = None,
) -> ResolveOptions:
    """Options that resolve on the given DNS server."""
    return ResolveOptions(timeout, family, resolver_address, hosts_path, rng)


def same(got: list[Endpoint], expected: list[Endpoint]) -> bool:
    """Equal up to the order inside one name and family: DNS servers may rotate an
    RRset, and the resolver keeps the server's order (A records before AAAA)."""
    versions = [e.ip.version for e in got]
    key = lambda e: (e.ip.version, e.to_text())  # noqa: E731
    return sorted(got, key=key) == sorted(expected, key=key) and versions == sorted(versions)


# ----------------------------------------------------------------------- host names


def test_name_resolves_to_every_address_of_both_families(dns_server: LoopbackDNS) -> None:
    got = asyncio.run(resolve_trackers(["dual.trk.test:4000"], on(dns_server.address)))
    assert same(got, [ep("192.0.2.1:4000"), ep("192.0.2.2:4000"), ep("[2001:db8::1]:4000")])


def test_default_port_and_family_filters(dns_server: LoopbackDNS) -> None:
    addr = dns_server.address
    v4 = asyncio.run(resolve_trackers(["dual.trk.test"], on(addr, family=socket.AF_INET)))
    v6 = asyncio.run(resolve_trackers(["dual.trk.test"], on(addr, family=socket.AF_INET6)))
    assert same(v4, [ep(f"192.0.2.1:{DEFAULT_PORT}"), ep(f"192.0.2.2:{DEFAULT_PORT}")])
    assert v6 == [ep(f"[2001:db8::1]:{DEFAULT_PORT}")]
    assert asyncio.run(resolve_trackers(["v6.trk.test:1"], on(addr))) == [ep("[2001:db8::6]:1")]
    assert asyncio.run(resolve_trackers(["v4.trk.test:1"], on(addr))) == [ep("192.0.2.4:1")]
    with pytest.raises(ResolveError, match=r"cannot resolve tracker 'v4.trk.test': no AAAA record"):
        asyncio.run(resolve_trackers(["v4.trk.test"], on(addr, family=socket.AF_INET6)))


def test_the_server_really_was_asked(dns_server: LoopbackDNS) -> None:
    before = dns_server.query_count()
    asyncio.run(resolve_trackers(["second.trk.test"], on(dns_server.address)))
    asked = dns_server.queries[before:]
    assert sorted(asked) == [("second.trk.test.", "A"), ("second.trk.test.", "AAAA")]


def test_literals_and_localhost_need_no_dns(dns_server: LoopbackDNS) -> None:
    with SilentUDP() as silent:
        start = time.monotonic()
        specs = ["localhost:5", "192.0.2.9", "[2001:db8::9]:7", "2001:db8::a", "x.localhost:6"]
        got = asyncio.run(resolve_trackers(specs, on(silent.address)))
        assert time.monotonic() - start < 0.5  # nothing waited on the silent server
    assert got == [
        ep("127.0.0.1:5"),
        ep("[::1]:5"),
        ep(f"192.0.2.9:{DEFAULT_PORT}"),
        ep("[2001:db8::9]:7"),
        ep(f"[2001:db8::a]:{DEFAULT_PORT}"),
        ep("127.0.0.1:6"),
        ep("[::1]:6"),
    ]
    v4 = asyncio.run(resolve_trackers(["localhost"], on(silent.address, timeout=1, family=socket.AF_INET)))
    assert v4 == [ep(f"127.0.0.1:{DEFAULT_PORT}")]
    with pytest.raises(ResolveError, match="not an IPv4 address"):
        asyncio.run(resolve_trackers(["[::1]"], on(silent.address, timeout=1, family=socket.AF_INET)))


def test_duplicates_are_dropped_in_order(dns_server: LoopbackDNS) -> None:
    specs = ["192.0.2.4:1", "v4.trk.test:1", "dual.trk.test:1", "192.0.2.1:1"]
    got = asyncio.run(resolve_trackers(specs, on(dns_server.address)))
    assert got[0] == ep("192.0.2.4:1")
    assert same(got[1:], [ep("192.0.2.1:1"), ep("192.0.2.2:1"), ep("[2001:db8::1]:1")])


def test_resolve_each_keeps_spec_and_scheme(dns_server: LoopbackDNS) -> None:
    items = asyncio.run(resolve_each(["stun:v4.trk.test", "dual.trk.test:9"], on(dns_server.address)))
    assert items[0].spec.scheme == "stun" and items[0].endpoints == (ep("192.0.2.4:3478"),)
    assert items[1].spec.host == "dual.trk.test" and len(items[1].endpoints) == 3


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing.test", r"cannot resolve tracker 'missing.test': NXDOMAIN"),
        ("txtonly.trk.test", r"cannot resolve tracker 'txtonly.trk.test': no A or AAAA record"),
        ("servfail.trk.test", r"cannot resolve tracker 'servfail.trk.test': .*SERVFAIL"),
        ("refused.trk.test", r"cannot resolve tracker 'refused.trk.test': .*REFUSED"),
        ("outside.example", r"cannot resolve tracker 'outside.example': .*REFUSED"),
    ],
)
def test_errors_are_one_line(dns_server: LoopbackDNS, name: str, message: str) -> None:
    with pytest.raises(ResolveError, match=message) as info:
        asyncio.run(resolve_trackers([name], on(dns_server.address)))
    assert "\n" not in str(info.value)


def test_bad_spec_is_a_usage_error_before_any_dns(dns_server: LoopbackDNS) -> None:
    before = dns_server.query_count()
    with pytest.raises(UsageError, match="port 70000 out of range"):
        asyncio.run(resolve_trackers(["v4.trk.test:70000"], on(dns_server.address)))
    assert dns_server.query_count() == before


def test_on_error_skips_failures_but_not_all(dns_server: LoopbackDNS) -> None:
    errors: list[ResolveError] = []
    specs = ["missing.test", "v4.trk.test:2"]
    got = asyncio.run(resolve_trackers(specs, on(dns_server.address), on_error=errors.append))
    assert got == [ep("192.0.2.4:2")]
    assert len(errors) == 1 and "missing.test" in str(errors[0])
    with pytest.raises(ResolveError, match="no tracker could be resolved"):
        asyncio.run(resolve_trackers(["missing.test"], on(dns_server.address), on_error=errors.append))


def test_one_family_timing_out_still_returns_the_other(dns_server: LoopbackDNS) -> None:
    start = time.monotonic()
    got = asyncio.run(resolve_trackers(["slowv6.trk.test:3"], on(dns_server.address, timeout=0.6)))
    elapsed = time.monotonic() - start
    assert got == [ep("192.0.2.66:3")]
    assert elapsed < 1.5


def test_hosts_file_is_used_before_dns(dns_server: LoopbackDNS, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n192.0.2.77 tracker.lab tracker\n2001:db8::77 tracker.lab\nbad line\n")
    before = dns_server.query_count()
    got = asyncio.run(resolve_trackers(["tracker.lab:5", "tracker"], on(dns_server.address, hosts_path=hosts)))
    assert got == [ep("192.0.2.77:5"), ep("[2001:db8::77]:5"), ep(f"192.0.2.77:{DEFAULT_PORT}")]
    assert dns_server.query_count() == before


# ---------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("family_host", ["127.0.0.1", "::1"])
def test_silent_dns_server_times_out_in_bounded_time(family_host: str) -> None:
    with SilentUDP(family_host) as silent:
        for call in (
            lambda: asyncio.run(resolve_trackers(["a.example", "b.example"], on(silent.address, timeout=0.5))),
            lambda: asyncio.run(discover_trackers("example.org", on(silent.address, timeout=0.5))),
        ):
            start = time.monotonic()
            with pytest.raises(ResolveError, match=r"timed out after 0.5s") as info:
                call()
            elapsed = time.monotonic() - start
            assert 0.4 <= elapsed < 1.2, elapsed
            assert "\n" not in str(info.value)


def test_dns_server_over_ipv6_loopback() -> None:
    with LoopbackDNS(ZONE, origin="test.", host="::1") as server6:
        got = asyncio.run(resolve_trackers(["v6.trk.test:8"], on(server6.address)))
    assert got == [ep("[2001:db8::6]:8")]


# ---------------------------------------------------------------------------- discovery

SRV_RECORDS = [
    SrvRecord(10, 60, 40001, "w60.srv.test"),
    SrvRecord(10, 30, 40002, "w30.srv.test"),
    SrvRecord(10, 10, 40003, "w10.srv.test"),
    SrvRecord(20, 0, 40004, "backup.srv.test"),
    SrvRecord(5, 0, 40005, "first.srv.test"),
]


def test_srv_priority_order_and_every_address(dns_server: LoopbackDNS) -> None:
    seed = 11
    got = asyncio.run(discover_trackers("srv.test", on(dns_server.address, rng=random.Random(seed))))
    # The weighted middle is what the pure RFC 2782 ordering says for this seed.
    middle = [r.target for r in order_srv(SRV_RECORDS, random.Random(seed)) if r.priority == 10]
    addresses = {
        "w60.srv.test": ["203.0.113.60:40001", "[2001:db8::60]:40001"],
        "w30.srv.test": ["203.0.113.30:40002"],
        "w10.srv.test": ["[2001:db8::10]:40003"],
    }
    expected = ["203.0.113.5:40005", "[2001:db8::5]:40005"]
    for target in middle:
        expected += addresses[target]
    expected += ["203.0.113.20:40004"]
    assert [e.to_text() for e in got] == expected


def test_srv_priority_holds_for_any_seed(dns_server: LoopbackDNS) -> None:
    for seed in range(8):
        items = asyncio.run(
            discover_each("srv.test", on(dns_server.address, rng=random.Random(seed)))
        )
        hosts = [i.spec.host for i in items]
        assert hosts[0] == "first.srv.test" and hosts[-1] == "backup.srv.test"
        assert set(hosts[1:4]) == {"w60.srv.test", "w30.srv.test", "w10.srv.test"}
        assert all(i.via == "_nattracker._udp.srv.test" for i in items)


def test_srv_weights_through_real_dns(dns_server: LoopbackDNS) -> None:
    rng = random.Random(2782)
    trials = 300

    async def many() -> Counter[str]:
        counts: Counter[str] = Counter()
        for _ in range(trials):
            items = await discover_each("srv.test", on(dns_server.address, rng=rng))
            counts[items[1].spec.host] += 1  # first pick inside priority 10
        return counts

    counts = asyncio.run(many())
    assert abs(counts["w60.srv.test"] / trials - 0.6) < 0.08, counts
    assert abs(counts["w30.srv.test"] / trials - 0.3) < 0.08, counts
    assert abs(counts["w10.srv.test"] / trials - 0.1) < 0.06, counts


def test_srv_both_families_filtered(dns_server: LoopbackDNS) -> None:
    addr = dns_server.address
    v6 = asyncio.run(discover_trackers("srv.test", on(addr, family=socket.AF_INET6, rng=random.Random(1))))
    assert all(e.ip.version == 6 for e in v6)
    # w30 and backup have no AAAA: skipped, the rest still served.
    assert {e.port for e in v6} == {40005, 40001, 40003}
    v4 = asyncio.run(discover_trackers("srv.test", on(addr, family=socket.AF_INET, rng=random.Random(1))))
    assert {e.port for e in v4} == {40005, 40001, 40002, 40004}


def test_fallback_to_domain_addresses_on_default_port(dns_server: LoopbackDNS) -> None:
    got = asyncio.run(discover_trackers("plain.test", on(dns_server.address)))
    assert got == [ep(f"198.51.100.7:{DEFAULT_PORT}"), ep(f"[2001:db8::7]:{DEFAULT_PORT}")]
    assert ("_nattracker._udp.plain.test.", "SRV") in dns_server.queries


def test_dot_target_means_no_tracker(dns_server: LoopbackDNS) -> None:
    # The domain has an A record too, but "." is an explicit "not here": no fallback.
    assert asyncio.run(discover_trackers("none.test", on(dns_server.address))) == []


def test_unresolvable_targets(dns_server: LoopbackDNS) -> None:
    got = asyncio.run(discover_trackers("partial.test", on(dns_server.address)))
    assert got == [ep("192.0.2.11:40011")]
    with pytest.raises(ResolveError, match=r"cannot discover trackers for 'broken.test': no SRV target resolves"):
        asyncio.run(discover_trackers("broken.test", on(dns_server.address)))


@pytest.mark.parametrize(
    "domain, message",
    [
        ("nowhere.test", r"no SRV record _nattracker._udp.nowhere.test and the domain itself: NXDOMAIN"),
        ("empty.test", r"no SRV record _nattracker._udp.empty.test and the domain itself: no A or AAAA record"),
    ],
)
def test_discovery_errors(dns_server: LoopbackDNS, domain: str, message: str) -> None:
    with pytest.raises(ResolveError, match=message):
        asyncio.run(discover_trackers(domain, on(dns_server.address)))


@pytest.mark.parametrize("bad", ["", "192.0.2.1", "example.org:53", "exa mple.org", "[::1]"])
def test_bad_domain_is_usage_error(bad: str) -> None:
    with pytest.raises(UsageError):
        asyncio.run(discover_trackers(bad, ResolveOptions(timeout=1, resolver_address=("127.0.0.1", 9))))


# ------------------------------------------------------------- async, gather, settings


def test_one_options_object_serves_calls_running_together(dns_server: LoopbackDNS) -> None:
    options = on(dns_server.address)

    async def main() -> tuple[list[Endpoint], list[Endpoint], list[Endpoint]]:
        return await asyncio.gather(
            resolve_trackers(["v4.trk.test:1"], options),
            discover_trackers("plain.test", options),
            resolve_trackers(["v6.trk.test:1"], options),
        )

    a, b, c = asyncio.run(main())
    assert a == [ep("192.0.2.4:1")]
    assert b[0] == ep(f"198.51.100.7:{DEFAULT_PORT}")
    assert c == [ep("[2001:db8::6]:1")]


def test_gather_trackers_and_domain_together(dns_server: LoopbackDNS) -> None:
    items = asyncio.run(gather_trackers(["v4.trk.test:1"], "plain.test", on(dns_server.address)))
    assert [i.spec.host for i in items] == ["v4.trk.test", "plain.test"]
    with pytest.raises(UsageError, match="no tracker given"):
        asyncio.run(gather_trackers([], None, on(dns_server.address)))


def test_parse_dns_server() -> None:
    assert parse_dns_server("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_dns_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_dns_server("[::1]:5353") == ("::1", 5353)
    assert parse_dns_server("::1") == ("::1", 53)
    with pytest.raises(UsageError, match="must be an IP address"):
        parse_dns_server("dns.example.org")


def test_settings_env_points_resolution_at_the_server(dns_server: LoopbackDNS) -> None:
    from nattool.config import load_settings

    settings = load_settings(
        {},
        config_path=None,
        environ={
            "HOME": "/nonexistent-home",
            "NATTOOL_DNS_SERVER": dns_server.env_value,
            "NATTOOL_TRACKERS": "dual.trk.test:5,192.0.2.200:6",
        },
    )
    got = asyncio.run(resolve_trackers(settings.tracker_specs(), on(settings.resolver_address())))
    assert same(got[:3], [ep("192.0.2.1:5"), ep("192.0.2.2:5"), ep("[2001:db8::1]:5")])
    assert got[3] == ep("192.0.2.200:6")
    assert ipaddress.ip_address(settings.resolver_address()[0]).is_loopback  # type: ignore[index]


# ------------------------------------------------------------ the real CLI, end to end


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_finds_a_real_tracker_by_srv(tmp_path: Path) -> None:
    """`nattool whoami --domain` and `nattool trackers --domain`: SRV on the loopback DNS
    server -> a real `nattool serve` on 127.0.0.1 -> answers."""
    import os
    import subprocess
    import sys

    port = _free_udp_port()
    zone = f"""
@   60 IN SOA ns.lab.test. admin.lab.test. 1 60 60 60 60
@   60 IN NS  ns.lab.test.
ns  60 IN A   127.0.0.1
_nattracker._udp 60 IN SRV 10 10 {port} trk.lab.test.
trk 60 IN A 127.0.0.1
"""
    server = subprocess.Popen(
        [sys.executable, "-m", "nattool", "serve", "--host", "127.0.0.1", "--port", str(port), "--store", "memory"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert f"127.0.0.1:{port}" in banner, banner
        with LoopbackDNS(zone, origin="lab.test.") as lab_dns:
            environ = {
                k: v for k, v in os.environ.items() if not k.startswith("NATTOOL_")
            } | {"HOME": str(tmp_path), "NATTOOL_DNS_SERVER": lab_dns.env_value, "NO_COLOR": "1"}
            whoami = subprocess.run(
                [sys.executable, "-m", "nattool", "whoami", "--domain", "lab.test", "--json", "--timeout", "3"],
                capture_output=True, text=True, env=environ, timeout=30,
            )
            assert whoami.returncode == 0, whoami.stderr
            answer = json.loads(whoami.stdout)
            assert answer["endpoint"].startswith("127.0.0.1:")
            assert [a["tracker"] for a in answer["answers"]] == [f"127.0.0.1:{port}"]
            assert ("_nattracker._udp.lab.test.", "SRV") in lab_dns.queries

            listed = subprocess.run(
                [sys.executable, "-m", "nattool", "trackers", "--domain", "lab.test", "--json", "--timeout", "3"],
                capture_output=True, text=True, env=environ, timeout=30,
            )
            assert listed.returncode == 0, listed.stderr
            assert f"127.0.0.1:{port}" in listed.stdout

            # A domain that does not exist: one line, the "unreachable" exit code.
            missing = subprocess.run(
                [sys.executable, "-m", "nattool", "whoami", "--domain", "nowhere.lab.test", "--timeout", "2"],
                capture_output=True, text=True, env=environ, timeout=30,
            )
            assert missing.returncode == 4, missing
            assert missing.stderr.count("\n") == 1 and "NXDOMAIN" in missing.stderr
            assert "Traceback" not in missing.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
