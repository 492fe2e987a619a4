"""`nattool bench`: UDP load against a tracker or any STUN server, like dnsperf/resperf.

:func:`run_bench` splits one :class:`BenchConfig` over ``processes`` generator
processes (each runs :mod:`nattool.diag.bench_engine`), merges their counters and
histograms and returns a :class:`BenchReport`. :func:`run_ramp` steps an open-loop
rate up until the loss passes a threshold and reports the highest rate that held.
"""

from __future__ import annotations

import ipaddress
import math
import multiprocessing
import os
import queue
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from nattool.diag.bench_engine import (
    KIND_NAT,
    KIND_REGISTER,
    KIND_STUN,
    KIND_TRACKERS,
    EnginePlan,
    EngineResult,
    Progress,
    run_engine,
    rx_timestamps_supported,
)
from nattool.config import KEYS
from nattool.diag.histogram import Histogram
from nattool.errors import UsageError
from nattool.protocol.endpoint import Endpoint

# Bounds that keep every run finite whatever the flags say.
MAX_DURATION = 3600.0
MAX_RATE = 10_000_000.0
MAX_SOCKETS = 8192  # per process; the file descriptor limit is the other bound
MAX_PROCESSES = 64
MAX_REQUESTS_PER_SECOND_BOUND = 2_000_000  # requests per process per second of run, at most
GENERATOR_CPU_LIMIT = 0.9  # fraction of one core: above this the generator is the bottleneck
GENERATOR_WAIT_LIMIT = 0.1  # fraction of the run spent runnable without a core: the machine is busy
HIGH_LOSS = 0.05
# Above this share of an open loop's requests sent late, in bursts, its highest
# latencies may be the server's answer to the generator's bursts.
BURSTY_SHARE = 0.01
# Answers per source address per second at or below which a per-source rate limit of
# the server may explain a high loss (20 times the tracker's default limit).
RATE_LIMITED_PER_SOURCE = 20 * float(KEYS["serve.rate_limit"].default)
_MIX_KINDS = {"nat": KIND_NAT, "register": KIND_REGISTER, "trackers": KIND_TRACKERS, "stun": KIND_STUN}


@dataclass(frozen=True, slots=True)
class BenchConfig:
    target: Endpoint
    mix: tuple[tuple[str, int], ...] = (("nat", 1),)  # or (("stun", 1),)
    groups: int = 1000
    members: int = 10_000
    sockets: int = 256  # per process
    window: Optional[int] = 128  # closed loop (total over all processes)
    rate: Optional[float] = None  # open loop, requests/s (total)
    duration: float = 10.0
    warmup: float = 1.0
    timeout: float = 1.0
    processes: int = 1
    seed: int = 1
    spread_sources: bool = True  # IPv4 loopback: one source address per socket
    spin: bool = False  # busy-poll for replies (see bench_engine); CPU then reads ~100%

    def describe_workload(self) -> str:
        return ",".join(f"{name}={weight}" for name, weight in self.mix)


@dataclass(frozen=True, slots=True)
class GeneratorLoad:
    """One generator process over the measured window, each a fraction of its wall time."""

    cpu: float  # process CPU time (user + system): 1.0 is one whole core
    busy: float  # the same less busy-polling with nothing to do (--spin)
    waiting: float  # runnable but without a core (other processes had them)

    @classmethod
    def of(cls, r: EngineResult) -> "GeneratorLoad":
        if not r.elapsed:
            return cls(0.0, 0.0, 0.0)
        cpu = (r.cpu_user + r.cpu_system) / r.elapsed
        return cls(cpu, max(0.0, cpu - r.idle / r.elapsed), r.runqueue_wait / r.elapsed)


