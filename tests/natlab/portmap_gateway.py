"""A port-mapping gateway for the NAT lab: NAT-PMP, PCP and UPnP IGD, real nftables rules.

Run inside a lab router namespace (``tests.natlab.portmap_lab.start_portmap_gateway`` does):

    python -m tests.natlab.portmap_gateway --lan-ip 192.0.2.1 --wan-ip 198.51.100.2 \\
        --protocols pcp,natpmp,upnp [--state-file F]

Why not miniupnpd: Debian's refuses to map when its WAN address is in a reserved range, and
the lab's WAN addresses are documentation ones. NAT-PMP and PCP go through nattool's own
codecs (their server side); UPnP through ``upnp_server``; mappings and rules through
``portmap_rules``. Every grant and delete is one JSON line on stdout.

A protocol left out of ``--protocols`` is not offered: with neither NAT-PMP nor PCP nothing
listens on 5351; with one of them, the other's requests get that protocol's "unsupported
version" answer, as RFC 6886/6887 gateways do (so clients fall back or give up at once).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nattool.errors import PortmapProtocolError
from nattool.protocol import natpmp, pcp

from .portmap_rules import MappingConflict, MappingTable, NftRules
from .upnp_server import start_upnp

PROTOCOL_NAMES = ("pcp", "natpmp", "upnp")
EXPIRY_TICK = 0.25  # s between expiry checks
ERROR_LIFETIME = 30  # s a PCP error holds (section 7.4: short errors are retried soon)
_PCP_PROTOS = {pcp.PROTO_UDP: "udp", pcp.PROTO_TCP: "tcp"}
_NATPMP_PROTOS = {natpmp.OP_MAP_UDP: "udp", natpmp.OP_MAP_TCP: "tcp"}


def emit(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


class PortControl(asyncio.DatagramProtocol):
    """UDP 5351: NAT-PMP (version 0) and PCP (version 2) requests from the LAN."""

    def __init__(self, table: MappingTable, protocols: set[str], *, min_lifetime: int,
                 max_lifetime: int) -> None:
        self.table = table
        self.protocols = protocols
        self.min_lifetime = min_lifetime
        self.max_lifetime = max_lifetime
        self.started = time.monotonic()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    @property
    def epoch(self) -> int:
        return int(time.monotonic() - self.started)

    def _lifetime(self, asked: int) -> int:
        return min(max(asked, self.min_lifetime), self.max_lifetime)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 2:
            return
        try:
            if data[0] == natpmp.VERSION and "natpmp" in self.protocols:
                answer = self._natpmp(data, addr[0])
            elif "pcp" in self.protocols:
                answer = self._pcp(data, addr[0])
            else:  # NAT-PMP only: anything else is a version we do not speak
                error = natpmp.error_for_request(data, self.epoch)
                answer = error.to_wire() if error is not None else None
        except RuntimeError as exc:  # nft failed: say so, answer nothing
            print(f"portmap-gateway: {exc}", file=sys.stderr, flush=True)
            return
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)

    # -- NAT-PMP (RFC 6886) ---------------------------------------------------------------

    def _natpmp(self, data: bytes, client: str) -> bytes | None:
        request = natpmp.read_request(data, self.epoch)
        if request is None:
            return None
        if isinstance(request, natpmp.ErrorResponse):
            return request.to_wire()
        if isinstance(request, natpmp.ExternalAddressRequest):
            return natpmp.ExternalAddressResponse(
                natpmp.ResultCode.SUCCESS, self.epoch,
                ipaddress.IPv4Address(self.table.wan_ip)).to_wire()
        proto = _NATPMP_PROTOS[request.opcode]
        now = time.monotonic()
        if request.lifetime == 0:  # delete one mapping, or all of the client's (port 0)
            for m in self.table.all():
                if m.proto == proto and m.internal_ip == client and (
                        request.internal_port in (0, m.internal_port)):
                    self.table.remove(m, "request", now)
            return natpmp.MapResponse(request.opcode, natpmp.ResultCode.SUCCESS, self.epoch,
                                      request.internal_port, 0, 0).to_wire()
        if request.internal_port == 0:
            return natpmp.ErrorResponse(request.opcode, natpmp.ResultCode.NOT_AUTHORIZED,
                                        self.epoch).to_wire()
        m = self.table.grant("natpmp", proto, client, request.internal_port,
                             request.suggested_external_port,
                             self._lifetime(request.lifetime), now)
        return natpmp.MapResponse(request.opcode, natpmp.ResultCode.SUCCESS, self.epoch,
                                  m.internal_port, m.external_port, m.lifetime).to_wire()

    # -- PCP (RFC 6887) -------------------------------------------------------------------

    def _pcp_error(self, data: bytes, result: int) -> bytes | None:
        return pcp.error_response(data, result, self.epoch, ERROR_LIFETIME)

    def _pcp(self, data: bytes, client: str) -> bytes | None:
        if data[0] != pcp.VERSION:
            return self._pcp_error(data, pcp.ResultCode.UNSUPP_VERSION)
        try:
            request = pcp.parse_request(data)
        except PortmapProtocolError as exc:
            return self._pcp_error(data, exc.result)
        if str(request.client_address) != client:
            return self._pcp_error(data, pcp.ResultCode.ADDRESS_MISMATCH)
        if request.opcode == pcp.Opcode.ANNOUNCE:
            return pcp.Response(pcp.Opcode.ANNOUNCE, pcp.ResultCode.SUCCESS, 0,
                                self.epoch).to_wire()
        if request.opcode != pcp.Opcode.MAP or request.map is None:
            return self._pcp_error(data, pcp.ResultCode.UNSUPP_OPCODE)
        prefer_failure = False
        for option in request.options:
            if isinstance(option, pcp.PreferFailure):
                prefer_failure = True
            elif not isinstance(option, pcp.UnknownOption) or pcp.is_mandatory_option(
                    option.code):  # THIRD_PARTY and FILTER are not offered here
                return self._pcp_error(data, pcp.ResultCode.UNSUPP_OPTION)
        asked = request.map
        proto = _PCP_PROTOS.get(asked.protocol)
        if proto is None or asked.internal_port == 0:
            return self._pcp_error(data, pcp.ResultCode.UNSUPP_PROTOCOL)
        now = time.monotonic()
        held = self.table.find(proto, client, asked.internal_port)
        if held is not None and held.nonce and held.nonce != asked.nonce:
            return self._pcp_error(data, pcp.ResultCode.NOT_AUTHORIZED)
        wan = ipaddress.IPv4Address(self.table.wan_ip)
        if request.lifetime == 0:
            external = held.external_port if held is not None else asked.external_port
            if held is not None:
                self.table.remove(held, "request", now)
            return pcp.Response(pcp.Opcode.MAP, pcp.ResultCode.SUCCESS, 0, self.epoch,
                                pcp.MapData(asked.nonce, asked.protocol, asked.internal_port,
                                            external, wan)).to_wire()
        if prefer_failure and asked.external_port and held is None:
            holder = self.table.by_external(proto, asked.external_port)
            if holder is not None:
                return self._pcp_error(data, pcp.ResultCode.CANNOT_PROVIDE_EXTERNAL)
        try:
            m = self.table.grant("pcp", proto, client, asked.internal_port,
                                 asked.external_port, self._lifetime(request.lifetime), now,
                                 nonce=asked.nonce)
        except MappingConflict:  # pragma: no cover - only UPnP asks for an exact port
            return self._pcp_error(data, pcp.ResultCode.CANNOT_PROVIDE_EXTERNAL)
        return pcp.Response(pcp.Opcode.MAP, pcp.ResultCode.SUCCESS, m.lifetime, self.epoch,
                            pcp.MapData(asked.nonce, asked.protocol, m.internal_port,
                                        m.external_port, wan)).to_wire()


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="portmap_gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--lan-ip", required=True, help="the router's LAN address (listens)")
    parser.add_argument("--wan-ip", required=True, help="the router's WAN address (mapped)")
    parser.add_argument("--lan-if", default="lan", help="LAN interface (SSDP multicast)")
    parser.add_argument("--wan-if", default="wan", help="WAN interface (nft rules)")
    parser.add_argument("--protocols", default=",".join(PROTOCOL_NAMES),
                        help="comma-separated: pcp, natpmp, upnp")
    parser.add_argument("--http-port", type=int, default=5000, help="UPnP HTTP port")
    parser.add_argument("--state-file", type=Path, help="JSON list of the current mappings")
    parser.add_argument("--min-lifetime", type=int, default=1, help="s, PCP/NAT-PMP floor")
    parser.add_argument("--max-lifetime", type=int, default=7200, help="s, PCP/NAT-PMP cap")
    args = parser.parse_args(argv)
    protocols = {p.strip() for p in args.protocols.split(",") if p.strip()}
    unknown = protocols - set(PROTOCOL_NAMES)
    if unknown or not protocols:
        parser.error(f"--protocols: choose from {', '.join(PROTOCOL_NAMES)}")
    args.protocols = protocols
    return args


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rules = NftRules(args.wan_ip, args.wan_if)
    rules.create_table()
    table = MappingTable(rules, emit, state_file=args.state_file)
    table.save(time.monotonic())
    closers = []
    try:
        if args.protocols & {"pcp", "natpmp"}:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: PortControl(table, args.protocols, min_lifetime=args.min_lifetime,
                                    max_lifetime=args.max_lifetime),
                local_addr=(args.lan_ip, pcp.SERVER_PORT))
            closers.append(transport.close)
        if "upnp" in args.protocols:
            server, ssdp = await start_upnp(table, args.lan_ip, args.http_port)
            closers += [server.close, ssdp.close]
        emit({"event": "ready", "lan": args.lan_ip, "wan": args.wan_ip,
              "protocols": sorted(args.protocols), "http_port": args.http_port})
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), EXPIRY_TICK)
            except asyncio.TimeoutError:
                pass
            table.expire(time.monotonic())
    finally:
        for close in closers:
            close()
        table.close(time.monotonic())
        rules.delete_table()
        emit({"event": "exit"})


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
