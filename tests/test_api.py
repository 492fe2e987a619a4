"""The library API (`import nattool`) against a real `nattool serve` on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import nattool
from loopback_dns import LoopbackDNS
from conftest import REPO, TrackerFactory, TrackerProcess, free_udp_port, run_nattool
from nattool import api
from nattool.errors import NetworkError, NoAnswer, TrackerRefused, UsageError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.nat_behaviour import NatType

LOOPBACK = Endpoint.from_text("127.0.0.1:1").ip


def ep(text: str) -> Endpoint:
    return Endpoint.from_text(text)


# ----------------------------------------------------------------------------- the package


def test_import_nattool_loads_nothing_until_a_name_is_used() -> None:
    code = (
        "import sys, nattool\n"
        "assert [m for m in sys.modules if m.startswith('nattool.')] == [], sys.modules\n"
        "assert 'dns' not in sys.modules\n"
        "f = nattool.whoami\n"
        "assert 'nattool.api' in sys.modules and f is sys.modules['nattool.api'].whoami\n"
        "assert 'dns' not in sys.modules  # DNS is loaded when a function runs\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_every_public_name_resolves() -> None:
    from nattool.diag import connect as connect_module

    for name in nattool.__all__:
        if name in ("connect", "PeerConnection") and not hasattr(connect_module, name):
            continue  # written beside the session reshape of connect; checked once it is there
        assert getattr(nattool, name) is not None, name
    assert {"whoami", "register", "probe", "connect", "WhoamiResult", "Registration", "ProbeResult"} <= set(
        nattool.__all__
    )
    assert nattool.register is api.register and nattool.ProbeResult.__module__ == "nattool.diag.probe"
    assert nattool.NoAnswer is NoAnswer and nattool.TrackerRefused is TrackerRefused
    with pytest.raises(AttributeError):
        nattool.no_such_name  # noqa: B018


def test_py_typed_is_shipped() -> None:
    assert (REPO / "nattool" / "py.typed").is_file()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["nattool"]


# ----------------------------------------------------------------------------- whoami


def test_whoami_sees_the_local_port(tracker: TrackerFactory) -> None:
    tp = tracker()
    port = free_udp_port()
    result = asyncio.run(nattool.whoami([tp.endpoint], port=port, timeout=2, retries=2))
    assert isinstance(result, api.WhoamiResult)
    (seen,) = result.sightings
    assert seen.ok and seen.tracker == ep(tp.endpoint) and seen.error is None
    assert seen.endpoint == Endpoint(LOOPBACK, port) == result.endpoint
    assert seen.rtt is not None and 0 < seen.rtt < 2 and seen.attempts >= 1
    assert result.agree is True and result.endpoints == (Endpoint(LOOPBACK, port),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.sightings = ()  # type: ignore[misc]


def test_whoami_takes_strings_endpoints_and_a_single_tracker(tracker: TrackerFactory) -> None:
    a, b = tracker(), tracker()

    async def main() -> tuple[api.WhoamiResult, api.WhoamiResult]:
        both = await nattool.whoami([a.endpoint, ep(b.endpoint)])
        one = await nattool.whoami(ep(a.endpoint))
        return both, one

    both, one = asyncio.run(main())
    assert [s.tracker for s in both.sightings] == [ep(a.endpoint), ep(b.endpoint)]
    assert all(s.ok for s in both.sightings)
    assert both.agree is True and len(both.endpoints) == 1  # one socket: one mapping
    assert [s.tracker for s in one.sightings] == [ep(a.endpoint)] and one.endpoint is not None


def test_whoami_resolves_names_on_the_given_dns_server(tracker: TrackerFactory) -> None:
    tp = tracker()
    zone = "@ 60 IN SOA ns.test. admin.test. 1 60 60 60 60\n@ 60 IN NS ns.test.\ntrk 60 IN A 127.0.0.1\n"
    with LoopbackDNS(zone, origin="test.") as dns_server:
        before = dns_server.query_count()
        result = asyncio.run(nattool.whoami(f"trk.test:{tp.port}", dns_server=dns_server.env_value))
        assert dns_server.query_count() > before
    assert [s.tracker for s in result.sightings] == [ep(tp.endpoint)] and result.endpoint is not None


def test_whoami_without_an_answer_raises_no_answer() -> None:
    dead = f"127.0.0.1:{free_udp_port()}"
    with pytest.raises(NoAnswer, match=f"no answer from {dead} after 2 tries"):
        asyncio.run(nattool.whoami([dead], timeout=0.3, retries=1))
    result = asyncio.run(nattool.whoami([dead], timeout=0.3, retries=1, check=False))
    assert result.endpoint is None and result.agree is None
    assert isinstance(result.error, NoAnswer) and isinstance(result.sightings[0].error, NoAnswer)


def test_one_answer_is_enough(tracker: TrackerFactory) -> None:
    tp = tracker()
    dead = f"127.0.0.1:{free_udp_port()}"
    result = asyncio.run(nattool.whoami([dead, tp.endpoint], timeout=0.5, retries=1))
    assert result.error is None and result.endpoint is not None
    assert [s.ok for s in result.sightings] == [False, True]


def test_whoami_bind_failure_is_a_network_error(tracker: TrackerFactory) -> None:
    tp = tracker()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("0.0.0.0", 0))
        with pytest.raises(NetworkError, match="cannot open a UDP socket on port") as info:
            asyncio.run(nattool.whoami([tp.endpoint], port=taken.getsockname()[1], timeout=0.5))
    assert not isinstance(info.value, NoAnswer)


@pytest.mark.parametrize(
    "trackers, message",
    [
        (["127.0.0.1:99999"], r"bad tracker '127.0.0.1:99999': port 99999 out of range 1..65535"),
        (["::1:4328"], r"ambiguous; write \[::1\]:4328 for port 4328, or \[::1:4328\]"),
        ([], r"no tracker given"),
    ],
)
def test_bad_trackers_are_usage_errors(trackers: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        asyncio.run(nattool.whoami(trackers))


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"retries": -1}, {"port": 70000}, {"family": 5}])
def test_bad_options_are_usage_errors(kwargs: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        asyncio.run(nattool.whoami(["127.0.0.1:9"], **kwargs))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- register


def test_register_two_nodes_see_each_other(tracker: TrackerFactory) -> None:
    tp = tracker()
    first_port, second_port = free_udp_port(), free_udp_port()

    async def main() -> tuple[api.Registration, api.Registration]:
        first = await nattool.register("api-group", [tp.endpoint], lan=["10.0.0.5"], port=first_port)
        second = await nattool.register("api-group", [tp.endpoint], lan=(), port=second_port)
        return first, second

    first, second = asyncio.run(main())
    assert first.group == "api-group" and first.error is None
    assert first.me is not None and first.me.endpoint == Endpoint(LOOPBACK, first_port)
    assert first.members == ()
    (reply,) = second.replies
    assert reply.ok and reply.form == "seed" and reply.tracker == ep(tp.endpoint) and reply.rtt is not None
    assert second.me is not None and second.me.endpoint == Endpoint(LOOPBACK, second_port)
    # Same public IP as the first node: its LAN addresses are shown.
    assert [(m.endpoint, m.lan) for m in second.members] == [(Endpoint(LOOPBACK, first_port), ("10.0.0.5",))]


def test_a_registrant_keeps_its_socket(tracker: TrackerFactory) -> None:
    tp = tracker()

    async def main() -> list[api.Registration]:
        async with await nattool.Registrant.open("kept", [tp.endpoint], lan=()) as node:
            return [await node.register(), await node.register()]

    one, two = asyncio.run(main())
    assert one.me is not None and one.me == two.me  # the same local port both times
    assert two.members == ()  # and so still the only member


def test_a_refused_registration_raises_tracker_refused(tracker: TrackerFactory) -> None:
    tp = tracker()
    # An explicit public endpoint with another IP than the source's is refused.
    with pytest.raises(TrackerRefused, match=f"tracker {tp.endpoint} refused"):
        asyncio.run(nattool.register("refused", [tp.endpoint], public="198.51.100.1:5", lan=()))
    reg = asyncio.run(nattool.register("refused", [tp.endpoint], public="198.51.100.1:5", lan=(), check=False))
    assert reg.me is None and isinstance(reg.error, TrackerRefused)
    assert isinstance(reg.replies[0].error, TrackerRefused) and not reg.replies[0].ok


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"group": "bad group!"}, "bad group"),
        ({"public": "nonsense"}, "bad registration"),
        ({"identity": "not-a-mac"}, "bad registration"),
        ({"lan": ["300.1.1.1"]}, "bad registration"),
    ],
)
def test_bad_registration_arguments(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"group": "g", "trackers": ["127.0.0.1:9"], "timeout": 0.3, **kwargs}
    with pytest.raises(UsageError, match=message):
        asyncio.run(nattool.register(**args))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- trackers, probe


def test_trackers_lists_the_asked_one(tracker: TrackerFactory) -> None:
    tp = tracker()
    result = asyncio.run(api.trackers([tp.endpoint], timeout=1))
    assert result.error is None and result.listings[0].ok
    assert result.known[0] == tp.endpoint


def test_probe_a_tracker_on_loopback(tracker: TrackerFactory) -> None:
    tp = tracker()
    result = asyncio.run(nattool.probe([tp.endpoint], family=4, timeout=1, retries=2))
    assert isinstance(result, nattool.ProbeResult) and result.ok
    (fam,) = result.families
    assert fam.family == "IPv4" and fam.behaviour.udp == "ok" and fam.behaviour.no_nat is True
    assert fam.servers[0].protocol == "stun" and fam.servers[0].target.kind == "tracker"
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.elapsed = 0  # type: ignore[misc]


def test_probe_without_an_answer_raises_no_answer() -> None:
    dead = f"127.0.0.1:{free_udp_port()}"
    with pytest.raises(NoAnswer, match="no server answered the probe"):
        asyncio.run(nattool.probe([dead], family=4, timeout=0.3))
    result = asyncio.run(nattool.probe([f"stun:{dead}"], family=4, timeout=0.3, check=False))
    assert not result.ok and result.families[0].behaviour.nat_type == NatType.UDP_BLOCKED


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"timeout": 0.1}, "probe timeout must be in 0.2..10"),
        ({"retries": 21}, "retries must be in 0..20"),
        ({"lifetime_max": 0}, "--lifetime-max must be 1..600"),
    ],
)
def test_bad_probe_options(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        asyncio.run(nattool.probe(["127.0.0.1:9"], family=4, **kwargs))  # type: ignore[arg-type]


def test_the_cli_and_the_api_agree(shared_tracker: TrackerProcess, nattool_home: Path) -> None:
    port = free_udp_port()
    done = run_nattool("whoami", "-t", shared_tracker.endpoint, "-p", str(port), "--json", home=nattool_home)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    result = asyncio.run(nattool.whoami([shared_tracker.endpoint], port=port))
    assert result.endpoint is not None
    assert doc["endpoint"] == result.endpoint.to_text() == f"127.0.0.1:{port}"
    assert doc["endpoints"] == [e.to_text() for e in result.endpoints]