@dataclass(slots=True)
class BenchReport:
    config: BenchConfig
    result: EngineResult
    loads: list[GeneratorLoad] = field(default_factory=list)  # one per process

    # -- derived figures ---------------------------------------------------------
    @property
    def loss_ratio(self) -> float:
        r = self.result
        return r.lost / r.sent if r.sent else 0.0

    @property
    def achieved_rate(self) -> float:
        r = self.result
        return r.answered / r.elapsed if r.elapsed else 0.0

    @property
    def offered_rate(self) -> float:
        r = self.result
        return r.sent / r.elapsed if r.elapsed else 0.0

    @property
    def processes_cpu(self) -> list[float]:
        return [load.cpu for load in self.loads]

    @property
    def generator_limited(self) -> Optional[str]:
        """Why the generator, not the server, was the limit (None when it was not)."""
        r = self.result
        busiest = max(self.loads, key=lambda load: load.busy, default=GeneratorLoad(0.0, 0.0, 0.0))
        if busiest.busy >= GENERATOR_CPU_LIMIT:
            spin = f" ({busiest.cpu * 100:.0f}% with --spin's polling)" if self.config.spin else ""
            return f"generator busy {busiest.busy * 100:.0f}% of one core{spin} (>= {GENERATOR_CPU_LIMIT * 100:.0f}%)"
        waiting = max((load.waiting for load in self.loads), default=0.0)
        # A closed loop answers each reply with the next request: the generator's waits for
        # a core are requests not made. The open loop's are seen as skipped sends (below).
        if not self.config.rate and waiting >= GENERATOR_WAIT_LIMIT:
            return f"the generator waited for a CPU core {waiting:.0%} of the run (the machine is busy)"
        if self.config.rate and r.sent and r.skipped > 0.02 * (r.sent + r.skipped):
            return f"generator could not keep the schedule ({r.skipped} sends skipped; more --sockets or --processes)"
        if r.send_errors > 0.01 * max(1, r.sent):
            return f"socket send buffers full ({r.send_errors} sends failed)"
        return None

    @property
    def bursty(self) -> bool:
        """Whether the open loop sent enough requests late, in bursts, to make the tail."""
        r = self.result
        return r.late > BURSTY_SHARE * max(1, r.sent)

    @property
    def source_addresses(self) -> int:
        """Distinct source addresses the requests came from, as the server sees them."""
        c = self.config
        return len({ip for p in range(c.processes) for ip in _source_ips(c, p)}) or 1

    @property
    def unanswered_ratio(self) -> float:
        """Requests due that got no valid answer: the lost, and in the open loop also the
        ones skipped because every socket still waited for an answer."""
        r = self.result
        due = r.sent + r.skipped
        return 1.0 - r.answered / due if due else 0.0

    @property
    def rate_limit_hint(self) -> Optional[str]:
        """A likely cause of a high loss: the tracker's per-source rate limit."""
        unanswered = self.unanswered_ratio
        if unanswered < HIGH_LOSS or not self.result.answered:
            return None
        sources = self.source_addresses
        if self.achieved_rate / sources > RATE_LIMITED_PER_SOURCE:
            return None
        default = float(KEYS["serve.rate_limit"].default)
        return (
            f"high loss ({unanswered:.0%} unanswered) from {sources} source address{'es' if sources > 1 else ''}: "
            f"a tracker limits each source address (serve --rate-limit, default {default:g}/s); "
            "for a load test run it with --rate-limit 0"
        )

    def to_json(self) -> dict[str, Any]:
        c = self.config
        r = self.result
        s = r.histogram.summary()

        def ms(ns: float) -> float:
            return round(ns / 1e6, 4)

        return {
            "target": c.target.to_text(),
            "workload": c.describe_workload(),
            "mode": "open" if c.rate else "closed",
            "window": c.window if not c.rate else None,
            "rate": c.rate,
            "duration": c.duration,
            "warmup": c.warmup,
            "timeout": c.timeout,
            "processes": c.processes,
            "sockets": c.sockets * c.processes,
            "spin": c.spin,
            "sent": r.sent,
            "answered": r.answered,
            "lost": r.lost,
            "invalid": r.invalid,
            "send_errors": r.send_errors,
            "skipped": r.skipped,
            "late": r.late,
            "loss_ratio": round(self.loss_ratio, 6),
            "elapsed": round(r.elapsed, 4),
            "offered_rate": round(self.offered_rate, 1),
            "achieved_rate": round(self.achieved_rate, 1),
            "latency_ms": {
                "min": ms(s.min),
                "p50": ms(s.p50),
                "p90": ms(s.p90),
                "p99": ms(s.p99),
                "p99.9": ms(s.p999),
                "max": ms(s.max),
                "mean": ms(s.mean),
                "relative_error": r.histogram.relative_error,
                "clock": r.latency_clock,
            },
            "invalid_reasons": dict(r.invalid_reasons),
            "by_kind": r.by_kind,
            "generator": {
                "cpu_user": round(r.cpu_user, 3),
                "cpu_system": round(r.cpu_system, 3),
                "idle_spin": round(r.idle, 3),
                "cpu_per_process": [round(load.cpu, 3) for load in self.loads],
                "busy_per_process": [round(load.busy, 3) for load in self.loads],
                "runqueue_wait_per_process": [round(load.waiting, 3) for load in self.loads],
                "limited": self.generator_limited is not None,
                "limit_reason": self.generator_limited,
                "bursty": self.bursty,
            },
            "hints": [hint for hint in (self.rate_limit_hint,) if hint is not None],
        }


