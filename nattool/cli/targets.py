"""Which trackers a client command talks to: --tracker, then NATTOOL_TRACKERS, then
the config file; plus --domain (DNS SRV discovery)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Sequence

from nattool.config import load_settings
from nattool.errors import UsageError

# nattool.net.resolve (and dnspython under it) is imported where it is used: a
# tracker process (`serve`) never needs DNS, and the import costs ~6 MiB.
from nattool.protocol.endpoint import Endpoint


@dataclass(frozen=True, slots=True)
class ClientSettings:
    trackers: tuple[str, ...]
    domain: str | None
    timeout: float
    retries: int
    dns_server: tuple[str, int] | None


def client_settings(
    trackers: Sequence[str] | None,
    domain: str | None,
    timeout: float | None,
    retries: int | None,
    config_path: str | None = None,
) -> ClientSettings:
    """Effective client settings, flags > env > file > defaults."""
    overrides: dict[str, object] = {}
    if trackers:
        overrides["trackers"] = list(trackers)
    if domain:
        overrides["domain"] = domain
    if timeout is not None:
        overrides["timeout"] = timeout
    if retries is not None:
        overrides["retries"] = retries
    from nattool.net.resolve import parse_dns_server

    settings = load_settings(overrides, config_path=config_path, environ=os.environ)
    get = settings.get
    dns = get("dns_server")
    return ClientSettings(
        trackers=tuple(get("trackers") or ()),
        domain=get("domain") or None,
        timeout=float(get("timeout")),
        retries=int(get("retries")),
        dns_server=parse_dns_server(dns) if dns else None,
    )


def check_timing(timeout: float, retries: int) -> None:
    if not 0 < timeout <= 600:
        raise UsageError("--timeout must be in (0, 600] seconds")
    if not 0 <= retries <= 20:
        raise UsageError("--retries must be in 0..20")


async def resolve_targets(settings: ClientSettings) -> list[Endpoint]:
    from nattool.net.resolve import gather_trackers_async

    resolved = await gather_trackers_async(
        list(settings.trackers),
        settings.domain,
        timeout=settings.timeout,
        resolver_address=settings.dns_server,
    )
    out: list[Endpoint] = []
    for item in resolved:
        for ep in item.endpoints:
            if ep not in out:
                out.append(ep)
    if not out:
        if settings.domain and not settings.trackers:
            raise UsageError(f"domain {settings.domain} publishes no tracker (SRV target '.')")
        raise UsageError("no tracker address to talk to")
    return out


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)
