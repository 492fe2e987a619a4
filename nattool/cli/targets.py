"""Which trackers a client command talks to: --tracker, then NATTOOL_TRACKERS, then
the config file; plus --domain (DNS SRV discovery)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Sequence

from nattool import api
from nattool.api import resolve_targets as resolve_api_targets
from nattool.config import load_settings

# nattool.net.resolve (and dnspython under it) is imported where it is used: a
# tracker process (`serve`) never needs DNS, and the import costs ~6 MiB.
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.tracker_spec import as_tracker_specs


@dataclass(frozen=True, slots=True)
class ClientSettings:
    trackers: tuple[str, ...]
    domain: str | None
    timeout: float
    retries: int
    dns_server: tuple[str, int] | None

    def api_options(self) -> dict[str, Any]:
        """The keyword options every function of :mod:`nattool.api` takes."""
        return {"domain": self.domain, "timeout": self.timeout, "retries": self.retries, "dns_server": self.dns_server}


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
        # Checked one by one here, so that a bad one is named in one plain line.
        overrides["trackers"] = [spec.to_text() for spec in as_tracker_specs(list(trackers))]
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
    api.check_timing(timeout, retries, flags=True)


async def resolve_targets(settings: ClientSettings) -> list[Endpoint]:
    return await resolve_api_targets(
        settings.trackers, domain=settings.domain, timeout=settings.timeout, dns_server=settings.dns_server
    )


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


__all__ = ["ClientSettings", "check_timing", "client_settings", "resolve_targets", "run"]