@dataclass(slots=True)
class RampResult:
    max_loss: float
    steps: list[BenchReport]
    best: Optional[BenchReport]
    stopped_because: str

    def to_json(self) -> dict[str, Any]:
        return {
            "max_loss": self.max_loss,
            "best_rate": round(self.best.achieved_rate, 1) if self.best else None,
            "best_offered_rate": self.best.config.rate if self.best else None,
            "stopped_because": self.stopped_because,
            "steps": [
                {
                    "rate": s.config.rate,
                    "achieved_rate": round(s.achieved_rate, 1),
                    "loss_ratio": round(s.loss_ratio, 6),
                    "invalid": s.result.invalid,
                    "p99_ms": round(s.result.histogram.percentile(99) / 1e6, 4),
                    "generator_limited": s.generator_limited,
                }
                for s in self.steps
            ],
            "best": self.best.to_json() if self.best else None,
            "hints": [hint for hint in (self.rate_limit_hint,) if hint is not None],
        }

    @property
    def rate_limit_hint(self) -> Optional[str]:
        """The last step's: the one whose loss stopped the ramp."""
        return self.steps[-1].rate_limit_hint if self.steps else None


# -- configuration ------------------------------------------------------------------


def parse_target(text: str) -> Endpoint:
    """``IP:PORT``, ``[IPv6]:PORT`` or ``localhost:PORT``. No name resolution: a load
    generator must hit exactly the address its operator typed."""
    if not text:
        raise UsageError("bench needs an explicit TARGET (IP:PORT)")
    host, sep, port = text.rpartition(":")
    if sep and host == "localhost":
        text = f"127.0.0.1:{port}"
    try:
        ep = Endpoint.from_text(text)
    except Exception:  # noqa: BLE001 - Endpoint raises ProtocolError; reworded for the CLI
        raise UsageError(f"bad TARGET {text[:60]!r}: want IP:PORT or [IPv6]:PORT") from None
    if ep.ip.is_unspecified or ep.ip.is_multicast:
        raise UsageError(f"bad TARGET {text[:60]!r}: not a unicast address")
    return ep


def parse_mix(text: str) -> tuple[tuple[str, int], ...]:
    """``nat=1,register=3,trackers=0`` -> (("nat", 1), ("register", 3))."""
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, weight = part.partition("=")
        name = name.strip().lower()
        if name not in _MIX_KINDS:
            raise UsageError(f"bad --mix part {part!r}: kinds are {', '.join(_MIX_KINDS)}")
        if name in seen:
            raise UsageError(f"--mix names {name!r} twice")
        seen.add(name)
        w = weight.strip() if sep else "1"
        if not w.isdigit() or int(w) > 1000:
            raise UsageError(f"bad --mix weight {part!r}: want an integer 0..1000")
        if int(w):
            out.append((name, int(w)))
    if not out:
        raise UsageError("--mix gives every kind weight 0")
    return tuple(out)


