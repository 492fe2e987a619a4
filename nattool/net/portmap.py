"""Port mapping at the gateway: PCP, NAT-PMP and UPnP IGD over real sockets.

The I/O shell around the pure codecs and mappers of ``nattool.protocol``:

- the IPv4 default gateway (:mod:`nattool.net.gateway`, from ``/proc/net/route``);
- PCP and NAT-PMP on UDP 5351 of the gateway, from a socket connected to it (so only
  the gateway's datagrams reach the mapper, and an ICMP "port unreachable" ends the
  wait at once); PCP first, NAT-PMP when PCP answers UNSUPP_VERSION or stays silent;
- UPnP IGD: SSDP M-SEARCH to 239.255.255.250:1900, the device description and SOAP
  over HTTP with asyncio streams; AddPortMapping only when PCP and NAT-PMP gave
  nothing, so one gateway never holds two mappings of ours at once;
- :func:`discover` (what answers, and the external address each reports) and
  :class:`PortMapping` (map a local UDP port, renew in the background, delete on exit,
  also on cancellation).

Unsolicited ANNOUNCEs (multicast to port 5350) are not listened for: the epoch in each
renewal answer tells the mapper about a rebooted gateway.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Optional, Sequence

from nattool.errors import NattoolError, PortmapProtocolError, PortmapRefused
from nattool.net.gateway import default_gateway
from nattool.net.localinfo import local_address_towards
from nattool.protocol import upnp_igd
from nattool.protocol.endpoint import Endpoint, IPAddress
from nattool.protocol.portmap_client import (
    ExternalAddress,
    MapperState,
    MappingDeleted,
    MappingFailed,
    MappingGranted,
    NatpmpMapper,
    PcpMapper,
    PortmapEvent,
    RENEW_FROM,
    RENEW_TO,
    address_class,
    behind_another_nat,
)

PROTOCOLS = ("pcp", "natpmp", "upnp")  # in order of preference
GATEWAY_PORT = 5351
DEFAULT_WAIT = 1.0  # s to get a mapping (or an answer) from the gateway
DELETE_WAIT = 1.0  # s a delete may take at exit
PROBE_PCP_LIFETIME = 30  # s asked for the throwaway PCP mapping of discover()
UPNP_DESCRIPTION = "nattool"
UPNP_CONFLICT_TRIES = 4  # other external ports tried when the first is taken (718)
NAT_NOTE = "carrier-grade NAT or a double NAT"
SSDP_TARGET = (upnp_igd.SSDP_ADDRESS, upnp_igd.SSDP_PORT)

EventCallback = Callable[[PortmapEvent], None]


# --------------------------------------------------------------------------- gateway


def _gateway_ip() -> Optional[ipaddress.IPv4Address]:
    found = default_gateway()
    return None if found is None else found.ip


def _source_toward(gateway: str) -> Optional[str]:
    """The source address the kernel picks toward ``gateway`` (nothing is sent)."""
    try:
        return local_address_towards(Endpoint(ipaddress.IPv4Address(gateway), GATEWAY_PORT))
    except ValueError:
        return None


# --------------------------------------------------------------------------- UDP 5351


class _GatewayChannel(asyncio.DatagramProtocol):
    """A UDP socket connected to gateway:5351; datagrams and ICMP errors queue up."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Optional[bytes]] = asyncio.Queue(maxsize=64)
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.unreachable = False  # an ICMP error came back: nothing listens there

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.queue.full():
            self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.unreachable = True
        if not self.queue.full():
            self.queue.put_nowait(None)  # ICMP unreachable: nobody listens on the gateway's port

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.sendto(data)
            except OSError:
                pass  # the same as a lost datagram: retransmission or the timeout handles it

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _open_channel(gateway: str, port: int, local_ip: Optional[str]) -> _GatewayChannel:
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_datagram_endpoint(
        _GatewayChannel, remote_addr=(gateway, port), local_addr=(local_ip or "0.0.0.0", 0), family=socket.AF_INET)
    return channel


