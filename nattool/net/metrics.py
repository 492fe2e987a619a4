"""The Prometheus endpoint of `nattool serve --metrics`.

A custom collector reads a snapshot of the server's plain counters when scraped,
so the hot path pays nothing for metrics (no Counter.inc() per datagram).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from nattool.errors import NetworkError, UsageError
from nattool.store.base import StoreStats

DROP_REASONS = {
    "drop_rate_limit": "rate_limit",
    "malformed": "malformed",
    "drop_unknown": "unknown",
    "cut_amplification": "amplification_cut",
    "drop_overload": "overload",
}


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``PORT``, ``ADDR:PORT`` or ``[v6]:PORT``; loopback when no address is given."""
    text = text.strip()
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise UsageError(f"bad --metrics {text!r}: want PORT, ADDR:PORT or [IPv6]:PORT")
        host, port_text = text[1:close], text[close + 2 :]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise UsageError(f"bad --metrics {text!r}: want PORT, ADDR:PORT or [IPv6]:PORT") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"bad --metrics port {port}: want 1..65535")
    return host, port


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """What one scrape reports, read from the serving loop's state."""

    counters: dict[str, int]
    stats: StoreStats | None  # the store's latest figures, None before the first
    federation_peers: int  # verified trackers listed
    turn: dict[str, int] | None = None  # the TURN core's counters and "live"; None: TURN off
    tcp_connections: int | None = None  # open TCP connections; None: no TCP listener


# The TURN core's counters (TurnCounters fields) by metric and label.
TURN_LABELLED: dict[str, tuple[str, str, dict[str, str]]] = {
    "nattool_turn_relayed_packets": (
        "Datagrams relayed, by direction.", "direction", {"packets_to_peer": "to_peer", "packets_to_client": "to_client"},
    ),
    "nattool_turn_relayed_bytes": (
        "Payload bytes relayed, by direction.", "direction", {"bytes_to_peer": "to_peer", "bytes_to_client": "to_client"},
    ),
    "nattool_turn_auth_failures": (
        "TURN requests refused for their credentials: wrong or unknown (401), stale nonce (438).",
        "reason", {"auth_failures": "bad_credentials", "stale_nonces": "stale_nonce"},
    ),
    "nattool_turn_denials": (
        "Peers refused by the peer policy: CreatePermission/ChannelBind answered 403, packets dropped without a permission.",
        "reason", {"peer_denials": "forbidden_peer", "permission_drops": "no_permission"},
    ),
    "nattool_turn_refusals": (
        "TURN requests refused for limits: quota (486), capacity or ports (508), bad request (400, 420, 437, 440-443).",
        "reason", {"quota_refusals": "quota", "capacity_failures": "capacity", "bad_requests": "bad_request"},
    ),
}
TURN_PLAIN: dict[str, tuple[str, str]] = {
    "nattool_turn_allocations_created": ("TURN allocations made.", "allocations_total"),
    "nattool_turn_allocations_expired": ("TURN allocations that expired (not refreshed).", "allocations_expired"),
    "nattool_turn_challenges": ("TURN requests without credentials answered 401 with a nonce (the normal first step).", "challenges"),
    "nattool_turn_bandwidth_drops": ("Datagrams dropped by the per-allocation bandwidth cap.", "bandwidth_drops"),
}
TCP_EVENTS = {
    "tcp_accepted": "accepted",
    "tcp_refused": "refused_limit",
    "tcp_timeout": "timeout",
    "tcp_protocol_error": "protocol_error",
    "tcp_slow_reader": "slow_reader",
    "tcp_dropped_frames": "dropped_frame",
}


