"""Options shared by the client commands, declared once."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from nattool.cli.complete import complete_trackers

TrackerOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--tracker",
        "-t",
        metavar="TRACKER",
        autocompletion=complete_trackers,
        help="Tracker HOST[:PORT] or [IPv6]:PORT (repeatable). Default: NATTOOL_TRACKERS, then the config file.",
        show_default=False,
    ),
]
DomainOpt = Annotated[
    Optional[str],
    typer.Option("--domain", metavar="DOMAIN", help="Discover trackers from DNS SRV records _nattracker._udp.DOMAIN.", show_default=False),
]
TimeoutOpt = Annotated[
    Optional[float],
    typer.Option("--timeout", metavar="SECONDS", help="Seconds to wait for each tracker, retries included [default: 2].", show_default=False),
]
RetriesOpt = Annotated[
    Optional[int],
    typer.Option("--retries", metavar="N", help="Retransmissions (with doubling backoff) within the timeout [default: 3].", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
ConfigOpt = Annotated[
    Optional[str],
    typer.Option("--config", metavar="FILE", help="Config file (TOML). Default: NATTOOL_CONFIG, then the platform config dir.", show_default=False),
]