Mapper = PcpMapper | NatpmpMapper


def _flush(mapper: Mapper, channel: _GatewayChannel, now: float) -> None:
    for data in mapper.datagrams_to_send(now):
        channel.send(data)


async def _pump(mapper: Mapper, channel: _GatewayChannel, on_event: EventCallback,
                until: Callable[[PortmapEvent], bool], deadline: Optional[float] = None) -> Optional[PortmapEvent]:
    """Drive ``mapper`` on ``channel`` until an event satisfies ``until`` (returned), the
    mapper has nothing left to do, or ``deadline`` (loop time) passes (None returned).
    Every event goes to ``on_event`` first. ICMP unreachable: a synthetic MappingFailed."""
    loop = asyncio.get_running_loop()
    while True:
        now = loop.time()
        timer = mapper.get_timer()
        if timer is not None and now >= timer:
            mapper.handle_timer(now)
        _flush(mapper, channel, now)
        while (event := mapper.next_event()) is not None:
            on_event(event)
            if until(event):
                return event
        timer = mapper.get_timer()
        if timer is None and mapper.state in (MapperState.DELETED, MapperState.FAILED):
            return None
        wake = min((t for t in (timer, deadline) if t is not None), default=None)
        if deadline is not None and now >= deadline:
            return None
        try:
            data = await asyncio.wait_for(channel.queue.get(), None if wake is None else max(wake - now, 0.0))
        except TimeoutError:
            continue
        if data is None:
            reason = f"nothing listens on the gateway's port {GATEWAY_PORT} (ICMP unreachable)"
            failed = MappingFailed(mapper.protocol, None, reason, unsupported=True)
            on_event(failed)
            return failed if until(failed) else None
        mapper.receive_datagram(data, loop.time())


def _seed() -> bytes:
    return os.urandom(16)


def _ignore(event: PortmapEvent) -> None:
    pass


# --------------------------------------------------------------------------- UPnP I/O


async def _http_exchange(url: str, request: bytes, timeout: float, local_ip: Optional[str]) -> upnp_igd.HttpMessage:
    """One HTTP request on its own connection, the answer read to its end (bounded)."""
    target = upnp_igd.split_http_url(url)

    async def exchange() -> upnp_igd.HttpMessage:
        reader, writer = await asyncio.open_connection(
            target.host, target.port, local_addr=(local_ip, 0) if local_ip else None)
        try:
            writer.write(request)
            await writer.drain()
            data = b""
            while len(data) <= upnp_igd.MAX_HTTP:
                chunk = await reader.read(65536)
                if not chunk:
                    return upnp_igd.parse_http(data, complete=True)
                data += chunk
                if upnp_igd.http_message_complete(data):
                    return upnp_igd.parse_http(data, complete=False)
            raise PortmapProtocolError(f"HTTP answer from {target.host_header} over {upnp_igd.MAX_HTTP} bytes")
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except (OSError, TimeoutError) as exc:
        raise PortmapRefused(f"UPnP: no HTTP answer from {target.host_header} ({type(exc).__name__})",
                             protocol="upnp") from None


async def upnp_call(service: upnp_igd.IgdService, call: upnp_igd.SoapCall, timeout: float,
                    local_ip: Optional[str] = None) -> dict[str, str]:
    """Run one SOAP action; :class:`PortmapRefused` for a fault or no answer."""
    msg = await _http_exchange(service.control_url, call.http_request(service.control_url), timeout, local_ip)
    if msg.status not in (200, 500):
        raise PortmapRefused(f"UPnP {call.action}: HTTP {msg.status}", protocol="upnp", code=msg.status)
    return upnp_igd.parse_soap_response(msg.body, call.action)


class _SsdpCollector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        if not self.answers.full():
            self.answers.put_nowait((data, str(addr[0])))


