"""`--keepalive SECONDS|auto`, as `register` and `connect` take it, and how a chosen
interval is shown."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from nattool.errors import UsageError

if TYPE_CHECKING:
    from nattool.diag.connect import OnEvent, Retune
    from nattool.net.lifetime_cache import LifetimeCache
    from nattool.protocol.connect_events import ConnectEvent
    from nattool.protocol.endpoint import Endpoint
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


class SessionKeepalive:
    """`connect`'s keepalive: ``every`` seconds given, or (None) `--keepalive auto`
    for a session with ``trackers``."""

    def __init__(self, every: Optional[float], trackers: Sequence[Endpoint]) -> None:
        from nattool.diag.keepalive_auto import AutoKeepalive

        self.every = every
        self.auto = AutoKeepalive(trackers, cache=cli_cache()) if every is None else None
        self.plan = self.auto.plan if self.auto is not None else None

    @property
    def interval(self) -> float:
        """The keepalive interval to start with."""
        if self.auto is not None:
            return self.auto.plan.interval
        assert self.every is not None
        return self.every

    @property
    def retune(self) -> Optional[Retune]:
        """The background measurement to run alongside the session, if any."""
        return self.auto.measure if self.auto is not None and self.auto.wants_measurement else None

    def register_every(self, default: float) -> float:
        """The registration interval: auto's, or the session's ``default`` with a given one."""
        from nattool.protocol.keepalive_rules import given_keepalive

        if self.plan is None:
            assert self.every is not None
            self.plan = given_keepalive(self.every, default)
        return self.plan.register_every

    def announcing(self, render: OnEvent) -> OnEvent:
        """``render``, plus the keepalive in force once a tracker answered (and the
        tracker handed to the background measurement)."""
        from nattool.protocol.connect_events import KeepaliveSet, Registered

        shown = False

        def emit(event: ConnectEvent) -> None:
            nonlocal shown
            render(event)
            if isinstance(event, Registered):
                if not shown and self.plan is not None:
                    render(KeepaliveSet(self.plan))
                shown = True
                if self.auto is not None:
                    self.auto.tracker_answered(event.tracker)

        return emit


def cli_cache() -> LifetimeCache:
    """The lifetime cache, its warnings (a corrupt file, ...) on stderr."""
    from rich.markup import escape

    from nattool.cli.output import info
    from nattool.net.lifetime_cache import LifetimeCache

    return LifetimeCache(warn=lambda text: info(f"[yellow]warning:[/yellow] {escape(text)}"))


__all__ = ["AUTO", "AUTO_HELP", "SessionKeepalive", "cli_cache", "keepalive_text", "parse_keepalive", "plan_text"]
