"""Tracker addresses to endpoints: host names via dnspython, SRV discovery (RFC 2782).

Every name resolves to *every* address it has (A and AAAA): a tracker reachable over
both families is asked over both, which is how a client notices a v4-only NAT problem.

``timeout`` bounds a whole call (all names, all queries), not each query. Queries of one
call run concurrently. Any failure becomes a :class:`ResolveError` with a one-line
message; dnspython's own exceptions never escape.

The DNS server is the system's (``/etc/resolv.conf``) unless ``resolver_address`` names
one; ``NATTOOL_DNS_SERVER`` reaches here through :mod:`nattool.config`. With the system
resolver the hosts file is honoured first, as getaddrinfo would ("files dns"); with an
explicit DNS server only ``localhost`` is special (RFC 6761), so tests see pure DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Optional, Sequence, Union

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rcode
import dns.resolver

from nattool.errors import ResolveError, UsageError
from nattool.protocol.endpoint import DEFAULT_PORT, Endpoint, IPAddress
from nattool.protocol.srv import RandInt, SrvRecord, order_srv
from nattool.protocol.tracker_spec import TrackerLike, TrackerSpec, as_tracker_spec, parse_tracker_spec

SRV_SERVICE = "_nattracker._udp"
DNS_PORT = 53

SpecLike = TrackerLike

_LOOPBACK: tuple[IPAddress, ...] = (
    ipaddress.IPv4Address("127.0.0.1"),
    ipaddress.IPv6Address("::1"),
)


@dataclass(frozen=True, slots=True)
class ResolvedTracker:
    """A spec and every endpoint it stands for (order: A records, then AAAA)."""

    spec: TrackerSpec
    endpoints: tuple[Endpoint, ...]
    # For SRV-discovered trackers: the SRV target they came from (display only).
    via: Optional[str] = None


# --------------------------------------------------------------------------- parsing


def parse_dns_server(text: str) -> tuple[str, int]:
    """``ip``, ``ip:port``, ``[v6]:port`` or bare ``v6`` -> (ip, port); port 53 by default.

    Only IP literals: the DNS server cannot itself be found by DNS.
    """
    spec = parse_tracker_spec(text, default_port=DNS_PORT, schemes=())
    if spec.ip is None:
        raise UsageError(f"DNS server {text.strip()[:64]!r} must be an IP address, not a host name")
    return (str(spec.ip), spec.port)


def _as_specs(specs: Iterable[SpecLike]) -> list[TrackerSpec]:
    return [as_tracker_spec(spec) for spec in specs]


# ------------------------------------------------------------------------ resolver core


def _family_versions(family: Optional[int]) -> tuple[int, ...]:
    if family is None or family == socket.AF_UNSPEC:
        return (4, 6)
    if family == socket.AF_INET:
        return (4,)
    if family == socket.AF_INET6:
        return (6,)
    raise UsageError(f"unknown address family {family!r}")


def default_hosts_path() -> Path:
    if sys.platform == "win32":
        root = os.environ.get("SystemRoot", r"C:\Windows")
        return Path(root) / "System32" / "drivers" / "etc" / "hosts"
    return Path("/etc/hosts")


def read_hosts_file(path: Union[str, os.PathLike[str]]) -> dict[str, list[IPAddress]]:
    """name -> addresses in file order. Unreadable file -> empty (like the C library)."""
    table: dict[str, list[IPAddress]] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return table
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            ip = ipaddress.ip_address(fields[0].split("%", 1)[0])
        except ValueError:
            continue
        for name in fields[1:]:
            addrs = table.setdefault(name.lower().rstrip("."), [])
            if ip not in addrs:
                addrs.append(ip)
    return table


class _Lookup:
    """One call's worth of DNS: one resolver, one deadline, the hosts table."""

    def __init__(
        self,
        *,
        timeout: float,
        resolver_address: Optional[tuple[str, int]],
        hosts_path: Union[str, os.PathLike[str], None],
    ) -> None:
        if not timeout > 0:
            raise UsageError(f"DNS timeout must be positive, got {timeout!r}")
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.resolver_address = resolver_address
        self._resolver: Optional[dns.asyncresolver.Resolver] = None
        if resolver_address is None:
            self.hosts = read_hosts_file(hosts_path if hosts_path is not None else default_hosts_path())
        else:
            self.hosts = read_hosts_file(hosts_path) if hosts_path is not None else {}

    def resolver(self) -> dns.asyncresolver.Resolver:
        # Created lazily: IP literals and localhost must work on a machine without any
        # resolver configuration (containers without /etc/resolv.conf).
        if self._resolver is None:
            if self.resolver_address is None:
                try:
                    res = dns.asyncresolver.Resolver()
                except dns.resolver.NoResolverConfiguration:
                    raise ResolveError(
                        "no DNS resolver configured on this system; "
                        "set NATTOOL_DNS_SERVER=ip[:port] or dns_server in the config file"
                    ) from None
            else:
                res = dns.asyncresolver.Resolver(configure=False)
                host, port = self.resolver_address
                res.nameservers = [host]
                res.port = port
            # Several attempts fit in the lifetime, so a lost datagram is retransmitted
            # and a dead first nameserver leaves time for the next; the lifetime passed
            # per query (what is left of the deadline) is the real bound.
            res.timeout = max(min(self.timeout / 2, 2.0), 0.1)
            res.lifetime = self.timeout
            res.cache = None
            self._resolver = res
        return self._resolver

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _server_text(self) -> str:
        if self.resolver_address is None:
            return "the system DNS resolver"
        host, port = self.resolver_address
        return f"DNS server {Endpoint(ipaddress.ip_address(host), port)}"

    async def query(self, qname: str, rdtype: str, *, search: bool = False) -> Optional[dns.resolver.Answer]:
        """The answer, or None for "name exists, no such record" (NODATA).

        NXDOMAIN propagates as dns.resolver.NXDOMAIN; everything else becomes a
        ResolveError. Callers word their own NXDOMAIN messages.
        """
        left = self.remaining()
        if left <= 0:
            raise ResolveError(f"DNS timed out after {self.timeout:g}s asking {self._server_text()}")
        resolver = self.resolver()
        try:
            return await resolver.resolve(qname, rdtype, lifetime=left, search=search)
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN:
            raise
        except dns.exception.Timeout:
            raise ResolveError(
                f"DNS timed out after {self.timeout:g}s asking {self._server_text()} for {qname} {rdtype}"
            ) from None
        except dns.resolver.NoNameservers as exc:
            raise ResolveError(
                f"{self._server_text()} failed for {qname} {rdtype} ({_nonameservers_reason(exc)})"
            ) from None
        except dns.resolver.YXDOMAIN:
            raise ResolveError(f"DNS name {qname} is too long after expansion") from None
        except dns.name.NameTooLong:
            raise ResolveError(f"DNS name {qname} is too long") from None
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            # OSError: e.g. no route to the DNS server; ValueError: a bad nameserver string.
            raise ResolveError(f"DNS query {qname} {rdtype} failed: {exc}") from None

    async def addresses(self, name: str, versions: tuple[int, ...], *, search: bool = False) -> list[IPAddress]:
        """Every address of ``name`` in the given IP versions; raises when there is none.

        ``search``: a tracker name typed by a user gets the system resolver's search
        domains (``tracker`` -> ``tracker.lab.example``) as getaddrinfo would give it;
        names taken from DNS itself (SRV targets, the discovery domain) are absolute.

        Error texts name the cause only ("NXDOMAIN", "no A or AAAA record"); callers
        prefix them with what was being resolved.
        """
        name = name.lower().rstrip(".")
        if name == "localhost" or name.endswith(".localhost"):
            return [ip for ip in _LOOPBACK if ip.version in versions] or _no_family(versions)
        if name in self.hosts:
            found = [ip for ip in self.hosts[name] if ip.version in versions]
            return found or _no_family(versions)
        rdtypes = [t for v, t in ((4, "A"), (6, "AAAA")) if v in versions]
        results = await asyncio.gather(
            *(self.query(name if search else name + ".", t, search=search) for t in rdtypes),
            return_exceptions=True,
        )
        out: list[IPAddress] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                errors.append(result)
            elif result is not None:
                for rdata in result:
                    ip = ipaddress.ip_address(rdata.address)
                    if ip not in out:
                        out.append(ip)
        if any(isinstance(e, dns.resolver.NXDOMAIN) for e in errors):
            raise _Cause("NXDOMAIN (no such name)")
        if out:
            # One family answered and the other failed: use what we have, the caller
            # will find out soon enough whether those addresses answer.
            return out
        for error in errors:
            if isinstance(error, (ResolveError, _Cause)):
                raise _Cause(str(error))
            raise error
        wanted = " or ".join(rdtypes)
        raise _Cause(f"no {wanted} record")


