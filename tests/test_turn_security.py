"""The TURN relay of `nattool serve` refuses what it must (the README's threat model):
real `nattool serve` processes on loopback, requests built with nattool's own codec."""

from __future__ import annotations

import time

import pytest

from nattool.protocol.endpoint import Endpoint
from nattool.protocol.limits import reply_budget
from nattool.protocol.stun import MsgClass, Nonce, Realm
from nattool.protocol.text import RelayGrant, RelayRequest
from nattool.protocol.turn import Lifetime, RequestedTransport, TurnMethod, XorPeerAddress
from nattool.protocol.turn_auth import rest_password
from turn_helpers import TurnTestClient, error_of, peer_endpoint, recv_or_none, turn_client, udp_peer  # noqa: F401 - fixture

USER = ("--turn-user", "alice:wonderland")


def _allocate(client: TurnTestClient) -> int | None:
    return error_of(client.request(TurnMethod.ALLOCATE, (RequestedTransport(17),)))


def test_allocate_without_credentials_is_challenged_within_the_bound(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker(*USER)
    anonymous = turn_client(tp, None, None)
    for method, attrs in (
        (TurnMethod.ALLOCATE, (RequestedTransport(17),)),
        (TurnMethod.REFRESH, (Lifetime(600),)),
        (TurnMethod.CREATE_PERMISSION, (XorPeerAddress(Endpoint.from_text("192.0.2.7:9")),)),
    ):
        reply = anonymous.request(method, attrs, authenticate=False)
        assert error_of(reply) == 401
        assert isinstance(reply.get(Realm), Realm) and reply.get(Realm).text == "nattool"  # type: ignore[union-attr]
        assert isinstance(reply.get(Nonce), Nonce) and reply.get(Nonce).text  # type: ignore[union-attr]
        assert len(anonymous.last_response) <= reply_budget(len(anonymous.last_request))
    # The smallest Allocate there is (header + REQUESTED-TRANSPORT): still within 128 bytes.
    bare = bytes.fromhex("0003 0008 2112a442") + b"A" * 12 + bytes.fromhex("0019 0004 11000000")
    anonymous.send_raw(bare)
    answer = anonymous.recv_raw()
    assert answer is not None and len(answer) <= 128


def test_wrong_password_and_unknown_user_get_401(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker(*USER)
    assert _allocate(turn_client(tp, "alice", "not-the-password")) == 401
    assert _allocate(turn_client(tp, "mallory", "wonderland", src_ip="127.0.0.3")) == 401
    assert _allocate(turn_client(tp, "alice", "wonderland", src_ip="127.0.0.4")) is None


@pytest.mark.parametrize("peer", ["127.0.0.1:9", "10.0.0.1:9", "192.168.1.1:9", "169.254.1.1:9", "224.0.0.1:9"])
def test_permission_to_private_and_loopback_peers_is_403_by_default(peer: str, tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker(*USER)
    client = turn_client(tp)
    client.allocate()
    reply = client.permit(Endpoint.from_text(peer))
    assert error_of(reply) == 403, reply


def test_permission_to_the_servers_own_port_is_403_even_when_allowed(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker(*USER, "--allow-peer", "127.0.0.0/8")
    client = turn_client(tp)
    client.allocate()
    assert error_of(client.permit(Endpoint.from_text(f"127.0.0.1:{tp.port}"))) == 403
    assert client.permit(Endpoint.from_text("127.0.0.1:9")).msg_class == MsgClass.SUCCESS


def test_user_quota_gives_486(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker(*USER, "--user-quota", "1")
    assert _allocate(turn_client(tp, src_ip="127.0.0.2")) is None
    assert _allocate(turn_client(tp, src_ip="127.0.0.3")) == 486


def test_source_quota_gives_486(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker("--turn-user", "alice:wonderland", "--turn-user", "bob:builder", "--source-quota", "1")
    assert _allocate(turn_client(tp, "alice", "wonderland", src_ip="127.0.0.2")) is None
    assert _allocate(turn_client(tp, "bob", "builder", src_ip="127.0.0.2")) == 486
    assert _allocate(turn_client(tp, "bob", "builder", src_ip="127.0.0.3")) is None


def test_total_allocations_give_486(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    tp = tracker(*USER, "--max-allocations", "2")
    assert _allocate(turn_client(tp, src_ip="127.0.0.2")) is None
    assert _allocate(turn_client(tp, src_ip="127.0.0.3")) is None
    assert _allocate(turn_client(tp, src_ip="127.0.0.4")) == 486


def test_rest_secret_usernames_expire(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    secret = "s3cret-shared-with-the-web-app"
    tp = tracker("--turn-secret", secret)
    expired = f"{int(time.time()) - 60}:bob"
    assert _allocate(turn_client(tp, expired, rest_password(secret.encode(), expired))) == 401
    valid = f"{int(time.time()) + 600}:bob"
    assert _allocate(turn_client(tp, valid, rest_password(secret.encode(), valid), src_ip="127.0.0.3")) is None
    assert _allocate(turn_client(tp, valid, rest_password(b"another secret", valid), src_ip="127.0.0.4")) == 401


def test_group_credentials_reach_only_their_group(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    """Nothing is relayed for a stranger outside a --relay group, even with
    --allow-peer: a group's allocations reach only the group's relayed addresses."""
    tp = tracker("--relay", "--turn-user", "alice:wonderland", "--allow-peer", "127.0.0.0/8")

    def grant(group: str) -> RelayGrant:
        return RelayGrant.from_wire(tp.ask(RelayRequest(group).to_wire(), timeout=3) or b"")

    ours, theirs = grant("ours"), grant("theirs")
    member = turn_client(tp, ours.username, ours.password, src_ip="127.0.0.2")
    mate = turn_client(tp, ours.username, ours.password, src_ip="127.0.0.3")
    stranger = turn_client(tp, theirs.username, theirs.password, src_ip="127.0.0.4")
    operator = turn_client(tp, src_ip="127.0.0.5")  # --turn-user credentials
    a, b, c, d = member.allocate(), mate.allocate(), stranger.allocate(), operator.allocate()
    outsider = udp_peer("127.0.0.6")
    try:
        # The member may reach its mate, nobody else: not another group, not an
        # operator's allocation, not an address --allow-peer opens to operators.
        assert member.permit(b).msg_class == MsgClass.SUCCESS
        for target in (c, d, peer_endpoint(outsider)):
            assert error_of(member.permit(target)) == 403, target
        # The stranger cannot open a way into the group either.
        assert error_of(stranger.permit(a)) == 403
        # An operator's allocation may reach the member's relayed address (the peer policy), but
        # the member never permitted it: nothing arrives.
        assert operator.permit(a).msg_class == MsgClass.SUCCESS
        operator.send_to(a, b"from an operator")
        outsider.sendto(b"from the internet", a.sockaddr())
        assert member.receive(1.0) is None
        # The mate's data does arrive (same group, permitted).
        assert mate.permit(a).msg_class == MsgClass.SUCCESS
        mate.send_to(a, b"from the mate")
        assert member.receive() == ("data", b, b"from the mate")
        # And a stranger's relayed data to the member is dropped by the server.
        stranger.send_to(a, b"no permission")
        assert recv_or_none(outsider, 0.3) is None
        assert member.receive(0.5) is None
    finally:
        outsider.close()


def test_relay_credentials_are_bound_to_their_group(tracker, turn_client) -> None:  # type: ignore[no-untyped-def]
    """A group username with a forged tag, or a group credential on a server that
    does not relay for groups, is refused."""
    tp = tracker("--relay")
    real = RelayGrant.from_wire(tp.ask(RelayRequest("g1").to_wire()) or b"")
    expiry, _, tag = real.username.split(":")
    forged = f"{expiry}:g:{'0' * 16 if tag != '0' * 16 else '1' * 16}"
    assert _allocate(turn_client(tp, forged, real.password)) == 401
    other = tracker("--turn-user", "alice:wonderland")
    assert _allocate(turn_client(other, real.username, real.password, src_ip="127.0.0.3")) == 401
