"""`nattool probe`: what does my NAT do, and can my peers reach me?"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from nattool.cli.options import ConfigOpt, DomainOpt, JsonOpt, TrackerOpt
from nattool.client_defaults import PROBE_RETRIES, PROBE_TIMEOUT

if TYPE_CHECKING:
    from nattool.diag.probe import FamilyResult, ProbeResult
    from nattool.net.portmap import PortmapReport

# --timeout and --retries as on every client command, with the probe's own defaults and
# range: it waits a timeout in each of up to three rounds, so the configured 2 s (for
# trackers) would double its run time.
ProbeTimeoutOpt = Annotated[
    Optional[float],
    typer.Option("--timeout", metavar="SECONDS", help=f"Seconds each request waits, retries included (0.2..10) [default: {PROBE_TIMEOUT:g}].", show_default=False),
]
ProbeRetriesOpt = Annotated[
    Optional[int],
    typer.Option("--retries", metavar="N", help=f"Retransmissions (with doubling backoff) within the timeout [default: {PROBE_RETRIES}].", show_default=False),
]


def probe(
    servers: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="SERVER",
            help="Trackers HOST[:PORT] (STUN on the tracker port, or //nat for old trackers) "
            "or STUN servers stun:HOST[:PORT] (port 3478). Default: the configured trackers.",
            show_default=False,
        ),
    ] = None,
    tracker: TrackerOpt = None,
    domain: DomainOpt = None,
    ipv4: Annotated[bool, typer.Option("-4", help="IPv4 only.")] = False,
    ipv6: Annotated[bool, typer.Option("-6", help="IPv6 only.")] = False,
    hairpin: Annotated[bool, typer.Option("--hairpin", help="Also test hairpinning (reaching my own public endpoint).")] = False,
    lifetime: Annotated[bool, typer.Option("--lifetime", help="Also measure the mapping lifetime (needs a server with RESPONSE-PORT; takes up to --lifetime-max).")] = False,
    lifetime_max: Annotated[float, typer.Option("--lifetime-max", metavar="SECONDS", help="Longest idle time tried by --lifetime, seconds (1..600).")] = 120.0,
    repeat: Annotated[int, typer.Option("--repeat", metavar="N", help="Run the whole probe N times and report whether the verdicts agree.")] = 1,
    no_portmap: Annotated[bool, typer.Option("--no-portmap", help="Do not ask the gateway about port mapping (PCP, NAT-PMP, UPnP IGD; about 1 s at most, in parallel with the STUN tests).")] = False,
    timeout: ProbeTimeoutOpt = None,
    retries: ProbeRetriesOpt = None,
    wait: Annotated[Optional[float], typer.Option("--wait", metavar="SECONDS", hidden=True, help="Old name of --timeout.")] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Classify my NAT (RFC 4787 mapping and filtering) against one or more servers.

    Filtering is measured only with a server that proves RFC 5780 support (an alternate
    address that really answers); otherwise it is reported unknown, with the reason.
    """

    from rich.markup import escape

    from nattool import api
    from nattool.cli.output import info, run_edge, stderr
    from nattool.cli.targets import client_settings, run
    from nattool.errors import NattoolError, UsageError
    from nattool.exit_codes import ExitCode

    def body() -> int:
        if ipv4 and ipv6:
            raise UsageError("-4 and -6 exclude each other")
        if not 1 <= lifetime_max <= 600:
            raise UsageError(f"--lifetime-max must be in 1..600 seconds, got {lifetime_max:g}")
        if timeout is not None and wait is not None:
            raise UsageError("--wait is the old name of --timeout: give one of them")
        settings = client_settings((servers or []) + (tracker or []) or None, domain, None, None, config)

        def warn(err: NattoolError) -> None:
            info(f"[yellow]warning:[/yellow] {escape(str(err))}")

        probe_timeout = next((t for t in (timeout, wait) if t is not None), PROBE_TIMEOUT)
        result = run(
            api.probe(
                settings.trackers,
                domain=settings.domain,
                timeout=probe_timeout,
                retries=retries if retries is not None else PROBE_RETRIES,
                family=4 if ipv4 else 6 if ipv6 else None,
                hairpin=hairpin,
                lifetime_max=lifetime_max if lifetime else None,
                repeat=repeat,
                dns_server=settings.dns_server,
                on_resolve_error=warn,
                check=False,
                portmap=not no_portmap,
            )
        )
        render(result, json_out)
        if lifetime:
            _remember_lifetimes(result)
        if result.ok:
            return int(ExitCode.OK)
        error = api.probe_error(result, probe_timeout)
        stderr.print(f"nattool: error: {error}", markup=False)
        return int(error.exit_code)

    raise typer.Exit(run_edge(body))


