"""A small blocking TURN client for the tests, over UDP or TCP, built on nattool's own
codec (nattool.protocol.turn / stun / stream_frames): real sockets, no mocks."""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Iterator, Sequence

import pytest

from nattool.protocol.endpoint import Endpoint
from nattool.protocol.stream_frames import ChannelDataFrame, StreamDeframer, StunFrame, TextFrame, text_frame
from nattool.protocol.stun import ErrorCode, MsgClass, Nonce, Realm, StunMessage, Username, long_term_key, parse
from nattool.protocol.turn import (
    ChannelNumber,
    Data,
    Lifetime,
    RequestedTransport,
    TurnMethod,
    XorPeerAddress,
    XorRelayedAddress,
    encode_channel_data,
    parse_channel_data,
)

PROTO_UDP = 17


class TurnTestClient:
    """One TURN client: a UDP socket (or a TCP connection) to a server's tracker port."""

    def __init__(
        self,
        server: tuple[str, int],
        username: str | None = None,
        password: str | None = None,
        *,
        transport: str = "udp",
        src_ip: str = "127.0.0.2",
        timeout: float = 3.0,
    ) -> None:
        self.server = server
        self.username = username
        self.password = password
        self.transport = transport
        self.timeout = timeout
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        if transport == "tcp":
            self.sock = socket.create_connection(server, timeout=timeout, source_address=(src_ip, 0))
            self.deframer = StreamDeframer()
            self.frames: list[object] = []
        else:
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.bind((src_ip, 0))
        self.realm: str | None = None
        self.nonce: str | None = None
        self.relayed: Endpoint | None = None
        self.last_request = b""

    def close(self) -> None:
        self.sock.close()

    # -- raw I/O ---------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        if self.transport == "tcp":
            self.sock.sendall(data)
        else:
            self.sock.sendto(data, self.server)

    def recv_raw(self, timeout: float | None = None) -> bytes | None:
        """The next message from the server (a datagram, or a STUN/ChannelData frame),
        or None after ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                if self.transport == "tcp":
                    while self.frames:
                        frame = self.frames.pop(0)
                        if isinstance(frame, (StunFrame, ChannelDataFrame)):
                            return frame.data
                        assert not isinstance(frame, TextFrame), frame
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        return None
                    self.frames += self.deframer.feed(chunk)
                    continue
                data, addr = self.sock.recvfrom(65536)
            except (socket.timeout, ConnectionRefusedError):
                return None
            if (addr[0], addr[1]) == self.server:
                return data

    def text(self, payload: bytes) -> bytes:
        """A text request in a frame on the TCP connection, and its reply."""
        assert self.transport == "tcp"
        self.sock.sendall(text_frame(payload))
        deadline = time.monotonic() + self.timeout
        while True:
            for i, frame in enumerate(self.frames):
                if isinstance(frame, TextFrame):
                    del self.frames[i]
                    return frame.payload
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed"
            self.frames += self.deframer.feed(chunk)

    # -- requests --------------------------------------------------------------------
    def key(self) -> bytes:
        assert self.username is not None and self.password is not None and self.realm is not None
        return long_term_key(self.username, self.realm, self.password)

    def request(self, method: int, attrs: Sequence[object], *, authenticate: bool = True) -> StunMessage:
        """Send a request and return the response, doing the 401 / 438 dance once
        (the first request carries no credentials, as real clients do)."""
        for _ in range(3):
            txid = os.urandom(12)
            if authenticate and self.nonce is not None and self.username is not None:
                full = (*attrs, Username(self.username), Realm(self.realm or ""), Nonce(self.nonce))
                wire = StunMessage(MsgClass.REQUEST, method, txid, full).to_wire(  # type: ignore[arg-type]
                    integrity_key=self.key(), fingerprint=True
                )
            else:
                wire = StunMessage(MsgClass.REQUEST, method, txid, tuple(attrs)).to_wire(fingerprint=True)  # type: ignore[arg-type]
            self.last_request = wire
            self.send_raw(wire)
            reply = self._response(txid)
            error = reply.get(ErrorCode)
            if authenticate and isinstance(error, ErrorCode) and error.code in (401, 438) and self.username is not None:
                realm, nonce = reply.get(Realm), reply.get(Nonce)
                if isinstance(realm, Realm) and isinstance(nonce, Nonce) and (self.nonce != nonce.text or error.code == 438):
                    self.realm, self.nonce = realm.text, nonce.text
                    continue
            return reply
        return reply

    def _response(self, txid: bytes) -> StunMessage:
        deadline = time.monotonic() + self.timeout
        while True:
            data = self.recv_raw(max(0.0, deadline - time.monotonic()))
            assert data is not None, "no response from the TURN server"
            if data[0] >= 0x40:
                continue  # ChannelData meanwhile
            message = parse(data)
            if message.transaction_id == txid:
                self.last_response = data
                return message

    def allocate(self, *extra: object) -> Endpoint:
        reply = self.request(TurnMethod.ALLOCATE, (RequestedTransport(PROTO_UDP), *extra))
        assert reply.msg_class == MsgClass.SUCCESS, error_of(reply)
        relayed = reply.get(XorRelayedAddress)
        assert isinstance(relayed, XorRelayedAddress)
        self.relayed = relayed.endpoint
        return relayed.endpoint

    def refresh(self, lifetime: int) -> StunMessage:
        return self.request(TurnMethod.REFRESH, (Lifetime(lifetime),))

    def permit(self, *peers: Endpoint) -> StunMessage:
        return self.request(TurnMethod.CREATE_PERMISSION, tuple(XorPeerAddress(p) for p in peers))

    def bind(self, channel: int, peer: Endpoint) -> StunMessage:
        return self.request(TurnMethod.CHANNEL_BIND, (ChannelNumber(channel), XorPeerAddress(peer)))

    def send_to(self, peer: Endpoint, payload: bytes) -> None:
        """A Send indication."""
        wire = StunMessage(
            MsgClass.INDICATION, TurnMethod.SEND, os.urandom(12), (XorPeerAddress(peer), Data(payload))  # type: ignore[arg-type]
        ).to_wire()
        self.send_raw(wire)

    def send_channel(self, channel: int, payload: bytes) -> None:
        self.send_raw(encode_channel_data(channel, payload, stream=self.transport == "tcp"))

    def receive(self, timeout: float = 3.0) -> tuple[str, object, bytes] | None:
        """The next relayed payload: ("data", peer, payload) for a Data indication,
        ("channel", number, payload) for ChannelData; None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            data = self.recv_raw(max(0.0, deadline - time.monotonic()))
            if data is None:
                return None
            if 0x40 <= data[0] <= 0x7F:
                cd = parse_channel_data(data)
                return ("channel", cd.channel, cd.payload)
            message = parse(data)
            if message.msg_class == MsgClass.INDICATION and message.method == TurnMethod.DATA:
                peer, payload = message.get(XorPeerAddress), message.get(Data)
                assert isinstance(peer, XorPeerAddress) and isinstance(payload, Data)
                return ("data", peer.endpoint, payload.payload)


def error_of(message: StunMessage) -> int | None:
    """The error code of a response, None for a success."""
    error = message.get(ErrorCode)
    return error.code if isinstance(error, ErrorCode) else None


def udp_peer(ip: str = "127.0.0.3") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.settimeout(3.0)
    return sock


def peer_endpoint(sock: socket.socket) -> Endpoint:
    return Endpoint.from_sockaddr(sock.getsockname()[:2])


def recv_or_none(sock: socket.socket, timeout: float = 1.0) -> tuple[bytes, tuple[str, int]] | None:
    sock.settimeout(timeout)
    try:
        data, addr = sock.recvfrom(65536)
    except (socket.timeout, ConnectionRefusedError):
        return None
    return data, (addr[0], addr[1])


@pytest.fixture
def turn_client(tracker: Callable[..., Any]) -> Iterator[Callable[..., TurnTestClient]]:
    """A factory of TurnTestClients to a tracker process (default user alice /
    wonderland), closed at teardown."""
    made: list[TurnTestClient] = []

    def make(tp: Any, user: str | None = "alice", password: str | None = "wonderland", **kw: Any) -> TurnTestClient:
        client = TurnTestClient(tp.addr, user, password, **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
