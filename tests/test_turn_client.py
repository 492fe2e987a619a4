"""The pure TURN client (nattool.protocol.turn_client): with a fake clock against the
project's TurnCore (tests/relay_world.py), and once against a real coturn on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.protocol.endpoint import Endpoint
from nattool.protocol.retransmit import backoff_schedule
from nattool.protocol.stun import ErrorCode, MsgClass, Nonce, Realm, StunMessage, XorMappedAddress, parse
from nattool.protocol.turn import Lifetime, TurnMethod, XorPeerAddress, XorRelayedAddress
from nattool.protocol.turn_client import (
    PERMISSION_REFRESH,
    REQUEST_RETRIES,
    REQUEST_TIMEOUT,
    Allocated,
    AllocationFailed,
    PeerData,
    TurnClient,
    TurnCredentials,
    TurnState,
)
from tests.conftest import free_udp_tcp_port
from tests.relay_world import RelayWorld

SERVER = Endpoint.from_text("203.0.113.10:43283")
A = Endpoint.from_text("198.51.100.1:40000")
B = Endpoint.from_text("198.51.100.2:40000")
USERS = {"alice": "secret", "bob": "hunter2"}


def events(c: TurnClient) -> list[object]:
    out = []
    while (e := c.next_event()) is not None:
        out.append(e)
    return out


def pump(world: RelayWorld, clients: dict[Endpoint, TurnClient], now: float, rounds: int = 6) -> list[tuple[Endpoint, object]]:
    """Everything the clients send goes to the server, its answers back, until quiet."""
    seen: list[tuple[Endpoint, object]] = []
    for _ in range(rounds):
        moved = False
        for addr, client in clients.items():
            for data in client.datagrams_to_send(now):
                moved = True
                for dest, reply in world.deliver(data, addr, now):
                    clients[dest].receive_datagram(reply, now)
        for addr, client in clients.items():
            seen += [(addr, e) for e in events(client)]
        if not moved:
            break
    return seen


def allocated_pair(now: float = 0.0) -> tuple[RelayWorld, dict[Endpoint, TurnClient]]:
    world = RelayWorld(SERVER, users=USERS)
    clients = {
        A: TurnClient(SERVER, TurnCredentials("alice", "secret"), b"seed-a", now),
        B: TurnClient(SERVER, TurnCredentials("bob", "hunter2"), b"seed-b", now),
    }
    seen = pump(world, clients, now)
    assert [type(e) for _, e in seen] == [Allocated, Allocated]
    return world, clients


def test_allocate_answers_the_401_with_the_realm_and_nonce_it_gave() -> None:
    world = RelayWorld(SERVER, users=USERS)
    client = TurnClient(SERVER, TurnCredentials("alice", "secret"), b"seed", 0.0)
    first = client.datagrams_to_send(0.0)
    assert len(first) == 1 and parse(first[0]).method == TurnMethod.ALLOCATE
    [(_, challenge)] = world.deliver(first[0], A, 0.0)
    reply = parse(challenge)
    assert reply.msg_class == MsgClass.ERROR and reply.get(ErrorCode).code == 401  # type: ignore[union-attr]
    client.receive_datagram(challenge, 0.0)
    second = client.datagrams_to_send(0.0)
    assert len(second) == 1
    request = parse(second[0])
    assert request.get(Nonce) == reply.get(Nonce) and request.get(Realm) == reply.get(Realm)
    assert request.integrity_offset is not None
    [(_, ok)] = world.deliver(second[0], A, 0.0)
    client.receive_datagram(ok, 0.0)
    [allocated] = events(client)
    assert isinstance(allocated, Allocated)
    assert parse(ok).get(XorRelayedAddress) == XorRelayedAddress(allocated.relayed)
    assert allocated.relayed in world.sockets
    assert allocated.mapped == A
    assert allocated.lifetime == 600
    assert client.state == TurnState.ALLOCATED


def test_a_wrong_password_fails_the_allocation_with_the_servers_code() -> None:
    world = RelayWorld(SERVER, users=USERS)
    clients = {A: TurnClient(SERVER, TurnCredentials("alice", "wrong"), b"seed", 0.0)}
    [(_, failed)] = pump(world, clients, 0.0)
    assert isinstance(failed, AllocationFailed) and failed.code == 401
    assert clients[A].state == TurnState.FAILED and clients[A].get_timer() is None
    assert not world.sockets


def test_data_crosses_the_relay_both_ways_after_a_permission() -> None:
    world, clients = allocated_pair()
    a, b = clients[A], clients[B]
    assert a.relayed is not None and b.relayed is not None
    b.permit(a.relayed, 0.0)
    assert not pump(world, clients, 0.0)
    assert a.send(b.relayed, b"hello", 0.1)
    raw = a.datagrams_to_send(0.1)
    sent = [parse(d) for d in raw]
    # The permission goes before the first Send indication: the server would drop it.
    assert [(m.method, m.msg_class) for m in sent] == [
        (TurnMethod.CREATE_PERMISSION, MsgClass.REQUEST), (TurnMethod.SEND, MsgClass.INDICATION)]
    assert sent[1].get(XorPeerAddress) == XorPeerAddress(b.relayed)
    for data in raw:
        for dest, reply in world.deliver(data, A, 0.1):
            clients[dest].receive_datagram(reply, 0.1)
    assert events(b) == [PeerData(a.relayed, b"hello")]
    assert b.send(a.relayed, b"and back", 0.2)
    seen = pump(world, clients, 0.2)
    assert seen == [(A, PeerData(b.relayed, b"and back"))]


def test_nothing_is_sent_before_the_allocation() -> None:
    client = TurnClient(SERVER, TurnCredentials("alice", "secret"), b"seed", 0.0)
    assert not client.send(B, b"early", 0.0)
    assert client.counters["not_allocated"] == 1


def test_udp_requests_are_retransmitted_on_the_schedule_then_fail() -> None:
    client = TurnClient(SERVER, TurnCredentials("alice", "secret"), b"seed", 0.0)
    first = client.datagrams_to_send(0.0)
    t = 0.0
    sends = 1
    for wait in backoff_schedule(REQUEST_TIMEOUT, REQUEST_RETRIES)[:-1]:
        t += wait
        assert client.get_timer() == pytest.approx(t)
        client.handle_timer(t)
        again = client.datagrams_to_send(t)
        assert again == first  # the same transaction, byte for byte
        sends += 1
    assert sends == REQUEST_RETRIES + 1
    t = client.get_timer()  # type: ignore[assignment]
    client.handle_timer(t)
    [failed] = events(client)
    assert isinstance(failed, AllocationFailed) and failed.code is None
    assert client.get_timer() is None


def test_over_a_stream_a_request_goes_once() -> None:
    client = TurnClient(SERVER, TurnCredentials("alice", "secret"), b"seed", 0.0, reliable=True)
    assert len(client.datagrams_to_send(0.0)) == 1
    assert client.get_timer() == REQUEST_TIMEOUT
    client.handle_timer(REQUEST_TIMEOUT)
    assert client.datagrams_to_send(REQUEST_TIMEOUT) == []
    assert isinstance(events(client)[0], AllocationFailed)


def test_refresh_and_permissions_keep_the_relay_alive_across_stale_nonces() -> None:
    world, clients = allocated_pair()
    a, b = clients[A], clients[B]
    assert a.relayed is not None and b.relayed is not None
    a.permit(b.relayed, 0.0)
    b.permit(a.relayed, 0.0)
    pump(world, clients, 0.0)
    # An hour: five Refreshes, fifteen permission refreshes, nonces going stale (10 min).
    t = 0.0
    while t < 3600.0:
        t = min(c.get_timer() for c in clients.values())  # type: ignore[type-var]
        assert t is not None
        for c in clients.values():
            c.handle_timer(t)
        assert not [e for _, e in pump(world, clients, t)]
    assert world.core.counters.stale_nonces > 0
    assert world.core.live == 2
    assert a.state == b.state == TurnState.ALLOCATED
    assert a.send(b.relayed, b"still here", t)
    assert pump(world, clients, t) == [(B, PeerData(a.relayed, b"still here"))]


def test_permissions_are_refreshed_before_the_server_forgets_them() -> None:
    world, clients = allocated_pair()
    a, b = clients[A], clients[B]
    assert a.relayed is not None and b.relayed is not None
    b.permit(a.relayed, 0.0)
    pump(world, clients, 0.0)
    assert b.get_timer() == pytest.approx(PERMISSION_REFRESH)
    b.handle_timer(PERMISSION_REFRESH)
    [refresh] = [parse(d) for d in b.datagrams_to_send(PERMISSION_REFRESH)]
    assert refresh.method == TurnMethod.CREATE_PERMISSION
    assert refresh.get(XorPeerAddress) == XorPeerAddress(a.relayed)


def test_a_success_without_our_key_is_ignored() -> None:
    world = RelayWorld(SERVER, users=USERS)
    client = TurnClient(SERVER, TurnCredentials("alice", "secret"), b"seed", 0.0)
    [first] = client.datagrams_to_send(0.0)
    [(_, challenge)] = world.deliver(first, A, 0.0)
    client.receive_datagram(challenge, 0.0)
    [second] = client.datagrams_to_send(0.0)
    txid = parse(second).transaction_id
    forged = StunMessage(MsgClass.SUCCESS, TurnMethod.ALLOCATE, txid,
                         (XorRelayedAddress(Endpoint.from_text("192.0.2.66:1")), XorMappedAddress(A), Lifetime(600)))
    client.receive_datagram(forged.to_wire(integrity_key=b"not the key"), 0.0)
    client.receive_datagram(forged.to_wire(), 0.0)
    assert client.counters["bad_integrity"] == 2 and not events(client)
    [(_, ok)] = world.deliver(second, A, 0.0)
    client.receive_datagram(ok, 0.0)
    assert isinstance(events(client)[0], Allocated)


def test_close_gives_the_allocation_back() -> None:
    world, clients = allocated_pair()
    clients[A].close(1.0)
    assert clients[A].state == TurnState.CLOSED
    [bye] = clients[A].datagrams_to_send(1.0)
    assert parse(bye).method == TurnMethod.REFRESH and parse(bye).get(Lifetime) == Lifetime(0)
    world.deliver(bye, A, 1.0)
    assert world.core.live == 1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    world, clients = allocated_pair()
    clients[A].receive_datagram(data, 1.0)
    clients[A].receive_datagram(b"\x01\x17" + data, 1.0)  # a Data indication's type, then garbage


# --------------------------------------------------------------------------- real coturn


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Endpoint]:
    if shutil.which("turnserver") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("coturn (turnserver) is required in CI")
        pytest.skip("coturn (turnserver) not installed")
    port = free_udp_tcp_port()  # coturn listens on TCP too
    conf = tmp_path / "turnserver.conf"
    conf.write_text("\n".join([
        "listening-ip=127.0.0.1", f"listening-port={port}", "relay-ip=127.0.0.1", "lt-cred-mech",
        "user=alice:secret", "user=bob:hunter2", "realm=coturn.test", "allow-loopback-peers", "no-cli",
        "no-tls", "no-dtls", "no-tcp-relay", "min-port=49152", "max-port=65535", "log-file=stdout",
        "simple-log", f"pidfile={tmp_path / 'turnserver.pid'}", ""]))
    proc = subprocess.Popen(["turnserver", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield Endpoint.from_text(f"127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(10)


def test_against_coturn_two_clients_exchange_through_their_allocations(coturn: Endpoint) -> None:
    sockets, clients = [], []
    for user, password in USERS.items():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.05)
        sockets.append(sock)
        clients.append(TurnClient(coturn, TurnCredentials(user, password), os.urandom(16), time.monotonic()))
    got: list[list[object]] = [[], []]

    def run(seconds: float, until: object = None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for i, (sock, client) in enumerate(zip(sockets, clients)):
                now = time.monotonic()
                if (timer := client.get_timer()) is not None and timer <= now:
                    client.handle_timer(now)
                for data in client.datagrams_to_send(now):
                    sock.sendto(data, (str(coturn.ip), coturn.port))
                try:
                    data, src = sock.recvfrom(4096)
                except socket.timeout:
                    continue
                assert src == (str(coturn.ip), coturn.port)
                client.receive_datagram(data, time.monotonic())
                got[i] += events(client)
            if until is not None and until in got[1]:
                return

    try:
        # coturn may still be starting: the client's own retransmissions cover that.
        run(6.0)
        assert all(c.state == TurnState.ALLOCATED for c in clients), got
        a, b = clients
        assert a.relayed is not None and b.relayed is not None
        b.permit(a.relayed, time.monotonic())
        run(0.3)
        a.send(b.relayed, b"through coturn", time.monotonic())
        run(3.0, until=PeerData(a.relayed, b"through coturn"))
        assert PeerData(a.relayed, b"through coturn") in got[1]
    finally:
        for sock in sockets:
            sock.close()
