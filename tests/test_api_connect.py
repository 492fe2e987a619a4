"""`nattool.diag.connect.connect()` (``nattool.connect``) as a library: two PeerConnections
on loopback against a real `nattool serve` exchange datagrams both ways and close cleanly.

127.0.0.2 and 127.0.0.3 stand for two hosts with different public IPs, as in
test_connect_loopback.py."""

from __future__ import annotations

import asyncio
import os

import pytest

from nattool.diag.connect import ConnectionClosed, NoPath, PeerConnection, connect
from nattool.errors import NattoolError, NetworkError, NoAnswer, UsageError
from tests.conftest import TrackerFactory, free_udp_port, nattool_env

A_IP, B_IP = "127.0.0.2", "127.0.0.3"


def open_fds() -> set[str]:
    """This process's sockets and other anonymous inodes (epoll, eventfd), by fd and inode.
    Not its pipes and files: a lab scenario started with the session (tests/natlab/background.py)
    may open those in its own thread meanwhile."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since the listing (the listing's own fd, say)
            continue
        if target.startswith(("socket:", "anon_inode:")):
            found.add(f"{fd} {target}")
    return found


async def pair(endpoint: str, group: str, **kwargs: object) -> tuple[PeerConnection, PeerConnection]:
    a = await connect(group, [endpoint], port=0, bind=A_IP, lan=(), **kwargs)  # type: ignore[arg-type]
    b = await connect(group, [endpoint], port=0, bind=B_IP, lan=(), **kwargs)  # type: ignore[arg-type]
    return a, b


def test_two_connections_exchange_datagrams_both_ways_and_close_cleanly(tracker: TrackerFactory) -> None:
    tp = tracker()
    fds_before = open_fds()

    async def main() -> None:
        a, b = await pair(tp.endpoint, "api-pair")
        async with a, b:
            b_id = await a.wait_for_peer(timeout=10)
            a_id = await b.wait_for_peer(timeout=10)
            assert a.peers == [b_id] and b.peers == [a_id] and a_id != b_id
            await a.send(b"ping \x00\xff bytes", to=b_id)
            assert await asyncio.wait_for(b.recv(), 10) == (a_id, b"ping \x00\xff bytes")
            await b.send(b"pong")  # to every peer with a path up
            assert await asyncio.wait_for(a.recv(), 10) == (b_id, b"pong")
            for i in range(5):
                await a.send(b"n%d" % i)
            got = {await asyncio.wait_for(b.recv(), 10) for _ in range(5)}
            assert got == {(a_id, b"n%d" % i) for i in range(5)}
        # Closed: a goodbye went to the other side, and the connection refuses use.
        with pytest.raises(ConnectionClosed):
            await a.send(b"late")
        with pytest.raises(ConnectionClosed):
            await b.recv()
        assert a.peers == []
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())
    assert open_fds() <= fds_before  # every socket closed


def test_the_other_side_hears_the_goodbye_at_once(tracker: TrackerFactory) -> None:
    tp = tracker()

    async def main() -> None:
        a, b = await pair(tp.endpoint, "api-bye", keepalive=30.0)
        try:
            await a.wait_for_peer(timeout=10)
            await b.wait_for_peer(timeout=10)
            await a.aclose()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while b.peers and loop.time() < deadline:
                await asyncio.sleep(0.02)
            assert b.peers == []  # the BYE, not --dead-after (90 s here)
            with pytest.raises(NoPath):
                await b.send(b"nobody there")
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


def test_alone_in_the_group_wait_for_peer_times_out_and_session_gives_up(tracker: TrackerFactory) -> None:
    tp = tracker()

    async def main() -> None:
        async with await connect("api-alone", [tp.endpoint], port=0, bind=A_IP, lan=(), timeout=1.0) as conn:
            with pytest.raises(NoAnswer):
                await conn.wait_for_peer(timeout=0.2)
            with pytest.raises(NoPath):
                await conn.send(b"x")
            # The session gives up after `timeout` with nobody else in the group.
            with pytest.raises(NoAnswer, match="no other member joined the group within 1s"):
                await asyncio.wait_for(conn.recv(), 10)

    asyncio.run(main())


def test_bad_arguments_raise_usage_errors() -> None:
    async def main() -> None:
        for kwargs in ({"group": "bad group"}, {"group": "g", "identity": "nope"}, {"group": "g", "port": 70000}):
            args = {"trackers": ["127.0.0.1"], **kwargs}
            with pytest.raises(UsageError):
                await connect(**args)  # type: ignore[arg-type]
        conn = await connect("g", [f"127.0.0.1:{free_udp_port()}"], port=0, lan=())
        try:
            with pytest.raises(UsageError):
                await conn.send(bytes(2000))
        finally:
            await conn.aclose()

    asyncio.run(main())


def test_no_route_to_any_tracker_is_a_network_error() -> None:
    """Only when sending itself fails: in a fresh network namespace, loopback is down."""
    import subprocess
    import sys

    code = (
        "import asyncio, nattool.diag.connect as c\n"
        "from nattool.errors import NetworkError\n"
        "async def main():\n"
        "    conn = await c.connect('g', ['127.0.0.1:43283'], port=0, lan=(), timeout=5)\n"
        "    try:\n"
        "        await conn.wait_for_peer(timeout=5)\n"
        "    except NetworkError as exc:\n"
        "        print('network error:', exc)\n"
        "    await conn.aclose()\n"
        "asyncio.run(main())\n"
    )
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --net needs root (CAP_SYS_ADMIN)")
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env=nattool_env())
    assert out.returncode == 0, out.stderr
    assert "network error: cannot send to 127.0.0.1:43283" in out.stdout
    assert issubclass(NetworkError, NattoolError)


def test_trackers_are_taken_in_every_form_the_other_functions_take(tracker: TrackerFactory) -> None:
    """One tracker as text, as an Endpoint, alone or in a list, as whoami/register take it."""
    from nattool.protocol.endpoint import Endpoint

    tp = tracker()

    async def main() -> None:
        a = await connect("api-forms", Endpoint.from_text(tp.endpoint), port=0, bind=A_IP, lan=())
        b = await connect("api-forms", tp.endpoint, port=0, bind=B_IP, lan=())
        async with a, b:
            assert await a.wait_for_peer(timeout=10) and await b.wait_for_peer(timeout=10)

    asyncio.run(main())
