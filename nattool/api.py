"""nattool as a library: ask trackers who I am, join a group, probe my NAT.

    import asyncio, nattool

    async def main() -> None:
        me = await nattool.whoami(["tracker.example.org"])
        print(me.endpoint)
        reg = await nattool.register("my-group", ["tracker.example.org"])
        print([m.endpoint for m in reg.members])

    asyncio.run(main())

Trackers are given as the command line takes them ("host", "host:port", "[v6]:port",
"stun:host" for `probe`) or as :class:`~nattool.protocol.endpoint.Endpoint` objects;
host names resolve to all their addresses. Every function raises only
:class:`nattool.errors.NattoolError` subclasses: UsageError for bad arguments,
ResolveError when a name does not resolve, and, when no tracker answered (``check=True``,
the default), the most telling of the trackers' errors: TrackerRefused, ProtocolError,
NoAnswer, or NetworkError when none could even be sent to. With ``check=False`` the
result comes back anyway, its ``error`` set; the command line uses that to show every
tracker's answer.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Optional, Sequence, TypeVar, Union

from nattool.client_defaults import DEFAULT_RETRIES, DEFAULT_TIMEOUT, PROBE_RETRIES, PROBE_TIMEOUT
from nattool.errors import NattoolError, NetworkError, NoAnswer, ProtocolError, UsageError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.text import MemberEntry, MemberList, RegisterRequest, TrackerList, canonical_group
from nattool.protocol.tracker_spec import TrackerLike, as_tracker_specs

if TYPE_CHECKING:
    from nattool.diag.probe import ProbeResult
    from nattool.net.client import ClientPool
    from nattool.net.resolve import ResolveOptions
    from nattool.net.tracker_client import Registrar, TrackerAnswer

# The DNS and socket layers are imported when a function runs: `import nattool` and the
# tracker process (`serve`) never pay for dnspython.

# A DNS server instead of the system's: "ip[:port]" or (ip, port).
DnsServer = Union[str, tuple[str, int], None]

# Padding lets the tracker send a longer member list (a reply may be 3x the request).
REGISTER_PAD_TO = 400


# ----------------------------------------------------------------------------- results


class _Answer:
    """One tracker's answer: ``error`` is None when it answered."""

    __slots__ = ()
    error: Optional[NattoolError]

    @property
    def ok(self) -> bool:
        return self.error is None


class _Outcome:
    """A whole call's result: ``error`` (why no tracker answered) or None."""

    __slots__ = ()
    error: Optional[NattoolError]

    def raise_for_failure(self) -> None:
        if self.error is not None:
            raise self.error


@dataclass(frozen=True, slots=True)
class Sighting(_Answer):
    """One tracker's answer to whoami: the public endpoint it sees, or why not."""

    tracker: Endpoint
    endpoint: Optional[Endpoint]
    rtt: Optional[float] = None  # seconds, from the last retransmission
    attempts: int = 0
    error: Optional[NattoolError] = None


@dataclass(frozen=True, slots=True)
class WhoamiResult(_Outcome):
    sightings: tuple[Sighting, ...]
    error: Optional[NattoolError] = None  # set when no tracker answered

    @property
    def endpoint(self) -> Optional[Endpoint]:
        """The first public endpoint seen (None when no tracker answered)."""
        return next((s.endpoint for s in self.sightings if s.endpoint is not None), None)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every distinct endpoint seen, sorted."""
        return tuple(sorted({s.endpoint for s in self.sightings if s.endpoint is not None}))

    @property
    def agree(self) -> Optional[bool]:
        """Did the trackers of each address family see one endpoint? (None: no answer.)
        Disagreement is the mark of a symmetric NAT."""
        seen: dict[int, set[Endpoint]] = {}
        for s in self.sightings:
            if s.endpoint is not None:
                seen.setdefault(s.endpoint.ip.version, set()).add(s.endpoint)
        return all(len(v) == 1 for v in seen.values()) if seen else None


@dataclass(frozen=True, slots=True)
class TrackerRegistration(_Answer):
    """One tracker's answer to a registration: the group as it knows it, or why not."""

    tracker: Endpoint
    entries: tuple[MemberEntry, ...] = ()  # this node first, then the others
    rtt: Optional[float] = None
    attempts: int = 0
    form: Optional[str] = None  # "seed" (nattool's) or "original" (the Go server's)
    error: Optional[NattoolError] = None


