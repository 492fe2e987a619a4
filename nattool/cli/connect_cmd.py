"""`nattool connect GROUP`: a path to the group's members (direct UDP where possible,
through a tracker's TURN relay otherwise), and a tiny chat."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any, Optional

import typer

from nattool.cli.node_args import parse_identity, parse_lan
from nattool.cli.options import ConfigOpt, DomainOpt, JsonOpt, TrackerOpt
from nattool.cli.output import run_edge, stderr, verbosity
from nattool.cli.targets import check_timing, client_settings, resolve_targets, run
from nattool.diag.connect import connect_session
from nattool.errors import ProtocolError, UsageError
from nattool.protocol.connect_events import (
    ConnectEvent,
    GaveUp,
    MemberSeen,
    MessageReceived,
    PathDown,
    PathUp,
    Queued,
    Registered,
    RelayAllocated,
    RelayLost,
    StreamWanted,
    Undelivered,
)
from nattool.protocol.connect_rules import DEFAULT_CONNECT_PORT, RelayMode
from nattool.protocol.connect_session import SessionConfig
from nattool.protocol.endpoint import parse_ip
from nattool.protocol.text import canonical_group

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
    keepalive: Annotated[float, typer.Option("--keepalive", metavar="SECONDS", help="Seconds between keepalive pings on an open path.")] = 20.0,
    dead_after: Annotated[Optional[float], typer.Option("--dead-after", metavar="SECONDS", help="A path with no answer for this many seconds is down [default: 3 x keepalive].", show_default=False)] = None,
    once: Annotated[bool, typer.Option("--once", help="Exit 0 as soon as a path is up (do not read stdin).")] = False,
    relay: Annotated[RelayMode, typer.Option("--relay", help="Use a tracker's relay (serve --relay): 'auto' for members no direct path reaches within 2 s (direct paths take over when they open), 'never', or 'only'.")] = RelayMode.AUTO,
    tcp: Annotated[bool, typer.Option("--tcp", help="Reach the trackers over TCP at once (without it: only when none answers over UDP within 2 s, and not with --relay never).")] = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Open a path to every member of GROUP: direct UDP (hole punching) where possible,
    else through a tracker's TURN relay; then carry lines: stdin goes to the connected
    peers, their lines are printed as '<peer> line'.

    End of input leaves, once the lines read are delivered. Exit status: 0 ok, 1 no path could be opened (with
    the reason), 3 no tracker or no other member answered within --timeout, 4 no tracker can be sent to.
    """

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
        if not 0.2 <= keepalive <= 3600:
            raise UsageError("--keepalive must be in 0.2..3600 seconds")
        dead = dead_after if dead_after is not None else 3 * keepalive
        if not keepalive < dead <= 86400:
            raise UsageError("--dead-after must be longer than --keepalive")
        if bind is not None:
            try:
                parse_ip(bind)
            except ProtocolError:
                raise UsageError(f"bad --bind {bind[:50]!r}: want an IP address") from None
        identity = parse_identity(node_id)

        async def go() -> int:
            targets = await resolve_targets(settings)
            config = SessionConfig(
                group=group_key,
                trackers=tuple(targets),
                lan=parse_lan(lan, targets),
                identity=identity,
                timeout=timeout,
                keepalive=keepalive,
                dead_after=dead,
                tracker_timeout=settings.timeout,
                retries=settings.retries,
                once=once,
                relay=relay,
                tcp=tcp,
            )
            return await connect_session(config, _Renderer(json_out), port=port, bind=bind, read_stdin=not once)

        return int(run(go()))

    raise typer.Exit(run_edge(body))


class _Renderer:
    """Events to the terminal: chat lines on stdout, status on stderr; or, with --json,
    every event as one compact JSON object per line on stdout."""

    def __init__(self, json_out: bool) -> None:
        self.json_out = json_out
        self.t0 = time.monotonic()

    def __call__(self, event: ConnectEvent) -> None:
        fields = event_fields(event)
        if fields is None:
            return
        if self.json_out:
            out = {"event": fields.pop("event"), "t": round(time.monotonic() - self.t0, 3)}
            out.update(fields)
            sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")
            sys.stdout.flush()
            return
        if isinstance(event, MessageReceived):
            sys.stdout.write(f"<{fields['peer']}> {fields['text']}\n")
            sys.stdout.flush()
            return
        text = _human(fields)
        if text is not None and (verbosity() >= 0 or isinstance(event, GaveUp)):
            stderr.print(text, markup=False)


