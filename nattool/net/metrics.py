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
