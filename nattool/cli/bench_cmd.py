"""`nattool bench TARGET`: UDP load against a tracker or a STUN server."""

from __future__ import annotations

import time
from typing import Annotated, Any, Optional

import typer

from nattool.exit_codes import ExitCode


def bench(
    target: Annotated[str, typer.Argument(metavar="TARGET", help="Server to load: IP:PORT or [IPv6]:PORT (no default: say which server).", show_default=False)],
    mix: Annotated[str, typer.Option("--mix", metavar="KIND=W,...", help="Request mix by weight: nat, register, trackers, stun (e.g. nat=1,register=3).")] = "nat=1",
    stun: Annotated[bool, typer.Option("--stun", help="Send RFC 8489 Binding requests (same as --mix stun=1); works against any STUN server.")] = False,
    groups: Annotated[int, typer.Option("--groups", metavar="N", help="Groups the registrations are spread over.")] = 1000,
    members: Annotated[int, typer.Option("--members", metavar="M", help="Distinct member identities that register.")] = 10_000,
    sockets: Annotated[int, typer.Option("--sockets", metavar="S", help="Source sockets per process, used in turn (each carries one outstanding request; a member always registers from the same one).")] = 256,
    window: Annotated[Optional[int], typer.Option("--window", metavar="W", help="Closed loop: requests kept outstanding (all processes) [default: 128].", show_default=False)] = None,
    rate: Annotated[Optional[float], typer.Option("--rate", metavar="R", help="Open loop: requests per second (all processes), evenly spaced (at tens of thousands a second the generator polls its core between sends); on Linux latency is then timed by the kernel's receive timestamp of each reply.", show_default=False)] = None,
    duration: Annotated[float, typer.Option("--duration", metavar="SECONDS", help="Measured seconds.")] = 10.0,
    warmup: Annotated[float, typer.Option("--warmup", metavar="SECONDS", help="Seconds of load before measuring.")] = 1.0,
    timeout: Annotated[float, typer.Option("--timeout", metavar="SECONDS", help="A request without a reply after this long is lost.")] = 1.0,
    processes: Annotated[int, typer.Option("--processes", "-P", metavar="P", help="Generator processes (cores).")] = 1,
    ramp: Annotated[bool, typer.Option("--ramp", help="Find the highest open-loop rate with loss under --max-loss (like resperf).")] = False,
    max_loss: Annotated[Optional[float], typer.Option("--max-loss", metavar="RATIO", help="Loss ratio allowed (0.001 = 0.1%); with it a run that loses more exits 1 [ramp default: 0.001].", show_default=False)] = None,
    ramp_start: Annotated[float, typer.Option("--ramp-start", metavar="R", help="First rate of --ramp, requests/s.")] = 20_000.0,
    ramp_factor: Annotated[float, typer.Option("--ramp-factor", metavar="F", help="Rate multiplier between --ramp steps.")] = 1.25,
    ramp_step: Annotated[float, typer.Option("--ramp-step", metavar="SECONDS", help="Measured seconds per --ramp step.")] = 2.0,
    ramp_budget: Annotated[float, typer.Option("--ramp-budget", metavar="SECONDS", help="Total time --ramp may take.")] = 60.0,
    spin: Annotated[bool, typer.Option("--spin", help="Busy-poll for replies instead of sleeping (spares a fast server the wake-ups; the generator then uses a whole core).")] = False,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of group names and identities (runs with the same seed re-register the same members).")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")] = False,
) -> None:
    """Load a tracker or STUN server with UDP requests; report rate, loss, invalid replies and latency."""
    from nattool.cli.output import emit_json, run_edge, stdout, verbosity

    def body() -> int:
        from nattool.diag.bench import BenchConfig, check_max_loss, parse_mix, parse_target, run_bench
        from nattool.errors import UsageError

        if window is not None and rate is not None:
            raise UsageError("--window (closed loop) and --rate (open loop) exclude each other")
        if ramp and (window is not None or rate is not None):
            raise UsageError("--ramp chooses the rates itself: drop --window/--rate")
        if max_loss is not None:
            check_max_loss(max_loss)
        config = BenchConfig(
            target=parse_target(target),
            mix=(("stun", 1),) if stun else parse_mix(mix),
            groups=groups,
            members=members,
            sockets=sockets,
            window=None if rate is not None else (window if window is not None else min(128, sockets * processes)),
            rate=rate,
            duration=duration,
            warmup=warmup,
            timeout=timeout,
            processes=processes,
            seed=seed,
            spin=spin,
        )
        live = stdout.is_terminal and not json_out and verbosity() >= 0
        if ramp:
            return _ramp(config, max_loss if max_loss is not None else 0.001, json_out, live)
        with _LiveProgress(live, config.duration) as show:
            report = run_bench(config, show.update if live else None)
        doc = report.to_json()
        if json_out:
            emit_json(doc)
        else:
            _render(doc)
        return _exit_code(report.result.answered, report.result.invalid, report.loss_ratio, max_loss)

    def _ramp(config: Any, threshold: float, as_json: bool, live: bool) -> int:
        from nattool.diag.bench import run_ramp

        def step(report: Any) -> None:
            if live:
                d = report.to_json()
                stdout.print(
                    f"  rate {d['rate']:>10,.0f}/s  achieved {d['achieved_rate']:>10,.0f}/s  "
                    f"loss {d['loss_ratio']:.3%}  invalid {d['invalid']}  p99 {d['latency_ms']['p99']:.3f} ms"
                )

        result = run_ramp(
            config,
            start_rate=ramp_start,
            factor=ramp_factor,
            step_seconds=ramp_step,
            max_loss=threshold,
            budget_seconds=ramp_budget,
            on_step=step,
        )
        doc = result.to_json()
        if as_json:
            emit_json(doc)
        else:
            for s in doc["steps"]:
                if not live:
                    stdout.print(
                        f"  rate {s['rate']:>10,.0f}/s  achieved {s['achieved_rate']:>10,.0f}/s  "
                        f"loss {s['loss_ratio']:.3%}  invalid {s['invalid']}  p99 {s['p99_ms']:.3f} ms"
                    )
            if doc["best"] is not None:
                stdout.print(f"highest rate with loss <= {threshold:.2%}: {doc['best_rate']:,.0f} replies/s (offered {doc['best_offered_rate']:,.0f}/s)")
            else:
                stdout.print(f"no rate held loss <= {threshold:.2%}")
            stdout.print(f"stopped: {doc['stopped_because']}")
            _print_hints(doc["hints"])
        return int(ExitCode.OK) if result.best is not None else int(ExitCode.FAILURE)

    raise typer.Exit(run_edge(body))