class _Cause(Exception):
    """Internal: why a name has no address, before the caller words the message."""


def _no_family(versions: tuple[int, ...]) -> list[IPAddress]:
    raise _Cause(f"no IPv{versions[0]} address" if len(versions) == 1 else "no address")


def _nonameservers_reason(exc: dns.resolver.NoNameservers) -> str:
    errors = exc.kwargs.get("errors") or []
    for entry in errors:
        # entry: (server, tcp, port, error, response); the response carries the rcode.
        response = entry[4] if len(entry) > 4 else None
        if response is not None:
            return dns.rcode.to_text(response.rcode())
        if entry[3] is not None:
            return str(entry[3])
    return "no usable answer"


# ----------------------------------------------------------------------- public


@dataclass(frozen=True, slots=True)
class ResolveOptions:
    """How names are resolved, the same for every function below.

    ``timeout`` bounds a whole call; ``family`` (AF_INET, AF_INET6, None for both)
    limits the addresses; ``resolver_address`` is a DNS server (ip, port) instead of
    the system's; ``hosts_path`` a hosts file instead of the system's; ``rng`` orders
    SRV records of equal priority (a seeded one in tests).
    """

    timeout: float = 2.0
    family: Optional[int] = None
    resolver_address: Optional[tuple[str, int]] = None
    hosts_path: Union[str, os.PathLike[str], None] = None
    rng: Optional[RandInt] = None

    def lookup(self) -> _Lookup:
        return _Lookup(timeout=self.timeout, resolver_address=self.resolver_address, hosts_path=self.hosts_path)


