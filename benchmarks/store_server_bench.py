"""Registration throughput of a real `nattool serve`: --store memory vs the default
SQLite store, side by side in one run (issue 3: SQLite >= 70% of memory), and with
--redis a Redis store too (issue 26: Redis >= 70% of SQLite, Redis server CPU per
registration <= 10 us).

    python benchmarks/store_server_bench.py [--rounds 7] [--identities 10000]
        [--groups 1000] [--sockets 200] [--window 4] [--passes 2] [--min-ratio 0.7]
        [--redis redis://127.0.0.1:6379/0]

Both servers run for the whole benchmark (same flags: --host 127.0.0.1 --rate-limit 0,
default limits). Measurements are interleaved -- round r measures memory then sqlite,
round r+1 sqlite then memory -- so drift (CPU frequency, other load) hits both, and
the median of the rounds is reported. One measurement sends every identity
``--passes`` times (the first pass of the warm-up round creates the members, later
ones are re-registrations, as a busy tracker sees) from many source sockets with a
window of outstanding requests each, and counts replies per second of wall time.
Server CPU seconds per 1000 registrations come from /proc/PID/stat. With --redis
(start a fresh one: ``redis-server --save '' --appendonly no``), the Redis rows also
give the Redis server's own cost per registration: from INFO commandstats (the sum of
every command's usec: commands a script calls count twice, once in the script's
time, so this is an upper bound) and from INFO cpu (user + system).

Identity i is in group i % groups; a group's members share one source IP
(127.0.20.1 ..) so that no source exceeds the default cap of 64 groups per source.
Only loopback is ever addressed. Exit status 1 when the ratio is below --min-ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REG = "//51pwn/P2P&E2E/"
BANNER = "tracker listening on udp"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
LOST_AFTER = 0.25  # seconds without any reply on a socket: its outstanding ones are lost


@dataclass
class Server:
    name: str
    store: str
    proc: subprocess.Popen[bytes]
    port: int
    err_path: Path

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(name: str, store: str, workdir: Path, extra: list[str]) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATTOOL_")}
    env["PYTHONPATH"] = str(REPO)
    env["HOME"] = str(workdir)
    env["XDG_STATE_HOME"] = str(workdir / "state")
    out_path, err_path = workdir / f"{name}.out", workdir / f"{name}.err"
    args = [sys.executable, "-m", "nattool", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--rate-limit", "0", "--store", store, *extra]  # fmt: skip
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 15
    while BANNER not in out_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{name}: no banner: {err_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.02)
    return Server(name, store, proc, port, err_path)


class Load:
    """Plain non-blocking UDP sockets on loopback source IPs, one selector."""

    def __init__(self, identities: int, groups: int, sockets: int) -> None:
        if groups % 100 and groups > 100:
            raise SystemExit("--groups must be a multiple of 100 (or at most 100)")
        ips = min(100, groups)
        per_ip = max(1, sockets // ips)
        self.socks: list[socket.socket] = []
        by_ip: dict[int, list[socket.socket]] = {}
        for k in range(ips):
            for _ in range(per_ip):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((f"127.0.20.{k + 1}", 0))
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
                self.socks.append(s)
                by_ip.setdefault(k, []).append(s)
        # Requests per socket: identity i, group g = i % groups, source IP g % ips.
        self.requests: list[list[bytes]] = [[] for _ in self.socks]
        index = {id(s): n for n, s in enumerate(self.socks)}
        for i in range(identities):
            g = i % groups
            sock = by_ip[g % ips][(i // groups) % per_ip]
            mac = f"02:00:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
            self.requests[index[id(sock)]].append(f"{REG}bench-{g:05d}/0/0/{mac}".encode())
        self.sel = selectors.DefaultSelector()
        for n, s in enumerate(self.socks):
            self.sel.register(s, selectors.EVENT_READ, n)

    def close(self) -> None:
        for s in self.socks:
            self.sel.unregister(s)
            s.close()
        self.sel.close()

    def run(
        self, dest: tuple[str, int], passes: int, window: int, deadline_s: float = 60.0
    ) -> tuple[int, int, int, float]:
        """Send every request ``passes`` times; returns (sent, replies, errors, seconds)."""
        socks, requests = self.socks, self.requests
        cursor = [0] * len(socks)
        total = [len(r) * passes for r in requests]
        outstanding = [0] * len(socks)
        last_reply = [0.0] * len(socks)
        sent = replies = errors = 0
        started = time.perf_counter()
        end = started + deadline_s
        # Prime every window.
        for n, s in enumerate(socks):
            while outstanding[n] < window and cursor[n] < total[n]:
                s.sendto(requests[n][cursor[n] % len(requests[n])], dest)
                cursor[n] += 1
                outstanding[n] += 1
                sent += 1
            last_reply[n] = started
        select, recvfrom = self.sel.select, socket.socket.recvfrom
        remaining = sum(total) - sent + sum(outstanding)
        while remaining > 0:
            now = time.perf_counter()
            if now > end:
                break
            events = select(timeout=0.05)
            now = time.perf_counter()
            for key, _ in events:
                n = key.data
                s = socks[n]
                while True:
                    try:
                        data, _addr = recvfrom(s, 2048)
                    except BlockingIOError:
                        break
                    replies += 1
                    if data[:3] == b"ERR":
                        errors += 1
                    if outstanding[n]:
                        outstanding[n] -= 1
                    last_reply[n] = now
                reqs, count = requests[n], len(requests[n])
                while outstanding[n] < window and cursor[n] < total[n]:
                    try:
                        s.sendto(reqs[cursor[n] % count], dest)
                    except BlockingIOError:
                        break
                    cursor[n] += 1
                    outstanding[n] += 1
                    sent += 1
            if not events or now - min(last_reply) > LOST_AFTER:
                # Reset windows that stalled on lost datagrams (counted as lost).
                for n, s in enumerate(socks):
                    if outstanding[n] and now - last_reply[n] > LOST_AFTER:
                        outstanding[n] = 0
                        last_reply[n] = now
                        while outstanding[n] < window and cursor[n] < total[n]:
                            s.sendto(requests[n][cursor[n] % len(requests[n])], dest)
                            cursor[n] += 1
                            outstanding[n] += 1
                            sent += 1
            remaining = sum(total) - sum(cursor) + sum(outstanding)
        return sent, replies, errors, time.perf_counter() - started


class RedisCost:
    """The Redis server's cost over a measurement, from INFO (a sync client of its own)."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.usec = self.cpu = 0.0

    def _read(self) -> tuple[float, float]:
        stats = self.client.info("commandstats")
        cpu = self.client.info("cpu")
        usec = sum(v["usec"] for k, v in stats.items() if k.startswith("cmdstat_") and "info" not in k)
        return usec, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def start(self) -> None:
        self.usec, self.cpu = self._read()

    def per_registration(self, registrations: int) -> tuple[float, float]:
        """(commandstats us, cpu us) per registration since start()."""
        usec, cpu = self._read()
        n = max(registrations, 1)
        return (usec - self.usec) / n, (cpu - self.cpu) * 1e6 / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--identities", type=int, default=10_000)
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--sockets", type=int, default=200)
    ap.add_argument("--window", type=int, default=4, help="outstanding requests per socket")
    ap.add_argument("--passes", type=int, default=2, help="times each identity registers per measurement")
    ap.add_argument("--min-ratio", type=float, default=0.70, help="least sqlite/memory (and redis/sqlite) ratio")
    ap.add_argument("--max-redis-us", type=float, default=10.0, help="most Redis server us per registration")
    ap.add_argument("--redis", metavar="URL", help="also measure --store URL (a Redis you started)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="nattool-bench-") as tmp:
        workdir = Path(tmp)
        stores = [("memory", "memory"), ("sqlite", f"sqlite:{workdir / 'tracker.db'}")]
        if args.redis:
            stores.append(("redis", args.redis))
        servers = [start_server(name, spec, workdir, []) for name, spec in stores]
        redis_cost = RedisCost(args.redis) if args.redis else None
        load = Load(args.identities, args.groups, args.sockets)
        results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
        try:
            # Warm-up: creates every member in every store (not counted).
            for server in servers:
                load.run(server.addr, 1, args.window)
            print(f"{len(load.socks)} source sockets, window {args.window}, {args.identities} identities "
                  f"in {args.groups} groups, {args.passes} passes = "
                  f"{args.identities * args.passes} registrations per measurement\n")  # fmt: skip
            print(f"{'round':>5} {'store':>7} {'reg/s':>9} {'lost':>6} {'ERR':>5} {'srv cpu s/1k':>12}"
                  + (f" {'redis us/reg':>12} {'redis cpu us/reg':>16}" if redis_cost else ""))  # fmt: skip
            for r in range(args.rounds):
                order = servers if r % 2 == 0 else list(reversed(servers))
                for server in order:
                    cpu0 = server.cpu_seconds()
                    if redis_cost and server.name == "redis":
                        redis_cost.start()
                    sent, got, errs, secs = load.run(server.addr, args.passes, args.window)
                    cpu = server.cpu_seconds() - cpu0
                    row = {
                        "rate": got / secs, "lost": sent - got, "errors": errs,
                        "cpu_per_1k": 1000 * cpu / max(got, 1),
                    }  # fmt: skip
                    extra = ""
                    if redis_cost and server.name == "redis":
                        row["redis_us"], row["redis_cpu_us"] = redis_cost.per_registration(got)
                        extra = f" {row['redis_us']:>12.2f} {row['redis_cpu_us']:>16.2f}"
                    results[server.name].append(row)
                    print(
                        f"{r + 1:>5} {server.name:>7} {row['rate']:>9,.0f} {row['lost']:>6} {errs:>5} "
                        f"{row['cpu_per_1k']:>12.3f}{extra}"
                    )
        finally:
            load.close()
            for server in servers:
                server.proc.send_signal(signal.SIGTERM)
            for server in servers:
                try:
                    server.proc.wait(10)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                if "Traceback" in server.err_path.read_text(errors="replace"):
                    print(f"{server.name}: traceback in the server log:\n{server.err_path.read_text()[-3000:]}")
        med = {name: statistics.median(row["rate"] for row in rows) for name, rows in results.items()}
        cpu = {name: statistics.median(row["cpu_per_1k"] for row in rows) for name, rows in results.items()}
        ratio = med["sqlite"] / med["memory"]
        # Each round measured both stores back to back: the median of the per-round
        # ratios is less sensitive to load that comes and goes on a shared machine.
        pair = statistics.median(s["rate"] / m["rate"] for s, m in zip(results["sqlite"], results["memory"]))
        print(f"\nmedian of {args.rounds} rounds:")
        for name in results:
            print(f"  {name:>7}: {med[name]:>9,.0f} registrations/s  (server CPU {cpu[name]:.3f} s per 1000)")
        verdict = "ok" if ratio >= args.min_ratio else "BELOW TARGET"
        print(f"  sqlite/memory = {ratio:.1%}  (target >= {args.min_ratio:.0%}: {verdict})")
        print(f"  median of per-round ratios = {pair:.1%}; server CPU per registration, memory/sqlite = "
              f"{cpu['memory'] / cpu['sqlite']:.1%}")  # fmt: skip
        ok = ratio >= args.min_ratio
        out = {"median": med, "cpu_per_1k": cpu, "ratio": ratio, "pair_ratio": pair, "rounds": results}
        if args.redis:
            rows = results["redis"]
            redis_ratio = med["redis"] / med["sqlite"]
            redis_pair = statistics.median(r["rate"] / s["rate"] for r, s in zip(rows, results["sqlite"]))
            redis_us = statistics.median(row["redis_us"] for row in rows)
            redis_cpu = statistics.median(row["redis_cpu_us"] for row in rows)
            errors = sum(row["errors"] for row in rows)
            lost = sum(max(0, row["lost"]) for row in rows)
            redis_ok = redis_ratio >= args.min_ratio and redis_us <= args.max_redis_us and not errors and not lost
            print(f"  redis/sqlite = {redis_ratio:.1%} (median of per-round ratios {redis_pair:.1%}); Redis server "
                  f"{redis_us:.2f} us per registration (commandstats), {redis_cpu:.2f} us (cpu); ERR {errors}, "
                  f"lost {lost}  (target >= {args.min_ratio:.0%}, <= {args.max_redis_us:g} us, 0 ERR, 0 lost: "
                  f"{'ok' if redis_ok else 'BELOW TARGET'})")  # fmt: skip
            out.update(redis_ratio=redis_ratio, redis_pair_ratio=redis_pair, redis_us=redis_us, redis_cpu_us=redis_cpu)
            ok = ok and redis_ok
        if args.json:
            print(json.dumps(out))
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