@dataclass(frozen=True, slots=True)
class Registration(_Outcome):
    group: str
    me: Optional[MemberEntry]  # this node as the first answering tracker sees it
    members: tuple[MemberEntry, ...]  # the other members, merged over every tracker
    replies: tuple[TrackerRegistration, ...]
    error: Optional[NattoolError] = None  # set when no tracker accepted


@dataclass(frozen=True, slots=True)
class TrackerListing(_Answer):
    tracker: Endpoint
    knows: tuple[str, ...] = ()
    rtt: Optional[float] = None
    error: Optional[NattoolError] = None


@dataclass(frozen=True, slots=True)
class TrackersResult(_Outcome):
    asked: tuple[Endpoint, ...]
    listings: tuple[TrackerListing, ...]
    error: Optional[NattoolError] = None

    @property
    def known(self) -> tuple[str, ...]:
        """The trackers asked, then every tracker they named, without duplicates."""
        out = [t.to_text() for t in self.asked]
        for listing in self.listings:
            out += [text for text in listing.knows if text not in out]
        return tuple(out)


# ----------------------------------------------------------------------------- checks


def check_timing(timeout: float, retries: int, *, flags: bool = False) -> None:
    """``flags``: name the values as the command line does (``--timeout``)."""
    dash = "--" if flags else ""
    if not 0 < timeout <= 600:
        raise UsageError(f"{dash}timeout must be in (0, 600] seconds")
    if not 0 <= retries <= 20:
        raise UsageError(f"{dash}retries must be in 0..20")


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise UsageError(f"local port must be in 0..65535, got {port}")


def _address_family(family: Optional[int]) -> Optional[int]:
    """4, 6 or None (both) -> the socket module's constant."""
    if family is None:
        return None
    if family in (4, 6):
        return socket.AF_INET if family == 4 else socket.AF_INET6
    raise UsageError(f"family must be 4, 6 or None, got {family!r}")


def group_key(text: str) -> str:
    """A group as given (``new`` makes a fresh UUID), checked and canonical."""
    if text == "new":
        return str(uuid.uuid4())
    try:
        return canonical_group(text)
    except ProtocolError:
        raise UsageError(f"bad group {text[:70]!r}: 1..64 characters of A-Z a-z 0-9 . _ -") from None


_Checkable = TypeVar("_Checkable", bound=_Outcome)


def _checked(result: _Checkable, check: bool) -> _Checkable:
    if check:
        result.raise_for_failure()
    return result


# ----------------------------------------------------------------------------- targets


def _resolve_options(timeout: float, family: Optional[int], dns_server: DnsServer) -> ResolveOptions:
    from nattool.net.resolve import ResolveOptions, parse_dns_server

    server = parse_dns_server(dns_server) if isinstance(dns_server, str) else dns_server
    return ResolveOptions(timeout=timeout, family=_address_family(family), resolver_address=server)


async def resolve_targets(
    trackers: Sequence[TrackerLike] | TrackerLike,
    *,
    domain: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT,
    family: Optional[int] = None,
    dns_server: DnsServer = None,
) -> list[Endpoint]:
    """Every address of every tracker (and of the domain's, by SRV), without duplicates."""
    from nattool.net.resolve import flatten, gather_trackers

    specs = as_tracker_specs(trackers)
    out = flatten(await gather_trackers(specs, domain, _resolve_options(timeout, family, dns_server)))
    if not out:
        if domain and not specs:
            raise UsageError(f"domain {domain} publishes no tracker (SRV target '.')")
        raise UsageError("no tracker address to talk to")
    return out


# ----------------------------------------------------------------------------- whoami


async def whoami(
    trackers: Sequence[TrackerLike] | TrackerLike = (),
    *,
    domain: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    family: Optional[int] = None,
    port: int = 0,
    dns_server: DnsServer = None,
    check: bool = True,
) -> WhoamiResult:
    """Ask every tracker, from one local socket per family, which endpoint it sees.

    ``timeout`` (seconds, retransmissions included) and ``retries`` apply to each
    tracker, all asked at once; ``port`` is the local UDP port (0: any).
    """
    from nattool.net.client import ClientPool
    from nattool.net.tracker_client import deciding_error, whoami as ask

    check_timing(timeout, retries)
    _check_port(port)
    targets = await resolve_targets(trackers, domain=domain, timeout=timeout, family=family, dns_server=dns_server)
    async with ClientPool(port) as pool:
        answers = await ask(pool, targets, timeout, retries)
    sightings = tuple(
        Sighting(a.tracker, a.value if isinstance(a.value, Endpoint) else None, a.rtt, a.attempts, a.exc)
        for a in answers
    )
    return _checked(WhoamiResult(sightings, deciding_error(answers)), check)


