"""`nattool connect GROUP`: a path to the group's members (direct UDP where possible,
through a tracker's TURN relay otherwise), and a tiny chat."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from nattool.cli.keepalive_opt import AUTO, AUTO_HELP
from nattool.cli.options import ConfigOpt, DomainOpt, JsonOpt, TrackerOpt
from nattool.protocol.connect_options import BIRTHDAY_BUDGET, BIRTHDAY_RATE, DEFAULT_CONNECT_PORT, RelayMode

# --timeout is connect's give-up time, so --retries says which timeout it splits: the
# per-tracker one (the config file's `timeout`), as in every other client command.
ConnectRetriesOpt = Annotated[
    Optional[int],
    typer.Option("--retries", metavar="N", show_default=False,
                 help="Retransmissions of each registration (doubling backoff) within the tracker timeout "
                      "(config 'timeout', 2 s) [default: 3]."),
]


def connect(
    group: Annotated[str, typer.Argument(metavar="GROUP", help="Group key shared by the members (usually a UUID). It also keys the peers' message authentication.")],
    tracker: TrackerOpt = None,
    domain: DomainOpt = None,
    port: Annotated[int, typer.Option("--port", "-p", metavar="PORT", help="Local UDP port for trackers and peers alike (0: any). Members on one LAN find each other at this port.")] = DEFAULT_CONNECT_PORT,
    bind: Annotated[Optional[str], typer.Option("--bind", metavar="ADDR", help="Local address to bind (default: all).", show_default=False)] = None,
    lan: Annotated[str, typer.Option("--lan", metavar="LAN", help="LAN addresses for members behind the same public IP: 'auto', '0' (none) or a comma list.")] = "auto",
    node_id: Annotated[str, typer.Option("--id", metavar="ID", help="Identity inside the group: '0' (the endpoint the tracker sees), 'auto' (a stable MAC of this host) or a MAC.")] = "0",
    timeout: Annotated[float, typer.Option("--timeout", metavar="SECONDS", help="Give up (non-zero exit) when no path is up for this many seconds.")] = 30.0,
    retries: ConnectRetriesOpt = None,
    keepalive: Annotated[str, typer.Option("--keepalive", metavar="SECONDS|auto", help="Seconds between keepalive pings on an open path; " + AUTO_HELP + ".")] = AUTO,
    dead_after: Annotated[Optional[float], typer.Option("--dead-after", metavar="SECONDS", help="A path with no answer for this many seconds is down [default: 3 x the first keepalive interval].", show_default=False)] = None,
    once: Annotated[bool, typer.Option("--once", help="Exit 0 as soon as a path is up (do not read stdin).")] = False,
    relay: Annotated[RelayMode, typer.Option("--relay", help="Use a tracker's relay (serve --relay): 'auto' for members no direct path reaches within 2 s (direct paths take over when they open), 'never', or 'only'.")] = RelayMode.AUTO,
    tcp: Annotated[bool, typer.Option("--tcp", help="Reach the trackers over TCP at once (without it: only when none answers over UDP within 2 s, and not with --relay never).")] = False,
    birthday_rate: Annotated[float, typer.Option("--birthday-rate", metavar="PROBES", help="Birthday punching (a NAT that maps per destination against one that filters by port; two trackers show which): probes per second, both sides.")] = BIRTHDAY_RATE,
    birthday_budget: Annotated[int, typer.Option("--birthday-budget", metavar="N", help="Birthday punching: probes in all (2048: a hit 99.97% of the time), which bounds the NATs' session tables; 0 turns it and port prediction off.")] = BIRTHDAY_BUDGET,
    portmap: Annotated[bool, typer.Option("--portmap/--no-portmap", help="Ask the gateway to map the local port (PCP, NAT-PMP or UPnP IGD; registering waits up to 0.5 s for it), offer the mapped endpoint to the peers, renew it, and delete it on exit (also on Ctrl-C and SIGTERM).")] = True,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Open a path to every member of GROUP: direct UDP (hole punching) where possible,
    else through a tracker's TURN relay; then carry lines: stdin goes to the connected
    peers, their lines are printed as '<peer> line'.

    End of input leaves, once the lines read are delivered. Exit status: 0 ok (also after SIGTERM), 1 no path
    could be opened (with the reason), 3 no tracker or no other member answered within --timeout, 4 no tracker
    can be sent to.
    """
    from dataclasses import replace

    from nattool.cli.connect_render import Renderer
    from nattool.cli.keepalive_opt import cli_cache, parse_keepalive
    from nattool.diag.keepalive_auto import SessionKeepalive
    from nattool.cli.node_args import parse_identity, parse_lan
    from nattool.cli.output import run_edge
    from nattool.cli.targets import check_timing, client_settings, resolve_targets, run
    from nattool.diag.connect import connect_session
    from nattool.errors import ProtocolError, UsageError
    from nattool.protocol.birthday import check_limits as check_birthday_limits
    from nattool.protocol.connect_session import SessionConfig
    from nattool.protocol.endpoint import parse_ip
    from nattool.protocol.text import canonical_group

    def body() -> int:
        settings = client_settings(tracker, domain, None, retries, config)
        check_timing(settings.timeout, settings.retries)
        try:
            group_key = canonical_group(group)
        except ProtocolError:
            raise UsageError(f"bad group {group[:70]!r}: 1..64 characters of A-Z a-z 0-9 . _ -") from None
        if not 0 <= port <= 65535:
            raise UsageError("--port must be in 0..65535")
        if not 0 < timeout <= 86400:
            raise UsageError("--timeout must be in (0, 86400] seconds")
        every = parse_keepalive(keepalive, 0.2, 3600)
        if every is not None and not every < (dead_after if dead_after is not None else 3 * every) <= 86400:
            raise UsageError("--dead-after must be longer than --keepalive")
        if bind is not None:
            try:
                parse_ip(bind)
            except ProtocolError:
                raise UsageError(f"bad --bind {bind[:50]!r}: want an IP address") from None
        identity = parse_identity(node_id)
        check_birthday_limits(birthday_rate, birthday_budget)

        async def go() -> int:
            targets = await resolve_targets(settings)
            ka = SessionKeepalive(every, targets, cache=cli_cache() if every is None else None)
            interval = ka.interval
            dead = dead_after if dead_after is not None else 3 * interval
            if not interval < dead <= 86400:
                raise UsageError(f"--dead-after must be longer than the keepalive interval ({interval:g} s)")
            config = SessionConfig(
                group=group_key,
                trackers=tuple(targets),
                lan=parse_lan(lan, targets),
                identity=identity,
                timeout=timeout,
                keepalive=interval,
                dead_after=dead,
                tracker_timeout=settings.timeout,
                retries=settings.retries,
                once=once,
                relay=relay,
                tcp=tcp,
                birthday_rate=birthday_rate,
                birthday_budget=birthday_budget,
                portmap=portmap,
            )
            config = replace(config, register_every=ka.register_every(config.register_every))
            return await connect_session(config, ka.announcing(Renderer(json_out)), port=port, bind=bind,
                                         read_stdin=not once, retune=ka.retune)

        return int(run(go()))

    raise typer.Exit(run_edge(body))


__all__ = ["connect"]
