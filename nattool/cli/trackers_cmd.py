"""`nattool trackers`: the tracker list as the trackers know it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from nattool.cli.options import ConfigOpt, DomainOpt, JsonOpt, RetriesOpt, TimeoutOpt, TrackerOpt
from nattool.exit_codes import ExitCode

if TYPE_CHECKING:
    from nattool.api import TrackersResult


def trackers(
    tracker: TrackerOpt = None,
    domain: DomainOpt = None,
    timeout: TimeoutOpt = None,
    retries: RetriesOpt = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List trackers: those given or discovered (--domain), and those they know."""

    from nattool import api
    from nattool.cli.output import run_edge
    from nattool.cli.targets import check_timing, client_settings, run

    def body() -> int:
        settings = client_settings(tracker, domain, timeout, retries, config)
        check_timing(settings.timeout, settings.retries)
        result = run(api.trackers(settings.trackers, check=False, **settings.api_options()))
        return render(result, json_out)

    raise typer.Exit(run_edge(body))


def render(result: TrackersResult, json_out: bool) -> int:
    from rich.markup import escape
    from rich.table import Table

    from nattool.cli.output import emit_json, ms, stdout

    known = list(result.known)
    code = int(result.error.exit_code) if result.error is not None else int(ExitCode.OK)
    if json_out:
        emit_json(
            {
                "trackers": known,
                "answers": [
                    {
                        "tracker": t.tracker.to_text(),
                        "ok": t.ok,
                        "knows": list(t.knows) if t.ok else None,
                        "rtt_ms": round(t.rtt * 1000, 3) if t.rtt is not None else None,
                        "error": str(t.error) if t.error is not None else None,
                    }
                    for t in result.listings
                ],
            }
        )
        return code
    table = Table(box=None, pad_edge=False)
    table.add_column("asked")
    table.add_column("rtt", justify="right")
    table.add_column("knows")
    for t in result.listings:
        if t.ok:
            table.add_row(t.tracker.to_text(), ms(t.rtt), ", ".join(t.knows) or "(none)")
        else:
            table.add_row(t.tracker.to_text(), "-", f"[red]{escape(str(t.error))}[/red]")
    stdout.print(table)
    stdout.print(f"{len(known)} tracker(s): " + ", ".join(known))
    return code
