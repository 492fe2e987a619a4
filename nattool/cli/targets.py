"""Which trackers a client command talks to: --tracker, then NATTOOL_TRACKERS, then
the config file; plus --domain (DNS SRV discovery)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Sequence

from nattool.errors import UsageError
from nattool.net.resolve import ResolvedTracker, gather_trackers_async, parse_dns_server
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
    try:
        from nattool.config import load_settings
    except ImportError:  # pragma: no cover - config module not present
        load_settings = None  # type: ignore[assignment]
    overrides: dict[str, object] = {}
    if trackers:
        overrides["trackers"] = list(trackers)
    if domain:
        overrides["domain"] = domain
    if timeout is not None:
        overrides["timeout"] = timeout
    if retries is not None:
        overrides["retries"] = retries
    if load_settings is not None:
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
    env = [t.strip() for t in os.environ.get("NATTOOL_TRACKERS", "").split(",") if t.strip()]
    return ClientSettings(
        trackers=tuple(trackers or env),
        domain=domain or os.environ.get("NATTOOL_DOMAIN") or None,
        timeout=timeout if timeout is not None else 2.0,
        retries=retries if retries is not None else 3,
        dns_server=None,
    )


def check_timing(timeout: float, retries: int) -> None:
    if not 0 < timeout <= 600:
        raise UsageError("--timeout must be in (0, 600] seconds")
    if not 0 <= retries <= 20:
        raise UsageError("--retries must be in 0..20")


async def resolve_targets(settings: ClientSettings) -> list[Endpoint]:
    resolved: list[ResolvedTracker] = await gather_trackers_async(
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
        raise UsageError("no tracker address to talk to")
    return out


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)
