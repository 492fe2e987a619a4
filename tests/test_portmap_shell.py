"""The port-mapping shell (nattool/net/portmap.py) against a real gateway on loopback:
PCP, NAT-PMP fallback, UPnP, discovery, renewal, delete on exit and on cancellation.
(tests/portmap_responder.py answers with the server side of the codecs; the NAT lab's
gateway, with natpmpc and upnpc, is tests/test_portmap_gateway.py.)"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Awaitable, Callable

import pytest

from nattool.net import portmap
from nattool.net.portmap import PortMapping, discover
from nattool.protocol import natpmp, pcp
from nattool.protocol.portmap_client import MappingDeleted, MappingFailed, MappingGranted, PortmapEvent
from tests import portmap_responder
from tests.portmap_responder import Gateway, Seen


def closed_udp_port() -> int:
    """A loopback UDP port nobody listens on (the kernel answers ICMP unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_with(gateway: Gateway, body: Callable[[Gateway], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        handles = await portmap_responder.start(gateway)
        try:
            return await body(gateway)
        finally:
            portmap_responder.stop(handles)

    return asyncio.run(main())


def mapping_for(gateway: Gateway, local_port: int, **kw: Any) -> PortMapping:
    return PortMapping(local_port, gateway="127.0.0.1", port=kw.pop("port", gateway.udp_port),
                       ssdp_target=("127.0.0.1", gateway.ssdp_port), **kw)


# --------------------------------------------------------------------------- PortMapping


def test_pcp_mapping_is_granted_renewed_and_deleted_on_exit() -> None:
    seen_events: list[PortmapEvent] = []

    async def body(gw: Gateway) -> None:
        async with mapping_for(gw, 40001, lifetime=2, on_change=seen_events.append) as pm:
            assert pm.mapping is not None
            assert pm.mapping.protocol == "pcp"
            assert pm.mapping.external.to_text() == "203.0.113.9:50001"
            assert pm.mapping.internal.to_text() == "127.0.0.1:40001"
            # Renewal between 1/2 and 5/8 of the 2 s lifetime.
            for _ in range(100):
                if any(isinstance(e, MappingGranted) and e.renewal for e in seen_events):
                    break
                await asyncio.sleep(0.05)
        assert gw.mappings == {}

    run_with(Gateway(protocols=("pcp",), max_lifetime=2), body)
    assert any(isinstance(e, MappingGranted) and e.renewal for e in seen_events)
    assert isinstance(seen_events[-1], MappingDeleted) and seen_events[-1].confirmed


def test_natpmp_fallback_when_the_gateway_answers_pcp_with_unsupported_version() -> None:
    async def body(gw: Gateway) -> tuple[Any, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        pm = mapping_for(gw, 40002, wait=2.0)
        mapping = await pm.start()
        took = loop.time() - started
        await pm.close()
        return mapping, took

    gw = Gateway(protocols=("natpmp",))
    mapping, took = run_with(gw, body)
    assert mapping is not None and mapping.protocol == "natpmp"
    assert took < 1.0  # the UNSUPP_VERSION answer, not the silence timeout, moved on
    assert [s.protocol for s in gw.seen] == ["natpmp", "natpmp"] and gw.seen[-1].lifetime == 0
    assert gw.mappings == {}


def test_upnp_when_udp_5351_is_closed() -> None:
    async def body(gw: Gateway) -> Any:
        pm = mapping_for(gw, 40003, port=closed_udp_port(), wait=1.5)
        mapping = await pm.start()
        # ICMP unreachable on 5351 ends PCP at once, and NAT-PMP (the same port) is not tried.
        assert "pcp" in pm.failures and "natpmp" not in pm.failures
        held = dict(gw.mappings)
        await pm.close()
        return mapping, held

    gw = Gateway(protocols=("upnp",))
    mapping, held = run_with(gw, body)
    assert mapping is not None and mapping.protocol == "upnp"
    assert mapping.external.to_text() == "203.0.113.9:40003" and held == {("upnp", 40003): 40003}
    assert gw.mappings == {} and gw.seen[-1] == Seen("upnp", 40003, 0)


def test_an_igd_other_than_the_gateway_is_used_after_the_first_search_round() -> None:
    async def body(gw: Gateway) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        # The default gateway is 127.0.0.2 (nothing there); the IGD answers from 127.0.0.1.
        pm = PortMapping(40009, gateway="127.0.0.2", port=closed_udp_port(), protocols=("upnp",), wait=1.2,
                         ssdp_target=("127.0.0.1", gw.ssdp_port))
        mapping = await pm.start()
        took = loop.time() - started
        await pm.close()
        return mapping, took

    mapping, took = run_with(Gateway(protocols=("upnp",)), body)
    assert mapping is not None and mapping.protocol == "upnp"
    assert took >= 0.4  # not before the first round (wait / 3) gave the gateway its chance


def test_upnp_lease_is_renewed_by_adding_it_again() -> None:
    seen_events: list[PortmapEvent] = []

    async def body(gw: Gateway) -> None:
        async with mapping_for(gw, 40010, protocols=("upnp",), lifetime=2, on_change=seen_events.append) as pm:
            assert pm.mapping is not None and pm.mapping.lifetime == 2
            for _ in range(100):
                if any(isinstance(e, MappingGranted) for e in seen_events):
                    break
                await asyncio.sleep(0.05)

    gw = Gateway(protocols=("upnp",))
    run_with(gw, body)
    renewed = [e for e in seen_events if isinstance(e, MappingGranted)]
    assert renewed and renewed[0].renewal and renewed[0].external.port == 40010
    assert [s.lifetime for s in gw.seen] == [2, 2, 0]  # add, add again, delete
    assert gw.mappings == {}


def test_upnp_conflict_and_permanent_only_leases() -> None:
    async def body(gw: Gateway) -> Any:
        async with mapping_for(gw, 40004, protocols=("upnp",), wait=1.5) as pm:
            return pm.mapping

    gw = Gateway(protocols=("upnp",), upnp_conflicts={40004}, upnp_permanent_only=True)
    mapping = run_with(gw, body)
    assert mapping is not None and mapping.external.port != 40004 and mapping.lifetime == 0
    assert gw.mappings == {}


def test_silent_gateway_gives_no_mapping_within_the_wait() -> None:
    async def body(gw: Gateway) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        pm = mapping_for(gw, 40005, wait=0.6)
        mapping = await pm.start()
        await pm.close()
        took = loop.time() - started
        for _ in range(100):  # let the responder read the last datagrams on loopback
            if gw.received[-1][:2] == bytes([0, 1]) and natpmp.parse_request(gw.received[-1]).lifetime == 0:
                break
            await asyncio.sleep(0.01)
        return mapping, took, pm.failures

    gw = Gateway(protocols=())
    mapping, took, failures = run_with(gw, body)
    assert mapping is None
    assert took < 3.0  # wait=0.6 plus UPnP's search bound; nothing waits for retransmissions forever
    assert set(failures) == {"pcp", "natpmp", "upnp"}
    # Each unanswered mapping request is followed by its delete: a gateway that mapped it
    # and lost the answer must not keep the mapping.
    pcp_lifetimes = [pcp.parse_request(d).lifetime for d in gw.received if d[0] == pcp.VERSION]
    natpmp_maps = [natpmp.parse_request(d) for d in gw.received if d[:2] == bytes([0, 1])]
    assert pcp_lifetimes[0] == 7200 and pcp_lifetimes[-1] == 0
    assert natpmp_maps[0].lifetime == 7200 and natpmp_maps[-1].lifetime == 0  # type: ignore[union-attr]


def test_cancellation_deletes_the_mapping() -> None:
    async def body(gw: Gateway) -> None:
        entered = asyncio.Event()

        async def user() -> None:
            async with mapping_for(gw, 40006, protocols=("pcp",)):
                entered.set()
                await asyncio.sleep(3600)

        task = asyncio.ensure_future(user())
        await asyncio.wait_for(entered.wait(), 5)
        assert gw.mappings
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    gw = Gateway(protocols=("pcp",))
    run_with(gw, body)
    assert gw.mappings == {} and gw.seen[-1] == Seen("pcp", 40006, 0)


def test_cancelled_while_asking_still_deletes() -> None:
    async def body(gw: Gateway) -> None:
        pm = mapping_for(gw, 40007, protocols=("pcp",))
        task = asyncio.ensure_future(pm.start())
        await asyncio.sleep(0)  # the request is on its way; cancel before the answer is read
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pm.close()  # idempotent

    gw = Gateway(protocols=("pcp",))
    run_with(gw, body)
    assert gw.mappings == {}


def test_lost_mapping_is_reported() -> None:
    seen_events: list[PortmapEvent] = []

    async def body(gw: Gateway) -> None:
        async with mapping_for(gw, 40008, protocols=("pcp",), lifetime=2, on_change=seen_events.append) as pm:
            gw.protocols = ()  # the gateway stops answering: the renewals go unanswered
            for _ in range(100):
                if pm.mapping is None:
                    break
                await asyncio.sleep(0.05)
            assert pm.mapping is None

    run_with(Gateway(protocols=("pcp",), max_lifetime=2), body)
    lost = [e for e in seen_events if isinstance(e, MappingFailed)]
    assert lost and lost[0].lost


# --------------------------------------------------------------------------- discover


def test_discover_reports_each_protocol_and_leaves_nothing_mapped() -> None:
    async def body(gw: Gateway) -> Any:
        return await discover(gateway="127.0.0.1", port=gw.udp_port, ssdp_target=("127.0.0.1", gw.ssdp_port))

    gw = Gateway(external="100.64.0.2")
    report = run_with(gw, body)
    assert report.answered == ("pcp", "natpmp", "upnp")
    doc = report.to_json()
    for name in ("pcp", "natpmp", "upnp"):
        assert doc[name]["external_address"] == "100.64.0.2"
        assert doc[name]["address_class"] == "cgnat" and doc[name]["behind_nat"] is True
        assert doc[name]["note"] == "carrier-grade NAT or a double NAT"
    assert doc["behind_nat"] is True and doc["gateway"] == "127.0.0.1"
    assert doc["pcp"]["deleted"] is True
    assert gw.mappings == {}
    # NAT-PMP and UPnP needed no mapping; PCP's one was deleted at once.
    assert [(s.protocol, s.lifetime) for s in gw.seen] == [("pcp", 30), ("pcp", 0)]


def test_discover_public_address_and_silent_protocols() -> None:
    async def body(gw: Gateway) -> Any:
        return await discover(gateway="127.0.0.1", port=gw.udp_port, timeout=0.5,
                              ssdp_target=("127.0.0.1", gw.ssdp_port))

    report = run_with(Gateway(protocols=("natpmp",), external="198.51.100.7"), body)
    doc = report.to_json()
    assert report.answered == ("natpmp",)
    assert doc["natpmp"]["behind_nat"] is False and doc["note"] is None
    assert doc["pcp"]["answered"] is False and doc["upnp"]["answered"] is False
    assert doc["elapsed_ms"] < 2500


def test_unknown_protocol_name_is_our_error() -> None:
    from nattool.errors import PortmapProtocolError

    with pytest.raises(PortmapProtocolError):
        PortMapping(1, protocols=("pcp", "nope"))
    assert portmap.PROTOCOLS == ("pcp", "natpmp", "upnp")


# --------------------------------------------------------------------------- probe's report


def test_probe_renders_the_portmap_section_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from nattool.cli.probe_cmd import render
    from nattool.diag.probe import ProbeResult

    async def body(gw: Gateway) -> Any:
        return await discover(gateway="127.0.0.1", port=gw.udp_port, timeout=0.5,
                              ssdp_target=("127.0.0.1", gw.ssdp_port))

    report = run_with(Gateway(protocols=("natpmp", "upnp"), external="100.64.0.2"), body)
    result = ProbeResult(families=(), portmap=report)
    render(result, json_out=False)
    text = " ".join(capsys.readouterr().out.split())  # the table wraps at the terminal's width
    assert "Port mapping (gateway 127.0.0.1" in text
    assert "NAT-PMP yes, external address 100.64.0.2 (cgnat) carrier-grade NAT or a double NAT" in text
    assert "PCP no (the gateway speaks NAT-PMP, not PCP)" in text
    render(result, json_out=True)
    doc = json.loads(capsys.readouterr().out)
    assert doc["portmap"]["answered"] == ["natpmp", "upnp"]
    assert doc["portmap"]["note"] == "carrier-grade NAT or a double NAT"
    assert ProbeResult(families=()).to_json()["portmap"] is None