def _kinds(mix: tuple[tuple[str, int], ...]) -> tuple[int, ...]:
    """One cycle of the mix with the kinds interleaved (smooth weighted round robin),
    so a 1:3 mix sends nat,reg,reg,reg,... rather than bursts of each."""
    g = math.gcd(*(w for _, w in mix))
    weights = [(_MIX_KINDS[n], w // g) for n, w in mix]
    total = sum(w for _, w in weights)
    current = [0] * len(weights)
    out: list[int] = []
    for _ in range(total):
        for i, (_, w) in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        out.append(weights[best][0])
    return tuple(out)


def check_max_loss(max_loss: float) -> None:
    if not 0 <= max_loss < 1:
        raise UsageError(f"bad --max-loss {max_loss:g}: want a ratio from 0 up to, not including, 1")


def validate(config: BenchConfig) -> None:
    c = config
    if not 0 < c.duration <= MAX_DURATION:
        raise UsageError(f"bad --duration {c.duration:g}: want more than 0 and at most {MAX_DURATION:g} seconds")
    if not 0 <= c.warmup <= 600:
        raise UsageError(f"bad --warmup {c.warmup:g}: want 0..600 seconds")
    if not 0.001 <= c.timeout <= 60:
        raise UsageError(f"bad --timeout {c.timeout:g}: want 0.001..60 seconds")
    if not 1 <= c.processes <= MAX_PROCESSES:
        raise UsageError(f"bad --processes {c.processes}: want 1..{MAX_PROCESSES}")
    if not 1 <= c.sockets <= MAX_SOCKETS:
        raise UsageError(f"bad --sockets {c.sockets}: want 1..{MAX_SOCKETS} (per process)")
    if c.rate is not None and not 0 < c.rate <= MAX_RATE:
        raise UsageError(f"bad --rate {c.rate:g}: want more than 0 and at most {MAX_RATE:g} requests/s")
    if c.window is not None and not 1 <= c.window <= MAX_SOCKETS * MAX_PROCESSES:
        raise UsageError(f"bad --window {c.window}")
    if c.window is not None and c.window > c.sockets * c.processes:
        raise UsageError(
            f"--window {c.window} needs at least as many sockets ({c.sockets} x {c.processes} processes): "
            "each socket carries one outstanding request"
        )
    if not 1 <= c.groups <= 10_000_000:
        raise UsageError(f"bad --groups {c.groups}")
    if not 1 <= c.members <= 100_000_000:
        raise UsageError(f"bad --members {c.members}")
    try:
        fd_limit = os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        fd_limit = 1024
    if c.sockets + 64 > fd_limit:
        raise UsageError(f"--sockets {c.sockets} exceeds the open-file limit ({fd_limit}); raise `ulimit -n`")


def _source_ips(config: BenchConfig, proc: int) -> tuple[str, ...]:
    """Distinct loopback sources so that the server sees many "public IPs" (its
    per-source caps would otherwise refuse a thousand groups from one address)."""
    ip = config.target.ip
    if not (config.spread_sources and ip.version == 4 and ip.is_loopback):
        return ()
    base = int(ipaddress.IPv4Address("127.64.0.0")) + (proc << 16)
    return tuple(str(ipaddress.IPv4Address(base + ((k // 250) << 8) + (k % 250) + 1)) for k in range(config.sockets))


def engine_plans(config: BenchConfig, start_at_ns: int = 0) -> list[EnginePlan]:
    c = config
    kinds = _kinds(c.mix)
    plans: list[EnginePlan] = []
    p_count = c.processes
    for p in range(p_count):
        window = None
        if c.rate is None:
            total = c.window if c.window is not None else c.sockets * p_count
            window = max(1, total // p_count + (1 if p < total % p_count else 0))
        rate = c.rate / p_count if c.rate is not None else None
        # A hard cap on requests: the rate bound times the run, whatever happens.
        bound = int(min(MAX_REQUESTS_PER_SECOND_BOUND, (rate or MAX_REQUESTS_PER_SECOND_BOUND) * 1.5 + 1000) * (c.duration + c.warmup + 1))
        plans.append(
            EnginePlan(
                target=(str(c.target.ip), c.target.port),
                kinds=kinds,
                sockets=c.sockets,
                window=window,
                rate=rate,
                duration=c.duration,
                warmup=c.warmup,
                timeout=c.timeout,
                groups=c.groups,
                members=range(p, c.members, p_count),
                source_ips=_source_ips(c, p),
                seed=c.seed,
                max_requests=bound,
                # Each process's schedule shifted by one request: together they send evenly.
                start_at_ns=start_at_ns + (int(p * 1e9 / c.rate) if start_at_ns and c.rate else 0),
                spin=c.spin,
                rx_timestamps=rate is not None and rx_timestamps_supported(),
            )
        )
    return plans


# -- running -------------------------------------------------------------------------


def merge_results(parts: list[EngineResult]) -> EngineResult:
    out = EngineResult()
    reasons: Counter[str] = Counter()
    for r in parts:
        out.sent += r.sent
        out.answered += r.answered
        out.lost += r.lost
        out.invalid += r.invalid
        out.send_errors += r.send_errors
        out.skipped += r.skipped
        out.late += r.late
        reasons.update(r.invalid_reasons)
        out.histogram.merge(r.histogram)
        out.elapsed = max(out.elapsed, r.elapsed)
        out.cpu_user += r.cpu_user
        out.cpu_system += r.cpu_system
        out.idle += r.idle
        out.runqueue_wait += r.runqueue_wait
        out.latency_clock = r.latency_clock
        for kind, counts in r.by_kind.items():
            mine = out.by_kind.setdefault(kind, {})
            for key, value in counts.items():
                mine[key] = mine.get(key, 0) + value
    out.invalid_reasons = reasons
    return out


def _child(plan: EnginePlan, index: int, out: "multiprocessing.Queue[Any]") -> None:
    def progress(p: Progress) -> None:
        out.put(("progress", index, p.phase, p.elapsed, p.sent, p.answered, p.lost, p.invalid, p.recent.to_dict()))

    try:
        result = run_engine(plan, progress)
    except Exception as exc:  # noqa: BLE001 - carried to the parent, which re-raises ours
        out.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    out.put(("done", index, result.to_dict()))


def run_bench(config: BenchConfig, progress: Optional[Callable[[Progress], None]] = None) -> BenchReport:
    validate(config)
    if config.processes == 1:
        result = run_engine(engine_plans(config)[0], progress)
        return BenchReport(config, result, [GeneratorLoad.of(result)])
    return _run_multi(config, progress)


def _run_multi(config: BenchConfig, progress: Optional[Callable[[Progress], None]]) -> BenchReport:
    from nattool.errors import NattoolError

    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    q: "multiprocessing.Queue[Any]" = ctx.Queue()
    start_at = time.monotonic_ns() + 300_000_000  # every child starts together
    plans = engine_plans(config, start_at)
    procs = [ctx.Process(target=_child, args=(plan, i, q), daemon=True) for i, plan in enumerate(plans)]
    for proc in procs:
        proc.start()
    results: dict[int, EngineResult] = {}
    latest: dict[int, tuple[Any, ...]] = {}
    deadline = time.monotonic() + config.warmup + config.duration + config.timeout + 30
    error: Optional[str] = None
    try:
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                msg = q.get(timeout=0.2)
            except queue.Empty:
                if any(not p.is_alive() for i, p in enumerate(procs) if i not in results) and q.empty():
                    time.sleep(0.2)
                    if q.empty():
                        error = "a generator process died"
                        break
                continue
            if msg[0] == "done":
                results[msg[1]] = EngineResult.from_dict(msg[2])
            elif msg[0] == "error":
                error = msg[2]
                break
            elif msg[0] == "progress":
                latest[msg[1]] = msg[2:]
                if progress is not None and len(latest) == len(procs):
                    rows = list(latest.values())
                    recent = Histogram.merged(Histogram.from_dict(r[6]) for r in rows)
                    progress(
                        Progress(
                            rows[0][0],
                            max(r[1] for r in rows),
                            sum(r[2] for r in rows),
                            sum(r[3] for r in rows),
                            sum(r[4] for r in rows),
                            sum(r[5] for r in rows),
                            recent,
                        )
                    )
                    latest.clear()
    finally:
        for proc in procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
    if error is not None or len(results) < len(procs):
        raise NattoolError(f"bench generator failed: {error or 'timed out'}")
    parts = [results[i] for i in range(len(procs))]
    return BenchReport(config, merge_results(parts), [GeneratorLoad.of(r) for r in parts])


def run_ramp(
    config: BenchConfig,
    *,
    start_rate: float = 10_000.0,
    factor: float = 1.5,
    step_seconds: float = 2.0,
    max_loss: float = 0.001,
    budget_seconds: float = 60.0,
    on_step: Optional[Callable[[BenchReport], None]] = None,
) -> RampResult:
    """Open-loop steps ``start_rate * factor**k`` until the loss passes ``max_loss``,
    the generator cannot offer the rate, or ``budget_seconds`` are spent; then a
    bisection step between the last good and the first bad rate when time allows."""
    if not 1.05 <= factor <= 10:
        raise UsageError("ramp factor must be 1.05..10")
    check_max_loss(max_loss)
    started = time.monotonic()
    steps: list[BenchReport] = []
    best: Optional[BenchReport] = None
    rate = start_rate
    bad_rate: Optional[float] = None
    stopped = "time budget spent"
    warm = min(config.warmup, 0.5)
    step_cost = step_seconds + warm + config.timeout + 0.5

    def run_at(r: float) -> BenchReport:
        report = run_bench(replace(config, rate=r, window=None, duration=step_seconds, warmup=warm))
        steps.append(report)
        if on_step is not None:
            on_step(report)
        return report

    while time.monotonic() - started + step_cost <= budget_seconds and rate <= MAX_RATE:
        report = run_at(rate)
        held = report.result.answered > 0 and report.loss_ratio <= max_loss and report.result.invalid == 0
        if held and report.generator_limited is None:
            best = report
            rate *= factor
            continue
        if held:
            best = report
            stopped = f"the generator is the limit at {rate:,.0f}/s: {report.generator_limited}"
        else:
            bad_rate = rate
            stopped = f"loss {report.loss_ratio:.2%} > {max_loss:.2%} at {rate:,.0f}/s" if report.result.invalid == 0 else f"invalid replies at {rate:,.0f}/s"
        break
    # One bisection between the best good rate and the first bad one, if time allows.
    if bad_rate is not None and best is not None and best.config.rate:
        mid = (best.config.rate + bad_rate) / 2
        if time.monotonic() - started + step_cost <= budget_seconds:
            report = run_at(mid)
            if report.loss_ratio <= max_loss and report.result.invalid == 0 and report.result.answered:
                best = report
    return RampResult(max_loss, steps, best, stopped)