def _exit_code(answered: int, invalid: int, loss: float, max_loss: Optional[float]) -> int:
    if answered == 0 and invalid == 0:
        return int(ExitCode.TIMEOUT)
    if invalid:
        return int(ExitCode.FAILURE)
    if max_loss is not None and loss > max_loss:
        return int(ExitCode.FAILURE)
    return int(ExitCode.OK)


class _LiveProgress:
    """A one-line rich Live display (rate, loss, p99) that vanishes when done; inert
    when stdout is not a terminal."""

    def __init__(self, enabled: bool, duration: float) -> None:
        self.enabled = enabled
        self.duration = duration
        self._live: Any = None
        self._last: tuple[float, int] = (time.monotonic(), 0)

    def __enter__(self) -> "_LiveProgress":
        if self.enabled:
            from rich.live import Live

            from nattool.cli.output import stdout

            self._live = Live("starting…", console=stdout, transient=True, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(self, p: Any) -> None:
        if self._live is None:
            return
        now = time.monotonic()
        t, answered = self._last
        rate = (p.answered - answered) / (now - t) if now > t else 0.0
        self._last = (now, p.answered)
        loss = p.lost / p.sent if p.sent else 0.0
        p99 = p.recent.percentile(99) / 1e6 if p.recent.count else 0.0
        self._live.update(
            f"[{p.phase} {p.elapsed:5.1f}/{self.duration:g} s]  rate {rate:>10,.0f}/s  "
            f"sent {p.sent:,}  loss {loss:.3%}  invalid {p.invalid:,}  p99 {p99:.3f} ms"
        )


def _render(d: dict[str, Any]) -> None:
    from rich.table import Table

    from nattool.cli.output import stdout

    mode = f"closed loop, window {d['window']}" if d["mode"] == "closed" else f"open loop, {d['rate']:,.0f}/s"
    stdout.print(
        f"bench {d['target']}  {d['workload']}  ({mode}, {d['duration']:g} s after {d['warmup']:g} s warm-up, "
        f"{d['processes']} process(es), {d['sockets']} sockets)"
    )
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(justify="left")
    t.add_column(justify="right")
    lat = d["latency_ms"]
    rows: list[tuple[str, str]] = [
        ("sent", f"{d['sent']:,}"),
        ("answered", f"{d['answered']:,}"),
        ("lost", f"{d['lost']:,} ({d['loss_ratio']:.3%})"),
        ("invalid", f"{d['invalid']:,}"),
        ("offered rate", f"{d['offered_rate']:,.0f}/s"),
        ("achieved rate", f"{d['achieved_rate']:,.0f} replies/s"),
        ("latency ms" + (" (kernel rx time)" if lat.get("clock") == "kernel" else ""), f"min {lat['min']:.3f}  p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  p99.9 {lat['p99.9']:.3f}  max {lat['max']:.3f}"),
    ]
    gen = d["generator"]
    rows.append(("generator CPU", _generator_cpu(gen, spin=d["spin"])))
    if d["skipped"] or d["send_errors"]:
        rows.append(("not sent", f"{d['skipped']:,} skipped, {d['send_errors']:,} send errors"))
    if d.get("late"):
        rows.append(("sent late", f"{d['late']:,} in bursts, over 0.1 ms behind schedule ({d['late'] / max(1, d['sent']):.2%})"))
    for reason, count in sorted(d["invalid_reasons"].items(), key=lambda kv: -kv[1])[:5]:
        rows.append(("  invalid", f"{count:,} {reason}"))
    for name, value in rows:
        t.add_row(name, value)
    stdout.print(t)
    if gen["limited"]:
        stdout.print(f"note: the generator, not the server, was the limit: {gen['limit_reason']}")
    else:
        stdout.print("note: the generator was not the limit")
    if gen["bursty"]:
        stdout.print(
            f"note: {d['late'] / max(1, d['sent']):.1%} of the requests went out late, in bursts (the generator fell behind its "
            "schedule): the highest latencies may be the server's answer to those bursts"
        )
    _print_hints(d["hints"])


def _print_hints(hints: list[str]) -> None:
    from nattool.cli.output import stdout

    for hint in hints:
        stdout.print(f"hint: {hint}", markup=False)


def _generator_cpu(gen: dict[str, Any], spin: bool) -> str:
    """Process CPU time over the measured wall time, per process."""

    def percents(key: str) -> str:
        return "+".join(f"{x * 100:.0f}%" for x in gen[key])

    text = f"{percents('cpu_per_process')} of one core"
    if spin:
        text += f" (busy {percents('busy_per_process')}, the rest --spin polling)"
    if any(x >= 0.01 for x in gen["runqueue_wait_per_process"]):
        text += f"; waited for a core {percents('runqueue_wait_per_process')} of the run"
    return text

