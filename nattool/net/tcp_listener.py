"""TCP on the tracker port: framed text requests, STUN and TURN over a stream.

One connection carries back-to-back frames (docs/PROTOCOL.md section 9; the deframer is
:mod:`nattool.protocol.stream_frames`); each complete frame goes to a
:class:`StreamHandler` (the serving loop), which answers on the same connection.

A connection can never hold up others: reading is the event loop's, writing never
blocks (replies queue in the transport, bounded: past the bound relayed data is
dropped, as UDP would drop it, and past a hard bound the connection is closed), the
bytes of an incomplete frame are bounded by the deframer, and a connection that
sends nothing, or an incomplete frame, for too long is closed by :meth:`TcpListener.sweep`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import time
from collections import Counter
from typing import Any, Protocol

from nattool.errors import NetworkError, ProtocolError
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.stream_frames import ChannelDataFrame, StreamDeframer, StunFrame, text_frame
from nattool.protocol.turn_server import ClientRef

log = logging.getLogger("nattool.serve")

MAX_CONNECTIONS = 4096  # in the whole server
MAX_CONNECTIONS_PER_SOURCE = 64  # per client IP address
# Bytes queued toward one client: past SOFT, relayed data is dropped (a slow
# reader loses packets, as on UDP); past HARD, the connection is closed.
WRITE_BUFFER_SOFT = 256 * 1024
WRITE_BUFFER_HARD = 1024 * 1024
# Seconds a connection may wait between the first and last byte of one frame, and
# without any frame at all (the tracker's own clients re-register every few
# seconds; a TURN client refreshes its allocation well within the lifetime).
PARTIAL_FRAME_TIMEOUT = 10.0
IDLE_TIMEOUT = 900.0
EOF_GRACE = 2.0  # seconds a half-closed connection stays open for the replies owed
LISTEN_BACKLOG = 512
_connection_ids = itertools.count(1)


class StreamHandler(Protocol):
    """What a TCP connection hands its frames to (the serving loop)."""

    def on_stream_text(self, conn: "StreamConnection", payload: bytes) -> None: ...

    def on_stream_stun(self, conn: "StreamConnection", message: bytes) -> None: ...

    def on_stream_channel_data(self, conn: "StreamConnection", frame: bytes) -> None: ...

    def on_stream_closed(self, conn: "StreamConnection") -> None: ...


class _TextReplies:
    """The ``sock`` of a connection as the registration batch sees it: a reply
    for ``addr`` goes out as one text frame on this connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: "StreamConnection") -> None:
        self.conn = conn

    def sendto(self, data: bytes, addr: Any) -> int:
        self.conn.send_text(data)
        return len(data)


class StreamConnection(asyncio.Protocol):
    """One client's TCP connection to the tracker port."""

    def __init__(self, listener: "TcpListener") -> None:
        self.listener = listener
        self.id = next(_connection_ids)
        self.turn_client: ClientRef | None = None  # set once it speaks TURN
        self.local = listener.local  # the tracker endpoint of this family (STUN replies name it)
        self.peer: Endpoint | None = None
        self.addr: tuple[str, int] = ("", 0)
        self.closed = False
        self.sock = _TextReplies(self)  # what the registration batch sends replies through
        self.deframer = StreamDeframer()
        self.transport: asyncio.Transport | None = None
        now = time.monotonic()
        self.last_frame = now
        self.partial_since: float | None = None

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        peername = transport.get_extra_info("peername")
        try:
            self.peer = Endpoint.from_sockaddr(peername[:2])
        except (TypeError, ValueError):
            transport.abort()
            self.closed = True
            return
        self.addr = (str(self.peer.ip), self.peer.port)
        if not self.listener.admit(self):
            transport.abort()
            self.closed = True
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            frames = self.deframer.feed(data)
        except ProtocolError:
            self.listener.counters["tcp_protocol_error"] += 1
            self.close()
            return
        now = time.monotonic()
        if frames:
            self.last_frame = now
        self.partial_since = (self.partial_since or now) if self.deframer.buffered else None
        handler = self.listener.handler
        for frame in frames:
            if self.closed:
                return
            cls = frame.__class__
            if cls is StunFrame:
                handler.on_stream_stun(self, frame.data)  # type: ignore[union-attr]
            elif cls is ChannelDataFrame:
                handler.on_stream_channel_data(self, frame.data)  # type: ignore[union-attr]
            else:
                handler.on_stream_text(self, frame.payload)  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        # The client is done sending; replies still on their way (registrations wait
        # for the store) get a moment before our side closes too.
        asyncio.get_running_loop().call_later(EOF_GRACE, self.close)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.listener.forget(self):
            self.listener.handler.on_stream_closed(self)

    # -- sending -----------------------------------------------------------------------
    def send_frame(self, frame: bytes, droppable: bool = False) -> bool:
        """Queue ``frame``; False when it was not sent (closed, or a slow reader).
        ``droppable``: relayed data, lost when the client does not keep up."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return False
        queued = transport.get_write_buffer_size()
        if queued > WRITE_BUFFER_HARD:
            self.listener.counters["tcp_slow_reader"] += 1
            self.close()
            return False
        if droppable and queued > WRITE_BUFFER_SOFT:
            self.listener.counters["tcp_dropped_frames"] += 1
            return False
        transport.write(frame)
        return True

    def send_text(self, payload: bytes) -> None:
        self.send_frame(text_frame(payload))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()


class TcpListener:
    """The TCP socket on one tracker address, and its connections."""

    def __init__(self, handler: StreamHandler, local: Endpoint, counters: Counter[str]) -> None:
        self.handler = handler
        self.local = local
        self.counters = counters
        self.connections: set[StreamConnection] = set()
        self._per_source: Counter[str] = Counter()
        self._server: asyncio.AbstractServer | None = None
        self.max_connections = MAX_CONNECTIONS
        self.max_per_source = MAX_CONNECTIONS_PER_SOURCE

    async def start(self, loop: asyncio.AbstractEventLoop, reuse_port: bool = False) -> None:
        sock = bind_tcp(str(self.local.ip), self.local.port, reuse_port)
        self._server = await loop.create_server(lambda: StreamConnection(self), sock=sock, backlog=LISTEN_BACKLOG)

    def admit(self, conn: StreamConnection) -> bool:
        assert conn.peer is not None
        key = str(conn.peer.ip)
        if len(self.connections) >= self.max_connections or self._per_source[key] >= self.max_per_source:
            self.counters["tcp_refused"] += 1
            return False
        self.connections.add(conn)
        self._per_source[key] += 1
        self.counters["tcp_accepted"] += 1
        return True

    def forget(self, conn: StreamConnection) -> bool:
        """Drop ``conn`` from the books; False when it was never admitted (or is gone)."""
        if conn not in self.connections:
            return False
        self.connections.discard(conn)
        assert conn.peer is not None
        key = str(conn.peer.ip)
        self._per_source[key] -= 1
        if self._per_source[key] <= 0:
            del self._per_source[key]
        return True

    def sweep(self, now: float) -> None:
        """Close connections stuck in the middle of a frame, or silent for too long."""
        for conn in list(self.connections):
            stuck = conn.partial_since is not None and now - conn.partial_since > PARTIAL_FRAME_TIMEOUT
            if stuck or now - conn.last_frame > IDLE_TIMEOUT:
                self.counters["tcp_timeout"] += 1
                conn.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


def bind_tcp(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 sockets IPv6 only, as on UDP)."""
    ip = ipaddress.ip_address(host)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise NetworkError(f"cannot listen on tcp {Endpoint(ip, port)}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
