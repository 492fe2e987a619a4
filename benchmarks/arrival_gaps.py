"""How evenly a load generator sends: a UDP sink that answers ``//nat`` and reports the
gaps between arrivals, from the kernel's receive timestamps.

    python benchmarks/arrival_gaps.py PORT [--seconds 3]   # then, in another shell:
    nattool bench 127.0.0.1:PORT --mix nat --rate 50000 --duration 4

At 50,000 requests/s an even generator gives gaps of about 20 us; one that naps and
then sends what is due gives bursts (gaps of a few us) and long pauses. Which of the two
a server sees changes what a wake-up costs it, so the CPU per request measured at a
fixed rate depends on it. The sink stops after ``--seconds`` without a datagram.
Loopback only.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys

_SO_TIMESTAMPNS = 35  # Linux
_TIMESPEC = struct.Struct("@qq")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--seconds", type=float, default=3.0, help="stop after this long without a datagram")
    opts = ap.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", opts.port))
    sock.settimeout(opts.seconds)
    arrivals: list[int] = []
    try:
        while True:
            _data, anc, _flags, addr = sock.recvmsg(2048, 64)
            sec, nsec = _TIMESPEC.unpack(anc[0][2])
            arrivals.append(sec * 1_000_000_000 + nsec)
            sock.sendto(f"{addr[0]}:{addr[1]}".encode(), addr)
    except (socket.timeout, KeyboardInterrupt):
        pass
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    if not gaps:
        print("arrival_gaps.py: fewer than two datagrams", file=sys.stderr)
        return 1
    n = len(gaps)
    cuts = " / ".join(f"{gaps[min(n - 1, int(n * q))] / 1e3:.1f}" for q in (0.1, 0.5, 0.9, 0.99))
    print(f"{n + 1} datagrams; gap p10 / p50 / p90 / p99: {cuts} us; under 3 us: {sum(g < 3000 for g in gaps) / n:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