async def find_igd(timeout: float, *, local_ip: Optional[str] = None, gateway: Optional[str] = None,
                   ssdp_target: tuple[str, int] = SSDP_TARGET) -> Optional[upnp_igd.IgdService]:
    """The best port-mapping service of the first IGD that answers SSDP within ``timeout``.

    A device's LOCATION must be on the address it answered from. ``gateway``: answers
    from it are tried first (waiting briefly for it when another box answers first).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    transport, collector = await loop.create_datagram_endpoint(
        _SsdpCollector, local_addr=(local_ip or "0.0.0.0", 0), family=socket.AF_INET)
    sock = transport.get_extra_info("socket")
    try:
        if local_ip:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local_ip))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
    except OSError:
        pass
    searches = [upnp_igd.build_msearch(st) for st in upnp_igd.SEARCH_TARGETS]
    tried: set[str] = set()
    others: list[str] = []  # devices other than the gateway, tried once the first round is over

    async def fetch(location: str) -> Optional[upnp_igd.IgdService]:
        tried.add(location)
        return await _fetch_service(location, max(deadline - loop.time(), 0.05), local_ip)

    try:
        for round_ in range(2):  # SSDP is lossy: a second round a third of the way in
            for data in searches:
                try:
                    transport.sendto(data, ssdp_target)
                except OSError:
                    return None
            round_end = loop.time() + timeout / 3 if round_ == 0 else deadline
            while (remaining := min(round_end, deadline) - loop.time()) > 0:
                try:
                    data, source = await asyncio.wait_for(collector.answers.get(), remaining)
                except TimeoutError:
                    break
                try:
                    answer = upnp_igd.parse_ssdp_response(data)
                    host = upnp_igd.split_http_url(answer.location).host
                except PortmapProtocolError:
                    continue
                if host != source or answer.location in tried or answer.location in others:
                    continue
                if gateway is not None and source != gateway:
                    others.append(answer.location)
                    continue
                if (service := await fetch(answer.location)) is not None:
                    return service
            while others:
                if (service := await fetch(others.pop(0))) is not None:
                    return service
        return None
    finally:
        transport.close()


async def _fetch_service(location: str, timeout: float, local_ip: Optional[str]) -> Optional[upnp_igd.IgdService]:
    try:
        msg = await _http_exchange(location, upnp_igd.http_request("GET", location, {}), timeout, local_ip)
        if msg.status != 200:
            return None
        services = upnp_igd.parse_device_description(msg.body, location)
    except (PortmapProtocolError, PortmapRefused):
        return None
    return services[0] if services else None


# --------------------------------------------------------------------------- discover


@dataclass(frozen=True)
class ProtocolReport:
    protocol: str  # "pcp" | "natpmp" | "upnp"
    answered: bool
    external_address: Optional[str] = None
    error: Optional[str] = None  # why not answered / refused (None: all fine)
    detail: dict[str, object] = field(default_factory=dict)

    @property
    def address_class(self) -> Optional[str]:
        return address_class(self.external_address) if self.external_address else None

    @property
    def behind_nat(self) -> Optional[bool]:
        """The external address is itself private or CGNAT: a carrier-grade or double NAT."""
        return behind_another_nat(self.external_address) if self.external_address else None

    def to_json(self) -> dict[str, object]:
        return {
            "answered": self.answered,
            "external_address": self.external_address,
            "address_class": self.address_class,
            "behind_nat": self.behind_nat,
            "note": NAT_NOTE if self.behind_nat else None,
            "error": self.error,
            **self.detail,
        }


@dataclass(frozen=True)
class PortmapReport:
    gateway: Optional[str]
    local_address: Optional[str]
    protocols: tuple[ProtocolReport, ...]
    elapsed: float = 0.0  # s the discovery took

    def get(self, protocol: str) -> Optional[ProtocolReport]:
        return next((p for p in self.protocols if p.protocol == protocol), None)

    @property
    def answered(self) -> tuple[str, ...]:
        return tuple(p.protocol for p in self.protocols if p.answered)

    @property
    def behind_nat(self) -> Optional[bool]:
        flags = [p.behind_nat for p in self.protocols if p.behind_nat is not None]
        return any(flags) if flags else None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "gateway": self.gateway,
            "local_address": self.local_address,
            "answered": list(self.answered),
            "behind_nat": self.behind_nat,
            "note": NAT_NOTE if self.behind_nat else None,
            "elapsed_ms": round(self.elapsed * 1000),
        }
        for name in PROTOCOLS:
            report = self.get(name)
            out[name] = report.to_json() if report is not None else None
        return out


async def discover(*, gateway: Optional[str] = None, timeout: float = DEFAULT_WAIT,
                   protocols: Sequence[str] = PROTOCOLS, local_ip: Optional[str] = None,
                   port: int = GATEWAY_PORT,
                   ssdp_target: tuple[str, int] = SSDP_TARGET) -> PortmapReport:
    """Which port-mapping protocols the gateway answers, and the external address of each.

    All three run in parallel within ``timeout`` (plus up to DELETE_WAIT for PCP's
    delete). NAT-PMP and UPnP report the external address without mapping anything;
    PCP has no such request, so its part maps the port of its own control socket for
    PROBE_PCP_LIFETIME s and deletes it at once (``detail["deleted"]`` says whether the
    gateway confirmed). Nothing stays mapped.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    _check_protocols(protocols)
    gateway = gateway or _text(_gateway_ip())
    if gateway is None:
        return PortmapReport(None, None, _all_failed(protocols, "no IPv4 default gateway"))
    local_ip = local_ip or _source_toward(gateway)
    runs = {
        "pcp": lambda: _discover_pcp(gateway, port, local_ip, timeout),
        "natpmp": lambda: _discover_natpmp(gateway, port, local_ip, timeout),
        "upnp": lambda: _discover_upnp(gateway, local_ip, timeout, ssdp_target),
    }
    reports = await asyncio.gather(*(runs[p]() for p in protocols))
    return PortmapReport(gateway, local_ip, tuple(reports), loop.time() - started)


