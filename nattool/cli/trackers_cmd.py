"""`nattool trackers`: the tracker list as the trackers know it."""

from __future__ import annotations

import typer
from rich.table import Table

from nattool.cli.options import ConfigOpt, DomainOpt, JsonOpt, RetriesOpt, TimeoutOpt, TrackerOpt
from nattool.cli.output import emit_json, ms, run_edge, stdout
from nattool.cli.targets import check_timing, client_settings, resolve_targets, run
from nattool.exit_codes import ExitCode
from nattool.net.client import ClientPool
from nattool.net.tracker_client import TrackerAnswer, list_trackers
from nattool.protocol.endpoint import Endpoint


def trackers(
    tracker: TrackerOpt = None,
    domain: DomainOpt = None,
    timeout: TimeoutOpt = None,
    retries: RetriesOpt = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List trackers: those given or discovered (--domain), and those they know."""

    def body() -> int:
        settings = client_settings(tracker, domain, timeout, retries, config)
        check_timing(settings.timeout, settings.retries)

        async def go() -> tuple[list[Endpoint], list[TrackerAnswer]]:
            targets = await resolve_targets(settings)
            async with ClientPool() as pool:
                return targets, await list_trackers(pool, targets, settings.timeout, settings.retries)

        targets, answers = run(go())
        return render(targets, answers, json_out)

    raise typer.Exit(run_edge(body))


def render(targets: list[Endpoint], answers: list[TrackerAnswer], json_out: bool) -> int:
    known: list[str] = [t.to_text() for t in targets]
    for a in answers:
        if a.ok:
            for text in a.value.trackers:  # type: ignore[union-attr]
                if text not in known:
                    known.append(text)
    code = int(ExitCode.OK) if any(a.ok for a in answers) else int(ExitCode.TIMEOUT)
    if json_out:
        emit_json(
            {
                "trackers": known,
                "answers": [
                    {
                        "tracker": a.tracker.to_text(),
                        "ok": a.ok,
                        "knows": list(a.value.trackers) if a.ok else None,  # type: ignore[union-attr]
                        "rtt_ms": round(a.rtt * 1000, 3) if a.rtt is not None else None,
                        "error": a.error,
                    }
                    for a in answers
                ],
            }
        )
        return code
    table = Table(box=None, pad_edge=False)
    table.add_column("asked")
    table.add_column("rtt", justify="right")
    table.add_column("knows")
    for a in answers:
        if a.ok:
            table.add_row(a.tracker.to_text(), ms(a.rtt), ", ".join(a.value.trackers) or "(none)")  # type: ignore[union-attr]
        else:
            table.add_row(a.tracker.to_text(), "-", f"[red]{a.error}[/red]")
    stdout.print(table)
    stdout.print(f"{len(known)} tracker(s): " + ", ".join(known))
    return code