DEFAULT_OPTIONS = ResolveOptions()


async def resolve_each(
    specs: Iterable[SpecLike],
    options: ResolveOptions = DEFAULT_OPTIONS,
    *,
    on_error: Optional[Callable[[ResolveError], None]] = None,
) -> list[ResolvedTracker]:
    """Resolve each spec to all its endpoints, keeping the spec (and its scheme).

    Without ``on_error`` the first failure raises. With it, each failing spec is
    reported to it and left out; a ResolveError is raised only if none resolved.
    """
    spec_list = _as_specs(specs)
    versions = _family_versions(options.family)
    lookup = options.lookup()

    async def one(spec: TrackerSpec) -> ResolvedTracker:
        if spec.ip is not None:
            if spec.ip.version not in versions:
                raise ResolveError(f"tracker {spec.to_text()!r} is not an IPv{versions[0]} address")
            return ResolvedTracker(spec, (Endpoint(spec.ip, spec.port),))
        try:
            ips = await lookup.addresses(spec.host, versions, search=True)
        except _Cause as cause:
            raise ResolveError(f"cannot resolve tracker {spec.host!r}: {cause}") from None
        except ResolveError as exc:
            raise ResolveError(f"cannot resolve tracker {spec.host!r}: {exc}") from None
        return ResolvedTracker(spec, tuple(Endpoint(ip, spec.port) for ip in _ordered(ips)))

    results = await asyncio.gather(*(one(s) for s in spec_list), return_exceptions=True)
    out: list[ResolvedTracker] = []
    for result in results:
        if isinstance(result, ResolveError):
            if on_error is None:
                raise result
            on_error(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            out.append(result)
    if spec_list and not out:
        raise ResolveError("no tracker could be resolved")
    return out


async def resolve_trackers(
    specs: Iterable[SpecLike],
    options: ResolveOptions = DEFAULT_OPTIONS,
    *,
    on_error: Optional[Callable[[ResolveError], None]] = None,
) -> list[Endpoint]:
    """Every endpoint of every spec, in spec order, without duplicates."""
    return flatten(await resolve_each(specs, options, on_error=on_error))


async def discover_each(domain: str, options: ResolveOptions = DEFAULT_OPTIONS) -> list[ResolvedTracker]:
    """Trackers of ``domain`` from SRV ``_nattracker._udp.<domain>``, RFC 2782 order.

    No SRV record -> the domain's own A/AAAA on the default port. A lone SRV target
    of "." -> the domain says it has no tracker: empty list. A target that does not
    resolve is skipped (the others still serve); if none resolves, ResolveError.
    """
    name = _check_domain(domain)
    versions = _family_versions(options.family)
    lookup = options.lookup()
    srv_name = f"{SRV_SERVICE}.{name}."
    try:
        answer = await lookup.query(srv_name, "SRV")
    except dns.resolver.NXDOMAIN:
        answer = None
    except ResolveError as exc:
        raise ResolveError(f"cannot discover trackers for {name!r}: {exc}") from None

    if answer is None:
        try:
            ips = await lookup.addresses(name, versions)
        except (_Cause, ResolveError) as cause:
            raise ResolveError(
                f"cannot discover trackers for {name!r}: no SRV record {SRV_SERVICE}.{name} "
                f"and the domain itself: {cause}"
            ) from None
        spec = TrackerSpec(host=name, port=DEFAULT_PORT)
        return [ResolvedTracker(spec, tuple(Endpoint(ip, DEFAULT_PORT) for ip in _ordered(ips)))]

    records = [
        SrvRecord(
            priority=rdata.priority,
            weight=rdata.weight,
            port=rdata.port,
            target=rdata.target.to_text(omit_final_dot=True) if rdata.target != dns.name.root else "",
        )
        for rdata in answer
    ]
    usable = [r for r in records if not r.is_decline and r.port != 0]
    if not usable:
        return []
    ordered = order_srv(usable, options.rng if options.rng is not None else random.Random())

    async def one(record: SrvRecord) -> ResolvedTracker | _Cause:
        try:
            ips = await lookup.addresses(record.target, versions)
        except (_Cause, ResolveError) as cause:
            return _Cause(f"{record.target}: {cause}")
        spec = TrackerSpec(host=record.target.lower(), port=record.port)
        return ResolvedTracker(
            spec, tuple(Endpoint(ip, record.port) for ip in _ordered(ips)), via=srv_name.rstrip(".")
        )

    results = await asyncio.gather(*(one(r) for r in ordered))
    found = [r for r in results if isinstance(r, ResolvedTracker)]
    if not found:
        causes = "; ".join(str(r) for r in results)
        raise ResolveError(f"cannot discover trackers for {name!r}: no SRV target resolves ({causes})")
    return found


async def discover_trackers(domain: str, options: ResolveOptions = DEFAULT_OPTIONS) -> list[Endpoint]:
    return flatten(await discover_each(domain, options))


async def gather_trackers(
    specs: Sequence[SpecLike],
    domain: Optional[str],
    options: ResolveOptions = DEFAULT_OPTIONS,
    *,
    on_error: Optional[Callable[[ResolveError], None]] = None,
) -> list[ResolvedTracker]:
    """What every client command needs: explicit trackers, then the domain's, resolved
    concurrently under one ``options.timeout``. Raises UsageError when neither is given."""
    if not specs and not domain:
        raise UsageError(
            "no tracker given: use --tracker HOST[:PORT], --domain DOMAIN, "
            "NATTOOL_TRACKERS=host:port, or 'trackers = [...]' in the config file "
            "(see 'nattool config path')"
        )
    jobs: list[Awaitable[list[ResolvedTracker]]] = []
    if specs:
        jobs.append(resolve_each(specs, options, on_error=on_error))
    if domain:
        jobs.append(discover_each(domain, options))
    parts = await asyncio.gather(*jobs)
    return [item for part in parts for item in part]


def _check_domain(domain: str) -> str:
    spec = parse_tracker_spec(domain, schemes=())
    if spec.ip is not None or spec.port != DEFAULT_PORT or ":" in domain:
        raise UsageError(f"bad domain {domain.strip()[:64]!r}: want a DNS name such as example.org")
    return spec.host


def _ordered(ips: list[IPAddress]) -> list[IPAddress]:
    # IPv4 first (stable inside a family): on dual-stack labs v4 is the likelier to work,
    # and every address is asked anyway.
    return sorted(ips, key=lambda ip: ip.version)


def flatten(resolved: Iterable[ResolvedTracker]) -> list[Endpoint]:
    """Every endpoint, in order, without duplicates."""
    seen: set[Endpoint] = set()
    out: list[Endpoint] = []
    for item in resolved:
        for endpoint in item.endpoints:
            if endpoint not in seen:
                seen.add(endpoint)
                out.append(endpoint)
    return out
