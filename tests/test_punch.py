"""The peer message format of `nattool connect` (pure: no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nattool.errors import NattoolError, ProtocolError
from nattool.protocol.punch import (
    MAGIC,
    MAX_BODY,
    BadMac,
    Kind,
    NotPeerMessage,
    PeerMessage,
    ReplayGuard,
    ReplayWindow,
    derive_key,
    is_peer_message,
)

KEY = derive_key("46d0f69e-e347-47a7-8e95-43e5baa95348")
SENDER = bytes(range(8))


def test_round_trip_every_kind() -> None:
    for kind in Kind:
        msg = PeerMessage(kind, SENDER, 7, 3, "héllo".encode())
        wire = msg.to_wire(KEY)
        assert wire.startswith(MAGIC)
        assert PeerMessage.from_wire(wire, KEY) == msg


def test_uuid_group_key_is_case_insensitive_but_other_groups_differ() -> None:
    assert derive_key("46D0F69E-E347-47A7-8E95-43E5BAA95348") == KEY
    assert derive_key("CaseMatters") != derive_key("casematters")
    assert derive_key("group-a") != derive_key("group-b")
    assert len(KEY) == 32


def test_key_is_hkdf_sha256_of_the_group() -> None:
    # RFC 5869 by hand: a fixed vector, so a change of the derivation cannot slip in
    # unnoticed (it would split old and new peers into two worlds).
    import hashlib
    import hmac

    prk = hmac.new(b"nattool-connect v1", b"lab-group", hashlib.sha256).digest()
    okm = hmac.new(prk, b"peer message mac\x01", hashlib.sha256).digest()
    assert derive_key("lab-group") == okm


def test_wrong_group_is_a_bad_mac() -> None:
    wire = PeerMessage(Kind.PING, SENDER, 1).to_wire(derive_key("other-group"))
    with pytest.raises(BadMac):
        PeerMessage.from_wire(wire, KEY)


def test_every_single_bit_flip_is_detected() -> None:
    wire = bytearray(PeerMessage(Kind.DATA, SENDER, 9, 1, b"line").to_wire(KEY))
    for i in range(len(wire)):
        for bit in range(8):
            bad = bytearray(wire)
            bad[i] ^= 1 << bit
            with pytest.raises(ProtocolError):
                PeerMessage.from_wire(bytes(bad), KEY)


def test_foreign_bytes_are_not_peer_messages() -> None:
    for data in (b"", b"//nat", b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12), b"127.0.0.1:5"):
        assert not is_peer_message(data)
        with pytest.raises(NotPeerMessage):
            PeerMessage.from_wire(data, KEY)


def test_sizes_are_bounded() -> None:
    PeerMessage(Kind.DATA, SENDER, 1, 1, b"x" * MAX_BODY).to_wire(KEY)
    assert len(PeerMessage(Kind.DATA, SENDER, 1, 1, b"x" * MAX_BODY).to_wire(KEY)) == 1200
    with pytest.raises(ProtocolError):
        PeerMessage(Kind.DATA, SENDER, 1, 1, b"x" * (MAX_BODY + 1))
    with pytest.raises(ProtocolError):
        PeerMessage(Kind.PING, b"short", 1)
    with pytest.raises(BadMac):
        PeerMessage.from_wire(MAGIC + bytes(20), KEY)


def test_authentic_unknown_kind_is_a_protocol_error() -> None:
    import hashlib
    import hmac
    import struct

    head = struct.pack("!4sB8sQQ", MAGIC, 99, SENDER, 1, 0)
    wire = head + hmac.new(KEY, head, hashlib.sha256).digest()[:16]
    with pytest.raises(ProtocolError):
        PeerMessage.from_wire(wire, KEY)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1300))
def test_random_bytes_raise_only_our_errors(data: bytes) -> None:
    for candidate in (data, MAGIC + data):
        try:
            PeerMessage.from_wire(candidate, KEY)
        except NattoolError:
            pass


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(Kind)),
    st.binary(min_size=8, max_size=8),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=MAX_BODY),
)
def test_round_trip_property(kind: Kind, sender: bytes, seq: int, echo: int, body: bytes) -> None:
    msg = PeerMessage(kind, sender, seq, echo, body)
    assert PeerMessage.from_wire(msg.to_wire(KEY), KEY) == msg


def test_replay_window_accepts_each_number_once_and_nothing_too_old() -> None:
    w = ReplayWindow(size=64)
    assert not w.accept(0)
    assert w.accept(5)
    assert not w.accept(5)
    assert w.accept(3)  # late but inside the window
    assert not w.accept(3)
    assert w.accept(100)
    assert not w.accept(36)  # 100 - 36 = 64: fell out of the window
    assert w.accept(37)
    assert not w.accept(37)
    assert w.accept(1000)  # a jump wider than the window clears it
    assert not w.accept(1000)
    assert w.accept(999)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=200))
def test_replay_window_against_a_model(numbers: list[int]) -> None:
    w = ReplayWindow(size=16)
    seen: set[int] = set()
    top = 0
    for n in numbers:
        expected = n not in seen and (n > top or top - n < 16)
        assert w.accept(n) == expected
        if expected:
            seen.add(n)
            top = max(top, n)


def test_replay_guard_is_per_sender_and_bounded() -> None:
    g = ReplayGuard(max_senders=2)
    a, b, c = b"a" * 8, b"b" * 8, b"c" * 8
    assert g.accept(a, 1) and g.accept(b, 1)
    assert not g.accept(a, 1)
    assert g.replays == 1
    assert g.accept(c, 1)  # evicts the least recently heard (b)
    assert g.accept(b, 1)  # b was forgotten: bounded memory, at the price of this
    assert not g.accept(c, 1)
