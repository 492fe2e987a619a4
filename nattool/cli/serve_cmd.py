"""`nattool serve`: run a tracker."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from nattool.cli.options import ConfigOpt
from nattool.errors import ConfigError, ProtocolError, UsageError
from nattool.exit_codes import ExitCode
from nattool.logs import LOG_LEVELS, setup_logging
from nattool.protocol.endpoint import DEFAULT_PORT, Endpoint

if TYPE_CHECKING:
    from nattool.net.server import ServerConfig
    from nattool.protocol.peer_policy import Network
    from nattool.protocol.turn_server import TurnConfig


def serve(
    host: Annotated[Optional[list[str]], typer.Option("--host", metavar="ADDR", help="Address to listen on (repeatable). [default: every interface, IPv4 and IPv6]", show_default=False)] = None,
    port: Annotated[Optional[int], typer.Option("--port", "-p", metavar="PORT", help=f"UDP port of the tracker (text protocol and STUN). [default: {DEFAULT_PORT}]", show_default=False)] = None,
    ttl: Annotated[Optional[float], typer.Option("--ttl", metavar="SECONDS", help="Seconds a member stays listed without re-registering. [default: 120]", show_default=False)] = None,
    rate_limit: Annotated[Optional[float], typer.Option("--rate-limit", metavar="RATE", help="Requests per second allowed per source (IPv4 address or IPv6 /64); 0 turns the limit off. [default: 50]", show_default=False)] = None,
    burst: Annotated[Optional[float], typer.Option("--burst", metavar="N", help="Requests a source may send at once before the rate applies. [default: 2 x rate]", show_default=False)] = None,
    store: Annotated[Optional[str], typer.Option("--store", metavar="STORE", help="State store: memory, sqlite:PATH ('sqlite:' = the default path), redis://HOST:PORT/DB. [default: sqlite:]", show_default=False)] = None,
    alt_host: Annotated[Optional[str], typer.Option("--alt-host", metavar="ADDR", help="Second address for RFC 5780 STUN (CHANGE-REQUEST change-IP).", show_default=False)] = None,
    alt_port: Annotated[Optional[int], typer.Option("--alt-port", metavar="PORT", help="Second port for RFC 5780 STUN (CHANGE-REQUEST change-port).", show_default=False)] = None,
    no_stun: Annotated[Optional[bool], typer.Option("--no-stun", help="Do not answer STUN on the tracker port.", show_default=False)] = None,
    public: Annotated[Optional[str], typer.Option("--public", metavar="IP:PORT", help="Endpoint this tracker announces to others. [default: learned from a joined tracker]", show_default=False)] = None,
    join: Annotated[Optional[list[str]], typer.Option("--join", metavar="IP:PORT", help="Tracker to announce to and learn trackers from (repeatable).", show_default=False)] = None,
    tracker_ttl: Annotated[Optional[float], typer.Option("--tracker-ttl", metavar="SECONDS", help="Seconds a verified tracker stays listed without being verified again. [default: 300]", show_default=False)] = None,
    announce_interval: Annotated[Optional[float], typer.Option("--announce-interval", metavar="SECONDS", help="Seconds between announcements to joined trackers. [default: 60]", show_default=False)] = None,
    max_members: Annotated[Optional[int], typer.Option("--max-members", metavar="N", help="Live members in the whole tracker. [default: 1000000]", show_default=False)] = None,
    max_group_members: Annotated[Optional[int], typer.Option("--max-group-members", metavar="N", help="Members per group; the least recently seen is evicted. [default: 1024]", show_default=False)] = None,
    max_groups_per_source: Annotated[Optional[int], typer.Option("--max-groups-per-source", metavar="N", help="Groups one source may be a member of. [default: 64]", show_default=False)] = None,
    metrics: Annotated[Optional[str], typer.Option("--metrics", metavar="ADDR:PORT", help="Serve Prometheus metrics over HTTP at ADDR:PORT (loopback when only PORT is given). Off by default.", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", metavar="N", help="Processes sharing the port (SO_REUSEPORT); N > 1 needs a store they share: sqlite (the default) or redis, not memory. [default: 1]", show_default=False)] = None,
    coalesce_us: Annotated[Optional[int], typer.Option("--coalesce-us", metavar="US", help="At most this many microseconds a busy server waits after a batch of requests, so that the next ones are answered together (fewer wake-ups: less CPU per request, at the price of that much latency); never when idle or at low rates; 0 turns it off. [default: 400]", show_default=False)] = None,
    tcp: Annotated[Optional[bool], typer.Option("--tcp/--no-tcp", help="Listen on TCP on the tracker port too (text requests, STUN and TURN in frames). [default: on with TURN or --relay]", show_default=False)] = None,
    relay: Annotated[Optional[bool], typer.Option("--relay", help="Relay (TURN) for the members of a group: //relay/GROUP hands out short-lived credentials that reach only that group's relayed addresses. Needs --workers 1.", show_default=False)] = None,
    turn_user: Annotated[Optional[list[str]], typer.Option("--turn-user", metavar="NAME:PASSWORD", help="TURN long-term credentials (repeatable); turns the TURN relay on.", show_default=False)] = None,
    turn_secret: Annotated[Optional[str], typer.Option("--turn-secret", metavar="SECRET", help="TURN REST API secret: username EXPIRY:NAME, password base64(HMAC-SHA1(SECRET, username)); turns the TURN relay on. Env: NATTOOL_TURN_SECRET.", show_default=False)] = None,
    realm: Annotated[Optional[str], typer.Option("--realm", metavar="REALM", help="TURN realm. [default: nattool]", show_default=False)] = None,
    relay_ip: Annotated[Optional[list[str]], typer.Option("--relay-ip", metavar="ADDR", help="Address of the relayed sockets, one per family (repeatable). [default: the --host of that family, else the source address of the default route]", show_default=False)] = None,
    relay_ports: Annotated[Optional[str], typer.Option("--relay-ports", metavar="LOW-HIGH", help="UDP ports of relayed addresses. [default: 49152-65535]", show_default=False)] = None,
    allow_peer: Annotated[Optional[list[str]], typer.Option("--allow-peer", metavar="CIDR", help="Peers the relay may reach although the default policy denies them (loopback, private, link-local ...) (repeatable).", show_default=False)] = None,
    deny_peer: Annotated[Optional[list[str]], typer.Option("--deny-peer", metavar="CIDR", help="Peers the relay may not reach, in addition to the default policy (repeatable).", show_default=False)] = None,
    max_allocations: Annotated[Optional[int], typer.Option("--max-allocations", metavar="N", help="TURN allocations in the whole server. [default: 1000]", show_default=False)] = None,
    user_quota: Annotated[Optional[int], typer.Option("--user-quota", metavar="N", help="TURN allocations per username. [default: 10]", show_default=False)] = None,
    source_quota: Annotated[Optional[int], typer.Option("--source-quota", metavar="N", help="TURN allocations per client IP address. [default: 10]", show_default=False)] = None,
    relay_bandwidth: Annotated[Optional[float], typer.Option("--relay-bandwidth", metavar="BYTES", help="Bytes per second relayed per allocation, each way; 0 = unlimited. [default: 1000000]", show_default=False)] = None,
    log_level: Annotated[Optional[str], typer.Option("--log-level", metavar="LEVEL", help=f"{', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}. [default: info]", show_default=False)] = None,
    config: ConfigOpt = None,
    print_unit: Annotated[bool, typer.Option("--print-unit", help="Print a hardened systemd unit that runs this nattool with the other flags given, and exit.")] = False,
) -> None:
    """Run a tracker: answer //nat, registrations, tracker lists and STUN on one UDP port
    (and TCP on the same port number); optionally a TURN relay.

    Every option can also be set in the [serve] table of the config file; flags win.
    """
    flags = {
        "serve.host": host, "serve.port": port, "serve.ttl": ttl, "serve.rate_limit": rate_limit,
        "serve.burst": burst, "serve.store": store, "serve.alt_host": alt_host, "serve.alt_port": alt_port,
        "serve.no_stun": no_stun, "serve.public": public, "serve.join": join, "serve.tracker_ttl": tracker_ttl,
        "serve.announce_interval": announce_interval, "serve.max_members": max_members,
        "serve.max_group_members": max_group_members, "serve.max_groups_per_source": max_groups_per_source,
        "serve.metrics": metrics, "serve.workers": workers, "serve.coalesce_us": coalesce_us, "serve.log_level": log_level,
        "serve.tcp": tcp, "serve.relay": relay, "serve.turn_user": turn_user, "serve.turn_secret": turn_secret,
        "serve.realm": realm, "serve.relay_ip": relay_ip, "serve.relay_ports": relay_ports,
        "serve.allow_peer": allow_peer, "serve.deny_peer": deny_peer, "serve.max_allocations": max_allocations,
        "serve.user_quota": user_quota, "serve.source_quota": source_quota, "serve.relay_bandwidth": relay_bandwidth,
    }
    from nattool.cli.output import run_edge

    if print_unit:
        raise typer.Exit(run_edge(lambda: _print_unit(flags, config)))
    raise typer.Exit(run_edge(lambda: _serve(flags, config)))


def build_server_config(opts: dict[str, Any]) -> "ServerConfig":
    """Validated ServerConfig from effective settings (flags > env > file > defaults)."""
    from nattool.net.metrics import parse_metrics_address
    from nattool.net.server import ServerConfig
    from nattool.store.base import StoreLimits

    ttl = _check_range(float(opts["ttl"]), 1, 86400, "--ttl")
    config = ServerConfig(
        hosts=tuple(_check_host(h, "--host") for h in opts["host"] or ()),
        port=_check_port(int(opts["port"]), "--port"),
        ttl=ttl,
        rate_limit=_check_range(float(opts["rate_limit"]), 0, 1e9, "--rate-limit"),
        burst=_check_range(float(opts["burst"]), 1, 1e9, "--burst") if opts["burst"] is not None else None,
        store=str(opts["store"]),
        alt_host=_check_host(opts["alt_host"], "--alt-host") if opts["alt_host"] else None,
        alt_port=_check_port(int(opts["alt_port"]), "--alt-port") if opts["alt_port"] is not None else None,
        public=_endpoint(opts["public"], "--public") if opts["public"] else None,
        joins=tuple(_endpoint(j, "--join") for j in opts["join"] or ()),
        tracker_ttl=_check_range(float(opts["tracker_ttl"]), 1, 86400 * 7, "--tracker-ttl"),
        announce_interval=_check_range(float(opts["announce_interval"]), 0.1, 86400, "--announce-interval"),
        metrics=parse_metrics_address(str(opts["metrics"])) if opts["metrics"] else None,
        coalesce_us=_check_range(int(opts["coalesce_us"]), 0, 10_000, "--coalesce-us"),
        limits=StoreLimits(
            ttl=ttl,
            max_members=int(_check_range(int(opts["max_members"]), 1, 100_000_000, "--max-members")),
            max_members_per_group=int(_check_range(int(opts["max_group_members"]), 1, 1_000_000, "--max-group-members")),
            max_groups_per_source=int(_check_range(int(opts["max_groups_per_source"]), 1, 1_000_000, "--max-groups-per-source")),
        ),
    )
    if config.alt_port is not None and config.alt_port == config.port:
        raise UsageError("--alt-port must differ from --port")
    turn = build_turn_config(opts)
    # Checked even with the relay off: a bad value is an error, not a silent no-op.
    relay_ips = tuple(_relay_ip(text) for text in opts["relay_ip"] or ())
    if len({ip.version for ip in relay_ips}) < len(relay_ips):
        raise UsageError("--relay-ip: at most one address per family (IPv4, IPv6)")
    relay_ports = _port_range(str(opts["relay_ports"]))
    if turn.enabled:
        if int(opts["workers"] or 1) > 1:
            raise ConfigError("the TURN relay (--relay, --turn-user, --turn-secret) needs --workers 1: allocations live in one process")
        config.turn = turn
        config.relay_ips = relay_ips
        config.relay_ports = relay_ports
    config.tcp = bool(opts["tcp"]) if opts["tcp"] is not None else turn.enabled
    return config


def build_turn_config(opts: dict[str, Any]) -> "TurnConfig":
    """The TURN relay's settings, checked (the relay is on when ``.enabled``)."""
    from nattool.protocol.peer_policy import PeerPolicy
    from nattool.protocol.text import valid_realm
    from nattool.protocol.turn_server import TurnConfig

    realm = str(opts["realm"])
    if not valid_realm(realm):
        raise UsageError(f"bad --realm {realm[:60]!r}: want 1..127 printable ASCII characters, no spaces")
    users: dict[str, str] = {}
    for text in opts["turn_user"] or ():
        name, sep, password = text.partition(":")
        if not sep or not name or not password:
            raise UsageError("bad --turn-user: want NAME:PASSWORD, both non-empty")
        if name in users:
            raise UsageError(f"bad --turn-user: {name[:40]!r} is given twice")
        users[name] = password
    return TurnConfig(
        realm=realm,
        users=users,
        rest_secret=opts["turn_secret"],
        relay_groups=bool(opts["relay"]),
        max_allocations=int(_check_range(int(opts["max_allocations"]), 1, 1_000_000, "--max-allocations")),
        user_quota=int(_check_range(int(opts["user_quota"]), 1, 1_000_000, "--user-quota")),
        source_quota=int(_check_range(int(opts["source_quota"]), 1, 1_000_000, "--source-quota")),
        bandwidth=int(_check_range(float(opts["relay_bandwidth"]), 0, 1e12, "--relay-bandwidth")),
        peer_policy=PeerPolicy(
            allow=tuple(_cidr(text, "--allow-peer") for text in opts["allow_peer"] or ()),
            deny=tuple(_cidr(text, "--deny-peer") for text in opts["deny_peer"] or ()),
        ),
    )


