"""Shell-completion candidates that come from the configuration, not from the CLI's shape.

Typer calls these at <TAB> time (``autocompletion=`` on an option or argument). They
must be quick and quiet: no network (``--domain`` is not resolved), no output, and a
broken config file means "no candidates", never a traceback in the user's prompt.
"""

from __future__ import annotations

import os
from typing import Any

from nattool.errors import NattoolError


def configured_trackers(config_path: str | None, environ: Any = None) -> list[tuple[str, str]]:
    """(tracker, where it is configured) for the trackers of NATTOOL_TRACKERS or the config
    file, in their configured order; [] when none or the config cannot be read."""
    from nattool.config import load_settings

    try:
        settings = load_settings({}, config_path=config_path, environ=os.environ if environ is None else environ)
        trackers = settings.get("trackers") or ()
        source = settings.source("trackers")
    except (NattoolError, OSError, ValueError):
        return []
    return [(str(t), source) for t in trackers]


def complete_trackers(ctx: Any, incomplete: str) -> list[tuple[str, str]]:
    """Typer ``autocompletion=`` callback for --tracker and tracker arguments: the
    configured trackers that start with what was typed, with their source as help
    (zsh and fish show it). Honours a ``--config FILE`` already on the command line."""
    config_path = None
    while ctx is not None and config_path is None:
        params = getattr(ctx, "params", None) or {}
        value = params.get("config")
        config_path = value if isinstance(value, str) and value else None
        ctx = getattr(ctx, "parent", None)
    return [(t, src) for t, src in configured_trackers(config_path) if t.startswith(incomplete)]
