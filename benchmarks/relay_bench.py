"""Relayed packets per second of server CPU: `nattool serve` (TURN) against coturn, both
loaded by the same `turnutils_uclient` command in the same run.

    python benchmarks/relay_bench.py                       # 3 rounds, the defaults below
    python benchmarks/relay_bench.py --rounds 5 --clients 100 --messages 2000 --interval 2
    python benchmarks/relay_bench.py --tcp --clients 20 --messages 5000   # TURN over TCP to the server
    python benchmarks/relay_bench.py --indications         # Send/Data indications, no channels
    python benchmarks/relay_bench.py --cap 0.25            # each server held to a quarter core (root)
    python benchmarks/relay_bench.py --peer --coalesce 0,400   # an echo peer; a nattool per --coalesce-us

Not run in CI. Starts coturn (`turnserver`, Debian package coturn) as a TURN server
(long-term credentials, relay on 127.0.0.1, `allow-loopback-peers`, since its relayed
addresses are loopback ones here) and `nattool serve --turn-user ... --relay-bandwidth 0`
(no per-allocation bandwidth cap; quotas raised to the number of clients, since every
client is 127.0.0.1 with one username). Then, round by round and alternating which
server goes first, runs coturn's client against each::

    turnutils_uclient -y -c -m CLIENTS -n MESSAGES -l LENGTH -z INTERVAL -u USER -w PASSWORD
                      -p PORT [-t] [-s] 127.0.0.1

``-y``: client-to-client (each client's peer is another client's relayed address on the
same server: every message is relayed twice by the server's sockets, in at the relayed
address of one allocation and out to the other's client); with ``--peer``, ``-e HOST -r
PORT`` instead: every client's peer is coturn's ``turnutils_peer``, a UDP echo server,
so each message goes out of a relayed socket to the peer and its echo comes back in on
that socket (nattool's relay hands a packet between two of its own allocations over
without the kernel, so ``-y`` hardly reads the relayed sockets); ``-c``: no RTCP sessions;
``-z``: milliseconds between messages of one session (an offered load, the same for
both servers); ``-s`` (``--indications``): Send and Data indications instead of channels
(ChannelBind, then ChannelData). The relayed packets are the messages the clients got back (uclient's
``tot_recv_msgs``); the server's CPU is its user + system time (every thread, /proc)
over the uclient run, allocations included. The figure is relayed packets per CPU
second; the ratio is nattool's to coturn's in the same round, and the table gives the
medians. ``--coalesce 0,400`` starts one nattool server per ``--coalesce-us`` value,
each a row of its own. Both servers must lose nothing: a server that cannot keep up would look
cheap per packet while dropping them, so a loss is reported next to its figure.

Over TCP, uclient opens about two connections a client from 127.0.0.1, and nattool
admits 64 TCP connections a source address: 50 clients are refused some (uclient then
stops with "recv: Success"); ``--clients 20 --messages 5000`` relays the same 100,000
messages.

With ``--cap SHARE`` (Linux, root) each server is held to the same share of one core
(``cpu_cap.py``): with an offered load above what that share relays, the relayed
packets per second of wall time compare what each server does with the same CPU (and
the losses show which one could not keep up).

Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cpu_cap import CpuCapError, cap_option
from run_benchmarks import HOST, Server, env, free_port, launch, stop_all

USER, PASSWORD, REALM = "bench", "bench-password", "bench"
# nattool servers' relayed ports: a range of this many each from 20000, clear of
# coturn's (49152-65535), so that no server takes another's.
NATTOOL_RELAY_FIRST, NATTOOL_RELAY_SPAN = 20000, 4000
_TOTALS = re.compile(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")
_LOST = re.compile(r"Total lost packets (\d+)")


def start_coturn_turn(work: Path) -> Server:
    exe = shutil.which("turnserver")
    if exe is None:
        raise RuntimeError("coturn's turnserver is not installed (Debian package coturn)")
    port = free_port()
    args = [
        exe, "-n", "--lt-cred-mech", "--realm", REALM, "--user", f"{USER}:{PASSWORD}",
        "--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls",
        "--listening-ip", HOST, "--relay-ip", HOST, "--listening-port", str(port),
        "--simple-log", "--log-file", str(work / "coturn-turn.log"),
        "--pidfile", str(work / "coturn-turn.pid"), "--userdb", str(work / "coturn-turndb"),
    ]
    return launch("coturn", port, args, work / "coturn-turn.out", work)


def start_nattool_turn(work: Path, clients: int, relay_ports: str, coalesce_us: str | None = None) -> Server:
    port = free_port()
    home = work / f"home-nattool-turn-{port}"
    home.mkdir(exist_ok=True)
    quota = str(4 * clients + 10)  # uclient -y makes more than one allocation per client
    args = [
        sys.executable, "-m", "nattool", "serve", "--host", HOST, "--port", str(port),
        "--store", "memory", "--rate-limit", "0", "--log-level", "warning",
        "--turn-user", f"{USER}:{PASSWORD}", "--realm", REALM, "--relay-bandwidth", "0",
        "--relay-ports", relay_ports, "--user-quota", quota, "--source-quota", quota,
        "--allow-peer", f"{HOST}/32",  # the --peer echo server (uclient -y needs none)
    ]
    name = "nattool"
    if coalesce_us is not None:
        args += ["--coalesce-us", coalesce_us]
        name = f"nattool --coalesce-us {coalesce_us}"
    return launch(name, port, args, work / f"nattool-turn-{port}.log", work, env(home))


def start_peer(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """coturn's ``turnutils_peer``: a UDP echo server on HOST, the peer of every client."""
    port = free_port()
    with open(work / "peer.log", "wb") as log:
        proc = subprocess.Popen(["turnutils_peer", "-L", HOST, "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    time.sleep(0.5)  # it binds at once; nothing to ask it before the clients do
    if proc.poll() is not None:
        raise RuntimeError(f"turnutils_peer exited at once (code {proc.returncode}); see {work / 'peer.log'}")
    return proc, port


@dataclass(frozen=True)
class RelayRun:
    sent: int
    relayed: int
    lost: int
    cpu: float  # server CPU seconds over the run
    wall: float

    @property
    def per_second(self) -> float:
        return self.relayed / self.wall

    @property
    def per_cpu_second(self) -> float:
        return self.relayed / self.cpu if self.cpu > 0 else float("nan")


def uclient_argv(port: int, opts: argparse.Namespace, peer_port: int | None = None) -> list[str]:
    peers = ["-y"] if peer_port is None else ["-e", HOST, "-r", str(peer_port)]
    return [
        "turnutils_uclient", *peers, "-c", "-m", str(opts.clients), "-n", str(opts.messages),
        "-l", str(opts.length), "-z", str(opts.interval), "-u", USER, "-w", PASSWORD,
        "-p", str(port), *(["-t"] if opts.tcp else []), *(["-s"] if opts.indications else []), HOST,
    ]


def run_uclient(server: Server, opts: argparse.Namespace, peer_port: int | None = None) -> RelayRun:
    argv = uclient_argv(server.port, opts, peer_port)
    user0, system0 = server.cpu_times()
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=opts.timeout)
    wall = time.monotonic() - started
    user1, system1 = server.cpu_times()
    text = out.stdout + out.stderr
    totals, lost = _TOTALS.findall(text), _LOST.search(text)
    if not totals or lost is None:
        raise RuntimeError(f"{server.name}: turnutils_uclient gave no totals (exit {out.returncode}):\n{text[-3000:]}")
    sent, relayed = map(int, totals[-1])
    return RelayRun(sent, relayed, int(lost.group(1)), user1 - user0 + system1 - system0, wall)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=50, help="uclient -m: clients (allocations)")
    ap.add_argument("--messages", type=int, default=2000, help="uclient -n: messages per client")
    ap.add_argument("--length", type=int, default=100, help="uclient -l: message length, bytes")
    ap.add_argument("--interval", type=int, default=2, help="uclient -z: ms between a session's messages")
    ap.add_argument("--tcp", action="store_true", help="uclient -t: TURN over TCP (use --clients 20: 64 connections a source)")
    ap.add_argument("--indications", action="store_true", help="uclient -s: Send/Data indications, no channels")
    ap.add_argument("--cap", type=float, metavar="SHARE", help="hold each server to SHARE of one core (cgroup quota; Linux, root)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for one uclient run")
    ap.add_argument("--peer", action="store_true",
                    help="every client's peer is an echo server (turnutils_peer) instead of another client (-y): "
                         "the echoes come in on the relayed sockets")
    ap.add_argument("--coalesce", metavar="US,US,...",
                    help="one nattool server per --coalesce-us value, each measured (default: one, its default setting)")
    opts = ap.parse_args()
    for tool in ("turnutils_uclient", *(["turnutils_peer"] if opts.peer else [])):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed (Debian package coturn)")
    try:
        coalesce: list[str | None] = [str(int(v)) for v in opts.coalesce.split(",")] if opts.coalesce else [None]
    except ValueError:
        ap.error(f"--coalesce: comma-separated whole microseconds, not {opts.coalesce!r}")
    cap = cap_option(ap, opts.cap)
    runs: dict[str, list[RelayRun]] = {}
    ratios: dict[str, list[float]] = {}
    peer: subprocess.Popen[bytes] | None = None
    peer_port: int | None = None
    with tempfile.TemporaryDirectory(prefix="nattool-relay-bench-") as tmp:
        work = Path(tmp)
        servers: list[Server] = []
        try:
            if opts.peer:
                peer, peer_port = start_peer(work)
            servers.append(start_coturn_turn(work))
            for k, value in enumerate(coalesce):
                low = NATTOOL_RELAY_FIRST + k * NATTOOL_RELAY_SPAN
                servers.append(start_nattool_turn(work, opts.clients, f"{low}-{low + NATTOOL_RELAY_SPAN - 1}", value))
            if cap is not None:
                cap.put([s.proc.pid for s in servers])
            for rnd in range(opts.rounds):
                order = servers if rnd % 2 == 0 else servers[::-1]
                this: dict[str, RelayRun] = {}
                for server in order:
                    run = this[server.name] = run_uclient(server, opts, peer_port)
                    runs.setdefault(server.name, []).append(run)
                    print(f"round {rnd + 1}: {server.name:8} sent {run.sent:,} relayed {run.relayed:,} lost {run.lost} "
                          f"in {run.wall:.1f} s; server CPU {run.cpu:.2f} s -> {run.per_cpu_second:,.0f} packets per CPU second",
                          file=sys.stderr, flush=True)
                for name, run in this.items():
                    if name != "coturn":
                        ratios.setdefault(name, []).append(run.per_cpu_second / this["coturn"].per_cpu_second)
        except CpuCapError as exc:
            print(f"relay_bench.py: --cap: {exc}", file=sys.stderr)
            return 2
        finally:
            stop_all(servers, cap)
            if peer is not None:
                peer.terminate()
                peer.wait(10)
    print()
    print(f"turnutils_uclient {' '.join(uclient_argv(0, opts, 0 if opts.peer else None)[1:]).replace('-p 0', '-p PORT').replace('-r 0', '-r PEER_PORT')}; "
          f"{opts.rounds} rounds (median); {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
          f"Python {platform.python_version()}, kernel {platform.release()}")
    if cap is not None:
        print(f"capped: each server held to {cap.share:g} of one core (cgroup CPU quota)")
    print()
    print("| server | relayed packets | lost | relayed packets/s | server CPU s | relayed packets per CPU second | vs coturn |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ref = statistics.median(r.per_cpu_second for r in runs["coturn"])
    for name, rs in sorted(runs.items(), key=lambda item: item[0] != "coturn"):
        rate = statistics.median(r.per_cpu_second for r in rs)
        print(f"| {name} | {statistics.median(r.relayed for r in rs):,.0f} | {max(r.lost for r in rs)} | "
              f"{statistics.median(r.per_second for r in rs):,.0f} | {statistics.median(r.cpu for r in rs):.2f} | "
              f"{rate:,.0f} | {rate / ref:.2f}x |")
    print()
    for name, rs in ratios.items():
        print(f"{name} / coturn by round: " + ", ".join(f"{r:.2f}x" for r in rs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
