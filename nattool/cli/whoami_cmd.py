"""`nattool whoami`: my public endpoint as several trackers see it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from nattool.cli.options import ConfigOpt, DomainOpt, JsonOpt, RetriesOpt, TimeoutOpt, TrackerOpt
from nattool.exit_codes import ExitCode

if TYPE_CHECKING:
    from nattool.api import WhoamiResult


def whoami(
    trackers_arg: Annotated[
        Optional[list[str]], typer.Argument(metavar="TRACKER", help="Trackers to ask (same forms as --tracker).", show_default=False)
    ] = None,
    tracker: TrackerOpt = None,
    domain: DomainOpt = None,
    timeout: TimeoutOpt = None,
    retries: RetriesOpt = None,
    port: Annotated[int, typer.Option("--port", "-p", metavar="PORT", help="Local UDP port to send from (0: any).")] = 0,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Show my public endpoint as every tracker sees it, with round-trip times.

    Trackers that disagree are the first sign of a symmetric NAT.
    """

    from nattool import api
    from nattool.cli.output import run_edge
    from nattool.cli.targets import check_timing, client_settings, run

    def body() -> int:
        settings = client_settings((trackers_arg or []) + (tracker or []) or None, domain, timeout, retries, config)
        check_timing(settings.timeout, settings.retries)
        result = run(api.whoami(settings.trackers, port=port, check=False, **settings.api_options()))
        return render(result, json_out)

    raise typer.Exit(run_edge(body))


def render(result: WhoamiResult, json_out: bool) -> int:
    from rich.markup import escape
    from rich.table import Table

    from nattool.cli.output import emit_json, ms, stdout, verbosity

    seen = [e.to_text() for e in result.endpoints]
    agree = result.agree
    first = result.endpoint.to_text() if result.endpoint is not None else None
    code = int(result.error.exit_code) if result.error is not None else int(ExitCode.OK)
    if json_out:
        emit_json(
            {
                "endpoint": first,
                "agree": agree,
                "endpoints": seen,
                "answers": [
                    {
                        "tracker": s.tracker.to_text(),
                        "ok": s.ok,
                        "endpoint": s.endpoint.to_text() if s.endpoint is not None else None,
                        "rtt_ms": round(s.rtt * 1000, 3) if s.rtt is not None else None,
                        "attempts": s.attempts,
                        "error": str(s.error) if s.error is not None else None,
                    }
                    for s in result.sightings
                ],
            }
        )
        return code
    if verbosity() < 0:
        # --quiet: the answer alone (the endpoint, or nothing and the failure's exit code).
        if first is not None:
            stdout.print(first if agree is not False else "\n".join(seen), markup=False)
        return code
    table = Table(box=None, pad_edge=False)
    table.add_column("tracker")
    table.add_column("sees me as")
    table.add_column("rtt", justify="right")
    for s in result.sightings:
        if s.endpoint is not None:
            table.add_row(s.tracker.to_text(), s.endpoint.to_text(), ms(s.rtt))
        else:
            table.add_row(s.tracker.to_text(), f"[red]{escape(str(s.error))}[/red]", "-")
    stdout.print(table)
    if first is None:
        stdout.print("No tracker answered.")
    elif sum(s.ok for s in result.sightings) == 1:
        stdout.print(f"Public endpoint: [bold]{first}[/bold] (one tracker answered; ask two or more to compare)")
    elif agree:
        stdout.print(f"Public endpoint: [bold]{', '.join(seen)}[/bold] (all trackers agree)")
    else:
        stdout.print(
            f"Trackers disagree: {', '.join(seen)}. Your NAT maps one local port to different "
            "public ports per destination (symmetric NAT): hole punching may fail. Try 'nattool probe'."
        )
    return code
