"""A burst of registrations read in one wake-up is answered as it is served.

Registrations are answered only once the store has committed them, and one commit
serves many. The tracker used to commit and answer once per wake-up, so after a
stall (the tracker or the sender descheduled for a moment) the first request of the
burst waited for the last one to be served: the registration p99 at half load.
Now it commits and answers every ``ANSWER_EVERY`` registrations. The tracker runs in
this test's event loop, on real sockets, so that the whole burst is in its socket
before its first wake-up.
"""

from __future__ import annotations

import asyncio
import math
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest
from conftest import free_udp_port

from nattool.net.server import ANSWER_EVERY, ServerConfig, TrackerServer
from nattool.protocol.text import REGISTER_PREFIX
from nattool.store.base import StoreLimits
from nattool.store.factory import open_store

MEMBERS = 4 * ANSWER_EVERY
GROUPS = 4  # 16 members a group: the keepalive lane's small groups


@asynccontextmanager
async def _serving(store_spec: str) -> AsyncIterator[tuple[TrackerServer, int]]:
    """A tracker in this event loop on a free loopback port, and that port."""
    port = free_udp_port()
    config = ServerConfig(hosts=("127.0.0.1",), port=port, rate_limit=0)
    server = TrackerServer(config, open_store(store_spec, StoreLimits()))
    await server.start()
    try:
        yield server, port
    finally:
        await server.stop()


def _moved(counters: dict[str, int], before: dict[str, int], *keys: str) -> dict[str, int]:
    return {key: counters[key] - before.get(key, 0) for key in keys}


async def _burst(server: TrackerServer, socks: list[socket.socket], port: int) -> tuple[list[str], dict[str, int]]:
    """Send one registration from every socket before the tracker reads any; their
    replies, and how the tracker's counters moved."""
    counters = server.core.counters
    before = dict(counters)
    for n, sock in enumerate(socks):
        sock.sendto(f"{REGISTER_PREFIX}burst{n % GROUPS}/0/0/0".encode(), ("127.0.0.1", port))
    loop = asyncio.get_running_loop()
    replies = [(await asyncio.wait_for(loop.sock_recv(sock, 65535), 5)).decode() for sock in socks]
    return replies, _moved(counters, before, "register", "register_keepalive", "store_batches")


Burst = tuple[list[str], dict[str, int]]  # the replies, and how the counters moved


async def _first_registrations_then_keepalives(store_spec: str) -> tuple[list[str], list[Burst]]:
    socks = []
    async with _serving(store_spec) as (server, port):
        try:
            for _ in range(MEMBERS):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", 0))
                sock.setblocking(False)
            endpoints = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in socks]
            return endpoints, [await _burst(server, socks, port), await _burst(server, socks, port)]
        finally:
            for sock in socks:
                sock.close()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_burst_is_committed_and_answered_every_so_many_registrations(store: str, tmp_path: Path) -> None:
    spec = "memory" if store == "memory" else f"sqlite:{tmp_path / 'tracker.db'}"
    endpoints, ((first, first_moved), (again, again_moved)) = asyncio.run(_first_registrations_then_keepalives(spec))
    chunks = math.ceil(MEMBERS / ANSWER_EVERY)
    assert len(first) == len(again) == MEMBERS
    # Every request answered: the first registrations as the store's batch, the
    # second round by the keepalive lane ...
    assert first_moved["register"] == MEMBERS and first_moved["register_keepalive"] == 0
    assert again_moved["register"] == MEMBERS and again_moved["register_keepalive"] == MEMBERS
    # ... and neither held for one commit at the end of the wake-up (a burst split
    # over several wake-ups only adds commits).
    assert first_moved["store_batches"] >= chunks, first_moved
    assert again_moved["store_batches"] >= chunks, again_moved
    # Each reply lists only the burst's own members, its sender first.
    for replies in (first, again):
        for endpoint, reply in zip(endpoints, replies):
            lines = reply.splitlines()
            assert lines[0] == endpoint and set(lines) <= set(endpoints), (endpoint, lines)


def _member(n: int) -> bytes:
    """Member ``n`` of one group, all from one socket: its LAN address names it in
    its reply's first line."""
    return f"{REGISTER_PREFIX}mixed/0/10.0.0.{n}/02:00:00:00:00:{n:02x}".encode()


async def _mixed_burst() -> tuple[list[str], dict[str, int]]:
    loop = asyncio.get_running_loop()
    async with _serving("memory") as (server, port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            known = range(1, 9)
            for n in known:
                sock.sendto(_member(n), ("127.0.0.1", port))
                await asyncio.wait_for(loop.sock_recv(sock, 65535), 5)
            counters = server.core.counters
            before = dict(counters)
            # Keepalives, then more newcomers than one commit answers, then the
            # same keepalives again: all read in one wake-up.
            burst = [*known, *range(9, 9 + ANSWER_EVERY), *known]
            for n in burst:
                sock.sendto(_member(n), ("127.0.0.1", port))
            replies = [(await asyncio.wait_for(loop.sock_recv(sock, 65535), 5)).decode() for _ in burst]
            moved = _moved(counters, before, "register_keepalive", "store_batches")
    return [reply.splitlines()[0] for reply in replies], {"burst": len(burst), **moved}


def test_a_burst_mixing_keepalives_and_newcomers_is_answered_in_order() -> None:
    firsts, moved = asyncio.run(_mixed_burst())
    lans = [line.split(";", 1)[1] for line in firsts]
    expected = [f"10.0.0.{n}" for n in [*range(1, 9), *range(9, 9 + ANSWER_EVERY), *range(1, 9)]]
    # In the order they came: the keepalives read before the newcomers are answered
    # before the newcomers' commit ...
    assert lans == expected
    # ... and once the newcomers are answered, keepalives take the lane again.
    assert moved["register_keepalive"] == 16, moved
    assert moved["store_batches"] >= 3, moved
