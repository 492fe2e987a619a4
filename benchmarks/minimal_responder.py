"""The least a Python UDP responder can do: a floor to measure `nattool serve` against.

    python benchmarks/minimal_responder.py PORT             # asyncio on uvloop
    python benchmarks/minimal_responder.py PORT --blocking  # a blocking recvfrom/sendto loop
    python benchmarks/minimal_responder.py PORT --blocking --wait-us 200  # that loop, waiting after each wake-up

Answers a bare ``//nat`` with the source endpoint, a bare STUN Binding request
with a Binding success that carries nothing but XOR-MAPPED-ADDRESS, and a seed-form
registration (``//51pwn/P2P&E2E/GROUP/0/LAN/MAC``) with the requester's line and the
group's other endpoints, newest first, from a dict of dicts; on 127.0.0.1, IPv4
only; everything else is ignored. No validation beyond splitting, no expiry, caps,
rate limit, amplification bound, store or counters: the "minimal Python" rows of
issue 6's reference table, and the same idea for registrations. ``run_benchmarks.py --floor`` runs it beside coturn and
`nattool serve`, so the table shows how far the tracker's hot paths are from what
any Python responder reaches on the same machine in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from nattool.net.coalescing import fine_timer_slack

DRAIN_BATCH = 256
_BARE_BINDING_HEAD = b"\x00\x01\x00\x00\x21\x12\xa4\x42"
_SUCCESS_HEAD = b"\x01\x01\x00\x0c\x21\x12\xa4\x42"  # Binding success, 12 bytes of attributes
_XMA_V4 = b"\x00\x20\x00\x08\x00\x01"


_REGISTER = b"//51pwn/P2P&E2E/"
_groups: dict[str, dict[str, str]] = {}


def register(data: bytes, host: str, port: int) -> bytes | None:
    fields = data[len(_REGISTER) :].decode("ascii", "replace").split("/")
    if len(fields) != 4:
        return None
    group_key, _public, lan, mac = fields
    endpoint = f"{host}:{port}"
    group = _groups.get(group_key)
    if group is None:
        group = _groups[group_key] = {}
    group.pop(mac, None)
    others = list(group.values())
    others.reverse()
    group[mac] = endpoint
    return "\n".join([f"{endpoint};{lan}", *others]).encode()


def reply_to(data: bytes, host: str, port: int) -> bytes | None:
    if data[: len(_REGISTER)] == _REGISTER:
        return register(data, host, port)
    if data == b"//nat":
        return f"{host}:{port}".encode()
    if len(data) == 20 and data[:8] == _BARE_BINDING_HEAD:
        x = int.from_bytes(socket.inet_aton(host), "big") ^ 0x2112A442
        return b"".join((_SUCCESS_HEAD, data[8:20], _XMA_V4, (port ^ 0x2112).to_bytes(2, "big"), x.to_bytes(4, "big")))
    return None


def answer(sendto: Callable[[bytes, Any], int], data: bytes, addr: Any) -> None:
    reply = reply_to(data, addr[0], addr[1])
    if reply is not None:
        try:
            sendto(reply, addr)
        except OSError:
            pass


def serve_blocking(sock: socket.socket, wait_us: int = 0) -> None:
    """Answer each datagram as it comes; with ``wait_us``, after each wake-up sleep
    that long (timer slack 1 us) and then answer everything that came meanwhile."""
    recvfrom, sendto = sock.recvfrom, sock.sendto
    if not wait_us:
        while True:
            data, addr = recvfrom(65535)
            answer(sendto, data, addr)
    fine_timer_slack()
    wait, sleep, dontwait = wait_us / 1e6, time.sleep, socket.MSG_DONTWAIT
    while True:
        data, addr = recvfrom(65535)
        answer(sendto, data, addr)
        sleep(wait)
        for _ in range(DRAIN_BATCH):
            try:
                data, addr = recvfrom(65535, dontwait)
            except (BlockingIOError, InterruptedError):
                break
            answer(sendto, data, addr)


async def serve_asyncio(sock: socket.socket) -> None:
    sock.setblocking(False)
    recvfrom, sendto = sock.recvfrom, sock.sendto

    def drain() -> None:
        # One wake-up reads a burst, as `nattool serve` does.
        for _ in range(DRAIN_BATCH):
            try:
                data, addr = recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            answer(sendto, data, addr)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_reader(sock.fileno(), drain)
    await stop.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--blocking", action="store_true", help="a blocking recvfrom/sendto loop instead of asyncio on uvloop")
    ap.add_argument("--wait-us", type=int, default=0, help="with --blocking: after each wake-up, sleep this long, then answer what came meanwhile")
    opts = ap.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    sock.bind(("127.0.0.1", opts.port))
    if opts.blocking:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            serve_blocking(sock, opts.wait_us)
        except KeyboardInterrupt:
            pass
        return 0
    import uvloop

    uvloop.run(serve_asyncio(sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
