"""`--keepalive SECONDS|auto`, as `register` and `connect` take it, and how a chosen
interval is shown."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional

from nattool.errors import UsageError

if TYPE_CHECKING:
    from nattool.net.lifetime_cache import LifetimeCache
    from nattool.protocol.keepalive_rules import KeepalivePlan

AUTO = "auto"
AUTO_HELP = ("'auto': from the mapping lifetime measured on this network (probe --lifetime, or measured in the "
             "background when none is cached; 20 s until then), registrations within a quarter of the tracker TTL")


def parse_keepalive(text: str, low: float, high: float) -> Optional[float]:
    """Seconds, or None for ``auto``."""
    if text == AUTO:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not low <= seconds <= high:
        raise UsageError(f"--keepalive must be auto or in {low:g}..{high:g} seconds, got {text[:20]!r}")
    return seconds


def keepalive_text(fields: Mapping[str, Any]) -> str:
    """One line for people from a plan's JSON fields: the interval, where it came from."""
    every = f"keepalive every {fields['interval_s']:g} s"
    if fields["register_every_s"] != fields["interval_s"]:
        every += f", registration every {fields['register_every_s']:g} s"
    return f"{every} ({fields['source']}: {fields['reason']})"


def plan_text(plan: KeepalivePlan) -> str:
    return keepalive_text(plan.to_json())


def cli_cache() -> LifetimeCache:
    """The lifetime cache, its warnings (a corrupt file, ...) on stderr."""
    from rich.markup import escape

    from nattool.cli.output import info
    from nattool.net.lifetime_cache import LifetimeCache

    return LifetimeCache(warn=lambda text: info(f"[yellow]warning:[/yellow] {escape(text)}"))


__all__ = ["AUTO", "AUTO_HELP", "cli_cache", "keepalive_text", "parse_keepalive", "plan_text"]