async def discover_for_probe(timeout: float = DEFAULT_WAIT) -> PortmapReport:
    """:func:`discover` for ``probe``: never raises; a failure becomes the report's error."""
    try:
        return await discover(timeout=timeout)
    except (NattoolError, OSError) as exc:
        text = str(exc) or type(exc).__name__
        return PortmapReport(_text(_gateway_ip()), None, _all_failed(PROTOCOLS, text))


def _all_failed(protocols: Iterable[str], error: str) -> tuple[ProtocolReport, ...]:
    return tuple(ProtocolReport(p, False, error=error) for p in protocols)


def _check_protocols(protocols: Iterable[str]) -> None:
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise PortmapProtocolError(f"unknown port-mapping protocol {unknown[0]!r} (known: {', '.join(PROTOCOLS)})")


def _text(ip: Optional[IPAddress]) -> Optional[str]:
    return None if ip is None else str(ip)


async def _on_channel(protocol: str, gateway: str, port: int, local_ip: Optional[str],
                      run: Callable[[_GatewayChannel], Awaitable[ProtocolReport]]) -> ProtocolReport:
    """``run`` on a fresh channel to gateway:port, closed afterwards."""
    try:
        channel = await _open_channel(gateway, port, local_ip)
    except OSError as exc:
        return ProtocolReport(protocol, False, error=f"cannot send to the gateway: {exc.strerror or exc}")
    try:
        return await run(channel)
    finally:
        channel.close()