# ----------------------------------------------------------------------------- register


class Registrant:
    """One node registering in one group, again and again, from one local socket (so
    that every registration keeps the same NAT mapping). ``register()`` does it once;
    this is for staying registered::

        async with await Registrant.open("my-group", ["tracker.example.org"]) as node:
            while True:
                reg = await node.register()
                await asyncio.sleep(20)
    """

    def __init__(
        self, pool: ClientPool, registrar: Registrar, targets: list[Endpoint], request: RegisterRequest
    ) -> None:
        self.pool = pool
        self.registrar = registrar
        self.targets = targets
        self.request = request

    @classmethod
    async def open(
        cls,
        group: str,
        trackers: Sequence[TrackerLike] | TrackerLike = (),
        *,
        domain: Optional[str] = None,
        public: Union[Endpoint, str, None] = None,
        lan: Optional[Sequence[str]] = None,
        identity: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        family: Optional[int] = None,
        port: int = 0,
        dns_server: DnsServer = None,
    ) -> "Registrant":
        from nattool.net.client import ClientPool
        from nattool.net.localinfo import lan_addresses
        from nattool.net.tracker_client import Registrar
        from nattool.protocol.text import canonical_mac, parse_lan_list

        check_timing(timeout, retries)
        _check_port(port)
        key = group_key(group)
        try:
            public_ep = Endpoint.from_text(public) if isinstance(public, str) else public
            node_id = canonical_mac(identity) if identity is not None else None
            lan_list = (parse_lan_list(",".join(lan)) if lan else ()) if lan is not None else None
        except ProtocolError as exc:
            raise UsageError(f"bad registration: {exc}") from None
        targets = await resolve_targets(trackers, domain=domain, timeout=timeout, family=family, dns_server=dns_server)
        if lan_list is None:
            lan_list = lan_addresses(targets)
        request = RegisterRequest(group=key, public=public_ep, lan=lan_list, identity=node_id, padding=0)
        padding = max(0, REGISTER_PAD_TO - len(request.to_wire()) - 1)
        request = RegisterRequest(group=key, public=public_ep, lan=lan_list, identity=node_id, padding=padding)
        pool = ClientPool(port)
        return cls(pool, Registrar(pool, timeout, retries), targets, request)

    @property
    def group(self) -> str:
        return self.request.group

    async def register(self, *, check: bool = True) -> Registration:
        """Register at every tracker at once; the group as they know it."""
        from nattool.net.tracker_client import deciding_error

        answers = await self.registrar.register_all(self.targets, self.request)
        return _checked(_registration(self.group, answers, deciding_error(answers)), check)

    def close(self) -> None:
        self.pool.close()

    async def __aenter__(self) -> "Registrant":
        return self

    async def __aexit__(
        self, kind: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()


async def register(
    group: str,
    trackers: Sequence[TrackerLike] | TrackerLike = (),
    *,
    domain: Optional[str] = None,
    public: Union[Endpoint, str, None] = None,
    lan: Optional[Sequence[str]] = None,
    identity: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    family: Optional[int] = None,
    port: int = 0,
    dns_server: DnsServer = None,
    check: bool = True,
) -> Registration:
    """Register in ``group`` at every tracker and return the group's members.

    ``public``: the endpoint to announce (None: the one the tracker sees); ``lan``: LAN
    addresses for peers behind the same public IP (None: this host's addresses toward
    the trackers; ``()``: none); ``identity``: a MAC naming this node in the group
    (None: its endpoint is its identity).
    """
    node = await Registrant.open(
        group,
        trackers,
        domain=domain,
        public=public,
        lan=lan,
        identity=identity,
        timeout=timeout,
        retries=retries,
        family=family,
        port=port,
        dns_server=dns_server,
    )
    async with node:
        return await node.register(check=check)


def _registration(group: str, answers: Sequence[TrackerAnswer], error: Optional[NattoolError]) -> Registration:
    replies = tuple(
        TrackerRegistration(
            a.tracker,
            a.value.entries if isinstance(a.value, MemberList) else (),
            a.rtt,
            a.attempts,
            a.form,
            a.exc,
        )
        for a in answers
    )
    me: Optional[MemberEntry] = None
    members: list[MemberEntry] = []
    for reply in replies:
        if not reply.entries:
            continue
        if me is None:
            me = reply.entries[0]
        for entry in reply.entries[1:]:
            if entry.endpoint != me.endpoint and all(entry.endpoint != m.endpoint for m in members):
                members.append(entry)
    return Registration(group, me, tuple(members), replies, error)


# ----------------------------------------------------------------------------- trackers


async def trackers(
    trackers: Sequence[TrackerLike] | TrackerLike = (),
    *,
    domain: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    family: Optional[int] = None,
    dns_server: DnsServer = None,
    check: bool = True,
) -> TrackersResult:
    """The trackers given (or discovered) and those they know of."""
    from nattool.net.client import ClientPool
    from nattool.net.tracker_client import deciding_error, list_trackers

    check_timing(timeout, retries)
    targets = await resolve_targets(trackers, domain=domain, timeout=timeout, family=family, dns_server=dns_server)
    async with ClientPool() as pool:
        answers = await list_trackers(pool, targets, timeout, retries)
    listings = tuple(
        TrackerListing(a.tracker, a.value.trackers if isinstance(a.value, TrackerList) else (), a.rtt, a.exc)
        for a in answers
    )
    return _checked(TrackersResult(tuple(targets), listings, deciding_error(answers)), check)


# ----------------------------------------------------------------------------- probe


async def probe(
    servers: Sequence[TrackerLike] | TrackerLike = (),
    *,
    domain: Optional[str] = None,
    timeout: float = PROBE_TIMEOUT,
    retries: int = PROBE_RETRIES,
    family: Optional[int] = None,
    hairpin: bool = False,
    lifetime_max: Optional[float] = None,
    repeat: int = 1,
    dns_server: DnsServer = None,
    on_resolve_error: Optional[Callable[[NattoolError], None]] = None,
    check: bool = True,
    portmap: bool = True,
) -> ProbeResult:
    """Classify the NAT in front of this host (RFC 4787 mapping and filtering).

    ``servers``: trackers ("host[:port]", STUN on the tracker port) or STUN servers
    ("stun:host[:port]"). ``timeout``: seconds each request waits, ``retries``
    retransmissions included; the probe runs up to three such rounds per family (and
    ``lifetime_max`` more seconds with a lifetime test, 1..600). ``on_resolve_error``:
    a server whose name does not resolve is reported to it and skipped (without it,
    any such server fails the call). ``portmap``: also ask the IPv4 gateway which of
    PCP, NAT-PMP and UPnP IGD it answers, in parallel with the STUN tests (about 1 s at
    most; nothing stays mapped; not when every server is on loopback); the report is
    ``result.portmap``.
    """
    from nattool.diag.probe import ProbeTarget, probe as run_probe
    from nattool.net.resolve import gather_trackers

    if not 0.2 <= timeout <= 10:
        raise UsageError(f"probe timeout must be in 0.2..10 seconds, got {timeout:g}")
    check_timing(timeout, retries)
    options = _resolve_options(DEFAULT_TIMEOUT, family, dns_server)
    resolved = await gather_trackers(as_tracker_specs(servers), domain, options, on_error=on_resolve_error)
    targets: list[ProbeTarget] = []
    for item in resolved:
        kind = "stun" if item.spec.scheme == "stun" else "tracker"
        for ep in item.endpoints:
            if all(t.endpoint != ep for t in targets):
                targets.append(ProbeTarget(item.spec.to_text(), ep, kind))
    if not targets:
        raise UsageError("no server address to probe")
    stun = asyncio.to_thread(
        run_probe,
        targets,
        families=(family,) if family else (4, 6),
        hairpin=hairpin,
        lifetime_max=lifetime_max,
        repeat=repeat,
        timeout=timeout,
        retries=retries,
    )
    # Servers all on loopback: the gateway is not on the path, and is not asked.
    if portmap and family != 6 and not all(t.endpoint.ip.is_loopback for t in targets):
        import dataclasses

        from nattool.net.portmap import discover_for_probe

        result, report = await asyncio.gather(stun, discover_for_probe())
        result = dataclasses.replace(result, portmap=report)
    else:
        result = await stun
    if check and not result.ok:
        raise probe_error(result, timeout)
    return result


def probe_error(result: ProbeResult, timeout: float) -> NattoolError:
    """Why a probe learnt nothing: nothing could be sent (exit 4), or no answer (3)."""
    unsent = result.send_failure()
    if unsent is not None:
        return NetworkError(unsent)
    return NoAnswer(f"no server answered the probe within {timeout:g}s")


__all__ = [
    "Registrant",
    "Registration",
    "Sighting",
    "TrackerLike",
    "TrackerListing",
    "TrackerRegistration",
    "TrackersResult",
    "WhoamiResult",
    "probe",
    "register",
    "resolve_targets",
    "trackers",
    "whoami",
]
