#!/usr/bin/env python3
"""A simple load loop against a real `nattool serve` (loopback only, bounded).

Measures the requests per second that `serve` answers for

- ``//nat``, and
- registrations in the seed form, over 1,000 groups and many identities, sent from
  20 loopback source addresses (127.0.1.1 … 127.0.1.20, standing for 20 public IPs,
  so that no source goes over the default cap of groups per source),

with ``--rate-limit 0 --store memory`` and with the default SQLite store (in a
temporary directory). Blocking sockets, a window of requests in flight per socket,
a bounded count and a time limit per phase. The client is one Python process, so on
a small machine the figures are a lower bound of what the server can do.

    python benchmarks/simple_load.py [--nat 60000] [--reg 20000] [--window 32]

This is not a test; `nattool bench` will be the real tool.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
PHASE_TIME_LIMIT = 30.0  # seconds: a phase stops early rather than run longer


@dataclass
class Result:
    name: str
    sent: int
    answered: int
    errors: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        lost = self.sent - self.answered
        return (
            f"{self.name:<34} {self.rate:>9,.0f} answers/s   "
            f"({self.answered:,} of {self.sent:,} in {self.seconds:.2f}s, {lost:,} lost, {self.errors:,} ERR)"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_server(store: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_COLOR="1", HOME=str(workdir), XDG_STATE_HOME=str(workdir / "state"))
    env = {k: v for k, v in env.items() if not k.startswith("NATTOOL_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nattool", "serve", "--host", HOST, "--port", str(port),
         "--store", store, "--rate-limit", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=open(workdir / f"serve-{port}.err", "wb"), env=env, cwd=str(workdir),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode(errors="replace")
    if "tracker listening" not in line:
        proc.kill()
        raise SystemExit(f"serve did not start: {line!r}; see {workdir}")
    print("  " + line.strip())
    return proc, port


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load(
    name: str,
    port: int,
    sources: list[str],
    total: int,
    window: int,
    payload: Callable[[int], bytes],
) -> Result:
    """Send ``total`` requests, ``window`` at a time on each of the sockets (one per
    source address), and count the answers."""
    socks = []
    for src in sources:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        s.bind((src, 0))
        s.settimeout(1.0)
        socks.append(s)
    dest = (HOST, port)
    sent = answered = errors = 0
    started = time.perf_counter()
    try:
        while sent < total and time.perf_counter() - started < PHASE_TIME_LIMIT:
            batch: list[tuple[socket.socket, int]] = []
            for s in socks:
                n = min(window, total - sent)
                if n <= 0:
                    break
                for _ in range(n):
                    s.sendto(payload(sent), dest)
                    sent += 1
                batch.append((s, n))
            for s, n in batch:
                for _ in range(n):
                    try:
                        data = s.recv(2048)
                    except socket.timeout:
                        break  # the rest of this window is lost
                    answered += 1
                    errors += data.startswith(b"ERR")
    finally:
        for s in socks:
            s.close()
    return Result(name, sent, answered, errors, time.perf_counter() - started)


def registration_payload(groups: int, identities: int) -> Callable[[int], bytes]:
    def make(i: int) -> bytes:
        ident = i % identities
        group = ident % groups
        mac = f"02:00:{(ident >> 24) & 255:02x}:{(ident >> 16) & 255:02x}:{(ident >> 8) & 255:02x}:{ident & 255:02x}"
        return f"//51pwn/P2P&E2E/bench-{group:04d}/0/10.0.{(ident >> 8) & 255}.{ident & 255}/{mac}".encode()

    return make


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nat", type=int, default=60_000, help="//nat requests per store")
    parser.add_argument("--reg", type=int, default=20_000, help="registrations per store")
    parser.add_argument("--window", type=int, default=32, help="requests in flight per socket")
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--identities", type=int, default=10_000)
    args = parser.parse_args()
    if max(args.nat, args.reg) > 1_000_000 or args.window > 256:
        parser.error("bounded load only: at most 1,000,000 requests and a window of 256")

    # Sources: a group always registers from the same source, so each of the 20
    # sources is in groups/20 groups (50 for 1,000), under the default cap of 64.
    sources = [f"127.0.1.{i}" for i in range(1, 21)]
    reg = registration_payload(args.groups, args.identities)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="nattool-load-") as tmp:
        workdir = Path(tmp)
        for label, store in (("memory", "memory"), ("sqlite", f"sqlite:{workdir / 'bench.db'}")):
            print(f"store {label}:")
            proc, port = start_server(store, workdir)
            try:
                results.append(load(f"{label}: //nat (1 socket, window 1)", port, sources[:1], min(args.nat, 5000), 1, lambda i: b"//nat"))
                results.append(load(f"{label}: //nat", port, sources[:4], args.nat, args.window, lambda i: b"//nat"))
                # Registrations must leave from the source that owns the group.
                regs = Result(f"{label}: register (seed form)", 0, 0, 0, 0.0)
                per_source = [
                    (src, [i for i in range(args.identities) if (i % args.groups) % len(sources) == k])
                    for k, src in enumerate(sources)
                ]
                count = args.reg // len(sources)
                for src, idents in per_source:
                    r = load("", port, [src], count, args.window, lambda i, ids=idents: reg(ids[i % len(ids)]))
                    regs.sent += r.sent
                    regs.answered += r.answered
                    regs.errors += r.errors
                    regs.seconds += r.seconds
                results.append(regs)
            finally:
                stop_server(proc)
            for r in results[-3:]:
                print("  " + r.line())
    print()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.groups} groups, {args.identities} identities")
    for r in results:
        print(r.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