def _remember_lifetimes(result: ProbeResult) -> None:
    """Cache the measured lifetime for `--keepalive auto` (IPv4: the cache is keyed by
    the local address and the default IPv4 gateway)."""
    import time

    from nattool.cli.keepalive_opt import cli_cache
    from nattool.cli.output import info
    from nattool.diag.keepalive_auto import remember_measurement
    from nattool.protocol.keepalive_rules import auto_keepalive

    cache = cli_cache()
    for fam in result.families:
        entry = remember_measurement(fam.lifetime or {}, time.time(), cache)
        if entry is not None:
            plan = auto_keepalive(entry.lifetime, 0.0)
            info(f"mapping lifetime saved for {entry.local} via gateway {entry.gateway or 'none'}: "
                 f"--keepalive auto will use {plan.interval:g} s ({cache.path})")


def _yn(value: Optional[bool]) -> str:
    return "unknown" if value is None else "yes" if value else "no"


def render(result: ProbeResult, json_out: bool) -> None:
    from nattool.cli.output import emit_json, info, stdout, verbosity

    if json_out:
        emit_json(result.to_json())
        return
    for fam in result.families:
        _render_family(fam)
    if result.portmap is not None:
        _render_portmap(result.portmap)
    if len(result.runs) > 1:
        consistent = result.consistent()
        types = ", ".join("/".join(f.behaviour.nat_type.value for f in run) for run in result.runs)
        stdout.print(f"Repeat: {len(result.runs)} runs, {'consistent' if consistent else '[red]inconsistent[/red]'} ({types})")
    if verbosity() >= 0:
        info(f"probe took {result.elapsed:.2f} s")


def _render_family(fam: FamilyResult) -> None:
    from rich.table import Table

    from nattool.cli.output import stdout, verbosity

    b = fam.behaviour
    stdout.print(f"[bold]{fam.family}[/bold] ({len(fam.servers)} server{'s' if len(fam.servers) != 1 else ''}, {fam.elapsed:.2f} s)")
    rows: list[tuple[str, str]] = [("UDP", "ok" if b.udp == "ok" else "[red]blocked[/red]")]
    if b.udp == "ok":
        rows += [
            ("Public endpoint", str(b.public_endpoint) if b.public_endpoint else "unknown"),
            ("NAT type", f"[bold]{b.nat_type.value}[/bold]"),
            ("Mapping", (b.mapping.value if b.mapping else "unknown") + f"  ({b.mapping_reason})"),
            ("Filtering", (b.filtering.value if b.filtering else "unknown") + f"  ({b.filtering_reason})"),
            ("NAT present", _yn(None if b.no_nat is None else not b.no_nat)),
            ("Port preservation", _yn(b.port_preservation)),
        ]
        if b.hairpinning is not None:
            rows.append(("Hairpinning", _yn(b.hairpinning)))
        if b.cgnat:
            rows.append(("CGNAT hint", "yes (100.64.0.0/10 address seen)"))
        if b.alg:
            rows.append(("ALG hint", "yes (MAPPED-ADDRESS differs from XOR-MAPPED-ADDRESS)"))
    if fam.lifetime is not None:
        life = fam.lifetime
        if life.get("tested"):
            below = life.get("below_s")
            text = f">= {life['at_least_s']} s" + (f", < {below} s" if below is not None else " (alive at the longest wait)")
        else:
            text = f"not tested: {life.get('reason')}"
        rows.append(("Mapping lifetime", text))
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    stdout.print(table)
    stdout.print(b.hole_punching)
    for note in b.notes:
        stdout.print(f"note: {note}")
    if verbosity() >= 1:
        servers = Table(box=None, pad_edge=False)
        for col in ("server", "address", "answered", "sees me as", "RFC 5780"):
            servers.add_column(col)
        for s in fam.servers:
            servers.add_row(
                s.target.label,
                str(s.target.endpoint),
                s.protocol or "[red]no[/red]",
                str(s.mapped) if s.mapped else "-",
                "yes" if s.rfc5780 else f"no ({s.rfc5780_reason})",
            )
        stdout.print(servers)
    stdout.print()


_PORTMAP_NAMES = {"pcp": "PCP", "natpmp": "NAT-PMP", "upnp": "UPnP IGD"}


def _render_portmap(report: PortmapReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    from nattool.cli.output import stdout

    where = f"gateway {report.gateway}" if report.gateway else "no IPv4 default gateway"
    stdout.print(f"[bold]Port mapping[/bold] ({where}, {report.elapsed:.2f} s)")
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    for p in report.protocols:
        if p.external_address:
            text = f"yes, external address {p.external_address} ({p.address_class})"
            if p.behind_nat:
                text += " [yellow]carrier-grade NAT or a double NAT[/yellow]"
        elif p.answered:
            text = f"answered, no external address ({escape(p.error or 'unknown')})"
        else:
            text = f"no ({escape(p.error or 'no answer')})"
        table.add_row(_PORTMAP_NAMES.get(p.protocol, p.protocol), text)
    stdout.print(table)
    stdout.print()
