"""`nattool serve`: run a tracker."""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Annotated, Optional

import typer

from nattool.cli.output import run_edge
from nattool.errors import ProtocolError, UsageError
from nattool.exit_codes import ExitCode
from nattool.protocol.endpoint import DEFAULT_PORT, Endpoint
from nattool.store.base import StoreLimits

LOG_LEVELS = ("debug", "info", "warning", "error")


def serve(
    host: Annotated[Optional[list[str]], typer.Option("--host", help="Address to listen on (repeatable). Default: every interface, IPv4 and IPv6.", show_default=False)] = None,
    port: Annotated[int, typer.Option("--port", "-p", help="UDP port of the tracker (text protocol and STUN).")] = DEFAULT_PORT,
    ttl: Annotated[float, typer.Option("--ttl", help="Seconds a member stays listed without re-registering.")] = 120.0,
    rate_limit: Annotated[float, typer.Option("--rate-limit", help="Requests per second allowed per source (IPv4 address or IPv6 /64); 0 turns the limit off.")] = 50.0,
    burst: Annotated[Optional[float], typer.Option("--burst", help="Requests a source may send at once before the rate applies [default: 2 x rate].", show_default=False)] = None,
    store: Annotated[str, typer.Option("--store", help="State store: memory, sqlite:PATH ('sqlite:' = default path), redis://HOST:PORT/DB.")] = "sqlite:",
    alt_host: Annotated[Optional[str], typer.Option("--alt-host", help="Second address for RFC 5780 STUN (CHANGE-REQUEST change-IP).", show_default=False)] = None,
    alt_port: Annotated[Optional[int], typer.Option("--alt-port", help="Second port for RFC 5780 STUN (CHANGE-REQUEST change-port).", show_default=False)] = None,
    no_stun: Annotated[bool, typer.Option("--no-stun", help="Do not answer STUN on the tracker port.")] = False,
    public: Annotated[Optional[str], typer.Option("--public", help="IP:PORT this tracker announces to others. Default: learned from a joined tracker.", show_default=False)] = None,
    join: Annotated[Optional[list[str]], typer.Option("--join", help="Tracker IP:PORT to announce to and learn trackers from (repeatable).", show_default=False)] = None,
    tracker_ttl: Annotated[float, typer.Option("--tracker-ttl", help="Seconds a verified tracker stays listed without being verified again.")] = 300.0,
    announce_interval: Annotated[float, typer.Option("--announce-interval", help="Seconds between announcements to joined trackers.")] = 60.0,
    max_members: Annotated[int, typer.Option("--max-members", help="Live members in the whole tracker.")] = 1_000_000,
    max_group_members: Annotated[int, typer.Option("--max-group-members", help="Members per group (the least recently seen is evicted).")] = 1024,
    max_groups_per_source: Annotated[int, typer.Option("--max-groups-per-source", help="Groups one source may be a member of.")] = 64,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Run a tracker: answer //nat, registrations, tracker lists and STUN on one UDP port."""

    def body() -> int:
        from nattool.net.eventloop import run as run_loop
        from nattool.net.server import ServerConfig, serve as serve_forever
        from nattool.store.factory import open_store

        level = log_level.lower()
        if level not in LOG_LEVELS:
            raise UsageError(f"bad --log-level {log_level!r}: use one of {', '.join(LOG_LEVELS)}")
        _setup_logging(level)
        config = ServerConfig(
            hosts=tuple(_check_host(h, "--host") for h in host or ()),
            port=_check_port(port, "--port"),
            ttl=_check_range(ttl, 1, 86400, "--ttl"),
            rate_limit=_check_range(rate_limit, 0, 1e9, "--rate-limit"),
            burst=_check_range(burst, 1, 1e9, "--burst") if burst is not None else None,
            store=store,
            alt_host=_check_host(alt_host, "--alt-host") if alt_host else None,
            alt_port=_check_port(alt_port, "--alt-port") if alt_port is not None else None,
            public=_endpoint(public, "--public") if public else None,
            joins=tuple(_endpoint(j, "--join") for j in join or ()),
            tracker_ttl=_check_range(tracker_ttl, 1, 86400 * 7, "--tracker-ttl"),
            announce_interval=_check_range(announce_interval, 0.1, 86400, "--announce-interval"),
            limits=StoreLimits(
                ttl=ttl,
                max_members=int(_check_range(max_members, 1, 100_000_000, "--max-members")),
                max_members_per_group=int(_check_range(max_group_members, 1, 1_000_000, "--max-group-members")),
                max_groups_per_source=int(_check_range(max_groups_per_source, 1, 1_000_000, "--max-groups-per-source")),
            ),
        )
        if config.alt_port is not None and config.alt_port == config.port:
            raise UsageError("--alt-port must differ from --port")
        state = open_store(config.store, config.limits)

        def ready(line: str) -> None:
            print(line, flush=True)

        counters = run_loop(serve_forever(config, state, stun=not no_stun, on_ready=ready))
        logging.getLogger("nattool.serve").info(
            "event=stopped %s", " ".join(f"{k}={v}" for k, v in sorted(counters.items()))
        )
        return int(ExitCode.OK)

    raise typer.Exit(run_edge(body))


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        return f"ts={stamp} level={record.levelname.lower()} {record.getMessage()}"


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root = logging.getLogger("nattool")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _check_host(text: str, flag: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise UsageError(f"bad {flag} {text[:60]!r}: want an IPv4 or IPv6 address") from None


def _check_port(value: int, flag: str) -> int:
    if not 0 <= value <= 65535:
        raise UsageError(f"bad {flag} {value}: want 0..65535")
    return value


def _check_range(value: float, low: float, high: float, flag: str) -> float:
    if not low <= value <= high:
        raise UsageError(f"bad {flag} {value:g}: want {low:g}..{high:g}")
    return value


def _endpoint(text: str, flag: str) -> Endpoint:
    try:
        return Endpoint.from_text(text)
    except ProtocolError:
        raise UsageError(f"bad {flag} {text[:60]!r}: want IP:PORT or [IPv6]:PORT") from None
