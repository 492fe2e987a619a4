"""`nattool whoami`: my public endpoint as several trackers see it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from nattool.cli.options import ConfigOpt, DomainOpt, JsonOpt, RetriesOpt, TimeoutOpt, TrackerOpt
from nattool.cli.output import emit_json, fail, ms, run_edge, stdout, verbosity
from nattool.cli.targets import check_timing, client_settings, resolve_targets, run
from nattool.exit_codes import ExitCode
from nattool.net.client import ClientPool
from nattool.net.tracker_client import TrackerAnswer, whoami as ask_whoami


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

    def body() -> int:
        settings = client_settings((trackers_arg or []) + (tracker or []) or None, domain, timeout, retries, config)
        check_timing(settings.timeout, settings.retries)
        if not 0 <= port <= 65535:
            fail("--port must be in 0..65535", ExitCode.USAGE)

        async def go() -> list[TrackerAnswer]:
            targets = await resolve_targets(settings)
            async with ClientPool(port) as pool:
                return await ask_whoami(pool, targets, settings.timeout, settings.retries)

        answers = run(go())
        return render(answers, json_out)

    raise typer.Exit(run_edge(body))


def render(answers: list[TrackerAnswer], json_out: bool) -> int:
    seen = sorted({a.value.to_text() for a in answers if a.ok})  # type: ignore[union-attr]
    by_family: dict[str, set[str]] = {}
    for a in answers:
        if a.ok:
            by_family.setdefault(a.value.family_name, set()).add(a.value.to_text())  # type: ignore[union-attr]
    agree = all(len(v) == 1 for v in by_family.values()) if by_family else None
    first = next((a.value.to_text() for a in answers if a.ok), None)  # type: ignore[union-attr]
    code = int(ExitCode.OK) if first else int(ExitCode.TIMEOUT)
    if json_out:
        emit_json(
            {
                "endpoint": first,
                "agree": agree,
                "endpoints": seen,
                "answers": [
                    {
                        "tracker": a.tracker.to_text(),
                        "ok": a.ok,
                        "endpoint": a.value.to_text() if a.ok else None,  # type: ignore[union-attr]
                        "rtt_ms": round(a.rtt * 1000, 3) if a.rtt is not None else None,
                        "attempts": a.attempts,
                        "error": a.error,
                    }
                    for a in answers
                ],
            }
        )
        return code
    if verbosity() < 0:
        # --quiet: the answer alone (the endpoint, or nothing and exit 3).
        if first is not None:
            stdout.print(first if agree is not False else "\n".join(seen), markup=False)
        return code
    table = Table(box=None, pad_edge=False)
    table.add_column("tracker")
    table.add_column("sees me as")
    table.add_column("rtt", justify="right")
    for a in answers:
        if a.ok:
            table.add_row(a.tracker.to_text(), a.value.to_text(), ms(a.rtt))  # type: ignore[union-attr]
        else:
            table.add_row(a.tracker.to_text(), f"[red]{a.error}[/red]", "-")
    stdout.print(table)
    if first is None:
        stdout.print("No tracker answered.")
    elif sum(a.ok for a in answers) == 1:
        stdout.print(f"Public endpoint: [bold]{first}[/bold] (one tracker answered; ask two or more to compare)")
    elif agree:
        stdout.print(f"Public endpoint: [bold]{', '.join(seen)}[/bold] (all trackers agree)")
    else:
        stdout.print(
            f"Trackers disagree: {', '.join(seen)}. Your NAT maps one local port to different "
            "public ports per destination (symmetric NAT): hole punching may fail. Try 'nattool probe'."
        )
    return code
