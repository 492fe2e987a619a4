"""Server memory with one million live members (issue: at most 512 MiB).

    python benchmarks/million_members.py [--members 1000000] [--groups 100000] [--store sqlite] [--rounds 1]

Not run in CI. Starts `nattool serve` on loopback (default embedded SQLite store in a
temporary directory, `--rate-limit 0`, a long TTL so nobody expires during the load),
registers N distinct members (seed form, one LAN address each) from 256 sockets on
distinct 127.64.x.y source addresses with a window of one request per socket, checks
no reply is an error, then prints the server's resident memory (VmRSS) and the
slowest reply. With ``--rounds N`` every member registers N times from its own
source (the later registrations are keepalives).
With the SQLite store it then stops the server (SIGTERM), starts it again on the
same file and prints how long the stop and the start took, and the resident memory
after the start; a member's registration must then list its group's others.
Loopback only; bounded in count.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLOW_REPLY_S = 0.05  # replies slower than this are counted: the server stalled


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=1_000_000)
    ap.add_argument("--groups", type=int, default=100_000)
    ap.add_argument("--store", default="sqlite", help="sqlite (temporary file) or memory")
    ap.add_argument("--sockets", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1, help="registrations per member (the later ones are keepalives)")
    opts = ap.parse_args()
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="nattool-million-")
    store = f"sqlite:{tmp}/tracker.db" if opts.store == "sqlite" else "memory"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server, banner = start_server(port, store, opts.members, env)
    try:
        print(banner, flush=True)
        base = rss_mib(server.pid)
        socks = []
        for i in range(opts.sockets):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.64.{i >> 8}.{i & 255 or 1}", 0))
            s.setblocking(False)
            socks.append(s)
        by_fd = {s.fileno(): k for k, s in enumerate(socks)}
        pending: dict[int, tuple[int, float]] = {}
        # Member m always registers from socket m % sockets (one source IP each), so
        # its later registrations are keepalives; each socket goes through its own
        # members, round after round.
        todo = [
            iter([m for _ in range(opts.rounds) for m in range(k, opts.members, len(socks))])
            for k in range(len(socks))
        ]
        total = opts.members * opts.rounds
        done = slow = resent = 0
        slowest = 0.0
        started = time.perf_counter()
        poller = select.epoll()
        for s in socks:
            poller.register(s.fileno(), select.EPOLLIN)

        def send(k: int, m: int) -> None:
            socks[k].sendto(register_request(m, opts.groups), ("127.0.0.1", port))
            pending[k] = (m, time.monotonic())

        for k in range(len(socks)):
            m = next(todo[k], None)
            if m is not None:
                send(k, m)
        while done < total:
            if server.poll() is not None:
                raise SystemExit(f"nattool serve died (exit {server.returncode})")
            for fd, _ in poller.poll(0.5):
                k = by_fd[fd]
                try:
                    reply = socks[k].recv(2048)
                except BlockingIOError:
                    continue
                if reply.startswith(b"ERR"):
                    raise SystemExit(f"server refused: {reply!r}")
                waited = time.monotonic() - pending[k][1]
                slowest = max(slowest, waited)
                slow += waited > SLOW_REPLY_S
                done += 1
                m = next(todo[k], None)
                if m is not None:
                    send(k, m)
                else:
                    pending.pop(k, None)
            now = time.monotonic()
            for k, (m, sent) in list(pending.items()):
                if now - sent > 1.0:  # lost: send again
                    send(k, m)
                    resent += 1
        elapsed = time.perf_counter() - started
        time.sleep(1.0)
        rss = rss_mib(server.pid)
        print(
            f"{opts.members:,} members in {opts.groups:,} groups registered {opts.rounds} time(s) each in "
            f"{elapsed:.0f} s ({total / elapsed:,.0f}/s); server RSS {rss:,.0f} MiB (empty: {base:,.0f} MiB), "
            f"{(rss - base) * 1024 * 1024 / opts.members:,.0f} bytes/member; store {opts.store}; "
            f"slowest reply {slowest * 1e3:,.0f} ms, {slow:,} over {SLOW_REPLY_S * 1e3:.0f} ms, {resent:,} sent again"
        )
        if opts.store == "sqlite":
            restart(server, port, store, opts, env, socks[0])
        return 0 if rss <= 512 else 1
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def register_request(m: int, groups: int) -> bytes:
    """Member ``m``'s registration (seed form): group m % groups, a LAN address and a
    MAC of its own."""
    mac = f"02:{(m >> 32) & 255:02x}:{(m >> 24) & 255:02x}:{(m >> 16) & 255:02x}:{(m >> 8) & 255:02x}:{m & 255:02x}"
    lan = f"10.{(m >> 16) & 255}.{(m >> 8) & 255}.{m & 255 or 1}"
    return f"//51pwn/P2P&E2E/00000001-0000-4000-8000-{m % groups:012x}/0/{lan}/{mac}".encode()


def start_server(port: int, store: str, members: int, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """Start `nattool serve`; return it and its banner, printed once it serves."""
    server = subprocess.Popen(
        [sys.executable, "-m", "nattool", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--rate-limit", "0", "--ttl", "3600", "--store", store,
         "--max-members", str(members + 10), "--max-groups-per-source", "1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
    )
    assert server.stdout is not None
    banner = server.stdout.readline().strip()
    if not banner:
        raise SystemExit(f"nattool serve did not start (exit {server.wait()})")
    return server, banner


def restart(server: subprocess.Popen[str], port: int, store: str, opts: argparse.Namespace, env: dict[str, str], sock: socket.socket) -> None:
    """Stop the server, start it on the same file, and check that it kept the members."""
    started = time.perf_counter()
    server.terminate()
    server.wait(timeout=600)
    stopped = time.perf_counter() - started
    started = time.perf_counter()
    again, _ = start_server(port, store, opts.members, env)
    try:
        loaded = time.perf_counter() - started
        rss = rss_mib(again.pid)
        # Member 0 again, from its own socket: the reply lists its group's others.
        sock.setblocking(True)
        sock.settimeout(5.0)
        sock.sendto(register_request(0, opts.groups), ("127.0.0.1", port))
        lines = sock.recv(4096).decode().split("\n")
        expected = len(range(0, opts.members, opts.groups))  # members m of group 0: m % groups == 0
        print(
            f"restart: stopped in {stopped:.1f} s, serving again {loaded:.1f} s after the start "
            f"(every member loaded), server RSS {rss:,.0f} MiB; member 0's group lists "
            f"{len(lines) - 1} others (expected {expected - 1})",
            flush=True,
        )
        if len(lines) != expected:
            raise SystemExit("the restarted server lost members")
    finally:
        again.terminate()
        again.wait(timeout=600)


if __name__ == "__main__":
    sys.exit(main())
