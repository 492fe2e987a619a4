"""`nattool serve` against coturn, measured by `nattool bench` in the same run.

    python benchmarks/run_benchmarks.py            # 10 s runs, median of 3
    python benchmarks/run_benchmarks.py --quick    # 3 s runs, median of 3
    python benchmarks/run_benchmarks.py --floor    # also a minimal Python responder
    python benchmarks/run_benchmarks.py --pin      # generator on CPU 0, servers on the others
    python benchmarks/run_benchmarks.py --cap 0.5  # every server held to half a core (root)
    python benchmarks/run_benchmarks.py --json out.json
    python benchmarks/run_benchmarks.py --rate 50000 --coalesce 0,50,100,200,400
    python benchmarks/run_benchmarks.py --peak --coalesce 0,200  # closed-loop peak of each

Not run in CI. Starts coturn (`turnserver`, Debian package coturn: STUN only, no
auth, loopback) and `nattool serve` (default embedded SQLite store in a temporary
HOME, --rate-limit 0 because the generator is one source), then runs
`nattool bench` against each, workloads interleaved round by round so that a noisy
neighbour hurts every server alike, and prints one table with ratios to coturn's
STUN Binding rate measured in the same run. Each maximum-rate run is followed at
once by an open-loop run at half the rate it reached, for the p99 latency at half
load (the table gives the median and the range over the rounds). Registrations
are also measured against a second `nattool serve --store memory`, which shows
what the embedded store's commits cost. With ``--floor``, a minimal Python
responder (``minimal_responder.py``: bare ``//nat``, bare Binding requests and
seed-form registrations into a dict, nothing else; asyncio on uvloop) is measured in
the same rounds: what any Python
server reaches on this machine, and so how much the tracker's protections cost
above it; ``--floor`` also measures the same responder as a blocking
``recvfrom``/``sendto`` loop for ``//nat`` and STUN. The server CPU column is the server
process's share of one core during the loaded part of each run (median): well
under 100% with the generator near 100% means the generator set the rate.

With ``--pin`` (Linux) the generator runs on the first CPUs, as many as it has
processes, and every server, all its threads, on the others. Unpinned, the scheduler
now and then moves one of the two onto the other's core (when a kernel thread takes
its own) and leaves them there for milliseconds, taking turns of up to a time slice:
replies then wait for the generator's turn, which a server on its own machine never
sees. Pinned, neither moves, for coturn alike; but a pinned process also waits out
whatever stalls its core.

With ``--cap SHARE`` (Linux, root) every server, coturn included, is held to the
same share of one core by a cgroup CPU quota (``cpu_cap.py``). Uncapped, at full
``//nat`` and STUN rates the generator and the server each use a whole core and
the rate is the machine's; capped, the server is the limit and the generator has
room, so the ratios compare what each server does with the same CPU. A throttled
server's latency is the quota's, so ``--cap`` leaves out the half-rate runs.

With ``--rate R`` it measures CPU per request instead, at a fixed open-loop rate (a
tracker on the Internet runs at a steady load, not saturated): coturn's STUN and
``nattool serve`` (one server per ``--coalesce`` value, each with that
``--coalesce-us``) for ``//nat``, STUN and registrations, interleaved round by
round (the order turns by one each round). CPU per request is the server's CPU
over the run, from /proc, over the replies (the rate held during warm-up and
run); "vs coturn" is coturn's CPU per STUN request over the server's, taken within
each round, then the median and range over the rounds. The latency percentiles are
`nattool bench`'s, from the kernel's receive timestamps: they include any wait.
The generator spaces its requests evenly (it sleeps, then polls for the last few
microseconds before each send is due), in one process per 25,000 requests/s unless
``--processes`` says otherwise, so that no generator process polls its core all the time. With ``--floor`` the rate mode also runs
``minimal_responder.py --blocking`` for ``//nat`` and STUN, plain and with a fixed
wait after each wake-up as long as the largest ``--coalesce`` value: the floor any
Python loop reaches on this machine, in the same rounds.

Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from cpu_cap import CpuCap, CpuCapError, cap_option

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
RATE_PER_GENERATOR = 25_000  # open loop: requests/s one generator process sends (see rate_mode)


# The share of the offered rate a run must answer to count as a run at that rate.
CARRIED = 0.98


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def env(home: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("NATTOOL_")}
    e["PYTHONPATH"] = str(REPO)
    e["HOME"] = str(home)
    e["XDG_STATE_HOME"] = str(home / "state")
    e["XDG_CONFIG_HOME"] = str(home / "config")
    e["NO_COLOR"] = "1"
    return e


def bench_cmd() -> list[str]:
    """`nattool bench`, or the command function directly until the app registers it."""
    probe = subprocess.run([sys.executable, "-m", "nattool", "bench", "--help"], capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if probe.returncode == 0:
        return [sys.executable, "-m", "nattool", "bench"]
    code = (
        "import typer; from nattool.cli.bench_cmd import bench; "
        "app = typer.Typer(); app.command()(bench); app.callback()(lambda: None); "
        "app(prog_name='nattool')"
    )
    return [sys.executable, "-c", code, "bench"]


def wait_stun(port: int, timeout: float = 10.0) -> None:
    """Until a Binding request to the port is answered."""
    req = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(req, (HOST, port))
            try:
                s.recvfrom(2048)
                return
            except (socket.timeout, ConnectionRefusedError):
                time.sleep(0.1)
    raise RuntimeError(f"nothing answers STUN on {HOST}:{port}")


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def cpu_times(self) -> tuple[float, float]:
        """User and system CPU seconds of the server process, every thread (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan"), float("nan")
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def rss_mib(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


def stop_all(servers: list[Server], cap: Optional[CpuCap]) -> None:
    """Stop the servers, then remove their CPU cap (if any)."""
    for s in servers:
        s.stop()
    if cap is not None:
        cap.remove()


def start_coturn(work: Path, cpus: Optional[frozenset[int]] = None) -> Optional[Server]:
    exe = shutil.which("turnserver")
    if exe is None:
        return None
    port = free_port()
    log = work / "coturn.log"
    args = [
        exe, "-n", "--stun-only", "--no-auth", "--no-cli", "--no-tls", "--no-dtls",
        "--listening-ip", HOST, "--listening-port", str(port), "--simple-log", "--log-file", str(log),
        "--pidfile", str(work / "coturn.pid"),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=on_cpus(cpus))
    server = Server("coturn", port, proc, log)
    try:
        wait_stun(port)
    except RuntimeError:
        server.stop()
        raise
    return server


def on_cpus(cpus: Optional[frozenset[int]]) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that runs the child, and every thread it starts, on ``cpus``."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def launch(name: str, port: int, args: list[str], log: Path, work: Path, environ: Optional[dict[str, str]] = None, cpus: Optional[frozenset[int]] = None) -> Server:
    """Start a server (on ``cpus``, None = anywhere) and wait until it answers STUN on ``port``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=work, env=environ, preexec_fn=on_cpus(cpus))
    server = Server(name, port, proc, log)
    try:
        wait_stun(port)
    except RuntimeError:
        server.stop()
        raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}") from None
    return server


def start_minimal(work: Path, cpus: Optional[frozenset[int]] = None, blocking: bool = False, wait_us: int = 0) -> Server:
    """``minimal_responder.py``: on uvloop, or as a blocking ``recvfrom``/``sendto`` loop
    (with ``wait_us``, one that sleeps that long after each wake-up)."""
    port = free_port()
    args = [sys.executable, str(REPO / "benchmarks" / "minimal_responder.py"), str(port)]
    if blocking:
        args += ["--blocking", "--wait-us", str(wait_us)]
        name, log = (f"minimal blocking, wait {wait_us} us", f"blocking-{wait_us}.log") if wait_us else ("minimal blocking", "blocking.log")
    else:
        name, log = "minimal Python", "minimal.log"
    return launch(name, port, args, work / log, work, cpus=cpus)


def start_nattool(work: Path, extra: tuple[str, ...] = (), name: str = "nattool", cpus: Optional[frozenset[int]] = None) -> Server:
    port = free_port()
    home = work / f"home-{name}"
    home.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "nattool", "serve", "--host", HOST, "--port", str(port), "--rate-limit", "0", "--log-level", "warning", *extra]
    return launch(name, port, args, work / f"nattool-{port}.log", work, env(home), cpus)


@dataclass
class Case:
    server: str
    workload: str  # "nat", "stun", "register"
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)

    def median_p99(self) -> float:
        return statistics.median(r["latency_ms"]["p99"] for r in self.runs)

    def median_server_cpu(self) -> float:
        return statistics.median(r.get("server_cpu", float("nan")) for r in self.runs)

    def max_gen_cpu(self) -> float:
        return max(max(r["generator"]["cpu_per_process"]) for r in self.runs)


WORKLOAD_ARGS = {
    "nat": ["--mix", "nat=1"],
    "stun": ["--stun"],
    "register": ["--mix", "register=1", "--groups", "1000", "--members", "10000"],
}


def run_bench(
    cmd: list[str], server: Server, workload: str, duration: float, warmup: float, extra: list[str], work: Path, cpus: Optional[frozenset[int]] = None
) -> dict[str, Any]:
    """One `nattool bench` run (the generator on ``cpus``, None = anywhere) against ``server``."""
    args = [*cmd, f"{HOST}:{server.port}", *WORKLOAD_ARGS[workload], "--duration", str(duration), "--warmup", str(warmup), "--json", *extra]
    user0, system0 = server.cpu_times()
    out = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env(work / "home"), timeout=duration + warmup + 60, preexec_fn=on_cpus(cpus))
    if out.returncode not in (0, 1):
        raise RuntimeError(f"bench failed ({out.returncode}): {out.stderr[-2000:]}")
    doc: dict[str, Any] = json.loads(out.stdout)
    # The server's share of a core while it was loaded (warm-up and run; the
    # generator's start-up, when the server idles, is left out): below 100%, the
    # server had room the generator did not use. The kernel's part (system time:
    # the socket calls, and on loopback the delivery of each reply to the generator's
    # socket) is most of it for every server here, coturn included.
    user1, system1 = server.cpu_times()
    doc["server_cpu"] = (user1 - user0 + system1 - system0) / (warmup + duration)
    doc["server_cpu_kernel"] = (system1 - system0) / (warmup + duration)
    return doc


def cpu_per_request(doc: dict[str, Any]) -> float:
    """Server CPU microseconds a reply (the run's share of a core over its reply rate)."""
    rate = doc["achieved_rate"]
    return doc["server_cpu"] / rate * 1e6 if rate else float("nan")


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """Median (range) of the rounds."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def rate_mode(opts: argparse.Namespace, cap: Optional[CpuCap], gen_cpus: Optional[frozenset[int]], server_cpus: Optional[frozenset[int]]) -> int:
    """CPU per request at a fixed open-loop rate (or with --peak, the closed-loop
    peak): coturn and `nattool serve` at each --coalesce value, interleaved round by round."""
    duration = opts.duration or (3.0 if opts.quick else 10.0)
    warmup = 1.0
    coalesce = [int(v) for v in opts.coalesce.split(",")]
    workloads = opts.workloads.split(",")
    load = ["--window", str(opts.window)] if opts.peak else ["--rate", f"{opts.rate:.0f}"]
    gen = [*load, "--sockets", str(opts.sockets), "--processes", str(opts.processes), "--timeout", "1"]
    cmd = bench_cmd()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="nattool-bench-") as tmp:
        work = Path(tmp)
        (work / "home").mkdir()
        servers: list[Server] = []
        try:
            coturn = start_coturn(work, server_cpus)
            plan: list[tuple[Server, str]] = []
            if coturn is not None:
                servers.append(coturn)
                plan.append((coturn, "stun"))
            for us in coalesce:
                server = start_nattool(work, ("--coalesce-us", str(us), *opts.serve_arg), name=f"nattool --coalesce-us {us}", cpus=server_cpus)
                servers.append(server)
                plan += [(server, w) for w in workloads]
            if opts.floor:
                # What any Python loop reaches here: blocking recvfrom/sendto, without
                # and with a fixed wait after each wake-up (the largest --coalesce value).
                for wait_us in sorted({0, max(coalesce)}):
                    floor = start_minimal(work, server_cpus, blocking=True, wait_us=wait_us)
                    servers.append(floor)
                    plan += [(floor, w) for w in ("nat", "stun")]
            if cap is not None:
                cap.put([s.proc.pid for s in servers])
            for rnd in range(opts.rounds):
                turn = rnd % len(plan)
                for server, workload in plan[turn:] + plan[:turn]:
                    doc = run_bench(cmd, server, workload, duration, warmup, gen, work, gen_cpus)
                    doc["round"] = rnd
                    runs.setdefault((server.name, workload), []).append(doc)
                    lat = doc["latency_ms"]
                    print(
                        f"round {rnd + 1}: {server.name:26} {workload:9} {doc['achieved_rate']:>9,.0f}/s  loss {doc['loss_ratio']:.3%}  "
                        f"cpu/req {cpu_per_request(doc):6.2f} us  p50 {lat['p50']:.3f}  p99 {lat['p99']:.3f} ms  "
                        f"gen cpu {max(doc['generator']['cpu_per_process']) * 100:.0f}%  late {late_share(doc):.1%}",
                        file=sys.stderr,
                        flush=True,
                    )
        except CpuCapError as exc:
            print(f"run_benchmarks.py: --cap: {exc}", file=sys.stderr)
            return 2
        finally:
            stop_all(servers, cap)
    ref = {d["round"]: cpu_per_request(d) for d in runs.get(("coturn", "stun"), [])}
    print()
    how = f"--window {opts.window} (closed loop: the peak)" if opts.peak else f"--rate {opts.rate:,.0f} (open loop, evenly spaced)"
    how += f", {opts.processes} generator process(es)"
    print(f"nattool bench {how}, {opts.rounds} x {duration:g} s runs, interleaved, median (range); "
          f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, kernel {platform.release()}")
    print()
    print("| server | workload | replies/s | loss | CPU per request (us) | vs coturn STUN | p50 ms | p99 ms | generator CPU |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    short = bursty = False
    for (name, workload), docs in runs.items():
        cpu = [cpu_per_request(d) for d in docs]
        ratios = [ref[d["round"]] / cpu_per_request(d) for d in docs if d["round"] in ref]
        mark = ""
        if not opts.peak and any(not carried(d, opts.rate) for d in docs):
            mark = " (!)"
            short = True
        p99_mark = ""
        if not opts.peak and 2 * sum(d["generator"]["bursty"] for d in docs) > len(docs):
            p99_mark = " †"
            bursty = True
        print(
            f"| {name}{mark} | {workload} | {statistics.median(d['achieved_rate'] for d in docs):,.0f} | "
            f"{statistics.median(d['loss_ratio'] for d in docs):.3%} | {spread(cpu)} | "
            f"{spread(ratios) + 'x' if ratios else '-'} | {spread([d['latency_ms']['p50'] for d in docs], '{:.3f}')} | "
            f"{spread([d['latency_ms']['p99'] for d in docs], '{:.3f}')}{p99_mark} | "
            f"{max(max(d['generator']['cpu_per_process']) for d in docs) * 100:.0f}% |"
        )
    if short:
        print()
        print(f"(!) In some round the generator fell behind its schedule, or fewer than {CARRIED:.0%} of the "
              f"requests were answered: that row is not a measurement at {opts.rate:,.0f}/s. A machine "
              "whose cores the generator and the server share is full: try --processes 1 (one polling "
              "generator) or a lower --rate.")
    if bursty:
        print()
        print("† In most rounds the generator sent over 1% of the requests in bursts, more than 0.1 ms late "
              "(nattool bench's note): it fell behind and caught up, and that p99 includes the server's answer "
              "to those bursts.")
    if opts.json:
        Path(opts.json).write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in runs.items()}, indent=1))
    return 0


def late_share(doc: dict[str, Any]) -> float:
    """The share of an open-loop run's requests that went out late (in bursts)."""
    return doc.get("late", 0) / max(1, doc["sent"])


def carried(doc: dict[str, Any], rate: float) -> bool:
    """Whether an open-loop run was one at ``rate``: the generator kept its schedule
    and the server answered nearly all of it (a server or a machine that falls
    behind batches requests by itself, which makes its CPU per request look low)."""
    return not doc["generator"]["limited"] and doc["achieved_rate"] >= CARRIED * rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s runs (instead of 10 s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--window", type=int, default=64, help="closed-loop window of the generator")
    ap.add_argument("--sockets", type=int, default=512)
    ap.add_argument("--processes", type=int, help="generator processes (default 1; with --rate, one per 25,000 requests/s)")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra flag for nattool serve (repeatable)")
    ap.add_argument("--floor", action="store_true", help="also measure a minimal Python responder (//nat, STUN, registrations)")
    ap.add_argument("--pin", action="store_true", help="run the generator on the first CPUs (as many as --processes) and the servers on the others (Linux)")
    ap.add_argument(
        "--cap", type=float, metavar="SHARE",
        help="hold every server to SHARE of one core (cgroup quota; Linux, root), so that the server and not the generator is the limit; no half-rate runs",
    )
    ap.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    ap.add_argument("--rate", type=float, help="measure CPU per request at this open-loop rate (requests/s) instead of the maximum rates")
    ap.add_argument("--peak", action="store_true", help="as --rate, but closed loop (--window): the peak rate of each --coalesce value")
    ap.add_argument("--coalesce", default="0,200", help="with --rate or --peak: the --coalesce-us values of the nattool servers, comma-separated (default 0,200)")
    ap.add_argument("--workloads", default="nat,stun,register", help="with --rate or --peak: the nattool workloads, comma-separated (default nat,stun,register)")
    opts = ap.parse_args()
    cap = cap_option(ap, opts.cap)
    if opts.processes is None:
        # At most 25,000/s a generator process: its 40 us gaps leave it asleep most of
        # the time. One process at 50,000/s polls its core through every 20 us gap (a
        # sleep ends about 18 us late here), and a machine with a core that never idles
        # costs every server less per wake-up than a tracker's own machine does.
        opts.processes = max(1, math.ceil(opts.rate / RATE_PER_GENERATOR)) if opts.rate else 1
    gen_cpus: Optional[frozenset[int]] = None
    server_cpus: Optional[frozenset[int]] = None
    if opts.pin:
        if not hasattr(os, "sched_setaffinity"):
            ap.error("--pin needs Linux (sched_setaffinity)")
        usable = sorted(os.sched_getaffinity(0))
        if len(usable) <= opts.processes:
            ap.error(f"--pin needs more CPUs than --processes: {len(usable)} usable, {opts.processes} for the generator")
        gen_cpus = frozenset(usable[: opts.processes])
        server_cpus = frozenset(usable[opts.processes :])
    if opts.rate is not None or opts.peak:
        return rate_mode(opts, cap, gen_cpus, server_cpus)
    duration = opts.duration or (3.0 if opts.quick else 10.0)
    warmup = 1.0
    gen = ["--window", str(opts.window), "--sockets", str(opts.sockets), "--processes", str(opts.processes), "--timeout", "1"]
    cmd = bench_cmd()
    cases: dict[tuple[str, str], Case] = {}
    with tempfile.TemporaryDirectory(prefix="nattool-bench-") as tmp:
        work = Path(tmp)
        (work / "home").mkdir()
        servers: list[Server] = []
        half: dict[tuple[str, str], list[dict[str, Any]]] = {}
        try:
            # Started one by one into the list: one that fails stops the others.
            coturn = start_coturn(work, server_cpus)
            if coturn is not None:
                servers.append(coturn)
            nattool = start_nattool(work, tuple(opts.serve_arg), cpus=server_cpus)
            servers.append(nattool)
            memory = start_nattool(work, (*opts.serve_arg, "--store", "memory"), name="nattool-memory", cpus=server_cpus)
            servers.append(memory)
            plan = [(nattool, "nat"), (nattool, "stun"), (nattool, "register"), (memory, "register")]
            if coturn is not None:
                plan.insert(0, (coturn, "stun"))
            if opts.floor:
                minimal = start_minimal(work, server_cpus)
                servers.append(minimal)
                plan += [(minimal, "nat"), (minimal, "stun"), (minimal, "register")]
                blocking = start_minimal(work, server_cpus, blocking=True)
                servers.append(blocking)
                plan += [(blocking, "nat"), (blocking, "stun")]
            if cap is not None:
                cap.put([s.proc.pid for s in servers])
            for rnd in range(opts.rounds):
                for server, workload in plan:
                    doc = run_bench(cmd, server, workload, duration, warmup, gen, work, gen_cpus)
                    case = cases.setdefault((server.name, workload), Case(server.name, workload))
                    case.runs.append(doc)
                    print(
                        f"round {rnd + 1}: {server.name:8} {workload:9} {doc['achieved_rate']:>10,.0f}/s  "
                        f"loss {doc['loss_ratio']:.3%}  invalid {doc['invalid']}  p99 {doc['latency_ms']['p99']:.3f} ms  "
                        f"gen cpu {max(doc['generator']['cpu_per_process']) * 100:.0f}%  server cpu {doc['server_cpu'] * 100:.0f}% (kernel {doc['server_cpu_kernel'] * 100:.0f}%)",
                        file=sys.stderr,
                        flush=True,
                    )
                    if cap is not None:
                        continue
                    # Latency at half the rate just measured (open loop), right after
                    # it: this machine's speed drifts by 20% within an hour, and half
                    # of a maximum measured minutes earlier can be 80% of the one now.
                    rate = doc["achieved_rate"] / 2
                    hdoc = run_bench(cmd, server, workload, duration, warmup, ["--rate", f"{rate:.0f}", "--sockets", str(opts.sockets), "--timeout", "1"], work, gen_cpus)
                    half.setdefault((server.name, workload), []).append(hdoc)
                    print(
                        f"half-rate round {rnd + 1}: {server.name:8} {workload:9} {hdoc['achieved_rate']:>10,.0f}/s  "
                        f"loss {hdoc['loss_ratio']:.3%}  p99 {hdoc['latency_ms']['p99']:.3f} ms  server cpu {hdoc['server_cpu'] * 100:.0f}% (kernel {hdoc['server_cpu_kernel'] * 100:.0f}%)",
                        file=sys.stderr,
                        flush=True,
                    )
            rss = {s.name: s.rss_mib() for s in servers}
        except CpuCapError as exc:
            print(f"run_benchmarks.py: --cap: {exc}", file=sys.stderr)
            return 2
        finally:
            stop_all(servers, cap)
    ref = cases.get(("coturn", "stun"))
    ref_rate = ref.median("achieved_rate") if ref else None
    print()
    print(f"nattool bench, {opts.rounds} x {duration:g} s runs (median), closed loop window {opts.window}, "
          f"{opts.processes} generator process(es); {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, kernel {platform.release()}")
    if gen_cpus is not None and server_cpus is not None:
        print(f"pinned: generator on CPU {','.join(map(str, sorted(gen_cpus)))}, servers on CPU {','.join(map(str, sorted(server_cpus)))}")
    if cap is not None:
        print(f"capped: every server held to {cap.share:g} of one core (cgroup CPU quota); no half-rate runs (a throttled server's latency is the quota's)")
    print()
    print("| server | workload | replies/s | vs coturn STUN | loss | p99 ms | p99 ms at 50% rate, median (range) | generator CPU | server CPU | server CPU at 50% rate |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, workload), case in cases.items():
        rate = case.median("achieved_rate")
        ratio = f"{rate / ref_rate:.2f}x" if ref_rate else "-"
        h = [d["latency_ms"]["p99"] for d in half.get((name, workload), [])]
        p99_half = f"{statistics.median(h):.3f} ({min(h):.2f}-{max(h):.2f})" if h else "-"
        # At half its own maximum a server that set that maximum is far busier than
        # half: few requests per wake-up, and a wake-up has a fixed price.
        busy = [d.get("server_cpu", float("nan")) for d in half.get((name, workload), [])]
        busy_half = f"{statistics.median(busy) * 100:.0f}%" if busy else "-"
        print(
            f"| {name} | {workload} | {rate:,.0f} | {ratio} | {case.median('loss_ratio'):.3%} | "
            f"{case.median_p99():.3f} | {p99_half} | {case.max_gen_cpu() * 100:.0f}% | {case.median_server_cpu() * 100:.0f}% | {busy_half} |"
        )
    print()
    print("server RSS at the end (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    if opts.json:
        Path(opts.json).write_text(json.dumps({"cases": {f"{k[0]}/{k[1]}": c.runs for k, c in cases.items()}, "half_rate": {f"{k[0]}/{k[1]}": runs for k, runs in half.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