def _relay_ip(text: str) -> "ipaddress.IPv4Address | ipaddress.IPv6Address":
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise UsageError(f"bad --relay-ip {text[:60]!r}: want an IPv4 or IPv6 address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise UsageError(f"bad --relay-ip {text[:60]!r}: want a concrete unicast address")
    return ip


def _port_range(text: str) -> tuple[int, int]:
    low_text, sep, high_text = text.strip().partition("-")
    if sep and low_text.isdigit() and high_text.isdigit() and len(low_text) <= 5 and len(high_text) <= 5:
        low, high = int(low_text), int(high_text)
        if 1 <= low <= high <= 65535:
            return low, high
    raise UsageError(f"bad --relay-ports {text[:60]!r}: want LOW-HIGH with 1 <= LOW <= HIGH <= 65535")


def _cidr(text: str, flag: str) -> "Network":
    from nattool.protocol.peer_policy import parse_cidr

    try:
        return parse_cidr(text)
    except UsageError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _serve(flags: dict[str, Any], config_path: str | None) -> int:
    from nattool.config import load_settings
    from nattool.net.eventloop import run as run_loop
    from nattool.net.server import serve as serve_forever
    from nattool.store.factory import open_store

    opts = load_settings(flags, config_path=config_path, environ=os.environ).serve()
    level = str(opts["log_level"])  # one of LOG_LEVELS: the settings checked it
    setup_logging(level)
    config = build_server_config(opts)
    workers = int(opts["workers"] or 1)

    def ready(line: str) -> None:
        print(line, flush=True)

    stopped_by: list[signal.Signals] = []
    if workers > 1:
        from nattool.net.workers import run_workers

        # Open (create, migrate, check) the store once here, so that the workers never
        # race to create it and a bad store fails once, with one message.
        probe_store = open_store(config.store, config.limits, shared=True)

        async def check() -> None:
            await probe_store.open()
            await probe_store.close()

        run_loop(check())
        died = run_workers(config, not opts["no_stun"], workers, level, ready, on_signal=stopped_by.append)
        if died:
            return died
    else:
        state = open_store(config.store, config.limits)
        counters = run_loop(
            serve_forever(config, state, stun=not opts["no_stun"], on_ready=ready, on_signal=stopped_by.append)
        )
        logging.getLogger("nattool.serve").info(
            "event=stopped %s", " ".join(f"{k}={v}" for k, v in sorted(counters.items()))
        )
    return int(_exit_code_after(stopped_by[0] if stopped_by else None))


def _exit_code_after(stop_signal: signal.Signals | None) -> ExitCode:
    """Ctrl-C (SIGINT) is an interruption, 130 as for every command; SIGTERM is how
    systemd stops a service, a clean 0."""
    return ExitCode.INTERRUPTED if stop_signal == signal.SIGINT else ExitCode.OK


def _print_unit(flags: dict[str, Any], config_path: str | None) -> int:
    from rich.markup import escape

    from nattool.cli.output import info
    from nattool.cli.systemd_unit import HIDDEN_BY_PROTECT_HOME, hidden_paths, unit_text
    from nattool.config import load_settings

    # Check the flags (and the named config file) as serve would, so that a bad value
    # is refused now, not when systemd starts the unit; the environment is not the
    # service's, so it is left out.
    build_server_config(load_settings(flags, config_path=config_path or os.devnull, environ={}).serve())
    print(unit_text(flags, config_path), end="")
    for path in hidden_paths(flags, config_path):
        info(escape(f"note: the service cannot reach {path} (the unit's ProtectHome=yes hides "
                    f"{', '.join(HIDDEN_BY_PROTECT_HOME)}): move it elsewhere, nattool e.g. to /usr/local/bin"))
    secrets = [flag for flag, key in (("--turn-user", "serve.turn_user"), ("--turn-secret", "serve.turn_secret")) if flags.get(key)]
    if secrets:
        info(escape(f"note: {' and '.join(secrets)} in ExecStart can be read by every local user (ps, systemctl cat): "
                    "put them in a config file of mode 0600 ([serve] turn_user, turn_secret) or NATTOOL_TURN_SECRET instead"))
    return int(ExitCode.OK)


def _check_host(text: str, flag: str) -> str:
    """An address to listen on: IPv4, or IPv6 bare or in the brackets clients write."""
    bracketed = text.startswith("[") and text.endswith("]")
    try:
        ip = ipaddress.ip_address(text[1:-1] if bracketed else text)
    except ValueError:
        ip = None
    if ip is not None and (ip.version == 6 or not bracketed):
        return str(ip)
    try:
        Endpoint.from_text(text)
        hint = f" (the port goes in {flag.replace('host', 'port')})"
    except ProtocolError:
        hint = ""
    raise UsageError(f"bad {flag} {text[:60]!r}: want an IPv4 or IPv6 address such as 0.0.0.0, :: or [::1]{hint}")


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