class _Collector:
    def __init__(self, read: Callable[[], MetricsSnapshot]) -> None:
        self.read = read

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snapshot = self.read()
        counters = snapshot.counters
        requests = CounterMetricFamily(
            "nattool_requests", "Requests handled, by kind and result.", labels=["kind", "result"]
        )
        register = counters.get("register", 0)
        refused = counters.get("register_refused", 0)
        store_failed = counters.get("register_store_error", 0)
        requests.add_metric(["register", "ok"], register - refused)
        requests.add_metric(["register", "refused"], max(0, refused - store_failed))
        requests.add_metric(["register", "store_error"], store_failed)
        requests.add_metric(["stun", "ok"], counters.get("stun", 0))
        requests.add_metric(["stun", "invalid"], counters.get("stun_drop", 0))
        for kind in ("nat", "trackers", "announce", "federation_reply"):
            requests.add_metric([kind, "ok"], counters.get(kind, 0))
        yield requests
        drops = CounterMetricFamily("nattool_drops", "Datagrams dropped or cut, by reason.", labels=["reason"])
        for key, reason in DROP_REASONS.items():
            drops.add_metric([reason], counters.get(key, 0))
        yield drops
        stats = snapshot.stats
        groups = GaugeMetricFamily("nattool_groups", "Groups with live members.")
        groups.add_metric([], stats.groups if stats else 0)
        yield groups
        members = GaugeMetricFamily("nattool_members", "Live members.")
        members.add_metric([], stats.members if stats else 0)
        yield members
        keepalives = CounterMetricFamily(
            "nattool_keepalives",
            "Registrations of known members from the same source, done in the store's keepalive lane "
            "(also counted in nattool_requests).",
        )
        keepalives.add_metric([], counters.get("register_keepalive", 0))
        yield keepalives
        waits = CounterMetricFamily(
            "nattool_coalesce_waits",
            "Waits after a drain for more datagrams, so that one wake-up answers a batch (--coalesce-us).",
        )
        waits.add_metric([], counters.get("coalesce_waits", 0))
        yield waits
        waited = CounterMetricFamily("nattool_coalesce_wait_seconds", "Seconds spent in those waits.")
        waited.add_metric([], counters.get("coalesce_wait_us", 0) / 1e6)
        yield waited
        batches = CounterMetricFamily("nattool_store_batches", "Registration batches written to the store.")
        batches.add_metric([], counters.get("store_batches", 0))
        yield batches
        seconds = CounterMetricFamily("nattool_store_seconds", "Time spent in store writes.")
        seconds.add_metric([], counters.get("store_seconds_x1e6", 0) / 1e6)
        yield seconds
        errors = CounterMetricFamily("nattool_store_errors", "Store failures (unreachable, timeout, refused).")
        errors.add_metric([], counters.get("store_error", 0))
        yield errors
        expired = CounterMetricFamily("nattool_expired_members", "Members removed by TTL expiry.")
        expired.add_metric([], counters.get("expired", 0))
        yield expired
        peers = GaugeMetricFamily("nattool_federation_peers", "Verified trackers listed.")
        peers.add_metric([], snapshot.federation_peers)
        yield peers
        if snapshot.turn is not None:
            yield from _turn_metrics(snapshot.turn)
        if snapshot.tcp_connections is not None:
            connections = GaugeMetricFamily("nattool_tcp_connections", "Open TCP connections on the tracker port.")
            connections.add_metric([], snapshot.tcp_connections)
            yield connections
            events = CounterMetricFamily("nattool_tcp_connection_events", "TCP connections by what happened to them.", labels=["event"])
            for key, event in TCP_EVENTS.items():
                events.add_metric([event], counters.get(key, 0))
            yield events


def _turn_metrics(turn: dict[str, int]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    live = GaugeMetricFamily("nattool_turn_allocations", "TURN allocations alive.")
    live.add_metric([], turn.get("live", 0))
    yield live
    for name, (text, key) in TURN_PLAIN.items():
        family = CounterMetricFamily(name, text)
        family.add_metric([], turn.get(key, 0))
        yield family
    for name, (text, label, keys) in TURN_LABELLED.items():
        family = CounterMetricFamily(name, text, labels=[label])
        for key, value in keys.items():
            family.add_metric([value], turn.get(key, 0))
        yield family


def start_metrics(read: Callable[[], MetricsSnapshot], host: str, port: int) -> Any:
    """Serve /metrics in a background thread, calling ``read`` per scrape; returns
    the HTTP server (call .shutdown())."""
    try:
        from prometheus_client import start_http_server
        from prometheus_client.core import CollectorRegistry
    except ImportError:
        raise UsageError("--metrics needs the prometheus-client package: pip install 'nattool[metrics]'") from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(read))  # type: ignore[arg-type]
    try:
        httpd, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise NetworkError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return httpd