def event_fields(e: ConnectEvent) -> Optional[dict[str, Any]]:
    """An event as the JSON object --json prints (None: not shown)."""
    if isinstance(e, Registered):
        return {"event": "registered", "tracker": e.tracker.to_text(), "public": e.public.to_text(), "form": e.form}
    if isinstance(e, MemberSeen):
        return {"event": "member_seen", "member": e.member.to_text(), "lan": list(e.lan),
                "tracker": e.tracker.to_text()}
    if isinstance(e, PathUp):
        return {"event": "path_up", "peer": e.endpoint.to_text(), "peer_id": e.peer_id, "path": e.kind.value,
                "via": e.via, "rtt_ms": round(e.rtt * 1000, 3), "open_s": round(e.open_time, 3),
                "since_start_s": round(e.since_start, 3), "observed_as": e.observed_as}
    if isinstance(e, PathDown):
        return {"event": "path_down", "peer": e.endpoint.to_text() if e.endpoint else None, "peer_id": e.peer_id,
                "path": e.kind.value, "via": e.via, "reason": e.reason}
    if isinstance(e, MessageReceived):
        return {"event": "message", "peer": e.endpoint.to_text(), "peer_id": e.peer_id,
                "text": sanitize(e.data.decode("utf-8", "replace"))}
    if isinstance(e, GaveUp):
        out: dict[str, Any] = {"event": "gave_up", "member": e.member.to_text() if e.member else None,
                               "impossible": e.impossible, "reason": e.reason}
        if e.verdict is not None:
            v = e.verdict
            out["mapping"] = {"self": v.mine, "self_reason": v.mine_reason, "peer": v.theirs,
                              "peer_reason": v.theirs_reason}
        if e.tried is not None:
            out["tried_s"] = round(e.tried, 3)
        return out
    if isinstance(e, StreamWanted):
        return {"event": "tcp", "tracker": e.tracker.to_text(), "reason": e.reason}
    if isinstance(e, RelayAllocated):
        return {"event": "relay", "server": e.server.to_text(), "relayed": e.relayed.to_text()}
    if isinstance(e, RelayLost):
        return {"event": "relay_lost", "server": e.server.to_text() if e.server else None, "reason": e.reason}
    if isinstance(e, Queued):
        return {"event": "queued", "reason": "no path up yet: the line waits for the first peer"}
    if isinstance(e, Undelivered):
        out = {"event": "undelivered", "peer_id": e.peer_id, "reason": e.reason}
        if e.endpoint is not None:
            out["peer"] = e.endpoint.to_text()
        return out
    return None  # SessionEnded: the exit status says it


def sanitize(text: str) -> str:
    """A peer's line as it may reach a terminal: no control characters (no escape
    sequences that could rewrite the screen), tabs kept."""
    return "".join(ch if ch == "\t" or ch.isprintable() else "\ufffd" for ch in text.rstrip("\r\n"))


def _human(e: dict[str, Any]) -> Optional[str]:
    kind = e["event"]
    if kind == "registered":
        return f"registered at {e['tracker']}: public endpoint {e['public']}"
    if kind == "member_seen":
        lan = f" (LAN {', '.join(e['lan'])})" if e["lan"] else ""
        return f"member {e['member']}{lan}: punching"
    if kind == "path_up":
        via = {"lan": "LAN", "relay": "relay"}.get(e["via"], "Internet")
        return (f"path up to {e['peer']} via {via}: "
                f"rtt {e['rtt_ms']:.1f} ms, opened in {e['open_s']:.2f} s")
    if kind == "path_down":
        return f"path down to {e['peer']} via {e['via']} ({e['reason']}): trying again"
    if kind == "tcp":
        return f"{e['reason']}: trying TCP to {e['tracker']}"
    if kind == "relay":
        return f"relay at {e['server']}: relayed endpoint {e['relayed']}"
    if kind == "relay_lost" and e["server"] is not None:
        return f"relay lost: {e['reason']}"
    if kind == "gave_up":
        who = e.get("member") or "group"
        head = "impossible" if e.get("impossible") else "gave up"
        lines = [f"{head}: {who}: {e['reason']}"]
        mapping = e.get("mapping")
        if mapping:
            lines.append(f"  your mapping: {mapping['self'] or 'unknown'} ({mapping['self_reason']})")
            lines.append(f"  peer mapping: {mapping['peer'] or 'unknown'} ({mapping['peer_reason']})")
        return "\n".join(lines)
    if kind == "queued":
        return "no peer connected yet: the line will be sent when a path is up"
    if kind == "undelivered":
        return f"line not delivered to {e.get('peer') or 'anyone'}: {e['reason']}"
    return None


__all__ = ["connect", "event_fields", "sanitize"]