async def _discover_pcp(gateway: str, port: int, local_ip: Optional[str], timeout: float) -> ProtocolReport:
    async def run(channel: _GatewayChannel) -> ProtocolReport:
        loop = asyncio.get_running_loop()
        sockname = channel.transport.get_extra_info("sockname") if channel.transport else ("0.0.0.0", 0)
        client = ipaddress.ip_address(sockname[0])
        mapper = PcpMapper(client, sockname[1], os.urandom(12), _seed(), loop.time(),
                           lifetime=PROBE_PCP_LIFETIME, timeout=timeout)
        first = await _pump(mapper, channel, _ignore, lambda e: isinstance(e, (MappingGranted, MappingFailed)))
        if not isinstance(first, MappingGranted):
            mapper.delete(loop.time())  # after silence: what a lost answer granted goes too
            _flush(mapper, channel, loop.time())
            return _failed_report("pcp", first)
        mapper.delete(loop.time())
        deleted = await _pump(mapper, channel, _ignore, lambda e: isinstance(e, MappingDeleted),
                              loop.time() + DELETE_WAIT)
        confirmed = isinstance(deleted, MappingDeleted) and deleted.confirmed
        return ProtocolReport("pcp", True, str(first.external.ip), detail={"deleted": confirmed})

    return await _on_channel("pcp", gateway, port, local_ip, run)


def _failed_report(protocol: str, event: Optional[PortmapEvent]) -> ProtocolReport:
    if isinstance(event, MappingFailed):
        # An answer that says no still means the protocol answered (unless it is another's).
        answered = event.code is not None and not event.unsupported
        return ProtocolReport(protocol, answered, error=event.reason, detail={"code": event.code})
    return ProtocolReport(protocol, False, error="no answer")


async def _discover_natpmp(gateway: str, port: int, local_ip: Optional[str], timeout: float) -> ProtocolReport:
    async def run(channel: _GatewayChannel) -> ProtocolReport:
        loop = asyncio.get_running_loop()
        mapper = NatpmpMapper(None, _seed(), loop.time(), timeout=timeout)
        event = await _pump(mapper, channel, _ignore, lambda e: isinstance(e, (ExternalAddress, MappingFailed)))
        if isinstance(event, ExternalAddress):
            return ProtocolReport("natpmp", True, str(event.address), detail={"epoch": event.epoch})
        return _failed_report("natpmp", event)

    return await _on_channel("natpmp", gateway, port, local_ip, run)


async def _discover_upnp(gateway: str, local_ip: Optional[str], timeout: float,
                         ssdp_target: tuple[str, int]) -> ProtocolReport:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        service = await find_igd(timeout, local_ip=local_ip, gateway=gateway, ssdp_target=ssdp_target)
    except OSError as exc:
        return ProtocolReport("upnp", False, error=f"SSDP failed: {exc.strerror or exc}")
    if service is None:
        return ProtocolReport("upnp", False, error="no UPnP IGD answered SSDP")
    detail: dict[str, object] = {"service_type": service.service_type, "control_url": service.control_url}
    try:
        out = await upnp_call(service, upnp_igd.get_external_ip_address(service.service_type),
                              max(deadline - loop.time(), 0.2), local_ip)
        external = upnp_igd.external_ip_from(out)
    except (PortmapRefused, PortmapProtocolError) as exc:
        return ProtocolReport("upnp", True, error=str(exc), detail=detail)
    if external is None:
        return ProtocolReport("upnp", True, error="the gateway has no external address", detail=detail)
    return ProtocolReport("upnp", True, str(external), detail=detail)


# --------------------------------------------------------------------------- PortMapping


@dataclass(frozen=True)
class Mapping:
    protocol: str  # "pcp" | "natpmp" | "upnp"
    internal: Endpoint  # local_ip:local_port
    external: Endpoint  # what peers send to
    lifetime: int  # s granted (UPnP: 0 = until deleted)
    gateway: str

    def to_json(self) -> dict[str, object]:
        return {"protocol": self.protocol, "internal": self.internal.to_text(), "external": self.external.to_text(),
                "lifetime": self.lifetime, "gateway": self.gateway}


