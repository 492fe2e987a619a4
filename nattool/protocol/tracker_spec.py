"""How a user writes a tracker (or a STUN server) on the command line or in config.

Accepted forms::

    host            host:port          1.2.3.4          1.2.3.4:port
    [2001:db8::1]   [2001:db8::1]:port 2001:db8::1      (bare IPv6, no port)
    stun:host       stun:host:port     stun:[v6]:port   (scheme kept for `probe`)

Pure: no DNS here, only syntax. A host name is kept as text; the net layer resolves it.
Every failure is a :class:`UsageError` with a one-line message, because this text
always comes from a person (flag, environment variable or config file).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from nattool.errors import UsageError
from nattool.protocol.endpoint import DEFAULT_PORT, Endpoint, IPAddress

# STUN's registered port (RFC 8489); a `stun:` spec without a port means this one.
STUN_DEFAULT_PORT = 3478

SCHEME_DEFAULT_PORTS: dict[str, int] = {"stun": STUN_DEFAULT_PORT}

_MAX_SPEC_TEXT = 300  # a 253-char name + scheme + port, with slack
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


@dataclass(frozen=True, slots=True)
class TrackerSpec:
    """One tracker as written by a user: a host name or IP literal, a port, a scheme.

    ``host`` is the lower-cased ASCII (IDNA) host name, or the canonical text of the IP
    literal; ``ip`` is set exactly when the host is an IP literal.
    """

    host: str
    port: int
    ip: Optional[IPAddress] = None
    scheme: Optional[str] = None

    @property
    def is_literal(self) -> bool:
        return self.ip is not None

    def endpoint(self) -> Endpoint:
        """The endpoint of an IP-literal spec (no DNS needed)."""
        if self.ip is None:
            raise UsageError(f"tracker {self.to_text()!r} is a host name, not an address")
        return Endpoint(self.ip, self.port)

    def to_text(self) -> str:
        """Canonical form, parseable by :func:`parse_tracker_spec` again."""
        host = f"[{self.host}]" if self.ip is not None and self.ip.version == 6 else self.host
        prefix = f"{self.scheme}:" if self.scheme else ""
        return f"{prefix}{host}:{self.port}"

    def __str__(self) -> str:
        return self.to_text()


def parse_tracker_spec(
    text: str,
    *,
    default_port: Optional[int] = None,
    schemes: frozenset[str] | set[str] | tuple[str, ...] = ("stun",),
) -> TrackerSpec:
    """Parse one tracker written by a user.

    ``default_port`` overrides the port used when none is written (otherwise 43283, or
    the scheme's own default, e.g. 3478 for ``stun:``). ``schemes`` are the URI-like
    prefixes accepted; pass ``()`` where a scheme makes no sense.
    """
    if not isinstance(text, str):
        raise UsageError(f"tracker must be text, got {type(text).__name__}")
    raw = text
    text = text.strip()
    shown = raw[:64]
    if not text:
        raise UsageError("empty tracker address")
    if len(text) > _MAX_SPEC_TEXT:
        raise UsageError(f"tracker address too long ({len(text)} characters): {shown!r}...")
    if not text.isprintable() or any(c.isspace() for c in text):
        raise UsageError(f"bad tracker {shown!r}: contains spaces or control characters")

    scheme: Optional[str] = None
    head, sep, rest = text.partition(":")
    # "stun:3478" is host "stun" on port 3478 (no real host name is all digits), so a
    # prefix counts as a scheme only when what follows is not a bare port.
    if sep and head.lower() in schemes and rest and not rest.isdigit():
        scheme = head.lower()
        text = rest
        if text.startswith("//"):
            raise UsageError(f"bad tracker {shown!r}: write {scheme}:host[:port], without //")

    if default_port is None:
        default_port = SCHEME_DEFAULT_PORTS.get(scheme or "", DEFAULT_PORT)

    host, port_text = _split_host_port(text, shown)
    port = default_port if port_text is None else _parse_port(port_text, shown)

    if host.startswith("["):
        ip = _parse_literal(host[1:-1], shown)
        if ip.version != 6:
            raise UsageError(f"bad tracker {shown!r}: brackets are only for IPv6 addresses")
        return TrackerSpec(host=str(ip), port=port, ip=ip, scheme=scheme)

    if ":" in host:  # bare IPv6, no port possible
        ip = _parse_literal(host, shown, bare_v6=True)
        _refuse_ambiguous_v6(host, shown)
        return TrackerSpec(host=str(ip), port=port, ip=ip, scheme=scheme)

    try:
        ip4 = ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return TrackerSpec(host=str(ip4), port=port, ip=ip4, scheme=scheme)

    return TrackerSpec(host=_check_host_name(host, shown), port=port, scheme=scheme)


#: A tracker as callers give it: text as the command line takes it, an endpoint, or a spec.
TrackerLike = Union[str, Endpoint, "TrackerSpec"]


def as_tracker_spec(tracker: TrackerLike) -> TrackerSpec:
    """Any accepted form of a tracker as a spec (text is checked: UsageError)."""
    if isinstance(tracker, TrackerSpec):
        return tracker
    if isinstance(tracker, Endpoint):
        return TrackerSpec(host=str(tracker.ip), port=tracker.port, ip=tracker.ip)
    return parse_tracker_spec(tracker)


def as_tracker_specs(trackers: Iterable[TrackerLike] | TrackerLike) -> list[TrackerSpec]:
    """One tracker or several, each as a spec (a bad one is a UsageError naming it)."""
    if isinstance(trackers, (str, Endpoint, TrackerSpec)):
        trackers = [trackers]
    return [as_tracker_spec(t) for t in trackers]


def parse_tracker_list(text: str, **kwargs: object) -> list[TrackerSpec]:
    """A comma (or whitespace) separated list, as in ``NATTOOL_TRACKERS``; empty items skipped."""
    items = [item for item in re.split(r"[,\s]+", text) if item]
    return [parse_tracker_spec(item, **kwargs) for item in items]  # type: ignore[arg-type]


def _split_host_port(text: str, shown: str) -> tuple[str, Optional[str]]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise UsageError(f"bad tracker {shown!r}: missing ']'")
        after = text[close + 1 :]
        if not after:
            return text[: close + 1], None
        if not after.startswith(":") or len(after) == 1:
            raise UsageError(f"bad tracker {shown!r}: want [IPv6]:port")
        return text[: close + 1], after[1:]
    if text.count(":") > 1:
        return text, None  # bare IPv6 literal
    host, sep, port = text.partition(":")
    if not sep:
        return host, None
    if not port:
        raise UsageError(f"bad tracker {shown!r}: missing port after ':'")
    if not host:
        raise UsageError(f"bad tracker {shown!r}: missing host before ':'")
    return host, port


def _parse_port(text: str, shown: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise UsageError(f"bad tracker {shown!r}: port {text[:12]!r} is not a number 1..65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise UsageError(f"bad tracker {shown!r}: port {port} out of range 1..65535")
    return port


def _parse_literal(text: str, shown: str, *, bare_v6: bool = False) -> IPAddress:
    if "%" in text:
        raise UsageError(f"bad tracker {shown!r}: IPv6 zone ids (%iface) are not supported")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        hint = "; an IPv6 address with a port is written [addr]:port" if bare_v6 else ""
        raise UsageError(f"bad tracker {shown!r}: {text[:48]!r} is not an IP address{hint}") from None


def _refuse_ambiguous_v6(host: str, shown: str) -> None:
    """``::1:4328`` is an address, but also reads as ``::1`` port 4328: when the last
    group is decimal and what precedes it is an address too, make the user say which."""
    head, _, last = host.rpartition(":")
    if not last.isdigit():
        return
    try:
        ipaddress.IPv6Address(head)
    except ValueError:
        return
    raise UsageError(
        f"bad tracker {shown!r}: ambiguous; write [{head}]:{last} for port {last}, or [{host}] for the address"
    )


def _check_host_name(host: str, shown: str) -> str:
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise UsageError(f"bad tracker {shown!r}: not a valid international host name") from None
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        raise UsageError(f"bad tracker {shown!r}: host name must be 1..253 characters")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise UsageError(f"bad tracker {shown!r}: {label!r} is not a valid host name label")
    # "1.2.3" or "1.2.3.256" would be an IPv4 typo, never a name: no TLD is all digits.
    if labels[-1].isdigit():
        raise UsageError(f"bad tracker {shown!r}: not a valid IPv4 address or host name")
    return name.lower()