class PortMapping:
    """Map one local UDP port at the gateway, renew it, delete it at the end::

        async with PortMapping(sock_port) as pm:
            if pm.mapping: ...  # pm.mapping.external is what peers send to

    ``start()`` waits at most ``wait`` s (PCP, then NAT-PMP on UNSUPP_VERSION or
    silence, UPnP's discovery in parallel and its AddPortMapping only when both gave
    nothing) and returns the grant or None. ``on_change`` gets every later event:
    MappingGranted(renewal=True) (the external endpoint may change), MappingFailed(lost=True),
    MappingDeleted. ``close()`` deletes (bounded by DELETE_WAIT), is idempotent, and the
    first delete datagram leaves before it first awaits, so a second Ctrl-C does not
    leave the mapping behind.
    """

    def __init__(self, local_port: int, *, local_ip: Optional[str] = None, gateway: Optional[str] = None,
                 protocols: Sequence[str] = PROTOCOLS, lifetime: int = 7200, wait: float = DEFAULT_WAIT,
                 on_change: Optional[EventCallback] = None, port: int = GATEWAY_PORT,
                 ssdp_target: tuple[str, int] = SSDP_TARGET) -> None:
        _check_protocols(protocols)
        if not 1 <= local_port <= 65535:
            raise PortmapProtocolError(f"local port {local_port} out of range")
        self.local_port = local_port
        self.local_ip = local_ip
        self.gateway = gateway
        self.protocols = tuple(protocols)
        self.lifetime = lifetime
        self.wait = wait
        self.on_change = on_change or _ignore
        self.port = port
        self.ssdp_target = ssdp_target
        self.mapping: Optional[Mapping] = None
        self.failures: dict[str, str] = {}  # protocol -> why it gave no mapping
        self._mapper: Optional[Mapper] = None
        self._channel: Optional[_GatewayChannel] = None
        self._upnp: Optional[upnp_igd.IgdService] = None
        self._keeper: Optional[asyncio.Task[None]] = None
        self._closed = False

    async def __aenter__(self) -> "PortMapping":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> Optional[Mapping]:
        try:
            return await self._start()
        except BaseException:
            await self.close()  # cancelled half-way: a request may have mapped already
            raise

    async def _start(self) -> Optional[Mapping]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        gateway = self.gateway or _text(_gateway_ip())
        if gateway is None:
            self.failures = {p: "no IPv4 default gateway" for p in self.protocols}
            return None
        self.gateway = gateway
        self.local_ip = self.local_ip or _source_toward(gateway)
        if self.local_ip is None:
            self.failures = {p: "no route to the gateway" for p in self.protocols}
            return None
        upnp_search = (asyncio.ensure_future(find_igd(self.wait, local_ip=self.local_ip, gateway=gateway,
                                                      ssdp_target=self.ssdp_target))
                       if "upnp" in self.protocols else None)
        try:
            mapping = await self._map_udp(deadline)
            if mapping is None and upnp_search is not None:
                self._upnp = await upnp_search
                mapping = await self._map_upnp(deadline)
        finally:
            if upnp_search is not None and not upnp_search.done():
                upnp_search.cancel()
                await asyncio.gather(upnp_search, return_exceptions=True)
        self.mapping = mapping
        if mapping is not None:
            self._keeper = asyncio.ensure_future(self._keep())
        return mapping

    async def _map_udp(self, deadline: float) -> Optional[Mapping]:
        """PCP, then NAT-PMP (on UNSUPP_VERSION, or after half the wait in silence)."""
        loop = asyncio.get_running_loop()
        wanted = [p for p in ("pcp", "natpmp") if p in self.protocols]
        for index, protocol in enumerate(wanted):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            budget = remaining / 2 if index == 0 and len(wanted) == 2 else remaining
            try:
                channel = await _open_channel(self.gateway or "", self.port, self.local_ip)
            except OSError as exc:
                self.failures[protocol] = f"cannot send to the gateway: {exc.strerror or exc}"
                continue
            mapper = self._new_mapper(protocol, budget, loop.time())
            self._mapper, self._channel = mapper, channel  # for close() if we are cancelled here
            event = await _pump(mapper, channel, _ignore, lambda e: isinstance(e, (MappingGranted, MappingFailed)))
            if isinstance(event, MappingGranted):
                return Mapping(protocol, Endpoint(ipaddress.ip_address(self.local_ip or "0.0.0.0"), self.local_port),
                               event.external, event.lifetime, self.gateway or "")
            self._mapper = self._channel = None
            mapper.delete(loop.time())  # unanswered: what a late answer would have granted goes too
            _flush(mapper, channel, loop.time())
            channel.close()
            self.failures[protocol] = event.reason if isinstance(event, MappingFailed) else "no answer"
            if channel.unreachable:
                break  # PCP and NAT-PMP share the port: nobody listens
        return None

    def _new_mapper(self, protocol: str, timeout: float, now: float) -> Mapper:
        if protocol == "pcp":
            return PcpMapper(ipaddress.ip_address(self.local_ip or "0.0.0.0"), self.local_port, os.urandom(12), _seed(),
                             now, lifetime=self.lifetime, timeout=timeout, delete_timeout=DELETE_WAIT)
        return NatpmpMapper(self.local_port, _seed(), now, lifetime=self.lifetime, timeout=timeout,
                            delete_timeout=DELETE_WAIT)

    async def _map_upnp(self, deadline: float) -> Optional[Mapping]:
        if self._upnp is None:
            self.failures["upnp"] = "no UPnP IGD answered SSDP"
            return None
        loop = asyncio.get_running_loop()
        service = self._upnp
        try:
            out = await upnp_call(service, upnp_igd.get_external_ip_address(service.service_type),
                                  max(deadline - loop.time(), 0.2), self.local_ip)
            external_ip = upnp_igd.external_ip_from(out)
            if external_ip is None:
                raise PortmapRefused("the gateway has no external address", protocol="upnp")
            external_port, lease = await self._upnp_add(self.local_port, self.lifetime, deadline)
        except (PortmapRefused, PortmapProtocolError) as exc:
            self.failures["upnp"] = str(exc)
            return None
        return Mapping("upnp", Endpoint(ipaddress.ip_address(self.local_ip or "0.0.0.0"), self.local_port),
                       Endpoint(external_ip, external_port), lease, self.gateway or "")

    async def _upnp_add(self, first_port: int, lease: int, deadline: float) -> tuple[int, int]:
        """AddPortMapping: our port outside if free, else a few others; lease 0 where only that goes."""
        loop = asyncio.get_running_loop()
        assert self._upnp is not None and self.local_ip is not None
        ports = [first_port] + _other_ports(first_port, UPNP_CONFLICT_TRIES)
        for external_port in ports:
            for this_lease in (lease, 0):
                call = upnp_igd.add_port_mapping(
                    self._upnp.service_type, external_port=external_port, internal_port=self.local_port,
                    internal_client=self.local_ip, lease_duration=this_lease, description=UPNP_DESCRIPTION)
                try:
                    await upnp_call(self._upnp, call, max(deadline - loop.time(), 0.2), self.local_ip)
                    return external_port, this_lease
                except PortmapRefused as exc:
                    if exc.code == upnp_igd.ERROR_ONLY_PERMANENT_LEASES and this_lease:
                        continue
                    if exc.code == upnp_igd.ERROR_CONFLICT:
                        break
                    raise
        raise PortmapRefused("UPnP: every external port tried is taken", protocol="upnp", code=upnp_igd.ERROR_CONFLICT)

    async def _keep(self) -> None:
        """Renew in the background until closed (or the mapping is lost)."""
        try:
            if self._mapper is not None and self._channel is not None:
                await _pump(self._mapper, self._channel, self._on_event,
                            lambda e: isinstance(e, (MappingDeleted,)) or (isinstance(e, MappingFailed) and e.lost))
            elif self.mapping is not None and self.mapping.protocol == "upnp" and self.mapping.lifetime:
                await self._keep_upnp()
        except asyncio.CancelledError:
            raise
        except NattoolError as exc:  # pragma: no cover - reported, never raised into the caller
            self.on_change(MappingFailed(self.mapping.protocol if self.mapping else "", None, str(exc), lost=True))

    def _on_event(self, event: PortmapEvent) -> None:
        if isinstance(event, MappingGranted) and self.mapping is not None:
            self.mapping = Mapping(self.mapping.protocol, self.mapping.internal, event.external, event.lifetime,
                                   self.mapping.gateway)
        elif isinstance(event, MappingFailed) and event.lost:
            self.mapping = None
        self.on_change(event)

    async def _keep_upnp(self) -> None:
        loop = asyncio.get_running_loop()
        while self.mapping is not None and self.mapping.lifetime:
            current = self.mapping
            fraction = RENEW_FROM + (RENEW_TO - RENEW_FROM) * int.from_bytes(os.urandom(2), "big") / 65536
            await asyncio.sleep(current.lifetime * fraction)
            expires = loop.time() + current.lifetime * (1 - fraction)
            while True:
                try:
                    port, lease = await self._upnp_add(current.external.port, current.lifetime,
                                                       loop.time() + DEFAULT_WAIT * 2)
                    break
                except (PortmapRefused, PortmapProtocolError) as exc:
                    if loop.time() + 5 >= expires or (isinstance(exc, PortmapRefused) and exc.code):
                        self.mapping = None
                        self.on_change(MappingFailed("upnp", getattr(exc, "code", None) or None, str(exc), lost=True))
                        return
                    await asyncio.sleep(5)
            external = Endpoint(current.external.ip, port)
            self.mapping = Mapping("upnp", current.internal, external, lease, current.gateway)
            self.on_change(MappingGranted("upnp", self.local_port, self.mapping.external, lease, renewal=True))

    async def close(self) -> None:
        """Delete the mapping (bounded by DELETE_WAIT); safe to call twice, or after a cancel."""
        if self._closed:
            return
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
        mapper, channel, mapping = self._mapper, self._channel, self.mapping
        self._mapper = self._channel = None
        self.mapping = None
        loop = asyncio.get_running_loop()
        try:
            if mapper is not None and channel is not None:
                mapper.delete(loop.time())
                _flush(mapper, channel, loop.time())  # the first delete leaves before any await
            if self._keeper is not None:
                # Its pump must be gone before ours reads the same channel.
                await asyncio.gather(self._keeper, return_exceptions=True)
            if mapper is not None and channel is not None:
                await _pump(mapper, channel, self.on_change, lambda e: isinstance(e, MappingDeleted),
                            loop.time() + DELETE_WAIT)
            elif mapping is not None and mapping.protocol == "upnp" and self._upnp is not None:
                await self._upnp_delete(mapping)
        finally:
            if channel is not None:
                channel.close()

    async def _upnp_delete(self, mapping: Mapping) -> None:
        assert self._upnp is not None
        call = upnp_igd.delete_port_mapping(self._upnp.service_type, external_port=mapping.external.port)
        try:
            await upnp_call(self._upnp, call, DELETE_WAIT, self.local_ip)
            confirmed = True
        except (PortmapRefused, PortmapProtocolError):
            confirmed = False
        self.on_change(MappingDeleted("upnp", self.local_port, confirmed))


def _other_ports(first: int, count: int) -> list[int]:
    """Random high ports other than ``first`` (UPnP conflicts)."""
    out: list[int] = []
    while len(out) < count:
        port = 1024 + int.from_bytes(os.urandom(2), "big") % (65536 - 1024)
        if port != first and port not in out:
            out.append(port)
    return out


__all__ = [
    "DEFAULT_WAIT", "GATEWAY_PORT", "Mapping", "NAT_NOTE", "PROTOCOLS", "PortMapping", "PortmapReport",
    "ProtocolReport", "discover", "discover_for_probe", "find_igd",
    "upnp_call",
]
